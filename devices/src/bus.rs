//! Address buses (port I/O and MMIO) that route guest accesses to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable on a bus. `offset` is relative to the range the device
/// was inserted at; `data` is the access (1, 2, 4 or 8 bytes, little endian).
pub trait BusDevice: Send {
    /// A guest read; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a range could not be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range overlaps one already on the bus, or is empty.
    #[error("bus range {base:#x}+{len:#x} overlaps another device or is empty")]
    Overlap {
        /// Start of the refused range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// A shared device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Non-overlapping ranges of addresses, each owned by one device.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base+len)` to `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Overlap { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if let Some((&b, &(l, _))) = before {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// Whether `[base, base+len)` is unused (and does not wrap).
    pub fn is_free(&self, base: u64, len: u64) -> bool {
        let Some(end) = base.checked_add(len).filter(|_| len > 0) else {
            return false;
        };
        match self.ranges.range(..end).next_back() {
            Some((&b, &(l, _))) => b.saturating_add(l) <= base,
            None => true,
        }
    }

    /// Removes the range starting at `base`.
    pub fn remove(&mut self, base: u64) -> Option<SharedDevice> {
        self.ranges.remove(&base).map(|(_, d)| d)
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// The device mapped at `addr` and the offset into its range. Callers
    /// drop the bus lock before calling into the device, so a device may
    /// change the bus (a guest moving a PCI BAR) without deadlocking.
    pub fn resolve(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        self.find(addr).map(|(offset, dev)| (offset, dev.clone()))
    }

    /// Routes a read; false (and all-ones data) when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock_device(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Routes a write; false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock_device(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device that panicked
/// once must not take the whole VMM down with it.
pub fn lock_device(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_refuses_overlaps() {
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Reg(1)))).unwrap();
        assert!(bus.insert(0x3fc, 8, Arc::new(Mutex::new(Reg(0)))).is_err());
        assert!(bus.insert(0x3f0, 9, Arc::new(Mutex::new(Reg(0)))).is_err());
        assert!(bus.insert(0x400, 0, Arc::new(Mutex::new(Reg(0)))).is_err());
        bus.insert(0x3f0, 8, Arc::new(Mutex::new(Reg(0)))).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [3]);
        assert!(bus.write(0x3f8, &[7]));
        bus.read(0x3f8, &mut b);
        assert_eq!(b, [7]);
        assert!(!bus.read(0x500, &mut b));
        assert_eq!(b, [0xff]);
        assert!(bus.remove(0x3f8).is_some());
        assert!(!bus.write(0x3f8, &[1]));
    }
}
