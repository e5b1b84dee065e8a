//! LUKS2 volumes, opened and created ([`create`]): the two binary headers with their
//! checksums, the JSON metadata, key slots (PBKDF2, Argon2i, Argon2id),
//! PBKDF2 digests and the `crypt` segment; per cryptsetup's LUKS2 on-disk
//! format. Reencryption, integrity and unknown mandatory requirements are
//! refused; tokens are ignored.

pub mod binary_header;
pub mod create;
mod error;
pub mod json;
pub mod keyslot;

pub use binary_header::is_luks2;
pub use error::Luks2Error;
pub use json::{Kdf, Keyslot, Metadata, Segment};

use binary_header::{HeaderCopy, ReadFn};

/// A parsed LUKS2 volume: the header copy in use and its metadata.
#[derive(Clone, Debug)]
pub struct Luks2Header {
    /// The binary header in use (the intact copy with the highest seqid).
    pub header: HeaderCopy,
    /// Its decoded JSON.
    pub meta: Metadata,
}

impl Luks2Header {
    /// Reads both header copies from a node of `node_size` bytes and keeps
    /// the intact one (checksum and JSON) with the highest seqid, as
    /// cryptsetup does; `detached` as for [`Metadata::parse`].
    pub fn read(read: &mut ReadFn<'_>, node_size: u64, detached: bool) -> Result<Self, Luks2Error> {
        let copies = binary_header::read_copies(read, node_size)?;
        let mut best: Option<Luks2Header> = None;
        let mut first_err = None;
        for copy in copies {
            match Metadata::parse(&copy.json, copy.hdr_size, detached) {
                Ok(meta) => {
                    if best.as_ref().is_none_or(|b| copy.seqid > b.header.seqid) {
                        best = Some(Luks2Header { header: copy, meta });
                    }
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match (best, first_err) {
            (Some(b), _) => Ok(b),
            (None, Some(e)) => Err(e),
            (None, None) => Err(Luks2Error::BadHeader("no LUKS2 header".into())),
        }
    }

    /// End of the metadata and key slot areas in the header node.
    pub fn metadata_end(&self) -> u64 {
        2 * self.header.hdr_size + self.meta.keyslots_size
    }
}

#[cfg(test)]
pub(crate) mod tests;
