//! Unit tests of the LUKS2 reader: volumes built here (binary headers,
//! JSON, a PBKDF2 or Argon2 key slot sealed with our own AF splitter and
//! cipher) open, and hostile variations of them fail with errors naming
//! the field. Interop with cryptsetup is in tests/interop/luks2.rs.

use base64::Engine;
use serde_json::{json, Value};

use super::binary_header::tests::make_copy;
use super::*;
use crate::luks::af;
use crate::luks::cipher::new_sector_cipher;
use crate::luks::error::LuksError;
use crate::luks::hash::HashAlg;

const HDR: u64 = 16384;
const AREA: u64 = 2 * HDR;
const KEYSLOTS_SIZE: u64 = 262144;
const SEG: u64 = AREA + KEYSLOTS_SIZE;
const PASS: &[u8] = b"hunter2";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A volume key, and the JSON and key material of a one-slot volume.
pub(crate) struct Built {
    pub(crate) key: Vec<u8>,
    pub(crate) json: Value,
    material: Vec<u8>,
}

/// A one-slot volume (passphrase `hunter2`), PBKDF2 or Argon2id.
pub(crate) fn build(argon: bool) -> Built {
    let key: Vec<u8> = (0..64u8).map(|i| i ^ 0x5c).collect();
    let salt = [7u8; 32];
    let mut area_key = vec![0u8; 64];
    let kdf = if argon {
        let params = argon2::Params::new(64, 1, 2, Some(64)).unwrap();
        argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password_into(PASS, &salt, &mut area_key)
            .unwrap();
        json!({"type": "argon2id", "time": 1, "memory": 64, "cpus": 2, "salt": b64(&salt)})
    } else {
        HashAlg::Sha256.pbkdf2(PASS, &salt, 1000, &mut area_key);
        json!({"type": "pbkdf2", "hash": "sha256", "iterations": 1000, "salt": b64(&salt)})
    };
    let mut material = vec![0u8; 64 * 4000];
    af::split(HashAlg::Sha256, &key, 4000, &mut material).unwrap();
    let spec = json::cipher_spec("aes-xts-plain64", 64, "t").unwrap();
    new_sector_cipher(&spec, &area_key)
        .unwrap()
        .encrypt(0, &mut material);
    let dsalt = [9u8; 32];
    let mut digest = vec![0u8; 32];
    HashAlg::Sha256.pbkdf2(&key, &dsalt, 1000, &mut digest);
    let json = json!({
        "keyslots": {"0": {
            "type": "luks2", "key_size": 64,
            "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
            "area": {"type": "raw", "offset": AREA.to_string(), "size": "258048",
                     "encryption": "aes-xts-plain64", "key_size": 64},
            "kdf": kdf,
        }},
        "tokens": {},
        "segments": {"0": {"type": "crypt", "offset": SEG.to_string(), "size": "dynamic",
                           "iv_tweak": "0", "encryption": "aes-xts-plain64", "sector_size": 4096}},
        "digests": {"0": {"type": "pbkdf2", "keyslots": ["0"], "segments": ["0"], "hash": "sha256",
                          "iterations": 1000, "salt": b64(&dsalt), "digest": b64(&digest)}},
        "config": {"json_size": (HDR - 4096).to_string(), "keyslots_size": KEYSLOTS_SIZE.to_string()},
    });
    Built {
        key,
        json,
        material,
    }
}

/// The image of `b` with both header copies holding `text`.
fn image_text(b: &Built, text: &str) -> Vec<u8> {
    let mut img = make_copy(text, HDR, 0, 1);
    img.extend(make_copy(text, HDR, HDR, 1));
    img.extend(&b.material);
    img.resize(SEG as usize + 65536, 0);
    img
}

/// The image of `b`: both header copies, the key material, 64 KiB more.
pub(crate) fn image(b: &Built) -> Vec<u8> {
    image_text(b, &b.json.to_string())
}

fn open(img: &[u8], detached: bool) -> Result<(Vec<u8>, u32), LuksError> {
    let mut read = |off: u64, buf: &mut [u8]| {
        let off = off as usize;
        buf.copy_from_slice(&img[off..off + buf.len()]);
        Ok(())
    };
    let h = Luks2Header::read(&mut read, img.len() as u64, detached)?;
    let (k, slot) = keyslot::unlock(&h.meta, PASS, &mut read, img.len() as u64, 1 << 26)?;
    Ok((k.to_vec(), slot))
}

#[test]
fn opens_pbkdf2_and_argon2id() {
    for argon in [false, true] {
        let b = build(argon);
        let (key, slot) = open(&image(&b), false).unwrap();
        assert_eq!(key, b.key);
        assert_eq!(slot, 0);
    }
}

#[test]
fn metadata_fields() {
    let b = build(false);
    let img = image(&b);
    let mut read = |off: u64, buf: &mut [u8]| {
        let off = off as usize;
        buf.copy_from_slice(&img[off..off + buf.len()]);
        Ok(())
    };
    let h = Luks2Header::read(&mut read, img.len() as u64, false).unwrap();
    assert_eq!(h.meta.segment.sector_size, 4096);
    assert_eq!(h.meta.segment.offset, SEG);
    assert_eq!(h.meta.segment.size, None);
    assert_eq!(h.metadata_end(), SEG);
    assert_eq!(h.meta.keyslots[&0].kdf.name(), "pbkdf2");
}

#[test]
fn wrong_passphrase_and_priority() {
    let b = build(false);
    let mut img = image(&b);
    // A flipped bit in the key material: the digest does not match.
    img[AREA as usize + 100] ^= 1;
    assert!(matches!(open(&img, false), Err(LuksError::WrongPassphrase)));
    let mut b = build(false);
    b.json["keyslots"]["0"]["priority"] = json!(0);
    assert!(matches!(
        open(&image(&b), false),
        Err(LuksError::WrongPassphrase)
    ));
    b.json["keyslots"]["0"]["priority"] = json!(2);
    assert!(open(&image(&b), false).is_ok());
}

/// `edit` applied to the JSON gives an error whose message contains `want`.
#[track_caller]
fn refused(edit: impl Fn(&mut Value), want: &str) {
    let mut b = build(false);
    edit(&mut b.json);
    let e = open(&image(&b), false).unwrap_err();
    assert!(e.to_string().contains(want), "expected '{want}' in: {e}");
}

#[test]
fn hostile_fields() {
    refused(
        |j| j["keyslots"]["0"]["af"]["stripes"] = json!(0),
        "keyslots.0.af.stripes",
    );
    refused(
        |j| j["keyslots"]["0"]["key_size"] = json!(100000),
        "keyslots.0.key_size",
    );
    refused(
        |j| j["keyslots"]["0"]["area"]["offset"] = json!("99999999999"),
        "keyslots.0.area.offset",
    );
    refused(
        |j| j["keyslots"]["0"]["area"]["size"] = json!("4096"),
        "keyslots.0.area.size",
    );
    refused(
        |j| j["keyslots"]["0"]["area"]["key_size"] = json!(40),
        "keyslots.0.area",
    );
    refused(
        |j| {
            let k = j["keyslots"]["0"].clone();
            j["keyslots"]["1"] = k;
        },
        "overlaps the area of keyslot 0",
    );
    refused(
        |j| j["keyslots"]["0"]["kdf"] = json!({"type": "argon2id", "time": 4, "memory": 1u64 << 40, "cpus": 4, "salt": "AAAAAAAAAAA="}),
        "Argon2 memory",
    );
    refused(
        |j| j["keyslots"]["0"]["kdf"]["type"] = json!("scrypt"),
        "kdf 'scrypt'",
    );
    refused(
        |j| j["segments"]["0"]["sector_size"] = json!(3000),
        "segments.0.sector_size",
    );
    refused(
        |j| j["segments"]["0"]["offset"] = json!("4096"),
        "segments.0.offset",
    );
    refused(
        |j| j["segments"]["0"]["size"] = json!("-1"),
        "segments.0.size",
    );
    refused(
        |j| j["segments"]["0"]["encryption"] = json!("aes-xts-plain64-x"),
        "segments.0.encryption",
    );
    refused(
        |j| j["config"]["requirements"] = json!({"mandatory": ["future-thing"]}),
        "mandatory requirements: future-thing",
    );
    refused(
        |j| j["config"]["requirements"] = json!({"mandatory": ["online-reencrypt-v2"]}),
        "reencryption",
    );
    refused(
        |j| j["keyslots"]["0"]["type"] = json!("reencrypt"),
        "reencryption",
    );
    refused(
        |j| {
            let s = j["segments"]["0"].clone();
            j["segments"]["1"] = s;
        },
        "reencryption",
    );
    refused(
        |j| j["config"]["json_size"] = json!("1"),
        "config.json_size",
    );
    refused(
        |j| j["digests"]["0"]["keyslots"] = json!(["5"]),
        "digests.0.keyslots",
    );
    refused(|j| j["digests"]["0"]["type"] = json!("hmac"), "digest type");
    refused(|j| j["segments"]["0"]["integrity"] = json!({}), "integrity");
    refused(|j| j["keyslots"] = json!({"x": {}}), "keyslots.x");
    refused(
        |j| {
            j.as_object_mut().unwrap().remove("segments");
        },
        "segments",
    );
}

#[test]
fn hostile_json_text() {
    let b = build(false);
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let e = open(&image_text(&b, &deep), false).unwrap_err();
    assert!(e.to_string().contains("nests deeper"), "{e}");
    let e = open(&image_text(&b, "{\"keyslots\":"), false).unwrap_err();
    assert!(e.to_string().contains("malformed"), "{e}");
    let e = open(&image_text(&b, "[1,2]"), false).unwrap_err();
    assert!(e.to_string().contains("not an object"), "{e}");
}

#[test]
fn secondary_wins_on_higher_seqid_and_on_damage() {
    let b = build(false);
    let text = b.json.to_string();
    let mut img = make_copy("{\"broken\":", HDR, 0, 1);
    img.extend(make_copy(&text, HDR, HDR, 2));
    img.extend(&b.material);
    img.resize(SEG as usize + 65536, 0);
    assert_eq!(open(&img, false).unwrap().0, b.key);
    // A damaged primary checksum: the secondary is found at its offset.
    let mut img = image(&b);
    img[..4096].fill(0xee);
    assert_eq!(open(&img, false).unwrap().0, b.key);
}

#[test]
fn detached_allows_offset_zero() {
    let mut b = build(false);
    b.json["segments"]["0"]["offset"] = json!("0");
    let img = image(&b);
    assert!(open(&img, false).is_err());
    assert_eq!(open(&img, true).unwrap().0, b.key);
}

#[test]
fn kdf_limit() {
    let b = build(false);
    let img = image(&b);
    let mut read = |off: u64, buf: &mut [u8]| {
        let off = off as usize;
        buf.copy_from_slice(&img[off..off + buf.len()]);
        Ok(())
    };
    let h = Luks2Header::read(&mut read, img.len() as u64, false).unwrap();
    let e = keyslot::unlock(&h.meta, PASS, &mut read, img.len() as u64, 100).unwrap_err();
    assert!(
        matches!(
            e,
            LuksError::KdfTooCostly {
                total: 2000,
                limit: 100
            }
        ),
        "{e}"
    );
}

/// Through the block graph (`luks` over `file`): a 4096-byte-sector volume takes
/// unaligned reads and writes (read-modify-write of whole 4 KiB sectors), its
/// ciphertext is the segment cipher's with IV = 4 KiB sector number + iv_tweak,
/// and `info()` shows the LUKS2 fields.
#[test]
fn node_sector_size_and_iv_tweak() {
    use crate::blockdev::{BackingFiles, OpenContext};
    use crate::luks::cipher::new_sector_cipher_sized;
    use crate::secret::SecretStore;
    use crate::BlockGraph;

    let mut b = build(false);
    b.json["segments"]["0"]["iv_tweak"] = json!("1000");
    let img = image(&b);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.luks");
    std::fs::write(&path, &img).unwrap();
    let mut secrets = SecretStore::new();
    secrets
        .add(
            "o",
            json!({"qom-type": "secret", "id": "s", "data": "hunter2"}),
            None,
        )
        .unwrap();
    let ctx = OpenContext {
        secrets: &secrets,
        base_dir: Some(dir.path()),
        no_io: false,
        read_only: false,
        backing_files: BackingFiles::Contained,
        legacy_aes: false,
    };
    let mut g = BlockGraph::new();
    g.add(
        "b",
        json!({"node-name": "d", "driver": "luks", "key-secret": "s",
               "file": {"driver": "file", "filename": "v.luks"}}),
        &ctx,
        false,
    )
    .unwrap();
    let d = g.get("d").unwrap();
    assert_eq!(d.size(), 65536);
    let info = d.info();
    assert_eq!(info["data"]["version"], 2);
    assert_eq!(info["data"]["sector-size"], 4096);
    assert_eq!(info["data"]["iv-tweak"], 1000);

    let mut model = vec![0u8; 65536];
    d.read_at(0, &mut model).unwrap();
    for (i, (off, len)) in [
        (100u64, 10usize),
        (4090, 20),
        (8192, 4096),
        (12000, 9000),
        (65535, 1),
    ]
    .into_iter()
    .enumerate()
    {
        let data: Vec<u8> = (0..len).map(|j| (j * 7 + i * 13) as u8).collect();
        d.write_at(off, &data).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
        let mut back = vec![0u8; 65536];
        d.read_at(0, &mut back).unwrap();
        assert_eq!(back, model, "after write {i}");
        let mut piece = vec![0u8; len];
        d.read_at(off, &mut piece).unwrap();
        assert_eq!(piece, data);
    }
    d.flush().unwrap();
    drop(g);
    let disk = std::fs::read(&path).unwrap();
    let spec = json::cipher_spec("aes-xts-plain64", 64, "t").unwrap();
    let c = new_sector_cipher_sized(&spec, &b.key, 4096).unwrap();
    let mut pt = disk[SEG as usize..].to_vec();
    c.decrypt(1000, &mut pt);
    assert_eq!(pt, model, "ciphertext under IV = sector + iv_tweak");
}
