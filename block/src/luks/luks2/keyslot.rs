//! LUKS2 key slots: derive the area key (PBKDF2 or Argon2), decrypt the key
//! material (512-byte sectors from IV 0), merge the anti-forensic split,
//! and check the volume key against its digest; as cryptsetup's
//! `luks2_keyslot_luks2.c` and `luks2_digest_pbkdf2.c`.

use zeroize::Zeroizing;

use super::binary_header::ReadFn;
use super::error::Luks2Error;
use super::json::{Digest, Kdf, Keyslot, Metadata};
use crate::luks::af;
use crate::luks::cipher::new_sector_cipher;
use crate::luks::error::LuksError;
use crate::luks::keyslot::MasterKey;

/// Compares without an early exit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `key` matches `digest` (PBKDF2 of the key, the digest's length).
pub fn digest_matches(digest: &Digest, key: &[u8]) -> bool {
    let mut out = Zeroizing::new(vec![0u8; digest.digest.len()]);
    digest
        .hash
        .pbkdf2(key, &digest.salt, digest.iterations, &mut out);
    constant_time_eq(&out, &digest.digest)
}

/// Derives the area key of a slot from the passphrase.
fn derive(kdf: &Kdf, passphrase: &[u8], out: &mut [u8]) -> Result<(), LuksError> {
    match kdf {
        Kdf::Pbkdf2 {
            hash,
            iterations,
            salt,
        } => {
            hash.pbkdf2(passphrase, salt, *iterations, out);
            Ok(())
        }
        Kdf::Argon2 {
            id,
            time,
            memory_kib,
            cpus,
            salt,
        } => {
            let params = argon2::Params::new(*memory_kib, *time, *cpus, Some(out.len()))
                .map_err(|e| Luks2Error::field("kdf", format!("has bad Argon2 parameters: {e}")))?;
            let alg = if *id {
                argon2::Algorithm::Argon2id
            } else {
                argon2::Algorithm::Argon2i
            };
            argon2::Argon2::new(alg, argon2::Version::V0x13, params)
                .hash_password_into(passphrase, salt, out)
                .map_err(|e| Luks2Error::field("kdf", format!("failed Argon2: {e}")).into())
        }
    }
}

/// PBKDF2 iterations trying `slot` costs (its KDF, if PBKDF2, and its digest).
fn pbkdf2_cost(meta: &Metadata, n: u32, slot: &Keyslot) -> u64 {
    let kdf = match &slot.kdf {
        Kdf::Pbkdf2 { iterations, .. } => u64::from(*iterations),
        Kdf::Argon2 { .. } => 0,
    };
    kdf + meta.digest_of(n).map_or(0, |d| u64::from(d.iterations))
}

/// The key slots tried automatically, in cryptsetup's order: priority 2
/// ("prefer") first, then 1 ("normal"); priority 0 ("ignore") never. Only
/// slots with a digest for the segment and the segment's key length.
pub fn candidates(meta: &Metadata) -> Vec<u32> {
    let mut out = Vec::new();
    for prio in [2u8, 1] {
        for (n, s) in &meta.keyslots {
            if s.priority == prio
                && s.key_size == meta.segment.spec.key_bytes()
                && meta.digest_of(*n).is_some()
            {
                out.push(*n);
            }
        }
    }
    out
}

/// Opens a key slot of `meta` with `passphrase`: returns the volume key and
/// the slot. `read` reads the header node (of `node_size` bytes); `limit`
/// caps the PBKDF2 iterations over every slot tried.
pub fn unlock(
    meta: &Metadata,
    passphrase: &[u8],
    read: &mut ReadFn<'_>,
    node_size: u64,
    limit: u64,
) -> Result<(MasterKey, u32), LuksError> {
    let slots = candidates(meta);
    let total: u64 = slots
        .iter()
        .map(|n| pbkdf2_cost(meta, *n, &meta.keyslots[n]))
        .sum();
    if total > limit {
        return Err(LuksError::KdfTooCostly { total, limit });
    }
    for n in slots {
        let slot = &meta.keyslots[&n];
        let Some(digest) = meta.digest_of(n) else {
            continue;
        };
        let len = slot.material_len();
        if slot.area_offset.saturating_add(len) > node_size {
            return Err(Luks2Error::field(
                format!("keyslots.{n}.area.offset"),
                format!(
                    "key material ({len} bytes at {}) lies beyond the end of the header ({node_size} bytes)",
                    slot.area_offset
                ),
            )
            .into());
        }
        // Bounded: key_size <= 512 and stripes <= MAX_STRIPES.
        let mut material = Zeroizing::new(vec![0u8; len as usize]);
        read(slot.area_offset, &mut material).map_err(|source| LuksError::Io {
            what: format!(
                "key material of keyslot {n} ({len} bytes at offset {})",
                slot.area_offset
            ),
            source,
        })?;
        let mut area_key = Zeroizing::new(vec![0u8; slot.area_key_size]);
        derive(&slot.kdf, passphrase, &mut area_key)?;
        new_sector_cipher(&slot.area_spec, &area_key)?.decrypt(0, &mut material);
        let candidate = af::merge(slot.af_hash, &material, slot.stripes, slot.key_size)?;
        if digest_matches(digest, &candidate) {
            return Ok((candidate, n));
        }
    }
    Err(LuksError::WrongPassphrase)
}
