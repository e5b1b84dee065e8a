//! A guest that tries to make the VMM allocate without bound or to stall
//! other work behind one busy queue.
//!
//! Bounds shown here (also in docs/disks.md):
//! - one request of 254 descriptors all pointing at the same 1 MiB guest
//!   buffer (a 254 MiB write) raises the VMM's peak RSS by at most a few
//!   bounce buffers (1 MiB each) per worker, not by the request's length;
//! - while one queue has a backlog of 2 s of slow requests on a single
//!   worker, configuration reads answer at once (they never wait for a
//!   request) and another queue's request completes after at most the one
//!   request already running plus its own (asserted: config reads under
//!   250 ms, the other queue's request under 10 request times, against a
//!   backlog of 42 requests of 50 ms).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use block::{BlockNode, NodeRef};
use common::{
    make_images, open_stack, publish, put_desc, ring, used_idx, write_header, Device, F_INDIRECT,
    F_NEXT, F_WRITE, RINGS,
};
use devices::virtio::block::{BlockConfig, VIRTIO_BLK_T_OUT};
use devices::virtio::STATUS_DEVICE_NEEDS_RESET;
use devices::{BusDevice, WorkerPool};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The process's peak resident set (VmHWM) in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kib << 10
}

/// Restarts the peak (writing 5 to clear_refs resets VmHWM).
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("clear_refs");
}

#[test]
fn shared_page_descriptors_keep_memory_bounded() {
    const QSIZE: u16 = 256;
    const BUF: u64 = 1 << 20;
    const REQUESTS: usize = 4;
    const WORKERS: usize = 4;
    let segs = usize::from(QSIZE) - 2; // seg_max, as advertised
    let images = make_images(2 << 30, false);
    let (_graph, node) = open_stack(&images);
    let data = RINGS + 0x10_0000;
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (data + BUF) as usize)]).expect("memory");
    mem.write_slice(&vec![0x5a; BUF as usize], GuestAddress(data))
        .unwrap();
    let cfg = BlockConfig {
        queue_size: QSIZE,
        ..BlockConfig::default()
    };
    let pool = WorkerPool::new(WORKERS, "htest").expect("workers");
    let device = Device::new(&mem, node, cfg, pool);
    // Each request: an indirect table of header, 254 x the same 1 MiB
    // buffer, status.
    let mut avail_idx = 0;
    for r in 0..REQUESTS as u64 {
        let table = 0x8_0000 + r * 0x2000;
        let hdr = 0x4_0000 + r * 0x100;
        write_header(&mem, hdr, VIRTIO_BLK_T_OUT, r * (segs as u64 * BUF / 512));
        mem.write_obj(0xffu8, GuestAddress(hdr + 0x80)).unwrap();
        put_desc(&mem, table, 0, hdr, 16, F_NEXT, 1);
        for i in 1..=segs as u16 {
            put_desc(&mem, table, i, data, BUF as u32, F_NEXT, i + 1);
        }
        put_desc(&mem, table, segs as u16 + 1, hdr + 0x80, 1, F_WRITE, 0);
        put_desc(
            &mem,
            ring(0).0,
            r as u16,
            table,
            16 * (segs as u32 + 2),
            F_INDIRECT,
            0,
        );
        publish(&mem, 0, QSIZE, &mut avail_idx, r as u16);
    }
    reset_peak_rss();
    let before = peak_rss();
    device.queues.kick_eventfd(0).unwrap().write(1).unwrap();
    wait_until("the requests", Duration::from_secs(300), || {
        used_idx(&mem, 0) == REQUESTS as u16 && device.queues.in_flight(0) == 0
    });
    let growth = peak_rss().saturating_sub(before);
    for r in 0..REQUESTS as u64 {
        let status: u8 = mem
            .read_obj(GuestAddress(0x4_0000 + r * 0x100 + 0x80))
            .unwrap();
        assert_eq!(status, 0, "request {r}");
    }
    eprintln!(
        "{REQUESTS} requests of {segs} x 1 MiB on {WORKERS} workers: peak RSS grew by {} KiB",
        growth >> 10
    );
    // The old code gathered each whole request: 254 MiB per request.
    assert!(
        growth < 48 << 20,
        "peak RSS grew by {} MiB for requests that should need a few MiB",
        growth >> 20
    );
    assert_eq!(device.queues.status() & STATUS_DEVICE_NEEDS_RESET, 0);
}

/// An in-memory node whose writes take `delay` each (a slow disk).
struct SlowNode {
    data: Mutex<Vec<u8>>,
    delay: Duration,
    writes: AtomicUsize,
}

impl BlockNode for SlowNode {
    fn driver(&self) -> &'static str {
        "slow"
    }
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> block::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> block::Result<()> {
        std::thread::sleep(self.delay);
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + buf.len()].copy_from_slice(buf);
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn flush(&self) -> block::Result<()> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> block::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> block::Result<()> {
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + len as usize].fill(0);
        Ok(())
    }
}

#[test]
fn a_busy_queue_does_not_hold_up_config_reads_or_other_queues() {
    const QSIZE: u16 = 128;
    /// Requests queued on queue 0 (3 descriptors each fill the queue).
    const BACKLOG: u16 = QSIZE / 3;
    let delay = Duration::from_millis(50);
    let node = Arc::new(SlowNode {
        data: Mutex::new(vec![0; 8 << 20]),
        delay,
        writes: AtomicUsize::new(0),
    });
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (RINGS + 0x10_0000) as usize)])
        .expect("memory");
    let cfg = BlockConfig {
        num_queues: 2,
        queue_size: QSIZE,
        ..BlockConfig::default()
    };
    // One worker: the strictest case for fairness between queues.
    let pool = WorkerPool::new(1, "btest").expect("workers");
    let mut device = Device::new(&mem, node.clone() as NodeRef, cfg, pool);
    let buf = RINGS;
    let mut avail = [0u16; 2];
    // Three descriptors per request, at heads 3 * i.
    let submit3 = |q: usize, i: u16, avail: &mut u16| {
        let hdr = RINGS + 0x8_0000 + (q as u64 * 256 + u64::from(i)) * 0x20;
        write_header(&mem, hdr, VIRTIO_BLK_T_OUT, u64::from(i) * 8);
        let d = ring(q).0;
        let h = 3 * i;
        put_desc(&mem, d, h, hdr, 16, F_NEXT, h + 1);
        put_desc(&mem, d, h + 1, buf, 4096, F_NEXT, h + 2);
        put_desc(&mem, d, h + 2, hdr + 0x10, 1, F_WRITE, 0);
        publish(&mem, q, QSIZE, avail, h);
    };
    for i in 0..BACKLOG {
        submit3(0, i, &mut avail[0]);
    }
    let backlog = u64::from(avail[0]);
    device.queues.kick_eventfd(0).unwrap().write(1).unwrap();
    wait_until("the backlog to start", Duration::from_secs(10), || {
        node.writes.load(Ordering::SeqCst) > 0
    });

    // Configuration reads (what a vCPU does) while the queue is busy.
    let mut worst = Duration::ZERO;
    for _ in 0..50 {
        let t = Instant::now();
        BusDevice::write(&mut device.dev, 0x16, &0u16.to_le_bytes());
        let mut d = [0u8; 2];
        BusDevice::read(&mut device.dev, 0x18, &mut d);
        assert_eq!(u16::from_le_bytes(d), QSIZE);
        BusDevice::read(&mut device.dev, 0x1c, &mut d);
        assert_eq!(u16::from_le_bytes(d), 1, "queue enabled");
        let mut cap = [0u8; 8];
        BusDevice::read(
            &mut device.dev,
            devices::virtio::DEVICE_CFG_OFFSET,
            &mut cap,
        );
        assert_eq!(u64::from_le_bytes(cap), (8 << 20) / 512);
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(2));
    }
    // Another queue's request, on the one busy worker.
    let t = Instant::now();
    submit3(1, 0, &mut avail[1]);
    device.queues.kick_eventfd(1).unwrap().write(1).unwrap();
    wait_until("queue 1's request", Duration::from_secs(60), || {
        used_idx(&mem, 1) == 1
    });
    let other = t.elapsed();
    let left = backlog - u64::from(used_idx(&mem, 0));
    eprintln!(
        "backlog {backlog} x {delay:?} on queue 0: worst config read {worst:?}, queue 1's request {other:?} ({left} still queued)"
    );
    assert!(
        left > 10,
        "the backlog must still be there (it drained already)"
    );
    assert!(
        worst < Duration::from_millis(250),
        "a configuration read waited {worst:?} behind a busy queue"
    );
    assert!(
        other < delay * 10,
        "queue 1's request took {other:?} behind a {} s backlog",
        backlog * delay.as_millis() as u64 / 1000
    );
    wait_until("the backlog", Duration::from_secs(60), || {
        u64::from(used_idx(&mem, 0)) == backlog && device.queues.in_flight(0) == 0
    });
}

/// `serve_inline` (the fuzz target `virtio_blk_chain`'s way in) runs the queue's own
/// chain code: a request is served and completed, a looping chain is refused.
#[test]
fn inline_serving_serves_requests_and_refuses_loops() {
    use devices::virtio::block::VirtioBlock;
    use devices::virtio::queues::{serve_inline, RingLayout};
    use devices::virtio::ChainError;
    let node = Arc::new(SlowNode {
        data: Mutex::new(vec![0; 1 << 20]),
        delay: Duration::ZERO,
        writes: AtomicUsize::new(0),
    });
    let blk = VirtioBlock::new(node.clone(), BlockConfig::default()).expect("virtio-blk");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("memory");
    let ring = RingLayout {
        size: 16,
        desc: 0,
        avail: 0x1000,
        used: 0x2000,
        event_idx: false,
    };
    write_header(&mem, 0x3000, VIRTIO_BLK_T_OUT, 2);
    mem.write_slice(&[0x42; 512], GuestAddress(0x3100)).unwrap();
    put_desc(&mem, 0, 0, 0x3000, 16, F_NEXT, 1);
    put_desc(&mem, 0, 1, 0x3100, 512, F_NEXT, 2);
    put_desc(&mem, 0, 2, 0x3400, 1, F_WRITE, 0);
    mem.write_obj(0u16, GuestAddress(0x1004)).unwrap();
    mem.write_obj(1u16, GuestAddress(0x1002)).unwrap();
    assert_eq!(serve_inline(&blk, &mem, ring, 8), Ok(vec![(0, 1)]));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3400)).unwrap(), 0);
    assert_eq!(node.data.lock().unwrap()[1024..1536], [0x42; 512]);
    assert_eq!(node.writes.load(Ordering::SeqCst), 1);
    // Descriptor 3 points to itself.
    put_desc(&mem, 0, 3, 0x3000, 16, F_NEXT, 3);
    mem.write_obj(3u16, GuestAddress(0x1004)).unwrap();
    assert!(matches!(
        serve_inline(&blk, &mem, ring, 8),
        Err(ChainError::Malformed(_))
    ));
}
