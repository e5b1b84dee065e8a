//! The interrupt lines devices raise, without knowing how the VMM delivers
//! them (an irqfd on KVM, a counter in tests).

use std::io;

/// An edge-triggered interrupt line (or one MSI vector).
pub trait Interrupt: Send + Sync {
    /// Raises the interrupt.
    fn trigger(&self) -> io::Result<()>;

    /// For an MSI vector: the guest programmed message `address`/`data`
    /// (the VMM updates its interrupt route). Lines ignore it.
    fn update_msi(&self, _address: u64, _data: u32) -> io::Result<()> {
        Ok(())
    }
}
