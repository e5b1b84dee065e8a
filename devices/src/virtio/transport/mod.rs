//! The virtio 1.x modern PCI transport: the PCI function and its BAR
//! ([`pci`]), MSI-X ([`msix`]), and the virtqueues with their threads
//! ([`queues`]). Device types ([`crate::virtio::block`]) plug in through
//! [`crate::virtio::VirtioDevice`].

pub mod msix;
pub mod pci;
pub mod queues;
