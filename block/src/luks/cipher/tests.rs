//! Tests of the cipher specifications and sector ciphers: names and header
//! string parsing, known answers (IEEE 1619 XTS vectors; CBC/CTR/ECB/ESSIV
//! answers computed with Python's `cryptography`, i.e. OpenSSL), and a
//! differential check of every algorithm and mode against the RustCrypto
//! mode crates.

use cipher::{
    BlockDecryptMut, BlockEncrypt, BlockEncryptMut, InnerIvInit, KeyInit, KeyIvInit, StreamCipher,
};

use super::modes::as_blocks;
use super::*;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Both implementations: the fastest this CPU runs, and the generic one
/// (the fallback where the CPU lacks VAES/AVX-512).
const IMPLS: [Impl; 2] = [Impl::Fastest, Impl::Generic];

fn spec(
    alg: CipherAlg,
    mode: CipherMode,
    ivgen: IvGenAlg,
    ivgen_hash: Option<HashAlg>,
) -> CipherSpec {
    CipherSpec {
        alg,
        mode,
        ivgen,
        ivgen_hash,
        hash: HashAlg::Sha256,
    }
}

#[test]
fn names_round_trip() {
    for alg in CipherAlg::ALL {
        assert_eq!(CipherAlg::from_name(alg.name()).unwrap(), alg);
        assert_eq!(
            CipherAlg::from_luks_name(alg.luks_name(), alg.key_len()),
            Some(alg)
        );
        assert!(alg.name().starts_with(alg.luks_name()));
    }
    assert_eq!(
        CipherAlg::from_name("aes-512").unwrap_err().to_string(),
        "Algorithm 'aes-512' not supported"
    );
    for m in [
        CipherMode::Ecb,
        CipherMode::Cbc,
        CipherMode::Xts,
        CipherMode::Ctr,
    ] {
        assert_eq!(CipherMode::from_name(m.name()).unwrap(), m);
    }
    assert_eq!(
        CipherMode::from_name("gcm").unwrap_err().to_string(),
        "Cipher mode gcm not supported"
    );
    for g in [IvGenAlg::Plain, IvGenAlg::Plain64, IvGenAlg::Essiv] {
        assert_eq!(IvGenAlg::from_name(g.name()).unwrap(), g);
    }
    assert_eq!(
        IvGenAlg::from_name("benbi").unwrap_err().to_string(),
        "IV generator benbi not supported"
    );
    assert_eq!(CipherAlg::Cast5_128.block_len(), 8);
    assert_eq!(CipherAlg::Twofish192.key_len(), 24);
}

#[test]
fn from_luks_parses_header_strings() {
    let s = CipherSpec::from_luks("aes", "xts-plain64", "sha256", 64).unwrap();
    assert_eq!(
        s,
        spec(CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64, None)
    );
    assert_eq!(s.key_bytes(), 64);
    assert_eq!(s.luks_mode_string(), "xts-plain64");
    assert_eq!(s.to_string(), "aes-256-xts-plain64");

    let s = CipherSpec::from_luks("serpent", "cbc-essiv:sha256", "ripemd160", 16).unwrap();
    assert_eq!(s.alg, CipherAlg::Serpent128);
    assert_eq!(s.ivgen, IvGenAlg::Essiv);
    assert_eq!(s.ivgen_hash, Some(HashAlg::Sha256));
    assert_eq!(s.hash, HashAlg::Ripemd160);
    assert_eq!(s.key_bytes(), 16);
    assert_eq!(s.luks_mode_string(), "cbc-essiv:sha256");
    assert_eq!(s.essiv_alg().unwrap(), Some(CipherAlg::Serpent256));

    // A hash with plain64 is accepted and kept (dm-crypt ignores it).
    let s = CipherSpec::from_luks("twofish", "ctr-plain64:sha1", "sha1", 24).unwrap();
    assert_eq!(s.ivgen_hash, Some(HashAlg::Sha1));
    assert_eq!(s.luks_mode_string(), "ctr-plain64:sha1");

    // cryptsetup's bare "ecb", and QEMU's "ecb-<ivgen>".
    let s = CipherSpec::from_luks("aes", "ecb", "sha1", 16).unwrap();
    assert_eq!(s.mode, CipherMode::Ecb);
    assert_eq!(s.luks_mode_string(), "ecb-plain64");
    let s = CipherSpec::from_luks("cast5", "ecb-plain64", "sha1", 16).unwrap();
    assert_eq!((s.alg, s.mode), (CipherAlg::Cast5_128, CipherMode::Ecb));

    let err = |n: &str, m: &str, h: &str, k: u32| {
        CipherSpec::from_luks(n, m, h, k).unwrap_err().to_string()
    };
    assert_eq!(
        err("aes", "cbc", "sha1", 16),
        "Unexpected cipher mode string format cbc"
    );
    assert_eq!(
        err("aes", "", "sha1", 16),
        "Unexpected cipher mode string format "
    );
    assert_eq!(
        err("aes", "cbc-plain", "sha1", 20),
        "Algorithm aes with key size 20 bytes not supported"
    );
    assert_eq!(
        err("aes", "xts-plain", "sha1", 16),
        "Algorithm aes with key size 8 bytes not supported"
    );
    assert_eq!(
        err("cast5", "cbc-plain", "sha1", 32),
        "Algorithm cast5 with key size 32 bytes not supported"
    );
    assert_eq!(
        err("cast5", "xts-plain64", "sha1", 32),
        "Cipher mode xts not supported with cast5-128: it needs a 16-byte block cipher"
    );
    assert_eq!(
        err("aes", "cbc-plain", "whirlpool", 16),
        "Hash algorithm whirlpool not supported"
    );
    assert_eq!(
        err("aes", "cbc-essiv:", "sha1", 16),
        "Hash algorithm  not supported"
    );
    assert_eq!(
        err("aes", "cbc-essiv", "sha1", 16),
        "Missing IV generator hash specification"
    );
}

#[test]
fn essiv_cipher_choice_is_qemus() {
    use CipherAlg::*;
    use HashAlg::*;
    let ok = [
        (Aes128, Sha256, Aes256),
        (Aes256, Sha256, Aes256),
        (Aes192, Sha256, Aes256),
        (Aes256, Sha224, Aes256),
        (Serpent128, Sha256, Serpent256),
        (Twofish192, Sha256, Twofish256),
    ];
    // SHA-224's 28-byte digest fits no AES key: an error, unless the
    // payload cipher's own key is that long (never).
    for (alg, hash, want) in ok {
        if hash == Sha224 {
            assert_eq!(
                alg.essiv_cipher(hash).unwrap_err().to_string(),
                "No AES cipher with key size 28 available"
            );
        } else {
            assert_eq!(alg.essiv_cipher(hash).unwrap(), want);
        }
    }
    assert_eq!(
        Aes256.essiv_cipher(Sha1).unwrap_err().to_string(),
        "No AES cipher with key size 20 available"
    );
    assert_eq!(
        Serpent256.essiv_cipher(Sha512).unwrap_err().to_string(),
        "No Serpent cipher with key size 64 available"
    );
    assert_eq!(
        Twofish128.essiv_cipher(Sha384).unwrap_err().to_string(),
        "No Twofish cipher with key size 48 available"
    );
    assert_eq!(
        Cast5_128.essiv_cipher(Sha256).unwrap_err().to_string(),
        "Cipher cast5-128 not supported with essiv"
    );
}

#[test]
fn key_length_is_checked() {
    let s = spec(CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64, None);
    let e = new_sector_cipher(&s, &[0u8; 32]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Invalid key length 32 bytes for aes-256-xts-plain64, expected 64 bytes"
    );
    let s = spec(
        CipherAlg::Cast5_128,
        CipherMode::Xts,
        IvGenAlg::Plain64,
        None,
    );
    assert!(new_sector_cipher(&s, &[0u8; 32]).is_err());
}

#[test]
#[should_panic(expected = "not a whole number of 512-byte sectors")]
fn partial_sector_panics() {
    let s = spec(CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Plain64, None);
    let c = new_sector_cipher(&s, &[1u8; 16]).unwrap();
    c.encrypt(0, &mut [0u8; 100]);
}

#[test]
fn debug_shows_no_key() {
    let s = spec(CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Plain64, None);
    let c = new_sector_cipher(&s, &[0x42u8; 16]).unwrap();
    assert_eq!(format!("{c:?}"), "SectorCipher { .. }");
}

/// IEEE 1619-2007 XTS-AES vectors 1, 2, 4 and 10 (the data unit sequence
/// number is the plain64 IV).
#[test]
fn xts_ieee1619_vectors() {
    for which in IMPLS {
        ieee1619_vectors(which);
    }
}

fn ieee1619_vectors(which: Impl) {
    let aes128 = spec(CipherAlg::Aes128, CipherMode::Xts, IvGenAlg::Plain64, None);
    let aes256 = spec(CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64, None);

    // Vectors 1 and 2 are 32 bytes: the first two blocks of a sector.
    let c = build_sector_cipher(&aes128, &[0u8; 32], which).unwrap();
    let mut buf = [0u8; 512];
    c.encrypt(0, &mut buf);
    assert_eq!(
        hex(&buf[..32]),
        "917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e"
    );
    let mut key = vec![0x11u8; 16];
    key.extend_from_slice(&[0x22; 16]);
    let c = build_sector_cipher(&aes128, &key, which).unwrap();
    let mut buf = [0x44u8; 512];
    c.encrypt(0x33_3333_3333, &mut buf);
    assert_eq!(
        hex(&buf[..32]),
        "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0"
    );

    let pt: Vec<u8> = (0..512).map(|i| i as u8).collect();
    let cases = [
        (
            &aes128,
            "2718281828459045235360287471352631415926535897932384626433832795",
            0u64,
            "27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89c",
            "ebee4d64dd2395bb2d6a2d37a0a48ecb2bf4913cfc99d27c2214f2f4144715ea",
        ),
        (
            &aes256,
            "2718281828459045235360287471352662497757247093699959574966967627\
             3141592653589793238462643383279502884197169399375105820974944592",
            0xff,
            "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b",
            "e97e974fa393af794f7a4684395814cf820de60a01eaec677d87b452e316b364",
        ),
    ];
    for (s, key, sector, head, sha) in cases {
        let c = build_sector_cipher(s, &unhex(key), which).unwrap();
        let mut buf = pt.clone();
        c.encrypt(sector, &mut buf);
        assert_eq!(hex(&buf[..32]), head, "{which:?}");
        assert_eq!(hex(&HashAlg::Sha256.digest(&buf)), sha);
        c.decrypt(sector, &mut buf);
        assert_eq!(buf, pt);
    }
}

/// Two sectors from sector 0x1_0000_0005 (so `plain` and `plain64`
/// differ), checked by the SHA-256 of the ciphertext computed with Python's
/// `cryptography` package (OpenSSL), ESSIV IVs included.
#[test]
fn known_answers_from_openssl() {
    use CipherAlg::*;
    use CipherMode::*;
    use IvGenAlg::*;
    let essiv = Some(HashAlg::Sha256);
    let cases = [
        (
            spec(Aes128, Cbc, Plain, None),
            "a4f068e7bb6fbf522237bb81e5c3c4c86b61d0ac3d8e438365dd344a06152c89",
        ),
        (
            spec(Aes256, Cbc, Plain64, None),
            "96f78c887918f8eac819a55b6052d7dc445c80842d7076359df9b1450c53f260",
        ),
        (
            spec(Aes256, Cbc, Essiv, essiv),
            "a0ee7e5e993d642531c1f93a7511393f785157d2533a8ee0084182140c23fe07",
        ),
        (
            spec(Aes128, Cbc, Essiv, essiv),
            "ec37540dfbd6bdb6440af44a81e42e6aff122610b320dc8475f5b2c6fbc6485f",
        ),
        (
            spec(Aes192, Ctr, Plain64, None),
            "f385e9d8a53c2d76eb2589f8a2b7d53bca1658ed75a191b145ebc9ca57af9afc",
        ),
        (
            spec(Aes128, Ecb, Plain64, None),
            "c824bcf031717c27ead76176ee01a453e05c01f52a4280cf917bdde3e32ee01c",
        ),
        (
            spec(Aes256, Xts, Plain64, None),
            "e12f278d91137329ac4e6083c5e2ab00e48a8890911472850b3301307d12f793",
        ),
        (
            spec(Aes128, Xts, Plain, None),
            "a458052aaceb53eee8d5e72c3b3a5e0120b3341b0c304d528ccb004a84706555",
        ),
        (
            spec(Aes128, Xts, Essiv, essiv),
            "84541e0ca8876e3d48a03be8b902483ce25a7ac7453d56e5c34e288857063796",
        ),
        (
            spec(Cast5_128, Cbc, Plain64, None),
            "e0056d2a305ad0a4bff0b081da3285187ad69bf2184571a206decc1248dff63a",
        ),
    ];
    let pt: Vec<u8> = (0..1024usize).map(|i| (i * 13 + 5) as u8).collect();
    for ((s, want), which) in cases.into_iter().flat_map(|c| IMPLS.map(|w| (c, w))) {
        let key: Vec<u8> = (0..s.key_bytes()).map(|i| (i * 7 + 1) as u8).collect();
        let c = build_sector_cipher(&s, &key, which).unwrap();
        let mut buf = pt.clone();
        c.encrypt(0x1_0000_0005, &mut buf);
        assert_eq!(hex(&HashAlg::Sha256.digest(&buf)), want, "{s} {which:?}");
        let mut out = vec![0u8; pt.len()];
        c.encrypt_to(0x1_0000_0005, &pt, &mut out);
        assert_eq!(out, buf, "{s} {which:?} encrypt_to");
        c.decrypt(0x1_0000_0005, &mut buf);
        assert_eq!(buf, pt, "{s} {which:?}");
    }
}

/// Runs `$body` with `$c` bound to the RustCrypto type of `$alg`.
macro_rules! with_cipher16 {
    ($alg:expr, $c:ident => $body:expr) => {
        match $alg {
            CipherAlg::Aes128 => {
                type $c = aes::Aes128;
                $body
            }
            CipherAlg::Aes192 => {
                type $c = aes::Aes192;
                $body
            }
            CipherAlg::Aes256 => {
                type $c = aes::Aes256;
                $body
            }
            CipherAlg::Serpent128 | CipherAlg::Serpent192 | CipherAlg::Serpent256 => {
                type $c = serpent::Serpent;
                $body
            }
            CipherAlg::Twofish128 | CipherAlg::Twofish192 | CipherAlg::Twofish256 => {
                type $c = twofish::Twofish;
                $body
            }
            CipherAlg::Cast5_128 => unreachable!("not a 16-byte block cipher"),
        }
    };
}

/// The IV of `sector`, computed independently of `ivgen.rs`.
fn reference_iv(s: &CipherSpec, key: &[u8], sector: u64, block_len: usize) -> Vec<u8> {
    let mut iv = vec![0u8; block_len];
    match s.ivgen {
        IvGenAlg::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
        IvGenAlg::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
        IvGenAlg::Essiv => {
            iv[..8].copy_from_slice(&sector.to_le_bytes());
            let salt = s.ivgen_hash.unwrap().digest(key);
            let essiv = s.essiv_alg().unwrap().unwrap();
            with_cipher16!(essiv, C => C::new_from_slice(&salt)
                .unwrap()
                .encrypt_block(GenericArrayMut::from_mut_slice(&mut iv)));
        }
    }
    iv
}

type GenericArrayMut<N> = cipher::generic_array::GenericArray<u8, N>;

/// Encrypts (or decrypts) sector by sector with the RustCrypto mode
/// crates.
fn reference(s: &CipherSpec, key: &[u8], first: u64, buf: &mut [u8], encrypt: bool) {
    reference_sized(s, key, first, buf, encrypt, SECTOR_SIZE)
}

/// [`reference`] over sectors of `sector_size` bytes.
fn reference_sized(
    s: &CipherSpec,
    key: &[u8],
    first: u64,
    buf: &mut [u8],
    encrypt: bool,
    sector_size: usize,
) {
    for (i, sector) in buf.chunks_exact_mut(sector_size).enumerate() {
        let n = first.wrapping_add(i as u64);
        let bl = s.alg.block_len();
        let iv = reference_iv(s, key, n, bl);
        if s.alg == CipherAlg::Cast5_128 {
            type C = cast5::Cast5;
            match s.mode {
                CipherMode::Ecb if encrypt => ecb::Encryptor::<C>::new_from_slice(key)
                    .unwrap()
                    .encrypt_blocks_mut(as_blocks(sector)),
                CipherMode::Ecb => ecb::Decryptor::<C>::new_from_slice(key)
                    .unwrap()
                    .decrypt_blocks_mut(as_blocks(sector)),
                CipherMode::Cbc if encrypt => cbc::Encryptor::<C>::new_from_slices(key, &iv)
                    .unwrap()
                    .encrypt_blocks_mut(as_blocks(sector)),
                CipherMode::Cbc => cbc::Decryptor::<C>::new_from_slices(key, &iv)
                    .unwrap()
                    .decrypt_blocks_mut(as_blocks(sector)),
                CipherMode::Ctr => ctr::Ctr64BE::<C>::from_core(
                    ctr::CtrCore::<C, ctr::flavors::Ctr64BE>::inner_iv_slice_init(
                        C::new_from_slice(key).unwrap(),
                        &iv,
                    )
                    .unwrap(),
                )
                .apply_keystream(sector),
                CipherMode::Xts => unreachable!(),
            }
            continue;
        }
        with_cipher16!(s.alg, C => match s.mode {
            CipherMode::Ecb if encrypt => ecb::Encryptor::<C>::new_from_slice(key)
                .unwrap()
                .encrypt_blocks_mut(as_blocks(sector)),
            CipherMode::Ecb => ecb::Decryptor::<C>::new_from_slice(key)
                .unwrap()
                .decrypt_blocks_mut(as_blocks(sector)),
            CipherMode::Cbc if encrypt => cbc::Encryptor::<C>::new_from_slices(key, &iv)
                .unwrap()
                .encrypt_blocks_mut(as_blocks(sector)),
            CipherMode::Cbc => cbc::Decryptor::<C>::new_from_slices(key, &iv)
                .unwrap()
                .decrypt_blocks_mut(as_blocks(sector)),
            CipherMode::Ctr => ctr::Ctr128BE::<C>::from_core(
                ctr::CtrCore::<C, ctr::flavors::Ctr128BE>::inner_iv_slice_init(
                    C::new_from_slice(key).unwrap(),
                    &iv,
                )
                .unwrap(),
            )
                .apply_keystream(sector),
            CipherMode::Xts => {
                let (k1, k2) = key.split_at(key.len() / 2);
                let xts = xts_mode::Xts128::<C>::new(
                    C::new_from_slice(k1).unwrap(),
                    C::new_from_slice(k2).unwrap(),
                );
                let tweak: [u8; 16] = iv.try_into().unwrap();
                if encrypt {
                    xts.encrypt_sector(sector, tweak)
                } else {
                    xts.decrypt_sector(sector, tweak)
                }
            }
        });
    }
}

/// Every algorithm, mode and IV generator (with each ESSIV hash that
/// works), against the reference implementations.
fn all_specs() -> Vec<CipherSpec> {
    let mut v = Vec::new();
    for alg in CipherAlg::ALL {
        for mode in [
            CipherMode::Ecb,
            CipherMode::Cbc,
            CipherMode::Xts,
            CipherMode::Ctr,
        ] {
            for (ivgen, hash) in [
                (IvGenAlg::Plain, None),
                (IvGenAlg::Plain64, None),
                (IvGenAlg::Essiv, Some(HashAlg::Sha256)),
                (IvGenAlg::Essiv, Some(HashAlg::Sha512)),
                (IvGenAlg::Essiv, Some(HashAlg::Sha224)),
            ] {
                let s = spec(alg, mode, ivgen, hash);
                if s.validate().is_ok() {
                    v.push(s);
                }
            }
        }
    }
    v
}

#[test]
fn matches_rustcrypto_mode_crates() {
    let specs = all_specs();
    assert!(specs.len() > 80, "{}", specs.len());
    let pt: Vec<u8> = (0..3 * SECTOR_SIZE).map(|i| (i * 31 + 7) as u8).collect();
    for (s, which) in specs.into_iter().flat_map(|s| IMPLS.map(|w| (s, w))) {
        let key: Vec<u8> = (0..s.key_bytes()).map(|i| (i * 11 + 3) as u8).collect();
        let c = build_sector_cipher(&s, &key, which).unwrap();
        for first in [0u64, 1, 0xffff_fffe, u64::MAX - 1] {
            let mut ours = pt.clone();
            let mut theirs = pt.clone();
            // The last case wraps the sector number around.
            if first == u64::MAX - 1 {
                ours.truncate(2 * SECTOR_SIZE);
                theirs.truncate(2 * SECTOR_SIZE);
            }
            c.encrypt(first, &mut ours);
            reference(&s, &key, first, &mut theirs, true);
            assert_eq!(ours, theirs, "{s} {which:?} encrypt from {first}");
            assert_ne!(&ours[..], &pt[..ours.len()]);
            c.decrypt(first, &mut ours);
            reference(&s, &key, first, &mut theirs, false);
            assert_eq!(ours, theirs, "{s} {which:?} decrypt from {first}");
            assert_eq!(&ours[..], &pt[..ours.len()]);
        }
        // Sector by sector equals all at once.
        let mut whole = pt.clone();
        c.encrypt(9, &mut whole);
        let mut pieces = pt.clone();
        for (i, sector) in pieces.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            c.encrypt(9 + i as u64, sector);
        }
        assert_eq!(whole, pieces, "{s} {which:?}");
        // An empty buffer is fine.
        c.encrypt(0, &mut []);
    }
}

/// A small deterministic generator (SplitMix64), seeded at random; the
/// seed is in every failure message so that a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn new() -> (Rng, u64) {
        let mut seed = [0u8; 8];
        getrandom::getrandom(&mut seed).unwrap();
        let seed = u64::from_le_bytes(seed);
        (Rng(seed), seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// A first sector: small, just below 2^32 (so that `plain` wraps
    /// inside the buffer), large, or just below 2^64 (`plain64` wraps).
    fn first_sector(&mut self) -> u64 {
        match self.below(4) {
            0 => self.below(1000),
            1 => (1 << 32) - 1 - self.below(40),
            2 => self.next(),
            _ => u64::MAX - self.below(40),
        }
    }
}

/// The AES-XTS specs the fast path serves (every AES key size and IV
/// generator).
fn aes_xts_specs() -> Vec<CipherSpec> {
    all_specs()
        .into_iter()
        .filter(|s| s.mode == CipherMode::Xts && s.alg.luks_name() == "aes")
        .collect()
}

/// On a CPU with VAES/AVX-512, AES-XTS takes the fused kernel (so that the
/// tests comparing the two implementations compare two); elsewhere the
/// generic one. Other ciphers and modes are always generic.
#[test]
fn fastest_is_the_vaes_kernel_where_the_cpu_has_it() {
    #[cfg(target_arch = "x86_64")]
    let fast = if vaes::supported() { "vaes" } else { "generic" };
    #[cfg(not(target_arch = "x86_64"))]
    let fast = "generic";
    eprintln!("AES-XTS implementation on this CPU: {fast}");
    for s in all_specs() {
        let key = vec![7u8; s.key_bytes()];
        let want = if s.mode == CipherMode::Xts && s.alg.luks_name() == "aes" {
            fast
        } else {
            "generic"
        };
        let c = build_sector_cipher(&s, &key, Impl::Fastest).unwrap();
        assert_eq!(c.implementation(), want, "{s}");
        let c = build_sector_cipher(&s, &key, Impl::Generic).unwrap();
        assert_eq!(c.implementation(), "generic", "{s}");
    }
}

/// The kernel's own key expansion (encryption and decryption schedules)
/// against the `aes` crate, for random keys and blocks of each key size.
#[cfg(target_arch = "x86_64")]
#[test]
fn vaes_key_schedule_matches_aes_crate() {
    use cipher::{BlockDecrypt, BlockEncrypt};
    if !vaes::supported() {
        eprintln!("SKIPPED: this CPU has no VAES/AVX-512");
        return;
    }
    let (mut rng, seed) = Rng::new();
    for key_len in [16, 24, 32] {
        for _ in 0..200 {
            let key = rng.bytes(key_len);
            let ours = vaes::XtsAes::new(&key, &key).unwrap();
            let block = rng.bytes(16);
            let n = u128::from_le_bytes(block.clone().try_into().unwrap());
            let mut enc = GenericArrayMut::clone_from_slice(&block);
            let mut dec = enc;
            match key_len {
                16 => {
                    let c = aes::Aes128::new_from_slice(&key).unwrap();
                    c.encrypt_block(&mut enc);
                    c.decrypt_block(&mut dec);
                }
                24 => {
                    let c = aes::Aes192::new_from_slice(&key).unwrap();
                    c.encrypt_block(&mut enc);
                    c.decrypt_block(&mut dec);
                }
                _ => {
                    let c = aes::Aes256::new_from_slice(&key).unwrap();
                    c.encrypt_block(&mut enc);
                    c.decrypt_block(&mut dec);
                }
            }
            let what = format!("key {} block {} (seed {seed:#x})", hex(&key), hex(&block));
            assert_eq!(ours.aes_block(n, true).to_le_bytes(), enc[..], "{what}");
            assert_eq!(ours.aes_block(n, false).to_le_bytes(), dec[..], "{what}");
        }
    }
}

/// The fast path against the generic one: random keys, IV generators,
/// first sectors (across 2^32 and 2^64) and lengths (across the kernel's
/// 32-sector batches, and its one-vector tweak path for up to 8 sectors),
/// in place and out of place.
#[test]
fn fast_xts_matches_generic() {
    let (mut rng, seed) = Rng::new();
    let specs = aes_xts_specs();
    assert_eq!(specs.len(), 3 * 3, "{specs:?}");
    for round in 0..400 {
        let s = specs[round % specs.len()];
        let key = rng.bytes(s.key_bytes());
        let fast = build_sector_cipher(&s, &key, Impl::Fastest).unwrap();
        let generic = build_sector_cipher(&s, &key, Impl::Generic).unwrap();
        let sectors = match rng.below(3) {
            0 => rng.below(10),
            1 => 30 + rng.below(6),
            _ => rng.below(100),
        } as usize;
        let first = rng.first_sector();
        let what = format!(
            "{s} {} from {first}, {sectors} sectors (seed {seed:#x}, round {round})",
            fast.implementation()
        );
        let pt = rng.bytes(sectors * SECTOR_SIZE);
        let mut want = pt.clone();
        generic.encrypt(first, &mut want);
        let mut got = pt.clone();
        fast.encrypt(first, &mut got);
        assert!(got == want, "encrypt {what}");
        let mut to = vec![0u8; pt.len()];
        fast.encrypt_to(first, &pt, &mut to);
        assert!(to == want, "encrypt_to {what}");
        fast.decrypt(first, &mut got);
        assert!(got == pt, "decrypt {what}");
        generic.decrypt(first, &mut want);
        assert!(want == pt, "generic decrypt {what}");
    }
}

/// Runs `openssl enc -e/-d -<cipher> -nopad -K <key>` over `data`.
fn openssl_ecb(cipher: &str, encrypt: bool, key: &[u8], data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args([
            "enc",
            if encrypt { "-e" } else { "-d" },
            &format!("-{cipher}"),
        ])
        .args(["-nopad", "-K", &hex(key)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running openssl");
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "openssl enc -{cipher} failed");
    out.stdout
}

/// `buf ^= tweaks` block by block, the tweaks of each sector being
/// `T * x^i` from that sector's `T` (16 bytes each in `sector_tweaks`).
fn xor_xts_tweaks(buf: &mut [u8], sector_tweaks: &[u8]) {
    for (sector, t) in buf
        .chunks_exact_mut(SECTOR_SIZE)
        .zip(sector_tweaks.chunks_exact(16))
    {
        let mut x = u128::from_le_bytes(t.try_into().unwrap());
        for block in sector.chunks_exact_mut(16) {
            let b = u128::from_le_bytes((&*block).try_into().unwrap()) ^ x;
            block.copy_from_slice(&b.to_le_bytes());
            x = (x << 1) ^ ((x >> 127) * 0x87);
        }
    }
}

/// Both implementations against OpenSSL's AES (the `openssl` command;
/// skipped without it, except under `CI=true`). `openssl enc` refuses XTS
/// ("enc XTS ciphers not supported", OpenSSL 3.0), so the expected
/// ciphertext is IEEE 1619 composed from its AES-ECB: the sector tweaks
/// are the IVs encrypted with the second key, the data blocks are
/// encrypted with the first key between two tweak XORs. Random keys for
/// each AES key size, plain and plain64 IVs, sectors across 2^32 and 2^64.
#[test]
fn xts_matches_openssl_aes() {
    let have = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "openssl is not installed (CI=true: .ci/run installs it)"
        );
        eprintln!("SKIPPED: openssl is not installed");
        return;
    }
    let (mut rng, seed) = Rng::new();
    for s in aes_xts_specs() {
        if s.ivgen == IvGenAlg::Essiv {
            continue;
        }
        let ecb = format!("{}-ecb", s.alg.name());
        let key = rng.bytes(s.key_bytes());
        let (k1, k2) = key.split_at(key.len() / 2);
        let sectors = 1 + rng.below(40) as usize;
        let first = rng.first_sector();
        let pt = rng.bytes(sectors * SECTOR_SIZE);
        let ivs: Vec<u8> = (0..sectors)
            .flat_map(|i| reference_iv(&s, &key, first.wrapping_add(i as u64), 16))
            .collect();
        let tweaks = openssl_ecb(&ecb, true, k2, &ivs);
        let mut want = pt.clone();
        xor_xts_tweaks(&mut want, &tweaks);
        let mut want = openssl_ecb(&ecb, true, k1, &want);
        xor_xts_tweaks(&mut want, &tweaks);
        for which in IMPLS {
            let c = build_sector_cipher(&s, &key, which).unwrap();
            let what = format!(
                "{s} {} from {first}, {sectors} sectors (seed {seed:#x})",
                c.implementation()
            );
            let mut got = pt.clone();
            c.encrypt(first, &mut got);
            assert!(got == want, "encrypt {what}");
            c.decrypt(first, &mut got);
            assert!(got == pt, "decrypt {what}");
        }
        // And OpenSSL's decryption of that ciphertext.
        let mut back = want.clone();
        xor_xts_tweaks(&mut back, &tweaks);
        let mut back = openssl_ecb(&ecb, false, k1, &back);
        xor_xts_tweaks(&mut back, &tweaks);
        assert!(back == pt, "openssl decryption {s} (seed {seed:#x})");
    }
}

#[test]
#[should_panic(expected = "source and destination lengths differ")]
fn encrypt_to_checks_lengths() {
    let s = spec(CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64, None);
    let c = new_sector_cipher(&s, &[1u8; 64]).unwrap();
    c.encrypt_to(0, &[0u8; 1024], &mut [0u8; 512]);
}

#[test]
fn partial_sector_panics_in_every_implementation() {
    for s in aes_xts_specs()
        .into_iter()
        .chain(all_specs().into_iter().take(3))
    {
        for which in IMPLS {
            let c = build_sector_cipher(&s, &vec![1u8; s.key_bytes()], which).unwrap();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                c.encrypt(0, &mut [0u8; 600])
            }));
            assert!(r.is_err(), "{s} {which:?} encrypt");
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                c.decrypt(0, &mut [0u8; 100])
            }));
            assert!(r.is_err(), "{s} {which:?} decrypt");
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                c.encrypt_to(0, &[0u8; 513], &mut [0u8; 513])
            }));
            assert!(r.is_err(), "{s} {which:?} encrypt_to");
        }
    }
}

/// AES-256-XTS throughput of both implementations (wall clock, 1 MiB
/// buffers); run with
/// `cargo test --release -p block xts_throughput -- --ignored --nocapture`
/// (`resources/bench/cipher.sh` measures the whole read and write path).
#[test]
#[ignore]
fn xts_throughput() {
    use std::time::Instant;
    let s = spec(CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64, None);
    let key: Vec<u8> = (0..64u8).collect();
    let mut buf = vec![0x5au8; 1 << 20];
    let mut out = vec![0u8; 1 << 20];
    let rounds = 1024;
    let gb_s = |t: std::time::Duration| (rounds << 20) as f64 / t.as_secs_f64() / 1e9;
    for which in IMPLS {
        let c = build_sector_cipher(&s, &key, which).unwrap();
        c.encrypt(0, &mut buf);
        let t = Instant::now();
        for i in 0..rounds {
            c.encrypt(i * 2048, &mut buf);
        }
        let enc = gb_s(t.elapsed());
        let t = Instant::now();
        for i in 0..rounds {
            c.decrypt(i * 2048, &mut buf);
        }
        let dec = gb_s(t.elapsed());
        let t = Instant::now();
        for i in 0..rounds {
            c.encrypt_to(i * 2048, &buf, &mut out);
        }
        let to = gb_s(t.elapsed());
        println!(
            "AES-256-XTS {}: encrypt {enc:.2} GB/s, decrypt {dec:.2} GB/s, encrypt_to {to:.2} GB/s",
            c.implementation()
        );
    }
    let xts = xts_mode::Xts128::<aes::Aes256>::new(
        aes::Aes256::new_from_slice(&key[..32]).unwrap(),
        aes::Aes256::new_from_slice(&key[32..]).unwrap(),
    );
    let t = Instant::now();
    for i in 0..rounds {
        xts.encrypt_area(
            &mut buf,
            SECTOR_SIZE,
            u128::from(i) * 2048,
            xts_mode::get_tweak_default,
        );
    }
    println!(
        "AES-256-XTS xts-mode crate: encrypt {:.2} GB/s",
        gb_s(t.elapsed())
    );
}

/// LUKS2 sector sizes: XTS and CBC (plain64, essiv) over 1, 2 and 4 KiB
/// sectors match the RustCrypto mode crates over whole sectors; CTR and
/// odd sizes are refused.
#[test]
fn sized_sectors_match_reference() {
    let key: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(5))
        .collect();
    for (alg, mode, ivgen, bytes) in [
        ("aes", "xts-plain64", IvGenAlg::Plain64, 64u32),
        ("aes", "xts-plain64", IvGenAlg::Plain64, 32),
        ("aes", "cbc-essiv:sha256", IvGenAlg::Essiv, 32),
        ("aes", "cbc-plain64", IvGenAlg::Plain64, 16),
        ("serpent", "xts-plain64", IvGenAlg::Plain64, 64),
    ] {
        let spec = CipherSpec::from_luks(alg, mode, "sha256", bytes).unwrap();
        assert_eq!(spec.ivgen, ivgen);
        let key = &key[..bytes as usize];
        for sector in [512usize, 1024, 2048, 4096] {
            let pt: Vec<u8> = (0..3 * sector).map(|i| (i * 31 + 7) as u8).collect();
            let c = new_sector_cipher_sized(&spec, key, sector).unwrap();
            let mut ours = pt.clone();
            c.encrypt(41, &mut ours);
            let mut theirs = pt.clone();
            reference_sized(&spec, key, 41, &mut theirs, true, sector);
            assert_eq!(ours, theirs, "{alg}-{mode} {bytes} bytes, sector {sector}");
            c.decrypt(41, &mut ours);
            assert_eq!(ours, pt, "{alg}-{mode} round trip, sector {sector}");
        }
    }
    let ctr = CipherSpec::from_luks("aes", "ctr-plain64", "sha256", 32).unwrap();
    assert!(matches!(
        new_sector_cipher_sized(&ctr, &key[..32], 4096),
        Err(LuksError::Unsupported(_))
    ));
    let xts = CipherSpec::from_luks("aes", "xts-plain64", "sha256", 64).unwrap();
    assert!(new_sector_cipher_sized(&xts, &key, 3000).is_err());
    assert!(new_sector_cipher_sized(&xts, &key, 8192).is_err());
}
