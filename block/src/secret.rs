//! QEMU's `secret` objects: passphrases given inline, in a file, base64
//! encoded, or AES-256-CBC encrypted with another secret (`keyid` + `iv`).

use std::collections::BTreeMap;
use std::fmt;

use aes::cipher::{block_padding::NoPadding, BlockDecryptMut, KeyIvInit};
use base64::Engine;
use serde_json::Value;
use zeroize::{Zeroize, Zeroizing};

use crate::options::Opts;
use crate::{BlockError, Result};

/// Why a secret could not be made or used. Messages never include secret data.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// No secret of that id exists.
    #[error("No secret with id '{0}'")]
    NotFound(String),
    /// The id is taken.
    #[error("attempt to add duplicate object '{0}'")]
    Duplicate(String),
    /// The secret is still used.
    #[error("secret '{0}' is in use")]
    InUse(String),
    /// Neither or both of `data` and `file`.
    #[error("secret '{0}': exactly one of 'data' and 'file' is required")]
    Source(String),
    /// The secret file could not be read.
    #[error("secret '{id}': reading '{path}': {source}")]
    File {
        /// Secret id.
        id: String,
        /// File path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Data that should be base64 is not.
    #[error("secret '{0}': {1} is not valid base64")]
    Base64(String, &'static str),
    /// Decrypting with `keyid` failed.
    #[error("secret '{0}': {1}")]
    Decrypt(String, String),
    /// A passphrase that must be UTF-8 is not.
    #[error("Data from secret {0} is not valid UTF-8")]
    NotUtf8(String),
}

/// The keys of a `secret` object.
pub const SECRET_KEYS: &[&str] = &["qom-type", "id", "data", "file", "format", "keyid", "iv"];

/// Checks `object-add` arguments without reading anything (a config is
/// checked so before the VM exists): the `qom-type`, then unknown keys by
/// name before a missing `id`. `path` prefixes key paths in errors. Returns
/// the id.
pub fn check_object(path: &str, args: &Value) -> Result<String> {
    let o = Opts::from_value(path, args.clone())?;
    let result = check_object_opts(&o);
    wipe_json(Value::Object(o.into_map()));
    result
}

/// Drops `value`, zeroizing every string in it (keys too) first: the arguments of an
/// `object-add`, or any JSON a client sent, may hold a passphrase.
pub fn wipe_json(value: Value) {
    match value {
        Value::String(mut s) => s.zeroize(),
        Value::Array(items) => items.into_iter().for_each(wipe_json),
        Value::Object(map) => {
            for (mut key, value) in map {
                key.zeroize();
                wipe_json(value);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

fn check_object_opts(o: &Opts) -> Result<String> {
    match o.get("qom-type") {
        None => return Err(o.error("qom-type", crate::options::MISSING_OPTION)),
        Some(Value::String(t)) if t == "secret" => {}
        Some(Value::String(t)) => {
            return Err(o.error(
                "qom-type",
                format!("object type '{t}' is not supported (only 'secret')"),
            ))
        }
        Some(other) => {
            return Err(o.error(
                "qom-type",
                format!("expected a string, got {}", crate::options::kind(other)),
            ))
        }
    }
    o.check_keys(&[SECRET_KEYS], &["id"])?;
    match o.get("id") {
        Some(Value::String(id)) => Ok(id.clone()),
        other => Err(o.error(
            "id",
            format!(
                "expected a string, got {}",
                other.map_or("null", crate::options::kind)
            ),
        )),
    }
}

/// The bytes of one secret, wiped when dropped.
#[derive(Clone)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// The secret's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The secret objects of a VM or an `img` invocation, by id. A clone's
/// secrets are zeroized when it is dropped, as the original's are.
#[derive(Debug, Default, Clone)]
pub struct SecretStore {
    secrets: BTreeMap<String, Secret>,
}

impl SecretStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an object from `object-add` arguments (`qom-type`, `id`, ...);
    /// relative `file` paths resolve against `base_dir`. Returns the id.
    pub fn add(
        &mut self,
        path: &str,
        args: Value,
        base_dir: Option<&std::path::Path>,
    ) -> Result<String> {
        let mut o = Opts::from_value(path, args)?;
        let result = self.add_opts(&mut o, base_dir);
        // What was not taken (all of it, on an early error) may hold the passphrase.
        wipe_json(Value::Object(o.into_map()));
        result
    }

    fn add_opts(&mut self, o: &mut Opts, base_dir: Option<&std::path::Path>) -> Result<String> {
        check_object_opts(o)?;
        o.take("qom-type");
        let id = o.req_str("id")?;
        if self.secrets.contains_key(&id) {
            return Err(SecretError::Duplicate(id).into());
        }
        let data = o.str("data")?.map(|d| Zeroizing::new(d.into_bytes()));
        let file = o.str("file")?;
        let format = o.str("format")?.unwrap_or_else(|| "raw".into());
        let base64 = match format.as_str() {
            "raw" => false,
            "base64" => true,
            _ => {
                return Err(o.error(
                    "format",
                    format!("invalid secret format '{format}' (raw or base64)"),
                ))
            }
        };
        let keyid = o.str("keyid")?;
        let iv = o.str("iv")?;
        o.check_all_taken()?;

        let input = match (data, file) {
            (Some(d), None) => d,
            (None, Some(f)) => {
                let full = match base_dir {
                    Some(dir) => dir.join(&f),
                    None => f.clone().into(),
                };
                let bytes = std::fs::read(&full).map_err(|source| SecretError::File {
                    id: id.clone(),
                    path: f,
                    source,
                })?;
                Zeroizing::new(bytes)
            }
            _ => return Err(SecretError::Source(id).into()),
        };
        let value = match keyid {
            Some(keyid) => self.decrypt(&id, &input, base64, &keyid, iv.as_deref())?,
            None if base64 => decode_base64(&id, &input, "data")?,
            None => input,
        };
        self.secrets.insert(id.clone(), Secret(value));
        Ok(id)
    }

    /// AES-256-CBC decryption with the key in secret `keyid`, as QEMU does.
    fn decrypt(
        &self,
        id: &str,
        input: &[u8],
        base64: bool,
        keyid: &str,
        iv: Option<&str>,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let fail =
            |msg: &str| BlockError::from(SecretError::Decrypt(id.to_string(), msg.to_string()));
        let key = self.get(keyid)?;
        if key.bytes().len() != 32 {
            return Err(fail("Key should be 32 bytes in length"));
        }
        let iv = iv.ok_or_else(|| fail("IV is required to decrypt secret"))?;
        let iv = base64::engine::general_purpose::STANDARD
            .decode(iv.trim())
            .map_err(|_| SecretError::Base64(id.to_string(), "iv"))?;
        if iv.len() != 16 {
            return Err(fail(&format!(
                "IV should be 16 bytes in length not {}",
                iv.len()
            )));
        }
        let mut buf = if base64 {
            decode_base64(id, input, "data")?
        } else {
            Zeroizing::new(input.to_vec())
        };
        if buf.is_empty() || buf.len() % 16 != 0 {
            return Err(fail("encrypted data is not a whole number of AES blocks"));
        }
        cbc::Decryptor::<aes::Aes256>::new_from_slices(key.bytes(), &iv)
            .map_err(|_| fail("invalid key or IV length"))?
            .decrypt_padded_mut::<NoPadding>(&mut buf)
            .map_err(|_| fail("decryption failed"))?;
        let pad = usize::from(buf[buf.len() - 1]);
        if pad == 0 || pad > 16 || pad > buf.len() {
            return Err(fail(
                "incorrect padding on decrypted data (wrong key or IV?)",
            ));
        }
        let len = buf.len() - pad;
        buf.truncate(len);
        Ok(buf)
    }

    /// The secret `id`.
    pub fn get(&self, id: &str) -> Result<&Secret, SecretError> {
        self.secrets
            .get(id)
            .ok_or_else(|| SecretError::NotFound(id.to_string()))
    }

    /// The secret `id` as a UTF-8 passphrase, cut at the first NUL as QEMU does.
    pub fn passphrase(&self, id: &str) -> Result<Zeroizing<Vec<u8>>, SecretError> {
        let bytes = self.get(id)?.bytes();
        let bytes = bytes.split(|&b| b == 0).next().unwrap_or_default();
        if std::str::from_utf8(bytes).is_err() {
            return Err(SecretError::NotUtf8(id.to_string()));
        }
        Ok(Zeroizing::new(bytes.to_vec()))
    }

    /// Removes secret `id`.
    pub fn remove(&mut self, id: &str) -> Result<(), SecretError> {
        self.secrets
            .remove(id)
            .map(drop)
            .ok_or_else(|| SecretError::NotFound(id.to_string()))
    }

    /// Ids of all secrets.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.secrets.keys().map(String::as_str)
    }
}

fn decode_base64(id: &str, input: &[u8], what: &'static str) -> Result<Zeroizing<Vec<u8>>> {
    let text: Vec<u8> = input
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let text = Zeroizing::new(text);
    base64::engine::general_purpose::STANDARD
        .decode(&*text)
        .map(Zeroizing::new)
        .map_err(|_| SecretError::Base64(id.to_string(), what).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::{block_padding::Pkcs7, BlockEncryptMut};
    use serde_json::json;

    #[test]
    fn data_file_and_base64() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), b"from-file\n").unwrap();
        let mut s = SecretStore::new();
        s.add(
            "o[0]",
            json!({"qom-type":"secret","id":"a","data":"abc123"}),
            None,
        )
        .unwrap();
        s.add(
            "o[1]",
            json!({"qom-type":"secret","id":"b","file":"pw"}),
            Some(dir.path()),
        )
        .unwrap();
        s.add(
            "o[2]",
            json!({"qom-type":"secret","id":"c","data":"aGVsbG8=","format":"base64"}),
            None,
        )
        .unwrap();
        assert_eq!(s.get("a").unwrap().bytes(), b"abc123");
        // QEMU keeps a file's trailing newline; so do we.
        assert_eq!(s.get("b").unwrap().bytes(), b"from-file\n");
        assert_eq!(s.get("c").unwrap().bytes(), b"hello");
    }

    #[test]
    fn encrypted_with_keyid() {
        let key = [7u8; 32];
        let iv = [9u8; 16];
        let plain = b"my secret passphrase";
        let mut ct = vec![0u8; 32];
        ct[..plain.len()].copy_from_slice(plain);
        let ct = cbc::Encryptor::<aes::Aes256>::new_from_slices(&key, &iv)
            .unwrap()
            .encrypt_padded_mut::<Pkcs7>(&mut ct, plain.len())
            .unwrap()
            .to_vec();
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let mut s = SecretStore::new();
        s.add(
            "o",
            json!({"qom-type":"secret","id":"master","data":b64(&key),"format":"base64"}),
            None,
        )
        .unwrap();
        s.add(
            "o",
            json!({"qom-type":"secret","id":"sec","data":b64(&ct),"format":"base64","keyid":"master","iv":b64(&iv)}),
            None,
        )
        .unwrap();
        assert_eq!(s.get("sec").unwrap().bytes(), plain);
        let wrong_iv = json!({"qom-type":"secret","id":"x","data":b64(&ct),"format":"base64","keyid":"master","iv":b64(&[1u8;8])});
        assert!(s
            .add("o", wrong_iv, None)
            .unwrap_err()
            .to_string()
            .contains("IV should be 16 bytes"));
    }

    #[test]
    fn errors_never_show_data() {
        let mut s = SecretStore::new();
        s.add(
            "o",
            json!({"qom-type":"secret","id":"a","data":"topsecret"}),
            None,
        )
        .unwrap();
        let dup = s
            .add(
                "o",
                json!({"qom-type":"secret","id":"a","data":"topsecret"}),
                None,
            )
            .unwrap_err();
        assert!(!dup.to_string().contains("topsecret"));
        assert!(!format!("{s:?}").contains("topsecret"));
        let bad = s.add(
            "o",
            json!({"qom-type":"secret","id":"b","data":"!!topsecret","format":"base64"}),
            None,
        );
        assert!(!bad.unwrap_err().to_string().contains("topsecret"));
        assert!(s
            .add("o", json!({"qom-type":"secret","id":"c"}), None)
            .is_err());
        assert!(s
            .add("o", json!({"qom-type":"memory","id":"d"}), None)
            .is_err());
        assert!(matches!(s.get("zz"), Err(SecretError::NotFound(_))));
    }

    #[test]
    fn passphrase_stops_at_nul_and_needs_utf8() {
        let mut s = SecretStore::new();
        s.add(
            "o",
            json!({"qom-type":"secret","id":"a","data":"YWIAY2Q=","format":"base64"}),
            None,
        )
        .unwrap();
        assert_eq!(&*s.passphrase("a").unwrap(), b"ab");
        s.add(
            "o",
            json!({"qom-type":"secret","id":"b","data":"/w==","format":"base64"}),
            None,
        )
        .unwrap();
        assert!(matches!(s.passphrase("b"), Err(SecretError::NotUtf8(_))));
    }
}
