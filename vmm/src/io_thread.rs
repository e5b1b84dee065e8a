//! I/O threads: one thread per virtqueue waits on the queue's ioeventfd and
//! serves the queue, so guest I/O never runs on a vCPU thread and queues of
//! the same or different disks proceed in parallel.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

const KICK: u64 = 0;
const STOP: u64 = 1;

/// A thread that runs `work` each time `kick` is signalled, until dropped.
pub struct IoThread {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl IoThread {
    /// Starts thread `name`, serving `work` whenever `kick` fires (and once at
    /// start, in case the guest notified before the thread existed).
    pub fn spawn(
        name: String,
        kick: Arc<EventFd>,
        work: impl Fn() + Send + 'static,
    ) -> io::Result<IoThread> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KICK),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        let stop_seen = stop.try_clone()?;
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            work();
            let mut events = [EpollEvent::default(); 2];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                let mut kicked = false;
                for e in &events[..n] {
                    match e.data() {
                        STOP => {
                            let _ = stop_seen.read();
                            return;
                        }
                        _ => kicked = true,
                    }
                }
                if kicked {
                    let _ = kick.read();
                    work();
                }
            }
        })?;
        Ok(IoThread {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    #[test]
    fn runs_work_on_each_kick_and_stops_on_drop() {
        let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let t = IoThread::spawn("io-test".into(), kick.clone(), move || {
            c.fetch_add(1, Ordering::SeqCst);
        })
        .expect("spawn");
        let wait_for = |n: usize| {
            let start = Instant::now();
            while count.load(Ordering::SeqCst) < n {
                assert!(start.elapsed() < Duration::from_secs(5), "work never ran");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        wait_for(1); // the initial pass
        kick.write(1).expect("kick");
        wait_for(2);
        drop(t);
        let after = count.load(Ordering::SeqCst);
        kick.write(1).expect("kick after stop");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(count.load(Ordering::SeqCst), after, "work after drop");
    }
}
