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
    let aes128 = spec(CipherAlg::Aes128, CipherMode::Xts, IvGenAlg::Plain64, None);
    let aes256 = spec(CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64, None);

    // Vectors 1 and 2 are 32 bytes: the first two blocks of a sector.
    let c = new_sector_cipher(&aes128, &[0u8; 32]).unwrap();
    let mut buf = [0u8; 512];
    c.encrypt(0, &mut buf);
    assert_eq!(
        hex(&buf[..32]),
        "917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e"
    );
    let mut key = vec![0x11u8; 16];
    key.extend_from_slice(&[0x22; 16]);
    let c = new_sector_cipher(&aes128, &key).unwrap();
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
        let c = new_sector_cipher(s, &unhex(key)).unwrap();
        let mut buf = pt.clone();
        c.encrypt(sector, &mut buf);
        assert_eq!(hex(&buf[..32]), head);
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
    for (s, want) in cases {
        let key: Vec<u8> = (0..s.key_bytes()).map(|i| (i * 7 + 1) as u8).collect();
        let c = new_sector_cipher(&s, &key).unwrap();
        let mut buf = pt.clone();
        c.encrypt(0x1_0000_0005, &mut buf);
        assert_eq!(hex(&HashAlg::Sha256.digest(&buf)), want, "{s}");
        c.decrypt(0x1_0000_0005, &mut buf);
        assert_eq!(buf, pt, "{s}");
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
    for (i, sector) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
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
    for s in specs {
        let key: Vec<u8> = (0..s.key_bytes()).map(|i| (i * 11 + 3) as u8).collect();
        let c = new_sector_cipher(&s, &key).unwrap();
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
            assert_eq!(ours, theirs, "{s} encrypt from {first}");
            assert_ne!(&ours[..], &pt[..ours.len()]);
            c.decrypt(first, &mut ours);
            reference(&s, &key, first, &mut theirs, false);
            assert_eq!(ours, theirs, "{s} decrypt from {first}");
            assert_eq!(&ours[..], &pt[..ours.len()]);
        }
        // Sector by sector equals all at once.
        let mut whole = pt.clone();
        c.encrypt(9, &mut whole);
        let mut pieces = pt.clone();
        for (i, sector) in pieces.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            c.encrypt(9 + i as u64, sector);
        }
        assert_eq!(whole, pieces, "{s}");
        // An empty buffer is fine.
        c.encrypt(0, &mut []);
    }
}

/// AES-256-XTS throughput; run with
/// `cargo test --release -p block xts_throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn xts_throughput() {
    use std::time::Instant;
    let s = spec(CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64, None);
    let key: Vec<u8> = (0..64u8).collect();
    let c = new_sector_cipher(&s, &key).unwrap();
    let mut buf = vec![0x5au8; 1 << 20];
    let rounds = 1024;
    let mib_s = |t: std::time::Duration| rounds as f64 / t.as_secs_f64();

    c.encrypt(0, &mut buf);
    let t = Instant::now();
    for i in 0..rounds {
        c.encrypt(i * 2048, &mut buf);
    }
    let enc = mib_s(t.elapsed());
    let t = Instant::now();
    for i in 0..rounds {
        c.decrypt(i * 2048, &mut buf);
    }
    let dec = mib_s(t.elapsed());

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
    let crate_enc = mib_s(t.elapsed());
    println!(
        "AES-256-XTS: ours encrypt {enc:.0} MiB/s, decrypt {dec:.0} MiB/s; \
         xts-mode crate encrypt {crate_enc:.0} MiB/s"
    );
}
