//! Errors of the qcow2 driver.

use crate::BlockError;

/// What is wrong with a qcow2 image or request.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// The first bytes are not `QFI\xfb`.
    #[error("Image is not in qcow2 format")]
    BadMagic,
    /// A feature or layout this driver does not handle.
    #[error("{0}")]
    Unsupported(String),
    /// A legacy AES-CBC encrypted image opened by the VMM (QEMU's system
    /// emulators refuse them; qemu-img's tools open them).
    #[error(
        "Use of AES-CBC encrypted qcow2 images is no longer supported in system emulators\nYou can use 'qemu-img convert' to convert your image to an alternative supported format, such as unencrypted qcow2, or raw with the LUKS format instead."
    )]
    LegacyAes,
    /// Metadata that contradicts itself or the file.
    #[error("Image is corrupt: {0}")]
    Corrupt(String),
    /// A write to an image whose corrupt bit is set.
    #[error(
        "Image is corrupt (corrupt bit set): it was opened read-only; repair it with 'img check -r all'"
    )]
    CorruptReadOnly,
    /// A compressed cluster that does not decompress.
    #[error("compressed cluster at host offset {offset:#x} does not decompress: {msg}")]
    Decompress {
        /// Host offset of the compressed data.
        offset: u64,
        /// What went wrong.
        msg: String,
    },
    /// Guest data would be written over metadata (QEMU's overlap check).
    #[error("guest data at host offset {offset:#x} would overwrite metadata ({what}); the image is corrupt")]
    Overlap {
        /// Host offset of the refused write.
        offset: u64,
        /// Which metadata it hits.
        what: &'static str,
    },
    /// A guest cluster to be freed is metadata: freeing it would destroy it.
    #[error("guest cluster at host offset {offset:#x} is metadata ({what}) and cannot be freed; the image is corrupt")]
    OverlapFree {
        /// Host offset of the guest cluster.
        offset: u64,
        /// Which metadata it is.
        what: &'static str,
    },
    /// A compressed write that does not cover whole clusters (only the
    /// image's last cluster may be partial).
    #[error("compressed write of {len} bytes at {offset} does not cover whole clusters")]
    CompressedUnaligned {
        /// Guest offset of the request.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// A compressed write to a guest cluster that is allocated already
    /// (compressed clusters are only written into unallocated ones).
    #[error("compressed write to guest offset {offset}, whose cluster is allocated already")]
    CompressedOverwrite {
        /// Guest offset of the cluster.
        offset: u64,
    },
    /// An invalid creation option or size.
    #[error("{0}")]
    Invalid(String),
    /// The new header (backing file name, extensions) does not fit in the
    /// header cluster (QEMU's `-ENOSPC`).
    #[error("No space left in the file header")]
    HeaderFull,
}

impl Qcow2Error {
    /// A [`Qcow2Error::Corrupt`] with a formatted message.
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Self::Corrupt(msg.into())
    }
}

impl From<Qcow2Error> for BlockError {
    fn from(source: Qcow2Error) -> Self {
        BlockError::Qcow2 { node: None, source }
    }
}

/// Shorthand for a corrupt-image [`BlockError`].
pub(crate) fn corrupt(msg: impl Into<String>) -> BlockError {
    Qcow2Error::corrupt(msg).into()
}
