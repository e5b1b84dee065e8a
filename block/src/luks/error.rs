//! Errors of the LUKS format code: header parsing and validation, cipher
//! specifications, key slots and volume creation.
//!
//! Messages follow QEMU's wording where QEMU has one, so that users and
//! scripts see the same text. They never contain a passphrase or key bytes.

/// Everything that can go wrong while reading, unlocking or creating a LUKS1
/// volume.
#[derive(Debug, thiserror::Error)]
pub enum LuksError {
    /// The magic bytes are not `LUKS\xba\xbe`.
    #[error("Volume is not in LUKS format")]
    NotLuks,

    /// A LUKS2 header (version 2), which is not implemented.
    #[error("LUKS2 is not supported yet")]
    Luks2Unsupported,

    /// A LUKS version other than 1 or 2.
    #[error("LUKS version {0} is not supported")]
    UnsupportedVersion(u16),

    /// Fewer bytes than a LUKS1 header needs.
    #[error("LUKS header is truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },

    /// The header holds impossible values (key size, stripes, iterations,
    /// slot states or overlapping areas); the message names the field.
    #[error("{0}")]
    Corrupt(String),

    /// A cipher, mode, IV generator or hash that is not supported, or a
    /// combination of them that does not work together.
    #[error("{0}")]
    Unsupported(String),

    /// A key given to a cipher has the wrong length for its specification.
    #[error("Invalid key length {got} bytes for {what}, expected {expected} bytes")]
    KeyLength {
        /// What the key was for (e.g. `"aes-256-xts"`).
        what: String,
        /// Length the cipher needs.
        expected: usize,
        /// Length given.
        got: usize,
    },

    /// Trying the passphrase on every active slot would cost more PBKDF2
    /// iterations than allowed (a hostile header can ask for 8 x 2^32).
    #[error(
        "The keyslots' key derivation costs {total} PBKDF2 iterations, more than the \
         limit of {limit}; to open a header you trust, raise the luks option \
         'kdf-iterations-limit'"
    )]
    KdfTooCostly {
        /// Iterations over every active slot (slot key and master key digest).
        total: u64,
        /// The limit in force.
        limit: u64,
    },

    /// The passphrase opens none of the active key slots.
    #[error("Invalid password, cannot unlock any keyslot")]
    WrongPassphrase,

    /// Reading part of the header node failed.
    #[error("Failed to read {what}: {source}")]
    Io {
        /// What was being read, e.g. `"key material of keyslot 0 (256000 bytes at offset 4096)"`.
        what: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// The operating system's random number generator failed.
    #[error("Unable to read random bytes: {0}")]
    Random(String),

    /// An option or a computed value is out of range (e.g. a PBKDF2
    /// iteration count that does not fit the header).
    #[error("{0}")]
    InvalidArgument(String),

    /// A write to a detached header (amend, a resize that rewrites it) while
    /// more than one luks node uses that header.
    #[error(
        "The LUKS header node '{header}' is shared by the luks nodes {}: it cannot be \
         written while more than one node uses it",
        quoted(users)
    )]
    HeaderShared {
        /// The header node's node-name.
        header: String,
        /// The node-names of the luks nodes using it.
        users: Vec<String>,
    },

    /// A LUKS2 volume's metadata is damaged or refused.
    #[error(transparent)]
    Luks2(#[from] super::luks2::Luks2Error),
}

impl LuksError {
    /// Shorthand for [`LuksError::Corrupt`].
    pub fn corrupt(msg: impl Into<String>) -> Self {
        LuksError::Corrupt(msg.into())
    }

    /// Shorthand for [`LuksError::Unsupported`].
    pub(crate) fn unsupported(msg: impl Into<String>) -> Self {
        LuksError::Unsupported(msg.into())
    }
}

/// `'a', 'b'`: names for a message.
fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Fills `buf` with random bytes from the operating system.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<(), LuksError> {
    getrandom::getrandom(buf).map_err(|e| LuksError::Random(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        assert_eq!(
            LuksError::NotLuks.to_string(),
            "Volume is not in LUKS format"
        );
        assert_eq!(
            LuksError::Luks2Unsupported.to_string(),
            "LUKS2 is not supported yet"
        );
        assert_eq!(
            LuksError::WrongPassphrase.to_string(),
            "Invalid password, cannot unlock any keyslot"
        );
        assert_eq!(
            LuksError::UnsupportedVersion(3).to_string(),
            "LUKS version 3 is not supported"
        );
        let e = LuksError::Io {
            what: "the key material".into(),
            source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short read"),
        };
        assert_eq!(e.to_string(), "Failed to read the key material: short read");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn random_bytes_fill() {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        random_bytes(&mut a).unwrap();
        random_bytes(&mut b).unwrap();
        assert_ne!(a, b);
    }
}
