//! The QMP JSON parser (`vmm/src/qmp/parser.rs`) and writer (`writer.rs`): every
//! value parsed from arbitrary bytes, written as the server writes replies, must
//! parse back to the same value (numbers compared by value: QEMU prints the double
//! `-0.0` as `-0`, which reads back as the integer 0).
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use vmm::qmp::fuzzing::{stream, to_json, MAX_MESSAGE_SIZE};

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y || (x.is_f64() || y.is_f64()) && x.as_f64() == y.as_f64()
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    for message in stream(&[data]) {
        let Ok(value) = message else { continue };
        let mut text = to_json(&value);
        if text.len() >= MAX_MESSAGE_SIZE {
            continue;
        }
        // A top-level number ends only at the next byte.
        text.push('\n');
        let again = stream(&[text.as_bytes()]);
        assert_eq!(again.len(), 1, "{text:?} read back as {again:?}");
        match &again[0] {
            Ok(back) => assert!(
                same(&value, back),
                "{value:?} was written as {text:?}, read back as {back:?}"
            ),
            Err(e) => panic!("{value:?} was written as {text:?}, which does not parse: {e}"),
        }
    }
});
