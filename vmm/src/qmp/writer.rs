//! JSON text exactly as QEMU's `qobject_to_json()` writes it: `", "` and `": "`
//! separators, object members in QDict iteration order, non-ASCII characters and
//! controls as `\uXXXX` (upper-case hex, surrogate pairs beyond the BMP), and
//! floating-point numbers as C's `%.17g`.

use serde_json::{Map, Value};

/// Buckets of QEMU's QDict hash table (`QDICT_BUCKET_MAX`).
const QDICT_BUCKETS: u32 = 512;

/// QDict's key hash (`tdb_hash()` in qobject/qdict.c), reduced to a bucket.
fn qdict_bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    // QEMU's keys are C strings: they end at the first NUL.
    let bytes = &bytes[..bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len())];
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(b) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % QDICT_BUCKETS
}

/// The members of `map` in the order QEMU iterates a QDict into which they were inserted
/// in `map`'s order: by ascending hash bucket, and within a bucket the newest first.
/// QEMU checks request members and arguments in this order, and prints objects in it.
pub(crate) fn qdict_order(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut entries: Vec<(u32, usize, &String, &Value)> = map
        .iter()
        .enumerate()
        .map(|(i, (k, v))| (qdict_bucket(k), i, k, v))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    entries.into_iter().map(|(_, _, k, v)| (k, v)).collect()
}

/// `value` as QEMU prints it (one line, no terminator).
pub(crate) fn to_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                out.push_str(&format_g17(n.as_f64().unwrap_or(0.0)));
            }
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in qdict_order(map).into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(out, key);
                out.push_str(": ");
                write_value(out, item);
            }
            out.push('}');
        }
    }
}

/// A string literal as QEMU's `json_print_str()` writes it.
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
            _ => {
                let mut cp = u32::from(c);
                if !super::parser::is_valid_codepoint(cp) {
                    cp = 0xFFFD; // QEMU prints noncharacters as the replacement character
                }
                if cp > 0xFFFF {
                    let v = cp - 0x1_0000;
                    out.push_str(&format!(
                        "\\u{:04X}\\u{:04X}",
                        0xD800 + (v >> 10),
                        0xDC00 + (v & 0x3FF)
                    ));
                } else if !(0x20..0x7F).contains(&cp) {
                    out.push_str(&format!("\\u{cp:04X}"));
                } else {
                    out.push(c);
                }
            }
        }
    }
    out.push('"');
}

/// C's `printf("%.17g", x)`, which QEMU uses for floating-point numbers.
fn format_g17(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0" } else { "0" }.into();
    }
    // The decimal exponent after rounding to 17 significant digits.
    let sci = format!("{x:.16e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..17).contains(&exp) {
        let fixed = format!("{:.*}", (16 - exp) as usize, x);
        strip_fraction_zeros(&fixed).to_string()
    } else {
        format!(
            "{}e{}{:02}",
            strip_fraction_zeros(mantissa),
            if exp < 0 { '-' } else { '+' },
            exp.unsigned_abs()
        )
    }
}

/// `%g` drops trailing zeros of the fraction, and the point when nothing is left.
fn strip_fraction_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_in_qdict_order_as_qemu_prints_them() {
        // Orders QEMU 10 prints (greeting, replies, query-status, events).
        let cases = [
            (json!({"return": {}, "id": 2}), r#"{"return": {}, "id": 2}"#),
            (json!({"error": 1, "id": 2}), r#"{"id": 2, "error": 1}"#),
            (
                json!({"class": "GenericError", "desc": "x"}),
                r#"{"class": "GenericError", "desc": "x"}"#,
            ),
            (
                json!({"major": 10, "minor": 0, "micro": 2}),
                r#"{"micro": 2, "minor": 0, "major": 10}"#,
            ),
            (
                json!({"status": "running", "running": true}),
                r#"{"status": "running", "running": true}"#,
            ),
            (
                json!({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}),
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#,
            ),
            (
                json!({"version": 1, "capabilities": []}),
                r#"{"version": 1, "capabilities": []}"#,
            ),
        ];
        for (value, text) in cases {
            assert_eq!(to_json(&value), text);
        }
    }

    #[test]
    fn strings_escaped_as_qemu_does() {
        let s = "\u{7f}/\u{1}\u{0}x\"\\\n\t\u{e9}\u{1F600}\u{FFFE}";
        assert_eq!(
            to_json(&json!(s)),
            r#""\u007F/\u0001\u0000x\"\\\n\t\u00E9\uD83D\uDE00\uFFFD""#
        );
    }

    #[test]
    fn numbers_as_printf_g17() {
        let cases = [
            (1500.0, "1500"),
            (1.0, "1"),
            (-0.0, "-0"),
            (0.1, "0.10000000000000001"),
            (1.2345678901234567e22, "1.2345678901234568e+22"),
            (1e-5, "1.0000000000000001e-05"),
            (0.0001, "0.0001"),
            (1e16, "10000000000000000"),
            (1e17, "1e+17"),
            (-2.5, "-2.5"),
        ];
        for (x, text) in cases {
            assert_eq!(format_g17(x), text, "{x}");
        }
        assert_eq!(
            to_json(&json!([1, -1, u64::MAX])),
            "[1, -1, 18446744073709551615]"
        );
    }
}
