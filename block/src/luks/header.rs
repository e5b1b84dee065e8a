//! The 592-byte LUKS1 header: big-endian encoding and decoding, and the
//! sanity checks QEMU (`qcrypto_block_luks_check_header`) and cryptsetup
//! apply before trusting any of its numbers.

use super::cipher::{CipherSpec, SECTOR_SIZE};
use super::error::LuksError;

/// `LUKS\xba\xbe`.
pub(crate) const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// Number of key slots.
pub(crate) const NUM_SLOTS: usize = 8;
/// Length of the PBKDF2 salts.
pub(crate) const SALT_LEN: usize = 32;
/// Length of the master key digest.
pub(crate) const DIGEST_LEN: usize = 20;
/// Length of the UUID field (36 characters and NULs).
const UUID_LEN: usize = 40;
/// Length of the cipher name, cipher mode and hash spec fields.
const NAME_LEN: usize = 32;
/// Slot state of an active key slot.
const SLOT_ENABLED: u32 = 0x00AC_71F3;
/// Slot state of an inactive key slot.
const SLOT_DISABLED: u32 = 0x0000_DEAD;
/// Key material areas are aligned to 4096 bytes, in sectors.
pub(crate) const SLOT_ALIGN_SECTORS: u64 = 4096 / SECTOR_SIZE as u64;
/// Most anti-forensic stripes accepted (cryptsetup writes 4000); bounds the
/// key material read for a slot to a few MiB.
pub const MAX_STRIPES: u32 = 100_000;
/// Largest master key length accepted before the cipher is even looked at.
const MAX_KEY_BYTES: u32 = 512;

/// Byte offsets of the header fields.
mod off {
    pub const VERSION: usize = 6;
    pub const CIPHER_NAME: usize = 8;
    pub const CIPHER_MODE: usize = 40;
    pub const HASH_SPEC: usize = 72;
    pub const PAYLOAD_OFFSET: usize = 104;
    pub const KEY_BYTES: usize = 108;
    pub const MK_DIGEST: usize = 112;
    pub const MK_SALT: usize = 132;
    pub const MK_ITERATIONS: usize = 164;
    pub const UUID: usize = 168;
    pub const SLOTS: usize = 208;
    pub const SLOT_LEN: usize = 48;
}

/// One of the 8 key slots of a LUKS1 header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeySlot {
    /// The slot holds a copy of the master key.
    pub active: bool,
    /// PBKDF2 iterations for the slot key.
    pub iterations: u32,
    /// PBKDF2 salt for the slot key.
    pub salt: [u8; 32],
    /// First sector of the slot's key material, from the start of the header.
    pub key_offset_sectors: u32,
    /// Anti-forensic stripes of the key material.
    pub stripes: u32,
}

impl KeySlot {
    /// Byte offset of the key material in the header node.
    pub fn key_offset(&self) -> u64 {
        u64::from(self.key_offset_sectors) * SECTOR_SIZE as u64
    }

    /// Bytes of key material to read for a `key_bytes` master key: the
    /// split key, `key_bytes * stripes`, rounded up to whole sectors.
    pub fn key_material_len(&self, key_bytes: u32) -> u64 {
        key_material_sectors(key_bytes, self.stripes) * SECTOR_SIZE as u64
    }
}

/// Sectors holding a split key of `key_bytes * stripes` bytes.
pub(crate) fn key_material_sectors(key_bytes: u32, stripes: u32) -> u64 {
    (u64::from(key_bytes) * u64::from(stripes)).div_ceil(SECTOR_SIZE as u64)
}

/// Sectors reserved for a slot's key material: QEMU's
/// `qcrypto_block_luks_splitkeylen_sectors` (whole sectors, then rounded up
/// to 4096 bytes as cryptsetup aligns them).
pub(crate) fn slot_area_sectors(key_bytes: u32, stripes: u32) -> u64 {
    key_material_sectors(key_bytes, stripes).next_multiple_of(SLOT_ALIGN_SECTORS)
}

/// A decoded LUKS1 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuksHeader {
    /// The cipher specification parsed from the three name fields.
    pub spec: CipherSpec,
    /// `cipher_name` field, e.g. `"aes"`.
    pub cipher_name: String,
    /// `cipher_mode` field, e.g. `"xts-plain64"`.
    pub cipher_mode: String,
    /// `hash_spec` field, e.g. `"sha256"`.
    pub hash_spec: String,
    /// Start of the payload in 512-byte sectors (0 for a detached header
    /// whose payload starts at the beginning of the data node).
    pub payload_offset_sectors: u32,
    /// Master key length in bytes (both keys for XTS).
    pub key_bytes: u32,
    /// PBKDF2 digest of the master key.
    pub mk_digest: [u8; 20],
    /// Salt of the master key digest.
    pub mk_salt: [u8; 32],
    /// PBKDF2 iterations of the master key digest.
    pub mk_iterations: u32,
    /// Volume UUID, as text.
    pub uuid: String,
    /// The 8 key slots.
    pub slots: [KeySlot; 8],
}

impl LuksHeader {
    /// Encoded size in bytes.
    pub const SIZE: usize = 592;

    /// Parse and validate the first bytes of a header node (buf may be shorter than 592 => Truncated error).
    /// `detached`: the header lives in its own node (payload offset may be 0 and the key material may lie
    /// beyond it); otherwise key material must not overlap the payload.
    pub fn parse(buf: &[u8], detached: bool) -> Result<Self, LuksError> {
        if buf.len() >= MAGIC.len() && buf[..MAGIC.len()] != MAGIC {
            return Err(LuksError::NotLuks);
        }
        if buf.len() >= off::CIPHER_NAME {
            match be16(buf, off::VERSION) {
                1 => {}
                2 => return Err(LuksError::Luks2Unsupported),
                v => return Err(LuksError::UnsupportedVersion(v)),
            }
        }
        if buf.len() < Self::SIZE {
            return Err(LuksError::Truncated {
                need: Self::SIZE,
                have: buf.len(),
            });
        }

        let key_bytes = be32(buf, off::KEY_BYTES);
        check_key_bytes(key_bytes)?;
        let cipher_name = name_field(buf, off::CIPHER_NAME, NAME_LEN, "cipher name")?;
        let cipher_mode = name_field(buf, off::CIPHER_MODE, NAME_LEN, "cipher mode")?;
        let hash_spec = name_field(buf, off::HASH_SPEC, NAME_LEN, "hash spec")?;
        let spec = CipherSpec::from_luks(&cipher_name, &cipher_mode, &hash_spec, key_bytes)?;

        let mut slots: [KeySlot; NUM_SLOTS] = Default::default();
        for (i, slot) in slots.iter_mut().enumerate() {
            let at = off::SLOTS + i * off::SLOT_LEN;
            slot.active = match be32(buf, at) {
                SLOT_ENABLED => true,
                SLOT_DISABLED => false,
                _ => {
                    return Err(LuksError::corrupt(format!(
                        "Keyslot {i} state (active/disable) is corrupted"
                    )))
                }
            };
            slot.iterations = be32(buf, at + 4);
            slot.salt.copy_from_slice(&buf[at + 8..at + 8 + SALT_LEN]);
            slot.key_offset_sectors = be32(buf, at + 40);
            slot.stripes = be32(buf, at + 44);
        }

        let mut header = LuksHeader {
            spec,
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset_sectors: be32(buf, off::PAYLOAD_OFFSET),
            key_bytes,
            mk_digest: [0; DIGEST_LEN],
            mk_salt: [0; SALT_LEN],
            mk_iterations: be32(buf, off::MK_ITERATIONS),
            uuid: String::from_utf8_lossy(until_nul(&buf[off::UUID..off::UUID + UUID_LEN]))
                .into_owned(),
            slots,
        };
        header
            .mk_digest
            .copy_from_slice(&buf[off::MK_DIGEST..off::MK_DIGEST + DIGEST_LEN]);
        header
            .mk_salt
            .copy_from_slice(&buf[off::MK_SALT..off::MK_SALT + SALT_LEN]);
        header.validate(detached)?;
        Ok(header)
    }

    /// Checks the numbers of a decoded (or hand-built) header: key length,
    /// cipher specification, iteration counts, stripes, and that the key
    /// material areas overlap neither the header, each other, nor (when the
    /// header is attached, `!detached`) the payload.
    pub fn validate(&self, detached: bool) -> Result<(), LuksError> {
        check_key_bytes(self.key_bytes)?;
        self.spec.validate()?;
        if usize::try_from(self.key_bytes).ok() != Some(self.spec.key_bytes()) {
            return Err(LuksError::corrupt(format!(
                "Master key length {} bytes does not match cipher {}",
                self.key_bytes, self.spec
            )));
        }
        // QEMU's order: the payload must start past the first keyslot offset (4 KiB)
        // unless the header is detached (a detached header opened as an attached
        // image fails here, as in QEMU).
        if !detached && u64::from(self.payload_offset_sectors) < 4096 / SECTOR_SIZE as u64 {
            return Err(LuksError::corrupt(
                "LUKS payload is overlapping with the header",
            ));
        }
        if self.mk_iterations == 0 {
            return Err(LuksError::corrupt(
                "Master key iteration count is 0 (header is corrupted)",
            ));
        }

        let header_end = (Self::SIZE as u64).div_ceil(SECTOR_SIZE as u64);
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.stripes == 0 {
                return Err(LuksError::corrupt(format!(
                    "Keyslot {i} is corrupted (stripes == 0)"
                )));
            }
            if slot.stripes > MAX_STRIPES {
                return Err(LuksError::corrupt(format!(
                    "Keyslot {i} is corrupted (stripes {} > {MAX_STRIPES})",
                    slot.stripes
                )));
            }
            if slot.active && slot.iterations == 0 {
                return Err(LuksError::corrupt(format!(
                    "Keyslot {i} is corrupted (iterations == 0)"
                )));
            }
            let start = u64::from(slot.key_offset_sectors);
            let end = start + slot_area_sectors(self.key_bytes, slot.stripes);
            if start < header_end {
                return Err(LuksError::corrupt(format!(
                    "Keyslot {i} is overlapping with the LUKS header"
                )));
            }
            if !detached && end > u64::from(self.payload_offset_sectors) {
                return Err(LuksError::corrupt(format!(
                    "Keyslot {i} is overlapping with the encrypted payload"
                )));
            }
            for (j, other) in self.slots.iter().enumerate().skip(i + 1) {
                let start2 = u64::from(other.key_offset_sectors);
                let end2 = start2 + slot_area_sectors(self.key_bytes, other.stripes);
                if end > start2 && end2 > start {
                    return Err(LuksError::corrupt(format!(
                        "Keyslots {i} and {j} are overlapping in the header"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Encodes the header (big-endian). Name fields longer than 31 bytes
    /// are cut to keep their terminating NUL.
    pub fn to_bytes(&self) -> [u8; 592] {
        let mut buf = [0u8; Self::SIZE];
        buf[..MAGIC.len()].copy_from_slice(&MAGIC);
        buf[off::VERSION..off::VERSION + 2].copy_from_slice(&1u16.to_be_bytes());
        put_str(&mut buf, off::CIPHER_NAME, NAME_LEN, &self.cipher_name);
        put_str(&mut buf, off::CIPHER_MODE, NAME_LEN, &self.cipher_mode);
        put_str(&mut buf, off::HASH_SPEC, NAME_LEN, &self.hash_spec);
        put32(&mut buf, off::PAYLOAD_OFFSET, self.payload_offset_sectors);
        put32(&mut buf, off::KEY_BYTES, self.key_bytes);
        buf[off::MK_DIGEST..off::MK_DIGEST + DIGEST_LEN].copy_from_slice(&self.mk_digest);
        buf[off::MK_SALT..off::MK_SALT + SALT_LEN].copy_from_slice(&self.mk_salt);
        put32(&mut buf, off::MK_ITERATIONS, self.mk_iterations);
        put_str(&mut buf, off::UUID, UUID_LEN, &self.uuid);
        for (i, slot) in self.slots.iter().enumerate() {
            let at = off::SLOTS + i * off::SLOT_LEN;
            let state = if slot.active {
                SLOT_ENABLED
            } else {
                SLOT_DISABLED
            };
            put32(&mut buf, at, state);
            put32(&mut buf, at + 4, slot.iterations);
            buf[at + 8..at + 8 + SALT_LEN].copy_from_slice(&slot.salt);
            put32(&mut buf, at + 40, slot.key_offset_sectors);
            put32(&mut buf, at + 44, slot.stripes);
        }
        buf
    }

    /// Payload offset in bytes.
    pub fn payload_offset(&self) -> u64 {
        u64::from(self.payload_offset_sectors) * SECTOR_SIZE as u64
    }

    /// End (bytes) of the last key-material area: the header node must be at least this long.
    ///
    /// Counts the key material that unlocking reads (whole sectors) of the
    /// active slots, and at least the 592-byte header itself.
    pub fn key_material_end(&self) -> u64 {
        self.slots
            .iter()
            .filter(|s| s.active)
            .map(|s| s.key_offset() + s.key_material_len(self.key_bytes))
            .fold(Self::SIZE as u64, u64::max)
    }
}

/// Rejects master key lengths no cipher has.
fn check_key_bytes(key_bytes: u32) -> Result<(), LuksError> {
    if key_bytes == 0 || key_bytes > MAX_KEY_BYTES {
        return Err(LuksError::corrupt(format!(
            "LUKS header has an invalid master key length of {key_bytes} bytes"
        )));
    }
    Ok(())
}

fn be16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Writes `s` NUL-padded into the `len`-byte field at `at`, keeping a NUL.
fn put_str(buf: &mut [u8], at: usize, len: usize, s: &str) {
    let n = s.len().min(len - 1);
    buf[at..at + n].copy_from_slice(&s.as_bytes()[..n]);
}

/// The bytes before the first NUL (all of them if there is none).
fn until_nul(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// A NUL-terminated text field of the header.
fn name_field(buf: &[u8], at: usize, len: usize, what: &str) -> Result<String, LuksError> {
    let bytes = until_nul(&buf[at..at + len]);
    match std::str::from_utf8(bytes) {
        Ok(s) if s.chars().all(|c| c.is_ascii_graphic()) => Ok(s.to_string()),
        _ => Err(LuksError::corrupt(format!(
            "LUKS header {what} is not printable text"
        ))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::cipher::{CipherAlg, CipherMode, IvGenAlg};
    use super::super::hash::HashAlg;
    use super::*;

    /// A header laid out as QEMU lays out aes-256-xts-plain64/sha256
    /// (attached): 504-sector slot areas after an 8-sector header.
    pub(crate) fn sample() -> LuksHeader {
        let spec = CipherSpec {
            alg: CipherAlg::Aes256,
            mode: CipherMode::Xts,
            ivgen: IvGenAlg::Plain64,
            ivgen_hash: None,
            hash: HashAlg::Sha256,
        };
        let slots: [KeySlot; 8] = std::array::from_fn(|i| KeySlot {
            active: i == 0,
            iterations: if i == 0 { 1000 } else { 0 },
            salt: [i as u8; 32],
            key_offset_sectors: 8 + i as u32 * 504,
            stripes: 4000,
        });
        LuksHeader {
            spec,
            cipher_name: "aes".into(),
            cipher_mode: "xts-plain64".into(),
            hash_spec: "sha256".into(),
            payload_offset_sectors: 8 + 8 * 504,
            key_bytes: 64,
            mk_digest: [0xd1; 20],
            mk_salt: [0x5a; 32],
            mk_iterations: 1000,
            uuid: "0b2f6e9c-8d6f-4bcb-a0a4-3f9a0b1c2d3e".into(),
            slots,
        }
    }

    fn err(buf: &[u8], detached: bool) -> String {
        LuksHeader::parse(buf, detached).unwrap_err().to_string()
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let bytes = h.to_bytes();
        assert_eq!(&bytes[..6], b"LUKS\xba\xbe");
        assert_eq!(&bytes[6..8], &[0, 1]);
        assert_eq!(&bytes[104..108], &(8u32 + 8 * 504).to_be_bytes());
        assert_eq!(&bytes[208..212], &[0x00, 0xac, 0x71, 0xf3]);
        assert_eq!(&bytes[256..260], &[0x00, 0x00, 0xde, 0xad]);
        let parsed = LuksHeader::parse(&bytes, false).unwrap();
        assert_eq!(parsed, h);
        assert_eq!(parsed.to_bytes(), bytes);
        assert_eq!(parsed.payload_offset(), 4040 * 512);
        assert_eq!(parsed.key_material_end(), 8 * 512 + 256000);
        // A longer buffer (the whole header node) parses the same.
        let mut long = bytes.to_vec();
        long.resize(4096, 0xee);
        assert_eq!(LuksHeader::parse(&long, true).unwrap(), h);
    }

    #[test]
    fn magic_version_truncation() {
        let bytes = sample().to_bytes();
        let mut b = bytes;
        b[0] = b'X';
        assert_eq!(err(&b, false), "Volume is not in LUKS format");
        assert_eq!(err(&[0u8; 592], false), "Volume is not in LUKS format");
        assert_eq!(
            err(b"XY", false),
            "LUKS header is truncated: need 592 bytes, have 2"
        );
        let mut b = bytes;
        b[7] = 2;
        assert_eq!(err(&b, false), "LUKS2 is not supported yet");
        // LUKS2 is recognised even from a short read.
        assert_eq!(err(&b[..8], false), "LUKS2 is not supported yet");
        b[7] = 7;
        assert_eq!(err(&b, false), "LUKS version 7 is not supported");
        assert_eq!(
            err(&bytes[..591], false),
            "LUKS header is truncated: need 592 bytes, have 591"
        );
        assert_eq!(
            err(&[], false),
            "LUKS header is truncated: need 592 bytes, have 0"
        );
    }

    #[test]
    fn key_bytes_errors() {
        let mut h = sample();
        for (kb, want) in [
            (0, "LUKS header has an invalid master key length of 0 bytes"),
            (
                u32::MAX,
                "LUKS header has an invalid master key length of 4294967295 bytes",
            ),
            (40, "Algorithm aes with key size 20 bytes not supported"),
            (33, "Algorithm aes with key size 33 bytes not supported"),
        ] {
            h.key_bytes = kb;
            assert_eq!(err(&h.to_bytes(), false), want);
        }
    }

    #[test]
    fn cipher_string_errors() {
        let cases = [
            (
                "aes",
                "xts-plain64",
                "md5",
                "Hash algorithm md5 not supported",
            ),
            (
                "des",
                "xts-plain64",
                "sha256",
                "Algorithm des with key size 32 bytes not supported",
            ),
            (
                "aes",
                "gcm-plain64",
                "sha256",
                "Cipher mode gcm not supported",
            ),
            (
                "aes",
                "xts-random",
                "sha256",
                "IV generator random not supported",
            ),
            (
                "aes",
                "xts",
                "sha256",
                "Unexpected cipher mode string format xts",
            ),
            (
                "aes",
                "xts-essiv",
                "sha256",
                "Missing IV generator hash specification",
            ),
            (
                "aes",
                "xts-essiv:md5",
                "sha256",
                "Hash algorithm md5 not supported",
            ),
        ];
        for (name, mode, hash, want) in cases {
            let mut h = sample();
            h.cipher_name = name.into();
            h.cipher_mode = mode.into();
            h.hash_spec = hash.into();
            assert_eq!(err(&h.to_bytes(), false), want, "{name} {mode} {hash}");
        }
        let mut b = sample().to_bytes();
        b[8] = 0x01;
        assert_eq!(
            err(&b, false),
            "LUKS header cipher name is not printable text"
        );
    }

    #[test]
    fn iteration_errors() {
        let mut h = sample();
        h.mk_iterations = 0;
        assert_eq!(
            err(&h.to_bytes(), false),
            "Master key iteration count is 0 (header is corrupted)"
        );
        let mut h = sample();
        h.slots[0].iterations = 0;
        assert_eq!(
            err(&h.to_bytes(), false),
            "Keyslot 0 is corrupted (iterations == 0)"
        );
        // Inactive slots may have 0 iterations (QEMU's erase writes that).
        let h = sample();
        assert_eq!(h.slots[3].iterations, 0);
        assert!(LuksHeader::parse(&h.to_bytes(), false).is_ok());
    }

    #[test]
    fn slot_state_and_stripes_errors() {
        let mut b = sample().to_bytes();
        b[off::SLOTS + 2 * off::SLOT_LEN..][..4].copy_from_slice(&[0, 0, 0, 1]);
        assert_eq!(
            err(&b, false),
            "Keyslot 2 state (active/disable) is corrupted"
        );
        let mut h = sample();
        h.slots[5].stripes = 0;
        assert_eq!(
            err(&h.to_bytes(), false),
            "Keyslot 5 is corrupted (stripes == 0)"
        );
        h.slots[5].stripes = u32::MAX;
        assert_eq!(
            err(&h.to_bytes(), false),
            "Keyslot 5 is corrupted (stripes 4294967295 > 100000)"
        );
    }

    #[test]
    fn overlap_errors() {
        let mut h = sample();
        h.slots[3].key_offset_sectors = h.slots[2].key_offset_sectors + 8;
        assert_eq!(
            err(&h.to_bytes(), true),
            "Keyslots 2 and 3 are overlapping in the header"
        );
        let mut h = sample();
        h.slots[0].key_offset_sectors = 1;
        assert_eq!(
            err(&h.to_bytes(), true),
            "Keyslot 0 is overlapping with the LUKS header"
        );
        let mut h = sample();
        h.payload_offset_sectors -= 1;
        assert_eq!(
            err(&h.to_bytes(), false),
            "Keyslot 7 is overlapping with the encrypted payload"
        );
        // A detached header has no payload to overlap.
        assert!(LuksHeader::parse(&h.to_bytes(), true).is_ok());
        h.payload_offset_sectors = 0;
        assert!(LuksHeader::parse(&h.to_bytes(), true).is_ok());
        // QEMU checks the payload against the header first (crypto/block-luks.c).
        assert_eq!(
            err(&h.to_bytes(), false),
            "LUKS payload is overlapping with the header"
        );
        // Offsets near u32::MAX do not overflow.
        let mut h = sample();
        h.slots[7].key_offset_sectors = u32::MAX;
        assert_eq!(
            err(&h.to_bytes(), false),
            "Keyslot 7 is overlapping with the encrypted payload"
        );
        assert!(LuksHeader::parse(&h.to_bytes(), true).is_ok());
    }

    #[test]
    fn validate_hand_built_mismatch() {
        let mut h = sample();
        h.key_bytes = 32;
        assert_eq!(
            h.validate(false).unwrap_err().to_string(),
            "Master key length 32 bytes does not match cipher aes-256-xts-plain64"
        );
    }

    #[test]
    fn slot_sizes() {
        // QEMU's splitkeylen_sectors: 24 * 4000 = 96000 bytes = 187.5 sectors.
        assert_eq!(key_material_sectors(24, 4000), 188);
        assert_eq!(slot_area_sectors(24, 4000), 192);
        assert_eq!(slot_area_sectors(64, 4000), 504);
        assert_eq!(slot_area_sectors(16, 4000), 128);
        assert_eq!(
            slot_area_sectors(512, u32::MAX),
            (512u64 * u32::MAX as u64).div_ceil(512).next_multiple_of(8)
        );
        let slot = &sample().slots[1];
        assert_eq!(slot.key_offset(), 512 * 512);
        assert_eq!(slot.key_material_len(24), 188 * 512);
    }

    #[test]
    fn long_strings_are_cut() {
        let mut h = sample();
        h.uuid = "u".repeat(100);
        let b = h.to_bytes();
        assert_eq!(b[off::UUID + 39], 0);
        assert_eq!(LuksHeader::parse(&b, false).unwrap().uuid, "u".repeat(39));
    }
}
