//! virtio-blk serving a block graph node.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::RwLock;

use block::{BlockError, NodeRef};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::{ChainError, VirtioDevice, VirtioError};

/// Virtio device ID of block devices.
pub const VIRTIO_ID_BLOCK: u16 = 2;

/// Feature bit: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// Feature bit: the device is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// Feature bit: `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// Feature bit: FLUSH requests are supported.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// Feature bit: `topology` is valid.
pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
/// Feature bit: `writeback` is valid and writable.
pub const VIRTIO_BLK_F_CONFIG_WCE: u32 = 11;
/// Feature bit: `num_queues` is valid.
pub const VIRTIO_BLK_F_MQ: u32 = 12;
/// Feature bit: DISCARD requests are supported.
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
/// Feature bit: WRITE_ZEROES requests are supported.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;

/// Request type: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: get the serial number.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Request type: discard.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Request type: write zeroes.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Bytes in the serial number returned by GET_ID.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// Sectors the guest may discard or zero in one segment (QEMU's
/// `BDRV_REQUEST_MAX_SECTORS`, so the guest sees the same limits).
pub const MAX_DISCARD_SECTORS: u32 = (i32::MAX as u32) >> 9;

/// The largest read or write accepted, as QEMU's `BDRV_REQUEST_MAX_BYTES`
/// (larger ones fail with `IOERR`).
pub const MAX_REQUEST_BYTES: u64 = (i32::MAX as u64) & !(SECTOR - 1);

const SECTOR: u64 = 512;
const HEADER_LEN: usize = 16;
const SEGMENT_LEN: usize = 16;
const CONFIG_LEN: usize = 0x3c;
const WRITEBACK_OFFSET: u64 = 0x20;

/// QEMU's `VIRTIO_QUEUE_MAX`: the most queues virtio lets a device have.
pub const VIRTIO_QUEUE_MAX: u16 = 1024;
/// The most request queues a virtio-blk device may have here: virtio's
/// limit, or the virtio PCI transport's MSI-X room if lower (511).
pub const MAX_QUEUES: u16 = if super::transport::pci::MAX_QUEUES < VIRTIO_QUEUE_MAX {
    super::transport::pci::MAX_QUEUES
} else {
    VIRTIO_QUEUE_MAX
};
/// QEMU's `VIRTQUEUE_MAX_SIZE`: the largest queue (`queue-size`).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Smallest and largest `logical_block_size`/`physical_block_size`.
pub const BLOCK_SIZE_RANGE: std::ops::RangeInclusive<u32> = 512..=32768;

/// Which property of a [`BlockConfig`] is out of range, and why; the
/// messages are QEMU's where QEMU has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockConfigError {
    /// `num-queues` is 0 or above [`MAX_QUEUES`].
    #[error("num-queues property doesn't take value {0} (minimum: 1, maximum: {MAX_QUEUES})")]
    NumQueues(u16),
    /// `queue-size` is 2 or less.
    #[error("invalid queue-size property ({0}), must be > 2")]
    QueueSizeTooSmall(u16),
    /// `queue-size` is not a power of two or above [`MAX_QUEUE_SIZE`].
    #[error("invalid queue-size property ({0}), must be a power of 2 (max {MAX_QUEUE_SIZE})")]
    QueueSize(u16),
    /// A block size (`name`) outside [`BLOCK_SIZE_RANGE`].
    #[error("{name} property doesn't take value {value} (minimum: 512, maximum: 32768)")]
    BlockSizeRange {
        /// `logical_block_size` or `physical_block_size`.
        name: &'static str,
        /// The value given.
        value: u32,
    },
    /// A block size (`name`) that is not a power of two.
    #[error("{name} property doesn't take value '{value}', it's not a power of 2")]
    BlockSizePowerOfTwo {
        /// `logical_block_size` or `physical_block_size`.
        name: &'static str,
        /// The value given.
        value: u32,
    },
    /// The physical block is smaller than the logical one.
    #[error("physical_block_size ({physical}) must be at least logical_block_size ({logical})")]
    PhysicalBelowLogical {
        /// `physical_block_size`.
        physical: u32,
        /// `logical_block_size`.
        logical: u32,
    },
    /// `serial` is longer than [`VIRTIO_BLK_ID_BYTES`].
    #[error("serial is longer than {VIRTIO_BLK_ID_BYTES} bytes")]
    SerialTooLong,
}

impl BlockConfigError {
    /// The property the error is about (QEMU's name).
    pub fn property(&self) -> &'static str {
        match self {
            Self::NumQueues(_) => "num-queues",
            Self::QueueSizeTooSmall(_) | Self::QueueSize(_) => "queue-size",
            Self::BlockSizeRange { name, .. } | Self::BlockSizePowerOfTwo { name, .. } => name,
            Self::PhysicalBelowLogical { .. } => "physical_block_size",
            Self::SerialTooLong => "serial",
        }
    }
}

/// Properties of a virtio-blk device (QEMU's names in brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Number of request queues (`num-queues`).
    pub num_queues: u16,
    /// Size of each queue (`queue-size`), a power of two.
    pub queue_size: u16,
    /// Logical block size in bytes (`logical_block_size`).
    pub logical_block_size: u32,
    /// Physical block size in bytes (`physical_block_size`).
    pub physical_block_size: u32,
    /// Serial number (`serial`), at most 20 bytes.
    pub serial: String,
    /// Offer DISCARD (`discard`).
    pub discard: bool,
    /// Offer WRITE_ZEROES (`write-zeroes`).
    pub write_zeroes: bool,
}

impl BlockConfig {
    /// The one check of a virtio-blk device's properties (the VMM's property
    /// parser and [`VirtioBlock::new`] both rely on it), in QEMU's order.
    pub fn validate(&self) -> Result<(), BlockConfigError> {
        if self.num_queues == 0 || self.num_queues > MAX_QUEUES {
            return Err(BlockConfigError::NumQueues(self.num_queues));
        }
        let qs = self.queue_size;
        if qs <= 2 {
            return Err(BlockConfigError::QueueSizeTooSmall(qs));
        }
        if !qs.is_power_of_two() || qs > MAX_QUEUE_SIZE {
            return Err(BlockConfigError::QueueSize(qs));
        }
        for (name, value) in [
            ("logical_block_size", self.logical_block_size),
            ("physical_block_size", self.physical_block_size),
        ] {
            if !BLOCK_SIZE_RANGE.contains(&value) {
                return Err(BlockConfigError::BlockSizeRange { name, value });
            }
            if !value.is_power_of_two() {
                return Err(BlockConfigError::BlockSizePowerOfTwo { name, value });
            }
        }
        if self.physical_block_size < self.logical_block_size {
            return Err(BlockConfigError::PhysicalBelowLogical {
                physical: self.physical_block_size,
                logical: self.logical_block_size,
            });
        }
        if self.serial.len() > VIRTIO_BLK_ID_BYTES {
            return Err(BlockConfigError::SerialTooLong);
        }
        Ok(())
    }
}

impl Default for BlockConfig {
    fn default() -> Self {
        Self {
            num_queues: 1,
            queue_size: 256,
            logical_block_size: 512,
            physical_block_size: 512,
            serial: String::new(),
            discard: true,
            write_zeroes: true,
        }
    }
}

/// Which way a failed request went (QEMU's `IoOperationType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOperation {
    /// A read.
    Read,
    /// A write, flush, discard or write-zeroes.
    Write,
}

/// Told about each request the block node failed (for QMP `BLOCK_IO_ERROR`).
pub type IoErrorReporter = Box<dyn Fn(IoOperation, &BlockError) + Send + Sync>;

/// A virtio-blk device over a block node.
pub struct VirtioBlock {
    /// The backend; `None` once released (the device is gone).
    node: RwLock<Option<NodeRef>>,
    /// Bytes, as the node had at creation (the size of a node never changes).
    size: u64,
    read_only: bool,
    cfg: BlockConfig,
    writeback: AtomicU8,
    on_error: Option<IoErrorReporter>,
}

type Segments = Vec<(GuestAddress, usize)>;

/// How a request ended short of success.
enum Fail {
    IoErr,
    Unsupp,
}

impl VirtioBlock {
    /// A device serving `node` with properties `cfg`.
    pub fn new(node: NodeRef, cfg: BlockConfig) -> Result<Self, VirtioError> {
        cfg.validate()?;
        Ok(Self {
            size: node.size(),
            read_only: node.read_only(),
            node: RwLock::new(Some(node)),
            cfg,
            writeback: AtomicU8::new(1),
            on_error: None,
        })
    }

    /// Reports node errors to `reporter`; the guest still gets IOERR.
    pub fn with_error_reporter(mut self, reporter: IoErrorReporter) -> Self {
        self.on_error = Some(reporter);
        self
    }

    fn io_failed(&self, op: IoOperation, error: &BlockError) -> Fail {
        if let Some(report) = &self.on_error {
            report(op, error);
        }
        Fail::IoErr
    }

    /// The node, unless the device has been released.
    fn node(&self) -> Option<NodeRef> {
        self.node.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn seg_max(&self) -> u32 {
        u32::from(self.cfg.queue_size) - 2
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        let lbs = self.cfg.logical_block_size;
        let ratio = self.cfg.physical_block_size / lbs;
        put(0x00, &(self.size / SECTOR).to_le_bytes());
        put(0x0c, &self.seg_max().to_le_bytes());
        put(0x14, &lbs.to_le_bytes());
        put(0x18, &[ratio.trailing_zeros() as u8, 0]);
        put(0x1a, &(ratio as u16).to_le_bytes());
        put(0x20, &[self.writeback.load(Ordering::Relaxed), 0]);
        put(0x22, &self.cfg.num_queues.to_le_bytes());
        put(0x24, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(0x28, &1u32.to_le_bytes());
        put(0x2c, &(lbs / SECTOR as u32).to_le_bytes());
        put(0x30, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(0x34, &1u32.to_le_bytes());
        b
    }

    /// Executes a request; returns the bytes written into data buffers.
    fn execute(
        &self,
        mem: &GuestMemoryMmap,
        readable: &Segments,
        writable: &Segments,
    ) -> Result<u32, Fail> {
        let mut header = [0u8; HEADER_LEN];
        let rest = gather(mem, readable, &mut header)?;
        let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let node = self.node().ok_or(Fail::IoErr)?;
        let node = &*node;
        match req_type {
            VIRTIO_BLK_T_IN => {
                let offset = self.check_io(sector, writable)?;
                if let Some(mut bufs) = guest_bufs_mut(mem, writable)? {
                    // One request down the graph: one preadv, one parallel decryption.
                    node.read_vectored(offset, &mut bufs)
                        .map_err(|e| self.io_failed(IoOperation::Read, &e))?;
                    return used_len(block::node::total_len(&bufs));
                }
                let mut pos = offset;
                for &(addr, len) in writable {
                    for_each_slice_mut(mem, addr, len, |buf| {
                        node.read_at(pos, buf)
                            .map_err(|e| self.io_failed(IoOperation::Read, &e))?;
                        pos += buf.len() as u64;
                        Ok(())
                    })?;
                }
                used_len(pos - offset)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(Fail::IoErr);
                }
                let offset = self.check_io(sector, &rest)?;
                let bufs = guest_bufs(mem, &rest)?;
                node.write_vectored(offset, &bufs)
                    .map_err(|e| self.io_failed(IoOperation::Write, &e))?;
                if self.writeback.load(Ordering::Relaxed) == 0 {
                    node.flush()
                        .map_err(|e| self.io_failed(IoOperation::Write, &e))?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => node
                .flush()
                .map(|_| 0)
                .map_err(|e| self.io_failed(IoOperation::Write, &e)),
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
                id[..self.cfg.serial.len()].copy_from_slice(self.cfg.serial.as_bytes());
                scatter(mem, writable, &id)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let offered = if req_type == VIRTIO_BLK_T_DISCARD {
                    self.cfg.discard
                } else {
                    self.cfg.write_zeroes
                };
                if !offered {
                    return Err(Fail::Unsupp);
                }
                if node.read_only() {
                    return Err(Fail::IoErr);
                }
                let total: usize = rest.iter().map(|s| s.1).sum();
                if total == 0 || !total.is_multiple_of(SEGMENT_LEN) || total / SEGMENT_LEN > 1 {
                    return Err(Fail::Unsupp);
                }
                let mut seg = [0u8; SEGMENT_LEN];
                gather(mem, &rest, &mut seg)?;
                let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
                let num = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
                let unmap_ok = req_type == VIRTIO_BLK_T_WRITE_ZEROES;
                if flags & !1 != 0 || (flags & 1 != 0 && !unmap_ok) || num > MAX_DISCARD_SECTORS {
                    return Err(Fail::Unsupp);
                }
                let len = u64::from(num) * SECTOR;
                let offset = self.check_range(sector, len)?;
                let r = if req_type == VIRTIO_BLK_T_DISCARD {
                    node.discard(offset, len)
                } else {
                    node.write_zeroes(offset, len)
                };
                r.map(|_| 0)
                    .map_err(|e| self.io_failed(IoOperation::Write, &e))
            }
            _ => Err(Fail::Unsupp),
        }
    }

    /// Checks a read or write of `segs` at `sector`; returns its byte offset.
    /// The guest's limits are enforced here: at most `seg_max` buffers and
    /// [`MAX_REQUEST_BYTES`], whatever the descriptors say.
    fn check_io(&self, sector: u64, segs: &Segments) -> Result<u64, Fail> {
        if segs.len() > self.seg_max() as usize {
            return Err(Fail::IoErr);
        }
        let len: u64 = segs.iter().map(|s| s.1 as u64).sum();
        if !len.is_multiple_of(SECTOR) || len > MAX_REQUEST_BYTES {
            return Err(Fail::IoErr);
        }
        self.check_range(sector, len)
    }

    fn check_range(&self, sector: u64, len: u64) -> Result<u64, Fail> {
        let capacity = self.size / SECTOR * SECTOR;
        let offset = sector.checked_mul(SECTOR).ok_or(Fail::IoErr)?;
        match offset.checked_add(len) {
            Some(end) if end <= capacity => Ok(offset),
            _ => Err(Fail::IoErr),
        }
    }
}

/// A used length: the data bytes plus the status byte (a chain holds at
/// most 4 GiB, so this fits; anything else is refused).
fn used_len(data: u64) -> Result<u32, Fail> {
    u32::try_from(data)
        .ok()
        .filter(|&n| n < u32::MAX)
        .ok_or(Fail::IoErr)
}

/// The status byte's address: the last byte of the chain's last
/// descriptor, which must be writable.
fn status_addr(descs: &[Descriptor]) -> Result<GuestAddress, ChainError> {
    let last = descs.last().ok_or(ChainError::NoStatus)?;
    if !last.is_write_only() || last.len() == 0 {
        return Err(ChainError::NoStatus);
    }
    last.addr()
        .checked_add(u64::from(last.len()) - 1)
        .ok_or(ChainError::NoStatus)
}

/// Reads `out.len()` bytes from the start of `segs`; returns the segments
/// after them.
fn gather(mem: &GuestMemoryMmap, segs: &Segments, out: &mut [u8]) -> Result<Segments, Fail> {
    let mut done = 0;
    let mut rest = Vec::new();
    for &(addr, len) in segs {
        let n = len.min(out.len() - done);
        if n > 0 {
            mem.read_slice(&mut out[done..done + n], addr)
                .map_err(|_| Fail::IoErr)?;
            done += n;
        }
        if n < len {
            let a = addr.checked_add(n as u64).ok_or(Fail::IoErr)?;
            rest.push((a, len - n));
        }
    }
    if done < out.len() {
        return Err(Fail::IoErr);
    }
    Ok(rest)
}

/// Writes as much of `data` as fits into `segs`; returns the bytes written.
fn scatter(mem: &GuestMemoryMmap, segs: &Segments, data: &[u8]) -> Result<u32, Fail> {
    let mut done = 0;
    for &(addr, len) in segs {
        let n = len.min(data.len() - done);
        mem.write_slice(&data[done..done + n], addr)
            .map_err(|_| Fail::IoErr)?;
        done += n;
    }
    Ok(done as u32)
}

/// Calls `f` on each host-contiguous piece of guest memory
/// `[addr, addr+len)`, in place.
fn for_each_slice_mut(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
    mut f: impl FnMut(&mut [u8]) -> Result<(), Fail>,
) -> Result<(), Fail> {
    let slices = mem
        .get_slices(addr, len, Permissions::Write)
        .map_err(|_| Fail::IoErr)?;
    for s in slices {
        let s = s.map_err(|_| Fail::IoErr)?;
        let guard = s.ptr_guard_mut();
        // SAFETY: `get_slices` checked that the range lies within one mapped
        // region, which stays mapped while `mem` is borrowed. The guest may
        // write the same bytes concurrently; any byte value is a valid `u8`,
        // so a racing guest only corrupts its own buffer, as on hardware.
        let buf = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), guard.len()) };
        f(buf)?;
    }
    Ok(())
}

/// Host addresses and lengths of the guest buffers `segs`, in order (a segment
/// spanning memory regions gives several).
fn host_ranges(
    mem: &GuestMemoryMmap,
    segs: &Segments,
    access: Permissions,
) -> Result<Vec<(*mut u8, usize)>, Fail> {
    let mut out = Vec::with_capacity(segs.len());
    for &(addr, len) in segs {
        for s in mem.get_slices(addr, len, access).map_err(|_| Fail::IoErr)? {
            let s = s.map_err(|_| Fail::IoErr)?;
            let guard = s.ptr_guard_mut();
            out.push((guard.as_ptr(), guard.len()));
        }
    }
    Ok(out)
}

/// The guest buffers `segs` as host slices, in place and in order. `None` when
/// two of them overlap (only a hostile driver does that): the caller then goes
/// one slice at a time rather than hold aliasing mutable slices.
// Guest RAM is writable through a shared `GuestMemoryMmap`, as in
// `for_each_slice_mut`; the slices handed out never overlap.
#[allow(clippy::mut_from_ref)]
fn guest_bufs_mut<'m>(
    mem: &'m GuestMemoryMmap,
    segs: &Segments,
) -> Result<Option<Vec<&'m mut [u8]>>, Fail> {
    let raw = host_ranges(mem, segs, Permissions::Write)?;
    let mut sorted = raw.clone();
    sorted.sort_unstable_by_key(|&(p, _)| p as usize);
    if sorted
        .windows(2)
        .any(|w| (w[0].0 as usize).saturating_add(w[0].1) > w[1].0 as usize)
    {
        return Ok(None);
    }
    Ok(Some(
        raw.into_iter()
            // SAFETY: `get_slices` checked each range lies within a region that stays
            // mapped while `mem` is borrowed, and the ranges do not overlap (checked
            // above), so no two slices alias. The guest may write the bytes
            // concurrently; any value is a valid `u8`.
            .map(|(p, len)| unsafe { std::slice::from_raw_parts_mut(p, len) })
            .collect(),
    ))
}

/// The guest buffers `segs` as host slices to read from, in place and in order.
fn guest_bufs<'m>(mem: &'m GuestMemoryMmap, segs: &Segments) -> Result<Vec<&'m [u8]>, Fail> {
    Ok(host_ranges(mem, segs, Permissions::Read)?
        .into_iter()
        // SAFETY: as in `guest_bufs_mut`; shared slices may overlap.
        .map(|(p, len)| unsafe { std::slice::from_raw_parts(p.cast_const(), len) })
        .collect())
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut f = [
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
        ]
        .iter()
        .fold(0u64, |f, &b| f | 1 << b);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            if self.cfg.discard {
                f |= 1 << VIRTIO_BLK_F_DISCARD;
            }
            if self.cfg.write_zeroes {
                f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            }
        }
        f
    }

    fn num_queues(&self) -> u16 {
        self.cfg.num_queues
    }

    fn queue_max_size(&self) -> u16 {
        self.cfg.queue_size
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let b = self.config_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| b.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&self, offset: u64, data: &[u8]) {
        if offset == WRITEBACK_OFFSET && data.len() == 1 {
            self.writeback
                .store(u8::from(data[0] != 0), Ordering::Relaxed);
        }
    }

    fn reset(&self) {
        self.writeback.store(1, Ordering::Relaxed);
    }

    fn release(&self) {
        self.node.write().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn process(&self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Result<u32, ChainError> {
        let status_addr = status_addr(descs)?;
        let mut readable = Segments::new();
        let mut writable = Segments::new();
        for (i, d) in descs.iter().enumerate() {
            let len = if i == descs.len() - 1 {
                d.len() - 1
            } else {
                d.len()
            } as usize;
            if len == 0 {
                continue;
            }
            if d.is_write_only() {
                writable.push((d.addr(), len));
            } else {
                readable.push((d.addr(), len));
            }
        }
        let (status, written) = match self.execute(mem, &readable, &writable) {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(Fail::IoErr) => (VIRTIO_BLK_S_IOERR, 0),
            Err(Fail::Unsupp) => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        mem.write_obj(status, status_addr)
            .map_err(|_| ChainError::NoStatus)?;
        Ok(written + 1)
    }

    fn fail(&self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Result<u32, ChainError> {
        mem.write_obj(VIRTIO_BLK_S_IOERR, status_addr(descs)?)
            .map_err(|_| ChainError::NoStatus)?;
        Ok(1)
    }
}
