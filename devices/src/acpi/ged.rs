//! The Generic Event Device (`ACPI0013`) and the hardware-reduced ACPI
//! sleep and reset registers, in one MMIO register block.
//!
//! Register layout ([`GED_LEN`] bytes at the GED base; little endian, any
//! access size, each byte behaves as listed):
//!
//! | offset | size | name                | access                                                                   |
//! |--------|------|---------------------|--------------------------------------------------------------------------|
//! | 0x00   | 4    | [`GED_EVENT`]        | read: pending event bits; reading a byte clears the bits it returned   |
//! | 0x04   | 1    | [`GED_SLEEP_CONTROL`]| write `SLP_EN \| SLP_TYP << 2`; S5 (`SLP_TYP` 5) shuts down; reads 0   |
//! | 0x05   | 1    | [`GED_SLEEP_STATUS`] | `WAK_STS` (bit 7), write 1 to clear; reads 0 (the VM never sleeps)     |
//! | 0x06   | 1    | [`GED_RESET`]        | write [`GED_RESET_VALUE`] to reboot; other values ignored; reads 0     |
//! | 0x07.. | 9    | reserved             | reads 0, writes ignored                                                |
//!
//! Event bits: [`GED_EVENT_POWER_BUTTON`] (the DSDT's `_EVT` notifies
//! `\_SB_.PWRB` with 0x80) and [`GED_EVENT_PCI_HOTPLUG`] (calls
//! `\_SB_.PCI0.PCNT`). The FADT points its SLEEP_CONTROL_REG,
//! SLEEP_STATUS_REG and RESET_REG at offsets 4, 5 and 6.

use std::io;
use std::sync::Arc;

use super::{bus_device_by_bytes, take_byte, ByteRegisters};
use crate::Interrupt;

/// Bytes of MMIO the GED occupies.
pub const GED_LEN: u64 = 0x10;
/// Offset of the event register (u32, read to clear).
pub const GED_EVENT: u64 = 0x0;
/// Offset of the sleep control register (u8).
pub const GED_SLEEP_CONTROL: u64 = 0x4;
/// Offset of the sleep status register (u8).
pub const GED_SLEEP_STATUS: u64 = 0x5;
/// Offset of the reset register (u8).
pub const GED_RESET: u64 = 0x6;
/// The value the FADT tells the guest to write to the reset register.
pub const GED_RESET_VALUE: u8 = 0x1;

/// Event bit: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u32 = 1 << 0;
/// Event bit: a PCI slot changed (hotplug; the handler is `\_SB_.PCI0.PCNT`).
pub const GED_EVENT_PCI_HOTPLUG: u32 = 1 << 1;

/// Sleep control register: SLP_EN.
pub const SLEEP_CONTROL_SLP_EN: u8 = 1 << 5;
/// Sleep control register: SLP_TYP field shift.
const SLEEP_CONTROL_SLP_TYP_SHIFT: u8 = 2;
/// Sleep control register: SLP_TYP field mask (after shifting).
const SLEEP_CONTROL_SLP_TYP_MASK: u8 = 0x7;
/// The SLP_TYP value the DSDT's `\_S5_` package gives for soft-off.
pub const SLEEP_TYPE_S5: u8 = 5;
/// Sleep status register: WAK_STS.
pub const SLEEP_STATUS_WAK_STS: u8 = 1 << 7;

/// What the guest asked the machine to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    /// Enter S5 (power off).
    Shutdown,
    /// Reset the machine.
    Reboot,
}

/// The GED register block.
///
/// `on_power` runs on the vCPU thread that made the access, with the device
/// locked: it should only record the request (set a flag, write an eventfd)
/// and never lock this device.
pub struct Ged {
    interrupt: Arc<dyn Interrupt>,
    on_power: Box<dyn Fn(PowerEvent) + Send>,
    pending: u32,
}

impl Ged {
    /// A GED raising `interrupt` for events and calling `on_power` for
    /// guest shutdown and reboot requests.
    pub fn new(interrupt: Arc<dyn Interrupt>, on_power: Box<dyn Fn(PowerEvent) + Send>) -> Self {
        Self {
            interrupt,
            on_power,
            pending: 0,
        }
    }

    /// Presses the power button: sets [`GED_EVENT_POWER_BUTTON`] and raises
    /// the GED interrupt (ACPI shutdown request, e.g. QMP `system_powerdown`).
    pub fn notify_power_button(&mut self) -> io::Result<()> {
        self.notify(GED_EVENT_POWER_BUTTON)
    }

    /// Sets event `bits` pending and raises the GED interrupt.
    pub fn notify(&mut self, bits: u32) -> io::Result<()> {
        self.pending |= bits;
        self.interrupt.trigger()
    }

    /// Event bits the guest has not read yet.
    pub fn pending(&self) -> u32 {
        self.pending
    }
}

impl ByteRegisters for Ged {
    fn read_byte(&mut self, offset: u64) -> u8 {
        match offset {
            0..=3 => take_byte(&mut self.pending, offset),
            _ => 0,
        }
    }

    fn write_byte(&mut self, offset: u64, value: u8) {
        match offset {
            GED_SLEEP_CONTROL => {
                let slp_typ = (value >> SLEEP_CONTROL_SLP_TYP_SHIFT) & SLEEP_CONTROL_SLP_TYP_MASK;
                if value & SLEEP_CONTROL_SLP_EN != 0 && slp_typ == SLEEP_TYPE_S5 {
                    (self.on_power)(PowerEvent::Shutdown);
                }
            }
            // WAK_STS is never set: the VM does not sleep or wake.
            GED_RESET if value == GED_RESET_VALUE => (self.on_power)(PowerEvent::Reboot),
            _ => {}
        }
    }
}

bus_device_by_bytes!(Ged);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BusDevice;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Counter(AtomicUsize);
    impl Interrupt for Counter {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn ged() -> (Ged, Arc<Counter>, Arc<Mutex<Vec<PowerEvent>>>) {
        let irq = Arc::new(Counter::default());
        let events = Arc::new(Mutex::new(Vec::new()));
        let e = events.clone();
        let g = Ged::new(irq.clone(), Box::new(move |ev| e.lock().unwrap().push(ev)));
        (g, irq, events)
    }

    #[test]
    fn sleep_control_s5_shuts_down() {
        let (mut g, _, events) = ged();
        // What Linux's acpi_hw_extended_sleep writes for S5.
        let s5 = SLEEP_TYPE_S5 << 2 | SLEEP_CONTROL_SLP_EN;
        assert_eq!(s5, 0x34);
        g.write(GED_SLEEP_CONTROL, &[SLEEP_TYPE_S5 << 2]); // no SLP_EN
        g.write(GED_SLEEP_CONTROL, &[3 << 2 | SLEEP_CONTROL_SLP_EN]); // S3: not offered
        assert!(events.lock().unwrap().is_empty());
        g.write(GED_SLEEP_STATUS, &[SLEEP_STATUS_WAK_STS]);
        g.write(GED_SLEEP_CONTROL, &[s5]);
        assert_eq!(*events.lock().unwrap(), vec![PowerEvent::Shutdown]);
        let mut b = [0xaa];
        g.read(GED_SLEEP_STATUS, &mut b);
        assert_eq!(b, [0]);
    }

    #[test]
    fn reset_register_reboots() {
        let (mut g, _, events) = ged();
        g.write(GED_RESET, &[0x2]);
        assert!(events.lock().unwrap().is_empty());
        g.write(GED_RESET, &[GED_RESET_VALUE]);
        assert_eq!(*events.lock().unwrap(), vec![PowerEvent::Reboot]);
        // A dword write covering control, status and reset bytes.
        g.write(
            GED_SLEEP_CONTROL,
            &[0x34, SLEEP_STATUS_WAK_STS, GED_RESET_VALUE, 0],
        );
        assert_eq!(
            *events.lock().unwrap(),
            vec![PowerEvent::Reboot, PowerEvent::Shutdown, PowerEvent::Reboot]
        );
    }

    #[test]
    fn events_are_pending_until_read() {
        let (mut g, irq, _) = ged();
        g.notify_power_button().unwrap();
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        g.notify(GED_EVENT_PCI_HOTPLUG).unwrap();
        assert_eq!(irq.0.load(Ordering::SeqCst), 2);
        assert_eq!(g.pending(), 0b11);
        // Writes to the event register are ignored.
        g.write(GED_EVENT, &[0; 4]);
        let mut d = [0u8; 4];
        g.read(GED_EVENT, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0b11);
        g.read(GED_EVENT, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0, "read clears");
        // Bits set later survive a read of other bytes.
        g.notify(1 << 9).unwrap();
        g.read(GED_EVENT, &mut d[..1]);
        assert_eq!(d[0], 0);
        g.read(GED_EVENT + 1, &mut d[..1]);
        assert_eq!(d[0], 2);
        assert_eq!(g.pending(), 0);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut g, _, events) = ged();
        for offset in [0, 3, 7, 0xf, 0x10, u64::MAX - 2, u64::MAX] {
            for len in [0, 1, 2, 4, 8] {
                let mut d = vec![0u8; len];
                g.read(offset, &mut d);
                assert!(d.iter().all(|&b| b == 0));
                g.write(offset, &d);
            }
        }
        assert!(events.lock().unwrap().is_empty());
    }
}
