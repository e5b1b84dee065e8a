//! What a control client (QMP) may ask of a running VM, and the answers of
//! its queries.

pub mod queries;
pub mod vm_control;

pub use vm_control::VmControl;
