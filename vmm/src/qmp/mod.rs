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

mod commands;
mod events;
mod lexer;
mod parser;
mod protocol;
mod server;
mod transport;
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

/// What the QMP commands act on (implemented by the running VM).
///
/// The server checks the request envelope and the arguments of the commands whose
/// arguments are fixed (`object-del`, `blockdev-del`, `device_del`,
/// `query-named-block-nodes`, and no arguments for the others) before calling; the
/// `*_add` commands get the `arguments` object as sent (empty when absent) and check it
/// themselves. Calls from all clients are serialised (one at a time, like QEMU's big
/// lock), on the calling client's thread. A panic in a call is reported to that client
/// as a `GenericError`.
pub trait QmpBackend: Send + Sync {
    /// `object-add` (secrets): the whole `arguments` object (`qom-type`, `id`, ...).
    fn object_add(&self, args: &serde_json::Map<String, serde_json::Value>)
        -> Result<(), QmpError>;
    /// `object-del`.
    fn object_del(&self, id: &str) -> Result<(), QmpError>;
    /// `blockdev-add`: the whole `arguments` object (`driver`, `node-name`, ...).
    fn blockdev_add(
        &self,
        args: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), QmpError>;
    /// `blockdev-del`.
    fn blockdev_del(&self, node_name: &str) -> Result<(), QmpError>;
    /// `device_add`: the whole `arguments` object (`driver`, `id`, `drive`, ...).
    fn device_add(&self, args: &serde_json::Map<String, serde_json::Value>)
        -> Result<(), QmpError>;
    /// `device_del`: starts the unplug; the VM emits `DEVICE_DELETED` when the guest
    /// has released the device.
    fn device_del(&self, id: &str) -> Result<(), QmpError>;
    /// `query-block`'s return value (an array).
    fn query_block(&self) -> serde_json::Value;
    /// `query-named-block-nodes`'s return value (an array).
    fn query_named_block_nodes(&self, flat: bool) -> serde_json::Value;
    /// `query-pci`'s return value (an array).
    fn query_pci(&self) -> serde_json::Value;
    /// "running" etc. for query-status.
    fn status(&self) -> &'static str;
    /// `system_powerdown`: presses the ACPI power button.
    fn system_powerdown(&self) -> Result<(), QmpError>;
    /// Stops the VM (the reply is sent before the VM goes away).
    fn quit(&self);
}
