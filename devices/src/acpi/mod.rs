//! ACPI platform devices for a hardware-reduced ACPI machine: the Generic
//! Event Device (GED), which carries the power button and PCI hotplug
//! events, the FADT's sleep control/status and reset registers, and the ACPI
//! PCI hotplug register block.

mod ged;
mod pcihp;

pub use ged::{
    Ged, PowerEvent, GED_EVENT, GED_EVENT_PCI_HOTPLUG, GED_EVENT_POWER_BUTTON, GED_LEN, GED_RESET,
    GED_RESET_VALUE, GED_SLEEP_CONTROL, GED_SLEEP_STATUS, SLEEP_CONTROL_SLP_EN,
    SLEEP_STATUS_WAK_STS, SLEEP_TYPE_S5,
};
pub use pcihp::{
    PciHotplug, PCIHP_B0EJ, PCIHP_LEN, PCIHP_PCID, PCIHP_PCIU, PCIHP_PSEG, PCIHP_SLOTS,
};

/// Implements [`crate::BusDevice`] for a [`ByteRegisters`] type: every
/// access, whatever its size, goes byte by byte.
macro_rules! bus_device_by_bytes {
    ($t:ty) => {
        impl $crate::BusDevice for $t {
            fn read(&mut self, offset: u64, data: &mut [u8]) {
                self.read_bytes(offset, data);
            }

            fn write(&mut self, offset: u64, data: &[u8]) {
                self.write_bytes(offset, data);
            }
        }
    };
}
use bus_device_by_bytes;

/// A register block that behaves byte by byte, whatever the access size.
trait ByteRegisters {
    /// The byte at `offset` (reads may have side effects, e.g. clear-on-read).
    fn read_byte(&mut self, offset: u64) -> u8;
    /// A guest write of one byte at `offset`.
    fn write_byte(&mut self, offset: u64, value: u8);

    /// A guest read of any size: one byte at a time (0 past the end of the address space).
    fn read_bytes(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .map_or(0, |o| self.read_byte(o));
        }
    }

    /// A guest write of any size: one byte at a time.
    fn write_bytes(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if let Some(o) = offset.checked_add(i as u64) {
                self.write_byte(o, b);
            }
        }
    }
}

/// Reads byte `index` (0..4) of a read-to-clear register, clearing the bits returned.
fn take_byte(reg: &mut u32, index: u64) -> u8 {
    let shift = index * 8;
    let byte = (*reg >> shift) as u8;
    *reg &= !(u32::from(byte) << shift);
    byte
}
