//! The one set of typed actions on a VM. The config's cold plug is a list of them
//! ([`crate::config::coldplug::ColdPlug::actions`]) and every QMP command that reaches
//! the VM is one ([`crate::qmp`]'s command table); [`crate::control::VmControl::execute`]
//! runs both, so a disk from the config and a hot-plugged one take the same path.

use std::path::PathBuf;

use serde_json::{Map, Value};

use super::jobs::JobVerb;
use crate::device_manager::virtio_blk::BlkProps;

/// An `object-add` (a secret): the whole arguments object, checked by the block
/// layer's secret store when it is added.
#[derive(Debug, Clone)]
pub struct ObjectSpec {
    /// Where it came from, for errors: `objects[0]` in a config, empty over QMP.
    pub path: String,
    /// The `object-add` arguments (`qom-type`, `id`, ...).
    pub args: Map<String, Value>,
    /// Folder for relative file names (the config file's), none over QMP.
    pub base_dir: Option<PathBuf>,
}

/// A `blockdev-add`: the whole arguments object, typed and opened by the block graph.
#[derive(Debug, Clone)]
pub struct BlockdevSpec {
    /// Where it came from, for errors: `blockdevs[0]` in a config, empty over QMP.
    pub path: String,
    /// The `blockdev-add` arguments (`driver`, `node-name`, ...).
    pub args: Map<String, Value>,
    /// Folder for relative file names (the config file's), none over QMP.
    pub base_dir: Option<PathBuf>,
}

/// A `device_add` of a virtio-blk-pci disk, its properties parsed.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// Where it came from, for errors: `devices[0]` in a config, empty over QMP.
    pub path: String,
    /// Its properties.
    pub props: BlkProps,
}

/// What a query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// `query-status`.
    Status,
    /// `query-block`.
    Block,
    /// `query-named-block-nodes` (`flat`: without the children's details).
    NamedBlockNodes {
        /// QMP's `flat`.
        flat: bool,
    },
    /// `query-pci`.
    Pci,
    /// `query-jobs`.
    Jobs,
}

/// One thing asked of the VM.
#[derive(Debug, Clone)]
pub enum Action {
    /// Adds a secret.
    ObjectAdd(ObjectSpec),
    /// Removes the secret with this id.
    ObjectDel(String),
    /// Adds block nodes.
    BlockdevAdd(BlockdevSpec),
    /// Removes the node with this node-name.
    BlockdevDel(String),
    /// Adds a disk.
    DeviceAdd(DeviceSpec),
    /// Starts the unplug of the device with this id.
    DeviceDel(String),
    /// Starts a `blockdev-create` job.
    BlockdevCreate {
        /// `job-id`.
        job_id: String,
        /// What to create.
        options: Box<block::create::CreateOptions>,
    },
    /// `job-cancel`, `job-complete`, `job-finalize` or `job-dismiss` of the job `id`.
    Job {
        /// Which.
        verb: JobVerb,
        /// The job.
        id: String,
    },
    /// Answers a query.
    Query(Query),
    /// Presses the ACPI power button.
    SystemPowerdown,
    /// Stops the VM.
    Quit,
}

impl Action {
    /// The QMP command this action is.
    pub fn command(&self) -> &'static str {
        match self {
            Action::ObjectAdd(_) => "object-add",
            Action::ObjectDel(_) => "object-del",
            Action::BlockdevAdd(_) => "blockdev-add",
            Action::BlockdevDel(_) => "blockdev-del",
            Action::DeviceAdd(_) => "device_add",
            Action::DeviceDel(_) => "device_del",
            Action::Query(Query::Status) => "query-status",
            Action::Query(Query::Block) => "query-block",
            Action::Query(Query::NamedBlockNodes { .. }) => "query-named-block-nodes",
            Action::Query(Query::Pci) => "query-pci",
            Action::Query(Query::Jobs) => "query-jobs",
            Action::BlockdevCreate { .. } => "blockdev-create",
            Action::Job { verb, .. } => verb.command(),
            Action::SystemPowerdown => "system_powerdown",
            Action::Quit => "quit",
        }
    }
}
