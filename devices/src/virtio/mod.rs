//! Virtio 1.x devices over the modern PCI transport.
//!
//! [`VirtioPciDevice`] is the PCI function (configuration space, a 64-bit
//! memory BAR holding the common, ISR, device and notify structures and the
//! MSI-X table and PBA); it drives a [`VirtioDevice`] such as
//! [`block::VirtioBlock`]. Queue notifications are served by
//! [`VirtioQueues::process_queue`], which the VMM calls from an I/O thread
//! when the queue's ioeventfd fires; interrupts leave through one
//! [`Interrupt`](crate::Interrupt) per MSI-X vector.

pub mod block;
mod msix;
mod pci;
#[cfg(test)]
mod tests;

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

pub use msix::{MsixEntry, MSIX_ENTRY_SIZE};
pub use pci::{
    VirtioPciDevice, VirtioQueues, BAR_SIZE, COMMON_CFG_OFFSET, DEVICE_CFG_OFFSET, ISR_OFFSET,
    MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER, VIRTIO_PCI_BAR,
    VIRTIO_PCI_VENDOR_ID,
};

/// Feature bit: indirect descriptors (`VIRTIO_F_RING_INDIRECT_DESC`).
pub const VIRTIO_F_RING_INDIRECT_DESC: u32 = 28;
/// Feature bit: `used_event`/`avail_event` suppression (`VIRTIO_F_RING_EVENT_IDX`).
pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;
/// Feature bit: virtio 1.x compliance (`VIRTIO_F_VERSION_1`).
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status: the guest has noticed the device.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
/// Device status: the guest knows how to drive the device.
pub const STATUS_DRIVER: u8 = 2;
/// Device status: the driver is set up and ready.
pub const STATUS_DRIVER_OK: u8 = 4;
/// Device status: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u8 = 8;
/// Device status: the device hit an error and needs a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
/// Device status: the driver gave up on the device.
pub const STATUS_FAILED: u8 = 0x80;

/// MSI-X vector number meaning "no vector".
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Errors from building virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// A device property is out of range.
    #[error("invalid virtio device configuration: {0}")]
    InvalidConfig(String),
    /// The PCI configuration space could not be built.
    #[error("PCI configuration: {0}")]
    Pci(#[from] crate::pci::PciError),
    /// Wrong number of interrupts for the MSI-X vectors.
    #[error("{got} interrupts given for {want} MSI-X vectors")]
    Interrupts {
        /// Interrupts given.
        got: usize,
        /// MSI-X vectors (queues + 1).
        want: usize,
    },
}

/// Why a descriptor chain could not be served at all: the driver broke the
/// virtqueue protocol, so the queue is stopped and the device flagged
/// `DEVICE_NEEDS_RESET`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A loop, a chain longer than the queue, an unreadable or invalid
    /// descriptor, or a bad indirect table.
    #[error("malformed descriptor chain: {0}")]
    Malformed(&'static str),
    /// The chain has no writable byte for the status.
    #[error("descriptor chain has no writable status byte")]
    NoStatus,
}

/// A descriptor chain over the guest memory.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// The device-type-specific half of a virtio device; the transport does
/// feature negotiation, queue set-up, notifications and interrupts.
pub trait VirtioDevice: Send + Sync {
    /// Virtio device ID (2 for block); the PCI device ID is `0x1040 + id`.
    fn device_type(&self) -> u16;
    /// Device-specific feature bits offered (the transport adds
    /// `VERSION_1`, `RING_INDIRECT_DESC` and `RING_EVENT_IDX`).
    fn features(&self) -> u64;
    /// Number of virtqueues.
    fn num_queues(&self) -> u16;
    /// Maximum (and initial) size of each queue; a power of two.
    fn queue_max_size(&self) -> u16;
    /// Reads the device configuration structure at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration structure at `offset`.
    fn write_config(&self, offset: u64, data: &[u8]);
    /// Returns device-specific state to its initial values (device reset).
    fn reset(&self) {}
    /// Serves one request. Returns the number of bytes written into the
    /// chain's writable buffers (the used length), or why the chain is
    /// unusable. `features` are the negotiated features.
    fn process_chain(
        &self,
        mem: &GuestMemoryMmap,
        chain: Chain<'_>,
        features: u64,
    ) -> Result<u32, ChainError>;
}
