//! What is specific to the guest's architecture.

pub mod x86_64;
