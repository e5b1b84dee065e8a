//! Cipher specifications (algorithm, chaining mode, IV generator) as LUKS1
//! headers name them, and the sector ciphers built from them.
//!
//! The header strings are parsed the way QEMU's `crypto/block-luks.c` does,
//! with QEMU's error wording, plus cryptsetup's bare `"ecb"` mode. The
//! per-mode implementations live in the submodules.

use std::fmt;

use aes::{Aes128, Aes192, Aes256};
use cast5::Cast5;
use cipher::consts::U16;
use cipher::{BlockDecrypt, BlockEncrypt, BlockSizeUser, KeyInit};
use serpent::Serpent;
use twofish::Twofish;
use zeroize::Zeroizing;

use super::error::LuksError;
use super::guarded::Guarded;
use super::hash::{HashAlg, MAX_DIGEST_LEN};

mod ivgen;
mod modes;
#[cfg(target_arch = "x86_64")]
mod vaes;
mod xts;
#[cfg(target_arch = "x86_64")]
mod xts_vaes;

use ivgen::{BlockEncryptor, IvGen};

/// Bytes in a sector: the unit of IV generation for payload and key material.
pub const SECTOR_SIZE: usize = 512;

/// A block cipher with a key size, named as QEMU names them (`"aes-256"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherAlg {
    /// AES with a 128-bit key.
    Aes128,
    /// AES with a 192-bit key.
    Aes192,
    /// AES with a 256-bit key.
    Aes256,
    /// Serpent with a 128-bit key.
    Serpent128,
    /// Serpent with a 192-bit key.
    Serpent192,
    /// Serpent with a 256-bit key.
    Serpent256,
    /// Twofish with a 128-bit key.
    Twofish128,
    /// Twofish with a 192-bit key.
    Twofish192,
    /// Twofish with a 256-bit key.
    Twofish256,
    /// CAST-128 (CAST5) with a 128-bit key; 8-byte blocks.
    Cast5_128,
}

impl CipherAlg {
    /// Every supported algorithm.
    pub const ALL: [CipherAlg; 10] = [
        CipherAlg::Aes128,
        CipherAlg::Aes192,
        CipherAlg::Aes256,
        CipherAlg::Serpent128,
        CipherAlg::Serpent192,
        CipherAlg::Serpent256,
        CipherAlg::Twofish128,
        CipherAlg::Twofish192,
        CipherAlg::Twofish256,
        CipherAlg::Cast5_128,
    ];

    /// Parses a QEMU algorithm name such as `"aes-256"` or `"cast5-128"`.
    pub fn from_name(qemu_name: &str) -> Result<Self, LuksError> {
        Self::ALL
            .into_iter()
            .find(|a| a.name() == qemu_name)
            .ok_or_else(|| LuksError::unsupported(format!("Algorithm '{qemu_name}' not supported")))
    }

    /// The algorithm with LUKS header name `luks_name` (`"aes"`, ...) and a
    /// key of `key_len` bytes, if there is one.
    pub fn from_luks_name(luks_name: &str, key_len: usize) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.luks_name() == luks_name && a.key_len() == key_len)
    }

    /// The QEMU name, e.g. `"aes-256"`.
    pub fn name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes192 => "aes-192",
            CipherAlg::Aes256 => "aes-256",
            CipherAlg::Serpent128 => "serpent-128",
            CipherAlg::Serpent192 => "serpent-192",
            CipherAlg::Serpent256 => "serpent-256",
            CipherAlg::Twofish128 => "twofish-128",
            CipherAlg::Twofish192 => "twofish-192",
            CipherAlg::Twofish256 => "twofish-256",
            CipherAlg::Cast5_128 => "cast5-128",
        }
    }

    /// The name in a LUKS header's `cipher_name` field, e.g. `"aes"`.
    pub fn luks_name(self) -> &'static str {
        match self {
            CipherAlg::Aes128 | CipherAlg::Aes192 | CipherAlg::Aes256 => "aes",
            CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => "serpent",
            CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => "twofish",
            CipherAlg::Cast5_128 => "cast5",
        }
    }

    /// Key length in bytes (of one key: XTS uses two).
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128
            | CipherAlg::Serpent128
            | CipherAlg::Twofish128
            | CipherAlg::Cast5_128 => 16,
            CipherAlg::Aes192 | CipherAlg::Serpent192 | CipherAlg::Twofish192 => 24,
            CipherAlg::Aes256 | CipherAlg::Serpent256 | CipherAlg::Twofish256 => 32,
        }
    }

    /// Block length in bytes (also the IV length).
    pub fn block_len(self) -> usize {
        match self {
            CipherAlg::Cast5_128 => 8,
            _ => 16,
        }
    }

    /// The cipher ESSIV uses with this payload cipher and `hash`, as
    /// QEMU's `qcrypto_block_luks_essiv_cipher` picks it (and dm-crypt
    /// does): the same family, with a key as long as the digest.
    pub fn essiv_cipher(self, hash: HashAlg) -> Result<CipherAlg, LuksError> {
        let digest_len = hash.digest_len();
        if digest_len == self.key_len() {
            return Ok(self);
        }
        let family = match self.luks_name() {
            "aes" => "AES",
            "serpent" => "Serpent",
            "twofish" => "Twofish",
            _ => {
                return Err(LuksError::unsupported(format!(
                    "Cipher {} not supported with essiv",
                    self.name()
                )))
            }
        };
        CipherAlg::from_luks_name(self.luks_name(), digest_len).ok_or_else(|| {
            LuksError::unsupported(format!(
                "No {family} cipher with key size {digest_len} available"
            ))
        })
    }
}

/// A block cipher chaining mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherMode {
    /// Electronic codebook: no IV (insecure; accepted for compatibility).
    Ecb,
    /// Cipher block chaining, IV per sector.
    Cbc,
    /// XEX tweaked codebook with ciphertext stealing (two keys; the IV is
    /// the tweak).
    Xts,
    /// Counter mode: the IV is the initial counter block, incremented as a
    /// big-endian number over the whole block.
    Ctr,
}

impl CipherMode {
    /// Parses `"ecb"`, `"cbc"`, `"xts"` or `"ctr"`.
    pub fn from_name(name: &str) -> Result<Self, LuksError> {
        [
            CipherMode::Ecb,
            CipherMode::Cbc,
            CipherMode::Xts,
            CipherMode::Ctr,
        ]
        .into_iter()
        .find(|m| m.name() == name)
        .ok_or_else(|| LuksError::unsupported(format!("Cipher mode {name} not supported")))
    }

    /// The name, e.g. `"xts"`.
    pub fn name(self) -> &'static str {
        match self {
            CipherMode::Ecb => "ecb",
            CipherMode::Cbc => "cbc",
            CipherMode::Xts => "xts",
            CipherMode::Ctr => "ctr",
        }
    }
}

/// How the IV of each sector is derived from its sector number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IvGenAlg {
    /// The sector number truncated to 32 bits, little-endian, zero padded.
    Plain,
    /// The 64-bit sector number, little-endian, zero padded.
    Plain64,
    /// The `plain64` IV encrypted with a key that is the hash of the
    /// master key (Encrypted Salt-Sector IV).
    Essiv,
}

impl IvGenAlg {
    /// Parses `"plain"`, `"plain64"` or `"essiv"`.
    pub fn from_name(name: &str) -> Result<Self, LuksError> {
        [IvGenAlg::Plain, IvGenAlg::Plain64, IvGenAlg::Essiv]
            .into_iter()
            .find(|g| g.name() == name)
            .ok_or_else(|| LuksError::unsupported(format!("IV generator {name} not supported")))
    }

    /// The name, e.g. `"plain64"`.
    pub fn name(self) -> &'static str {
        match self {
            IvGenAlg::Plain => "plain",
            IvGenAlg::Plain64 => "plain64",
            IvGenAlg::Essiv => "essiv",
        }
    }
}

/// Everything needed to build a cipher, as stored in (or parsed from) a LUKS header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CipherSpec {
    /// Block cipher and key size (of one key for XTS).
    pub alg: CipherAlg,
    /// Chaining mode.
    pub mode: CipherMode,
    /// IV generator (ignored by ECB).
    pub ivgen: IvGenAlg,
    /// Hash of the IV generator: required by ESSIV; accepted and ignored
    /// with `plain`/`plain64`, as dm-crypt and QEMU do.
    pub ivgen_hash: Option<HashAlg>,
    /// Hash for PBKDF2 and the anti-forensic splitter.
    pub hash: HashAlg,
}

impl CipherSpec {
    /// master key length in bytes (doubled for xts)
    pub fn key_bytes(&self) -> usize {
        match self.mode {
            CipherMode::Xts => self.alg.key_len() * 2,
            _ => self.alg.key_len(),
        }
    }

    /// LUKS header cipher_mode string, e.g. "xts-plain64", "cbc-essiv:sha256".
    ///
    /// ECB is written as QEMU writes it (`"ecb-plain64"`), so that QEMU opens
    /// the header; cryptsetup only accepts a bare `"ecb"` (which we read).
    pub fn luks_mode_string(&self) -> String {
        match self.ivgen_hash {
            Some(h) => format!("{}-{}:{}", self.mode.name(), self.ivgen.name(), h.name()),
            None => format!("{}-{}", self.mode.name(), self.ivgen.name()),
        }
    }

    /// Parse from the header strings; key_bytes picks the key size; errors match QEMU's wording.
    ///
    /// `cipher_mode` is `<mode>-<ivgen>[:<hash>]` (e.g. `"cbc-essiv:sha256"`)
    /// or cryptsetup's bare `"ecb"`. For XTS `key_bytes` holds both keys.
    pub fn from_luks(
        cipher_name: &str,
        cipher_mode: &str,
        hash_spec: &str,
        key_bytes: u32,
    ) -> Result<Self, LuksError> {
        let (mode_name, ivgen_name, ivhash_name) = match cipher_mode.split_once('-') {
            Some((mode, rest)) => match rest.split_once(':') {
                Some((ivgen, hash)) => (mode, Some(ivgen), Some(hash)),
                None => (mode, Some(rest), None),
            },
            None if cipher_mode == "ecb" => ("ecb", None, None),
            None => {
                return Err(LuksError::unsupported(format!(
                    "Unexpected cipher mode string format {cipher_mode}"
                )))
            }
        };
        let ivgen_hash = ivhash_name.map(HashAlg::from_name).transpose()?;
        let mode = CipherMode::from_name(mode_name)?;
        let alg = lookup_alg(cipher_name, mode, key_bytes)?;
        let hash = HashAlg::from_name(hash_spec)?;
        let ivgen = match ivgen_name {
            Some(name) => IvGenAlg::from_name(name)?,
            // Bare "ecb": no IV at all; plain64 stands in and is ignored.
            None => IvGenAlg::Plain64,
        };
        let spec = CipherSpec {
            alg,
            mode,
            ivgen,
            ivgen_hash,
            hash,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks that the parts work together: ESSIV has a hash and a usable
    /// ESSIV cipher, and XTS has a 16-byte block cipher.
    pub fn validate(&self) -> Result<(), LuksError> {
        self.essiv_alg()?;
        if self.mode == CipherMode::Xts && self.alg.block_len() != 16 {
            return Err(LuksError::unsupported(format!(
                "Cipher mode xts not supported with {}: it needs a 16-byte block cipher",
                self.alg.name()
            )));
        }
        Ok(())
    }

    /// The ESSIV cipher, or `None` when the IV generator is not ESSIV.
    pub fn essiv_alg(&self) -> Result<Option<CipherAlg>, LuksError> {
        if self.ivgen != IvGenAlg::Essiv {
            return Ok(None);
        }
        let hash = self
            .ivgen_hash
            .ok_or_else(|| LuksError::unsupported("Missing IV generator hash specification"))?;
        self.alg.essiv_cipher(hash).map(Some)
    }
}

impl fmt::Display for CipherSpec {
    /// cryptsetup style, e.g. `aes-256-xts-plain64`, `aes-256-ecb`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.alg.name(), self.luks_mode_string())
    }
}

/// QEMU's `qcrypto_block_luks_cipher_name_lookup`: the algorithm of the
/// header's cipher name with (for XTS, half of) `key_bytes`.
fn lookup_alg(cipher_name: &str, mode: CipherMode, key_bytes: u32) -> Result<CipherAlg, LuksError> {
    let (per_key, exact) = match mode {
        CipherMode::Xts if key_bytes & 1 != 0 => (key_bytes, false),
        CipherMode::Xts => (key_bytes / 2, true),
        _ => (key_bytes, true),
    };
    usize::try_from(per_key)
        .ok()
        .filter(|_| exact)
        .and_then(|len| CipherAlg::from_luks_name(cipher_name, len))
        .ok_or_else(|| {
            LuksError::unsupported(format!(
                "Algorithm {cipher_name} with key size {per_key} bytes not supported"
            ))
        })
}

/// Encrypts/decrypts whole 512-byte sectors; the IV of each sector derives from its sector number.
pub trait SectorCipher: Send + Sync {
    /// `buf.len()` is a multiple of 512; `first_sector` is the sector number of buf[0..512].
    ///
    /// # Panics
    /// If `buf.len()` is not a multiple of 512 (a caller bug: encrypting
    /// only part of the buffer would leave plaintext behind).
    fn encrypt(&self, first_sector: u64, buf: &mut [u8]);
    /// Inverse of [`SectorCipher::encrypt`], with the same contract.
    fn decrypt(&self, first_sector: u64, buf: &mut [u8]);
    /// Encrypts `src` into `dst` (as [`SectorCipher::encrypt`] would in
    /// place), so that a write needs no separate copy of its data.
    ///
    /// # Panics
    /// If `src` is not whole sectors or `dst` is not as long as `src`.
    fn encrypt_to(&self, first_sector: u64, src: &[u8], dst: &mut [u8]) {
        check_len(src);
        check_same_len(src, dst);
        dst.copy_from_slice(src);
        self.encrypt(first_sector, dst);
    }
    /// The implementation, for tests that must know which one they ran.
    #[cfg(test)]
    fn implementation(&self) -> &'static str {
        "generic"
    }
}

impl fmt::Debug for dyn SectorCipher + '_ {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SectorCipher { .. }")
    }
}

/// Builds the sector cipher of `spec` keyed with `key` (the master key, or a
/// key slot's key; [`CipherSpec::key_bytes`] long). The key schedule is
/// computed once here; encrypting does not allocate.
///
/// AES-XTS uses the VAES/AVX-512 kernel when the CPU has it, else the
/// generic implementation over the `aes` crate (AES-NI or software).
pub fn new_sector_cipher(
    spec: &CipherSpec,
    key: &[u8],
) -> Result<Box<dyn SectorCipher>, LuksError> {
    build_sector_cipher(spec, key, Impl::Fastest)
}

/// [`new_sector_cipher`] for sectors of `sector_size` bytes (512, 1024,
/// 2048 or 4096, as LUKS2 segments have): one IV per sector, the sector
/// numbers given to [`SectorCipher::encrypt`] count such sectors, and
/// buffers are whole such sectors. XTS, CBC and ECB take any of these
/// sizes (the generic implementation); CTR only 512.
pub fn new_sector_cipher_sized(
    spec: &CipherSpec,
    key: &[u8],
    sector_size: usize,
) -> Result<Box<dyn SectorCipher>, LuksError> {
    if sector_size == SECTOR_SIZE {
        return new_sector_cipher(spec, key);
    }
    if !(SECTOR_SIZE..=4096).contains(&sector_size) || !sector_size.is_power_of_two() {
        return Err(LuksError::unsupported(format!(
            "Sector size {sector_size} is not supported (512, 1024, 2048 or 4096)"
        )));
    }
    check_key(spec, key)?;
    let ivgen = new_ivgen(spec, key)?;
    macro_rules! sized {
        ($c:ty) => {
            sized_cipher::<$c>(spec, key, ivgen, sector_size)
        };
    }
    match spec.alg {
        CipherAlg::Aes128 => sized!(Aes128),
        CipherAlg::Aes192 => sized!(Aes192),
        CipherAlg::Aes256 => sized!(Aes256),
        CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => {
            sized!(Serpent)
        }
        CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => {
            sized!(Twofish)
        }
        CipherAlg::Cast5_128 => Err(LuksError::unsupported(format!(
            "Cipher {} is not supported with sector size {sector_size}",
            spec.alg.name()
        ))),
    }
}

/// The generic cipher of `spec` over `sector`-byte sectors, for a 16-byte block cipher.
fn sized_cipher<C>(
    spec: &CipherSpec,
    key: &[u8],
    ivgen: IvGen,
    sector: usize,
) -> Result<Box<dyn SectorCipher>, LuksError>
where
    C: ModeCipher + BlockSizeUser<BlockSize = U16>,
{
    Ok(match spec.mode {
        CipherMode::Xts => {
            let (data_key, tweak_key) = key.split_at(key.len() / 2);
            guarded(xts::Xts::with_sector(
                init::<C>(spec.alg.name(), data_key)?,
                init::<C>(spec.alg.name(), tweak_key)?,
                ivgen,
                sector,
            ))
        }
        CipherMode::Cbc => guarded(modes::Cbc::with_sector(
            init::<C>(spec.alg.name(), key)?,
            ivgen,
            sector,
        )),
        CipherMode::Ecb => guarded(modes::Ecb::new(init::<C>(spec.alg.name(), key)?)),
        CipherMode::Ctr => {
            return Err(LuksError::unsupported(format!(
                "Cipher mode ctr is not supported with sector size {sector}"
            )))
        }
    })
}

/// Which implementation [`build_sector_cipher`] may pick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Impl {
    /// The fastest this CPU runs.
    Fastest,
    /// The generic one, over the RustCrypto block ciphers (tests compare
    /// the two).
    #[cfg_attr(not(test), allow(dead_code))]
    Generic,
}

/// A usable spec, and a key of the length it takes.
fn check_key(spec: &CipherSpec, key: &[u8]) -> Result<(), LuksError> {
    spec.validate()?;
    if key.len() != spec.key_bytes() {
        return Err(LuksError::KeyLength {
            what: spec.to_string(),
            expected: spec.key_bytes(),
            got: key.len(),
        });
    }
    Ok(())
}

/// [`new_sector_cipher`], choosing among the implementations with `which`.
fn build_sector_cipher(
    spec: &CipherSpec,
    key: &[u8],
    which: Impl,
) -> Result<Box<dyn SectorCipher>, LuksError> {
    check_key(spec, key)?;
    let ivgen = new_ivgen(spec, key)?;
    #[cfg(target_arch = "x86_64")]
    if spec.mode == CipherMode::Xts && which == Impl::Fastest {
        let (data_key, tweak_key) = key.split_at(key.len() / 2);
        let is_aes = matches!(
            spec.alg,
            CipherAlg::Aes128 | CipherAlg::Aes192 | CipherAlg::Aes256
        );
        // None without VAES/AVX-512: then the generic path below.
        if let Some(aes) = is_aes
            .then(|| vaes::XtsAes::new(data_key, tweak_key))
            .flatten()
        {
            return Ok(guarded(xts_vaes::FastXts::new(aes, ivgen)));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = which;
    match spec.alg {
        CipherAlg::Aes128 => build16::<Aes128>(spec, key, ivgen),
        CipherAlg::Aes192 => build16::<Aes192>(spec, key, ivgen),
        CipherAlg::Aes256 => build16::<Aes256>(spec, key, ivgen),
        CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => {
            build16::<Serpent>(spec, key, ivgen)
        }
        CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => {
            build16::<Twofish>(spec, key, ivgen)
        }
        CipherAlg::Cast5_128 => build_any::<Cast5>(spec, key, ivgen),
    }
}

/// The IV generator of `spec` for `key`.
fn new_ivgen(spec: &CipherSpec, key: &[u8]) -> Result<IvGen, LuksError> {
    if spec.mode == CipherMode::Ecb {
        // ECB takes no IV; this one is never used.
        return Ok(IvGen::Plain64);
    }
    Ok(match spec.ivgen {
        IvGenAlg::Plain => IvGen::Plain,
        IvGenAlg::Plain64 => IvGen::Plain64,
        IvGenAlg::Essiv => {
            let (Some(essiv_alg), Some(hash)) = (spec.essiv_alg()?, spec.ivgen_hash) else {
                return Err(LuksError::unsupported(
                    "Missing IV generator hash specification",
                ));
            };
            let mut salt = Zeroizing::new([0u8; MAX_DIGEST_LEN]);
            hash.digest_parts_into(&[key], &mut salt[..]);
            // essiv_cipher() picked a key length equal to the digest length.
            IvGen::Essiv(new_block_encryptor(
                essiv_alg,
                &salt[..essiv_alg.key_len()],
            )?)
        }
    })
}

/// A single-block encryptor of `alg` (for ESSIV).
fn new_block_encryptor(alg: CipherAlg, key: &[u8]) -> Result<Box<dyn BlockEncryptor>, LuksError> {
    Ok(match alg {
        CipherAlg::Aes128 => guarded_block(init::<Aes128>(alg.name(), key)?),
        CipherAlg::Aes192 => guarded_block(init::<Aes192>(alg.name(), key)?),
        CipherAlg::Aes256 => guarded_block(init::<Aes256>(alg.name(), key)?),
        CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => {
            guarded_block(init::<Serpent>(alg.name(), key)?)
        }
        CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => {
            guarded_block(init::<Twofish>(alg.name(), key)?)
        }
        CipherAlg::Cast5_128 => guarded_block(init::<Cast5>(alg.name(), key)?),
    })
}

/// `cipher` boxed, its key schedule in [`Guarded`] pages.
fn guarded<T: SectorCipher + 'static>(cipher: T) -> Box<dyn SectorCipher> {
    Box::new(Guarded::new(cipher))
}

/// `cipher` boxed, its key schedule in [`Guarded`] pages.
fn guarded_block<T: BlockEncryptor + 'static>(cipher: T) -> Box<dyn BlockEncryptor> {
    Box::new(GuardedBlock(Guarded::new(cipher)))
}

/// A single-block encryptor in [`Guarded`] pages (a newtype: every block cipher is
/// a [`BlockEncryptor`] already).
struct GuardedBlock<T>(Guarded<T>);

impl<T: BlockEncryptor> BlockEncryptor for GuardedBlock<T> {
    fn encrypt_one(&self, block: &mut [u8]) {
        self.0.encrypt_one(block)
    }
}

impl<T: SectorCipher> SectorCipher for Guarded<T> {
    fn encrypt(&self, first_sector: u64, buf: &mut [u8]) {
        (**self).encrypt(first_sector, buf)
    }
    fn decrypt(&self, first_sector: u64, buf: &mut [u8]) {
        (**self).decrypt(first_sector, buf)
    }
    fn encrypt_to(&self, first_sector: u64, src: &[u8], dst: &mut [u8]) {
        (**self).encrypt_to(first_sector, src, dst)
    }
    #[cfg(test)]
    fn implementation(&self) -> &'static str {
        (**self).implementation()
    }
}

/// Keys a block cipher, mapping a bad key length to an error.
fn init<C: KeyInit>(what: &str, key: &[u8]) -> Result<C, LuksError> {
    C::new_from_slice(key).map_err(|_| LuksError::KeyLength {
        what: what.to_string(),
        expected: C::key_size(),
        got: key.len(),
    })
}

/// Block ciphers usable for every mode.
trait ModeCipher: KeyInit + BlockEncrypt + BlockDecrypt + Send + Sync + 'static {}
impl<C: KeyInit + BlockEncrypt + BlockDecrypt + Send + Sync + 'static> ModeCipher for C {}

/// Builds any mode for a 16-byte block cipher.
fn build16<C>(
    spec: &CipherSpec,
    key: &[u8],
    ivgen: IvGen,
) -> Result<Box<dyn SectorCipher>, LuksError>
where
    C: ModeCipher + BlockSizeUser<BlockSize = U16>,
{
    if spec.mode != CipherMode::Xts {
        return build_any::<C>(spec, key, ivgen);
    }
    let (data_key, tweak_key) = key.split_at(key.len() / 2);
    Ok(guarded(xts::Xts::new(
        init::<C>(spec.alg.name(), data_key)?,
        init::<C>(spec.alg.name(), tweak_key)?,
        ivgen,
    )))
}

/// Builds ECB, CBC or CTR for a block cipher of any block size.
fn build_any<C: ModeCipher>(
    spec: &CipherSpec,
    key: &[u8],
    ivgen: IvGen,
) -> Result<Box<dyn SectorCipher>, LuksError> {
    let cipher = init::<C>(spec.alg.name(), key)?;
    Ok(match spec.mode {
        CipherMode::Ecb => guarded(modes::Ecb::new(cipher)),
        CipherMode::Cbc => guarded(modes::Cbc::new(cipher, ivgen)),
        CipherMode::Ctr => guarded(modes::Ctr::new(cipher, ivgen)),
        // validate() rejected XTS with other than 16-byte blocks.
        CipherMode::Xts => {
            return Err(LuksError::unsupported(format!(
                "Cipher mode xts not supported with {}",
                spec.alg.name()
            )))
        }
    })
}

/// The number of the `index`th sector of a buffer starting at sector
/// `first` (wrapping around like the 64-bit IVs do).
fn sector_number(first: u64, index: usize) -> u64 {
    first.wrapping_add(index as u64)
}

/// Asserts that an out-of-place destination is as long as its source.
fn check_same_len(src: &[u8], dst: &[u8]) {
    assert_eq!(
        src.len(),
        dst.len(),
        "sector cipher source and destination lengths differ"
    );
}

/// Asserts that `buf` is whole `sector`-byte sectors.
fn check_len_of(buf: &[u8], sector: usize) {
    assert!(
        buf.chunks_exact(sector).remainder().is_empty(),
        "sector cipher buffer of {} bytes is not a whole number of {sector}-byte sectors",
        buf.len()
    );
}

/// Asserts the [`SectorCipher`] buffer contract.
fn check_len(buf: &[u8]) {
    assert!(
        buf.chunks_exact(SECTOR_SIZE).remainder().is_empty(),
        "sector cipher buffer of {} bytes is not a whole number of {SECTOR_SIZE}-byte sectors",
        buf.len()
    );
}

#[cfg(test)]
mod tests;
