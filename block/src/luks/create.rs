//! Making a new LUKS1 volume: random master key, PBKDF2 iteration counts
//! benchmarked as QEMU does, and the header + key material image laid out
//! exactly as QEMU's `qcrypto_block_luks_create` lays it out.

use std::sync::Mutex;
use std::time::Instant;

use zeroize::Zeroizing;

use super::cipher::{CipherAlg, CipherMode, CipherSpec, IvGenAlg, SECTOR_SIZE};
use super::error::{random_bytes, LuksError};
use super::hash::HashAlg;
use super::header::{slot_area_sectors, KeySlot, LuksHeader, DIGEST_LEN, NUM_SLOTS, SALT_LEN};
use super::keyslot::{master_key_digest, seal, MasterKey};

/// Anti-forensic stripes of every slot (the LUKS1 spec's 4000).
pub const STRIPES: u32 = 4000;
/// Least PBKDF2 iterations for the master key digest and for a key slot.
pub const MIN_ITERATIONS: u32 = 1000;
/// QEMU's default PBKDF2 time per key slot, in milliseconds.
pub const DEFAULT_ITER_TIME_MS: u64 = 2000;
/// Sectors before the first key slot: the 592-byte header rounded up to
/// 4096 bytes.
const HEADER_SECTORS: u64 = 4096 / SECTOR_SIZE as u64;

/// Bytes before the payload of a new volume made with `opts` (QEMU's
/// `qcrypto_block_calculate_payload_offset`): 0 with a detached header.
pub fn payload_offset(opts: &CreateOptions) -> Result<u64, LuksError> {
    opts.spec.validate()?;
    if opts.detached_header {
        return Ok(0);
    }
    let key_bytes = u32::try_from(opts.spec.key_bytes())
        .map_err(|_| LuksError::InvalidArgument("key too large".into()))?;
    let area = slot_area_sectors(key_bytes, STRIPES);
    Ok((HEADER_SECTORS + NUM_SLOTS as u64 * area) * SECTOR_SIZE as u64)
}

/// How to make a new volume.
#[derive(Clone, Debug)]
pub struct CreateOptions {
    /// Cipher, mode, IV generator and hash.
    pub spec: CipherSpec,
    /// PBKDF2 time for unlocking slot 0, in milliseconds (QEMU's `iter-time`).
    pub iter_time_ms: u64,
    /// The header goes to its own node: payload offset 0.
    pub detached_header: bool,
}

impl Default for CreateOptions {
    /// QEMU's defaults: aes-256, xts, plain64 (no IV hash), sha256,
    /// 2000 ms, attached header.
    fn default() -> Self {
        CreateOptions {
            spec: CipherSpec {
                alg: CipherAlg::Aes256,
                mode: CipherMode::Xts,
                ivgen: IvGenAlg::Plain64,
                ivgen_hash: None,
                hash: HashAlg::Sha256,
            },
            iter_time_ms: DEFAULT_ITER_TIME_MS,
            detached_header: false,
        }
    }
}

/// A freshly made volume.
pub struct NewVolume {
    /// Header + key material areas of all 8 slots, to write at offset 0 of the header node
    /// (for an attached header, it is exactly payload_offset bytes long).
    pub header_image: Vec<u8>,
    /// The header in `header_image`.
    pub header: LuksHeader,
    /// The master key, to encrypt the payload with.
    pub master_key: MasterKey,
}

impl std::fmt::Debug for NewVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewVolume")
            .field("header_image_len", &self.header_image.len())
            .field("header", &self.header)
            .field("master_key", &"<redacted>")
            .finish()
    }
}

/// Writes `volume` to `header` from offset 0 (its old contents dropped) and sizes it for
/// `payload` bytes after the header: the header and key material, then the payload
/// (attached header; pass 0 for a detached header node), as QEMU's luks
/// `blockdev-create` and `qemu-img create -f luks` leave the file.
pub fn write_volume(
    header: &dyn crate::BlockNode,
    volume: &NewVolume,
    payload: u64,
) -> crate::Result<()> {
    write_header_image(
        header,
        &volume.header_image,
        volume.header_image.len() as u64,
        payload,
    )
}

/// Writes a new header's `image` at offset 0 of `header` (its old contents dropped) and
/// sizes it to `header_len` (the header area, at least `image`'s length) plus `payload`:
/// [`write_volume`] for LUKS1, and LUKS2 whose header area is larger than the bytes
/// written.
pub fn write_header_image(
    header: &dyn crate::BlockNode,
    image: &[u8],
    header_len: u64,
    payload: u64,
) -> crate::Result<()> {
    let total = header_len
        .max(image.len() as u64)
        .checked_add(payload)
        .ok_or_else(|| LuksError::InvalidArgument(format!("size {payload} is too large")))?;
    header.resize(0)?;
    header.resize(total)?;
    header.write_at(0, image)?;
    header.flush()
}

/// PBKDF2 iteration counts of a new volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PbkdfIterations {
    /// For the master key digest.
    pub master_key: u32,
    /// For key slot 0.
    pub slot: u32,
}

/// Make a new volume with slot 0 holding `passphrase`, exactly as QEMU's qcrypto_block_luks_create lays it out.
///
/// The iteration counts come from [`benchmark_iterations`].
pub fn create(opts: &CreateOptions, passphrase: &[u8]) -> Result<NewVolume, LuksError> {
    opts.spec.validate()?;
    let iterations =
        benchmark_iterations(opts.spec.hash, opts.spec.key_bytes(), opts.iter_time_ms)?;
    create_with_iterations(opts, passphrase, iterations)
}

/// [`create`] with given iteration counts instead of benchmarked ones
/// (raised to [`MIN_ITERATIONS`]); `opts.iter_time_ms` is not used.
pub fn create_with_iterations(
    opts: &CreateOptions,
    passphrase: &[u8],
    iterations: PbkdfIterations,
) -> Result<NewVolume, LuksError> {
    let spec = opts.spec;
    spec.validate()?;
    let key_len = spec.key_bytes();
    let key_bytes = u32::try_from(key_len).expect("key lengths are at most 64 bytes");

    let area = slot_area_sectors(key_bytes, STRIPES);
    let image_sectors = HEADER_SECTORS + NUM_SLOTS as u64 * area;
    let to_u32 = |v: u64| {
        u32::try_from(v).map_err(|_| LuksError::InvalidArgument("LUKS header too large".into()))
    };

    let mut master_key: MasterKey = Zeroizing::new(vec![0u8; key_len]);
    random_bytes(&mut master_key)?;
    let mut mk_salt = [0u8; SALT_LEN];
    random_bytes(&mut mk_salt)?;
    let mk_iterations = iterations.master_key.max(MIN_ITERATIONS);

    let mut slots: [KeySlot; NUM_SLOTS] = Default::default();
    for (i, slot) in slots.iter_mut().enumerate() {
        slot.key_offset_sectors = to_u32(HEADER_SECTORS + i as u64 * area)?;
        slot.stripes = STRIPES;
    }
    let slot0 = &mut slots[0];
    random_bytes(&mut slot0.salt)?;
    slot0.iterations = iterations.slot.max(MIN_ITERATIONS);
    let material = seal(&spec, &master_key, passphrase, slot0)?;
    slot0.active = true;

    let header = LuksHeader {
        spec,
        cipher_name: spec.alg.luks_name().to_string(),
        cipher_mode: spec.luks_mode_string(),
        hash_spec: spec.hash.name().to_string(),
        payload_offset_sectors: if opts.detached_header {
            0
        } else {
            to_u32(image_sectors)?
        },
        key_bytes,
        mk_digest: master_key_digest(spec.hash, &master_key, &mk_salt, mk_iterations),
        mk_salt,
        mk_iterations,
        uuid: new_uuid()?,
        slots,
    };
    header.validate(opts.detached_header)?;

    let image_len = usize::try_from(image_sectors * SECTOR_SIZE as u64)
        .map_err(|_| LuksError::InvalidArgument("LUKS header too large".into()))?;
    let mut header_image = vec![0u8; image_len];
    header_image[..LuksHeader::SIZE].copy_from_slice(&header.to_bytes());
    let at = usize::try_from(header.slots[0].key_offset()).expect("inside the image");
    header_image[at..at + material.len()].copy_from_slice(&material);

    Ok(NewVolume {
        header_image,
        header,
        master_key,
    })
}

/// A random (version 4) UUID in lower-case text.
pub(crate) fn new_uuid() -> Result<String, LuksError> {
    let mut b = [0u8; 16];
    random_bytes(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

/// Iteration counts that make PBKDF2 take `iter_time_ms` for a key slot of
/// a `key_bytes` master key, as QEMU computes them: the slot gets
/// `rate * iter_time_ms / 1000` iterations and the master key digest an
/// eighth of its own rate's worth, each at least [`MIN_ITERATIONS`].
///
/// `rate` is measured as QEMU's `qcrypto_pbkdf2_count_iters` measures it
/// (PBKDF2 rounds per second of this thread's CPU time, timed over more
/// than half a second). The rate for one output block is measured once per
/// hash and process and scaled by the number of output blocks.
pub fn benchmark_iterations(
    hash: HashAlg,
    key_bytes: usize,
    iter_time_ms: u64,
) -> Result<PbkdfIterations, LuksError> {
    let per_block = iterations_per_second(hash)?;
    let blocks = key_bytes.div_ceil(hash.digest_len()).max(1) as u64;
    // The 20-byte digest is one block of every supported hash.
    let master_key = scale(per_block, iter_time_ms, 8)?;
    let slot = scale(per_block / blocks, iter_time_ms, 1)?;
    Ok(PbkdfIterations { master_key, slot })
}

/// PBKDF2 iterations of `hash` that take `ms` for an output of `out_len`
/// bytes, at least [`MIN_ITERATIONS`] (the rate measured as for
/// [`benchmark_iterations`]).
pub(crate) fn pbkdf2_iterations(hash: HashAlg, out_len: usize, ms: u64) -> Result<u32, LuksError> {
    let per_block = iterations_per_second(hash)?;
    let blocks = out_len.div_ceil(hash.digest_len()).max(1) as u64;
    scale(per_block / blocks, ms, 1)
}

/// `per_second * ms / 1000 / divisor`, at least [`MIN_ITERATIONS`],
/// with QEMU's range errors.
fn scale(per_second: u64, ms: u64, divisor: u64) -> Result<u32, LuksError> {
    let iters = per_second.checked_mul(ms).ok_or_else(|| {
        LuksError::InvalidArgument(format!("PBKDF iterations {per_second} too large to scale"))
    })? / 1000
        / divisor;
    let iters = u32::try_from(iters).map_err(|_| {
        LuksError::InvalidArgument(format!("PBKDF iterations {iters} larger than {}", u32::MAX))
    })?;
    Ok(iters.max(MIN_ITERATIONS))
}

/// PBKDF2 rounds per second with one output block, measured once per hash.
fn iterations_per_second(hash: HashAlg) -> Result<u64, LuksError> {
    static RATES: Mutex<[u64; HashAlg::ALL.len()]> = Mutex::new([0; HashAlg::ALL.len()]);
    let index = HashAlg::ALL
        .iter()
        .position(|&h| h == hash)
        .expect("ALL lists every hash");
    let cached = RATES.lock().map(|r| r[index]).unwrap_or(0);
    if cached != 0 {
        return Ok(cached);
    }
    let rate = measure_iterations_per_second(hash)?;
    if let Ok(mut rates) = RATES.lock() {
        rates[index] = rate;
    }
    Ok(rate)
}

/// QEMU's `qcrypto_pbkdf2_count_iters`: from 2^15 rounds, grow the count
/// until one run takes more than 500 ms, then extrapolate to one second.
fn measure_iterations_per_second(hash: HashAlg) -> Result<u64, LuksError> {
    let password = [0x55u8; 32];
    let salt = [0xaau8; SALT_LEN];
    let mut out = [0u8; DIGEST_LEN];
    let clock = CpuClock::new();
    let mut iterations: u64 = 1 << 15;
    loop {
        let rounds = u32::try_from(iterations)
            .map_err(|_| LuksError::InvalidArgument("PBKDF2 benchmark did not converge".into()))?;
        let start = clock.now_ms();
        hash.pbkdf2(&password, &salt, rounds, &mut out);
        let delta = clock.now_ms().saturating_sub(start);
        if delta > 500 {
            return Ok((iterations * 1000 / delta).max(1));
        } else if delta < 100 {
            iterations *= 10;
        } else {
            iterations = iterations * 1000 / delta;
        }
    }
}

/// Milliseconds of this thread's user CPU time (as QEMU uses
/// `getrusage(RUSAGE_THREAD)`), read from `/proc/thread-self/stat`; wall
/// time where that is not available.
struct CpuClock {
    wall: Instant,
    use_proc: bool,
}

impl CpuClock {
    fn new() -> Self {
        CpuClock {
            wall: Instant::now(),
            use_proc: thread_user_ms().is_some(),
        }
    }

    fn now_ms(&self) -> u64 {
        if self.use_proc {
            if let Some(ms) = thread_user_ms() {
                return ms;
            }
        }
        u64::try_from(self.wall.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// User CPU time of the calling thread in ms (`utime`, in USER_HZ = 100
/// ticks per second).
fn thread_user_ms() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // Fields after the parenthesised command name start at field 3 (state);
    // utime is field 14.
    let rest = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = rest.split_whitespace().nth(11)?.parse().ok()?;
    ticks.checked_mul(10)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::super::cipher::new_sector_cipher;
    use super::super::header::slot_area_sectors;
    use super::super::keyslot::tests::{
        check_payload_crypto, file_reader, have_tool, mem_reader, run, PASSPHRASE,
    };
    use super::super::keyslot::unlock;
    use super::*;

    const FAST: PbkdfIterations = PbkdfIterations {
        master_key: 1000,
        slot: 1000,
    };

    fn spec(
        alg: CipherAlg,
        mode: CipherMode,
        ivgen: IvGenAlg,
        ivgen_hash: Option<HashAlg>,
        hash: HashAlg,
    ) -> CipherSpec {
        CipherSpec {
            alg,
            mode,
            ivgen,
            ivgen_hash,
            hash,
        }
    }

    /// A spread of specifications over every algorithm, mode, IV generator
    /// and hash. (The serpent and twofish crates are slow, ~2 MiB/s: fewer
    /// of those; every mode of them is checked in the cipher tests.)
    fn specs() -> Vec<CipherSpec> {
        use CipherAlg::*;
        use CipherMode::*;
        use HashAlg::*;
        use IvGenAlg::*;
        let mut v = Vec::new();
        for (i, alg) in CipherAlg::ALL.into_iter().enumerate() {
            let hash = |k: usize| HashAlg::ALL[(i + k) % HashAlg::ALL.len()];
            match alg.luks_name() {
                "aes" => {
                    for mode in [Ecb, Cbc, Xts, Ctr] {
                        v.push(spec(alg, mode, Plain64, None, hash(0)));
                    }
                    v.push(spec(alg, Cbc, Plain, None, hash(1)));
                    v.push(spec(alg, Xts, Essiv, Some(Sha256), hash(2)));
                    v.push(spec(alg, Cbc, Essiv, Some(Sha256), hash(3)));
                }
                "cast5" => {
                    for mode in [Ecb, Cbc, Ctr] {
                        v.push(spec(alg, mode, Plain64, None, hash(0)));
                    }
                    v.push(spec(alg, Cbc, Plain, None, hash(1)));
                }
                _ => {
                    v.push(spec(alg, Xts, Plain64, None, hash(0)));
                    v.push(spec(alg, Cbc, Essiv, Some(Sha256), hash(3)));
                }
            }
        }
        v.push(spec(Aes128, Ctr, Essiv, Some(Sha256), Sha1));
        v.push(spec(Aes256, Xts, Plain64, Some(Sha256), Sha256));
        v
    }

    #[test]
    fn defaults_are_qemus() {
        let o = CreateOptions::default();
        assert_eq!(o.spec.to_string(), "aes-256-xts-plain64");
        assert_eq!(o.spec.hash, HashAlg::Sha256);
        assert_eq!(o.iter_time_ms, 2000);
        assert!(!o.detached_header);
    }

    #[test]
    fn create_then_unlock_many_specs() {
        for (i, spec) in specs().into_iter().enumerate() {
            let detached = i % 2 == 1;
            let opts = CreateOptions {
                spec,
                iter_time_ms: 10,
                detached_header: detached,
            };
            let vol = create_with_iterations(&opts, b"pw", FAST).unwrap();
            let header = LuksHeader::parse(&vol.header_image, detached).unwrap();
            assert_eq!(header, vol.header);
            let key = unlock(&header, b"pw", &mut mem_reader(&vol.header_image)).unwrap();
            assert_eq!(&key[..], &vol.master_key[..], "{spec}");
            if i % 5 == 0 {
                let e = unlock(&header, b"pW", &mut mem_reader(&vol.header_image));
                assert!(matches!(e, Err(LuksError::WrongPassphrase)), "{spec}");
            }
        }
    }

    #[test]
    fn layout_is_qemus() {
        let opts = CreateOptions {
            spec: spec(
                CipherAlg::Aes192,
                CipherMode::Cbc,
                IvGenAlg::Essiv,
                Some(HashAlg::Sha256),
                HashAlg::Sha1,
            ),
            iter_time_ms: 10,
            detached_header: false,
        };
        let vol = create_with_iterations(&opts, b"pw", FAST).unwrap();
        let h = &vol.header;
        let area = slot_area_sectors(24, 4000);
        assert_eq!(area, 192);
        assert_eq!(h.payload_offset_sectors as u64, 8 + 8 * area);
        assert_eq!(vol.header_image.len() as u64, h.payload_offset());
        assert_eq!(h.cipher_name, "aes");
        assert_eq!(h.cipher_mode, "cbc-essiv:sha256");
        assert_eq!(h.hash_spec, "sha1");
        assert_eq!(h.key_bytes, 24);
        assert_eq!(vol.master_key.len(), 24);
        for (i, s) in h.slots.iter().enumerate() {
            assert_eq!(s.active, i == 0);
            assert_eq!(s.stripes, 4000);
            assert_eq!(s.key_offset_sectors as u64, 8 + i as u64 * area);
            if i > 0 {
                assert_eq!(s.iterations, 0);
                assert_eq!(s.salt, [0; 32]);
            }
        }
        assert_eq!(h.slots[0].iterations, 1000);
        assert_eq!(h.mk_iterations, 1000);
        // The padding of the last key material sector is encrypted too.
        let end = (8 * 512 + 188 * 512) as usize;
        assert!(vol.header_image[end - 256..end].iter().any(|&b| b != 0));
        assert!(vol.header_image[end..].iter().all(|&b| b == 0));

        let u = &h.uuid;
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(u
            .chars()
            .all(|c| c == '-' || c.is_ascii_digit() || c.is_ascii_lowercase()));
        assert_eq!(&vol.header_image[168 + 36..168 + 40], &[0; 4]);
        assert!(format!("{vol:?}").contains("<redacted>"));

        let detached = create_with_iterations(
            &CreateOptions {
                detached_header: true,
                ..opts
            },
            b"pw",
            FAST,
        )
        .unwrap();
        assert_eq!(detached.header.payload_offset_sectors, 0);
        assert_eq!(detached.header_image.len(), vol.header_image.len());
        assert_ne!(detached.master_key, vol.master_key);
        assert_ne!(detached.header.uuid, vol.header.uuid);
    }

    #[test]
    fn unusable_specs_are_errors() {
        let bad = [
            (
                spec(
                    CipherAlg::Cast5_128,
                    CipherMode::Xts,
                    IvGenAlg::Plain64,
                    None,
                    HashAlg::Sha1,
                ),
                "Cipher mode xts not supported with cast5-128: it needs a 16-byte block cipher",
            ),
            (
                spec(
                    CipherAlg::Cast5_128,
                    CipherMode::Cbc,
                    IvGenAlg::Essiv,
                    Some(HashAlg::Sha256),
                    HashAlg::Sha1,
                ),
                "Cipher cast5-128 not supported with essiv",
            ),
            (
                spec(
                    CipherAlg::Aes128,
                    CipherMode::Cbc,
                    IvGenAlg::Essiv,
                    Some(HashAlg::Sha1),
                    HashAlg::Sha1,
                ),
                "No AES cipher with key size 20 available",
            ),
            (
                spec(
                    CipherAlg::Aes128,
                    CipherMode::Cbc,
                    IvGenAlg::Essiv,
                    None,
                    HashAlg::Sha1,
                ),
                "Missing IV generator hash specification",
            ),
        ];
        for (s, want) in bad {
            let opts = CreateOptions {
                spec: s,
                ..CreateOptions::default()
            };
            assert_eq!(create(&opts, b"pw").unwrap_err().to_string(), want);
        }
    }

    #[test]
    fn scale_matches_qemu() {
        assert_eq!(scale(1_000_000, 2000, 1).unwrap(), 2_000_000);
        assert_eq!(scale(1_000_000, 2000, 8).unwrap(), 250_000);
        assert_eq!(scale(1_000_000, 1, 8).unwrap(), 1000);
        assert_eq!(scale(1_000_000, 0, 1).unwrap(), 1000);
        assert_eq!(
            scale(u64::MAX, 2, 1).unwrap_err().to_string(),
            format!("PBKDF iterations {} too large to scale", u64::MAX)
        );
        assert_eq!(
            scale(u64::MAX / 4, 2, 1).unwrap_err().to_string(),
            format!(
                "PBKDF iterations {} larger than 4294967295",
                u64::MAX / 2 / 1000
            )
        );
    }

    /// One real benchmark (about a second of CPU; cached per hash).
    #[test]
    fn benchmarked_create() {
        let opts = CreateOptions {
            iter_time_ms: 20,
            ..CreateOptions::default()
        };
        let vol = create(&opts, b"pw").unwrap();
        let h = &vol.header;
        assert!(h.slots[0].iterations >= MIN_ITERATIONS);
        assert!(h.mk_iterations >= MIN_ITERATIONS);
        let rate = iterations_per_second(HashAlg::Sha256).unwrap();
        // Slot: 64-byte output = 2 SHA-256 blocks.
        assert_eq!(
            h.slots[0].iterations,
            (rate / 2 * 20 / 1000).max(1000) as u32
        );
        assert_eq!(h.mk_iterations, (rate * 20 / 1000 / 8).max(1000) as u32);
        let key = unlock(h, b"pw", &mut mem_reader(&vol.header_image)).unwrap();
        assert_eq!(key, vol.master_key);
    }

    #[test]
    fn thread_cpu_clock_works() {
        let clock = CpuClock::new();
        let a = clock.now_ms();
        let mut x = 0u64;
        for i in 0..10_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(clock.now_ms() >= a);
    }

    /// cryptsetup accepts our headers (detached and attached) and the
    /// passphrase; only AES is in this kernel for its key slot check.
    #[test]
    fn cryptsetup_accepts_created_headers() {
        if !have_tool("cryptsetup") {
            return;
        }
        use CipherMode::*;
        use HashAlg::*;
        use IvGenAlg::*;
        let dir = tempfile::tempdir().unwrap();
        let pass = dir.path().join("pass.txt");
        std::fs::write(&pass, PASSPHRASE).unwrap();
        let cases = [
            spec(CipherAlg::Aes256, Xts, Plain64, None, Sha256),
            spec(CipherAlg::Aes128, Xts, Plain, None, Sha1),
            spec(CipherAlg::Aes256, Cbc, Essiv, Some(Sha256), Sha512),
            spec(CipherAlg::Aes192, Cbc, Essiv, Some(Sha256), Ripemd160),
            spec(CipherAlg::Aes128, Cbc, Plain64, None, Sha224),
            spec(CipherAlg::Aes256, Ctr, Plain64, None, Sha384),
            spec(CipherAlg::Aes128, Ecb, Plain64, None, Sha1),
            spec(CipherAlg::Serpent256, Xts, Plain64, None, Sha256),
        ];
        for (i, s) in cases.into_iter().enumerate() {
            let detached = i % 2 == 0;
            let opts = CreateOptions {
                spec: s,
                iter_time_ms: 10,
                detached_header: detached,
            };
            let vol = create_with_iterations(&opts, PASSPHRASE.as_bytes(), FAST).unwrap();
            let hdr = dir.path().join(format!("h{i}.img"));
            std::fs::write(&hdr, &vol.header_image).unwrap();
            let dump = run(Command::new("cryptsetup").arg("luksDump").arg(&hdr));
            assert!(
                dump.contains(&format!("Cipher mode:   \t{}", s.luks_mode_string())),
                "{dump}"
            );
            assert!(dump.contains(&vol.header.uuid), "{dump}");
            assert!(dump.contains("Key Slot 0: ENABLED"), "{dump}");
            assert!(dump.contains("Key Slot 7: DISABLED"), "{dump}");
            // cryptsetup here has only AES, and wants a bare "ecb" where QEMU
            // (and so cryptvm) writes "ecb-plain64".
            if s.alg.luks_name() != "aes" || s.mode == Ecb {
                continue;
            }
            let test = |key_file: &std::path::Path| {
                Command::new("cryptsetup")
                    .args(["luksOpen", "--test-passphrase", "--header"])
                    .arg(&hdr)
                    .arg("--key-file")
                    .arg(key_file)
                    .arg(&hdr)
                    .output()
                    .unwrap()
            };
            let ok = test(&pass);
            assert!(
                ok.status.success(),
                "{s}: {}",
                String::from_utf8_lossy(&ok.stderr)
            );
            let wrong = dir.path().join("wrong.txt");
            std::fs::write(&wrong, "not it").unwrap();
            assert!(!test(&wrong).status.success(), "{s}");
            // And we still open what cryptsetup checked.
            let header = LuksHeader::parse(&vol.header_image, detached).unwrap();
            let key = unlock(&header, PASSPHRASE.as_bytes(), &mut file_reader(&hdr)).unwrap();
            assert_eq!(key, vol.master_key);
        }
    }

    /// QEMU opens our images and agrees on the payload encryption, for every
    /// cipher family and mode it can open.
    #[test]
    fn qemu_opens_created_images() {
        if !have_tool("qemu-io") {
            return;
        }
        use CipherMode::*;
        use HashAlg::*;
        use IvGenAlg::*;
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            spec(CipherAlg::Aes256, Xts, Plain64, None, Sha256),
            spec(CipherAlg::Aes128, Cbc, Essiv, Some(Sha256), Sha1),
            spec(CipherAlg::Serpent256, Xts, Plain, None, Sha512),
            spec(CipherAlg::Serpent128, Cbc, Essiv, Some(Sha256), Ripemd160),
            spec(CipherAlg::Twofish256, Cbc, Plain64, None, Sha224),
            spec(CipherAlg::Twofish128, Xts, Essiv, Some(Sha256), Sha384),
            spec(CipherAlg::Cast5_128, Cbc, Plain64, None, Sha256),
            spec(CipherAlg::Cast5_128, Ctr, Plain, None, Sha1),
            spec(CipherAlg::Aes256, Ctr, Plain64, None, Sha256),
        ];
        for (i, s) in cases.into_iter().enumerate() {
            let detached = i % 2 == 1;
            let opts = CreateOptions {
                spec: s,
                iter_time_ms: 10,
                detached_header: detached,
            };
            let vol = create_with_iterations(&opts, PASSPHRASE.as_bytes(), FAST).unwrap();
            let payload = vec![0u8; 1 << 20];
            if detached {
                let hdr = dir.path().join(format!("h{i}.hdr"));
                let data = dir.path().join(format!("d{i}.raw"));
                std::fs::write(&hdr, &vol.header_image).unwrap();
                std::fs::write(&data, &payload).unwrap();
                check_payload_crypto(&data, Some(&hdr), 0, &vol.master_key, &s);
            } else {
                let img = dir.path().join(format!("i{i}.img"));
                let mut bytes = vol.header_image.clone();
                bytes.extend_from_slice(&payload);
                std::fs::write(&img, &bytes).unwrap();
                check_payload_crypto(&img, None, vol.header.payload_offset(), &vol.master_key, &s);
            }
            // The master key really is the payload key.
            let c = new_sector_cipher(&s, &vol.master_key).unwrap();
            let mut b = [1u8; 512];
            c.encrypt(0, &mut b);
            c.decrypt(0, &mut b);
            assert_eq!(b, [1u8; 512]);
        }
    }
}
