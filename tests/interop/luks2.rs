//! LUKS2 interoperability with cryptsetup: volumes `cryptsetup luksFormat --type luks2`
//! makes (PBKDF2 with sha1/sha256/sha512, Argon2i, Argon2id; sector sizes 512 to 4096;
//! aes-xts-plain64 with 256- and 512-bit keys, aes-cbc-essiv:sha256; a key only in slot 3;
//! detached and attached headers; a damaged primary header) open in `cryptvm img`.
//!
//! There is no device-mapper here, so the ciphertext layout is checked against the volume
//! key that `cryptsetup luksDump --dump-volume-key` reveals: cryptvm writes, `openssl`
//! decrypts chosen sectors at the segment offset (IV = sector number in units of the
//! segment's sector size); `openssl` encrypts chosen sectors, cryptvm reads them.
//!
//! Volumes cryptvm makes (`img create`/`img convert -O luks -o luks-version=2`: argon2id,
//! argon2i, pbkdf2; sector sizes 512 to 4096; attached and detached) pass `cryptsetup
//! luksDump` and `luksOpen --test-passphrase`, and their ciphertext decrypts with the
//! volume key cryptsetup dumps; bad options fail cleanly and leave no file.
//!
//! Hostile headers (bad checksums on both copies, JSON too large or too deep, overlapping
//! key slot areas, Argon2 memory in the terabytes, stripes 0) fail with one clean error
//! line and leave the files untouched.

#[path = "../common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// Payload size of the test volumes.
const SIZE: u64 = 256 << 10;

/// One cryptsetup-made volume.
struct Case {
    /// Extra `cryptsetup luksFormat` arguments.
    args: &'static [&'static str],
    /// The header in its own file.
    detached: bool,
    /// Overwrite part of the primary binary header after formatting.
    damage_primary: bool,
}

/// Fast KDF settings unless the case names its own.
const FAST_ARGON: &[&str] = &["--pbkdf-memory", "32768", "--iter-time", "100"];

/// `cryptsetup luksDump --dump-json-metadata`.
fn json_metadata(header: &Path) -> Value {
    let r = run(
        "cryptsetup",
        [
            "luksDump".as_ref(),
            "--dump-json-metadata".as_ref(),
            header.as_os_str(),
        ],
        None,
    )
    .ok();
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("luksDump JSON ({e}):\n{r}"))
}

/// The AES-ECB cipher name for a key of `len` bytes.
fn ecb(len: usize) -> String {
    format!("aes-{}-ecb", len * 8)
}

/// XTS of one sector composed from `openssl enc` AES-ECB (openssl enc has no XTS):
/// the tweak is the IV encrypted with the second key half; block `i` goes through the
/// first half between two XORs with `tweak * x^i`.
fn openssl_xts(encrypt: bool, key: &[u8], iv: &[u8], data: &[u8]) -> Vec<u8> {
    let (k1, k2) = key.split_at(key.len() / 2);
    let t = openssl_enc(&ecb(k2.len()), true, k2, None, iv);
    let mut x = u128::from_le_bytes(t[..16].try_into().expect("one block"));
    let mut tweaks = Vec::with_capacity(data.len() / 16);
    for _ in 0..data.len() / 16 {
        tweaks.push(x);
        x = (x << 1) ^ ((x >> 127) * 0x87);
    }
    let xor = |d: &[u8]| -> Vec<u8> {
        d.chunks_exact(16)
            .zip(&tweaks)
            .flat_map(|(b, t)| {
                (u128::from_le_bytes(b.try_into().expect("block")) ^ t).to_le_bytes()
            })
            .collect()
    };
    xor(&openssl_enc(&ecb(k1.len()), encrypt, k1, None, &xor(data)))
}

/// One sector through the segment's cipher with `openssl`.
fn openssl_sector(
    encryption: &str,
    encrypt: bool,
    key: &[u8],
    sector: u64,
    data: &[u8],
) -> Vec<u8> {
    let mut iv = vec![0u8; 16];
    iv[..8].copy_from_slice(&sector.to_le_bytes());
    match encryption {
        "aes-xts-plain64" => openssl_xts(encrypt, key, &iv, data),
        "aes-cbc-essiv:sha256" => {
            let salt = openssl_sha256(key);
            let iv = openssl_enc("aes-256-ecb", true, &salt, None, &iv);
            openssl_enc(
                &format!("aes-{}-cbc", key.len() * 8),
                encrypt,
                key,
                Some(&iv),
                data,
            )
        }
        other => panic!("no openssl rule for {other}"),
    }
}

/// Formats, then checks both directions of the payload crypto, `img info` and `img compare`.
fn cryptsetup_volume(tag: &str, case: Case) {
    if !require(&["cryptsetup", "openssl"]) {
        return;
    }
    let s = Scratch::new(tag);
    let (luks, header, payload): (Luks, PathBuf, PathBuf) = if case.detached {
        let hdr = s.join("hdr.img");
        let payload = s.sparse("data.raw", SIZE);
        (Luks::detached(&hdr, &payload), hdr, payload)
    } else {
        // cryptsetup puts an attached LUKS2 payload at 16 MiB.
        let img = s.sparse("disk.luks", (16 << 20) + SIZE);
        (Luks::attached(&img), img.clone(), img)
    };
    let mut args: Vec<String> = [
        "luksFormat",
        "--type",
        "luks2",
        "--batch-mode",
        "--key-file",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.push(s.pass_file.display().to_string());
    let has_kdf = case.args.iter().any(|a| a.starts_with("--pbkdf"));
    if !has_kdf {
        args.extend(FAST_ARGON.iter().map(|a| a.to_string()));
    }
    args.extend(case.args.iter().map(|a| a.to_string()));
    if case.detached {
        args.extend(["--header".into(), header.display().to_string()]);
    }
    args.push(payload.display().to_string());
    run("cryptsetup", &args, None).ok();

    let meta = json_metadata(&header);
    let seg = &meta["segments"]["0"];
    let offset: u64 = seg["offset"]
        .as_str()
        .expect("offset")
        .parse()
        .expect("number");
    let sector = seg["sector_size"].as_u64().expect("sector_size");
    let encryption = seg["encryption"].as_str().expect("encryption").to_string();
    let key = cryptsetup_master_key(&header, &s.pass_file);
    if case.damage_primary {
        let mut h = read(&header);
        h[200..1200].fill(0xa5);
        std::fs::write(&header, h).expect("damaging the primary header");
    }

    // img info: LUKS2, the segment's sector size.
    let info = cryptvm(
        s.path(),
        [
            "img",
            "info",
            "--output=json",
            "--image-opts",
            &luks.image_opts(),
        ],
    )
    .ok()
    .json();
    let data = &info["format-specific"]["data"];
    assert_eq!(data["version"], 2, "{info}");
    assert_eq!(data["sector-size"], sector, "{info}");
    assert_eq!(data["payload-offset"], offset, "{info}");
    assert_eq!(info["virtual-size"], SIZE, "{info}");

    // cryptvm writes, openssl decrypts.
    let src_bytes = pattern(tag.len() as u64 * 977 + sector, SIZE as usize);
    let src = s.write("source.raw", &src_bytes);
    s.cryptvm_writes(src.to_str().expect("utf-8"), &luks.image_opts())
        .never_shows(&s.pass);
    let mut disk = read(&payload);
    let last = SIZE / sector - 1;
    let chosen = [0, 1, last / 2, last];
    for &n in &chosen {
        let at = (offset + n * sector) as usize;
        let pt = openssl_sector(&encryption, false, &key, n, &disk[at..at + sector as usize]);
        let want = &src_bytes[(n * sector) as usize..((n + 1) * sector) as usize];
        assert_same_bytes(
            &pt,
            want,
            &format!("{tag}: openssl decryption of sector {n}"),
        );
    }

    // openssl encrypts, cryptvm reads.
    let mut expected = src_bytes.clone();
    for (i, &n) in chosen.iter().enumerate() {
        let pt = pattern(1000 + i as u64, sector as usize);
        let ct = openssl_sector(&encryption, true, &key, n, &pt);
        let at = (offset + n * sector) as usize;
        disk[at..at + sector as usize].copy_from_slice(&ct);
        expected[(n * sector) as usize..((n + 1) * sector) as usize].copy_from_slice(&pt);
    }
    std::fs::write(&payload, &disk).expect("writing openssl's sectors");
    let out = s.join("out.raw");
    cryptvm(
        s.path(),
        [
            "img",
            "convert",
            "--object",
            &s.secret_object(),
            "-O",
            "raw",
            "--image-opts",
            &luks.image_opts(),
            out.to_str().expect("utf-8"),
        ],
    )
    .ok();
    assert_same_bytes(
        &read(&out),
        &expected,
        &format!("{tag}: cryptvm read of openssl's data"),
    );
    let want = s.write("want.raw", &expected);
    let compare = || {
        cryptvm(
            s.path(),
            [
                "img",
                "compare",
                "--object",
                &s.secret_object(),
                "--image-opts",
                &format!("driver=raw,file.filename={}", want.display()),
                &luks.image_opts(),
            ],
        )
    };
    let r = compare();
    assert_eq!(r.status, Some(0), "img compare:\n{r}");

    // The wrong passphrase: one clean error line.
    std::fs::write(&s.pass_file, "not the passphrase").expect("pass file");
    let r = compare();
    assert_ne!(r.status, Some(0), "wrong passphrase:\n{r}");
    assert!(r.stderr.to_lowercase().contains("invalid password"), "{r}");
}

macro_rules! cases {
    ($($name:ident: $detached:literal $damage:literal [$($arg:literal),*],)*) => {
        $(
            #[test]
            fn $name() {
                cryptsetup_volume(
                    stringify!($name),
                    Case { args: &[$($arg),*], detached: $detached, damage_primary: $damage },
                );
            }
        )*
    };
}

cases! {
    defaults_small_memory: true false [],
    pbkdf2_sha1: true false ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha1"],
    pbkdf2_sha256: true false ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha256"],
    pbkdf2_sha512: true false ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha512"],
    argon2i: true false ["--pbkdf", "argon2i", "--pbkdf-memory", "32768", "--iter-time", "100"],
    argon2id: true false ["--pbkdf", "argon2id", "--pbkdf-memory", "32768", "--iter-time", "100"],
    sector_1024: true false ["--sector-size", "1024"],
    sector_2048: true false ["--sector-size", "2048"],
    sector_4096: true false ["--sector-size", "4096"],
    xts_256_bit_key: true false ["--cipher", "aes-xts-plain64", "--key-size", "256"],
    xts_512_bit_key_4096: true false ["--cipher", "aes-xts-plain64", "--key-size", "512", "--sector-size", "4096"],
    cbc_essiv_sha256: true false ["--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"],
    cbc_essiv_sha256_2048: true false ["--cipher", "aes-cbc-essiv:sha256", "--key-size", "256", "--sector-size", "2048"],
    key_slot_3: true false ["--key-slot", "3"],
    attached: false false [],
    attached_4096: false false ["--sector-size", "4096"],
    damaged_primary: true true [],
    damaged_primary_attached: false true [],
}

// ---------------------------------------------------------------------------------------
// Hostile headers
// ---------------------------------------------------------------------------------------

/// Rewrites both header copies' JSON with python3 (`edit` is Python over `j`, the parsed
/// JSON; `raw` replaces the JSON text instead) and recomputes their checksums; `keep_sum`
/// leaves the stale checksums.
fn rewrite(header: &Path, edit: &str, keep_sum: bool) {
    let script = format!(
        r#"
import hashlib, json, struct, sys
p = sys.argv[1]
b = bytearray(open(p, 'rb').read())
hs = struct.unpack('>Q', b[8:16])[0]
for off in (0, hs):
    area = bytes(b[off + 4096: off + hs])
    j = json.loads(area.split(b'\0', 1)[0])
    text = None
{edit}
    if text is None:
        text = json.dumps(j).encode()
    if len(text) > hs - 4096:
        text = text[:hs - 4096]
    b[off + 4096: off + hs] = text + bytes(hs - 4096 - len(text))
    if not {keep_sum}:
        b[off + 448: off + 512] = bytes(64)
        d = hashlib.sha256(bytes(b[off: off + hs])).digest()
        b[off + 448: off + 448 + 32] = d
    else:
        b[off + 448] ^= 1
open(p, 'wb').write(b)
"#,
        edit = edit
            .lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n"),
        keep_sum = if keep_sum { "True" } else { "False" },
    );
    let py = header.with_extension("py");
    std::fs::write(&py, script).expect("writing the script");
    run("python3", [py.as_os_str(), header.as_os_str()], None).ok();
    std::fs::remove_file(py).expect("cleanup");
}

/// A fresh PBKDF2 volume edited by `edit`: img info and a read fail cleanly naming one of
/// `mentions`, and leave every file as it was.
fn hostile(tag: &str, edit: &str, keep_sum: bool, mentions: &[&str]) {
    if !require(&["cryptsetup", "python3"]) {
        return;
    }
    let s = Scratch::new(tag);
    let hdr = s.join("hdr.img");
    let payload = s.sparse("data.raw", SIZE);
    run(
        "cryptsetup",
        [
            "luksFormat",
            "--type",
            "luks2",
            "--batch-mode",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            s.pass_file.to_str().expect("utf-8"),
            "--header",
            hdr.to_str().expect("utf-8"),
            payload.to_str().expect("utf-8"),
        ],
        None,
    )
    .ok();
    rewrite(&hdr, edit, keep_sum);
    let luks = Luks::detached(&hdr, &payload);
    let out = s.join("out.raw");
    let before = Snapshot::take(s.path());
    let r = cryptvm(
        s.path(),
        [
            "img",
            "convert",
            "--object",
            &s.secret_object(),
            "-O",
            "raw",
            "--image-opts",
            &luks.image_opts(),
            out.to_str().expect("utf-8"),
        ],
    );
    r.clean_error(1, mentions);
    r.never_shows(&s.pass);
    before.assert_unchanged(&r);
    let r = cryptvm(
        s.path(),
        ["img", "info", "--image-opts", &luks.image_opts()],
    );
    r.clean_error(1, mentions);
    before.assert_unchanged(&r);
}

#[test]
fn hostile_bad_checksums() {
    hostile("bad-sums", "pass", true, &["checksum"]);
}

#[test]
fn hostile_json_too_deep() {
    hostile(
        "deep",
        "text = b'[' * 5000 + b']' * 5000",
        false,
        &["deeper"],
    );
}

#[test]
fn hostile_json_too_large() {
    // Fills the whole JSON area with no terminating NUL: cut, so malformed.
    hostile(
        "large",
        "text = b'{\"keyslots\": \"' + b'x' * (hs * 2) + b'\"}'",
        false,
        &["malformed"],
    );
}

#[test]
fn hostile_overlapping_keyslots() {
    hostile(
        "overlap",
        "j['keyslots']['1'] = j['keyslots']['0']",
        false,
        &["overlaps"],
    );
}

#[test]
fn hostile_argon2_terabytes() {
    hostile(
        "argon-tb",
        "j['keyslots']['0']['kdf'] = {'type': 'argon2id', 'time': 4, 'memory': 1 << 40, 'cpus': 4, 'salt': 'AAAAAAAAAAAAAAAAAAAAAA=='}",
        false,
        &["argon2 memory"],
    );
}

#[test]
fn hostile_stripes_zero() {
    hostile(
        "stripes0",
        "j['keyslots']['0']['af']['stripes'] = 0",
        false,
        &["stripes"],
    );
}

#[test]
fn hostile_unknown_requirement() {
    hostile(
        "require",
        "j['config']['requirements'] = {'mandatory': ['time-travel']}",
        false,
        &["requirements"],
    );
}

#[test]
fn hostile_reencryption() {
    hostile(
        "reencrypt",
        "j['config']['requirements'] = {'mandatory': ['online-reencrypt-v2']}",
        false,
        &["reencryption"],
    );
}

// ---------------------------------------------------------------------------------------
// Volumes cryptvm makes (`img create -f luks -o luks-version=2`)
// ---------------------------------------------------------------------------------------

/// Fast KDF settings for cryptvm-made volumes unless the case names its own.
const FAST_CREATE: &str = "iter-time=100,pbkdf-memory=32768";

/// `cryptvm img create -f luks -o luks-version=2,...`; then cryptsetup dumps and opens
/// it, its volume key decrypts what cryptvm writes, and `img info` shows the LUKS2 fields.
fn cryptvm_volume(tag: &str, opts: &str, detached: bool, want_kdf: &str, want_sector: u64) {
    if !require(&["cryptsetup", "openssl"]) {
        return;
    }
    let s = Scratch::new(tag);
    let (header, payload) = if detached {
        (s.join("hdr.img"), s.join("data.raw"))
    } else {
        (s.join("disk.luks"), s.join("disk.luks"))
    };
    let mut o = "luks-version=2,key-secret=sec0".to_string();
    if !opts.is_empty() {
        o = format!("{o},{opts}");
    }
    if !opts.contains("iter-time") {
        o = format!("{o},{FAST_CREATE}");
    }
    if detached {
        o.push_str(",detached-header=on");
    }
    let mut args = vec![
        "img".to_string(),
        "create".into(),
        "-q".into(),
        "-f".into(),
        "luks".into(),
        "--object".into(),
        s.secret_object(),
        "-o".into(),
        o,
        header.display().to_string(),
    ];
    if !detached {
        args.push(SIZE.to_string());
    }
    cryptvm(s.path(), &args).ok().never_shows(&s.pass);
    let luks = if detached {
        s.sparse("data.raw", SIZE);
        Luks::detached(&header, &payload)
    } else {
        Luks::attached(&header)
    };

    let dump = run(
        "cryptsetup",
        ["luksDump".as_ref(), header.as_os_str()],
        None,
    )
    .ok();
    assert!(dump.stdout.contains("Version:       \t2"), "{dump}");
    assert!(dump.stdout.contains("0: luks2"), "{dump}");
    cryptsetup_test_passphrase(&header, &s.pass_file).ok();
    let wrong = s.write("wrong.txt", b"not it");
    let r = cryptsetup_test_passphrase(&header, &wrong);
    assert_ne!(r.status, Some(0), "wrong passphrase opened:\n{r}");

    let meta = json_metadata(&header);
    let seg = &meta["segments"]["0"];
    let offset: u64 = seg["offset"]
        .as_str()
        .expect("offset")
        .parse()
        .expect("number");
    assert_eq!(offset, if detached { 0 } else { 16 << 20 }, "{meta}");
    assert_eq!(seg["sector_size"], want_sector, "{meta}");
    assert_eq!(meta["keyslots"]["0"]["kdf"]["type"], want_kdf, "{meta}");
    assert_eq!(meta["keyslots"]["0"]["af"]["stripes"], 4000, "{meta}");
    assert_eq!(meta["config"]["keyslots_size"], "16744448", "{meta}");
    let encryption = seg["encryption"].as_str().expect("encryption").to_string();
    let key = cryptsetup_master_key(&header, &s.pass_file);

    let info = cryptvm(
        s.path(),
        [
            "img",
            "info",
            "--output=json",
            "--object",
            &s.secret_object(),
            "--image-opts",
            &luks.image_opts(),
        ],
    )
    .ok()
    .json();
    let data = &info["format-specific"]["data"];
    assert_eq!(data["version"], 2, "{info}");
    assert_eq!(data["sector-size"], want_sector, "{info}");
    assert_eq!(data["payload-offset"], offset, "{info}");
    assert_eq!(info["virtual-size"], SIZE, "{info}");

    let src_bytes = pattern(tag.len() as u64 * 131 + want_sector, SIZE as usize);
    let src = s.write("source.raw", &src_bytes);
    s.cryptvm_writes(src.to_str().expect("utf-8"), &luks.image_opts())
        .never_shows(&s.pass);
    let disk = read(&payload);
    let last = SIZE / want_sector - 1;
    for n in [0, 1, last / 2, last] {
        let at = (offset + n * want_sector) as usize;
        let pt = openssl_sector(
            &encryption,
            false,
            &key,
            n,
            &disk[at..at + want_sector as usize],
        );
        let want = &src_bytes[(n * want_sector) as usize..((n + 1) * want_sector) as usize];
        assert_same_bytes(
            &pt,
            want,
            &format!("{tag}: openssl decryption of sector {n}"),
        );
    }
}

#[test]
fn create_defaults_attached() {
    cryptvm_volume("c-defaults", "", false, "argon2id", 4096);
}

#[test]
fn create_defaults_detached() {
    cryptvm_volume("c-detached", "", true, "argon2id", 4096);
}

#[test]
fn create_pbkdf2_sha256_512() {
    cryptvm_volume(
        "c-pbkdf2",
        "pbkdf=pbkdf2,hash-alg=sha256,iter-time=50,sector-size=512",
        false,
        "pbkdf2",
        512,
    );
}

#[test]
fn create_argon2i_detached_512() {
    cryptvm_volume(
        "c-argon2i",
        "pbkdf=argon2i,pbkdf-parallel=1,sector-size=512",
        true,
        "argon2i",
        512,
    );
}

#[test]
fn create_cbc_essiv_2048() {
    cryptvm_volume(
        "c-essiv",
        "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,sector-size=2048",
        false,
        "argon2id",
        2048,
    );
}

/// Bad LUKS2 options: one clean error line, exit 1, no file left behind.
#[test]
fn create_bad_options() {
    let s = Scratch::new("c-bad");
    let target = s.join("bad.luks");
    let cases: &[(&str, &[&str])] = &[
        ("luks-version=3", &["luks-version"]),
        ("sector-size=4096", &["luks-version=2"]),
        ("pbkdf=argon2id", &["luks-version=2"]),
        ("luks-version=2,sector-size=8192", &["sector-size"]),
        ("luks-version=2,sector-size=1000", &["sector-size"]),
        ("luks-version=2,pbkdf=scrypt", &["pbkdf"]),
        (
            "luks-version=2,pbkdf=pbkdf2,pbkdf-memory=65536",
            &["pbkdf-memory"],
        ),
        (
            "luks-version=2,pbkdf=pbkdf2,pbkdf-parallel=2",
            &["pbkdf-parallel"],
        ),
        ("luks-version=2,pbkdf-parallel=5", &["parallel"]),
        ("luks-version=2,pbkdf-memory=16", &["memory"]),
        ("luks-version=2,pbkdf-memory=99999999999", &["pbkdf-memory"]),
        ("luks-version=2,iter-time=0", &["iter-time"]),
        (
            "luks-version=2,cipher-alg=cast5-128,cipher-mode=xts",
            &["xts"],
        ),
        ("luks-version=2,frobnicate=1", &["frobnicate"]),
    ];
    for (opts, mentions) in cases {
        let before = Snapshot::take(s.path());
        let r = cryptvm(
            s.path(),
            [
                "img",
                "create",
                "-f",
                "luks",
                "--object",
                &s.secret_object(),
                "-o",
                &format!("key-secret=sec0,{opts}"),
                target.to_str().expect("utf-8"),
                "1M",
            ],
        );
        r.clean_error(1, mentions);
        before.assert_unchanged(&r);
        assert!(!target.exists(), "{opts}: {} left behind", target.display());
    }
}

/// `img convert -O luks -o luks-version=2` makes a LUKS2 image cryptsetup opens, and the
/// data reads back.
#[test]
fn create_by_convert() {
    if !require(&["cryptsetup"]) {
        return;
    }
    let s = Scratch::new("c-convert");
    let src_bytes = pattern(77, SIZE as usize);
    let src = s.write("source.raw", &src_bytes);
    let dst = s.join("disk.luks");
    cryptvm(
        s.path(),
        [
            "img",
            "convert",
            "--object",
            &s.secret_object(),
            "-O",
            "luks",
            "-o",
            "key-secret=sec0,luks-version=2,pbkdf=pbkdf2,iter-time=20",
            src.to_str().expect("utf-8"),
            dst.to_str().expect("utf-8"),
        ],
    )
    .ok()
    .never_shows(&s.pass);
    cryptsetup_test_passphrase(&dst, &s.pass_file).ok();
    let meta = json_metadata(&dst);
    assert_eq!(meta["keyslots"]["0"]["kdf"]["type"], "pbkdf2", "{meta}");
    let want = s.write("want.raw", &src_bytes);
    let r = cryptvm(
        s.path(),
        [
            "img",
            "compare",
            "--object",
            &s.secret_object(),
            "--image-opts",
            &format!("driver=raw,file.filename={}", want.display()),
            &Luks::attached(&dst).image_opts(),
        ],
    );
    assert_eq!(r.status, Some(0), "img compare:\n{r}");
}
