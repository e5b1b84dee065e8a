//! A type-0 PCI configuration space (4 KiB, PCIe extended) with write masks.
//!
//! Every register has a value and a mask of the bits the guest may change;
//! writes only touch the masked bits, so read-only fields (IDs, class code,
//! BAR type bits, the capabilities pointer) stay as built. BARs are modelled
//! the PCI way: the address bits below the BAR's size are read-only zeroes,
//! so writing all ones and reading back yields `!(size - 1) | type bits`
//! (the sizing protocol), and writing the address back restores it.

use super::{BarKind, BarRegion, PciError};

/// Bytes in a PCIe configuration space.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Bytes in the conventional (CF8/CFC-reachable) part of it.
pub const LEGACY_CONFIG_SPACE_SIZE: usize = 256;
const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;

/// Dword index of the vendor/device ID register.
pub const REG_ID: usize = 0;
/// Dword index of the command/status register.
pub const REG_COMMAND_STATUS: usize = 1;
/// Dword index of the revision/class register.
pub const REG_CLASS: usize = 2;
/// Dword index of the cache line/latency/header type/BIST register.
pub const REG_HEADER: usize = 3;
/// Dword index of BAR 0; BARs 0..=5 follow.
pub const REG_BAR0: usize = 4;
/// Dword index of the subsystem vendor/subsystem ID register.
pub const REG_SUBSYSTEM: usize = 11;
/// Dword index of the capabilities pointer register.
pub const REG_CAP_PTR: usize = 13;
/// Dword index of the interrupt line/pin register.
pub const REG_INTERRUPT: usize = 15;
/// Number of BARs in a type-0 header.
pub const NUM_BARS: usize = 6;

/// Command register: I/O space decoding.
pub const COMMAND_IO: u16 = 1 << 0;
/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus master.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx disable.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: the capabilities list is valid.
pub const STATUS_CAP_LIST: u16 = 1 << 4;

/// First byte offset available for capabilities (after the type-0 header).
const FIRST_CAP_OFFSET: usize = 0x40;

/// The identity of a function, written into its read-only header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code, subclass and programming interface (24 bits).
    pub class: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
}

/// One BAR as a device declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bar {
    size: u64,
    kind: BarKind,
    prefetchable: bool,
}

/// A function's configuration space.
#[derive(Clone)]
pub struct PciConfiguration {
    regs: Box<[u32; NUM_REGS]>,
    writable: Box<[u32; NUM_REGS]>,
    bars: [Option<Bar>; NUM_BARS],
    /// Byte offset of the last capability added (0 when none).
    last_cap: usize,
    /// First byte offset not used by a capability.
    next_cap: usize,
}

impl std::fmt::Debug for PciConfiguration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfiguration")
            .field("id", &format_args!("{:#010x}", self.regs[REG_ID]))
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

impl PciConfiguration {
    /// A type-0 header with `ids`, interrupt pin `intx_pin` (0 = none,
    /// 1..=4 = INTA#..INTD#) and no BARs or capabilities.
    pub fn new(ids: PciIds, intx_pin: u8) -> Self {
        let mut c = Self {
            regs: Box::new([0; NUM_REGS]),
            writable: Box::new([0; NUM_REGS]),
            bars: [None; NUM_BARS],
            last_cap: 0,
            next_cap: FIRST_CAP_OFFSET,
        };
        c.regs[REG_ID] = u32::from(ids.device) << 16 | u32::from(ids.vendor);
        c.regs[REG_CLASS] = (ids.class & 0x00ff_ffff) << 8 | u32::from(ids.revision);
        c.regs[REG_SUBSYSTEM] = u32::from(ids.subsystem) << 16 | u32::from(ids.subsystem_vendor);
        c.regs[REG_INTERRUPT] = u32::from(intx_pin.min(4)) << 8;
        // Command: I/O, memory, bus master, INTx disable. Status is read-only
        // (no write-1-to-clear error bits are ever set by this model).
        c.writable[REG_COMMAND_STATUS] =
            u32::from(COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE);
        // Cache line size and latency timer are plain read/write registers.
        c.writable[REG_HEADER] = 0x0000_ffff;
        // Interrupt line is the OS's scratch register.
        c.writable[REG_INTERRUPT] = 0x0000_00ff;
        c
    }

    /// Declares BAR `index` (for a 64-bit BAR, `index` and `index + 1`) of
    /// `size` bytes at guest address `addr`. `size` must be a power of two,
    /// at least 16 for memory BARs and 4 for I/O BARs, and `addr` aligned to it.
    pub fn add_bar(
        &mut self,
        index: usize,
        kind: BarKind,
        size: u64,
        addr: u64,
        prefetchable: bool,
    ) -> Result<(), PciError> {
        let slots = if kind == BarKind::Memory64 { 2 } else { 1 };
        let min = if kind == BarKind::Io { 4 } else { 16 };
        let max = match kind {
            BarKind::Io => 1 << 16,
            BarKind::Memory32 => 1 << 31,
            BarKind::Memory64 => 1 << 63,
        };
        let bad = index + slots > NUM_BARS
            || self.bars[index..index + slots].iter().any(Option::is_some)
            || (index > 0 && self.bars[index - 1].map(|b| b.kind) == Some(BarKind::Memory64))
            || !size.is_power_of_two()
            || size < min
            || size > max
            || addr & (size - 1) != 0
            || (kind != BarKind::Memory64 && addr > u64::from(u32::MAX));
        if bad {
            return Err(PciError::InvalidBar { index, size, addr });
        }
        let type_bits: u32 = match kind {
            BarKind::Io => 0b01,
            BarKind::Memory32 => u32::from(prefetchable) << 3,
            BarKind::Memory64 => 0b100 | u32::from(prefetchable) << 3,
        };
        let mask = !(size - 1);
        let low_mask = if kind == BarKind::Io {
            !0b11u32
        } else {
            !0b1111u32
        };
        let reg = REG_BAR0 + index;
        self.regs[reg] = (addr as u32 & low_mask) | type_bits;
        self.writable[reg] = mask as u32 & low_mask;
        if kind == BarKind::Memory64 {
            self.regs[reg + 1] = (addr >> 32) as u32;
            self.writable[reg + 1] = (mask >> 32) as u32;
        }
        self.bars[index] = Some(Bar {
            size,
            kind,
            prefetchable,
        });
        Ok(())
    }

    /// Appends a capability. `data` is the whole capability starting with its
    /// ID byte; its "next" byte is filled in here. `write_mask` (same length
    /// or shorter, missing bytes read-only) marks the bits the guest may
    /// change. Returns the capability's byte offset in configuration space.
    pub fn add_capability(&mut self, data: &[u8], write_mask: &[u8]) -> Result<usize, PciError> {
        let offset = self.next_cap;
        let len = data.len().next_multiple_of(4);
        if data.len() < 2
            || write_mask.len() > data.len()
            || offset + len > LEGACY_CONFIG_SPACE_SIZE
        {
            return Err(PciError::CapabilitySpace { len: data.len() });
        }
        for (i, &b) in data.iter().enumerate() {
            let b = if i == 1 { 0 } else { b };
            self.set_byte(offset + i, b);
        }
        for (i, &m) in write_mask.iter().enumerate() {
            let m = if i < 2 { 0 } else { m };
            let (reg, shift) = ((offset + i) / 4, (offset + i) % 4 * 8);
            self.writable[reg] = (self.writable[reg] & !(0xff << shift)) | u32::from(m) << shift;
        }
        if self.last_cap == 0 {
            self.regs[REG_CAP_PTR] = offset as u32;
            self.regs[REG_COMMAND_STATUS] |= u32::from(STATUS_CAP_LIST) << 16;
        } else {
            self.set_byte(self.last_cap + 1, offset as u8);
        }
        self.last_cap = offset;
        self.next_cap = offset + len;
        Ok(offset)
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let (reg, shift) = (offset / 4, offset % 4 * 8);
        self.regs[reg] = (self.regs[reg] & !(0xff << shift)) | u32::from(value) << shift;
    }

    /// The dword at `reg` (0 beyond the configuration space).
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Sets a whole register, bypassing the write mask (for the device model,
    /// not the guest: e.g. status bits or capability state it owns).
    pub fn set_reg(&mut self, reg: usize, value: u32) {
        if let Some(r) = self.regs.get_mut(reg) {
            *r = value;
        }
    }

    /// A guest read of `data.len()` bytes at byte `offset` within dword `reg`.
    /// Bytes past the dword or the space read as zero (callers split accesses
    /// per dword, so only malformed accesses get there).
    pub fn read(&self, reg: usize, offset: u64, data: &mut [u8]) {
        let value = self.read_reg(reg).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| value.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    /// A guest write of `data` at byte `offset` within dword `reg`; only
    /// writable bits change. Bytes past the dword are ignored.
    pub fn write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        let (Some(&mask), Ok(offset)) = (self.writable.get(reg), usize::try_from(offset)) else {
            return;
        };
        let mut value = self.regs[reg].to_le_bytes();
        let mask = mask.to_le_bytes();
        for (i, &b) in data.iter().enumerate() {
            let Some(j) = offset.checked_add(i).filter(|&j| j < 4) else {
                break;
            };
            value[j] = (value[j] & !mask[j]) | (b & mask[j]);
        }
        self.regs[reg] = u32::from_le_bytes(value);
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[REG_COMMAND_STATUS] as u16
    }

    /// The BARs with their current guest addresses.
    pub fn bar_regions(&self) -> Vec<BarRegion> {
        let mut out = Vec::new();
        for (index, bar) in self.bars.iter().enumerate() {
            let Some(bar) = bar else { continue };
            let reg = REG_BAR0 + index;
            let low = u64::from(self.regs[reg]);
            let addr = match bar.kind {
                BarKind::Io => low & !0b11,
                BarKind::Memory32 => low & !0b1111,
                BarKind::Memory64 => u64::from(self.regs[reg + 1]) << 32 | (low & !0b1111),
            };
            out.push(BarRegion {
                index: index as u8,
                addr,
                size: bar.size,
                kind: bar.kind,
                prefetchable: bar.prefetchable,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: 0x01_80_00,
            subsystem_vendor: 0x1af4,
            subsystem: 0x0002,
        }
    }

    fn rd(c: &PciConfiguration, byte: usize, len: usize) -> u32 {
        let mut d = [0u8; 4];
        c.read(byte / 4, (byte % 4) as u64, &mut d[..len]);
        u32::from_le_bytes(d)
    }

    fn wr(c: &mut PciConfiguration, byte: usize, value: u32, len: usize) {
        c.write(byte / 4, (byte % 4) as u64, &value.to_le_bytes()[..len]);
    }

    #[test]
    fn header_fields_are_read_only() {
        let mut c = PciConfiguration::new(ids(), 1);
        assert_eq!(rd(&c, 0, 4), 0x1042_1af4);
        assert_eq!(rd(&c, 2, 2), 0x1042);
        assert_eq!(rd(&c, 8, 4), 0x0180_0001);
        wr(&mut c, 0, 0xffff_ffff, 4);
        wr(&mut c, 8, 0, 4);
        wr(&mut c, 0x2c, 0, 4);
        assert_eq!(rd(&c, 0, 4), 0x1042_1af4);
        assert_eq!(rd(&c, 8, 4), 0x0180_0001);
        assert_eq!(rd(&c, 0x2c, 4), 0x0002_1af4);
        // Interrupt line is writable, pin is not.
        wr(&mut c, 0x3c, 0xffff_ff0b, 4);
        assert_eq!(rd(&c, 0x3c, 2), 0x010b);
        // Command: only the implemented bits stick; status is read-only.
        wr(&mut c, 4, 0xffff_ffff, 4);
        assert_eq!(rd(&c, 4, 4), 0x0000_0407);
        assert_eq!(c.command(), 0x407);
        // Expansion ROM BAR is absent: sizing it reads back zero.
        wr(&mut c, 0x30, 0xffff_ffff, 4);
        assert_eq!(rd(&c, 0x30, 4), 0);
    }

    #[test]
    fn bar_sizing_protocol() {
        let mut c = PciConfiguration::new(ids(), 0);
        c.add_bar(0, BarKind::Memory32, 0x1000, 0xc000_0000, false)
            .unwrap();
        c.add_bar(2, BarKind::Memory64, 0x4000, 0x1_0000_8000, true)
            .unwrap();
        c.add_bar(4, BarKind::Io, 0x20, 0x1000, false).unwrap();
        assert_eq!(rd(&c, 0x10, 4), 0xc000_0000);
        assert_eq!(rd(&c, 0x18, 4), 0x0000_800c);
        assert_eq!(rd(&c, 0x1c, 4), 1);
        assert_eq!(rd(&c, 0x20, 4), 0x1001);

        // Sizing: write all ones, read the mask and type bits back.
        for bar in 0..6 {
            wr(&mut c, 0x10 + bar * 4, 0xffff_ffff, 4);
        }
        assert_eq!(rd(&c, 0x10, 4), 0xffff_f000);
        assert_eq!(rd(&c, 0x14, 4), 0, "unused BAR sizes to zero");
        assert_eq!(rd(&c, 0x18, 4), 0xffff_c00c);
        assert_eq!(rd(&c, 0x1c, 4), 0xffff_ffff);
        assert_eq!(rd(&c, 0x20, 4), 0xffff_ffe1);
        assert_eq!(rd(&c, 0x24, 4), 0);

        // Assign new addresses; regions follow.
        wr(&mut c, 0x10, 0xd000_0000, 4);
        wr(&mut c, 0x18, 0x0002_0000, 4);
        wr(&mut c, 0x1c, 0x2, 4);
        wr(&mut c, 0x20, 0x2000, 4);
        let r = c.bar_regions();
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].index, r[0].addr, r[0].size), (0, 0xd000_0000, 0x1000));
        assert_eq!(
            (r[1].index, r[1].addr, r[1].size),
            (2, 0x2_0002_0000, 0x4000)
        );
        assert!(r[1].prefetchable);
        assert_eq!((r[2].kind, r[2].addr), (BarKind::Io, 0x2000));
        // Byte writes to a BAR keep the type bits.
        wr(&mut c, 0x10, 0xff, 1);
        assert_eq!(rd(&c, 0x10, 4), 0xd000_0000);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = PciConfiguration::new(ids(), 0);
        assert!(c.add_bar(0, BarKind::Memory32, 0x1800, 0, false).is_err());
        assert!(c.add_bar(0, BarKind::Memory32, 8, 0, false).is_err());
        assert!(c
            .add_bar(0, BarKind::Memory32, 0x1000, 0x800, false)
            .is_err());
        assert!(c.add_bar(5, BarKind::Memory64, 0x1000, 0, false).is_err());
        assert!(c
            .add_bar(0, BarKind::Memory32, 0x1000, 1 << 32, false)
            .is_err());
        c.add_bar(0, BarKind::Memory64, 0x1000, 1 << 32, false)
            .unwrap();
        assert!(c.add_bar(1, BarKind::Memory32, 0x1000, 0, false).is_err());
        assert!(c.add_bar(0, BarKind::Memory32, 0x1000, 0, false).is_err());
    }

    #[test]
    fn capabilities_are_chained() {
        let mut c = PciConfiguration::new(ids(), 0);
        let a = c.add_capability(&[0x09, 0xaa, 4, 1], &[]).unwrap();
        let b = c
            .add_capability(&[0x11, 0, 0, 0, 0, 0], &[0, 0, 0xff, 0xc0])
            .unwrap();
        assert_eq!((a, b), (0x40, 0x44));
        assert_eq!(rd(&c, 0x34, 1), 0x40);
        assert_eq!(rd(&c, 6, 2) & u32::from(STATUS_CAP_LIST), 0x10);
        assert_eq!(rd(&c, 0x40, 4), 0x0104_4409);
        assert_eq!(rd(&c, 0x44, 2), 0x0011);
        wr(&mut c, 0x44, 0xffff_ffff, 4);
        assert_eq!(rd(&c, 0x44, 4), 0xc0ff_0011);
        assert!(c.add_capability(&[0; 300], &[]).is_err());
    }
}
