//! A simulated guest driver over `GuestMemoryMmap` driving virtio-blk-pci.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::block::{BlockError, BlockNode};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::block::*;
use super::*;
use crate::pci::PciDevice;
use crate::workers::WorkerPool;
use crate::{BusDevice, Interrupt};

const MEM_REGION: u64 = 0x10_0000;
const BAR_ADDR: u64 = 0xe000_0000;
const QSIZE: u16 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

#[derive(Default)]
struct Counter(AtomicUsize);

impl Interrupt for Counter {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// An in-memory node with error injection.
struct MemNode {
    data: Mutex<Vec<u8>>,
    ro: bool,
    fail: AtomicBool,
    /// A bug in the block layer: every access panics.
    panics: AtomicBool,
    flushes: AtomicUsize,
}

impl MemNode {
    fn new(size: usize, ro: bool) -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(vec![0; size]),
            ro,
            fail: AtomicBool::new(false),
            panics: AtomicBool::new(false),
            flushes: AtomicUsize::new(0),
        })
    }
    fn check(&self, offset: u64, len: u64) -> ::block::Result<()> {
        assert!(
            !self.panics.load(Ordering::SeqCst),
            "injected block layer bug"
        );
        if self.fail.load(Ordering::SeqCst) {
            return Err(BlockError::io(
                "injected",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        ::block::node::check_range("mem", self.size(), offset, len)
    }
}

impl BlockNode for MemNode {
    fn driver(&self) -> &'static str {
        "mem"
    }
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.ro
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> ::block::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> ::block::Result<()> {
        self.check(offset, buf.len() as u64)?;
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> ::block::Result<()> {
        self.check(0, 0)?;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> ::block::Result<()> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> ::block::Result<()> {
        self.check(offset, len)?;
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + len as usize].fill(0);
        Ok(())
    }
}

struct Q {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    scratch: u64,
}

/// The simulated guest: memory, the device and its interrupt counters.
struct Guest {
    mem: GuestMemoryMmap,
    dev: VirtioPciDevice,
    irqs: Vec<Arc<Counter>>,
    node: Arc<MemNode>,
    qs: Vec<Q>,
    /// Node errors the device reported (for QMP `BLOCK_IO_ERROR`).
    errors: Arc<Mutex<Vec<IoOperation>>>,
    /// Device failures reported.
    faults: Arc<Mutex<Vec<String>>>,
    pool: Arc<WorkerPool>,
}

/// Waits (up to 10 s, a hang guard) until `done` holds.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

impl Guest {
    fn new(node: Arc<MemNode>, num_queues: u16) -> Self {
        Self::with_pool(node, num_queues, WorkerPool::new(4, "vtest").unwrap())
    }

    fn with_pool(node: Arc<MemNode>, num_queues: u16, pool: Arc<WorkerPool>) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), MEM_REGION as usize),
            (GuestAddress(MEM_REGION), MEM_REGION as usize),
        ])
        .unwrap();
        let cfg = BlockConfig {
            num_queues,
            queue_size: QSIZE,
            physical_block_size: 4096,
            serial: "cryptvm-disk-0".into(),
            ..Default::default()
        };
        let errors: Arc<Mutex<Vec<IoOperation>>> = Arc::default();
        let seen = errors.clone();
        let blk = Arc::new(
            VirtioBlock::new(node.clone(), cfg)
                .unwrap()
                .with_error_reporter(Box::new(move |op, _| seen.lock().unwrap().push(op))),
        );
        let irqs: Vec<Arc<Counter>> = (0..=num_queues).map(|_| Arc::default()).collect();
        let ints = irqs
            .iter()
            .map(|c| c.clone() as Arc<dyn Interrupt>)
            .collect();
        let dev = VirtioPciDevice::new(blk, mem.clone(), ints, BAR_ADDR, &pool, "vtest").unwrap();
        let faults: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = faults.clone();
        dev.set_fault_reporter(Box::new(move |what| {
            seen.lock().unwrap().push(what.to_string())
        }));
        let qs = (0..u64::from(num_queues))
            .map(|i| {
                let base = 0x1000 + i * 0x4000;
                Q {
                    desc: base,
                    avail: base + 0x1000,
                    used: base + 0x2000,
                    next_desc: 0,
                    avail_idx: 0,
                    scratch: base + 0x3000,
                }
            })
            .collect();
        Self {
            mem,
            dev,
            irqs,
            node,
            qs,
            errors,
            faults,
            pool,
        }
    }

    fn cfg_r(&mut self, byte: usize) -> u32 {
        let mut d = [0u8; 4];
        self.dev.read_config(byte / 4, 0, &mut d);
        u32::from_le_bytes(d)
    }
    fn cfg_w(&mut self, byte: usize, v: u32) {
        self.dev.write_config(byte / 4, 0, &v.to_le_bytes());
    }
    fn bar_r(&mut self, off: u64, len: usize) -> u64 {
        let mut d = [0u8; 8];
        BusDevice::read(&mut self.dev, off, &mut d[..len]);
        u64::from_le_bytes(d)
    }
    fn bar_w(&mut self, off: u64, v: u64, len: usize) {
        BusDevice::write(&mut self.dev, off, &v.to_le_bytes()[..len]);
    }
    fn status(&mut self) -> u8 {
        self.bar_r(0x14, 1) as u8
    }

    /// Finds the MSI-X capability and the virtio capabilities by walking the list.
    fn caps(&mut self) -> (usize, Vec<(u8, u32, u32)>) {
        let mut msix = 0;
        let mut virtio = Vec::new();
        let mut p = (self.cfg_r(0x34) & 0xff) as usize;
        while p != 0 {
            let h = self.cfg_r(p);
            match h & 0xff {
                0x11 => msix = p,
                0x09 => {
                    let ty = (h >> 24) as u8;
                    virtio.push((ty, self.cfg_r(p + 8), self.cfg_r(p + 12)));
                }
                other => panic!("unexpected capability {other:#x}"),
            }
            p = ((h >> 8) & 0xff) as usize;
        }
        (msix, virtio)
    }

    /// The Linux-like initialisation sequence; returns the negotiated features.
    fn init(&mut self, want: u64) -> u64 {
        let (msix, _) = self.caps();
        self.cfg_w(4, 0x6); // memory + bus master
        self.cfg_w(msix, 1 << 31); // MSI-X enable
        for v in 0..self.irqs.len() as u64 {
            let e = MSIX_TABLE_OFFSET + v * 16;
            self.bar_w(e, 0xfee0_0000, 4);
            self.bar_w(e + 8, 0x30 + v, 4);
            self.bar_w(e + 12, 0, 4); // unmask
        }
        self.bar_w(0x14, 0, 1);
        self.bar_w(0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
        let mut offered = 0;
        for sel in 0..2 {
            self.bar_w(0, sel, 4);
            offered |= self.bar_r(4, 4) << (32 * sel);
        }
        let features = offered & want;
        for sel in 0..2 {
            self.bar_w(8, sel, 4);
            self.bar_w(0xc, features >> (32 * sel) & 0xffff_ffff, 4);
        }
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.bar_w(0x14, u64::from(s), 1);
        assert_eq!(self.status(), s);
        self.bar_w(0x10, 0, 2); // config vector 0
        for i in 0..self.qs.len() {
            self.setup_queue(i);
        }
        self.bar_w(0x14, u64::from(s | STATUS_DRIVER_OK), 1);
        features
    }

    fn setup_queue(&mut self, i: usize) {
        let (desc, avail, used) = (self.qs[i].desc, self.qs[i].avail, self.qs[i].used);
        self.bar_w(0x16, i as u64, 2);
        assert_eq!(self.bar_r(0x18, 2), u64::from(QSIZE));
        assert_eq!(self.bar_r(0x1e, 2), i as u64, "queue_notify_off");
        self.bar_w(0x18, u64::from(QSIZE), 2);
        self.bar_w(0x1a, i as u64 + 1, 2);
        assert_eq!(self.bar_r(0x1a, 2), i as u64 + 1);
        // 64-bit addresses both as one access and as halves.
        self.bar_w(0x20, desc, 8);
        self.bar_w(0x28, avail, 4);
        self.bar_w(0x2c, 0, 4);
        self.bar_w(0x30, used, 4);
        self.bar_w(0x34, 0, 4);
        self.bar_w(0x1c, 1, 2);
        assert_eq!(self.bar_r(0x20, 8), desc);
        assert_eq!(self.bar_r(0x28, 8), avail);
        assert_eq!(self.bar_r(0x30, 8), used);
        for q in &mut self.qs[i..=i] {
            q.next_desc = 0;
            q.avail_idx = 0;
        }
        self.mem.write_obj(0u16, GuestAddress(avail + 2)).unwrap();
        self.mem.write_obj(0u16, GuestAddress(used + 2)).unwrap();
    }

    fn put_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = table + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(d)).unwrap();
        self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
    }

    /// Puts a chain of `(addr, len, flags)` in the table and makes it available.
    fn submit(&mut self, q: usize, bufs: &[(u64, u32, u16)]) -> u16 {
        let head = self.qs[q].next_desc;
        let n = bufs.len() as u16;
        for (k, &(addr, len, flags)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % QSIZE;
            let last = k as u16 + 1 == n;
            let flags = flags | if last { 0 } else { F_NEXT };
            self.put_desc(self.qs[q].desc, i, addr, len, flags, (i + 1) % QSIZE);
        }
        self.qs[q].next_desc = (head + n) % QSIZE;
        self.push_avail(q, head);
        head
    }

    fn push_avail(&mut self, q: usize, head: u16) {
        let Q {
            avail, avail_idx, ..
        } = self.qs[q];
        let slot = avail + 4 + 2 * u64::from(avail_idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.qs[q].avail_idx = avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.qs[q].avail_idx, GuestAddress(avail + 2))
            .unwrap();
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.qs[q].used + 2))
            .unwrap()
    }

    fn used_elem(&self, q: usize, idx: u16) -> (u32, u32) {
        let e = self.qs[q].used + 4 + 8 * u64::from(idx % QSIZE);
        (
            self.mem.read_obj(GuestAddress(e)).unwrap(),
            self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
        )
    }

    fn write_header(&self, at: u64, ty: u32, sector: u64) {
        self.mem.write_obj(ty, GuestAddress(at)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    /// A request with data at `data` (written by the device when `ty` is
    /// IN or GET_ID); returns the status byte and the used length.
    fn req(&mut self, q: usize, ty: u32, sector: u64, data: u64, len: u32) -> (u8, u32) {
        let hdr = self.qs[q].scratch;
        let status = hdr + 0x100;
        self.write_header(hdr, ty, sector);
        self.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let dflags = if matches!(ty, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID) {
            F_WRITE
        } else {
            0
        };
        let mut bufs = vec![(hdr, 16, 0)];
        if len > 0 {
            bufs.push((data, len, dflags));
        }
        bufs.push((status, 1, F_WRITE));
        let head = self.submit(q, &bufs);
        let before = self.used_idx(q);
        self.serve(q, 1);
        let idx = self.used_idx(q);
        assert_eq!(idx, before.wrapping_add(1));
        let (id, used_len) = self.used_elem(q, before);
        assert_eq!(id, u32::from(head));
        (self.mem.read_obj(GuestAddress(status)).unwrap(), used_len)
    }

    /// Notifies queue `q` (the notify register, as without an ioeventfd) and
    /// waits until every request made available has completed (the last `n`
    /// of them made since the previous wait) and none is in flight. The
    /// device may take requests before the notification: it is free to.
    fn serve(&mut self, q: usize, n: u16) {
        let target = self.qs[q].avail_idx;
        assert!(
            target.wrapping_sub(self.used_idx(q)) <= n,
            "more requests outstanding than the {n} just made"
        );
        self.notify(q);
        let qs = self.dev.queues();
        let start = Instant::now();
        while !(self.used_idx(q) == target && qs.in_flight(q) == 0) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "timed out waiting for the requests to complete: used {} of {target}, {} in flight, status {:#x}, broken {}, avail idx {}",
                self.used_idx(q),
                qs.in_flight(q),
                qs.status(),
                qs.queue_broken(q),
                self.qs[q].avail_idx
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn notify(&mut self, q: usize) {
        self.bar_w(VirtioPciDevice::notify_offset(q as u16), q as u64, 2);
    }

    fn irq(&self, v: usize) -> usize {
        self.irqs[v].0.load(Ordering::SeqCst)
    }

    fn fill(&self, at: u64, len: usize, seed: u8) -> Vec<u8> {
        let v: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
        self.mem.write_slice(&v, GuestAddress(at)).unwrap();
        v
    }

    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }
}

const ALL: u64 = !0;
const DISK: usize = 1 << 20;

#[test]
fn pci_config_bar_and_negotiation() {
    let mut g = Guest::new(MemNode::new(DISK, false), 2);
    assert_eq!(g.cfg_r(0), 0x1042_1af4);
    assert_eq!(g.cfg_r(8) >> 8, 0x01_80_00);
    assert_eq!(g.cfg_r(8) & 0xff, 1, "modern revision");
    // BAR sizing: 64-bit non-prefetchable memory of BAR_SIZE.
    assert_eq!(g.cfg_r(0x10), BAR_ADDR as u32 | 0b100);
    g.cfg_w(0x10, !0);
    g.cfg_w(0x14, !0);
    assert_eq!(g.cfg_r(0x10), !(BAR_SIZE as u32 - 1) | 0b100);
    assert_eq!(g.cfg_r(0x14), !0);
    g.cfg_w(0x10, 0x4000_0000);
    g.cfg_w(0x14, 0x1);
    let r = g.dev.bar_regions();
    assert_eq!((r[0].addr, r[0].size), (0x1_4000_0000, BAR_SIZE));

    let (msix, caps) = g.caps();
    assert!(msix != 0);
    assert_eq!(g.cfg_r(msix) >> 16 & 0x7ff, 2, "3 vectors");
    assert_eq!(g.cfg_r(msix + 4), MSIX_TABLE_OFFSET as u32);
    assert_eq!(g.cfg_r(msix + 8), MSIX_PBA_OFFSET as u32);
    let mut types: Vec<_> = caps.iter().map(|c| (c.0, c.1)).collect();
    types.sort();
    assert_eq!(
        types,
        [
            (1, COMMON_CFG_OFFSET as u32),
            (2, NOTIFY_OFFSET as u32),
            (3, ISR_OFFSET as u32),
            (4, DEVICE_CFG_OFFSET as u32)
        ]
    );

    // Features: refused without VERSION_1 or with bits not offered.
    g.bar_w(0x14, 3, 1);
    g.bar_w(8, 1, 4);
    g.bar_w(0xc, 0, 4);
    g.bar_w(0x14, 3 | 8, 1);
    assert_eq!(g.status() & STATUS_FEATURES_OK, 0);
    g.bar_w(0x14, 0, 1);
    g.bar_w(0x14, 3, 1);
    g.bar_w(8, 1, 4);
    g.bar_w(0xc, 1 | 1 << 8, 4);
    g.bar_w(0x14, 3 | 8, 1);
    assert_eq!(g.status() & STATUS_FEATURES_OK, 0);

    let f = g.init(ALL);
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_F_RING_INDIRECT_DESC,
        VIRTIO_F_RING_EVENT_IDX,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_CONFIG_WCE,
    ] {
        assert!(f & 1 << bit != 0, "feature {bit}");
    }
    assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);
    assert_eq!(g.dev.queues().driver_features(), f);
    assert_eq!(g.bar_r(0x12, 2), 2, "num_queues");
    // Queue select beyond the queues reads size 0.
    g.bar_w(0x16, 7, 2);
    assert_eq!(g.bar_r(0x18, 2), 0);
    // A vector beyond the table reads back as NO_VECTOR.
    g.bar_w(0x10, 9, 2);
    assert_eq!(g.bar_r(0x10, 2), u64::from(VIRTIO_MSI_NO_VECTOR));

    // Device configuration.
    let d = DEVICE_CFG_OFFSET;
    assert_eq!(g.bar_r(d, 8), (DISK / 512) as u64);
    assert_eq!(g.bar_r(d + 0xc, 4), u64::from(QSIZE) - 2, "seg_max");
    assert_eq!(g.bar_r(d + 0x14, 4), 512, "blk_size");
    assert_eq!(g.bar_r(d + 0x18, 1), 3, "physical_block_exp");
    assert_eq!(g.bar_r(d + 0x1a, 2), 8, "min_io_size");
    assert_eq!(g.bar_r(d + 0x20, 1), 1, "writeback");
    assert_eq!(g.bar_r(d + 0x22, 2), 2, "num_queues");
    assert_eq!(g.bar_r(d + 0x24, 4), u64::from(MAX_DISCARD_SECTORS));
    assert_eq!(g.bar_r(d + 0x28, 4), 1, "max_discard_seg");
    assert_eq!(g.bar_r(d + 0x34, 4), 1, "max_write_zeroes_seg");

    // Read-only node: RO offered.
    let g = Guest::new(MemNode::new(DISK, true), 1);
    assert!(g.dev.offered_features() & 1 << VIRTIO_BLK_F_RO != 0);
}

#[test]
fn each_request_type() {
    let mut g = Guest::new(MemNode::new(DISK, false), 1);
    g.init(ALL);
    // OUT then IN, with the data buffer straddling the two memory regions.
    let buf = MEM_REGION - 0x600;
    let pattern = g.fill(buf, 0x1000, 0x5a);
    assert_eq!(g.req(0, VIRTIO_BLK_T_OUT, 8, buf, 0x1000), (0, 1));
    assert_eq!(&g.node.data.lock().unwrap()[4096..8192], &pattern[..]);
    let other = 0x8_0000;
    assert_eq!(g.req(0, VIRTIO_BLK_T_IN, 8, other, 0x1000), (0, 0x1001));
    assert_eq!(g.read(other, 0x1000), pattern);
    // EVENT_IDX with used_event left at 0: only the first completion interrupts.
    assert_eq!(g.irq(1), 1, "queue vector fired");
    assert_eq!(g.irq(0), 0);

    // FLUSH.
    assert_eq!(g.req(0, VIRTIO_BLK_T_FLUSH, 0, 0, 0), (0, 1));
    assert_eq!(g.node.flushes.load(Ordering::SeqCst), 1);
    // GET_ID.
    assert_eq!(g.req(0, VIRTIO_BLK_T_GET_ID, 0, other, 20), (0, 21));
    assert_eq!(&g.read(other, 20)[..14], b"cryptvm-disk-0");
    assert_eq!(g.read(other, 20)[14..], [0; 6]);

    // WRITE_ZEROES and DISCARD take one 16-byte segment.
    let seg = 0x9_0000;
    for ty in [VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD] {
        g.fill(other, 0x1000, 1);
        g.req(0, VIRTIO_BLK_T_OUT, 8, other, 0x1000);
        g.mem.write_obj(9u64, GuestAddress(seg)).unwrap();
        g.mem.write_obj(2u32, GuestAddress(seg + 8)).unwrap();
        g.mem.write_obj(0u32, GuestAddress(seg + 12)).unwrap();
        assert_eq!(g.req(0, ty, 0, seg, 16), (0, 1));
        let d = g.node.data.lock().unwrap().clone();
        assert!(d[9 * 512..11 * 512].iter().all(|&b| b == 0));
        assert!(d[8 * 512..9 * 512].iter().any(|&b| b != 0));
        assert!(d[11 * 512..12 * 512].iter().any(|&b| b != 0));
    }
    // The unmap flag is not allowed on DISCARD.
    g.mem.write_obj(1u32, GuestAddress(seg + 12)).unwrap();
    assert_eq!(
        g.req(0, VIRTIO_BLK_T_DISCARD, 0, seg, 16).0,
        VIRTIO_BLK_S_UNSUPP
    );
    // Unknown request type.
    assert_eq!(g.req(0, 99, 0, 0, 0).0, VIRTIO_BLK_S_UNSUPP);

    // Write-through (CONFIG_WCE): every write is followed by a flush.
    g.bar_w(DEVICE_CFG_OFFSET + 0x20, 0, 1);
    assert_eq!(g.bar_r(DEVICE_CFG_OFFSET + 0x20, 1), 0);
    let flushes = g.node.flushes.load(Ordering::SeqCst);
    g.req(0, VIRTIO_BLK_T_OUT, 0, other, 512);
    assert_eq!(g.node.flushes.load(Ordering::SeqCst), flushes + 1);

    // Node errors become IOERR for that request only.
    g.node.fail.store(true, Ordering::SeqCst);
    assert_eq!(
        g.req(0, VIRTIO_BLK_T_IN, 0, other, 512).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(g.req(0, VIRTIO_BLK_T_FLUSH, 0, 0, 0).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(
        *g.errors.lock().unwrap(),
        [IoOperation::Read, IoOperation::Write],
        "each node error is reported once, with its direction"
    );
    g.node.fail.store(false, Ordering::SeqCst);
    assert_eq!(g.req(0, VIRTIO_BLK_T_IN, 0, other, 512).0, VIRTIO_BLK_S_OK);

    // A read-only node refuses writes, discards and zeroing.
    let mut g = Guest::new(MemNode::new(DISK, true), 1);
    let f = g.init(ALL);
    assert!(f & 1 << VIRTIO_BLK_F_RO != 0);
    g.fill(0x8_0000, 512, 3);
    assert_eq!(
        g.req(0, VIRTIO_BLK_T_OUT, 0, 0x8_0000, 512).0,
        VIRTIO_BLK_S_IOERR
    );
    assert!(g.node.data.lock().unwrap().iter().all(|&b| b == 0));
    assert_eq!(
        g.req(0, VIRTIO_BLK_T_IN, 0, 0x8_0000, 512).0,
        VIRTIO_BLK_S_OK
    );
}

#[test]
fn multiqueue_indirect_and_msix_masking() {
    let mut g = Guest::new(MemNode::new(DISK, false), 2);
    g.init(ALL & !(1 << VIRTIO_F_RING_EVENT_IDX));
    let a = g.fill(0x8_0000, 1024, 1);
    let b = g.fill(0x9_0000, 1024, 2);
    assert_eq!(g.req(0, VIRTIO_BLK_T_OUT, 0, 0x8_0000, 1024).0, 0);
    assert_eq!(g.req(1, VIRTIO_BLK_T_OUT, 2, 0x9_0000, 1024).0, 0);
    assert_eq!((g.irq(1), g.irq(2)), (1, 1));

    // Queues served from two threads at once.
    let qs = g.dev.queues();
    for q in 0..2 {
        let hdr = g.qs[q].scratch;
        g.write_header(hdr, VIRTIO_BLK_T_IN, q as u64 * 2);
        g.submit(
            q,
            &[
                (hdr, 16, 0),
                (0xa_0000 + q as u64 * 0x1000, 1024, F_WRITE),
                (hdr + 0x100, 1, F_WRITE),
            ],
        );
    }
    // Both queues notified at once: each has its own thread.
    g.notify(0);
    g.notify(1);
    wait_until("both queues", || {
        g.used_idx(0) == 2 && g.used_idx(1) == 2 && qs.in_flight(0) + qs.in_flight(1) == 0
    });
    assert_eq!(g.read(0xa_0000, 1024), a);
    assert_eq!(g.read(0xa_1000, 1024), b);

    // An indirect chain: header, data in two pieces, status.
    let table = 0xb_0000;
    let hdr = 0xb_1000;
    g.write_header(hdr, VIRTIO_BLK_T_IN, 0);
    g.put_desc(table, 0, hdr, 16, F_NEXT, 1);
    g.put_desc(table, 1, 0xc_0000, 512, F_WRITE | F_NEXT, 2);
    g.put_desc(table, 2, 0xc_1000, 512, F_WRITE | F_NEXT, 3);
    g.put_desc(table, 3, hdr + 0x100, 1, F_WRITE, 0);
    g.submit(0, &[(table, 64, F_INDIRECT)]);
    g.serve(0, 1);
    let n = g.used_idx(0);
    assert_eq!(g.used_elem(0, n - 1).1, 1025);
    assert_eq!(g.read(0xc_0000, 512), a[..512]);
    assert_eq!(g.read(0xc_1000, 512), a[512..]);
    assert_eq!(g.mem.read_obj::<u8>(GuestAddress(hdr + 0x100)).unwrap(), 0);

    // Masked vector: the interrupt waits in the PBA until unmasked.
    let irqs = g.irq(1);
    g.bar_w(MSIX_TABLE_OFFSET + 16 + 12, 1, 4);
    g.req(0, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
    assert_eq!(g.irq(1), irqs);
    assert_eq!(g.bar_r(MSIX_PBA_OFFSET, 8), 0b10);
    g.bar_w(MSIX_TABLE_OFFSET + 16 + 12, 0, 4);
    assert_eq!(g.irq(1), irqs + 1);
    assert_eq!(g.bar_r(MSIX_PBA_OFFSET, 8), 0);
    let e = g.dev.queues().msix_entry(1).unwrap();
    assert_eq!((e.addr, e.data, e.masked()), (0xfee0_0000, 0x31, false));
}

#[test]
fn event_idx_suppression() {
    let mut g = Guest::new(MemNode::new(DISK, false), 1);
    let f = g.init(ALL);
    assert!(f & 1 << VIRTIO_F_RING_EVENT_IDX != 0);
    let used_event = GuestAddress(g.qs[0].avail + 4 + 2 * u64::from(QSIZE));
    let avail_event = GuestAddress(g.qs[0].used + 4 + 8 * u64::from(QSIZE));
    // used_event = 0: the first completion (used idx 0 -> 1) interrupts.
    g.mem.write_obj(0u16, used_event).unwrap();
    g.req(0, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
    assert_eq!(g.irq(1), 1);
    // The queue thread asks for the next notification once the ring is empty.
    wait_until("avail_event 1", || {
        g.mem.read_obj::<u16>(avail_event).unwrap() == 1
    });
    // The driver asks for an interrupt only after the 4th completion.
    g.mem.write_obj(3u16, used_event).unwrap();
    g.req(0, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
    g.req(0, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
    assert_eq!(g.irq(1), 1, "suppressed");
    g.req(0, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
    assert_eq!(g.irq(1), 2);
    // Two requests in one notification: one interrupt when used_event is crossed.
    g.mem.write_obj(4u16, used_event).unwrap();
    for _ in 0..2 {
        let hdr = g.qs[0].scratch;
        g.write_header(hdr, VIRTIO_BLK_T_FLUSH, 0);
        g.submit(0, &[(hdr, 16, 0), (hdr + 0x100, 1, F_WRITE)]);
    }
    g.serve(0, 2);
    assert_eq!(g.irq(1), 3);
    wait_until("avail_event 6", || {
        g.mem.read_obj::<u16>(avail_event).unwrap() == 6
    });

    // Without EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT suppresses.
    let mut g = Guest::new(MemNode::new(DISK, false), 1);
    g.init(ALL & !(1 << VIRTIO_F_RING_EVENT_IDX));
    g.mem.write_obj(1u16, GuestAddress(g.qs[0].avail)).unwrap();
    g.req(0, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
    assert_eq!(g.irq(1), 0);
    g.mem.write_obj(0u16, GuestAddress(g.qs[0].avail)).unwrap();
    g.req(0, VIRTIO_BLK_T_FLUSH, 0, 0, 0);
    assert_eq!(g.irq(1), 1);
}

/// Requests the device answers with IOERR while the queue keeps working.
#[test]
fn hostile_requests_get_ioerr() {
    let mut g = Guest::new(MemNode::new(DISK, false), 1);
    g.init(ALL);
    let sectors = (DISK / 512) as u64;
    let buf = 0x8_0000;
    // Out-of-range sectors, including ones whose byte offset overflows.
    for (ty, sector) in [
        (VIRTIO_BLK_T_IN, sectors),
        (VIRTIO_BLK_T_OUT, sectors - 1),
        (VIRTIO_BLK_T_IN, u64::MAX),
        (VIRTIO_BLK_T_OUT, u64::MAX / 256),
    ] {
        assert_eq!(g.req(0, ty, sector, buf, 1024).0, VIRTIO_BLK_S_IOERR);
    }
    // Data buffers outside guest memory, or of a huge length.
    assert_eq!(
        g.req(0, VIRTIO_BLK_T_IN, 0, 0x4000_0000, 512).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        g.req(0, VIRTIO_BLK_T_OUT, 0, MEM_REGION * 2 - 512, 1024).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        g.req(0, VIRTIO_BLK_T_IN, 0, buf, 0xffff_fe00).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        g.req(0, VIRTIO_BLK_T_IN, 0, buf, 100).0,
        VIRTIO_BLK_S_IOERR,
        "not sectors"
    );
    // A discard beyond the end.
    let seg = 0x9_0000;
    g.mem.write_obj(sectors - 1, GuestAddress(seg)).unwrap();
    g.mem.write_obj(2u32, GuestAddress(seg + 8)).unwrap();
    g.mem.write_obj(0u32, GuestAddress(seg + 12)).unwrap();
    assert_eq!(
        g.req(0, VIRTIO_BLK_T_DISCARD, 0, seg, 16).0,
        VIRTIO_BLK_S_IOERR
    );
    // A header shorter than 16 bytes.
    let hdr = g.qs[0].scratch;
    g.submit(0, &[(hdr, 8, 0), (hdr + 0x100, 1, F_WRITE)]);
    g.serve(0, 1);
    assert_eq!(g.mem.read_obj::<u8>(GuestAddress(hdr + 0x100)).unwrap(), 1);
    assert!(g.node.data.lock().unwrap().iter().all(|&b| b == 0));
    // The queue still works.
    assert_eq!(g.req(0, VIRTIO_BLK_T_IN, 0, buf, 512).0, VIRTIO_BLK_S_OK);
    assert_eq!(g.status() & STATUS_DEVICE_NEEDS_RESET, 0);
}

/// Data descriptors whose lengths sum past 4 GiB (0xffff_fe00 + 0x400: 0x200 if the sum
/// wrapped in a u32) are not taken for a small request: the guest gets no OK and the
/// disk is not touched (issue 12).
#[test]
fn data_lengths_that_wrap_a_u32_are_refused() {
    for ty in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        let mut g = Guest::new(MemNode::new(DISK, false), 1);
        g.init(ALL);
        let hdr = g.qs[0].scratch;
        let status = hdr + 0x100;
        g.write_header(hdr, ty, 0);
        g.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        let data_flags = if ty == VIRTIO_BLK_T_IN { F_WRITE } else { 0 };
        g.submit(
            0,
            &[
                (hdr, 16, 0),
                (0x8_0000, 0xffff_fe00, data_flags),
                (0x8_0000, 0x400, data_flags),
                (status, 1, F_WRITE),
            ],
        );
        g.notify(0);
        // Either answered (IOERR) or the queue is refused as broken: never served.
        let qs = g.dev.queues();
        wait_until("the wrapped request", || {
            qs.queue_broken(0) || g.used_idx(0) == 1
        });
        let got = g.mem.read_obj::<u8>(GuestAddress(status)).unwrap();
        assert_ne!(
            got, VIRTIO_BLK_S_OK,
            "type {ty}: the wrapped request was served"
        );
        assert!(g.node.data.lock().unwrap().iter().all(|&b| b == 0));
    }
}

/// Protocol violations stop the queue and ask for a reset; the device
/// recovers after one.
#[test]
fn hostile_chains_break_the_queue() {
    type Attack = fn(&mut Guest);
    let attacks: [(&str, Attack); 7] = [
        ("loop", |g| {
            let hdr = g.qs[0].scratch;
            g.write_header(hdr, VIRTIO_BLK_T_IN, 0);
            g.put_desc(g.qs[0].desc, 0, hdr, 16, F_NEXT, 1);
            g.put_desc(g.qs[0].desc, 1, 0x8_0000, 512, F_NEXT | F_WRITE, 0);
            g.push_avail(0, 0);
        }),
        ("indirect chain longer than its table", |g| {
            let t = 0xb_0000;
            for i in 0..4 {
                g.put_desc(t, i, 0x8_0000, 512, F_NEXT | F_WRITE, i + 1);
            }
            g.submit(0, &[(t, 64, F_INDIRECT)]);
        }),
        ("indirect table outside memory", |g| {
            g.submit(0, &[(0x4000_0000, 64, F_INDIRECT)]);
        }),
        ("read-only status", |g| {
            let hdr = g.qs[0].scratch;
            g.write_header(hdr, VIRTIO_BLK_T_FLUSH, 0);
            g.submit(0, &[(hdr, 16, 0), (hdr + 0x100, 1, 0)]);
        }),
        ("head index beyond the queue", |g| {
            g.push_avail(0, QSIZE + 3)
        }),
        ("avail index far ahead", |g| {
            let avail = g.qs[0].avail;
            g.mem.write_obj(QSIZE + 5, GuestAddress(avail + 2)).unwrap();
        }),
        ("status outside memory", |g| {
            let hdr = g.qs[0].scratch;
            g.write_header(hdr, VIRTIO_BLK_T_FLUSH, 0);
            g.submit(0, &[(hdr, 16, 0), (0x4000_0000, 1, F_WRITE)]);
        }),
    ];
    for (name, attack) in attacks {
        let mut g = Guest::new(MemNode::new(DISK, false), 2);
        g.init(ALL);
        attack(&mut g);
        g.notify(0);
        let qs = g.dev.queues();
        wait_until(name, || qs.queue_broken(0) && g.irq(0) == 1);
        assert!(g.status() & STATUS_DEVICE_NEEDS_RESET != 0, "{name}");
        assert_eq!(g.irq(0), 1, "{name}: config interrupt");
        assert_eq!(g.bar_r(ISR_OFFSET, 1), 2, "{name}: ISR config bit");
        assert_eq!(g.bar_r(ISR_OFFSET, 1), 0, "{name}: ISR clears on read");
        // Nothing more is served until reset, on any queue.
        let used = g.used_idx(0);
        g.notify(0);
        let hdr = g.qs[1].scratch;
        g.write_header(hdr, VIRTIO_BLK_T_FLUSH, 0);
        g.submit(1, &[(hdr, 16, 0), (hdr + 0x100, 1, F_WRITE)]);
        g.notify(1);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!((g.used_idx(0), g.used_idx(1)), (used, 0), "{name}");
        // Reset and re-initialise: the device works again.
        g.init(ALL);
        assert!(!g.dev.queues().queue_broken(0));
        assert_eq!(g.req(0, VIRTIO_BLK_T_FLUSH, 0, 0, 0), (0, 1), "{name}");
    }

    // Rings outside guest memory are refused at DRIVER_OK.
    let mut g = Guest::new(MemNode::new(DISK, false), 1);
    g.qs[0].used = 2 * MEM_REGION - 0x10;
    g.init(ALL);
    assert!(g.status() & STATUS_DEVICE_NEEDS_RESET != 0);
    let hdr = g.qs[0].scratch;
    g.write_header(hdr, VIRTIO_BLK_T_FLUSH, 0);
    g.submit(0, &[(hdr, 16, 0), (hdr + 0x100, 1, F_WRITE)]);
    g.notify(0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.dev.queues().in_flight(0), 0, "nothing served");
    assert_eq!(g.node.flushes.load(Ordering::SeqCst), 0, "nothing served");
}

/// A request whose handler panics (a block layer bug) fails with IOERR, the
/// device asks for a reset (status bit and configuration interrupt) and says
/// why once; until the reset every request fails at once instead of hanging.
/// The shared workers and another device go on; after the reset the device
/// works again.
#[test]
fn a_panicking_request_fails_safe() {
    let mut g = Guest::new(MemNode::new(DISK, false), 2);
    let mut other = Guest::with_pool(MemNode::new(DISK, false), 1, g.pool.clone());
    g.init(ALL);
    other.init(ALL);
    let buf = 0x8_0000;
    g.fill(buf, 4096, 3);
    assert_eq!(g.req(0, VIRTIO_BLK_T_OUT, 0, buf, 4096).0, VIRTIO_BLK_S_OK);

    g.node.panics.store(true, Ordering::SeqCst);
    assert_eq!(
        g.req(0, VIRTIO_BLK_T_OUT, 8, buf, 4096).0,
        VIRTIO_BLK_S_IOERR
    );
    wait_until("the configuration interrupt", || g.irq(0) == 1);
    assert!(g.status() & STATUS_DEVICE_NEEDS_RESET != 0);
    assert!(g.bar_r(ISR_OFFSET, 1) & 2 != 0, "ISR: configuration change");
    // Every later request, on any queue, fails at once.
    for q in [1, 0, 1] {
        assert_eq!(g.req(q, VIRTIO_BLK_T_IN, 0, buf, 512).0, VIRTIO_BLK_S_IOERR);
    }
    let faults = g.faults.lock().unwrap().clone();
    assert_eq!(faults.len(), 1, "reported once: {faults:?}");
    assert!(
        faults[0].contains("injected block layer bug") && faults[0].contains("reset"),
        "{faults:?}"
    );

    // The workers survived: another device on them is served.
    other.fill(buf, 4096, 9);
    assert_eq!(
        other.req(0, VIRTIO_BLK_T_OUT, 0, buf, 4096).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        other.req(0, VIRTIO_BLK_T_IN, 0, buf, 4096).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(other.status() & STATUS_DEVICE_NEEDS_RESET, 0);

    // The guest resets the device (the bug is gone): it works again.
    g.node.panics.store(false, Ordering::SeqCst);
    g.init(ALL);
    assert_eq!(g.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(g.req(1, VIRTIO_BLK_T_IN, 0, buf, 4096).0, VIRTIO_BLK_S_OK);
    assert_eq!(g.read(buf, 4096)[..16], g.node.data.lock().unwrap()[..16]);
}

#[test]
fn bad_properties_are_refused() {
    let node: ::block::NodeRef = MemNode::new(DISK, false);
    for cfg in [
        BlockConfig {
            num_queues: 0,
            ..Default::default()
        },
        BlockConfig {
            queue_size: 100,
            ..Default::default()
        },
        BlockConfig {
            logical_block_size: 1000,
            ..Default::default()
        },
        BlockConfig {
            logical_block_size: 4096,
            physical_block_size: 512,
            ..Default::default()
        },
        BlockConfig {
            serial: "x".repeat(21),
            ..Default::default()
        },
    ] {
        assert!(VirtioBlock::new(node.clone(), cfg).is_err());
    }
}

/// One check of the properties, with QEMU's limits and words: num-queues up
/// to what the PCI transport has vectors for (511), queue-size a power of
/// two in 4..=1024.
#[test]
fn property_limits_are_checked_once_with_qemu_words() {
    use crate::virtio::block::{BlockConfigError, MAX_QUEUES};
    let cfg = |nq: u16, qs: u16| BlockConfig {
        num_queues: nq,
        queue_size: qs,
        ..Default::default()
    };
    assert_eq!(MAX_QUEUES, 511);
    assert_eq!(cfg(MAX_QUEUES, 1024).validate(), Ok(()));
    assert_eq!(cfg(1, 4).validate(), Ok(()));
    assert_eq!(
        cfg(MAX_QUEUES + 1, 256).validate(),
        Err(BlockConfigError::NumQueues(512))
    );
    assert_eq!(
        cfg(0, 256).validate().unwrap_err().to_string(),
        "num-queues property doesn't take value 0 (minimum: 1, maximum: 511)"
    );
    assert_eq!(
        cfg(1, 2048).validate().unwrap_err().to_string(),
        "invalid queue-size property (2048), must be a power of 2 (max 1024)"
    );
    assert_eq!(
        cfg(1, 2).validate().unwrap_err().to_string(),
        "invalid queue-size property (2), must be > 2"
    );
    assert_eq!(cfg(1, 100).validate().unwrap_err().property(), "queue-size");
    let node: ::block::NodeRef = MemNode::new(DISK, false);
    assert!(matches!(
        VirtioBlock::new(node, cfg(600, 256)),
        Err(crate::virtio::VirtioError::BlockConfig(
            BlockConfigError::NumQueues(600)
        ))
    ));
}

/// Requests made available together are served concurrently and each
/// completes with its own status and data.
#[test]
fn a_batch_of_requests_completes_each_one() {
    let mut g = Guest::new(MemNode::new(DISK, false), 1);
    g.init(ALL);
    // Five 3-descriptor writes fill 15 of the 16 descriptors.
    let n = 5u64;
    let mut heads = Vec::new();
    let mut want = Vec::new();
    for i in 0..n {
        let hdr = 0x4_0000 + i * 0x100;
        let data = 0x5_0000 + i * 0x1000;
        let status = 0x6_0000 + i;
        g.write_header(hdr, VIRTIO_BLK_T_OUT, i * 8);
        g.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
        want.push(g.fill(data, 4096, i as u8 + 1));
        heads.push(g.submit(0, &[(hdr, 16, 0), (data, 4096, 0), (status, 1, F_WRITE)]));
    }
    g.serve(0, n as u16);
    assert_eq!(g.used_idx(0), n as u16);
    let used: Vec<u32> = (0..n as u16).map(|k| g.used_elem(0, k).0).collect();
    let mut expect: Vec<u32> = heads.iter().map(|&h| u32::from(h)).collect();
    expect.sort();
    let mut got = used.clone();
    got.sort();
    assert_eq!(got, expect, "every head completes exactly once");
    for i in 0..n {
        let status: u8 = g.mem.read_obj(GuestAddress(0x6_0000 + i)).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_OK, "request {i}");
        let on_disk = g.node.data.lock().unwrap()[(i * 8 * 512) as usize..][..4096].to_vec();
        assert!(on_disk == want[i as usize], "request {i} data");
    }
    assert_eq!(g.irq(1), 1, "one interrupt for the whole batch");
}

/// A read whose data descriptors overlap in guest memory (only a hostile
/// driver does this) is served one slice at a time: it completes, and the
/// buffer holds the later sector, as a device writing in order leaves it.
#[test]
fn overlapping_read_buffers_are_served_safely() {
    let node = MemNode::new(DISK, false);
    node.data.lock().unwrap()[..1024]
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = if i < 512 { 0x11 } else { 0x22 });
    let mut g = Guest::new(node, 1);
    g.init(ALL);
    let hdr = g.qs[0].scratch;
    let status = hdr + 0x100;
    g.write_header(hdr, VIRTIO_BLK_T_IN, 0);
    g.submit(
        0,
        &[
            (hdr, 16, 0),
            (0x7_0000, 512, F_WRITE),
            (0x7_0000, 512, F_WRITE),
            (status, 1, F_WRITE),
        ],
    );
    g.serve(0, 1);
    let st: u8 = g.mem.read_obj(GuestAddress(status)).unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(g.read(0x7_0000, 512), vec![0x22; 512]);
    assert_eq!(
        g.used_elem(0, 0).1,
        1024 + 1,
        "used length: data and status"
    );
}
