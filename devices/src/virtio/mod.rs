//! Virtio 1.x devices over the modern PCI transport.
//!
//! [`VirtioPciDevice`] is the PCI function (configuration space, a 64-bit
//! memory BAR holding the common, ISR, device and notify structures and the
//! MSI-X table and PBA); it drives a [`VirtioDevice`] such as
//! [`block::VirtioBlock`]. Each queue has its own thread, woken by the
//! queue's kick eventfd (which the VMM registers as a KVM ioeventfd), that
//! hands requests to the shared request workers; see [`queues`] for who owns
//! what (all three in [`transport`]). Interrupts leave through one [`Interrupt`](crate::Interrupt) per
//! MSI-X vector.

pub mod block;
#[cfg(test)]
mod tests;
pub mod transport;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryMmap;

pub use transport::msix::{MsixEntry, MSIX_ENTRY_SIZE};
pub use transport::pci::{
    VirtioPciDevice, BAR_SIZE, COMMON_CFG_OFFSET, DEVICE_CFG_OFFSET, ISR_OFFSET, MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER, VIRTIO_PCI_BAR, VIRTIO_PCI_VENDOR_ID,
};
pub use transport::queues::{self, FaultReporter, VirtioQueues};

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
    /// A virtio-blk property is out of range ([`block::BlockConfig::validate`]).
    #[error(transparent)]
    BlockConfig(#[from] block::BlockConfigError),
    /// The PCI configuration space could not be built.
    #[error("PCI configuration: {0}")]
    Pci(#[from] crate::pci::PciError),
    /// Creating the queues' eventfds or threads failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
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
    /// Serves one request, the descriptors of one chain (on a request
    /// worker; several run at once). Returns the number of bytes written
    /// into the chain's writable buffers (the used length), or why the chain
    /// is unusable.
    fn process(&self, mem: &GuestMemoryMmap, chain: &[Descriptor]) -> Result<u32, ChainError>;
    /// Completes a request the device could not serve (its handler failed)
    /// with the device type's error status; returns the used length.
    fn fail(&self, mem: &GuestMemoryMmap, chain: &[Descriptor]) -> Result<u32, ChainError>;
    /// Lets go of the device's backend: called once no request can run any
    /// more (the device is being removed).
    fn release(&self) {}
}
