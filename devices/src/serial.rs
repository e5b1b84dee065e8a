//! 16550A UART (vm-superio) on the port bus: the guest console.
//!
//! Output goes to any writer (stdout, a file, a test buffer); input is queued by the VMM's
//! event loop with [`Serial::queue_input`] and moved into the UART's 64-byte FIFO as the
//! guest drains it, so no byte is lost when the FIFO is full.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use crate::{BusDevice, Interrupt};

/// Bytes of guest input held beyond the FIFO before more are dropped.
const MAX_PENDING_INPUT: usize = 64 << 10;

/// Adapts an [`Interrupt`] line to vm-superio's trigger.
pub struct IrqTrigger(pub Arc<dyn Interrupt>);

impl vm_superio::Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

/// The serial port device.
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
    pending: VecDeque<u8>,
}

impl Serial {
    /// A UART raising `irq` and writing guest output to `out`.
    pub fn new(irq: Arc<dyn Interrupt>, out: Box<dyn Write + Send>) -> Self {
        Serial {
            uart: vm_superio::Serial::new(IrqTrigger(irq), out),
            pending: VecDeque::new(),
        }
    }

    /// Queues guest input (from the host terminal).
    pub fn queue_input(&mut self, bytes: &[u8]) {
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
        self.pending.extend(&bytes[..bytes.len().min(room)]);
        self.fill_fifo();
    }

    fn fill_fifo(&mut self) {
        let n = self.uart.fifo_capacity().min(self.pending.len());
        if n == 0 {
            return;
        }
        let chunk: Vec<u8> = self.pending.drain(..n).collect();
        // Cannot fail: the FIFO has room for `n` bytes. An interrupt error is the VMM's
        // problem, not the guest's: the bytes are queued anyway.
        let _ = self.uart.enqueue_raw_bytes(&chunk);
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 7 {
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
        if !self.pending.is_empty() {
            self.fill_fifo();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset > 7 {
            return;
        }
        // An output error (closed stdout, full disk) loses the byte, as a real UART
        // with nothing attached would; the guest goes on.
        let _ = self.uart.write(offset as u8, data[0]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Interrupt for Count {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_input_and_odd_accesses() {
        let irq = Arc::new(Count::default());
        let out = Buf::default();
        let mut s = Serial::new(irq.clone(), Box::new(out.clone()));
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        // Odd sizes and offsets are ignored / read as all ones.
        s.write(9, &[1]);
        s.write(0, &[1, 2]);
        let mut d = [0u8; 2];
        s.read(0, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        // Enable the "received data" interrupt, then feed more than a FIFO's worth.
        s.write(1, &[1]);
        let input: Vec<u8> = (0..100u8).collect();
        s.queue_input(&input);
        assert!(irq.0.load(Ordering::SeqCst) > 0);
        let mut got = Vec::new();
        for _ in 0..100 {
            let mut lsr = [0u8];
            s.read(5, &mut lsr);
            assert_ne!(lsr[0] & 1, 0, "data ready");
            let mut b = [0u8];
            s.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input);
    }
}
