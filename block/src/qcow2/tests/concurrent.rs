//! Concurrent allocating writes: one write parked inside its data I/O does
//! not hold up allocations elsewhere; writes to the same unallocated cluster
//! wait for each other; a failed data write links nothing; and many threads
//! of mixed requests agree with a reference, with qemu-img check and with
//! qemu's reading of the image.

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::json;

use super::*;
use crate::blockdev::Common;
use crate::node::NodeRef;
use crate::options::Opts;
use crate::BlockError;

/// How long a test waits for something that must happen (a hang guard,
/// not a timing assertion: it only ends a test that would otherwise hang).
const HANG_GUARD: Duration = Duration::from_secs(60);

/// What a [`GateNode`] does to writes that touch its host range.
#[derive(Clone, Copy, PartialEq, Eq)]
enum GateMode {
    /// Writes pass.
    Open,
    /// Writes wait until the gate opens.
    Block,
    /// The next write fails with an I/O error; the gate then opens.
    FailOnce,
}

struct GateState {
    range: (u64, u64),
    mode: GateMode,
    parked: usize,
}

/// A file node whose writes to a host range can be held back or failed,
/// and whose writes can all be slowed down (to widen the windows in which
/// requests overlap).
struct GateNode {
    inner: NodeRef,
    state: Mutex<GateState>,
    cv: Condvar,
    delay: Duration,
}

impl GateNode {
    fn new(inner: NodeRef, delay: Duration) -> Self {
        Self {
            inner,
            delay,
            state: Mutex::new(GateState {
                range: (0, 0),
                mode: GateMode::Open,
                parked: 0,
            }),
            cv: Condvar::new(),
        }
    }

    fn set(&self, lo: u64, hi: u64, mode: GateMode) {
        let mut s = self.state.lock().unwrap();
        s.range = (lo, hi);
        s.mode = mode;
        self.cv.notify_all();
    }

    fn open(&self) {
        self.state.lock().unwrap().mode = GateMode::Open;
        self.cv.notify_all();
    }

    /// Waits until `n` writes are parked at the gate.
    fn wait_parked(&self, n: usize) -> bool {
        let s = self.state.lock().unwrap();
        let (s, _) = self
            .cv
            .wait_timeout_while(s, HANG_GUARD, |s| s.parked < n)
            .unwrap();
        s.parked >= n
    }

    fn pass(&self, offset: u64, len: u64) -> crate::Result<()> {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let mut s = self.state.lock().unwrap();
        let (lo, hi) = s.range;
        if offset >= hi || offset + len <= lo {
            return Ok(());
        }
        match s.mode {
            GateMode::Open => Ok(()),
            GateMode::FailOnce => {
                s.mode = GateMode::Open;
                Err(BlockError::io(
                    "gate",
                    std::io::Error::other("injected write error"),
                ))
            }
            GateMode::Block => {
                s.parked += 1;
                self.cv.notify_all();
                let mut s = self
                    .cv
                    .wait_while(s, |s| s.mode == GateMode::Block)
                    .unwrap();
                s.parked -= 1;
                Ok(())
            }
        }
    }
}

impl BlockNode for GateNode {
    fn driver(&self) -> &'static str {
        self.inner.driver()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn read_vectored(&self, offset: u64, bufs: &mut [&mut [u8]]) -> crate::Result<()> {
        self.inner.read_vectored(offset, bufs)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> crate::Result<()> {
        self.pass(offset, buf.len() as u64)?;
        self.inner.write_at(offset, buf)
    }
    fn write_vectored(&self, offset: u64, bufs: &[&[u8]]) -> crate::Result<()> {
        self.pass(offset, crate::node::total_len(bufs))?;
        self.inner.write_vectored(offset, bufs)
    }
    fn flush(&self) -> crate::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> crate::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> crate::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn resize(&self, size: u64) -> crate::Result<()> {
        self.inner.resize(size)
    }
    fn filename(&self) -> Option<&str> {
        self.inner.filename()
    }
}

fn file_node(path: &Path) -> NodeRef {
    let mut o = Opts::from_value("file", json!({ "filename": p(path) })).unwrap();
    let n = crate::file::FileNode::open(&mut o, &Common::default(), None).unwrap();
    o.finish().unwrap();
    Arc::new(n)
}

/// Opens `img` over a gate (backing file from the header).
fn open_gated(img: &Path, delay: Duration) -> (Arc<GateNode>, Arc<Qcow2Node>) {
    let gate = Arc::new(GateNode::new(file_node(img), delay));
    let o = Qcow2Options {
        host_path: Some(img.to_path_buf()),
        ..Qcow2Options::default()
    };
    let n = Qcow2Node::open_image(gate.clone(), Backing::Auto, &o).unwrap();
    (gate, Arc::new(n))
}

const CS: u64 = 65536;

/// An 8 MiB image with 64 KiB clusters, over a random raw backing file if
/// `backing`; returns the guest content.
fn image(dir: &Path, backing: bool) -> (std::path::PathBuf, Vec<u8>) {
    let img = dir.join("c.qcow2");
    let mut content = vec![0u8; 8 << 20];
    let mut o = CreateOptions::default();
    if backing {
        Rng(77).fill(&mut content);
        std::fs::write(dir.join("b.raw"), &content).unwrap();
        o.backing_file = Some("b.raw".into());
        o.backing_fmt = Some("raw".into());
    }
    create(&img, Some(content.len() as u64), &o).unwrap();
    (img, content)
}

/// Allocates guest cluster 100 (and so the first L2 table); returns the
/// host range the next allocated cluster will take (the end of the file).
fn warm_up(gate: &GateNode, n: &Qcow2Node, content: &mut [u8]) -> (u64, u64) {
    let at = 100 * CS as usize;
    n.write_at(at as u64, &[0x10; CS as usize]).unwrap();
    content[at..at + CS as usize].fill(0x10);
    n.flush().unwrap();
    let end = gate.size();
    assert_eq!(end % CS, 0);
    (end, end + CS)
}

/// Runs `f` on a new thread; its result arrives on the returned channel.
fn spawn<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> (mpsc::Receiver<T>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    (rx, h)
}

/// Own check and qemu-img check clean, and qemu reads `content`.
fn assert_image(n: Arc<Qcow2Node>, img: &Path, content: &[u8]) {
    assert!(read_all(&*n) == content, "content differs");
    n.flush().unwrap();
    let report = n.check(Repair::None).unwrap();
    assert!(report.is_clean(), "own check: {report:?}");
    drop(n);
    if have("qemu-img") {
        assert_qemu_clean(img);
        assert!(qemu_raw(img) == content, "qemu reads differently");
    }
}

#[test]
fn allocating_write_does_not_wait_for_another_ones_data() {
    let d = tmp();
    let (img, mut content) = image(d.path(), true);
    let (gate, n) = open_gated(&img, Duration::ZERO);
    let (lo, hi) = warm_up(&gate, &n, &mut content);
    // The next allocation (guest cluster 0) parks inside its data write.
    gate.set(lo, hi, GateMode::Block);
    let n1 = n.clone();
    let (_, first) = spawn(move || n1.write_at(512, &[0xa1; 4096]).unwrap());
    assert!(
        gate.wait_parked(1),
        "the first write never reached its data write"
    );
    // Another allocation, an in-place write and a read on other clusters.
    let n2 = n.clone();
    let (done, second) = spawn(move || {
        n2.write_at(3 * CS + 1000, &[0xb2; 70000]).unwrap();
        n2.write_at(100 * CS + 7, &[0xc3; 100]).unwrap();
        let mut b = vec![0u8; 4096];
        n2.read_at(3 * CS + 1000, &mut b).unwrap();
        b
    });
    let got = done.recv_timeout(HANG_GUARD);
    gate.open();
    first.join().unwrap();
    second.join().unwrap();
    let got = got.expect("the second allocating write waited for the first one's data write");
    assert_eq!(got, [0xb2; 4096]);
    assert_eq!(n.alloc_waits.load(Ordering::Relaxed), 0);
    content[512..512 + 4096].fill(0xa1);
    let at = (3 * CS + 1000) as usize;
    content[at..at + 70000].fill(0xb2);
    let at = (100 * CS + 7) as usize;
    content[at..at + 100].fill(0xc3);
    assert_image(n, &img, &content);
}

#[test]
fn writes_into_one_unallocated_cluster_wait_for_each_other() {
    let d = tmp();
    let (img, mut content) = image(d.path(), true);
    let (gate, n) = open_gated(&img, Duration::ZERO);
    let (lo, hi) = warm_up(&gate, &n, &mut content);
    gate.set(lo, hi, GateMode::Block);
    let n1 = n.clone();
    let (_, first) = spawn(move || n1.write_at(0, &[0xa1; 4096]).unwrap());
    assert!(
        gate.wait_parked(1),
        "the first write never reached its data write"
    );
    // A second 4 KiB piece of the same cluster, with the backing file
    // providing the rest: it must wait, then write into the first one's
    // cluster (else one of the two copies-on-write loses the other's piece).
    let n2 = n.clone();
    let (done, second) = spawn(move || n2.write_at(8192, &[0xb2; 4096]).unwrap());
    let start = Instant::now();
    while n.alloc_waits.load(Ordering::Relaxed) == 0
        && done.try_recv().is_err()
        && start.elapsed() < HANG_GUARD
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let waited = n.alloc_waits.load(Ordering::Relaxed);
    gate.open();
    first.join().unwrap();
    second.join().unwrap();
    assert!(
        waited > 0,
        "the second write did not wait for the allocation in flight"
    );
    content[..4096].fill(0xa1);
    content[8192..12288].fill(0xb2);
    assert_image(n, &img, &content);
}

#[test]
fn failed_data_write_links_nothing() {
    let d = tmp();
    let (img, mut content) = image(d.path(), true);
    let (gate, n) = open_gated(&img, Duration::ZERO);
    let (lo, hi) = warm_up(&gate, &n, &mut content);
    gate.set(lo, hi, GateMode::FailOnce);
    let err = n.write_at(CS + 100, &[0xa1; 5000]).unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    // The cluster still reads from the backing file; its allocation was
    // given back; and the cluster is not left in flight.
    assert!(read_all(&*n) == content);
    assert!(n.check(Repair::None).unwrap().is_clean());
    let n1 = n.clone();
    let (done, h) = spawn(move || n1.write_at(CS + 200, &[0xb2; 300]).unwrap());
    done.recv_timeout(HANG_GUARD)
        .expect("a write after the failed one hung");
    h.join().unwrap();
    let at = (CS + 200) as usize;
    content[at..at + 300].fill(0xb2);
    assert_image(n, &img, &content);
}

/// Granularity of the test's own locks for clusters of `cs` bytes:
/// requests of different threads never touch the same stripe at once, so
/// the reference stays exact, while many of them share clusters.
fn stripe(cs: u64) -> u64 {
    (cs / 16).clamp(512, 4096)
}

/// A random request range: aligned or not, often in a few hot clusters.
fn pick(rng: &mut Rng, size: u64, cs: u64) -> (u64, u64) {
    let span = if rng.below(2) == 0 { 4 * cs } else { size };
    let st = stripe(cs);
    let (off, len) = if rng.below(2) == 0 {
        let off = rng.below(span / st) * st;
        (off, st * (1 + rng.below((3 * cs).div_ceil(st))))
    } else {
        let off = rng.below(span);
        (off, 1 + rng.below(3 * cs + 3000))
    };
    (off, len.min(size - off))
}

/// Random bytes in a buffer whose start is 4 KiB aligned (so that aligned
/// requests take the driver's zero-copy path, unaligned ones its gather
/// path); returns the buffer and where the bytes start.
fn random_data(rng: &mut Rng, len: usize) -> (Vec<u8>, usize) {
    let mut v = vec![0u8; len + 4095];
    let at = v.as_ptr().align_offset(4096);
    rng.fill(&mut v[at..at + len]);
    (v, at)
}

/// Splits `data` into random pieces (4 KiB multiples if its length is one).
fn split<'a>(rng: &mut Rng, mut data: &'a [u8]) -> Vec<&'a [u8]> {
    let unit = if data.len().is_multiple_of(4096) {
        4096
    } else {
        1
    };
    let mut out = Vec::new();
    while !data.is_empty() {
        let n = (1 + rng.below(data.len().min(20000) as u64) as usize).next_multiple_of(unit);
        let n = n.min(data.len());
        let (a, b) = data.split_at(n);
        out.push(a);
        data = b;
    }
    out
}

/// `threads` threads of random writes (contiguous and vectored), reads,
/// discards, write-zeroes and flushes against a reference.
fn stress(o: &CreateOptions, size: u64, threads: u64, ops: usize, backing: bool) {
    let d = tmp();
    let img = d.path().join("s.qcow2");
    let mut reference = vec![0u8; size as usize];
    let mut o = o.clone();
    if backing {
        Rng(threads).fill(&mut reference);
        std::fs::write(d.path().join("b.raw"), &reference).unwrap();
        o.backing_file = Some("b.raw".into());
        o.backing_fmt = Some("raw".into());
    }
    create(&img, Some(size), &o).unwrap();
    let cs = o.cluster_size;
    let st = stripe(cs);
    let (_gate, n) = open_gated(&img, Duration::from_micros(200));
    let reference = Mutex::new(reference);
    let stripes: Vec<Mutex<()>> = (0..size.div_ceil(st)).map(|_| Mutex::new(())).collect();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (n, reference, stripes) = (&n, &reference, &stripes);
            s.spawn(move || {
                let mut rng = Rng(0x9e37_79b9 * (t + 1));
                for _ in 0..ops {
                    let (off, len) = pick(&mut rng, size, cs);
                    let r = off as usize..(off + len) as usize;
                    let held: Vec<MutexGuard<()>> = (off / st..=(off + len - 1) / st)
                        .map(|i| stripes[i as usize].lock().unwrap())
                        .collect();
                    match rng.below(10) {
                        0..=2 => {
                            let (buf, at) = random_data(&mut rng, len as usize);
                            let data = &buf[at..at + len as usize];
                            n.write_at(off, data).unwrap();
                            reference.lock().unwrap()[r].copy_from_slice(data);
                        }
                        3 => {
                            let (buf, at) = random_data(&mut rng, len as usize);
                            let data = &buf[at..at + len as usize];
                            n.write_vectored(off, &split(&mut rng, data)).unwrap();
                            reference.lock().unwrap()[r].copy_from_slice(data);
                        }
                        4 => {
                            n.write_zeroes(off, len).unwrap();
                            reference.lock().unwrap()[r].fill(0);
                        }
                        5 => {
                            n.discard(off, len).unwrap();
                            let mut got = vec![0u8; len as usize];
                            n.read_at(off, &mut got).unwrap();
                            let mut reference = reference.lock().unwrap();
                            for (i, (g, e)) in got.iter().zip(&reference[r.clone()]).enumerate() {
                                assert!(
                                    g == e || *g == 0,
                                    "discarded byte {} changed",
                                    off as usize + i
                                );
                            }
                            reference[r].copy_from_slice(&got);
                        }
                        6 => {
                            let mut got = vec![0u8; len as usize];
                            let mut bufs = Vec::new();
                            let mut rest = &mut got[..];
                            while !rest.is_empty() {
                                let k = 1 + rng.below(rest.len().min(20000) as u64) as usize;
                                let (a, b) = rest.split_at_mut(k);
                                bufs.push(a);
                                rest = b;
                            }
                            n.read_vectored(off, &mut bufs).unwrap();
                            assert!(
                                got == reference.lock().unwrap()[r],
                                "vectored read at {off} len {len} differs"
                            );
                        }
                        _ => {
                            let mut got = vec![0u8; len as usize];
                            n.read_at(off, &mut got).unwrap();
                            assert!(
                                got == reference.lock().unwrap()[r],
                                "read at {off} len {len} differs"
                            );
                        }
                    }
                    drop(held);
                    if rng.below(100) == 0 {
                        n.flush().unwrap();
                    }
                }
            });
        }
    });
    eprintln!(
        "{threads} threads, {} KiB clusters: {} waits for allocations in flight",
        cs >> 10,
        n.alloc_waits.load(Ordering::Relaxed)
    );
    let reference = reference.into_inner().unwrap();
    assert_image(n, &img, &reference);
}

#[test]
fn sixteen_threads_of_mixed_requests() {
    stress(&opts(65536, true, 16), 8 << 20, 16, 300, true);
    stress(&opts(4096, false, 16), 4 << 20, 16, 300, false);
}

#[test]
fn sixty_four_threads_of_mixed_requests() {
    stress(&opts(65536, true, 16), 8 << 20, 64, 100, false);
    stress(&opts(4096, true, 1), 4 << 20, 64, 100, true);
}

/// A [`crate::WriteTurn`] that records whether it was waited for and passed.
#[derive(Default)]
struct Turn {
    waited: std::sync::atomic::AtomicBool,
    passed: std::sync::atomic::AtomicBool,
}

impl crate::WriteTurn for Turn {
    fn wait(&self) -> crate::Result<()> {
        self.waited.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn pass(&self) {
        self.passed.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_write_in_turn_passes_once_allocated_before_its_data_are_written() {
    let d = tmp();
    let (img, mut content) = image(d.path(), false);
    let (gate, n) = open_gated(&img, Duration::ZERO);
    let (lo, hi) = warm_up(&gate, &n, &mut content);
    gate.set(lo, hi, GateMode::Block);
    let turn = Arc::new(Turn::default());
    let (n1, t1) = (n.clone(), turn.clone());
    let (_, writer) = spawn(move || n1.write_in_turn(0, &[&[0xa1; 4096]], &*t1).unwrap());
    assert!(
        gate.wait_parked(1),
        "the write never reached its data write"
    );
    assert!(
        turn.waited.load(Ordering::SeqCst),
        "allocated without its turn"
    );
    assert!(
        turn.passed.load(Ordering::SeqCst),
        "the turn was held during the data write"
    );
    gate.open();
    writer.join().unwrap();
    content[..4096].fill(0xa1);
    assert_image(n, &img, &content);
}

#[test]
fn a_write_in_turn_that_frees_clusters_passes_only_when_done() {
    let d = tmp();
    let (img, mut content) = image(d.path(), false);
    let (gate, n) = open_gated(&img, Duration::ZERO);
    warm_up(&gate, &n, &mut content);
    // Guest cluster 100 is shared with a snapshot: a write copies it and
    // drops the old cluster's refcount. A first write copies the shared L2
    // table, so that the next new cluster is the copy of cluster 100.
    n.snapshot_create("s", 0, 0).unwrap();
    n.write_at(101 * CS, &[0x20; CS as usize]).unwrap();
    content[101 * CS as usize..102 * CS as usize].fill(0x20);
    n.flush().unwrap();
    let end = gate.size();
    gate.set(end, end + CS, GateMode::Block);
    let turn = Arc::new(Turn::default());
    let (n1, t1) = (n.clone(), turn.clone());
    let at = 100 * CS + 512;
    let (_, writer) = spawn(move || n1.write_in_turn(at, &[&[0xd4; 4096]], &*t1).unwrap());
    assert!(
        gate.wait_parked(1),
        "the write never reached its data write"
    );
    assert!(
        !turn.passed.load(Ordering::SeqCst),
        "passed before the old cluster was released"
    );
    gate.open();
    writer.join().unwrap();
    assert!(turn.passed.load(Ordering::SeqCst), "never passed");
    content[at as usize..at as usize + 4096].fill(0xd4);
    assert_image(n, &img, &content);
}
