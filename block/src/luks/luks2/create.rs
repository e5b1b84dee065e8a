//! Making a new LUKS2 volume as `cryptsetup luksFormat --type luks2` does:
//! a random volume key, key slot 0 (Argon2id, Argon2i or PBKDF2, calibrated
//! to a target time as cryptsetup's benchmark does), a PBKDF2 digest of the
//! volume key, one `crypt` segment, and both binary headers with their
//! checksums; the layout of cryptsetup's defaults (16 KiB headers, the key
//! slot areas up to 16 MiB, the payload at 16 MiB or, with a detached
//! header, at 0).
//!
//! The key material is written with the LUKS1 code (AF split and area
//! encryption, [`crate::luks::keyslot`]).

use std::time::Instant;

use base64::Engine;
use serde_json::json;
use zeroize::Zeroizing;

use super::binary_header::{checksum, BIN_HDR_SIZE, MAGIC_PRIMARY, MAGIC_SECONDARY};
use super::error::Luks2Error;
use super::json::{cipher_spec, MAX_ARGON2_MEMORY_KIB};
use crate::luks::cipher::{CipherMode, CipherSpec};
use crate::luks::create::{new_uuid, pbkdf2_iterations, MIN_ITERATIONS};
use crate::luks::error::{random_bytes, LuksError};
use crate::luks::hash::HashAlg;
use crate::luks::keyslot::{seal_with_key, MasterKey};

/// Bytes of each header copy (binary header plus JSON area), cryptsetup's default.
pub const HDR_SIZE: u64 = 16 << 10;
/// Bytes of metadata and key slot areas: cryptsetup's `LUKS2_DEFAULT_HDR_SIZE`.
pub const DEFAULT_HEADER_LEN: u64 = 16 << 20;
/// Anti-forensic stripes of the key slot.
pub const STRIPES: u32 = 4000;
/// cryptsetup's default key slot unlocking time, in milliseconds.
pub const DEFAULT_ITER_TIME_MS: u64 = 2000;
/// cryptsetup's default (most) Argon2 memory, in KiB (1 GiB).
pub const DEFAULT_MEMORY_KIB: u32 = 1 << 20;
/// Least Argon2 memory cryptsetup allows, in KiB.
pub const MIN_MEMORY_KIB: u32 = 32;
/// Most Argon2 lanes cryptsetup allows (and its default, up to the CPU count).
pub const MAX_PARALLEL: u32 = 4;
/// Least Argon2 passes (cryptsetup's minimum time cost).
pub const MIN_ARGON2_TIME: u32 = 4;
/// PBKDF2 time of the volume key digest, in milliseconds (cryptsetup's
/// `LUKS_MKD_ITERATIONS_MS`).
pub const DIGEST_ITER_TIME_MS: u64 = 125;
/// Salt length of the key slot and the digest.
const SALT_LEN: usize = 32;

/// Key derivation of the new key slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pbkdf {
    /// Argon2id (cryptsetup's default).
    Argon2id,
    /// Argon2i.
    Argon2i,
    /// PBKDF2 with the spec's hash.
    Pbkdf2,
}

impl Pbkdf {
    /// From the name cryptsetup (and the JSON) uses.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "argon2id" => Some(Pbkdf::Argon2id),
            "argon2i" => Some(Pbkdf::Argon2i),
            "pbkdf2" => Some(Pbkdf::Pbkdf2),
            _ => None,
        }
    }

    /// The name cryptsetup (and the JSON) uses.
    pub fn name(self) -> &'static str {
        match self {
            Pbkdf::Argon2id => "argon2id",
            Pbkdf::Argon2i => "argon2i",
            Pbkdf::Pbkdf2 => "pbkdf2",
        }
    }
}

/// How to make a new LUKS2 volume.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// The segment (and key slot area) cipher; its hash is the PBKDF2
    /// hash, the AF hash and the digest's hash.
    pub spec: CipherSpec,
    /// Key derivation of key slot 0.
    pub pbkdf: Pbkdf,
    /// Target unlocking time of key slot 0, in milliseconds.
    pub iter_time_ms: u64,
    /// Most Argon2 memory, in KiB.
    pub memory_kib: u32,
    /// Argon2 lanes.
    pub parallel: u32,
    /// Bytes per encryption sector: 512, 1024, 2048 or 4096.
    pub sector_size: u32,
    /// The header goes to its own node: segment offset 0.
    pub detached_header: bool,
}

/// Half of the physical memory in KiB, if known.
fn half_memory_kib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 2)
}

impl Default for CreateOptions {
    /// cryptsetup's defaults: aes-xts-plain64 with a 512-bit key, sha256,
    /// argon2id for 2000 ms with up to 1 GiB (at most half of the RAM) and
    /// min(4, CPUs) lanes, 4096-byte sectors, attached header.
    fn default() -> Self {
        let crate::luks::create::CreateOptions { spec, .. } =
            crate::luks::create::CreateOptions::default();
        let memory_kib = half_memory_kib()
            .map_or(DEFAULT_MEMORY_KIB, |half| {
                u32::try_from(half.min(u64::from(DEFAULT_MEMORY_KIB))).unwrap_or(DEFAULT_MEMORY_KIB)
            })
            .max(MIN_MEMORY_KIB);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        CreateOptions {
            spec,
            pbkdf: Pbkdf::Argon2id,
            iter_time_ms: DEFAULT_ITER_TIME_MS,
            memory_kib,
            parallel: u32::try_from(cpus)
                .unwrap_or(MAX_PARALLEL)
                .clamp(1, MAX_PARALLEL),
            sector_size: 4096,
            detached_header: false,
        }
    }
}

/// The cost of the new key slot's key derivation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KdfCost {
    /// PBKDF2 iterations.
    Pbkdf2 {
        /// Iterations.
        iterations: u32,
    },
    /// Argon2 passes and memory (lanes come from the options).
    Argon2 {
        /// Passes (t_cost).
        time: u32,
        /// Memory in KiB (m_cost).
        memory_kib: u32,
    },
}

/// A freshly made volume.
pub struct NewVolume {
    /// The start of the header node: both header copies and key slot 0's
    /// key material; the rest up to `header_len` is zeros.
    pub header_image: Vec<u8>,
    /// Bytes of metadata and key slot areas (the size of a detached header).
    pub header_len: u64,
    /// Byte offset of the payload in the data node.
    pub payload_offset: u64,
    /// The volume UUID.
    pub uuid: String,
    /// The volume key.
    pub master_key: MasterKey,
}

impl std::fmt::Debug for NewVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewVolume")
            .field("header_image_len", &self.header_image.len())
            .field("header_len", &self.header_len)
            .field("payload_offset", &self.payload_offset)
            .field("uuid", &self.uuid)
            .field("master_key", &"<redacted>")
            .finish()
    }
}

fn invalid(msg: impl Into<String>) -> LuksError {
    LuksError::InvalidArgument(msg.into())
}

/// The cryptsetup cipher string of `spec` (`aes-xts-plain64`, `aes-ecb`).
pub fn encryption_name(spec: &CipherSpec) -> String {
    if spec.mode == CipherMode::Ecb {
        format!("{}-ecb", spec.alg.luks_name())
    } else {
        format!("{}-{}", spec.alg.luks_name(), spec.luks_mode_string())
    }
}

impl CreateOptions {
    /// Checks every option, before anything is benchmarked or written.
    pub fn validate(&self) -> Result<(), LuksError> {
        self.spec.validate()?;
        let enc = encryption_name(&self.spec);
        let key_bytes =
            u32::try_from(self.spec.key_bytes()).map_err(|_| invalid("key too large"))?;
        let parsed = cipher_spec(&enc, key_bytes, "cipher")?;
        if (parsed.alg, parsed.mode, parsed.ivgen, parsed.ivgen_hash)
            != (
                self.spec.alg,
                self.spec.mode,
                self.spec.ivgen,
                self.spec.ivgen_hash,
            )
        {
            return Err(Luks2Error::Unsupported(format!("cipher '{enc}'")).into());
        }
        let key = vec![0u8; self.spec.key_bytes()];
        crate::luks::cipher::new_sector_cipher(&self.spec, &key)?;
        if !matches!(self.sector_size, 512 | 1024 | 2048 | 4096) {
            return Err(invalid(format!(
                "sector size {} is not a power of two from 512 to 4096",
                self.sector_size
            )));
        }
        if self.iter_time_ms == 0 {
            return Err(invalid("iter-time must be at least 1 millisecond"));
        }
        if self.pbkdf != Pbkdf::Pbkdf2 {
            if !(1..=MAX_PARALLEL).contains(&self.parallel) {
                return Err(invalid(format!(
                    "Argon2 parallel threads {} not 1 to {MAX_PARALLEL}",
                    self.parallel
                )));
            }
            let least = MIN_MEMORY_KIB.max(8 * self.parallel);
            if self.memory_kib < least || u64::from(self.memory_kib) > MAX_ARGON2_MEMORY_KIB {
                return Err(invalid(format!(
                    "Argon2 memory {} KiB not {least} to {MAX_ARGON2_MEMORY_KIB} KiB",
                    self.memory_kib
                )));
            }
        }
        Ok(())
    }
}

/// Makes a new volume with key slot 0 holding `passphrase`, its key
/// derivation calibrated to `opts.iter_time_ms` (see [`benchmark`]).
pub fn create(opts: &CreateOptions, passphrase: &[u8]) -> Result<NewVolume, LuksError> {
    opts.validate()?;
    let cost = benchmark(opts)?;
    let digest_iterations = pbkdf2_iterations(
        opts.spec.hash,
        opts.spec.hash.digest_len(),
        DIGEST_ITER_TIME_MS,
    )?;
    create_with_cost(opts, passphrase, cost, digest_iterations)
}

/// The key derivation cost cryptsetup's benchmark picks for `opts`: PBKDF2
/// iterations for the key length in the target time; for Argon2, from the
/// least cost grow memory (then passes) until one run takes 250 ms, then
/// adjust passes (then memory, up to `opts.memory_kib`) until a run is
/// within 95 % to 110 % of the target (cryptsetup's `crypt_argon2_check`).
pub fn benchmark(opts: &CreateOptions) -> Result<KdfCost, LuksError> {
    opts.validate()?;
    let key_len = opts.spec.key_bytes();
    if opts.pbkdf == Pbkdf::Pbkdf2 {
        let iterations = pbkdf2_iterations(opts.spec.hash, key_len, opts.iter_time_ms)?;
        return Ok(KdfCost::Pbkdf2 { iterations });
    }
    let target = opts.iter_time_ms;
    let min_m = MIN_MEMORY_KIB.max(8 * opts.parallel);
    let max_m = opts.memory_kib;
    let (mut t, mut m) = (MIN_ARGON2_TIME, min_m);
    let measure = |t: u32, m: u32, samples: u32| -> Result<u64, LuksError> {
        let mut best = u64::MAX;
        for _ in 0..samples {
            let start = Instant::now();
            argon2_derive(
                opts.pbkdf,
                t,
                m,
                opts.parallel,
                b"foobarfo",
                &[0x55; 32],
                key_len,
            )?;
            best = best.min(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX));
        }
        Ok(best)
    };
    // 1. Small parameters that take at least 250 ms.
    let mut ms;
    loop {
        ms = measure(t, m, 3)?;
        if ms >= 250 {
            break;
        }
        if m == max_m {
            let next = if ms < 10 {
                t.saturating_mul(16)
            } else {
                scale32(t, 250, ms)
            };
            if next == t || next > 1 << 20 {
                break;
            }
            t = next;
        } else {
            let next = if ms < 10 {
                m.saturating_mul(16)
            } else {
                scale32(m, 250, ms)
            };
            if next == m {
                break;
            }
            m = next.min(max_m);
        }
    }
    // 2. Estimate, measure, refine.
    let (at_least, at_most) = (target * 95 / 100, target * 110 / 100);
    for _ in 0..16 {
        let (old_t, old_m) = (t, m);
        if ms > target {
            let new_t = scale32(t, target, ms);
            if new_t < MIN_ARGON2_TIME {
                let tm =
                    u64::from(t) * u64::from(m) * target / (u64::from(MIN_ARGON2_TIME) * ms.max(1));
                t = MIN_ARGON2_TIME;
                m = u32::try_from(tm).unwrap_or(u32::MAX).max(min_m);
            } else {
                t = new_t;
            }
        } else {
            let new_m = u64::from(m) * target / ms.max(1);
            if new_m > u64::from(max_m) {
                let tm = u64::from(t) * u64::from(m) * target / (u64::from(max_m) * ms.max(1));
                t = u32::try_from(tm).unwrap_or(u32::MAX).max(MIN_ARGON2_TIME);
                m = max_m;
            } else {
                m = u32::try_from(new_m).unwrap_or(u32::MAX).max(min_m);
            }
        }
        if (t, m) == (old_t, old_m) {
            break;
        }
        ms = measure(t, m, 1)?;
        if (at_least..=at_most).contains(&ms) {
            break;
        }
    }
    Ok(KdfCost::Argon2 {
        time: t.min(super::json::MAX_ARGON2_TIME),
        memory_kib: m,
    })
}

/// `v * num / den`, saturating, for the benchmark's scaling.
fn scale32(v: u32, num: u64, den: u64) -> u32 {
    u32::try_from(u64::from(v) * num / den.max(1)).unwrap_or(u32::MAX)
}

fn argon2_derive(
    pbkdf: Pbkdf,
    time: u32,
    memory_kib: u32,
    lanes: u32,
    passphrase: &[u8],
    salt: &[u8],
    len: usize,
) -> Result<Zeroizing<Vec<u8>>, LuksError> {
    let alg = match pbkdf {
        Pbkdf::Argon2i => argon2::Algorithm::Argon2i,
        _ => argon2::Algorithm::Argon2id,
    };
    let params = argon2::Params::new(memory_kib, time, lanes, Some(len))
        .map_err(|e| invalid(format!("bad Argon2 parameters: {e}")))?;
    let mut out = Zeroizing::new(vec![0u8; len]);
    argon2::Argon2::new(alg, argon2::Version::V0x13, params)
        .hash_password_into(passphrase, salt, &mut out)
        .map_err(|e| invalid(format!("Argon2 failed: {e}")))?;
    Ok(out)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// [`create`] with a given key slot cost and digest iterations (raised to
/// [`MIN_ITERATIONS`]) instead of benchmarked ones; `opts.iter_time_ms` is
/// not used.
pub fn create_with_cost(
    opts: &CreateOptions,
    passphrase: &[u8],
    cost: KdfCost,
    digest_iterations: u32,
) -> Result<NewVolume, LuksError> {
    opts.validate()?;
    let spec = opts.spec;
    let key_len = spec.key_bytes();
    let mut master_key: MasterKey = Zeroizing::new(vec![0u8; key_len]);
    random_bytes(&mut master_key)?;

    // Key slot 0.
    let mut slot_salt = [0u8; SALT_LEN];
    random_bytes(&mut slot_salt)?;
    let (kdf_json, area_key) = match (opts.pbkdf, cost) {
        (Pbkdf::Pbkdf2, KdfCost::Pbkdf2 { iterations }) => {
            let iterations = iterations.max(MIN_ITERATIONS);
            let mut key = Zeroizing::new(vec![0u8; key_len]);
            spec.hash
                .pbkdf2(passphrase, &slot_salt, iterations, &mut key);
            let kdf = json!({
                "type": "pbkdf2",
                "hash": spec.hash.name(),
                "iterations": iterations,
                "salt": b64(&slot_salt),
            });
            (kdf, key)
        }
        (Pbkdf::Argon2i | Pbkdf::Argon2id, KdfCost::Argon2 { time, memory_kib }) => {
            let key = argon2_derive(
                opts.pbkdf,
                time,
                memory_kib,
                opts.parallel,
                passphrase,
                &slot_salt,
                key_len,
            )?;
            let kdf = json!({
                "type": opts.pbkdf.name(),
                "time": time,
                "memory": memory_kib,
                "cpus": opts.parallel,
                "salt": b64(&slot_salt),
            });
            (kdf, key)
        }
        (p, c) => {
            return Err(invalid(format!(
                "key derivation cost {c:?} does not fit {}",
                p.name()
            )))
        }
    };
    let material = seal_with_key(&spec, &master_key, &area_key, STRIPES)?;
    let area_offset = 2 * HDR_SIZE;
    let area_size = (material.len() as u64).next_multiple_of(4096);
    let keyslots_size = DEFAULT_HEADER_LEN - 2 * HDR_SIZE;

    // Digest.
    let mut digest_salt = [0u8; SALT_LEN];
    random_bytes(&mut digest_salt)?;
    let digest_iterations = digest_iterations.max(MIN_ITERATIONS);
    let mut digest = Zeroizing::new(vec![0u8; spec.hash.digest_len()]);
    spec.hash
        .pbkdf2(&master_key, &digest_salt, digest_iterations, &mut digest);

    let payload_offset = if opts.detached_header {
        0
    } else {
        DEFAULT_HEADER_LEN
    };
    let encryption = encryption_name(&spec);
    let json_size = HDR_SIZE - BIN_HDR_SIZE as u64;
    let meta = json!({
        "keyslots": {"0": {
            "type": "luks2",
            "key_size": key_len,
            "af": {"type": "luks1", "stripes": STRIPES, "hash": spec.hash.name()},
            "area": {
                "type": "raw",
                "offset": area_offset.to_string(),
                "size": area_size.to_string(),
                "encryption": encryption,
                "key_size": key_len,
            },
            "kdf": kdf_json,
        }},
        "tokens": {},
        "segments": {"0": {
            "type": "crypt",
            "offset": payload_offset.to_string(),
            "size": "dynamic",
            "iv_tweak": "0",
            "encryption": encryption,
            "sector_size": opts.sector_size,
        }},
        "digests": {"0": {
            "type": "pbkdf2",
            "keyslots": ["0"],
            "segments": ["0"],
            "hash": spec.hash.name(),
            "iterations": digest_iterations,
            "salt": b64(&digest_salt),
            "digest": b64(&digest),
        }},
        "config": {
            "json_size": json_size.to_string(),
            "keyslots_size": keyslots_size.to_string(),
        },
    });
    let text = serde_json::to_vec(&meta).map_err(|e| invalid(format!("LUKS2 JSON: {e}")))?;
    if text.len() >= json_size as usize {
        return Err(invalid("LUKS2 JSON metadata does not fit its area"));
    }

    let uuid = new_uuid()?;
    let image_len = (area_offset + area_size) as usize;
    let mut header_image = vec![0u8; image_len];
    for (offset, magic) in [(0u64, MAGIC_PRIMARY), (HDR_SIZE, MAGIC_SECONDARY)] {
        let at = offset as usize;
        let copy = &mut header_image[at..at + HDR_SIZE as usize];
        copy[..6].copy_from_slice(&magic);
        copy[6..8].copy_from_slice(&2u16.to_be_bytes());
        copy[8..16].copy_from_slice(&HDR_SIZE.to_be_bytes());
        copy[16..24].copy_from_slice(&1u64.to_be_bytes());
        copy[72..78].copy_from_slice(b"sha256");
        random_bytes(&mut copy[104..168])?;
        copy[168..168 + uuid.len()].copy_from_slice(uuid.as_bytes());
        copy[256..264].copy_from_slice(&offset.to_be_bytes());
        copy[BIN_HDR_SIZE..BIN_HDR_SIZE + text.len()].copy_from_slice(&text);
        let (bin, area) = copy.split_at(BIN_HDR_SIZE);
        let sum = checksum(HashAlg::Sha256, bin, area);
        copy[448..448 + sum.len()].copy_from_slice(&sum);
    }
    let at = area_offset as usize;
    header_image[at..at + material.len()].copy_from_slice(&material);
    Ok(NewVolume {
        header_image,
        header_len: DEFAULT_HEADER_LEN,
        payload_offset,
        uuid,
        master_key,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{keyslot, Luks2Header};
    use super::*;

    fn open(
        vol: &NewVolume,
        pass: &[u8],
        detached: bool,
    ) -> Result<(MasterKey, Luks2Header), LuksError> {
        let mut image = vol.header_image.clone();
        image.resize(vol.header_len as usize, 0);
        let n = image.len() as u64;
        let mut read = |off: u64, buf: &mut [u8]| {
            let off = off as usize;
            buf.copy_from_slice(&image[off..off + buf.len()]);
            Ok(())
        };
        let hdr = Luks2Header::read(&mut read, n, detached)?;
        let (key, slot) = keyslot::unlock(&hdr.meta, pass, &mut read, n, u64::MAX)?;
        assert_eq!(slot, 0);
        Ok((key, hdr))
    }

    fn fast(pbkdf: Pbkdf) -> KdfCost {
        match pbkdf {
            Pbkdf::Pbkdf2 => KdfCost::Pbkdf2 { iterations: 1000 },
            _ => KdfCost::Argon2 {
                time: 4,
                memory_kib: 64,
            },
        }
    }

    #[test]
    fn defaults_are_cryptsetups() {
        let o = CreateOptions::default();
        assert_eq!(encryption_name(&o.spec), "aes-xts-plain64");
        assert_eq!(o.spec.key_bytes(), 64);
        assert_eq!(o.pbkdf, Pbkdf::Argon2id);
        assert_eq!(o.iter_time_ms, 2000);
        assert_eq!(o.sector_size, 4096);
        assert!(o.memory_kib <= DEFAULT_MEMORY_KIB);
        assert!((1..=4).contains(&o.parallel));
        assert!(!o.detached_header);
    }

    #[test]
    fn create_then_open() {
        for (i, pbkdf) in [Pbkdf::Argon2id, Pbkdf::Argon2i, Pbkdf::Pbkdf2]
            .into_iter()
            .enumerate()
        {
            for sector_size in [512, 4096] {
                let detached = i % 2 == 1;
                let opts = CreateOptions {
                    pbkdf,
                    sector_size,
                    detached_header: detached,
                    parallel: 2,
                    ..CreateOptions::default()
                };
                let vol = create_with_cost(&opts, b"pw", fast(pbkdf), 1000).unwrap();
                let (key, hdr) = open(&vol, b"pw", detached).unwrap();
                assert_eq!(&key[..], &vol.master_key[..]);
                assert_eq!(hdr.header.uuid, vol.uuid);
                assert_eq!(hdr.header.seqid, 1);
                assert_eq!(hdr.meta.segment.sector_size, sector_size);
                assert_eq!(hdr.meta.segment.offset, vol.payload_offset);
                assert_eq!(hdr.meta.keyslots[&0].kdf.name(), pbkdf.name());
                assert_eq!(hdr.metadata_end(), DEFAULT_HEADER_LEN);
                assert_eq!(vol.payload_offset, if detached { 0 } else { 16 << 20 });
                let e = open(&vol, b"pW", detached).unwrap_err();
                assert!(matches!(e, LuksError::WrongPassphrase), "{e}");
                assert!(format!("{vol:?}").contains("<redacted>"));
            }
        }
    }

    #[test]
    fn bad_options_are_errors() {
        let bad = [
            CreateOptions {
                sector_size: 8192,
                ..CreateOptions::default()
            },
            CreateOptions {
                sector_size: 768,
                ..CreateOptions::default()
            },
            CreateOptions {
                parallel: 5,
                ..CreateOptions::default()
            },
            CreateOptions {
                memory_kib: 16,
                ..CreateOptions::default()
            },
            CreateOptions {
                iter_time_ms: 0,
                ..CreateOptions::default()
            },
        ];
        for o in bad {
            assert!(
                matches!(o.validate(), Err(LuksError::InvalidArgument(_))),
                "{o:?}"
            );
            assert!(create(&o, b"pw").is_err());
        }
        let o = CreateOptions {
            pbkdf: Pbkdf::Pbkdf2,
            ..CreateOptions::default()
        };
        assert!(create_with_cost(&o, b"pw", fast(Pbkdf::Argon2id), 1000).is_err());
    }

    /// A real Argon2 benchmark with a small target: the cost is inside the limits.
    #[test]
    fn benchmarked_argon2() {
        let opts = CreateOptions {
            iter_time_ms: 50,
            memory_kib: 8192,
            parallel: 1,
            ..CreateOptions::default()
        };
        let KdfCost::Argon2 { time, memory_kib } = benchmark(&opts).unwrap() else {
            panic!("argon2 cost expected");
        };
        assert!(time >= MIN_ARGON2_TIME);
        assert!((MIN_MEMORY_KIB..=8192).contains(&memory_kib));
    }
}
