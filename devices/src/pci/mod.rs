//! PCI: configuration space model, the host bridge, bus 0 and the two ways
//! the guest reaches configuration space (port I/O 0xCF8/0xCFC and ECAM).
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use devices::pci::{PciConfigIo, PciConfigMmio, PciRoot};
//! use devices::BusDevice;
//!
//! let root = Arc::new(Mutex::new(PciRoot::new()));
//! let mut cf8 = PciConfigIo::new(root.clone()); // PIO 0xCF8, 8 ports
//! let mut ecam = PciConfigMmio::new(root); // MMIO at the ECAM base
//!
//! // Vendor/device ID of 00:00.0 through both paths.
//! cf8.write(0, &0x8000_0000u32.to_le_bytes());
//! let mut id = [0u8; 4];
//! cf8.read(4, &mut id);
//! let mut id2 = [0u8; 4];
//! ecam.read(0, &mut id2);
//! assert_eq!(id, id2);
//! assert_eq!(u32::from_le_bytes(id), 0x0d57_8086);
//! ```

mod access;
pub mod config;
mod host_bridge;
mod root;

pub use access::{PciConfigIo, PciConfigMmio, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN};
pub use config::{PciConfiguration, PciIds};
pub use host_bridge::{PciHostBridge, HOST_BRIDGE_DEVICE_ID, HOST_BRIDGE_VENDOR_ID};
pub use root::{BarObserver, PciRoot, SharedPciDevice, NUM_SLOTS};

/// Kind of a base address register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// Port I/O space.
    Io,
    /// 32-bit memory space.
    Memory32,
    /// 64-bit memory space (uses two BAR registers).
    Memory64,
}

/// A BAR's current placement, as the guest has programmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarRegion {
    /// BAR number (0..=5; a 64-bit BAR is named by its low half).
    pub index: u8,
    /// Guest physical (or port) address.
    pub addr: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// Address space.
    pub kind: BarKind,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

/// A PCI function on bus 0, as `PciRoot` sees it.
///
/// Configuration accesses arrive split per dword: `reg` is the dword index
/// (0..1024; 0..64 through 0xCF8/0xCFC), `offset` the byte within it and
/// `offset + data.len() <= 4`. Implementations must never panic on any
/// guest-controlled value and should ignore writes to read-only bits
/// ([`PciConfiguration`] does both).
pub trait PciDevice: Send {
    /// A guest read of configuration space; fill `data`.
    fn read_config(&mut self, reg: usize, offset: u64, data: &mut [u8]);
    /// A guest write to configuration space.
    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]);
    /// The BARs and where the guest has put them. `PciRoot` compares these
    /// before and after each configuration write to report moves.
    fn bar_regions(&self) -> Vec<BarRegion> {
        Vec::new()
    }
}

/// Errors from building PCI devices or the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// A BAR that is not a power of two, misaligned, too small or overlapping another.
    #[error("invalid BAR {index}: size {size:#x} at {addr:#x}")]
    InvalidBar {
        /// BAR number.
        index: usize,
        /// Requested size.
        size: u64,
        /// Requested address.
        addr: u64,
    },
    /// No room left in the 256-byte configuration space for a capability.
    #[error("no room in configuration space for a {len}-byte capability")]
    CapabilitySpace {
        /// Capability length.
        len: usize,
    },
    /// The slot is taken (slot 0 is the host bridge's).
    #[error("PCI slot {0} is already in use")]
    SlotInUse(u8),
    /// The slot number is beyond the bus.
    #[error("PCI slot {0} does not exist (bus 0 has slots 0..=31)")]
    NoSuchSlot(u8),
    /// Every slot is taken.
    #[error("no free PCI slot on bus 0")]
    BusFull,
}
