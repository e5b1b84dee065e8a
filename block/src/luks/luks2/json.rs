//! The LUKS2 JSON metadata: parsed from a bounded buffer with a nesting
//! limit, then decoded into typed key slots, digests, segments and config,
//! each field checked (errors name the field), as cryptsetup's
//! `LUKS2_hdr_validate` does.

use std::collections::BTreeMap;

use base64::Engine;
use serde_json::{Map, Value};

use super::error::Luks2Error;
use crate::luks::cipher::CipherSpec;
use crate::luks::hash::HashAlg;
use crate::luks::header::MAX_STRIPES;

/// Deepest nesting of objects and arrays accepted (cryptsetup's metadata
/// needs 4; tokens may add a few).
pub const MAX_DEPTH: usize = 16;
/// Most key slots, digests or segments (cryptsetup's `LUKS2_KEYSLOTS_MAX`).
pub const MAX_ENTRIES: u32 = 32;
/// Most Argon2 memory a key slot may ask for, in KiB (4 GiB).
pub const MAX_ARGON2_MEMORY_KIB: u64 = 4 << 20;
/// Most Argon2 passes accepted.
pub const MAX_ARGON2_TIME: u32 = 1000;
/// Most Argon2 lanes accepted.
pub const MAX_ARGON2_LANES: u32 = 256;

/// Key derivation of a key slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kdf {
    /// PBKDF2-HMAC.
    Pbkdf2 {
        /// The hash.
        hash: HashAlg,
        /// Iterations.
        iterations: u32,
        /// Salt.
        salt: Vec<u8>,
    },
    /// Argon2i or Argon2id (version 0x13).
    Argon2 {
        /// Argon2id rather than Argon2i.
        id: bool,
        /// Passes (t_cost).
        time: u32,
        /// Memory in KiB (m_cost).
        memory_kib: u32,
        /// Lanes (p_cost).
        cpus: u32,
        /// Salt.
        salt: Vec<u8>,
    },
}

impl Kdf {
    /// The type as the JSON names it.
    pub fn name(&self) -> &'static str {
        match self {
            Kdf::Pbkdf2 { .. } => "pbkdf2",
            Kdf::Argon2 { id: true, .. } => "argon2id",
            Kdf::Argon2 { id: false, .. } => "argon2i",
        }
    }
}

/// A `luks2` key slot.
#[derive(Clone, Debug)]
pub struct Keyslot {
    /// Length of the volume key it holds.
    pub key_size: usize,
    /// 0: never tried unless asked for; 1: normal; 2: tried first.
    pub priority: u8,
    /// Key derivation.
    pub kdf: Kdf,
    /// Anti-forensic stripes.
    pub stripes: u32,
    /// Anti-forensic hash.
    pub af_hash: HashAlg,
    /// Byte offset of the key material area in the header node.
    pub area_offset: u64,
    /// Bytes of the area.
    pub area_size: u64,
    /// The area's cipher, e.g. `aes-xts-plain64`.
    pub area_encryption: String,
    /// The area's cipher, parsed.
    pub area_spec: CipherSpec,
    /// The area cipher's key length (the KDF's output).
    pub area_key_size: usize,
}

impl Keyslot {
    /// Bytes of key material: the split key, in whole 512-byte sectors.
    pub fn material_len(&self) -> u64 {
        (self.key_size as u64 * u64::from(self.stripes)).next_multiple_of(512)
    }
}

/// A `pbkdf2` digest of the volume key.
#[derive(Clone, Debug)]
pub struct Digest {
    /// Key slots whose key it checks.
    pub keyslots: Vec<u32>,
    /// Segments encrypted with that key.
    pub segments: Vec<u32>,
    /// The hash.
    pub hash: HashAlg,
    /// Iterations.
    pub iterations: u32,
    /// Salt.
    pub salt: Vec<u8>,
    /// The digest.
    pub digest: Vec<u8>,
}

/// A `crypt` segment: the encrypted payload.
#[derive(Clone, Debug)]
pub struct Segment {
    /// Byte offset of the payload in the data node.
    pub offset: u64,
    /// Bytes of payload, or `None` for "dynamic" (to the end of the node).
    pub size: Option<u64>,
    /// Added to the sector number of the IV.
    pub iv_tweak: u64,
    /// The cipher, e.g. `aes-xts-plain64`.
    pub encryption: String,
    /// The cipher, parsed (key length from the key slots).
    pub spec: CipherSpec,
    /// Bytes per encryption sector: 512, 1024, 2048 or 4096.
    pub sector_size: u32,
}

/// The decoded metadata.
#[derive(Clone, Debug)]
pub struct Metadata {
    /// Key slots by number.
    pub keyslots: BTreeMap<u32, Keyslot>,
    /// Digests by number.
    pub digests: BTreeMap<u32, Digest>,
    /// The one segment.
    pub segment: Segment,
    /// Bytes of the JSON area (`config.json_size`).
    pub json_size: u64,
    /// Bytes of the key slot areas after both headers (`config.keyslots_size`).
    pub keyslots_size: u64,
}

/// Parses JSON text, refusing nesting deeper than [`MAX_DEPTH`] before
/// serde_json sees it.
pub fn parse_value(text: &[u8]) -> Result<Value, Luks2Error> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &c in text {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(Luks2Error::TooDeep { limit: MAX_DEPTH });
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    serde_json::from_slice(text).map_err(|e| Luks2Error::Json(e.to_string()))
}

fn obj<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, Luks2Error> {
    v.as_object()
        .ok_or_else(|| Luks2Error::field(path, "is not an object"))
}

fn get<'a>(o: &'a Map<String, Value>, path: &str, key: &str) -> Result<&'a Value, Luks2Error> {
    o.get(key)
        .ok_or_else(|| Luks2Error::field(format!("{path}.{key}"), "is missing"))
}

fn get_str<'a>(o: &'a Map<String, Value>, path: &str, key: &str) -> Result<&'a str, Luks2Error> {
    get(o, path, key)?
        .as_str()
        .ok_or_else(|| Luks2Error::field(format!("{path}.{key}"), "is not a string"))
}

/// A 64-bit number written as a decimal string, as LUKS2 writes offsets and sizes.
fn get_u64_str(o: &Map<String, Value>, path: &str, key: &str) -> Result<u64, Luks2Error> {
    let s = get_str(o, path, key)?;
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return Err(Luks2Error::field(
            format!("{path}.{key}"),
            "is not a decimal number",
        ));
    }
    s.parse()
        .map_err(|_| Luks2Error::field(format!("{path}.{key}"), "does not fit 64 bits"))
}

fn get_u32(o: &Map<String, Value>, path: &str, key: &str) -> Result<u32, Luks2Error> {
    get(o, path, key)?
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| Luks2Error::field(format!("{path}.{key}"), "is not a 32-bit number"))
}

fn get_b64(o: &Map<String, Value>, path: &str, key: &str) -> Result<Vec<u8>, Luks2Error> {
    base64::engine::general_purpose::STANDARD
        .decode(get_str(o, path, key)?)
        .map_err(|_| Luks2Error::field(format!("{path}.{key}"), "is not base64"))
}

fn get_hash(o: &Map<String, Value>, path: &str, key: &str) -> Result<HashAlg, Luks2Error> {
    let name = get_str(o, path, key)?;
    HashAlg::from_name(name).map_err(|_| {
        Luks2Error::field(
            format!("{path}.{key}"),
            format!("names unsupported hash '{name}'"),
        )
    })
}

/// An entry of a numbered object: its number, JSON path and value.
type Entry<'a> = (u32, String, &'a Map<String, Value>);

/// The entries of a numbered object (`"0"`, `"1"`, ...).
fn numbered<'a>(root: &'a Map<String, Value>, key: &str) -> Result<Vec<Entry<'a>>, Luks2Error> {
    let Some(v) = root.get(key) else {
        return Err(Luks2Error::field(key, "is missing"));
    };
    let mut out = Vec::new();
    for (name, entry) in obj(v, key)? {
        let path = format!("{key}.{name}");
        let n = name
            .parse::<u32>()
            .ok()
            .filter(|n| *n < MAX_ENTRIES && n.to_string() == *name)
            .ok_or_else(|| {
                Luks2Error::field(&path, format!("is not a number below {MAX_ENTRIES}"))
            })?;
        out.push((n, path.clone(), obj(entry, &path)?));
    }
    Ok(out)
}

/// Parses a cryptsetup cipher string (`aes-xts-plain64`) with a key of
/// `key_bytes` (`None`: the smallest the mode takes, for a spec whose key
/// length is only known later).
pub fn cipher_spec(enc: &str, key_bytes: u32, path: &str) -> Result<CipherSpec, Luks2Error> {
    if enc.starts_with("capi:") || enc.starts_with("cipher_null") {
        return Err(Luks2Error::Unsupported(format!("cipher '{enc}' ({path})")));
    }
    let Some((name, mode)) = enc.split_once('-') else {
        return Err(Luks2Error::field(
            path,
            format!("'{enc}' is not cipher-mode-iv"),
        ));
    };
    CipherSpec::from_luks(name, mode, "sha256", key_bytes).map_err(|e| {
        Luks2Error::Unsupported(format!(
            "cipher '{enc}' with a {key_bytes}-byte key ({path}): {e}"
        ))
    })
}

fn ranges_overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

impl Metadata {
    /// Decodes and checks the JSON of a header copy of `hdr_size` bytes.
    /// `detached`: the payload is in another node (a segment at offset 0 is
    /// then allowed).
    pub fn parse(text: &[u8], hdr_size: u64, detached: bool) -> Result<Self, Luks2Error> {
        let root = parse_value(text)?;
        let root = obj(&root, "(root)")?;

        // config first: requirements decide whether anything else is read.
        let config = obj(
            get(root, "", "config").map_err(|_| Luks2Error::field("config", "is missing"))?,
            "config",
        )?;
        if let Some(req) = config.get("requirements") {
            let req = obj(req, "config.requirements")?;
            if let Some(m) = req.get("mandatory") {
                let list = m.as_array().ok_or_else(|| {
                    Luks2Error::field("config.requirements.mandatory", "is not an array")
                })?;
                if !list.is_empty() {
                    let names: Vec<String> = list
                        .iter()
                        .map(|v| v.as_str().unwrap_or("(not a string)").to_string())
                        .collect();
                    let names = names.join(", ");
                    if names.contains("reencrypt") {
                        return Err(Luks2Error::Reencryption(format!(
                            "mandatory requirement {names}"
                        )));
                    }
                    return Err(Luks2Error::Requirements(names));
                }
            }
        }
        let json_size = get_u64_str(config, "config", "json_size")?;
        if json_size != hdr_size - super::binary_header::BIN_HDR_SIZE as u64 {
            return Err(Luks2Error::field(
                "config.json_size",
                format!("is {json_size}, but the header is {hdr_size} bytes"),
            ));
        }
        let keyslots_size = get_u64_str(config, "config", "keyslots_size")?;
        if !keyslots_size.is_multiple_of(4096) || keyslots_size > (1 << 40) {
            return Err(Luks2Error::field(
                "config.keyslots_size",
                format!("{keyslots_size} is not a multiple of 4096 below 1 TiB"),
            ));
        }
        let areas_start = 2 * hdr_size;
        let areas_end = areas_start + keyslots_size;

        // Segments.
        let segments = numbered(root, "segments")?;
        if segments.len() > 1 {
            return Err(Luks2Error::Reencryption(format!(
                "{} segments",
                segments.len()
            )));
        }
        let Some((seg_no, seg_path, seg)) = segments.into_iter().next() else {
            return Err(Luks2Error::field("segments", "is empty"));
        };
        let seg_type = get_str(seg, &seg_path, "type")?;
        if seg_type != "crypt" {
            return Err(Luks2Error::Unsupported(format!(
                "segment type '{seg_type}' ({seg_path}.type)"
            )));
        }
        if seg.contains_key("integrity") {
            return Err(Luks2Error::Unsupported(format!(
                "integrity protection ({seg_path}.integrity)"
            )));
        }
        if let Some(flags) = seg.get("flags").and_then(Value::as_array) {
            if flags.iter().any(|f| {
                f.as_str()
                    .is_some_and(|f| f.starts_with("backup-") || f.contains("reencrypt"))
            }) {
                return Err(Luks2Error::Reencryption(format!("{seg_path}.flags")));
            }
        }
        let offset = get_u64_str(seg, &seg_path, "offset")?;
        let size = match get_str(seg, &seg_path, "size")? {
            "dynamic" => None,
            _ => Some(get_u64_str(seg, &seg_path, "size")?),
        };
        let iv_tweak = get_u64_str(seg, &seg_path, "iv_tweak")?;
        let encryption = get_str(seg, &seg_path, "encryption")?.to_string();
        let sector_size = get_u32(seg, &seg_path, "sector_size")?;
        if !matches!(sector_size, 512 | 1024 | 2048 | 4096) {
            return Err(Luks2Error::field(
                format!("{seg_path}.sector_size"),
                format!("is {sector_size}, not 512, 1024, 2048 or 4096"),
            ));
        }
        if !offset.is_multiple_of(512) {
            return Err(Luks2Error::field(
                format!("{seg_path}.offset"),
                "is not a multiple of 512",
            ));
        }
        if let Some(size) = size {
            if size == 0 || !size.is_multiple_of(u64::from(sector_size)) {
                return Err(Luks2Error::field(
                    format!("{seg_path}.size"),
                    format!("{size} is not a whole number of {sector_size}-byte sectors"),
                ));
            }
            if offset.checked_add(size).is_none() {
                return Err(Luks2Error::field(format!("{seg_path}.size"), "overflows"));
            }
        }
        if !detached && offset < areas_end {
            return Err(Luks2Error::field(
                format!("{seg_path}.offset"),
                format!(
                    "{offset} overlaps the header and key slot areas (which end at {areas_end})"
                ),
            ));
        }

        // Digests.
        let mut digests = BTreeMap::new();
        for (n, path, d) in numbered(root, "digests")? {
            let ty = get_str(d, &path, "type")?;
            if ty != "pbkdf2" {
                return Err(Luks2Error::Unsupported(format!(
                    "digest type '{ty}' ({path}.type)"
                )));
            }
            let list = |key: &str| -> Result<Vec<u32>, Luks2Error> {
                let field = format!("{path}.{key}");
                get(d, &path, key)?
                    .as_array()
                    .ok_or_else(|| Luks2Error::field(&field, "is not an array"))?
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .and_then(|s| s.parse::<u32>().ok())
                            .filter(|n| *n < MAX_ENTRIES)
                            .ok_or_else(|| Luks2Error::field(&field, "holds a bad number"))
                    })
                    .collect()
            };
            let iterations = get_u32(d, &path, "iterations")?;
            if iterations == 0 {
                return Err(Luks2Error::field(format!("{path}.iterations"), "is 0"));
            }
            let digest = get_b64(d, &path, "digest")?;
            if digest.is_empty() || digest.len() > 64 {
                return Err(Luks2Error::field(
                    format!("{path}.digest"),
                    "is not 1 to 64 bytes",
                ));
            }
            digests.insert(
                n,
                Digest {
                    keyslots: list("keyslots")?,
                    segments: list("segments")?,
                    hash: get_hash(d, &path, "hash")?,
                    iterations,
                    salt: get_b64(d, &path, "salt")?,
                    digest,
                },
            );
        }

        // Key slots.
        let mut keyslots = BTreeMap::new();
        for (n, path, k) in numbered(root, "keyslots")? {
            let ty = get_str(k, &path, "type")?;
            match ty {
                "luks2" => {}
                "reencrypt" => return Err(Luks2Error::Reencryption(format!("{path}.type"))),
                _ => {
                    return Err(Luks2Error::Unsupported(format!(
                        "keyslot type '{ty}' ({path}.type)"
                    )))
                }
            }
            let key_size = get_u32(k, &path, "key_size")?;
            if key_size == 0 || key_size > 512 {
                return Err(Luks2Error::field(
                    format!("{path}.key_size"),
                    format!("is {key_size}, not 1 to 512"),
                ));
            }
            let priority = match k.get("priority") {
                None => 1,
                Some(v) => match v.as_u64() {
                    Some(p @ 0..=2) => p as u8,
                    _ => {
                        return Err(Luks2Error::field(
                            format!("{path}.priority"),
                            "is not 0, 1 or 2",
                        ))
                    }
                },
            };
            let kpath = format!("{path}.kdf");
            let kdf_o = obj(get(k, &path, "kdf")?, &kpath)?;
            let kdf = match get_str(kdf_o, &kpath, "type")? {
                "pbkdf2" => {
                    let iterations = get_u32(kdf_o, &kpath, "iterations")?;
                    if iterations == 0 {
                        return Err(Luks2Error::field(format!("{kpath}.iterations"), "is 0"));
                    }
                    Kdf::Pbkdf2 {
                        hash: get_hash(kdf_o, &kpath, "hash")?,
                        iterations,
                        salt: get_b64(kdf_o, &kpath, "salt")?,
                    }
                }
                t @ ("argon2i" | "argon2id") => {
                    let memory = get(kdf_o, &kpath, "memory")?.as_u64().ok_or_else(|| {
                        Luks2Error::field(format!("{kpath}.memory"), "is not a number")
                    })?;
                    if memory > MAX_ARGON2_MEMORY_KIB {
                        return Err(Luks2Error::Argon2Memory {
                            slot: n,
                            kib: memory,
                            limit: MAX_ARGON2_MEMORY_KIB,
                        });
                    }
                    let time = get_u32(kdf_o, &kpath, "time")?;
                    if time == 0 || time > MAX_ARGON2_TIME {
                        return Err(Luks2Error::field(
                            format!("{kpath}.time"),
                            format!("is {time}, not 1 to {MAX_ARGON2_TIME}"),
                        ));
                    }
                    let cpus = get_u32(kdf_o, &kpath, "cpus")?;
                    if cpus == 0 || cpus > MAX_ARGON2_LANES {
                        return Err(Luks2Error::field(
                            format!("{kpath}.cpus"),
                            format!("is {cpus}, not 1 to {MAX_ARGON2_LANES}"),
                        ));
                    }
                    if memory < 8 * u64::from(cpus) {
                        return Err(Luks2Error::field(
                            format!("{kpath}.memory"),
                            format!("is {memory} KiB, less than 8 KiB per lane"),
                        ));
                    }
                    let salt = get_b64(kdf_o, &kpath, "salt")?;
                    if salt.len() < 8 {
                        return Err(Luks2Error::field(
                            format!("{kpath}.salt"),
                            "is shorter than 8 bytes",
                        ));
                    }
                    Kdf::Argon2 {
                        id: t == "argon2id",
                        time,
                        memory_kib: memory as u32,
                        cpus,
                        salt,
                    }
                }
                t => return Err(Luks2Error::Unsupported(format!("kdf '{t}' ({kpath}.type)"))),
            };
            let apath = format!("{path}.af");
            let af = obj(get(k, &path, "af")?, &apath)?;
            let af_type = get_str(af, &apath, "type")?;
            if af_type != "luks1" {
                return Err(Luks2Error::Unsupported(format!(
                    "af type '{af_type}' ({apath}.type)"
                )));
            }
            let stripes = get_u32(af, &apath, "stripes")?;
            if stripes == 0 || stripes > MAX_STRIPES {
                return Err(Luks2Error::field(
                    format!("{apath}.stripes"),
                    format!("is {stripes}, not 1 to {MAX_STRIPES}"),
                ));
            }
            let af_hash = get_hash(af, &apath, "hash")?;
            let rpath = format!("{path}.area");
            let area = obj(get(k, &path, "area")?, &rpath)?;
            let area_type = get_str(area, &rpath, "type")?;
            if area_type != "raw" {
                return Err(Luks2Error::Unsupported(format!(
                    "area type '{area_type}' ({rpath}.type)"
                )));
            }
            let area_offset = get_u64_str(area, &rpath, "offset")?;
            let area_size = get_u64_str(area, &rpath, "size")?;
            let area_key_size = get_u32(area, &rpath, "key_size")?;
            if area_key_size == 0 || area_key_size > 512 {
                return Err(Luks2Error::field(
                    format!("{rpath}.key_size"),
                    format!("is {area_key_size}, not 1 to 512"),
                ));
            }
            let area_encryption = get_str(area, &rpath, "encryption")?.to_string();
            let area_spec = cipher_spec(
                &area_encryption,
                area_key_size,
                &format!("{rpath}.encryption"),
            )?;
            if area_spec.key_bytes() != area_key_size as usize {
                return Err(Luks2Error::field(
                    format!("{rpath}.key_size"),
                    format!("{area_key_size} does not fit cipher {area_encryption}"),
                ));
            }
            let slot = Keyslot {
                key_size: key_size as usize,
                priority,
                kdf,
                stripes,
                af_hash,
                area_offset,
                area_size,
                area_encryption,
                area_spec,
                area_key_size: area_key_size as usize,
            };
            if area_size < slot.material_len() {
                return Err(Luks2Error::field(
                    format!("{rpath}.size"),
                    format!(
                        "{area_size} is smaller than the key material ({} bytes)",
                        slot.material_len()
                    ),
                ));
            }
            if area_offset < areas_start || area_offset.saturating_add(area_size) > areas_end {
                return Err(Luks2Error::field(
                    format!("{rpath}.offset"),
                    format!(
                        "area {area_offset}+{area_size} is outside the key slot areas ({areas_start} to {areas_end})"
                    ),
                ));
            }
            for (m, other) in &keyslots {
                let other: &Keyslot = other;
                if ranges_overlap(
                    (area_offset, area_size),
                    (other.area_offset, other.area_size),
                ) {
                    return Err(Luks2Error::field(
                        format!("{rpath}.offset"),
                        format!("area overlaps the area of keyslot {m}"),
                    ));
                }
            }
            keyslots.insert(n, slot);
        }
        for (n, d) in &digests {
            for k in &d.keyslots {
                if !keyslots.contains_key(k) {
                    return Err(Luks2Error::field(
                        format!("digests.{n}.keyslots"),
                        format!("names keyslot {k}, which does not exist"),
                    ));
                }
            }
        }

        // The segment's key length: that of the key slots its digest covers.
        let seg_path_enc = format!("{seg_path}.encryption");
        let key_len = digests
            .values()
            .filter(|d| d.segments.contains(&seg_no))
            .flat_map(|d| d.keyslots.iter())
            .filter_map(|k| keyslots.get(k))
            .map(|k| k.key_size)
            .next();
        let Some(key_len) = key_len else {
            return Err(Luks2Error::field(
                "digests",
                format!("no digest ties a keyslot to segment {seg_no}"),
            ));
        };
        let spec = cipher_spec(&encryption, key_len as u32, &seg_path_enc)?;
        if spec.key_bytes() != key_len {
            return Err(Luks2Error::field(
                seg_path_enc,
                format!("cipher {encryption} does not take the {key_len}-byte volume key"),
            ));
        }
        Ok(Metadata {
            keyslots,
            digests,
            segment: Segment {
                offset,
                size,
                iv_tweak,
                encryption,
                spec,
                sector_size,
            },
            json_size,
            keyslots_size,
        })
    }

    /// The digest that checks key slot `slot`'s key for the segment.
    pub fn digest_of(&self, slot: u32) -> Option<&Digest> {
        self.digests
            .values()
            .find(|d| d.keyslots.contains(&slot) && !d.segments.is_empty())
    }
}
