//! ACPI PCI hotplug registers (Cloud Hypervisor / QEMU PIIX4 style) for the
//! slots of bus 0, segment 0.
//!
//! Register layout ([`PCIHP_LEN`] bytes of MMIO; little endian; any access
//! size at any offset, each byte behaves as listed; bit `n` is slot `n`):
//!
//! | offset | size | name  | access                                                                  |
//! |--------|------|-------|-------------------------------------------------------------------------|
//! | 0x0    | 4    | PCIU  | read: slots being plugged; reading a byte clears the bits it returned   |
//! | 0x4    | 4    | PCID  | read: slots asked to unplug; reading a byte clears the bits it returned |
//! | 0x8    | 4    | B0EJ  | write: the guest ejects the slots whose bits are set; reads 0           |
//! | 0xC    | 4    | PSEG  | segment select: written value is stored and read back                   |
//!
//! Only segment 0 exists: while PSEG is not 0, PCIU and PCID read 0 (and
//! stay pending) and B0EJ writes are ignored.
//!
//! Protocol: the VMM calls [`PciHotplug::plug`] or
//! [`PciHotplug::request_unplug`], then raises the GED's
//! `GED_EVENT_PCI_HOTPLUG` ([`crate::acpi::Ged::notify`]). The DSDT's
//! `\_SB_.PCI0.PCNT` reads PCIU and PCID and notifies each slot device
//! (device check / eject request); Linux's acpiphp rescans or unbinds the
//! driver and calls the slot's `_EJ0`, which writes `1 << slot` to B0EJ.
//! That write is the acknowledgement: only for slots with an unplug pending
//! does it call `on_eject`, so a guest cannot eject a device the operator did
//! not ask to remove, nor the host bridge in slot 0.

use std::fmt;
use std::ops::RangeInclusive;

use super::{bus_device_by_bytes, take_byte, ByteRegisters};

/// Bytes of MMIO the register block occupies.
pub const PCIHP_LEN: u64 = 16;
/// Offset of PCIU (u32, slots being plugged, read to clear).
pub const PCIHP_PCIU: u64 = 0x0;
/// Offset of PCID (u32, slots asked to unplug, read to clear).
pub const PCIHP_PCID: u64 = 0x4;
/// Offset of B0EJ (u32, write: eject the slots whose bits are set).
pub const PCIHP_B0EJ: u64 = 0x8;
/// Offset of PSEG (u32, PCI segment select).
pub const PCIHP_PSEG: u64 = 0xc;
/// The hotpluggable slots of bus 0: every slot but the host bridge's (0).
/// Other slot numbers are ignored by [`PciHotplug`].
pub const PCIHP_SLOTS: RangeInclusive<u8> = 1..=31;

/// The PCI hotplug register block.
///
/// `on_eject` runs on the vCPU thread that wrote B0EJ, with this device
/// locked: it should only record the request (queue the slot, write an
/// eventfd) and leave the teardown (BARs, ioeventfds, block node,
/// `DEVICE_DELETED`) to the VMM thread; it must never lock this device.
pub struct PciHotplug {
    on_eject: Box<dyn FnMut(u8) + Send>,
    /// PCIU: slots being plugged, not read by the guest yet.
    up: u32,
    /// PCID: unplug requests not read by the guest yet.
    down: u32,
    /// Slots whose unplug was requested and not yet ejected or cancelled.
    unplug_pending: u32,
    /// PSEG.
    segment: u32,
}

impl PciHotplug {
    /// A register block with nothing pending, calling `on_eject(slot)` when
    /// the guest ejects a slot whose unplug was requested.
    pub fn new(on_eject: Box<dyn FnMut(u8) + Send>) -> Self {
        Self {
            on_eject,
            up: 0,
            down: 0,
            unplug_pending: 0,
            segment: 0,
        }
    }

    /// The bit of `slot`, or `None` for slots outside [`PCIHP_SLOTS`].
    fn bit(slot: u8) -> Option<u32> {
        PCIHP_SLOTS.contains(&slot).then(|| 1 << slot)
    }

    /// Marks `slot` as being plugged (sets its PCIU bit). The caller then
    /// raises `GED_EVENT_PCI_HOTPLUG` so that the guest scans the slot.
    /// Slots outside [`PCIHP_SLOTS`] are ignored.
    pub fn plug(&mut self, slot: u8) {
        if let Some(bit) = Self::bit(slot) {
            self.up |= bit;
        }
    }

    /// Asks the guest to release the device in `slot` (sets its PCID bit and
    /// marks the unplug pending until the guest ejects the slot or
    /// [`Self::cancel_unplug`]). The caller then raises
    /// `GED_EVENT_PCI_HOTPLUG`. Slots outside [`PCIHP_SLOTS`] are ignored.
    pub fn request_unplug(&mut self, slot: u8) {
        if let Some(bit) = Self::bit(slot) {
            self.down |= bit;
            self.unplug_pending |= bit;
        }
    }

    /// Whether an unplug of `slot` was requested and the guest has not
    /// ejected it yet (false for slots outside [`PCIHP_SLOTS`]).
    pub fn unplug_pending(&self, slot: u8) -> bool {
        Self::bit(slot).is_some_and(|bit| self.unplug_pending & bit != 0)
    }

    /// Forgets a requested unplug of `slot` (the device went away otherwise):
    /// a later eject of the slot is ignored, and an eject request the guest
    /// has not read yet is withdrawn.
    pub fn cancel_unplug(&mut self, slot: u8) {
        if let Some(bit) = Self::bit(slot) {
            self.unplug_pending &= !bit;
            self.down &= !bit;
        }
    }

    /// An eject write of `value` to byte `index` (0..4) of B0EJ.
    fn eject_byte(&mut self, index: u64, value: u8) {
        if self.segment != 0 {
            return;
        }
        for bit in 0..8u8 {
            if value & (1 << bit) == 0 {
                continue;
            }
            // index < 4, so slot < 32.
            let slot = index as u8 * 8 + bit;
            if self.unplug_pending(slot) {
                let mask = 1u32 << slot;
                self.unplug_pending &= !mask;
                self.down &= !mask;
                (self.on_eject)(slot);
            }
        }
    }
}

impl fmt::Debug for PciHotplug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciHotplug")
            .field("up", &format_args!("{:#x}", self.up))
            .field("down", &format_args!("{:#x}", self.down))
            .field(
                "unplug_pending",
                &format_args!("{:#x}", self.unplug_pending),
            )
            .field("segment", &self.segment)
            .finish_non_exhaustive()
    }
}

impl ByteRegisters for PciHotplug {
    fn read_byte(&mut self, offset: u64) -> u8 {
        match offset {
            0..=3 if self.segment == 0 => take_byte(&mut self.up, offset),
            4..=7 if self.segment == 0 => take_byte(&mut self.down, offset - 4),
            12..=15 => (self.segment >> ((offset - 12) * 8)) as u8,
            _ => 0,
        }
    }

    fn write_byte(&mut self, offset: u64, value: u8) {
        match offset {
            8..=11 => self.eject_byte(offset - 8, value),
            12..=15 => {
                let shift = (offset - 12) * 8;
                self.segment = (self.segment & !(0xff << shift)) | (u32::from(value) << shift);
            }
            // PCIU and PCID are read only.
            _ => {}
        }
    }
}

bus_device_by_bytes!(PciHotplug);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;
    use std::sync::{Arc, Mutex};

    fn hp() -> (PciHotplug, Arc<Mutex<Vec<u8>>>) {
        let ejected = Arc::new(Mutex::new(Vec::new()));
        let e = ejected.clone();
        let hp = PciHotplug::new(Box::new(move |slot| e.lock().unwrap().push(slot)));
        (hp, ejected)
    }

    fn read32(hp: &mut PciHotplug, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        hp.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn write32(hp: &mut PciHotplug, offset: u64, value: u32) {
        hp.write(offset, &value.to_le_bytes());
    }

    #[test]
    fn plug_sets_pciu_until_read() {
        let (mut hp, ejected) = hp();
        assert_eq!(read32(&mut hp, PCIHP_PCIU), 0);
        hp.plug(3);
        hp.plug(31);
        // Writes to PCIU are ignored.
        write32(&mut hp, PCIHP_PCIU, 0);
        assert_eq!(read32(&mut hp, PCIHP_PCID), 0);
        assert_eq!(read32(&mut hp, PCIHP_PCIU), 1 << 3 | 1 << 31);
        assert_eq!(read32(&mut hp, PCIHP_PCIU), 0, "read clears");
        // A plugged slot is not ejectable.
        write32(&mut hp, PCIHP_B0EJ, 1 << 3);
        assert!(ejected.lock().unwrap().is_empty());
        assert!(!hp.unplug_pending(3));
    }

    #[test]
    fn byte_reads_clear_only_the_bits_returned() {
        let (mut hp, _) = hp();
        hp.plug(1);
        hp.plug(9);
        let mut b = [0u8];
        hp.read(PCIHP_PCIU + 1, &mut b);
        assert_eq!(b[0], 1 << 1);
        hp.plug(10);
        assert_eq!(read32(&mut hp, PCIHP_PCIU), 1 << 1 | 1 << 10);
        hp.request_unplug(17);
        let mut w = [0u8; 2];
        hp.read(PCIHP_PCID, &mut w);
        assert_eq!(w, [0, 0]);
        hp.read(PCIHP_PCID + 2, &mut w);
        assert_eq!(w, [1 << 1, 0]);
        assert_eq!(read32(&mut hp, PCIHP_PCID), 0);
    }

    #[test]
    fn unplug_request_then_eject_calls_back_once() {
        let (mut hp, ejected) = hp();
        hp.request_unplug(5);
        hp.request_unplug(20);
        assert!(hp.unplug_pending(5) && hp.unplug_pending(20));
        assert!(!hp.unplug_pending(6));
        assert_eq!(read32(&mut hp, PCIHP_PCID), 1 << 5 | 1 << 20);
        assert_eq!(read32(&mut hp, PCIHP_PCID), 0, "read clears");
        assert!(hp.unplug_pending(5), "reading PCID is not an eject");
        // What the DSDT's PCEJ writes.
        write32(&mut hp, PCIHP_B0EJ, 1 << 5);
        assert_eq!(*ejected.lock().unwrap(), vec![5]);
        assert!(!hp.unplug_pending(5));
        assert!(hp.unplug_pending(20));
        // A second eject of the same slot is ignored.
        write32(&mut hp, PCIHP_B0EJ, 1 << 5);
        assert_eq!(*ejected.lock().unwrap(), vec![5]);
        assert_eq!(read32(&mut hp, PCIHP_B0EJ), 0, "B0EJ reads 0");
        // A byte write to the third byte of B0EJ ejects slot 20.
        hp.write(PCIHP_B0EJ + 2, &[1 << 4]);
        assert_eq!(*ejected.lock().unwrap(), vec![5, 20]);
        assert!(!hp.unplug_pending(20));
    }

    #[test]
    fn eject_before_pcid_is_read_withdraws_the_request() {
        let (mut hp, ejected) = hp();
        hp.request_unplug(7);
        write32(&mut hp, PCIHP_B0EJ, 1 << 7);
        assert_eq!(*ejected.lock().unwrap(), vec![7]);
        // A new device in the slot must not receive the old eject request.
        assert_eq!(read32(&mut hp, PCIHP_PCID), 0);
    }

    #[test]
    fn guest_cannot_eject_what_was_not_asked() {
        let (mut hp, ejected) = hp();
        hp.request_unplug(2);
        // Every bit, slot 0 (the host bridge) included: only slot 2 goes.
        write32(&mut hp, PCIHP_B0EJ, u32::MAX);
        assert_eq!(*ejected.lock().unwrap(), vec![2]);
        write32(&mut hp, PCIHP_B0EJ, u32::MAX);
        assert_eq!(*ejected.lock().unwrap(), vec![2]);
        // Slot 0 and slots past 31 cannot be plugged or unplugged at all.
        for slot in [0, 32, 200, u8::MAX] {
            hp.plug(slot);
            hp.request_unplug(slot);
            assert!(!hp.unplug_pending(slot));
            hp.cancel_unplug(slot);
        }
        assert_eq!(read32(&mut hp, PCIHP_PCIU), 0);
        assert_eq!(read32(&mut hp, PCIHP_PCID), 0);
        write32(&mut hp, PCIHP_B0EJ, u32::MAX);
        assert_eq!(*ejected.lock().unwrap(), vec![2]);
    }

    #[test]
    fn cancel_unplug_ignores_a_later_eject() {
        let (mut hp, ejected) = hp();
        hp.request_unplug(4);
        hp.request_unplug(8);
        hp.cancel_unplug(4);
        assert!(!hp.unplug_pending(4));
        assert!(hp.unplug_pending(8));
        // The unread request for slot 4 is withdrawn too.
        assert_eq!(read32(&mut hp, PCIHP_PCID), 1 << 8);
        write32(&mut hp, PCIHP_B0EJ, 1 << 4 | 1 << 8);
        assert_eq!(*ejected.lock().unwrap(), vec![8]);
    }

    #[test]
    fn segment_select_is_stored_and_only_segment_0_exists() {
        let (mut hp, ejected) = hp();
        assert_eq!(read32(&mut hp, PCIHP_PSEG), 0);
        hp.plug(1);
        hp.request_unplug(3);
        write32(&mut hp, PCIHP_PSEG, 0x1234_5678);
        assert_eq!(read32(&mut hp, PCIHP_PSEG), 0x1234_5678);
        hp.write(PCIHP_PSEG + 1, &[0xab]);
        assert_eq!(read32(&mut hp, PCIHP_PSEG), 0x1234_ab78);
        // Segment 0x1234ab78 has no slots: nothing reads, nothing ejects.
        assert_eq!(read32(&mut hp, PCIHP_PCIU), 0);
        assert_eq!(read32(&mut hp, PCIHP_PCID), 0);
        write32(&mut hp, PCIHP_B0EJ, 1 << 3);
        assert!(ejected.lock().unwrap().is_empty());
        // Back on segment 0 the events are still there.
        write32(&mut hp, PCIHP_PSEG, 0);
        assert_eq!(read32(&mut hp, PCIHP_PCIU), 1 << 1);
        assert_eq!(read32(&mut hp, PCIHP_PCID), 1 << 3);
        write32(&mut hp, PCIHP_B0EJ, 1 << 3);
        assert_eq!(*ejected.lock().unwrap(), vec![3]);
    }

    #[test]
    fn a_wide_access_covers_several_registers() {
        let (mut hp, ejected) = hp();
        hp.plug(1);
        hp.request_unplug(2);
        let mut q = [0u8; 8];
        hp.read(PCIHP_PCIU, &mut q);
        assert_eq!(u64::from_le_bytes(q), 1 << 1 | (1 << 2) << 32);
        hp.request_unplug(6);
        // B0EJ and PSEG in one 8-byte write: B0EJ's byte is handled first.
        let v = u64::from(1u32 << 6) | 5 << 32;
        hp.write(PCIHP_B0EJ, &v.to_le_bytes());
        assert_eq!(*ejected.lock().unwrap(), vec![6]);
        assert_eq!(read32(&mut hp, PCIHP_PSEG), 5);
        assert!(format!("{hp:?}").contains("unplug_pending: 0x4"));
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut hp, ejected) = hp();
        for slot in PCIHP_SLOTS {
            hp.plug(slot);
        }
        let offsets = [
            0,
            1,
            3,
            6,
            7,
            0xb,
            0xf,
            0x10,
            0x1000,
            u64::MAX - 2,
            u64::MAX,
        ];
        for offset in offsets {
            for len in [0, 1, 2, 3, 4, 8, 16, 64] {
                let mut d = vec![0u8; len];
                hp.read(offset, &mut d);
                hp.write(offset, &vec![0xff; len]);
                hp.write(offset, &vec![0; len]);
            }
        }
        assert!(ejected.lock().unwrap().is_empty());
        assert_eq!(read32(&mut hp, PCIHP_PSEG), 0);
    }
}
