//! The copy behind `img convert`, shaped as qemu-img's: at most `workers`
//! reads and writes at once (`-m`), over chunks read into a bounded set of
//! buffers; writes that allocate in source order unless out-of-order writes
//! are allowed (`-W`); zero runs skipped or written as zeroes (`-S`); one
//! flush at the end, so that a completed copy is durable. Meanwhile a helper
//! thread starts the writeback of the target's host files every few MiB, so
//! that the disk is busy while the CPUs are.
//!
//! Each worker takes whatever is next: the first chunk that has been read,
//! to write it, else a new chunk to read, else it waits.
//!
//! In source order (qemu-img's default, so that a new qcow2 target is laid
//! out as the source) each chunk's writes get a [`WriteTurn`]: the target
//! allocates for a chunk only once the chunk before has allocated, but the
//! writes themselves overlap. A luks target encrypts before it waits, a
//! qcow2 target writes the data after it has passed the turn, a file passes
//! at once; a node that knows nothing of turns does each write whole, in
//! turn, as qemu-img's in-order writes are done.
//!
//! Workers are plain threads, never tasks of the crypto thread pool: a worker
//! blocked in a node's parallel encryption cannot be handed another request.
//! Memory is bounded by `workers + 1` chunk buffers.
//!
//! With a backing file for the target (`-B`, [`KeepBacking`]) a chunk's runs
//! come from the block status of the source's top image, above its own
//! backing (qemu-img's `convert_iteration_sectors` with `target_has_backing`):
//! what the top image allocates is copied (its zero clusters written as
//! zeroes, its data scanned for zero runs as usual), what it leaves to its
//! backing file is left unallocated in the target, to be read from the
//! target's backing file. Only the data runs are read.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use block::aligned::AlignedBuf;
use block::{NodeRef, WaitOnly, WriteTurn};

use super::sparse::Sparse;
use super::{writeback, ImgError, Result};

/// Bytes per request, qemu-img's buffer size.
pub const CHUNK: usize = 2 << 20;
/// The default number of requests in flight (`-m`): one per core, from 2 up
/// to qemu-img's default of 8. qemu-img's 8 coroutines share one thread;
/// here each request is a thread that decrypts or encrypts with every core
/// already, and more requests than cores only add buffers that leave the CPU
/// caches before they are written (see docs/performance.md).
pub fn default_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.clamp(2, 8)
}

/// Most requests in flight qemu-img allows.
pub const MAX_WORKERS: usize = 16;
/// Bytes copied between two starts of writeback.
const WRITEBACK_EVERY: u64 = 16 << 20;

/// What to copy and how.
pub struct Copy<'a> {
    /// The source node.
    pub src: &'a NodeRef,
    /// The target node.
    pub dst: &'a NodeRef,
    /// Bytes to copy from offset 0.
    pub size: u64,
    /// Reads and writes at once.
    pub workers: usize,
    /// The target allocates for the chunks in source order.
    pub in_order: bool,
    /// Which zero runs become holes.
    pub sparse: Sparse,
    /// The target reads as zeros already: holes need not be written.
    pub zero_init: bool,
    /// `-c`: write data compressed, in whole units of this many bytes (the
    /// target's cluster size). A unit is data unless it is all zeros (with
    /// sparse detection on), as in qemu-img.
    pub compress: Option<u64>,
    /// Print qemu-img's progress line.
    pub progress: bool,
    /// The target has a backing file (`-B`): what the source's backing file
    /// defines is left to it. `None` copies everything.
    pub backing: Option<KeepBacking>,
}

/// `-B`: the target's backing file is taken to read as the source's backing
/// file, so that only the source's top image is copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepBacking {
    /// Size of the source's backing image; `None` when the source has none
    /// (then what its top image leaves unallocated reads as zeros).
    pub source_backing_size: Option<u64>,
    /// Size of the target's backing image when known (a new target): past
    /// it, zeros need not be written (qemu-img's `target_backing_sectors`).
    pub target_backing_size: Option<u64>,
}

/// What the write of a run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    /// Write the bytes read.
    Data,
    /// Write zeroes, unless the target reads as zeros already.
    Zero,
    /// Leave the target unallocated: its backing file provides the bytes
    /// (qemu-img's `BLK_BACKING_FILE`).
    Backing,
}

/// A chunk read and waiting to be written.
struct Chunk {
    buf: AlignedBuf,
    len: usize,
    /// Its data, zero and backing runs.
    runs: Vec<(Run, usize)>,
}

/// What a worker does next.
enum Task {
    Read(u64, usize, AlignedBuf),
    Write(u64, Chunk),
}

/// What the workers share.
struct State {
    /// Start of the next chunk to claim.
    next: u64,
    /// With in-order writes: the chunk whose turn it is to allocate (the
    /// end of the chunks that have passed their turn).
    alloc_turn: u64,
    /// Chunks (start -> end) that passed their turn before it came (a target
    /// that needs no turn passes at once).
    passed: BTreeMap<u64, u64>,
    /// Chunks read, by offset.
    ready: BTreeMap<u64, Chunk>,
    /// Buffers no chunk holds (allocated on first use).
    free: Vec<AlignedBuf>,
    /// Bytes copied so far, for the progress line.
    done: u64,
    /// Percentage last shown.
    shown: f64,
    /// Workers still running.
    running: usize,
    /// The first failure; every worker stops once it is set.
    error: Option<ImgError>,
}

struct Shared<'a> {
    job: &'a Copy<'a>,
    state: Mutex<State>,
    /// Signalled when a write turn passes, a chunk is done or a worker ends.
    turn: Condvar,
}

impl Copy<'_> {
    /// The data and zero runs of `buf` (at byte `offset`): whole compression
    /// units with `-c`, else the zero scan's.
    fn scan(&self, buf: &[u8], offset: u64, runs: &mut Vec<(bool, usize)>) {
        match self.compress {
            Some(unit) => compressed_runs(buf, unit, self.sparse, runs),
            None => self.sparse.runs(buf, offset, runs),
        }
    }

    /// Copies, then flushes the target.
    pub fn run(&self) -> Result<()> {
        let shared = Shared {
            job: self,
            state: Mutex::new(State {
                next: 0,
                alloc_turn: 0,
                passed: BTreeMap::new(),
                ready: BTreeMap::new(),
                free: Vec::new(),
                done: 0,
                shown: -1.0,
                running: 0,
                error: None,
            }),
            turn: Condvar::new(),
        };
        let chunks = self.size.div_ceil(CHUNK as u64);
        let workers = (self.workers as u64).clamp(1, chunks.max(1)) as usize;
        // With a request in flight per core the cores are busy already:
        // crypto helpers would only take turns with the workers.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if workers >= cores {
            block::luks::crypto_pool::set_threads(1);
        }
        {
            let mut st = shared.lock();
            st.running = workers;
            // One more than the workers, so that a chunk can wait for its turn
            // while the next is read; one alone for a strictly serial copy.
            let buffers = if workers == 1 { 1 } else { workers + 1 };
            st.free.resize_with(buffers, AlignedBuf::default);
        }
        let files = writeback::host_files(self.dst);
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| {
                    let _running = Running(&shared);
                    shared.work();
                });
            }
            if !files.is_empty() {
                s.spawn(|| shared.start_writebacks(&files));
            }
        });
        let state = shared.state.into_inner().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = state.error {
            return Err(e);
        }
        if self.compress.is_some() {
            // The end of the compressed writes (the image file ends on a sector).
            self.dst
                .write_compressed(0, &[], None)
                .map_err(|source| ImgError::Copy {
                    what: "writing",
                    offset: self.size,
                    source,
                })?;
        }
        if self.progress {
            if self.size == 0 {
                print!("    (100.00/100%)\r");
            }
            println!();
        }
        self.dst
            .flush()
            .map_err(|source| ImgError::Flush { source })
    }
}

impl Shared<'_> {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked mid-update leaves nothing half-done that
        // others rely on: its chunk is never written and the copy fails.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One worker: reads and writes chunks until none is left.
    fn work(&self) {
        let job = self.job;
        let mut st = self.lock();
        loop {
            let (guard, task) = self.next_task(st);
            let Some(task) = task else {
                return;
            };
            drop(guard);
            let result = match task {
                Task::Read(offset, len, mut buf) => {
                    if buf.is_empty() {
                        buf = AlignedBuf::zeroed(CHUNK);
                    }
                    let mut runs = Vec::new();
                    let read = match &job.backing {
                        None => job.src.read_at(offset, &mut buf[..len]).map(|()| {
                            let mut found = Vec::new();
                            job.scan(&buf[..len], offset, &mut found);
                            runs.extend(found.into_iter().map(|(data, n)| (data_or_zero(data), n)));
                        }),
                        Some(keep) => {
                            self.read_above_backing(keep, offset, &mut buf[..len], &mut runs)
                        }
                    };
                    st = self.lock();
                    read.map(|()| {
                        st.ready.insert(offset, Chunk { buf, len, runs });
                    })
                    .map_err(|source| ImgError::Copy {
                        what: "reading",
                        offset,
                        source,
                    })
                }
                Task::Write(offset, chunk) => {
                    let end = offset + chunk.len as u64;
                    let turn = job.in_order.then(|| ChunkTurn::new(self, offset, end));
                    let written = self.write(
                        offset,
                        &chunk.buf[..chunk.len],
                        &chunk.runs,
                        turn.as_ref().map(|t| t as &dyn WriteTurn),
                    );
                    st = self.lock();
                    st.free.push(chunk.buf);
                    let result = written.map(|()| self.advance(&mut st, chunk.len as u64));
                    // A turn the target did not pass (a failure) passes now,
                    // after the failure is recorded: later chunks give up.
                    if let Err(e) = result {
                        st.error.get_or_insert(e);
                    }
                    if let Some(turn) = &turn {
                        turn.pass_locked(&mut st);
                    }
                    Ok(())
                }
            };
            if let Err(e) = result {
                st.error.get_or_insert(e);
            }
            self.turn.notify_all();
        }
    }

    /// Waits for the next task: the write of the first chunk read, else a new
    /// read if a buffer is free (each worker does one request at a time, so
    /// there are never more than `workers`). None once there is nothing left
    /// for this worker: every chunk claimed and none waiting, or a failure.
    ///
    /// In source order, the chunk whose turn it is to allocate is always
    /// being read, or written by a worker that does not wait for a turn: its
    /// reader writes it next, being the first ready. So every wait for a turn
    /// ends.
    fn next_task<'g>(
        &'g self,
        mut st: MutexGuard<'g, State>,
    ) -> (MutexGuard<'g, State>, Option<Task>) {
        let job = self.job;
        loop {
            if st.error.is_some() {
                return (st, None);
            }
            // In source order a chunk that cannot allocate yet waits while
            // another is read, if one can be.
            let can_read = st.next < job.size && !st.free.is_empty();
            let writable = st
                .ready
                .keys()
                .next()
                .copied()
                .filter(|&o| !job.in_order || o <= st.alloc_turn || !can_read);
            if let Some(offset) = writable {
                let chunk = st.ready.remove(&offset).expect("chunk is ready");
                return (st, Some(Task::Write(offset, chunk)));
            }
            if st.next < job.size {
                if let Some(buf) = st.free.pop() {
                    let offset = st.next;
                    let len = (job.size - offset).min(CHUNK as u64) as usize;
                    st.next += len as u64;
                    return (st, Some(Task::Read(offset, len, buf)));
                }
            }
            if st.next >= job.size && st.ready.is_empty() {
                return (st, None);
            }
            st = self.turn.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Reads the chunk at `offset` into `buf` with `-B`: its runs from the
    /// block status of the source's top image (qemu-img's
    /// `convert_iteration_sectors` with a base), then the data runs alone,
    /// scanned for zero runs.
    fn read_above_backing(
        &self,
        keep: &KeepBacking,
        offset: u64,
        buf: &mut [u8],
        runs: &mut Vec<(Run, usize)>,
    ) -> block::Result<()> {
        let job = self.job;
        let len = buf.len() as u64;
        let mut found = Vec::new();
        let mut pos = 0;
        while pos < len {
            let at = offset + pos;
            let mut n = len - pos;
            // Past the end of the target's backing file zeros read as zeros.
            let past_backing = match keep.target_backing_size {
                Some(end) if at >= end => true,
                Some(end) => {
                    n = n.min(end - at);
                    false
                }
                None => false,
            };
            let st = job.src.block_status(at, n)?;
            n = st.len.clamp(1, n);
            // Unallocated with no backing file below (or past its end) reads
            // as zeros, as QEMU's block status says.
            let reads_zero =
                st.zero || (!st.data && keep.source_backing_size.is_none_or(|end| at >= end));
            let run = match (reads_zero, st.data) {
                (true, _) if past_backing => Run::Backing,
                // `-S 0` allocates all the target does not leave to its
                // backing file: zeros are written as data.
                (true, _) if job.sparse.enabled() => Run::Zero,
                (true, _) | (false, true) => Run::Data,
                (false, false) => Run::Backing,
            };
            let range = pos as usize..(pos + n) as usize;
            if run == Run::Data {
                job.src.read_at(at, &mut buf[range.clone()])?;
                found.clear();
                job.scan(&buf[range], at, &mut found);
                for &(data, n) in &found {
                    push_run(runs, data_or_zero(data), n);
                }
            } else {
                push_run(runs, run, range.len());
            }
            pos += n;
        }
        Ok(())
    }

    /// Writes one chunk: its data runs, and its zero runs unless the target
    /// reads as zeros already (qemu-img's `convert_co_write`); backing runs
    /// are left alone. With a `turn` every write is in turn, and the last one
    /// passes it.
    fn write(
        &self,
        offset: u64,
        data: &[u8],
        runs: &[(Run, usize)],
        turn: Option<&dyn WriteTurn>,
    ) -> Result<()> {
        let job = self.job;
        let last = runs
            .iter()
            .rposition(|&(run, _)| run == Run::Data || (run == Run::Zero && !job.zero_init));
        let mut pos = 0;
        for (i, &(run, n)) in runs.iter().enumerate() {
            let at = offset + pos as u64;
            let bytes = &data[pos..pos + n];
            let written = match (run, turn) {
                (Run::Data, t) if job.compress.is_some() => match t {
                    Some(t) if Some(i) == last => job.dst.write_compressed(at, bytes, Some(t)),
                    Some(t) => job.dst.write_compressed(at, bytes, Some(&WaitOnly(t))),
                    None => job.dst.write_compressed(at, bytes, None),
                },
                (Run::Data, None) => job.dst.write_at(at, bytes),
                (Run::Data, Some(t)) if Some(i) == last => job.dst.write_in_turn(at, &[bytes], t),
                (Run::Data, Some(t)) => job.dst.write_in_turn(at, &[bytes], &WaitOnly(t)),
                (Run::Backing, _) => Ok(()),
                (Run::Zero, _) if job.zero_init => Ok(()),
                (Run::Zero, t) => t
                    .map_or(Ok(()), |t| t.wait())
                    .and_then(|()| job.dst.write_zeroes(at, n as u64)),
            };
            written.map_err(|source| ImgError::Copy {
                what: "writing",
                offset: at,
                source,
            })?;
            pos += n;
        }
        Ok(())
    }

    /// Starts writeback every `WRITEBACK_EVERY` bytes copied, until the
    /// workers are done.
    fn start_writebacks(&self, files: &[std::fs::File]) {
        let mut started = 0;
        loop {
            {
                let mut st = self.lock();
                while st.running > 0 && st.done < started + WRITEBACK_EVERY {
                    st = self.turn.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.running == 0 {
                    return;
                }
                started = st.done;
            }
            files.iter().for_each(writeback::start);
        }
    }

    /// Counts `len` more bytes copied and shows progress.
    fn advance(&self, st: &mut State, len: u64) {
        let job = self.job;
        st.done += len;
        if !job.progress {
            return;
        }
        let pct = st.done as f64 * 100.0 / job.size as f64;
        if pct - st.shown >= 1.0 || st.done == job.size {
            st.shown = pct;
            print!("    ({pct:.2}/100%)\r");
            let _ = std::io::stdout().flush();
        }
    }
}

/// A run found by the zero scan.
fn data_or_zero(data: bool) -> Run {
    if data {
        Run::Data
    } else {
        Run::Zero
    }
}

/// Appends a run of `n` bytes, merged into the last one of the same kind.
fn push_run(runs: &mut Vec<(Run, usize)>, run: Run, n: usize) {
    match runs.last_mut() {
        Some((last, len)) if *last == run => *len += n,
        _ => runs.push((run, n)),
    }
}

/// The runs of a chunk for compressed output: whole units (chunks start on
/// unit boundaries), each zeros if it is all zeros and sparse detection is
/// on (qemu-img's `buffer_is_zero` test for compressed targets), else data;
/// neighbours of one kind merged.
fn compressed_runs(buf: &[u8], unit: u64, sparse: Sparse, runs: &mut Vec<(bool, usize)>) {
    runs.clear();
    for part in buf.chunks(unit as usize) {
        let data = !sparse.enabled() || !super::sparse::is_zero(part);
        match runs.last_mut() {
            Some((d, n)) if *d == data => *n += part.len(),
            _ => runs.push((data, part.len())),
        }
    }
}

/// A chunk's turn to allocate in the target, in source order.
struct ChunkTurn<'s, 'a> {
    shared: &'s Shared<'a>,
    offset: u64,
    end: u64,
    passed: AtomicBool,
}

impl<'s, 'a> ChunkTurn<'s, 'a> {
    fn new(shared: &'s Shared<'a>, offset: u64, end: u64) -> Self {
        ChunkTurn {
            shared,
            offset,
            end,
            passed: AtomicBool::new(false),
        }
    }

    /// Passes the turn (once) with the state locked.
    fn pass_locked(&self, st: &mut State) {
        if self.passed.swap(true, Ordering::AcqRel) {
            return;
        }
        st.passed.insert(self.offset, self.end);
        while let Some(end) = st.passed.remove(&st.alloc_turn) {
            st.alloc_turn = end;
        }
        self.shared.turn.notify_all();
    }
}

impl WriteTurn for ChunkTurn<'_, '_> {
    fn wait(&self) -> block::Result<()> {
        let mut st = self.shared.lock();
        loop {
            if st.error.is_some() {
                return Err(block::write_turn::abandoned());
            }
            if st.alloc_turn >= self.offset {
                return Ok(());
            }
            st = self.shared.turn.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn pass(&self) {
        if !self.passed.load(Ordering::Acquire) {
            let mut st = self.shared.lock();
            self.pass_locked(&mut st);
        }
    }
}

/// Counts a worker as running until it ends, however it ends: a worker that
/// panics fails the copy, so that no other worker waits for its turn forever.
struct Running<'a>(&'a Shared<'a>);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.running -= 1;
        if std::thread::panicking() {
            st.error
                .get_or_insert(ImgError::Msg("a copy worker panicked".into()));
        }
        self.0.turn.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use block::{BlockError, BlockNode};

    use super::*;

    /// What a [`Disk`] was asked to do, in order.
    #[derive(Clone, Debug, PartialEq)]
    enum Op {
        Write(u64, u64),
        Zeroes(u64, u64),
        Flush,
        /// A write in turn allocated at this offset.
        Alloc(u64),
    }

    /// An in-memory node that logs requests, slows reads down by a delay
    /// that depends on the offset (so that they finish out of order), and
    /// fails the request that touches `fail_at`.
    struct Disk {
        data: Mutex<Vec<u8>>,
        log: Mutex<Vec<Op>>,
        read_delay: fn(u64) -> Duration,
        write_delay: Duration,
        fail_at: Option<u64>,
        /// Writes in turn allocate (logged), pass the turn, then write, as
        /// qcow2 does; otherwise they are done whole in turn.
        allocates: bool,
        writing: AtomicUsize,
        most_writing: AtomicUsize,
        /// Requests under way on this disk and any sharing the counter.
        busy: Arc<AtomicUsize>,
        most_busy: Arc<AtomicUsize>,
    }

    impl Disk {
        fn new(data: Vec<u8>) -> Self {
            Disk {
                data: Mutex::new(data),
                log: Mutex::new(Vec::new()),
                read_delay: |_| Duration::ZERO,
                write_delay: Duration::ZERO,
                fail_at: None,
                allocates: false,
                writing: AtomicUsize::new(0),
                most_writing: AtomicUsize::new(0),
                busy: Arc::new(AtomicUsize::new(0)),
                most_busy: Arc::new(AtomicUsize::new(0)),
            }
        }

        /// Counts a request as under way for its duration.
        fn busy<T>(&self, f: impl FnOnce() -> T) -> T {
            let now = self.busy.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_busy.fetch_max(now, Ordering::SeqCst);
            let r = f();
            self.busy.fetch_sub(1, Ordering::SeqCst);
            r
        }

        fn check(&self, offset: u64, len: usize) -> block::Result<()> {
            match self.fail_at {
                Some(f) if (offset..offset + len as u64).contains(&f) => Err(BlockError::io(
                    "test disk",
                    std::io::Error::from_raw_os_error(libc::EIO),
                )),
                _ => Ok(()),
            }
        }

        fn log(&self) -> Vec<Op> {
            self.log.lock().unwrap().clone()
        }
    }

    impl BlockNode for Disk {
        fn driver(&self) -> &'static str {
            "test"
        }
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> block::Result<()> {
            self.busy(|| std::thread::sleep((self.read_delay)(offset)));
            self.check(offset, buf.len())?;
            let d = self.data.lock().unwrap();
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> block::Result<()> {
            let now = self.writing.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_writing.fetch_max(now, Ordering::SeqCst);
            self.busy(|| std::thread::sleep(self.write_delay));
            let r = self.check(offset, buf.len()).map(|()| {
                let mut d = self.data.lock().unwrap();
                d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
                self.log
                    .lock()
                    .unwrap()
                    .push(Op::Write(offset, buf.len() as u64));
            });
            self.writing.fetch_sub(1, Ordering::SeqCst);
            r
        }
        fn write_in_turn(
            &self,
            offset: u64,
            bufs: &[&[u8]],
            turn: &dyn WriteTurn,
        ) -> block::Result<()> {
            turn.wait()?;
            if self.allocates {
                self.log.lock().unwrap().push(Op::Alloc(offset));
                turn.pass();
            }
            let written = self.write_vectored(offset, bufs);
            turn.pass();
            written
        }
        fn flush(&self) -> block::Result<()> {
            self.log.lock().unwrap().push(Op::Flush);
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> block::Result<()> {
            unreachable!("convert never discards")
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> block::Result<()> {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..(offset + len) as usize].fill(0);
            self.log.lock().unwrap().push(Op::Zeroes(offset, len));
            Ok(())
        }
    }

    /// Pseudo-random bytes.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// 10 chunks and a bit, not a whole number of chunks.
    const SIZE: usize = 10 * CHUNK + 3 * 512;

    fn copy(src: &Arc<Disk>, dst: &Arc<Disk>, workers: usize, in_order: bool) -> Result<()> {
        let (s, d): (NodeRef, NodeRef) = (src.clone(), dst.clone());
        Copy {
            src: &s,
            dst: &d,
            size: SIZE as u64,
            workers,
            in_order,
            sparse: Sparse::new(4096).unwrap(),
            zero_init: false,
            compress: None,
            progress: false,
            backing: None,
        }
        .run()
    }

    /// Later chunks are read faster than earlier ones.
    fn backwards(offset: u64) -> Duration {
        Duration::from_millis(20 - offset / CHUNK as u64)
    }

    #[test]
    fn in_order_writes_come_one_at_a_time_in_source_order() {
        for workers in [1, 3, 8, 16] {
            let want = noise(SIZE, workers as u64);
            let src = Arc::new(Disk {
                read_delay: backwards,
                ..Disk::new(want.clone())
            });
            let dst = Arc::new(Disk::new(vec![0xaa; SIZE]));
            copy(&src, &dst, workers, true).unwrap();
            assert!(*dst.data.lock().unwrap() == want, "{workers} workers: data");
            let log = dst.log();
            let mut expect: Vec<Op> = (0..SIZE as u64)
                .step_by(CHUNK)
                .map(|o| Op::Write(o, (SIZE as u64 - o).min(CHUNK as u64)))
                .collect();
            expect.push(Op::Flush);
            assert_eq!(log, expect, "{workers} workers: requests");
            assert_eq!(
                dst.most_writing.load(Ordering::SeqCst),
                1,
                "{workers} workers"
            );
        }
    }

    #[test]
    fn in_order_allocations_come_in_source_order_while_writes_overlap() {
        for workers in [2, 4, 16] {
            let want = noise(SIZE, workers as u64);
            let src = Arc::new(Disk {
                read_delay: backwards,
                ..Disk::new(want.clone())
            });
            let dst = Arc::new(Disk {
                allocates: true,
                write_delay: Duration::from_millis(30),
                ..Disk::new(vec![0xaa; SIZE])
            });
            copy(&src, &dst, workers, true).unwrap();
            assert!(*dst.data.lock().unwrap() == want, "{workers} workers: data");
            let allocs: Vec<u64> = dst
                .log()
                .iter()
                .filter_map(|op| match op {
                    Op::Alloc(o) => Some(*o),
                    _ => None,
                })
                .collect();
            let expect: Vec<u64> = (0..SIZE as u64).step_by(CHUNK).collect();
            assert_eq!(allocs, expect, "{workers} workers: allocations");
            assert!(
                dst.most_writing.load(Ordering::SeqCst) > 1,
                "{workers} workers: writes never overlapped"
            );
            assert_eq!(dst.log().last(), Some(&Op::Flush));
        }
    }

    #[test]
    fn out_of_order_writes_overlap_and_still_copy_everything() {
        let want = noise(SIZE, 7);
        let src = Arc::new(Disk {
            read_delay: backwards,
            ..Disk::new(want.clone())
        });
        let dst = Arc::new(Disk {
            write_delay: Duration::from_millis(30),
            ..Disk::new(vec![0xaa; SIZE])
        });
        copy(&src, &dst, 8, false).unwrap();
        assert!(*dst.data.lock().unwrap() == want);
        let log = dst.log();
        assert_eq!(log.last(), Some(&Op::Flush), "flush comes last: {log:?}");
        assert_eq!(log.len(), SIZE.div_ceil(CHUNK) + 1, "{log:?}");
        assert!(
            dst.most_writing.load(Ordering::SeqCst) > 1,
            "writes never overlapped"
        );
    }

    #[test]
    fn never_more_requests_at_once_than_workers() {
        for (workers, in_order) in [(1, true), (2, true), (4, true), (2, false), (5, false)] {
            let src = Arc::new(Disk {
                read_delay: |_| Duration::from_millis(3),
                ..Disk::new(noise(SIZE, 5))
            });
            let dst = Arc::new(Disk {
                write_delay: Duration::from_millis(3),
                busy: src.busy.clone(),
                most_busy: src.most_busy.clone(),
                ..Disk::new(vec![0; SIZE])
            });
            copy(&src, &dst, workers, in_order).unwrap();
            let most = src.most_busy.load(Ordering::SeqCst);
            assert!(
                most <= workers,
                "{workers} workers: {most} requests at once"
            );
            if workers > 1 {
                assert!(most > 1, "{workers} workers: requests never overlapped");
            }
        }
    }

    #[test]
    fn zero_runs_are_skipped_or_written_as_zeroes() {
        let mut want = noise(3 * CHUNK, 3);
        want[CHUNK..2 * CHUNK].fill(0);
        want[96 * 512..104 * 512].fill(0);
        // Not on a 4 KiB boundary: stays data.
        want[201 * 512..209 * 512].fill(0);
        for zero_init in [false, true] {
            let src: NodeRef = Arc::new(Disk::new(want.clone()));
            let disk = Arc::new(Disk::new(if zero_init {
                vec![0; 3 * CHUNK]
            } else {
                vec![0xaa; 3 * CHUNK]
            }));
            let dst: NodeRef = disk.clone();
            Copy {
                src: &src,
                dst: &dst,
                size: want.len() as u64,
                workers: 4,
                in_order: true,
                sparse: Sparse::new(4096).unwrap(),
                zero_init,
                compress: None,
                progress: false,
                backing: None,
            }
            .run()
            .unwrap();
            assert!(*disk.data.lock().unwrap() == want, "zero_init {zero_init}");
            let (c, z) = (CHUNK as u64, 96 * 512);
            let mut expect = vec![Op::Write(0, z)];
            if !zero_init {
                expect.push(Op::Zeroes(z, 4096));
            }
            expect.push(Op::Write(z + 4096, c - z - 4096));
            if !zero_init {
                expect.push(Op::Zeroes(c, c));
            }
            expect.extend([Op::Write(2 * c, c), Op::Flush]);
            assert_eq!(disk.log(), expect, "zero_init {zero_init}");
        }
    }

    /// A top image over a backing file: each 64 KiB cluster is data (its
    /// bytes), a zero cluster, or left to the backing file (reads 0xbb).
    struct Top {
        data: Vec<u8>,
        /// Per cluster: b'd' data, b'z' zero, b'-' unallocated.
        clusters: &'static [u8],
    }

    const CL: u64 = 64 << 10;

    impl BlockNode for Top {
        fn driver(&self) -> &'static str {
            "test-top"
        }
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_only(&self) -> bool {
            true
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> block::Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                let at = offset as usize + i;
                *b = match self.clusters[at / CL as usize] {
                    b'd' => self.data[at],
                    b'z' => 0,
                    _ => 0xbb,
                };
            }
            Ok(())
        }
        fn write_at(&self, _: u64, _: &[u8]) -> block::Result<()> {
            unreachable!("the source is never written")
        }
        fn flush(&self) -> block::Result<()> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> block::Result<()> {
            unreachable!("the source is never written")
        }
        fn write_zeroes(&self, _: u64, _: u64) -> block::Result<()> {
            unreachable!("the source is never written")
        }
        fn block_status(&self, offset: u64, len: u64) -> block::Result<block::BlockStatus> {
            let kind = self.clusters[(offset / CL) as usize];
            let mut end = (offset / CL + 1) * CL;
            while end < offset + len && self.clusters[(end / CL) as usize] == kind {
                end += CL;
            }
            let n = end.min(offset + len) - offset;
            Ok(match kind {
                b'd' => block::BlockStatus::data(n),
                b'z' => block::BlockStatus {
                    zero: true,
                    data: false,
                    ..block::BlockStatus::data(n)
                },
                _ => block::BlockStatus::unallocated(n),
            })
        }
    }

    #[test]
    fn with_a_backing_file_only_the_top_image_is_copied() {
        // 40 clusters: not a whole number of chunks either way.
        let clusters: &'static [u8] = b"dd--zzd-dd------------------------dzdzd-";
        let mut data = noise(clusters.len() * CL as usize, 9);
        // An all-zero data cluster: a zero run the scan finds.
        data[8 * CL as usize..9 * CL as usize].fill(0);
        let top: NodeRef = Arc::new(Top { data, clusters });
        let size = top.size();
        for (source_backing_size, target_backing_size) in [
            (Some(size), Some(size)),
            (None, Some(size)),
            (Some(size), Some(36 * CL)),
        ] {
            let disk = Arc::new(Disk::new(vec![0xaa; size as usize]));
            let dst: NodeRef = disk.clone();
            Copy {
                src: &top,
                dst: &dst,
                size,
                workers: 3,
                in_order: true,
                sparse: Sparse::new(4096).unwrap(),
                zero_init: false,
                compress: None,
                progress: false,
                backing: Some(KeepBacking {
                    source_backing_size,
                    target_backing_size,
                }),
            }
            .run()
            .unwrap();
            let c = |n: u64| n * CL;
            let mut want = vec![
                Op::Write(0, c(2)),
                Op::Zeroes(c(4), c(2)),
                Op::Write(c(6), c(1)),
                Op::Zeroes(c(8), c(1)),
                Op::Write(c(9), c(1)),
            ];
            if source_backing_size.is_none() {
                // Unallocated over no backing file reads as zeros.
                want = vec![
                    Op::Write(0, c(2)),
                    Op::Zeroes(c(2), c(4)),
                    Op::Write(c(6), c(1)),
                    Op::Zeroes(c(7), c(2)),
                    Op::Write(c(9), c(1)),
                    // The chunk boundary at 32 clusters splits the run.
                    Op::Zeroes(c(10), c(22)),
                    Op::Zeroes(c(32), c(2)),
                    Op::Write(c(34), c(1)),
                    Op::Zeroes(c(35), c(1)),
                    Op::Write(c(36), c(1)),
                    Op::Zeroes(c(37), c(1)),
                    Op::Write(c(38), c(1)),
                    Op::Zeroes(c(39), c(1)),
                ];
            } else if target_backing_size == Some(size) {
                want.extend([
                    Op::Write(c(34), c(1)),
                    Op::Zeroes(c(35), c(1)),
                    Op::Write(c(36), c(1)),
                    Op::Zeroes(c(37), c(1)),
                    Op::Write(c(38), c(1)),
                ]);
            } else {
                // Zero clusters past the target's backing file need no write.
                want.extend([
                    Op::Write(c(34), c(1)),
                    Op::Zeroes(c(35), c(1)),
                    Op::Write(c(36), c(1)),
                    Op::Write(c(38), c(1)),
                ]);
            }
            want.push(Op::Flush);
            assert_eq!(
                disk.log(),
                want,
                "{source_backing_size:?} {target_backing_size:?}"
            );
        }
    }

    #[test]
    fn a_failed_read_stops_every_worker_and_names_its_chunk() {
        for (workers, in_order) in [(1, true), (8, true), (16, true), (8, false)] {
            let bad = 4 * CHUNK as u64 + 777;
            let src = Arc::new(Disk {
                read_delay: backwards,
                fail_at: Some(bad),
                ..Disk::new(noise(SIZE, 1))
            });
            let dst = Arc::new(Disk::new(vec![0; SIZE]));
            let e = copy(&src, &dst, workers, in_order).unwrap_err();
            assert!(
                matches!(e, ImgError::Copy { what: "reading", offset, .. } if offset == 4 * CHUNK as u64),
                "{workers} workers: {e}"
            );
            let log = dst.log();
            assert!(
                !log.contains(&Op::Flush),
                "flushed after a failure: {log:?}"
            );
            if in_order {
                // Nothing at or after the failed chunk was written.
                assert!(
                    log.iter()
                        .all(|op| matches!(op, Op::Write(o, _) if *o < 4 * CHUNK as u64)),
                    "{workers} workers: {log:?}"
                );
            }
        }
    }

    #[test]
    fn a_failed_write_fails_the_copy() {
        let src = Arc::new(Disk::new(noise(SIZE, 2)));
        let dst = Arc::new(Disk {
            fail_at: Some(7 * CHUNK as u64),
            ..Disk::new(vec![0; SIZE])
        });
        let e = copy(&src, &dst, 8, true).unwrap_err();
        assert!(
            matches!(e, ImgError::Copy { what: "writing", offset, .. } if offset == 7 * CHUNK as u64),
            "{e}"
        );
        assert_eq!(
            e.to_string().split(':').next(),
            Some("error while writing at byte 14680064")
        );
    }
}
