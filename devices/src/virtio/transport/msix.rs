//! MSI-X table, pending bit array and delivery through [`Interrupt`]s.

use std::sync::Arc;

use crate::Interrupt;

/// Bytes per MSI-X table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
const VECTOR_CTRL_MASKED: u32 = 1;

/// One MSI-X table entry as the guest programmed it (the VMM turns it into
/// a KVM GSI route).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixEntry {
    /// Message address (low and high halves).
    pub addr: u64,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

impl MsixEntry {
    /// Whether the vector is masked.
    pub fn masked(&self) -> bool {
        self.control & VECTOR_CTRL_MASKED != 0
    }
}

impl Default for MsixEntry {
    fn default() -> Self {
        Self {
            addr: 0,
            data: 0,
            control: VECTOR_CTRL_MASKED,
        }
    }
}

/// MSI-X state of a function.
pub(crate) struct Msix {
    pub(crate) entries: Vec<MsixEntry>,
    pending: Vec<u64>,
    pub(crate) enabled: bool,
    pub(crate) function_mask: bool,
    interrupts: Vec<Arc<dyn Interrupt>>,
}

impl Msix {
    pub(crate) fn new(interrupts: Vec<Arc<dyn Interrupt>>) -> Self {
        let n = interrupts.len();
        Self {
            entries: vec![MsixEntry::default(); n],
            pending: vec![0; n.div_ceil(64)],
            enabled: false,
            function_mask: false,
            interrupts,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    fn is_pending(&self, v: usize) -> bool {
        self.pending[v / 64] & (1 << (v % 64)) != 0
    }

    fn set_pending(&mut self, v: usize, on: bool) {
        if on {
            self.pending[v / 64] |= 1 << (v % 64);
        } else {
            self.pending[v / 64] &= !(1 << (v % 64));
        }
    }

    /// Signals `vector`, or latches it in the PBA while masked.
    pub(crate) fn trigger(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.entries.len() || !self.enabled {
            return;
        }
        if self.function_mask || self.entries[v].masked() {
            self.set_pending(v, true);
        } else {
            // A failed eventfd write has nowhere better to go; the guest
            // sees a lost interrupt, not a dead VMM.
            let _ = self.interrupts[v].trigger();
        }
    }

    /// Delivers pending vectors that are no longer masked.
    pub(crate) fn deliver_unmasked(&mut self) {
        if !self.enabled || self.function_mask {
            return;
        }
        for v in 0..self.entries.len() {
            if self.is_pending(v) && !self.entries[v].masked() {
                self.set_pending(v, false);
                let _ = self.interrupts[v].trigger();
            }
        }
    }

    /// Guest read of the table at byte `offset`.
    pub(crate) fn read_table(&self, offset: u64, data: &mut [u8]) {
        let mut bytes = [0u8; 16];
        if let Some(e) = usize::try_from(offset / MSIX_ENTRY_SIZE)
            .ok()
            .and_then(|i| self.entries.get(i))
        {
            bytes[..8].copy_from_slice(&e.addr.to_le_bytes());
            bytes[8..12].copy_from_slice(&e.data.to_le_bytes());
            bytes[12..].copy_from_slice(&e.control.to_le_bytes());
        }
        copy_out(&bytes, (offset % MSIX_ENTRY_SIZE) as usize, data);
    }

    /// Guest write of the table at byte `offset`.
    pub(crate) fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some(i) = usize::try_from(offset / MSIX_ENTRY_SIZE)
            .ok()
            .filter(|&i| i < self.entries.len())
        else {
            return;
        };
        let e = self.entries[i];
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&e.addr.to_le_bytes());
        bytes[8..12].copy_from_slice(&e.data.to_le_bytes());
        bytes[12..].copy_from_slice(&e.control.to_le_bytes());
        let start = (offset % MSIX_ENTRY_SIZE) as usize;
        for (j, &b) in data.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(start + j) {
                *slot = b;
            }
        }
        let word = |r: std::ops::Range<usize>| {
            let mut w = [0u8; 8];
            w[..r.len()].copy_from_slice(&bytes[r]);
            u64::from_le_bytes(w)
        };
        self.entries[i] = MsixEntry {
            addr: word(0..8),
            data: word(8..12) as u32,
            control: word(12..16) as u32 & VECTOR_CTRL_MASKED,
        };
        let new = self.entries[i];
        if (new.addr, new.data) != (e.addr, e.data) {
            // A route that cannot be updated loses interrupts for this
            // vector; the guest sees a stuck queue, the VMM carries on.
            let _ = self.interrupts[i].update_msi(new.addr, new.data);
        }
        if e.masked() && !new.masked() {
            self.deliver_unmasked();
        }
    }

    /// Guest read of the PBA (writes are ignored).
    pub(crate) fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let mut bytes = [0u8; 8];
        if let Some(w) = usize::try_from(offset / 8)
            .ok()
            .and_then(|i| self.pending.get(i))
        {
            bytes = w.to_le_bytes();
        }
        copy_out(&bytes, (offset % 8) as usize, data);
    }

    /// Sets the enable and function-mask bits from the capability.
    pub(crate) fn set_control(&mut self, enabled: bool, function_mask: bool) {
        self.enabled = enabled;
        self.function_mask = function_mask;
        self.deliver_unmasked();
    }
}

/// Copies `src[start..]` into `data`, zero-filling past the end.
pub(crate) fn copy_out(src: &[u8], start: usize, data: &mut [u8]) {
    for (j, b) in data.iter_mut().enumerate() {
        *b = src.get(start + j).copied().unwrap_or(0);
    }
}
