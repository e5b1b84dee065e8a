//! The virtqueues of a virtio PCI device and the life of a request on them.
//!
//! Who owns what:
//! - Each queue has its own **queue thread** (`{label}-q{n}`). It alone pops
//!   the available ring: woken by the queue's kick eventfd (the guest's
//!   notification, through a KVM ioeventfd or the notify register), it takes
//!   a bounded batch of descriptor chains under the queue's lock, releases
//!   the lock and hands each chain to the request workers.
//! - A **request worker** ([`crate::workers`]) runs the request to its end
//!   (`VirtioDevice::process`: guest buffers, block graph, crypto), then
//!   completes it: used ring entry and interrupt, under the queue's lock.
//! - The **vCPU** only touches registers: no request runs on it and no lock
//!   it takes is held while a request runs, so configuration accesses and
//!   QMP queries answer while queues are busy. A notify write kicks the
//!   queue thread; a device reset waits for the requests in flight.
//!
//! Requests wait in the available ring (until their queue thread pops them),
//! then in the workers' lane of their queue (until a worker is free; lanes
//! take turns), never on a lock held across I/O. A queue keeps at most its
//! size in flight.
//!
//! Failures: a chain that breaks the virtqueue protocol stops its queue and
//! sets `DEVICE_NEEDS_RESET`. A request handler that panics (a bug, or a
//! backend that cannot go on) fails that request as the device type does
//! (virtio-blk: `IOERR`), sets `DEVICE_NEEDS_RESET` with a configuration
//! interrupt, is reported once through the fault reporter, and from then on
//! every request of the device fails at once until the guest resets it: the
//! guest sees errors, never a silent hang. Other devices go on.

use std::any::Any;
use std::io;
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

// Lock order: a queue's slot before the MSI-X state.
use super::msix::Msix;
use crate::virtio::{
    Chain, ChainError, VirtioDevice, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK,
    VIRTIO_MSI_NO_VECTOR,
};
use crate::workers::{Lane, WorkerPool};

/// Chains a queue thread pops per hold of the queue's lock.
const BATCH: usize = 32;

pub(super) const ISR_QUEUE: u8 = 1;
pub(super) const ISR_CONFIG: u8 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Told, once per device failure, what went wrong (the VMM logs it and
/// sends a QMP event).
pub type FaultReporter = Box<dyn Fn(&str) + Send + Sync>;

pub(super) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A queue's registers and ring state, behind the queue's lock (held only to
/// pop chains, add used entries or access registers, never across I/O).
pub(super) struct QueueSlot {
    pub(super) queue: Queue,
    pub(super) vector: u16,
    /// Stopped for a protocol violation.
    pub(super) broken: bool,
    /// Requests popped and not yet completed.
    inflight: usize,
    /// The queue thread stopped popping because `inflight` reached the limit.
    throttled: bool,
}

pub(super) struct VirtQueue {
    pub(super) slot: Mutex<QueueSlot>,
    /// Signalled when `inflight` drops to zero.
    drained: Condvar,
    /// The guest's notifications (an ioeventfd or the notify register).
    pub(super) kick: Arc<EventFd>,
    lane: Lane,
}

/// The part of a virtio PCI device that queue threads and workers share with
/// the transport registers: the virtqueues, negotiated features, ISR and
/// MSI-X delivery.
pub struct VirtioQueues {
    pub(super) device: Arc<dyn VirtioDevice>,
    pub(super) mem: GuestMemoryMmap,
    pub(super) queues: Vec<VirtQueue>,
    pub(super) msix: Mutex<Msix>,
    pub(super) isr: AtomicU8,
    pub(super) status: AtomicU8,
    pub(super) features: AtomicU64,
    pub(super) config_vector: AtomicU16,
    /// A request handler failed: every request fails until reset.
    failed: AtomicBool,
    stopping: AtomicBool,
    stop: EventFd,
    threads: Mutex<Vec<JoinHandle<()>>>,
    on_fault: Mutex<Option<FaultReporter>>,
    label: String,
}

impl VirtioQueues {
    /// `device`'s queues, each of at most `max_size` entries, their requests
    /// run by `pool`; the queue threads are started by [`VirtioQueues::start`].
    pub(super) fn new(
        device: Arc<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        msix: Msix,
        max_size: u16,
        pool: &Arc<WorkerPool>,
        label: &str,
    ) -> io::Result<Self> {
        let nq = usize::from(device.num_queues());
        let mut queues = Vec::with_capacity(nq);
        for _ in 0..nq {
            let queue = Queue::new(max_size)
                .map_err(|e| io::Error::other(format!("queue size {max_size}: {e}")))?;
            queues.push(VirtQueue {
                slot: Mutex::new(QueueSlot {
                    queue,
                    vector: VIRTIO_MSI_NO_VECTOR,
                    broken: false,
                    inflight: 0,
                    throttled: false,
                }),
                drained: Condvar::new(),
                kick: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
                lane: pool.lane(),
            });
        }
        Ok(Self {
            device,
            mem,
            queues,
            msix: Mutex::new(msix),
            isr: AtomicU8::new(0),
            status: AtomicU8::new(0),
            features: AtomicU64::new(0),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            failed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            stop: EventFd::new(libc::EFD_NONBLOCK)?,
            threads: Mutex::new(Vec::new()),
            on_fault: Mutex::new(None),
            label: label.to_string(),
        })
    }

    /// Starts one queue thread per queue.
    pub(super) fn start(self: &Arc<Self>) -> io::Result<()> {
        let mut threads = lock(&self.threads);
        for index in 0..self.queues.len() {
            let epoll = Epoll::new()?;
            for (fd, data) in [
                (self.queues[index].kick.as_raw_fd(), KICK),
                (self.stop.as_raw_fd(), STOP),
            ] {
                epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, data),
                )?;
            }
            let me = self.clone();
            let t = std::thread::Builder::new()
                .name(format!("{}-q{index}", self.label))
                .spawn(move || {
                    crate::threads::started(crate::threads::DeviceThread::Queue);
                    me.queue_thread(index, &epoll)
                })?;
            threads.push(t);
        }
        Ok(())
    }

    /// Where device failures are reported (default: stderr).
    pub fn set_fault_reporter(&self, reporter: FaultReporter) {
        *lock(&self.on_fault) = Some(reporter);
    }

    /// The eventfd that wakes queue `index`'s thread (the VMM registers it as
    /// the ioeventfd of the queue's notification address).
    pub fn kick_eventfd(&self, index: usize) -> Option<Arc<EventFd>> {
        self.queues.get(index).map(|q| q.kick.clone())
    }

    /// Stops the queue threads, waits for the requests in flight and lets go
    /// of the device's backend: afterwards no thread can reach it.
    /// Idempotent.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        let _ = self.stop.write(1);
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
        self.wait_drained();
        self.device.release();
    }

    fn queue_thread(self: Arc<Self>, index: usize, epoll: &Epoll) {
        // Once at start, in case the guest notified before the thread existed.
        self.serve_guarded(index);
        let mut events = [EpollEvent::default(); 2];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.report(&format!("queue {index}: waiting for notifications: {e}"));
                    self.queue_failed(index);
                    return;
                }
            };
            if self.stopping.load(Ordering::Acquire) || events[..n].iter().any(|e| e.data() == STOP)
            {
                return;
            }
            let _ = self.queues[index].kick.read();
            self.serve_guarded(index);
        }
    }

    /// [`VirtioQueues::serve`], with a panic contained to this queue.
    fn serve_guarded(self: &Arc<Self>, index: usize) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| self.serve(index))) {
            self.report(&format!(
                "queue {index}: the queue thread failed ({}); the device needs a reset",
                panic_text(&*panic)
            ));
            self.queue_failed(index);
        }
    }

    /// Whether the driver has the device running and no failure stops it.
    fn serving(&self) -> bool {
        let status = self.status.load(Ordering::Acquire);
        !self.stopping.load(Ordering::Acquire)
            && status & STATUS_DRIVER_OK != 0
            && (status & STATUS_DEVICE_NEEDS_RESET == 0 || self.failed.load(Ordering::Acquire))
    }

    /// Pops every available chain of queue `index` (in batches, the lock
    /// released in between) and hands them to the workers.
    fn serve(self: &Arc<Self>, index: usize) {
        let q = &self.queues[index];
        loop {
            let mut batch: Vec<(u16, Vec<Descriptor>)> = Vec::new();
            {
                let mut slot = lock(&q.slot);
                if !self.serving() || slot.broken || !slot.queue.ready() {
                    return;
                }
                let limit = usize::from(slot.queue.size());
                if slot.inflight >= limit {
                    slot.throttled = true;
                    return;
                }
                let budget = (limit - slot.inflight).min(BATCH);
                match self.pop(&mut slot.queue, budget, &mut batch) {
                    Ok(()) => {}
                    Err(e) => {
                        slot.broken = true;
                        drop(slot);
                        self.report(&format!(
                            "queue {index}: {e}; the queue is stopped until the driver resets the device"
                        ));
                        self.mark_needs_reset();
                        return;
                    }
                }
                slot.inflight += batch.len();
                if batch.is_empty() {
                    match slot.queue.enable_notification(&self.mem) {
                        Ok(true) => continue,
                        Ok(false) => return,
                        Err(_) => {
                            slot.broken = true;
                            drop(slot);
                            self.mark_needs_reset();
                            return;
                        }
                    }
                }
            }
            for (head, descs) in batch {
                let me = self.clone();
                q.lane.submit(Box::new(move || me.run(index, head, &descs)));
            }
        }
    }

    /// Takes up to `budget` chains off the available ring.
    fn pop(
        &self,
        queue: &mut Queue,
        budget: usize,
        out: &mut Vec<(u16, Vec<Descriptor>)>,
    ) -> Result<(), ChainError> {
        pop(&self.mem, queue, budget, out)
    }

    /// Runs one request on a worker and completes it.
    fn run(&self, index: usize, head: u16, descs: &[Descriptor]) {
        let served = if self.failed.load(Ordering::Acquire) {
            None
        } else {
            match catch_unwind(AssertUnwindSafe(|| self.device.process(&self.mem, descs))) {
                Ok(result) => Some(result),
                Err(panic) => {
                    self.backend_failed(index, &*panic);
                    None
                }
            }
        };
        // A request the device could not serve still completes, with the
        // device type's error status.
        let result = served.unwrap_or_else(|| {
            catch_unwind(AssertUnwindSafe(|| self.device.fail(&self.mem, descs)))
                .unwrap_or(Err(ChainError::NoStatus))
        });
        self.complete(index, head, result);
    }

    /// Puts a finished request on the used ring and interrupts the driver as
    /// the queue's suppression settings ask.
    fn complete(&self, index: usize, head: u16, result: Result<u32, ChainError>) {
        let q = &self.queues[index];
        let mut slot = lock(&q.slot);
        let mut broken = false;
        match result {
            Ok(len) if !slot.broken && slot.queue.ready() => {
                if slot.queue.add_used(&self.mem, head, len).is_ok() {
                    if self.needs_notification(&mut slot.queue) {
                        self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
                        lock(&self.msix).trigger(slot.vector);
                    }
                } else {
                    broken = true;
                }
            }
            Ok(_) => {}
            Err(_) => broken = true,
        }
        if broken {
            slot.broken = true;
        }
        let kick = std::mem::take(&mut slot.throttled);
        // Last: whoever waits for the queue to drain sees the used entry and
        // the interrupt.
        slot.inflight -= 1;
        if slot.inflight == 0 {
            q.drained.notify_all();
        }
        drop(slot);
        if broken {
            self.report(&format!(
                "queue {index}: a request's descriptors break the virtqueue protocol; the queue is stopped until the driver resets the device"
            ));
            self.mark_needs_reset();
        }
        if kick {
            let _ = q.kick.write(1);
        }
    }

    fn needs_notification(&self, queue: &mut Queue) -> bool {
        if queue.event_idx_enabled() {
            return queue.needs_notification(&self.mem).unwrap_or(true);
        }
        let flags: u16 = self
            .mem
            .read_obj(GuestAddress(queue.avail_ring()))
            .unwrap_or(0);
        u16::from_le(flags) & AVAIL_F_NO_INTERRUPT == 0
    }

    /// A request handler panicked: from now on every request fails until the
    /// driver resets the device. Reported once.
    fn backend_failed(&self, index: usize, panic: &(dyn Any + Send)) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            self.report(&format!(
                "queue {index}: a request failed in the device ({}); its requests fail until the driver resets the device",
                panic_text(panic)
            ));
            self.mark_needs_reset();
        }
    }

    /// The queue thread itself failed: stop the queue.
    fn queue_failed(&self, index: usize) {
        lock(&self.queues[index].slot).broken = true;
        self.mark_needs_reset();
    }

    /// Sets `DEVICE_NEEDS_RESET` and tells the driver (configuration interrupt).
    pub(super) fn mark_needs_reset(&self) {
        let old = self
            .status
            .fetch_or(STATUS_DEVICE_NEEDS_RESET, Ordering::AcqRel);
        if old & STATUS_DEVICE_NEEDS_RESET == 0 && old & STATUS_DRIVER_OK != 0 {
            self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
            lock(&self.msix).trigger(self.config_vector.load(Ordering::Acquire));
        }
    }

    fn report(&self, what: &str) {
        let msg = format!("{}: {what}", self.label);
        match &*lock(&self.on_fault) {
            Some(report) => report(&msg),
            None => eprintln!("cryptvm: {msg}"),
        }
    }

    fn wait_drained(&self) {
        for q in &self.queues {
            let mut slot = lock(&q.slot);
            while slot.inflight > 0 {
                slot = q.drained.wait(slot).unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    /// Device reset: waits for the requests in flight (they complete), then
    /// returns every queue and register to its initial state.
    pub(super) fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.wait_drained();
        self.features.store(0, Ordering::Release);
        self.isr.store(0, Ordering::Release);
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        for q in &self.queues {
            let mut slot = lock(&q.slot);
            slot.queue.reset();
            slot.vector = VIRTIO_MSI_NO_VECTOR;
            slot.broken = false;
            slot.throttled = false;
        }
        self.failed.store(false, Ordering::Release);
        self.device.reset();
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.status.load(Ordering::Acquire)
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.features.load(Ordering::Acquire)
    }

    /// Whether queue `index` was stopped for a protocol violation.
    pub fn queue_broken(&self, index: usize) -> bool {
        self.queues.get(index).is_some_and(|q| lock(&q.slot).broken)
    }

    /// Requests of queue `index` popped and not yet completed.
    pub fn in_flight(&self, index: usize) -> usize {
        self.queues.get(index).map_or(0, |q| lock(&q.slot).inflight)
    }

    /// MSI-X table entry `vector` as programmed (for KVM GSI routing).
    pub fn msix_entry(&self, vector: u16) -> Option<super::msix::MsixEntry> {
        lock(&self.msix).entries.get(usize::from(vector)).copied()
    }

    /// Whether MSI-X is enabled and not function-masked.
    pub fn msix_enabled(&self) -> bool {
        let m = lock(&self.msix);
        m.enabled && !m.function_mask
    }
}

const KICK: u64 = 0;
const STOP: u64 = 1;

/// Takes up to `budget` chains of `queue` off the available ring in `mem`.
fn pop(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    budget: usize,
    out: &mut Vec<(u16, Vec<Descriptor>)>,
) -> Result<(), ChainError> {
    let bad = |_| ChainError::Malformed("rings outside guest memory");
    queue.disable_notification(mem).map_err(bad)?;
    let size = queue.size();
    let iter = queue
        .iter(mem)
        .map_err(|_| ChainError::Malformed("available ring index"))?;
    for chain in iter.take(budget) {
        let head = chain.head_index();
        if head >= size {
            return Err(ChainError::Malformed("head index beyond the queue"));
        }
        out.push((head, collect(chain, usize::from(size))?));
    }
    Ok(())
}

/// Where a split virtqueue lives in guest memory, as the driver programs it.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct RingLayout {
    /// Queue size (entries); the device's maximum if larger.
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the available ring.
    pub avail: u64,
    /// Guest address of the used ring.
    pub used: u64,
    /// `VIRTIO_F_RING_EVENT_IDX` negotiated.
    pub event_idx: bool,
}

/// Serves the chains on one virtqueue's available ring on the calling thread:
/// the same chain collection (`pop`: loops, length, indirect tables) and
/// [`VirtioDevice::process`] that the queue threads and request workers run, then
/// the used ring entry, but with no threads, eventfds or panic containment, so that
/// a fuzz target (`fuzz/fuzz_targets/virtio_blk_chain.rs`) sees every panic and runs
/// deterministically. Nothing public reaches the chain code without the threaded
/// transport. Stops at `budget` chains or at the first malformed chain (whose error it
/// returns, as the queue thread would stop the queue); returns each served chain's
/// head and used length. Not part of the supported API.
#[doc(hidden)]
pub fn serve_inline(
    device: &dyn VirtioDevice,
    mem: &GuestMemoryMmap,
    ring: RingLayout,
    budget: usize,
) -> Result<Vec<(u16, u32)>, ChainError> {
    let max = device.queue_max_size();
    let mut queue = Queue::new(max).map_err(|_| ChainError::Malformed("queue size"))?;
    queue.set_size(ring.size.min(max));
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(ring.desc);
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = split(ring.avail);
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(ring.used);
    queue.set_used_ring_address(lo, hi);
    queue.set_event_idx(ring.event_idx);
    queue.set_ready(true);
    if !queue.is_valid(mem) {
        return Err(ChainError::Malformed("rings outside guest memory"));
    }
    let mut served = Vec::new();
    let mut left = budget;
    while left > 0 {
        let mut batch = Vec::new();
        pop(mem, &mut queue, left.min(BATCH), &mut batch)?;
        if batch.is_empty() {
            break;
        }
        left -= batch.len();
        for (head, descs) in batch {
            let len = device.process(mem, &descs)?;
            queue
                .add_used(mem, head, len)
                .map_err(|_| ChainError::Malformed("used ring outside guest memory"))?;
            served.push((head, len));
        }
    }
    Ok(served)
}

/// Collects a chain's descriptors (at most `max`, the queue size: the
/// longest chain a driver may make), refusing truncated chains (loops,
/// unreadable descriptors, more than 4 GiB).
fn collect(chain: Chain<'_>, max: usize) -> Result<Vec<Descriptor>, ChainError> {
    let mut descs = Vec::new();
    for d in chain {
        if descs.len() == max {
            return Err(ChainError::Malformed(
                "descriptor chain longer than the queue",
            ));
        }
        descs.push(d);
    }
    match descs.last() {
        None => Err(ChainError::Malformed("empty or unreadable chain")),
        Some(d) if d.has_next() => Err(ChainError::Malformed(
            "chain loops, leaves guest memory or exceeds 4 GiB",
        )),
        Some(_) => Ok(descs),
    }
}

/// The message of a panic payload.
fn panic_text(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}
