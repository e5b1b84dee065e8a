//! QEMU's `key=value,...` option syntax and dotted-key nesting.
//!
//! `secret,id=sec0,data=abc` with implied key `qom-type` becomes
//! `{"qom-type":"secret","id":"sec0","data":"abc"}`; `file.filename=x`
//! becomes `{"file":{"filename":"x"}}`; `,,` is a literal comma. Values stay
//! strings: the option readers in [`crate::options`] accept strings for
//! numbers and booleans, as QEMU's keyval visitor does.

use serde_json::{Map, Value};

/// Why an option string could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyvalError {
    /// A `key=value` pair has an empty key.
    #[error("invalid parameter '{0}': empty key")]
    EmptyKey(String),
    /// A pair without `=` where no implied key is allowed.
    #[error("no value given for parameter '{0}'")]
    MissingValue(String),
    /// The same key given twice, or used both as a value and as a group.
    #[error("parameter '{0}' is given twice or conflicts with another")]
    Conflict(String),
    /// Text starting with `{` that is not valid JSON.
    #[error("invalid JSON: {0}")]
    Json(String),
}

/// Parses either a JSON object (text starting with `{`) or QEMU's dotted
/// `key=value` list; `implied_key` names the key of a leading bare word.
pub fn parse(text: &str, implied_key: Option<&str>) -> Result<Map<String, Value>, KeyvalError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        return match serde_json::from_str::<Value>(trimmed) {
            Ok(Value::Object(map)) => unflatten(map),
            Ok(_) => Err(KeyvalError::Json("expected a JSON object".into())),
            Err(e) => Err(KeyvalError::Json(e.to_string())),
        };
    }
    let mut flat = Map::new();
    for (i, pair) in split_pairs(text).into_iter().enumerate() {
        if pair.is_empty() {
            continue;
        }
        let (key, value) = match pair.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match implied_key {
                Some(k) if i == 0 => (k.to_string(), pair.clone()),
                _ => return Err(KeyvalError::MissingValue(pair)),
            },
        };
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(KeyvalError::EmptyKey(pair));
        }
        if flat.insert(key.clone(), Value::String(value)).is_some() {
            return Err(KeyvalError::Conflict(key));
        }
    }
    unflatten(flat)
}

/// Splits on single commas, turning `,,` into a literal comma.
fn split_pairs(text: &str) -> Vec<String> {
    let mut pairs = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                pairs.last_mut().expect("never empty").push(',');
            } else {
                pairs.push(String::new());
            }
        } else {
            pairs.last_mut().expect("never empty").push(c);
        }
    }
    pairs
}

/// Turns dotted keys (`file.filename`) into nested objects, recursively, so
/// that JSON and keyval input reach the drivers in one shape.
pub fn unflatten(map: Map<String, Value>) -> Result<Map<String, Value>, KeyvalError> {
    let mut out = Map::new();
    for (key, value) in map {
        let value = match value {
            Value::Object(inner) => Value::Object(unflatten(inner)?),
            other => other,
        };
        insert_path(&mut out, &key, value)?;
    }
    Ok(out)
}

fn insert_path(map: &mut Map<String, Value>, key: &str, value: Value) -> Result<(), KeyvalError> {
    match key.split_once('.') {
        None => match (map.get_mut(key), value) {
            (None, value) => {
                map.insert(key.to_string(), value);
                Ok(())
            }
            (Some(Value::Object(existing)), Value::Object(new)) => {
                for (k, v) in new {
                    insert_path(existing, &k, v)?;
                }
                Ok(())
            }
            _ => Err(KeyvalError::Conflict(key.to_string())),
        },
        Some((head, rest)) => {
            let slot = map
                .entry(head.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            match slot {
                Value::Object(inner) => insert_path(inner, rest, value),
                _ => Err(KeyvalError::Conflict(head.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn implied_key_and_pairs() {
        let m = parse("secret,id=sec0,data=abc123", Some("qom-type")).unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"qom-type":"secret","id":"sec0","data":"abc123"})
        );
    }

    #[test]
    fn dotted_keys_nest() {
        let m = parse("driver=luks,file.filename=a,header.file.filename=b", None).unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"driver":"luks","file":{"filename":"a"},"header":{"file":{"filename":"b"}}})
        );
    }

    #[test]
    fn double_comma_is_literal() {
        let m = parse("driver=file,filename=a,,b", None).unwrap();
        assert_eq!(m["filename"], "a,b");
    }

    #[test]
    fn json_objects_are_unflattened() {
        let m = parse(
            r#"{"driver":"luks","file.filename":"x","file":{"driver":"file"}}"#,
            None,
        )
        .unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"driver":"luks","file":{"filename":"x","driver":"file"}})
        );
    }

    #[test]
    fn errors() {
        assert_eq!(
            parse("a=1,a=2", None),
            Err(KeyvalError::Conflict("a".into()))
        );
        assert!(matches!(
            parse("bare", None),
            Err(KeyvalError::MissingValue(_))
        ));
        assert!(matches!(parse("=x", None), Err(KeyvalError::EmptyKey(_))));
        assert!(matches!(parse("a.=x", None), Err(KeyvalError::EmptyKey(_))));
        assert!(matches!(parse("{\"a\":", None), Err(KeyvalError::Json(_))));
        assert!(matches!(
            parse("[1]", None),
            Err(KeyvalError::MissingValue(_))
        ));
        assert!(matches!(
            parse("a=1,a.b=2", None),
            Err(KeyvalError::Conflict(_))
        ));
    }
}
