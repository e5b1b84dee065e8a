//! QEMU's `isa-debug-exit`: a port range where a guest write of value V asks the VMM to
//! end with exit status `(V << 1) | 1` (the low 8 bits of it, as any process status).
//! Reads return 0. Accesses of 1, 2 or 4 bytes count, at any offset in the range, as in
//! QEMU's `hw/misc/debugexit.c`; wider ones are ignored.

use crate::BusDevice;

/// QEMU's default `iobase`.
pub const DEFAULT_IOBASE: u16 = 0x501;
/// QEMU's default `iosize`.
pub const DEFAULT_IOSIZE: u16 = 0x02;

/// The exit status a write of `value` asks for: `(value << 1) | 1`, truncated to the
/// 8 bits a process exit status has (QEMU passes the same value to `exit`).
pub fn exit_status(value: u32) -> u8 {
    ((u64::from(value) << 1) | 1) as u8
}

/// The device; `on_write` runs with the value of every guest write.
pub struct DebugExit {
    on_write: Box<dyn Fn(u32) + Send>,
}

impl DebugExit {
    /// A device calling `on_write` with the (little-endian) value the guest writes.
    pub fn new(on_write: Box<dyn Fn(u32) + Send>) -> Self {
        DebugExit { on_write }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.is_empty() || data.len() > 4 {
            return;
        }
        let mut bytes = [0u8; 4];
        bytes[..data.len()].copy_from_slice(data);
        (self.on_write)(u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn device() -> (DebugExit, Arc<Mutex<Vec<u32>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let dev = DebugExit::new(Box::new(move |v| s.lock().unwrap().push(v)));
        (dev, seen)
    }

    #[test]
    fn statuses_are_qemus() {
        assert_eq!(exit_status(0), 1);
        assert_eq!(exit_status(5), 11);
        assert_eq!(exit_status(0x10), 0x21);
        assert_eq!(exit_status(0x7f), 0xff);
        // Only the low 8 bits of (V << 1) | 1 reach the parent.
        assert_eq!(exit_status(0x80), 1);
        assert_eq!(exit_status(u32::MAX), 0xff);
    }

    #[test]
    fn writes_of_every_width_report_their_value() {
        let (mut dev, seen) = device();
        dev.write(0, &[0x05]);
        dev.write(1, &[0x05, 0x01]);
        dev.write(0, &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(*seen.lock().unwrap(), [0x05, 0x0105, 0x1234_5678]);
    }

    #[test]
    fn odd_accesses_are_ignored_and_reads_are_zero() {
        let (mut dev, seen) = device();
        dev.write(0, &[]);
        dev.write(0, &[1; 8]);
        let mut d = [0xffu8; 4];
        dev.read(0, &mut d);
        assert_eq!(d, [0; 4]);
        assert!(seen.lock().unwrap().is_empty());
    }
}
