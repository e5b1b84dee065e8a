//! The guest's two doors into configuration space: configuration mechanism
//! #1 (ports 0xCF8..0xCFF) and ECAM (memory mapped, PCIe).

use std::sync::{Arc, Mutex, MutexGuard};

use super::PciRoot;
use crate::BusDevice;

/// First port of configuration mechanism #1 (CONFIG_ADDRESS).
pub const PCI_CONFIG_IO_BASE: u64 = 0xcf8;
/// Ports it spans: CONFIG_ADDRESS (0xCF8..0xCFB) and CONFIG_DATA (0xCFC..0xCFF).
pub const PCI_CONFIG_IO_LEN: u64 = 8;

const ENABLE: u32 = 1 << 31;

fn lock(root: &Mutex<PciRoot>) -> MutexGuard<'_, PciRoot> {
    root.lock().unwrap_or_else(|e| e.into_inner())
}

/// Configuration mechanism #1 on ports 0xCF8..0xCFF (insert at
/// [`PCI_CONFIG_IO_BASE`], [`PCI_CONFIG_IO_LEN`] ports).
///
/// A dword write at 0xCF8 latches CONFIG_ADDRESS (bit 31 enable, bus 23:16,
/// device 15:11, function 10:8, register 7:2); byte, word or dword accesses
/// at 0xCFC..0xCFF then reach that register plus the port's offset. With the
/// enable bit clear, data reads return ones and writes are dropped. Partial
/// writes to CONFIG_ADDRESS are ignored, as on PC chipsets (where byte
/// accesses to 0xCF9 are the reset control register, not emulated here).
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    /// The port device for `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root, address: 0 }
    }

    /// (bus, device, function, byte offset) addressed by CONFIG_ADDRESS plus
    /// `port_offset` (0..3 within CONFIG_DATA), if enabled.
    fn target(&self, port_offset: u64) -> Option<(u8, u8, u8, u64)> {
        if self.address & ENABLE == 0 {
            return None;
        }
        let a = self.address;
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            u64::from(a & 0xfc) + port_offset,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match offset {
            0..=3 => {
                let bytes = self.address.to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    if let Some(v) = bytes.get(offset as usize + i) {
                        *b = *v;
                    }
                }
            }
            4..=7 => {
                let in_data = offset - 4;
                // Keep the access inside CONFIG_DATA.
                let len = data.len().min(4 - in_data as usize);
                if let Some((bus, dev, func, reg)) = self.target(in_data) {
                    lock(&self.root).config_read(bus, dev, func, reg, &mut data[..len]);
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            4..=7 => {
                let in_data = offset - 4;
                let len = data.len().min(4 - in_data as usize);
                if let Some((bus, dev, func, reg)) = self.target(in_data) {
                    lock(&self.root).config_write(bus, dev, func, reg, &data[..len]);
                }
            }
            _ => {}
        }
    }
}

/// ECAM: configuration space memory mapped at offset
/// `bus << 20 | device << 15 | function << 12 | register`. Insert it at the
/// ECAM base with the ECAM size (1 MiB per bus); only bus 0 is populated.
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
}

impl PciConfigMmio {
    /// The ECAM window for `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root }
    }

    fn decode(offset: u64) -> Option<(u8, u8, u8, u64)> {
        if offset >> 28 != 0 {
            return None; // past 256 buses
        }
        Some((
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
            offset & 0xfff,
        ))
    }

    /// The length of an access kept inside one function's 4 KiB.
    fn clamp(offset: u64, len: usize) -> usize {
        len.min((0x1000 - (offset & 0xfff)) as usize)
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let Some((bus, dev, func, reg)) = Self::decode(offset) {
            let len = Self::clamp(offset, data.len());
            lock(&self.root).config_read(bus, dev, func, reg, &mut data[..len]);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bus, dev, func, reg)) = Self::decode(offset) {
            let len = Self::clamp(offset, data.len());
            lock(&self.root).config_write(bus, dev, func, reg, &data[..len]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Bus;

    fn cf8_address(bus: u8, dev: u8, func: u8, reg: u8) -> u32 {
        ENABLE | u32::from(bus) << 16 | u32::from(dev) << 11 | u32::from(func) << 8 | u32::from(reg)
    }

    fn setup() -> (Arc<Mutex<PciRoot>>, Bus, Bus) {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let mut pio = Bus::new();
        pio.insert(
            PCI_CONFIG_IO_BASE,
            PCI_CONFIG_IO_LEN,
            Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
        )
        .unwrap();
        let mut mmio = Bus::new();
        mmio.insert(
            0xe000_0000,
            0x1000_0000,
            Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
        )
        .unwrap();
        (root, pio, mmio)
    }

    #[test]
    fn cf8_cfc_byte_word_dword() {
        let (_, pio, _) = setup();
        pio.write(0xcf8, &cf8_address(0, 0, 0, 0).to_le_bytes());
        let mut d = [0u8; 4];
        pio.read(0xcf8, &mut d);
        assert_eq!(u32::from_le_bytes(d), cf8_address(0, 0, 0, 0));
        pio.read(0xcfc, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
        let mut w = [0u8; 2];
        pio.read(0xcfe, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0d57);
        let mut b = [0u8; 1];
        pio.read(0xcfd, &mut b);
        assert_eq!(b[0], 0x80);
        // Class code register, byte 3 is the base class.
        pio.write(0xcf8, &cf8_address(0, 0, 0, 8).to_le_bytes());
        pio.read(0xcff, &mut b);
        assert_eq!(b[0], 0x06);
        // Interrupt line is writable by bytes.
        pio.write(0xcf8, &cf8_address(0, 0, 0, 0x3c).to_le_bytes());
        pio.write(0xcfc, &[0x0b]);
        pio.read(0xcfc, &mut b);
        assert_eq!(b[0], 0x0b);
        // A dword access at 0xCFE stays inside CONFIG_DATA.
        pio.read(0xcfe, &mut d);
        assert_eq!(d, [0, 0, 0xff, 0xff]);
        // Byte writes to CONFIG_ADDRESS are ignored.
        pio.write(0xcf9, &[0x06]);
        pio.read(0xcf8, &mut d);
        assert_eq!(u32::from_le_bytes(d), cf8_address(0, 0, 0, 0x3c));
    }

    #[test]
    fn cf8_absent_and_disabled() {
        let (_, pio, _) = setup();
        let mut d = [0u8; 4];
        for addr in [
            cf8_address(0, 5, 0, 0),
            cf8_address(0, 0, 3, 0),
            cf8_address(2, 0, 0, 0),
            cf8_address(0, 0, 0, 0) & !ENABLE,
        ] {
            pio.write(0xcf8, &addr.to_le_bytes());
            pio.read(0xcfc, &mut d);
            assert_eq!(d, [0xff; 4], "address {addr:#x}");
            pio.write(0xcfc, &[0; 4]);
        }
        // Disabled writes went nowhere.
        pio.write(0xcf8, &cf8_address(0, 0, 0, 0).to_le_bytes());
        pio.read(0xcfc, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
    }

    #[test]
    fn ecam_paths_agree_with_cf8() {
        let (root, pio, mmio) = setup();
        let mut d = [0u8; 4];
        mmio.read(0xe000_0000, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
        // Extended space of the host bridge reads zero (no capabilities).
        mmio.read(0xe000_0100, &mut d);
        assert_eq!(d, [0; 4]);
        // Device 1, function 0, bus 1: absent.
        mmio.read(0xe000_8000, &mut d);
        assert_eq!(d, [0xff; 4]);
        mmio.read(0xe010_0000, &mut d);
        assert_eq!(d, [0xff; 4]);
        // A write through ECAM is seen through CF8.
        mmio.write(0xe000_003c, &[0x0a]);
        pio.write(0xcf8, &cf8_address(0, 0, 0, 0x3c).to_le_bytes());
        let mut b = [0u8; 1];
        pio.read(0xcfc, &mut b);
        assert_eq!(b[0], 0x0a);
        // An 8-byte ECAM read, and one straddling the function's end.
        let mut q = [0u8; 8];
        mmio.read(0xe000_0000, &mut q);
        assert_eq!(&q[..4], &0x0d57_8086u32.to_le_bytes());
        mmio.read(0xe000_0ffc, &mut q);
        assert_eq!(q, [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        drop(root);
    }

    #[test]
    fn never_panics_on_odd_accesses() {
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let mut io = PciConfigIo::new(root.clone());
        let mut ecam = PciConfigMmio::new(root);
        io.write(0, &u32::MAX.to_le_bytes());
        for offset in [0u64, 1, 3, 4, 5, 7, 8, 100, u64::MAX] {
            for len in [0usize, 1, 2, 3, 4, 8, 16] {
                let mut d = vec![0u8; len];
                io.read(offset, &mut d);
                io.write(offset, &d);
                ecam.read(offset, &mut d);
                ecam.write(offset, &d);
                ecam.read(offset.wrapping_mul(0x1001), &mut d);
                ecam.write(offset.wrapping_mul(0x1001), &d);
            }
        }
    }
}
