//! KVM state: the VM and its vCPUs, guest memory, CPUID and MSI routing.

pub mod calibrate;
pub mod cpuid;
pub mod exit;
pub mod hw_virt;
pub mod memory;
pub mod msi;
pub mod vcpu;
pub mod vm;
