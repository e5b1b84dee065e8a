//! cryptvm's virtual machine monitor and its command-line front ends.

pub mod img;
