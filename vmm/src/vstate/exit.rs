//! How a VM stops: the reasons the guest (or QMP) gives, and the shared state every vCPU
//! polls and the VMM's main thread waits on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Why the guest stopped (each ends `cryptvm run` with status 0).
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

    /// Blocks until someone requested the VM to stop; returns the first request.
    pub(crate) fn wait(&self) -> Result<ExitReason, String> {
        loop {
            if let Some(outcome) = self
                .outcome
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return outcome;
            }
            let _ = self.evt.read();
        }
    }
}
