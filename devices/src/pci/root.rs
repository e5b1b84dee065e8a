//! Bus 0 of PCI segment 0: the host bridge at slot 0 and up to 31 more
//! single-function devices, with configuration accesses routed by
//! bus/device/function and BAR moves reported to the VMM.

use std::sync::{Arc, Mutex, MutexGuard};

use super::config::{COMMAND_IO, COMMAND_MEMORY, CONFIG_SPACE_SIZE, REG_BAR0, REG_COMMAND_STATUS};
use super::{BarKind, BarRegion, PciDevice, PciError, PciHostBridge};

/// Device slots on bus 0.
pub const NUM_SLOTS: usize = 32;

/// Called when the guest moves a BAR of the device in `slot` from `old` to
/// `new` (with decoding enabled, so the move is meant). The VMM remaps the
/// region on its MMIO/PIO bus and moves any ioeventfds in it. It runs on the
/// vCPU thread with the `PciRoot` locked, so it must not lock the root.
pub type BarObserver = Box<dyn FnMut(u8, &BarRegion, &BarRegion) + Send>;

/// A shared PCI function.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

struct Slot {
    device: SharedPciDevice,
    /// BAR placements last reported (initially those at registration).
    bars: Vec<BarRegion>,
}

/// PCI bus 0 with its host bridge.
///
/// Lock order: `PciRoot` before any device in it; the VMM must not call into
/// the root while holding a device's lock.
pub struct PciRoot {
    slots: Vec<Option<Slot>>,
    observer: Option<BarObserver>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// Bus 0 holding only the host bridge at 00:00.0.
    pub fn new() -> Self {
        let mut slots: Vec<Option<Slot>> = (0..NUM_SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            device: Arc::new(Mutex::new(PciHostBridge::new())),
            bars: Vec::new(),
        });
        Self {
            slots,
            observer: None,
        }
    }

    /// Puts `device` at `slot` (function 0). Its current BARs are taken as
    /// already mapped by the caller.
    pub fn add_device(&mut self, slot: u8, device: SharedPciDevice) -> Result<(), PciError> {
        let entry = self
            .slots
            .get_mut(usize::from(slot))
            .ok_or(PciError::NoSuchSlot(slot))?;
        if entry.is_some() {
            return Err(PciError::SlotInUse(slot));
        }
        let bars = lock(&device).bar_regions();
        *entry = Some(Slot { device, bars });
        Ok(())
    }

    /// The lowest free slot.
    pub fn free_slot(&self) -> Result<u8, PciError> {
        self.slots
            .iter()
            .position(Option::is_none)
            .map(|s| s as u8)
            .ok_or(PciError::BusFull)
    }

    /// Removes the device at `slot` (never the host bridge at slot 0).
    pub fn remove_device(&mut self, slot: u8) -> Option<SharedPciDevice> {
        if slot == 0 {
            return None;
        }
        self.slots
            .get_mut(usize::from(slot))?
            .take()
            .map(|s| s.device)
    }

    /// The device at `slot`.
    pub fn device(&self, slot: u8) -> Option<SharedPciDevice> {
        self.slots
            .get(usize::from(slot))?
            .as_ref()
            .map(|s| s.device.clone())
    }

    /// Bitmap of occupied slots (bit n = slot n), e.g. for hotplug AML.
    pub fn occupied_slots(&self) -> u32 {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .fold(0, |m, (i, _)| m | 1 << i)
    }

    /// Installs the callback told about BAR moves.
    pub fn set_bar_observer(&mut self, observer: BarObserver) {
        self.observer = Some(observer);
    }

    fn function(&self, bus: u8, dev: u8, func: u8) -> Option<&Slot> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(usize::from(dev))?.as_ref()
    }

    /// A configuration read of `data.len()` bytes at byte `offset` of
    /// `bus:dev.func`. Absent functions and bytes beyond 4 KiB read as ones.
    pub fn config_read(&self, bus: u8, dev: u8, func: u8, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some(slot) = self.function(bus, dev, func) else {
            return;
        };
        let mut device = lock(&slot.device);
        for_each_dword(offset, data.len(), |reg, in_reg, range| {
            device.read_config(reg, in_reg, &mut data[range]);
        });
    }

    /// A configuration write; see [`PciRoot::config_read`]. Writes to absent
    /// functions or beyond 4 KiB are dropped.
    pub fn config_write(&mut self, bus: u8, dev: u8, func: u8, offset: u64, data: &[u8]) {
        let Some(slot) = self.function(bus, dev, func) else {
            return;
        };
        let mut touched_bars = false;
        {
            let mut device = lock(&slot.device);
            for_each_dword(offset, data.len(), |reg, in_reg, range| {
                touched_bars |=
                    reg == REG_COMMAND_STATUS || (REG_BAR0..REG_BAR0 + 6).contains(&reg);
                device.write_config(reg, in_reg, &data[range]);
            });
        }
        if touched_bars {
            self.report_bar_moves(dev);
        }
    }

    fn report_bar_moves(&mut self, dev: u8) {
        let Some(Some(slot)) = self.slots.get_mut(usize::from(dev)) else {
            return;
        };
        let (current, command) = {
            let mut device = lock(&slot.device);
            let mut cmd = [0u8; 2];
            device.read_config(REG_COMMAND_STATUS, 0, &mut cmd);
            (device.bar_regions(), u16::from_le_bytes(cmd))
        };
        for new in current {
            let decoding = match new.kind {
                BarKind::Io => command & COMMAND_IO != 0,
                BarKind::Memory32 | BarKind::Memory64 => command & COMMAND_MEMORY != 0,
            };
            if !decoding || is_sizing(&new) {
                continue;
            }
            match slot.bars.iter_mut().find(|b| b.index == new.index) {
                Some(old) if old.addr != new.addr => {
                    if let Some(observer) = self.observer.as_mut() {
                        observer(dev, old, &new);
                    }
                    *old = new;
                }
                Some(_) => {}
                None => slot.bars.push(new),
            }
        }
    }
}

/// True while a BAR holds its sizing pattern (all address bits set).
fn is_sizing(bar: &BarRegion) -> bool {
    let low_mask = (!(bar.size - 1)) as u32 & if bar.kind == BarKind::Io { !3 } else { !0xf };
    let low = bar.addr as u32;
    (low_mask != 0 && low == low_mask)
        || (bar.kind == BarKind::Memory64 && bar.addr >> 32 == 0xffff_ffff)
}

/// Splits a `len`-byte access at byte `offset` into per-dword pieces inside
/// the 4 KiB space: `f(reg, offset_in_reg, range_in_data)`.
fn for_each_dword(offset: u64, len: usize, mut f: impl FnMut(usize, u64, std::ops::Range<usize>)) {
    let mut done = 0;
    while done < len {
        let Some(addr) = offset.checked_add(done as u64) else {
            return;
        };
        if addr >= CONFIG_SPACE_SIZE as u64 {
            return;
        }
        let in_reg = addr % 4;
        let n = (4 - in_reg as usize).min(len - done);
        f((addr / 4) as usize, in_reg, done..done + n);
        done += n;
    }
}

/// Locks a device, recovering from poisoning as `Bus` does.
fn lock(dev: &SharedPciDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{PciConfiguration, PciIds};

    /// A minimal endpoint with one 32-bit and one 64-bit memory BAR.
    pub(crate) struct TestDevice(pub PciConfiguration);

    impl TestDevice {
        pub(crate) fn new() -> Self {
            let ids = PciIds {
                vendor: 0x1af4,
                device: 0x1042,
                revision: 1,
                class: 0x01_00_00,
                subsystem_vendor: 0x1af4,
                subsystem: 2,
            };
            let mut c = PciConfiguration::new(ids, 1);
            c.add_bar(0, BarKind::Memory32, 0x1000, 0xc000_0000, false)
                .unwrap();
            c.add_bar(2, BarKind::Memory64, 0x4000, 0x1_0000_0000, true)
                .unwrap();
            Self(c)
        }
    }

    impl PciDevice for TestDevice {
        fn read_config(&mut self, reg: usize, offset: u64, data: &mut [u8]) {
            self.0.read(reg, offset, data);
        }
        fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) {
            self.0.write(reg, offset, data);
        }
        fn bar_regions(&self) -> Vec<BarRegion> {
            self.0.bar_regions()
        }
    }

    fn read32(root: &PciRoot, dev: u8, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        root.config_read(0, dev, 0, offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn write32(root: &mut PciRoot, dev: u8, offset: u64, v: u32) {
        root.config_write(0, dev, 0, offset, &v.to_le_bytes());
    }

    #[test]
    fn slots_and_absent_functions() {
        let mut root = PciRoot::new();
        assert_eq!(read32(&root, 0, 0), 0x0d57_8086);
        assert_eq!(read32(&root, 1, 0), 0xffff_ffff);
        let mut d = [0u8; 4];
        root.config_read(0, 0, 1, 0, &mut d);
        assert_eq!(d, [0xff; 4], "function 1 is absent");
        root.config_read(1, 0, 0, 0, &mut d);
        assert_eq!(d, [0xff; 4], "bus 1 is absent");
        assert_eq!(root.free_slot(), Ok(1));
        root.add_device(1, Arc::new(Mutex::new(TestDevice::new())))
            .unwrap();
        assert_eq!(
            root.add_device(1, Arc::new(Mutex::new(TestDevice::new()))),
            Err(PciError::SlotInUse(1))
        );
        assert_eq!(
            root.add_device(0, Arc::new(Mutex::new(TestDevice::new()))),
            Err(PciError::SlotInUse(0))
        );
        assert_eq!(
            root.add_device(32, Arc::new(Mutex::new(TestDevice::new()))),
            Err(PciError::NoSuchSlot(32))
        );
        assert_eq!(read32(&root, 1, 0), 0x1042_1af4);
        assert_eq!(root.occupied_slots(), 0b11);
        assert_eq!(root.free_slot(), Ok(2));
        assert!(root.remove_device(0).is_none());
        assert!(root.remove_device(1).is_some());
        assert_eq!(read32(&root, 1, 0), 0xffff_ffff);
        for s in 1..32 {
            root.add_device(s, Arc::new(Mutex::new(TestDevice::new())))
                .unwrap();
        }
        assert_eq!(root.free_slot(), Err(PciError::BusFull));
    }

    #[test]
    fn unaligned_and_odd_sized_accesses() {
        let root = PciRoot::new();
        // A dword read straddling two registers is split.
        let mut d = [0u8; 4];
        root.config_read(0, 0, 0, 2, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0000_0d57);
        // An 8-byte read.
        let mut q = [0u8; 8];
        root.config_read(0, 0, 0, 0, &mut q);
        assert_eq!(u64::from_le_bytes(q) as u32, 0x0d57_8086);
        // Beyond 4 KiB reads ones.
        root.config_read(0, 0, 0, 0xffe, &mut d);
        assert_eq!(d, [0, 0, 0xff, 0xff]);
        root.config_read(0, 0, 0, u64::MAX, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Odd sizes do not panic.
        let mut odd = [0u8; 3];
        root.config_read(0, 0, 0, 1, &mut odd);
        assert_eq!(odd, [0x80, 0x57, 0x0d]);
        let mut big = [0u8; 64];
        root.config_read(0, 0, 0, 0xfe0, &mut big);
    }

    #[test]
    fn bar_moves_are_reported_once_decoding_is_on() {
        let mut root = PciRoot::new();
        let moves = Arc::new(Mutex::new(Vec::new()));
        let m = moves.clone();
        root.set_bar_observer(Box::new(move |slot, old, new| {
            m.lock()
                .unwrap()
                .push((slot, old.index, old.addr, new.addr));
        }));
        root.add_device(3, Arc::new(Mutex::new(TestDevice::new())))
            .unwrap();

        // Sizing with decoding enabled (an OS that does not disable it).
        write32(&mut root, 3, 4, u32::from(COMMAND_MEMORY));
        write32(&mut root, 3, 0x10, 0xffff_ffff);
        assert_eq!(read32(&root, 3, 0x10), 0xffff_f000);
        write32(&mut root, 3, 0x10, 0xc000_0000);
        write32(&mut root, 3, 0x1c, 0xffff_ffff);
        write32(&mut root, 3, 0x1c, 0x1);
        assert!(moves.lock().unwrap().is_empty(), "sizing is not a move");

        // Linux's way: decoding off, program both halves, decoding on.
        write32(&mut root, 3, 4, 0);
        write32(&mut root, 3, 0x18, 0x0001_0000);
        write32(&mut root, 3, 0x1c, 0x2);
        assert!(moves.lock().unwrap().is_empty());
        write32(&mut root, 3, 4, u32::from(COMMAND_MEMORY));
        assert_eq!(
            *moves.lock().unwrap(),
            vec![(3, 2, 0x1_0000_0000, 0x2_0001_0000)]
        );
        // A move while decoding is reported at once.
        write32(&mut root, 3, 0x10, 0xd000_0000);
        assert_eq!(moves.lock().unwrap()[1], (3, 0, 0xc000_0000, 0xd000_0000));
        assert_eq!(moves.lock().unwrap().len(), 2);
    }
}
