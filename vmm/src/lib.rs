//! cryptvm's virtual machine monitor and its command-line front ends.
//!
//! - [`vstate`]: KVM itself: the VM, its vCPUs, guest memory, CPUID, MSI routing.
//! - [`arch`]: the x86_64 machine: memory layout, kernel loading, ACPI tables.
//! - [`device_manager`]: the PCI disks, their BARs and doorbells, hot plug.
//! - [`control`]: what QMP can ask of a running VM, and the queries' answers.
//! - [`config`]: the VM's configuration, from the JSON file and the options.
//! - [`qmp`]: the QMP server and its protocol.
//! - [`seccomp`]: the seccomp filters of `cryptvm run`'s threads.
//! - [`cli`]: `cryptvm run` and `cryptvm ctl`.
//!
//! The image tool, `cryptvm img`, is its own crate (`img`), over `block` alone.

pub mod arch;
pub mod cli;
pub mod config;
pub mod control;
pub mod core_dumps;
pub mod device_manager;
pub mod event_loop;
pub mod qmp;
pub mod seccomp;
pub mod vstate;

pub use vstate::calibrate::kvm_speed;
