//! Internal snapshots of a node (qcow2's), as QEMU's `bdrv_snapshot_*`:
//! the errors, worded as QEMU words them (`strerror` texts where QEMU
//! reports an errno).

pub use crate::qcow2::SnapshotInfo;

/// Why a snapshot operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The driver keeps no snapshots (`-ENOTSUP`).
    #[error("Operation not supported")]
    NotSupported,
    /// No snapshot of that ID or name (`-ENOENT`).
    #[error("No such file or directory")]
    NotFound,
    /// An ID is taken (`-EEXIST`).
    #[error("File exists")]
    Exists,
    /// The table would hold too many snapshots or too many bytes (`-EFBIG`).
    #[error("File too large")]
    TooLarge,
    /// A refcount would exceed what the image's refcount width holds
    /// (QEMU's `-EINVAL` from `update_refcount`).
    #[error("Invalid argument")]
    RefcountOverflow,
    /// The snapshot's L1 table is out of bounds (QEMU's `qcow2_validate_table`).
    #[error("Snapshot L1 table {0}")]
    BadL1(&'static str),
}

/// Which snapshot to use: by ID, by name, or both must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotRef<'a> {
    /// The first whose ID matches, else the first whose name matches
    /// (QEMU's `find_snapshot_by_id_or_name`).
    IdOrName(&'a str),
    /// QEMU's `find_snapshot_by_id_and_name`: what is given must match.
    IdAndName {
        /// The ID, if given.
        id: Option<&'a str>,
        /// The name, if given.
        name: Option<&'a str>,
    },
}
