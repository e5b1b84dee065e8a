//! Errors of the block layer.

use std::io;

/// Result of block layer operations.
pub type Result<T, E = BlockError> = std::result::Result<T, E>;

/// What went wrong in the block layer, with the context needed to act on it.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// An option is missing, unknown or of the wrong type; `key` is its full path.
    #[error("{key}: {msg}")]
    Option {
        /// Full key path, e.g. `blockdevs[3].key-secret`.
        key: String,
        /// What is wrong with it.
        msg: String,
    },
    /// An I/O error while doing `what`.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, and to which file.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A request beyond the end of the node.
    #[error(
        "request at offset {offset} length {len} is beyond the end of node '{node}' ({size} bytes)"
    )]
    OutOfRange {
        /// Node name.
        node: String,
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Node size.
        size: u64,
    },
    /// A write to a read-only node.
    #[error("node '{0}' is read-only")]
    ReadOnly(String),
    /// A LUKS volume could not be opened, created or used.
    #[error(transparent)]
    Luks(#[from] crate::luks::LuksError),
    /// A secret object could not be made or found.
    #[error(transparent)]
    Secret(#[from] crate::secret::SecretError),
    /// The qcow2 driver refused an image or a request; `node` is the key
    /// path of the node's options when it has one (`blockdevs[1]`).
    #[error("{}qcow2: {source}", node.as_deref().map(|n| format!("{n}: ")).unwrap_or_default())]
    Qcow2 {
        /// Key path of the node's options, if any.
        node: Option<String>,
        /// What is wrong.
        #[source]
        source: crate::qcow2::Qcow2Error,
    },
    /// A backing file could not be opened.
    #[error("Could not open backing file '{path}': {source}")]
    Backing {
        /// The backing file's path.
        path: String,
        /// Why.
        #[source]
        source: Box<BlockError>,
    },
    /// The node graph refused an operation.
    #[error(transparent)]
    Graph(#[from] GraphError),
    /// The node's driver cannot do this (`'raw' nodes cannot be resized`).
    #[error("{0}")]
    NotSupported(String),
    /// An error about the options at `path` (`blockdevs[1]`, `objects[0]`)
    /// whose own words do not say where; see [`BlockError::at`].
    #[error("{path}: {source}")]
    At {
        /// Key path of the options.
        path: String,
        /// What is wrong.
        #[source]
        source: Box<BlockError>,
    },
    /// A lock was poisoned by a panic in another request; `what` names it.
    #[error("{0}: lock poisoned by a panic")]
    Poisoned(&'static str),
    /// A resize was refused.
    #[error(transparent)]
    Resize(#[from] crate::resize::ResizeError),
    /// A snapshot operation was refused.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// Why the node graph refused an operation (QEMU's wording).
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// No node of that name, as `device_add`/`attach` words it.
    #[error("Cannot find device='' nor node-name='{0}'")]
    NoDeviceNorNode(String),
    /// No node of that name, as `blockdev-del` words it.
    #[error("Failed to find node with node-name='{0}'")]
    NotFound(String),
    /// A node made inline by another node's options.
    #[error("Node {0} is not owned by the monitor")]
    NotOwned(String),
    /// A device uses the node.
    #[error("Node {0} is in use")]
    InUse(String),
    /// Another node uses the node.
    #[error("Node {node} is in use by node '{parent}'")]
    InUseBy {
        /// The node.
        node: String,
        /// The node that uses it.
        parent: String,
    },
    /// A node-name was taken while nodes of that name were being opened.
    #[error("Duplicate nodes with node-name='{0}'")]
    Duplicate(String),
    /// A second device wants a node that a device already writes.
    #[error("Permission conflict on node '{node}': permissions 'write' are both required by block device '{holder}' (uses node '{node}' as 'root' child) and unshared by block device '{user}' (uses node '{node}' as 'root' child).")]
    PermissionConflict {
        /// The node.
        node: String,
        /// The device that has it.
        holder: String,
        /// The device that asked.
        user: String,
    },
}

/// What kind of failure an error is, for code that acts on it (QMP's
/// `nospace`, a guest's status codes, exit codes) without reading messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A bad option, argument or request.
    InvalidArgument,
    /// A named thing (node, secret, file) does not exist.
    NotFound,
    /// It is used by something else.
    InUse,
    /// Not allowed: a read-only node, a file's permissions, a wrong passphrase.
    PermissionDenied,
    /// A format feature or operation that is not implemented.
    NotSupported,
    /// The image's metadata contradicts itself.
    Corrupt,
    /// The host's disk (or quota) is full.
    NoSpace,
    /// Any other I/O error; [`BlockError::errno`] has the code.
    Io,
    /// An internal failure (a lock poisoned by a panic).
    Internal,
}

fn io_kind(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT) => return ErrorKind::NoSpace,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => return ErrorKind::PermissionDenied,
        Some(libc::ENOENT) => return ErrorKind::NotFound,
        Some(libc::EOPNOTSUPP) => return ErrorKind::NotSupported,
        Some(_) => return ErrorKind::Io,
        None => {}
    }
    match e.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        io::ErrorKind::Unsupported => ErrorKind::NotSupported,
        io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => ErrorKind::Corrupt,
        _ => ErrorKind::Io,
    }
}

impl BlockError {
    /// An [`BlockError::Io`] saying what was being done.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    /// Whether the error is the host's disk being full (`ENOSPC`), which
    /// QMP's `BLOCK_IO_ERROR` reports as `nospace`.
    pub fn is_no_space(&self) -> bool {
        self.kind() == ErrorKind::NoSpace
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        use crate::luks::LuksError as L;
        use crate::qcow2::Qcow2Error as Q;
        use crate::secret::SecretError as S;
        match self {
            Self::Option { .. } | Self::OutOfRange { .. } => ErrorKind::InvalidArgument,
            Self::Io { source, .. } => io_kind(source),
            Self::ReadOnly(_) => ErrorKind::PermissionDenied,
            Self::Luks(e) => match e {
                L::NotLuks
                | L::InvalidArgument(_)
                | L::KeyLength { .. }
                | L::KdfTooCostly { .. } => ErrorKind::InvalidArgument,
                L::Luks2Unsupported | L::UnsupportedVersion(_) | L::Unsupported(_) => {
                    ErrorKind::NotSupported
                }
                L::Truncated { .. } | L::Corrupt(_) => ErrorKind::Corrupt,
                L::WrongPassphrase => ErrorKind::PermissionDenied,
                L::HeaderShared { .. } => ErrorKind::InUse,
                L::Io { source, .. } => io_kind(source),
                L::Random(_) => ErrorKind::Io,
                L::Luks2(e) => {
                    use crate::luks::luks2::Luks2Error as L2;
                    match e {
                        L2::NoValidHeader { .. }
                        | L2::BadHeader(_)
                        | L2::Json(_)
                        | L2::TooDeep { .. }
                        | L2::Field { .. } => ErrorKind::Corrupt,
                        L2::Unsupported(_) | L2::Requirements(_) | L2::Reencryption(_) => {
                            ErrorKind::NotSupported
                        }
                        L2::Argon2Memory { .. } => ErrorKind::InvalidArgument,
                    }
                }
            },
            Self::Secret(e) => match e {
                S::NotFound(_) => ErrorKind::NotFound,
                S::InUse(_) => ErrorKind::InUse,
                S::File { source, .. } => io_kind(source),
                _ => ErrorKind::InvalidArgument,
            },
            Self::Qcow2 { source, .. } => match source {
                Q::BadMagic | Q::Invalid(_) | Q::HeaderFull | Q::CompressedUnaligned { .. } => {
                    ErrorKind::InvalidArgument
                }
                // QEMU's -EIO.
                Q::CompressedOverwrite { .. } => ErrorKind::Io,
                Q::Unsupported(_) | Q::LegacyAes => ErrorKind::NotSupported,
                Q::CorruptReadOnly => ErrorKind::PermissionDenied,
                Q::Corrupt(_)
                | Q::Decompress { .. }
                | Q::Overlap { .. }
                | Q::OverlapFree { .. } => ErrorKind::Corrupt,
            },
            Self::Backing { source, .. } | Self::At { source, .. } => source.kind(),
            Self::Graph(e) => match e {
                GraphError::NoDeviceNorNode(_) | GraphError::NotFound(_) => ErrorKind::NotFound,
                GraphError::InUse(_) | GraphError::InUseBy { .. } | GraphError::Duplicate(_) => {
                    ErrorKind::InUse
                }
                GraphError::PermissionConflict { .. } | GraphError::NotOwned(_) => {
                    ErrorKind::PermissionDenied
                }
            },
            Self::NotSupported(_) => ErrorKind::NotSupported,
            Self::Poisoned(_) => ErrorKind::Internal,
            Self::Resize(e) => match e {
                crate::resize::ResizeError::Unaligned
                | crate::resize::ResizeError::ShrinkPreallocated
                | crate::resize::ResizeError::TooLarge
                | crate::resize::ResizeError::L1TooLarge => ErrorKind::InvalidArgument,
                crate::resize::ResizeError::V2Snapshots
                | crate::resize::ResizeError::UnsupportedPrealloc(_)
                | crate::resize::ResizeError::FixedSizeRaw => ErrorKind::NotSupported,
            },
            Self::Snapshot(e) => match e {
                crate::snapshot::SnapshotError::NotSupported => ErrorKind::NotSupported,
                crate::snapshot::SnapshotError::NotFound => ErrorKind::NotFound,
                crate::snapshot::SnapshotError::RefcountOverflow => ErrorKind::InvalidArgument,
                crate::snapshot::SnapshotError::Exists => ErrorKind::InUse,
                crate::snapshot::SnapshotError::TooLarge => ErrorKind::NoSpace,
                crate::snapshot::SnapshotError::BadL1(_) => ErrorKind::Corrupt,
            },
        }
    }

    /// The operating system's error code, for an I/O error that has one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Io { source, .. } | Self::Luks(crate::luks::LuksError::Io { source, .. }) => {
                source.raw_os_error()
            }
            Self::Secret(crate::secret::SecretError::File { source, .. }) => source.raw_os_error(),
            Self::Backing { source, .. } | Self::At { source, .. } => source.errno(),
            _ => None,
        }
    }

    /// This error, saying that it is about the options at `path` unless it
    /// already names a key (an option error, a qcow2 error with its node's
    /// path) or `path` is empty (QMP's arguments have no path).
    pub fn at(self, path: &str) -> Self {
        match self {
            _ if path.is_empty() => self,
            Self::Option { .. } | Self::Qcow2 { node: Some(_), .. } | Self::At { .. } => self,
            other => Self::At {
                path: path.to_string(),
                source: Box::new(other),
            },
        }
    }

    /// An [`BlockError::Option`] for the option at `key`.
    pub fn option(key: impl Into<String>, msg: impl Into<String>) -> Self {
        Self::Option {
            key: key.into(),
            msg: msg.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::luks::LuksError;
    use crate::qcow2::Qcow2Error;

    #[test]
    fn kinds_come_from_the_variant_not_the_message() {
        let enospc = BlockError::io("writing", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(enospc.kind(), ErrorKind::NoSpace);
        assert!(enospc.is_no_space());
        assert_eq!(enospc.errno(), Some(libc::ENOSPC));
        let eio = BlockError::io("reading", io::Error::from_raw_os_error(libc::EIO));
        assert_eq!((eio.kind(), eio.errno()), (ErrorKind::Io, Some(libc::EIO)));
        assert!(!eio.is_no_space());
        let corrupt = BlockError::from(Qcow2Error::corrupt("L1 table beyond the file"));
        assert_eq!(corrupt.kind(), ErrorKind::Corrupt);
        assert_eq!(
            corrupt.to_string(),
            "qcow2: Image is corrupt: L1 table beyond the file"
        );
        let named = BlockError::Qcow2 {
            node: Some("blockdevs[1]".into()),
            source: Qcow2Error::Unsupported("extended L2".into()),
        };
        assert_eq!(named.kind(), ErrorKind::NotSupported);
        assert_eq!(named.to_string(), "blockdevs[1]: qcow2: extended L2");
        let backing = BlockError::Backing {
            path: "/b.qcow2".into(),
            source: Box::new(BlockError::io(
                "opening",
                io::Error::from_raw_os_error(libc::ENOENT),
            )),
        };
        assert_eq!(backing.kind(), ErrorKind::NotFound);
        assert_eq!(backing.errno(), Some(libc::ENOENT));
        assert_eq!(
            BlockError::from(LuksError::WrongPassphrase).kind(),
            ErrorKind::PermissionDenied
        );
        assert_eq!(
            BlockError::from(GraphError::InUse("d".into())).kind(),
            ErrorKind::InUse
        );
        assert_eq!(BlockError::Poisoned("x").kind(), ErrorKind::Internal);
    }
}
