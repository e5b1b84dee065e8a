//! cryptvm's virtual machine monitor and its command-line front ends.

pub mod acpi;
pub mod boot;
pub mod calibrate;
pub mod config;
pub mod cpuid;
pub mod event_loop;
pub mod img;
pub mod layout;
pub mod memory;
pub mod run;
pub mod terminal;
pub mod vcpu;
pub mod vm;

pub use calibrate::kvm_speed;
