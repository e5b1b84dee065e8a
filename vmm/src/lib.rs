//! cryptvm's virtual machine monitor and its command-line front ends.

pub mod acpi;
pub mod boot;
pub mod calibrate;
pub mod config;
pub mod control;
pub mod cpuid;
pub mod ctl;
pub mod event_loop;
pub mod img;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod msi;
pub mod pci_bars;
pub mod qmp;
pub mod queries;
pub mod run;
pub mod terminal;
pub mod vcpu;
pub mod virtio_blk_pci;
pub mod vm;

pub use calibrate::kvm_speed;
