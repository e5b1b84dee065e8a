//! The request workers: a fixed set of threads that run device requests
//! (block I/O and the crypto it waits for), shared by every queue of every
//! device.
//!
//! Each virtqueue submits through its own [`Lane`]; workers take jobs from
//! the lanes in turn (round robin, one job at a time), so a queue with a deep
//! backlog delays another queue's next request by at most one request per
//! worker. A job runs to completion on its worker: workers never pick up
//! another job while one is running, so nothing a job holds (a lock, a
//! buffer) can be taken again on the same thread. A job that panics is
//! contained by its submitter (see `virtio::queues`), and the worker goes on
//! in any case.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// A unit of work.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// The most workers a pool may have.
pub const MAX_WORKERS: usize = 1024;

#[derive(Default)]
struct Sched {
    /// Queued jobs, per lane.
    lanes: HashMap<u64, VecDeque<Job>>,
    /// Lanes with queued jobs, in the order they are served.
    ready: VecDeque<u64>,
    next_lane: u64,
    stopping: bool,
}

struct Shared {
    sched: Mutex<Sched>,
    wake: Condvar,
}

fn lock(m: &Mutex<Sched>) -> MutexGuard<'_, Sched> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pool of request workers.
pub struct WorkerPool {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    size: usize,
}

impl WorkerPool {
    /// Starts `threads` workers named `{name}-N` (1..=[`MAX_WORKERS`]).
    pub fn new(threads: usize, name: &str) -> io::Result<Arc<WorkerPool>> {
        if threads == 0 || threads > MAX_WORKERS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("worker count {threads} is not in 1..={MAX_WORKERS}"),
            ));
        }
        let shared = Arc::new(Shared {
            sched: Mutex::new(Sched::default()),
            wake: Condvar::new(),
        });
        let pool = Arc::new(WorkerPool {
            shared: shared.clone(),
            threads: Mutex::new(Vec::with_capacity(threads)),
            size: threads,
        });
        for i in 0..threads {
            let shared = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    crate::threads::started(crate::threads::DeviceThread::IoWorker);
                    work(&shared)
                })?;
            pool.threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(t);
        }
        Ok(pool)
    }

    /// The number of workers.
    pub fn size(&self) -> usize {
        self.size
    }

    /// A new lane to submit jobs through.
    pub fn lane(self: &Arc<Self>) -> Lane {
        let mut s = lock(&self.shared.sched);
        let id = s.next_lane;
        s.next_lane += 1;
        Lane {
            pool: self.clone(),
            id,
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        lock(&self.shared.sched).stopping = true;
        self.shared.wake.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        // The last reference may go on a worker (a job's captures dropped
        // after it ran): that worker ends by itself once this returns.
        let me = std::thread::current().id();
        for t in threads {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

fn work(shared: &Shared) {
    loop {
        let job = {
            let mut s = lock(&shared.sched);
            loop {
                if let Some(lane) = s.ready.pop_front() {
                    if let Some(q) = s.lanes.get_mut(&lane) {
                        if let Some(job) = q.pop_front() {
                            if !q.is_empty() {
                                s.ready.push_back(lane);
                            }
                            break job;
                        }
                    }
                    continue;
                }
                if s.stopping {
                    return;
                }
                s = shared.wake.wait(s).unwrap_or_else(|e| e.into_inner());
            }
        };
        // Submitters contain their own panics (and report them); this keeps
        // the worker alive whatever a job does.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

/// One submitter's share of a [`WorkerPool`] (one virtqueue).
pub struct Lane {
    pool: Arc<WorkerPool>,
    id: u64,
}

impl Lane {
    /// Queues `job`; a worker runs it when this lane's turn comes.
    pub fn submit(&self, job: Job) {
        let shared = &self.pool.shared;
        let mut s = lock(&shared.sched);
        let q = s.lanes.entry(self.id).or_default();
        let was_idle = q.is_empty();
        q.push_back(job);
        if was_idle {
            s.ready.push_back(self.id);
        }
        drop(s);
        shared.wake.notify_one();
    }

    /// The pool this lane belongs to.
    pub fn pool(&self) -> &Arc<WorkerPool> {
        &self.pool
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        // Jobs still queued are dropped unrun; their submitter waits for the
        // ones it cares about before dropping the lane.
        let mut s = lock(&self.pool.shared.sched);
        s.lanes.remove(&self.id);
        s.ready.retain(|&l| l != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn runs_every_job_on_its_workers() {
        let pool = WorkerPool::new(4, "wtest").expect("pool");
        let lane = pool.lane();
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        for _ in 0..100 {
            let done = done.clone();
            let tx = tx.clone();
            lane.submit(Box::new(move || {
                let name = std::thread::current().name().map(str::to_string);
                done.fetch_add(1, Ordering::SeqCst);
                tx.send(name).expect("send");
            }));
        }
        for _ in 0..100 {
            let name = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("a job never ran");
            assert!(name.is_some_and(|n| n.starts_with("wtest-")));
        }
        assert_eq!(done.load(Ordering::SeqCst), 100);
    }

    #[test]
    fn lanes_take_turns() {
        // One worker, blocked on a first job while lane A queues a backlog and
        // lane B one job: B's job runs second, not after A's backlog.
        let pool = WorkerPool::new(1, "wturn").expect("pool");
        let (a, b) = (pool.lane(), pool.lane());
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let (order_tx, order_rx) = mpsc::channel::<&'static str>();
        let o = order_tx.clone();
        a.submit(Box::new(move || {
            started_tx.send(()).expect("send");
            gate_rx.recv().expect("gate");
            o.send("a0").expect("send");
        }));
        started_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("first job");
        for _ in 0..5 {
            let o = order_tx.clone();
            a.submit(Box::new(move || o.send("a").expect("send")));
        }
        let o = order_tx.clone();
        b.submit(Box::new(move || o.send("b").expect("send")));
        gate_tx.send(()).expect("open");
        let order: Vec<_> = (0..7)
            .map(|_| order_rx.recv_timeout(Duration::from_secs(10)).expect("job"))
            .collect();
        assert_eq!(order[0], "a0");
        assert_eq!(order[1], "a", "lane A's next job was queued first");
        assert_eq!(order[2], "b", "lane B waited for one job of A, not five");
    }

    #[test]
    fn the_last_reference_may_go_on_a_worker() {
        let pool = WorkerPool::new(2, "wlast").expect("pool");
        let lane = pool.lane();
        let (tx, rx) = mpsc::channel();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let held = Arc::new(lane);
        let inner = held.clone();
        drop(pool);
        held.submit(Box::new(move || {
            gate_rx.recv().expect("gate");
            // Now this job holds the pool's last reference (through its lane).
            drop(inner);
            tx.send(()).expect("send");
        }));
        drop(held);
        gate_tx.send(()).expect("open");
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the job ran and the pool went without a deadlock");
    }

    #[test]
    fn refuses_zero_workers() {
        assert!(WorkerPool::new(0, "w").is_err());
    }
}
