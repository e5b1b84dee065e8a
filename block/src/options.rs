//! Typed access to QMP-style option objects, with errors that name the key path,
//! and [`check_keys`]: the one check of an argument object's keys that block
//! options, QMP command arguments and device properties all use.

use serde_json::{Map, Value};

use crate::{BlockError, Result};

/// What the block layer says about an option no driver knows.
const UNKNOWN_OPTION: &str = "unknown option";
/// What the block layer says about a mandatory option that is absent.
pub(crate) const MISSING_OPTION: &str = "missing mandatory option";

/// An option object being consumed: every key must be taken, and whatever is
/// left when [`Opts::finish`] runs is an unknown option.
#[derive(Debug)]
pub struct Opts {
    path: String,
    map: Map<String, Value>,
}

impl Opts {
    /// Wraps `map`, whose keys are reported as `path.key`.
    pub fn new(path: impl Into<String>, map: Map<String, Value>) -> Self {
        Self {
            path: path.into(),
            map,
        }
    }

    /// Wraps `value`, which must be an object.
    pub fn from_value(path: impl Into<String>, value: Value) -> Result<Self> {
        let path = path.into();
        match value {
            Value::Object(map) => Ok(Self::new(path, map)),
            other => Err(BlockError::option(
                path,
                format!("expected an object, got {}", kind(&other)),
            )),
        }
    }

    /// The path of this object (`blockdevs[2]`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The full path of one key (`blockdevs[2].file`).
    pub fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// An error about `key`.
    pub fn error(&self, key: &str, msg: impl Into<String>) -> BlockError {
        BlockError::option(self.key_path(key), msg)
    }

    /// Removes and returns a raw value.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    /// An optional string.
    pub fn str(&mut self, key: &str) -> Result<Option<String>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.error(key, format!("expected a string, got {}", kind(&other)))),
        }
    }

    /// A mandatory string.
    pub fn req_str(&mut self, key: &str) -> Result<String> {
        self.str(key)?
            .ok_or_else(|| self.error(key, MISSING_OPTION))
    }

    /// An optional boolean (`true`/`false`, or the strings `on`/`off`/`true`/`false`).
    pub fn bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) => match s.as_str() {
                "on" | "true" | "yes" => Ok(Some(true)),
                "off" | "false" | "no" => Ok(Some(false)),
                _ => Err(self.error(key, format!("expected a boolean, got '{s}'"))),
            },
            Some(other) => {
                Err(self.error(key, format!("expected a boolean, got {}", kind(&other))))
            }
        }
    }

    /// An optional unsigned integer (a number, or a string with an optional
    /// size suffix k/M/G/T as in QEMU's keyval syntax).
    pub fn u64(&mut self, key: &str) -> Result<Option<u64>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
                self.error(key, format!("expected a non-negative integer, got {n}"))
            }),
            Some(Value::String(s)) => parse_size(&s).map(Some).ok_or_else(|| {
                self.error(key, format!("expected a non-negative integer, got '{s}'"))
            }),
            Some(other) => {
                Err(self.error(key, format!("expected an integer, got {}", kind(&other))))
            }
        }
    }

    /// Checks the keys left with [`check_keys`]: an unknown one is reported
    /// first (`path.key: unknown option`), then a missing `required` one
    /// (`path.key: missing mandatory option`). Drivers call it before reading
    /// their options, so a misspelt key is named instead of reported missing.
    pub fn check_keys(&self, allowed: &[&[&str]], required: &[&str]) -> Result<()> {
        check_keys(self.map.keys(), allowed, required).map_err(|e| self.key_error(&e))
    }

    /// The [`BlockError`] for `e`, in the block layer's words.
    pub fn key_error(&self, e: &KeyError) -> BlockError {
        match e {
            KeyError::Unexpected(k) => self.error(k, UNKNOWN_OPTION),
            KeyError::Missing(k) => self.error(k, MISSING_OPTION),
        }
    }

    /// The value at `key`, left in place.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    /// Fails if any key was not taken.
    pub fn finish(self) -> Result<()> {
        self.check_all_taken()
    }

    /// [`Opts::finish`], leaving the options in place.
    pub fn check_all_taken(&self) -> Result<()> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(key) => Err(self.error(key, UNKNOWN_OPTION)),
        }
    }

    /// The options not taken.
    pub fn into_map(self) -> Map<String, Value> {
        self.map
    }
}

/// Why [`check_keys`] refused an argument object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// A key that none of the allowed lists has (QEMU: "Parameter 'KEY' is
    /// unexpected", or for a device "Property 'DRIVER.KEY' not found").
    Unexpected(String),
    /// A mandatory key is absent (QEMU: "Parameter 'KEY' is missing").
    Missing(String),
}

impl KeyError {
    /// The key the error is about.
    pub fn key(&self) -> &str {
        match self {
            KeyError::Unexpected(k) | KeyError::Missing(k) => k,
        }
    }
}

/// The one check of an argument object's keys (block driver options, QMP
/// arguments, device properties): the first of `keys` (in the order given)
/// that no list in `allowed` has is reported by name, before the first of
/// `required` that `keys` lacks.
pub fn check_keys<'k>(
    keys: impl IntoIterator<Item = &'k String>,
    allowed: &[&[&str]],
    required: &[&str],
) -> std::result::Result<(), KeyError> {
    let keys: Vec<&String> = keys.into_iter().collect();
    if let Some(k) = keys
        .iter()
        .find(|k| !allowed.iter().any(|list| list.contains(&k.as_str())))
    {
        return Err(KeyError::Unexpected((*k).clone()));
    }
    match required.iter().find(|r| !keys.iter().any(|k| k == *r)) {
        Some(r) => Err(KeyError::Missing((*r).to_string())),
        None => Ok(()),
    }
}

/// Parses `123`, `64k`, `512M`, `2G`, `1T` (binary units) into bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last()? {
        (i, 'k' | 'K') => (&text[..i], 10),
        (i, 'm' | 'M') => (&text[..i], 20),
        (i, 'g' | 'G') => (&text[..i], 30),
        (i, 't' | 'T') => (&text[..i], 40),
        (i, 'b' | 'B') => (&text[..i], 0),
        _ => (text, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// A short name for a JSON value's type, for error messages.
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opts(v: Value) -> Opts {
        Opts::from_value("blockdevs[1]", v).unwrap()
    }

    #[test]
    fn typed_reads_and_unknown_keys() {
        let mut o = opts(json!({"filename":"a","read-only":"on","offset":"4k","extra":1}));
        assert_eq!(o.req_str("filename").unwrap(), "a");
        assert_eq!(o.bool("read-only").unwrap(), Some(true));
        assert_eq!(o.u64("offset").unwrap(), Some(4096));
        let err = o.finish().unwrap_err().to_string();
        assert_eq!(err, "blockdevs[1].extra: unknown option");
    }

    #[test]
    fn wrong_types_name_the_key() {
        let mut o = opts(json!({"filename": 3, "size": -1, "read-only": "maybe"}));
        assert_eq!(
            o.str("filename").unwrap_err().to_string(),
            "blockdevs[1].filename: expected a string, got a number"
        );
        assert!(o
            .u64("size")
            .unwrap_err()
            .to_string()
            .starts_with("blockdevs[1].size:"));
        assert!(o.bool("read-only").is_err());
        assert!(o
            .req_str("missing")
            .unwrap_err()
            .to_string()
            .contains("missing mandatory"));
    }

    #[test]
    fn unknown_keys_come_before_missing_ones() {
        let o = opts(json!({"driver": "file", "filenmae": "a"}));
        let allowed: &[&[&str]] = &[&["driver"], &["filename", "aio"]];
        assert_eq!(
            o.check_keys(allowed, &["filename"])
                .unwrap_err()
                .to_string(),
            "blockdevs[1].filenmae: unknown option"
        );
        let o = opts(json!({"driver": "file"}));
        assert_eq!(
            o.check_keys(allowed, &["filename"])
                .unwrap_err()
                .to_string(),
            "blockdevs[1].filename: missing mandatory option"
        );
        let o = opts(json!({"driver": "file", "filename": "a"}));
        assert!(o.check_keys(allowed, &["filename"]).is_ok());
        let keys = ["b".to_string(), "z".to_string(), "y".to_string()];
        assert_eq!(
            check_keys(&keys, &[&["b"]], &["a"]),
            Err(KeyError::Unexpected("z".into())),
            "the first unknown key in the order given"
        );
        assert_eq!(
            check_keys(&keys[..1], &[&["b"]], &["a"]),
            Err(KeyError::Missing("a".into()))
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("k"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }
}
