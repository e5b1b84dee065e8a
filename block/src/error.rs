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
    /// The node graph refused an operation.
    #[error("{0}")]
    Graph(String),
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
        matches!(self, Self::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC))
    }

    /// An [`BlockError::Option`] for the option at `key`.
    pub fn option(key: impl Into<String>, msg: impl Into<String>) -> Self {
        Self::Option {
            key: key.into(),
            msg: msg.into(),
        }
    }
}
