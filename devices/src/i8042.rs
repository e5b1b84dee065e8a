//! A minimal i8042 keyboard controller on ports 0x60..0x65: enough for Linux's
//! `reboot=k`, which writes 0xfe (pulse the reset line) to the command port 0x64.

use crate::BusDevice;

/// Offset of the command/status port from the data port (0x64 - 0x60).
const COMMAND_OFFSET: u64 = 4;
/// "Pulse output line 0": CPU reset.
const CMD_RESET_CPU: u8 = 0xfe;

/// The controller; `on_reset` runs when the guest asks for a CPU reset.
pub struct I8042 {
    on_reset: Box<dyn Fn() + Send>,
}

impl I8042 {
    /// A controller calling `on_reset` on a reset request.
    pub fn new(on_reset: Box<dyn Fn() + Send>) -> Self {
        I8042 { on_reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0: no data for the guest, input buffer empty (so `kb_wait` ends at once);
        // data port reads 0. Port 0x61 (offset 1) and the rest read 0 too.
        let _ = offset;
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn reset_command() {
        let hit = Arc::new(AtomicBool::new(false));
        let h = hit.clone();
        let mut dev = I8042::new(Box::new(move || h.store(true, Ordering::SeqCst)));
        let mut d = [0xffu8];
        dev.read(4, &mut d);
        assert_eq!(d, [0]);
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xaa]);
        dev.write(4, &[]);
        assert!(!hit.load(Ordering::SeqCst));
        dev.write(4, &[0xfe]);
        assert!(hit.load(Ordering::SeqCst));
    }
}
