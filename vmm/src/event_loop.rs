//! The VMM's event loop (event-manager) on its own thread, for device and control events
//! (guest console input; later QMP and virtio). vCPUs run on their own threads.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use devices::serial::Serial;

/// A subscriber the loop can own.
pub type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// The running loop.
pub struct EventLoop {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts a thread running an event manager with `subscribers`.
    pub fn start(subscribers: Vec<Subscriber>) -> io::Result<EventLoop> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop_copy = stop.try_clone()?;
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(|e| io::Error::other(format!("event manager: {e}")))?;
        let done = Arc::new(AtomicBool::new(false));
        manager.add_subscriber(Box::new(StopListener {
            evt: stop_copy,
            done: done.clone(),
        }));
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let thread = std::thread::Builder::new()
            .name("event-loop".into())
            .spawn(move || {
                crate::seccomp::thread_start(crate::seccomp::ThreadKind::EventLoop);
                while !done.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run() {
                        eprintln!("cryptvm: event loop: {e}");
                        break;
                    }
                }
            })?;
        Ok(EventLoop {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the loop and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = thread.join();
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct StopListener {
    evt: EventFd,
    done: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopListener {
    fn init(&mut self, ops: &mut EventOps) {
        // Cannot fail on a fresh epoll set with a fresh fd.
        let _ = ops.add(Events::new(&self.evt, EventSet::IN));
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.done.store(true, Ordering::SeqCst);
    }
}

/// Feeds what is typed on the host terminal (stdin) to the guest's serial port.
pub struct StdinInput {
    serial: Arc<Mutex<Serial>>,
}

impl StdinInput {
    /// Input for `serial`.
    pub fn new(serial: Arc<Mutex<Serial>>) -> Self {
        StdinInput { serial }
    }
}

impl MutEventSubscriber for StdinInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(io::stdin().as_raw_fd(), EventSet::IN)) {
            eprintln!("cryptvm: cannot watch stdin for console input: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        let n = if events.event_set().contains(EventSet::IN) {
            crate::cli::terminal::read_stdin(&mut buf)
        } else {
            Ok(0)
        };
        match n {
            Ok(n) if n > 0 => self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue_input(&buf[..n]),
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock => {}
            // End of input or an error: stop watching stdin.
            _ => {
                let _ = ops.remove(events);
            }
        }
    }
}
