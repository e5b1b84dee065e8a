//! The hook every device thread runs first thing: the VMM sets it to
//! install the thread's seccomp filter (this crate knows nothing of seccomp).

use std::sync::OnceLock;

/// The kinds of threads this crate starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceThread {
    /// A request worker of a [`crate::WorkerPool`].
    IoWorker,
    /// A virtqueue's thread.
    Queue,
}

/// What a thread runs before anything else.
pub type StartHook = fn(DeviceThread);

static START_HOOK: OnceLock<StartHook> = OnceLock::new();

/// Sets the hook (once per process); returns false if one was set already.
pub fn set_start_hook(hook: StartHook) -> bool {
    START_HOOK.set(hook).is_ok()
}

/// Runs the hook, if any, for a thread of `kind` (on that thread).
pub(crate) fn started(kind: DeviceThread) {
    if let Some(hook) = START_HOOK.get() {
        hook(kind);
    }
}
