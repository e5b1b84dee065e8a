//! JSON text as qemu-img prints it (`qobject_to_json_pretty`): four-space
//! indents, empty objects and lists opened and closed on separate lines,
//! object members in QDict iteration order, non-ASCII characters as `\uXXXX`.
//! (The QMP server's one-line writer in vmm/src/qmp/writer.rs follows the
//! same rules for member order and strings.)

use serde_json::{Map, Value};

/// Buckets of QEMU's QDict hash table (`QDICT_BUCKET_MAX`).
const QDICT_BUCKETS: u32 = 512;

/// The order in which QAPI's visitor inserts the members of `ImageInfo`
/// (`BlockNodeInfo`, then `BlockGraphInfo`/`ImageInfo`): members of one hash
/// bucket iterate newest first.
const IMAGE_INFO_ORDER: &[&str] = &[
    "filename",
    "format",
    "dirty-flag",
    "actual-size",
    "virtual-size",
    "cluster-size",
    "encrypted",
    "compressed",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "snapshots",
    "format-specific",
    "backing-image",
    "children",
];

/// QDict's key hash (`tdb_hash()` in qobject/qdict.c), reduced to a bucket.
fn qdict_bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(b) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % QDICT_BUCKETS
}

/// The members of `map` in QDict iteration order: by hash bucket, and within a
/// bucket the most recently inserted first (insertion as QAPI would do it).
fn qdict_order(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let inserted = |i: usize, k: &str| match IMAGE_INFO_ORDER.iter().position(|s| *s == k) {
        Some(p) => p,
        None => IMAGE_INFO_ORDER.len() + i,
    };
    let mut entries: Vec<(u32, usize, &String, &Value)> = map
        .iter()
        .enumerate()
        .map(|(i, (k, v))| (qdict_bucket(k), inserted(i, k), k, v))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    entries.into_iter().map(|(_, _, k, v)| (k, v)).collect()
}

/// `value` as qemu-img prints it with `--output=json` (no final newline).
pub fn to_pretty(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0);
    out
}

/// A newline and the indent of nesting `level`.
fn newline(out: &mut String, level: usize) {
    out.push('\n');
    out.push_str(&" ".repeat(level * 4));
}

fn write_value(out: &mut String, value: &Value, level: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, level + 1);
                write_value(out, item, level + 1);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in qdict_order(map).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, level + 1);
                write_str(out, key);
                out.push_str(": ");
                write_value(out, item, level + 1);
            }
            newline(out, level);
            out.push('}');
        }
    }
}

/// A string literal as QEMU's JSON writer writes it.
fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04X}"));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pretty_as_qemu() {
        let v = json!({"format": "raw", "children": [], "data": {}, "s": "a\"é\u{1F600}"});
        assert_eq!(
            to_pretty(&v),
            "{\n    \"s\": \"a\\\"\\u00E9\\uD83D\\uDE00\",\n    \"children\": [\n    ],\n    \"format\": \"raw\",\n    \"data\": {\n    }\n}"
        );
        // Same bucket: the member QAPI inserts later comes first.
        let v = json!({"children": 1, "backing-filename-format": 2});
        assert!(to_pretty(&v).starts_with("{\n    \"children\""));
    }
}
