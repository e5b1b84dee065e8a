//! The QMP control socket: QEMU's monitor protocol, byte for byte where practical.
//!
//! [`QmpServer`] listens on a Unix socket (mode 0600) or `tcp:HOST:PORT`; every client
//! gets its own greeting and session and must negotiate with `qmp_capabilities` first.
//! Protocol commands (`qmp_capabilities`, `query-version`, `query-commands`,
//! `query-status`, `query-kvm`) are answered here; the others are checked like QEMU
//! checks them and then handed to the running VM through [`QmpBackend`]. Events go to
//! every negotiated client through [`EventBus`]. See `docs/qmp.md`.
//!
//! Modules: `lexer` and `parser` read QEMU's JSON dialect, `writer` prints it,
//! `protocol` is one client's session, `commands` the command table and argument
//! checks, `events` the event bus, `transport` sockets and addresses, `server` the
//! threads.

use std::fmt;

use crate::control::Action;

mod commands;
mod events;
mod lexer;
mod parser;
mod protocol;
mod server;
mod throttle;
mod transport;
mod wipe;
mod writer;

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

pub use events::EventBus;
pub use server::{QmpServer, QmpServerError};
pub(crate) use transport::{Address, Stream};

/// QEMU's error classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Any other failure (the usual class).
    GenericError,
    /// The command does not exist (or capabilities are not negotiated yet).
    CommandNotFound,
    /// The device named in the command does not exist.
    DeviceNotFound,
    /// The device exists but is not active.
    DeviceNotActive,
    /// KVM lacks a capability the command needs.
    KVMMissingCap,
}

impl ErrorClass {
    /// The class as QMP spells it (`"GenericError"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command's failure: class and description, as QMP reports it
/// (`{"error": {"class": ..., "desc": ...}}`).
///
/// QEMU's texts for the common cases, which backends should reuse: `device_del` of an
/// unknown id is `DeviceNotFound` "Device 'ID' not found"; `object-del`: "object 'ID'
/// not found"; `blockdev-del`: "Failed to find node with node-name='NAME'"; a missing
/// argument: "Parameter 'driver' is missing"; a wrong type: "Invalid parameter type for
/// 'NAME', expected: string" (or integer, boolean, object, array); an unknown argument:
/// "Parameter 'NAME' is unexpected".
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// The human-readable description.
    pub desc: String,
}

impl QmpError {
    /// An error of `class`.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// A `DeviceNotFound` error.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }
}

/// What the QMP commands act on (implemented by the running VM,
/// [`crate::control::VmControl`]).
///
/// The server checks the request envelope and each command's arguments and types them
/// into an [`Action`] before calling: QEMU's checks for the fixed arguments (`id`,
/// `node-name`, `flat`, none), [`BlkProps::parse`] for `device_add`; `object-add` and
/// `blockdev-add` carry their `arguments` object as sent (empty when absent), which
/// the block layer checks when it adds them. Each client's calls run on its own
/// thread, one after the other; calls of different clients may run at once (unlike
/// under QEMU's big lock: a `blockdev-add` that unlocks LUKS for seconds must not
/// stop other clients' queries), so the backend guards its own state. `quit` runs
/// once its reply is written. A panic in a call is reported to that client as a
/// `GenericError`.
///
/// [`BlkProps::parse`]: crate::device_manager::virtio_blk::BlkProps::parse
pub trait QmpBackend: Send + Sync {
    /// The VM's vCPUs (a disk's default `num-queues`).
    fn vcpus(&self) -> u8;
    /// Runs `action`; its QMP return value.
    fn execute(&self, action: Action) -> Result<serde_json::Value, QmpError>;
}
