//! What the config's cold plug and a control client (QMP) may ask of a VM: the typed
//! actions, the one place that runs them, and the answers of its queries.

pub mod action;
pub mod jobs;
pub mod queries;
pub mod vm_control;

pub use action::{Action, BlockdevSpec, DeviceSpec, ObjectSpec, Query};
pub use vm_control::VmControl;
