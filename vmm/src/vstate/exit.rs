//! How a VM stops: the reasons the guest (or QMP) gives, and the shared state every vCPU
//! polls and the VMM's main thread waits on.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// Why the guest stopped. `cryptvm run` ends with status 0 for each but
/// [`ExitReason::DebugExit`] and [`ExitReason::Timeout`] (docs/run.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// ACPI power off (S5) or a KVM shutdown system event.
    PowerOff,
    /// Reset: i8042 0xfe, the ACPI reset register, or a KVM reset system event.
    Reset,
    /// `KVM_EXIT_SHUTDOWN` (triple fault) or a halted vCPU with no irqchip.
    Shutdown,
    /// QMP `quit`.
    Quit,
    /// The guest wrote this value to an `isa-debug-exit` port.
    DebugExit(u32),
    /// The run's time limit (`--timeout`) passed.
    Timeout,
}

/// How the VM is shut down and reports its outcome: the first request wins; every vCPU
/// and the waiting thread see `stopping()`.
pub struct ExitState {
    stop: AtomicBool,
    outcome: Mutex<Option<Result<ExitReason, String>>>,
    evt: EventFd,
}

impl ExitState {
    /// No stop requested yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitState {
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            evt: EventFd::new(0)?,
        })
    }

    fn set(&self, outcome: Result<ExitReason, String>) {
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(outcome);
        }
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    /// The guest asked to stop for `reason`.
    pub fn request(&self, reason: ExitReason) {
        self.set(Ok(reason));
    }

    /// The VMM failed.
    pub fn fail(&self, msg: String) {
        self.set(Err(msg));
    }

    /// Whether the VM is stopping.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Blocks until someone requested the VM to stop; returns the first request. After
    /// `limit` (when given, counted from now) it requests [`ExitReason::Timeout`] itself.
    pub(crate) fn wait(&self, limit: Option<Duration>) -> Result<ExitReason, String> {
        let deadline = limit.and_then(|l| Instant::now().checked_add(l));
        loop {
            if let Some(outcome) = self
                .outcome
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return outcome;
            }
            match deadline {
                None => {
                    let _ = self.evt.read();
                }
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        self.request(ExitReason::Timeout);
                    } else if readable_within(&self.evt, left) {
                        let _ = self.evt.read();
                    }
                }
            }
        }
    }
}

/// Whether `evt` becomes readable within `limit` (false on a timeout or an error; the
/// caller checks the time again).
fn readable_within(evt: &EventFd, limit: Duration) -> bool {
    let mut fds = [libc::pollfd {
        fd: evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // At most a minute per poll: the caller loops until the deadline.
    let ms = limit.as_millis().clamp(1, 60_000) as libc::c_int;
    // SAFETY: `fds` is a valid array of one pollfd that lives across the call, and the
    // count passed is its length.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
    n > 0 && fds[0].revents & libc::POLLIN != 0
}
