//! Device emulation for cryptvm: PCI, virtio, serial and ACPI devices, and QEMU's
//! isa-debug-exit.
//!
//! Devices see guest memory and interrupt lines only; the `vmm` crate wires
//! them to KVM (ioeventfds, irqfds), so tests can drive them without KVM.

pub mod acpi;
pub mod bus;
pub mod debug_exit;
pub mod i8042;
pub mod interrupt;
pub mod pci;
pub mod serial;
pub mod threads;
pub mod virtio;
pub mod workers;

pub use bus::{lock_device, Bus, BusDevice, SharedDevice};
pub use interrupt::Interrupt;
pub use workers::WorkerPool;
