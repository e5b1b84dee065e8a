//! Device emulation for cryptvm: PCI, virtio, serial and ACPI devices.
//!
//! Devices see guest memory and an interrupt line only; the `vmm` crate wires
//! them to KVM. The devices themselves arrive with the boot and virtio-blk work.
