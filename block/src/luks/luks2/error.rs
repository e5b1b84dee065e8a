//! Errors of the LUKS2 metadata: binary headers, JSON, key slots, digests
//! and segments. Messages name the field at fault; they never contain a
//! passphrase or key bytes.

/// What can be wrong with a LUKS2 volume's metadata, or why it is refused.
#[derive(Debug, thiserror::Error)]
pub enum Luks2Error {
    /// Neither header copy is usable; says why for each.
    #[error("No usable LUKS2 header: primary: {primary}; secondary: {secondary}")]
    NoValidHeader {
        /// Why the primary header (at offset 0) was rejected.
        primary: String,
        /// Why the secondary header was rejected (or that none was found).
        secondary: String,
    },

    /// One header copy is damaged (bad magic, size or checksum).
    #[error("{0}")]
    BadHeader(String),

    /// The JSON area is not valid JSON.
    #[error("LUKS2 JSON metadata is malformed: {0}")]
    Json(String),

    /// The JSON nests deeper than allowed.
    #[error("LUKS2 JSON metadata nests deeper than {limit} levels")]
    TooDeep {
        /// The limit.
        limit: usize,
    },

    /// A field is missing, of the wrong type, or holds an impossible value.
    #[error("LUKS2 metadata field '{field}' {problem}")]
    Field {
        /// The field, as a JSON path (e.g. `keyslots.0.af.stripes`).
        field: String,
        /// What is wrong with it.
        problem: String,
    },

    /// A feature of the metadata that is not implemented (e.g. a KDF or a
    /// digest type, integrity protection).
    #[error("LUKS2 {0} is not supported")]
    Unsupported(String),

    /// The volume lists mandatory requirements this implementation does not
    /// meet.
    #[error("LUKS2 volume has unsupported mandatory requirements: {0}")]
    Requirements(String),

    /// The volume is in the middle of an online reencryption.
    #[error("LUKS2 online reencryption is not supported ({0})")]
    Reencryption(String),

    /// An Argon2 key slot wants more memory than allowed.
    #[error(
        "LUKS2 field 'keyslots.{slot}.kdf.memory' asks for {kib} KiB of Argon2 memory, \
         more than the limit of {limit} KiB"
    )]
    Argon2Memory {
        /// The key slot.
        slot: u32,
        /// Memory asked for, in KiB.
        kib: u64,
        /// The limit, in KiB.
        limit: u64,
    },
}

impl Luks2Error {
    /// Shorthand for [`Luks2Error::Field`].
    pub(crate) fn field(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Luks2Error::Field {
            field: field.into(),
            problem: problem.into(),
        }
    }
}
