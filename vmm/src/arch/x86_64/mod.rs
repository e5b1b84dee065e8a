//! The x86_64 PC cryptvm emulates: where things are in the guest's address
//! space, how a kernel is loaded, and the ACPI tables that describe it all.

pub mod acpi;
pub mod boot;
pub mod layout;
