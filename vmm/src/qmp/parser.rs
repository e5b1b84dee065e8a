//! Parsing one message's tokens into a JSON value, with the error texts of QEMU 10.0's
//! JSON parser (qobject/json-parser.c): the first error wins, strings are decoded as
//! modified UTF-8 (`\u0000` allowed, noncharacters and lone surrogates refused),
//! single-quoted strings are accepted, integers are i64, else u64, else double.

use serde_json::{Map, Number, Value};

use super::lexer::{Token, TokenKind};

/// Parses `tokens` (whose text is in `text`) into a value, or a `JSON parse error, ...`
/// description.
pub(crate) fn parse(text: &[u8], tokens: &[Token]) -> Result<Value, String> {
    let mut p = Parser {
        text,
        tokens,
        pos: 0,
        err: None,
    };
    match (p.parse_value(), p.err) {
        (_, Some(err)) => Err(err),
        (Some(v), None) => Ok(v),
        (None, None) => Err("JSON parse error, expecting value".into()),
    }
}

struct Parser<'a> {
    text: &'a [u8],
    tokens: &'a [Token],
    pos: usize,
    err: Option<String>,
}

impl Parser<'_> {
    /// Records an error unless one is already recorded (QEMU keeps the first).
    fn error(&mut self, msg: impl Into<String>) {
        if self.err.is_none() {
            self.err = Some(format!("JSON parse error, {}", msg.into()));
        }
    }

    fn peek(&self) -> Option<Token> {
        self.tokens.get(self.pos).copied()
    }

    fn pop(&mut self) -> Option<Token> {
        let t = self.peek();
        if t.is_some() {
            self.pos += 1;
        }
        t
    }

    fn bytes(&self, t: Token) -> &[u8] {
        &self.text[t.start..t.end]
    }

    fn parse_value(&mut self) -> Option<Value> {
        let Some(token) = self.peek() else {
            self.error("premature EOI");
            return None;
        };
        match token.kind {
            TokenKind::LCurly => self.parse_object(),
            TokenKind::LSquare => self.parse_array(),
            TokenKind::Integer | TokenKind::Float | TokenKind::String => {
                self.pos += 1;
                self.parse_literal(token)
            }
            TokenKind::Keyword => {
                self.pos += 1;
                match self.bytes(token) {
                    b"true" => Some(Value::Bool(true)),
                    b"false" => Some(Value::Bool(false)),
                    b"null" => Some(Value::Null),
                    other => {
                        let msg = format!("invalid keyword '{}'", String::from_utf8_lossy(other));
                        self.error(msg);
                        None
                    }
                }
            }
            _ => {
                self.error("expecting value");
                None
            }
        }
    }

    fn parse_pair(&mut self, map: &mut Map<String, Value>) -> Option<()> {
        if self.peek().is_none() {
            self.error("premature EOI");
            return None;
        }
        let key = match self.parse_value() {
            Some(Value::String(key)) => key,
            _ => {
                self.error("key is not a string in object");
                return None;
            }
        };
        match self.pop() {
            None => {
                self.error("premature EOI");
                return None;
            }
            Some(t) if t.kind != TokenKind::Colon => {
                self.error("missing : in object pair");
                return None;
            }
            Some(_) => {}
        }
        let Some(value) = self.parse_value() else {
            self.error("Missing value in dict");
            return None;
        };
        if map.contains_key(&key) {
            self.error("duplicate key");
            return None;
        }
        map.insert(key, value);
        Some(())
    }

    fn parse_object(&mut self) -> Option<Value> {
        self.pos += 1; // '{'
        let mut map = Map::new();
        match self.peek() {
            None => {
                self.error("premature EOI");
                return None;
            }
            Some(t) if t.kind == TokenKind::RCurly => {
                self.pos += 1;
                return Some(Value::Object(map));
            }
            Some(_) => {}
        }
        self.parse_pair(&mut map)?;
        loop {
            match self.pop() {
                None => {
                    self.error("premature EOI");
                    return None;
                }
                Some(t) if t.kind == TokenKind::RCurly => return Some(Value::Object(map)),
                Some(t) if t.kind != TokenKind::Comma => {
                    self.error("expected separator in dict");
                    return None;
                }
                Some(_) => self.parse_pair(&mut map)?,
            }
        }
    }

    fn parse_array(&mut self) -> Option<Value> {
        self.pos += 1; // '['
        let mut items = Vec::new();
        match self.peek() {
            None => {
                self.error("premature EOI");
                return None;
            }
            Some(t) if t.kind == TokenKind::RSquare => {
                self.pos += 1;
                return Some(Value::Array(items));
            }
            Some(_) => {}
        }
        loop {
            let Some(item) = self.parse_value() else {
                self.error("expecting value");
                return None;
            };
            items.push(item);
            match self.pop() {
                None => {
                    self.error("premature EOI");
                    return None;
                }
                Some(t) if t.kind == TokenKind::RSquare => return Some(Value::Array(items)),
                Some(t) if t.kind != TokenKind::Comma => {
                    self.error("expected separator in list");
                    return None;
                }
                Some(_) => {}
            }
        }
    }

    fn parse_literal(&mut self, token: Token) -> Option<Value> {
        let bytes = self.bytes(token);
        match token.kind {
            TokenKind::String => match parse_string(bytes) {
                Ok(s) => Some(Value::String(s)),
                Err(msg) => {
                    self.error(msg);
                    None
                }
            },
            _ => Some(parse_number(bytes, token.kind)),
        }
    }
}

/// A number token: integers as i64, else u64, else double (QEMU's QNum rules).
fn parse_number(bytes: &[u8], kind: TokenKind) -> Value {
    let text = std::str::from_utf8(bytes).unwrap_or("0");
    if kind == TokenKind::Integer {
        if let Ok(i) = text.parse::<i64>() {
            return Value::Number(i.into());
        }
        if let Ok(u) = text.parse::<u64>() {
            return Value::Number(u.into());
        }
    }
    let x: f64 = text.parse().unwrap_or(0.0);
    // QEMU keeps an infinite double (and prints `inf`, which is not JSON); a JSON value
    // cannot hold one, so an out-of-range number becomes null.
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// Whether QEMU accepts `cp` as a character (`is_valid_codepoint()` in util/unicode.c):
/// in range, not a surrogate, not a noncharacter.
pub(crate) fn is_valid_codepoint(cp: u32) -> bool {
    cp <= 0x10_FFFF
        && !(0xFDD0..=0xFDEF).contains(&cp)
        && (cp & 0xFFFE) != 0xFFFE
        && !(0xD800..=0xDFFF).contains(&cp)
}

/// Four hex digits at the start of `s`, or `None`.
fn hex4(s: &[u8]) -> Option<u32> {
    let digits = s.get(..4)?;
    let text = std::str::from_utf8(digits).ok()?;
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(text, 16).ok()
}

/// Decodes one modified-UTF-8 character at the start of `s` (`mod_utf8_codepoint()`):
/// the code point, or `None`, and the bytes it spans.
fn mod_utf8_codepoint(s: &[u8]) -> (Option<u32>, usize) {
    let Some(&first) = s.first() else {
        return (None, 0);
    };
    if first < 0x80 {
        return (Some(u32::from(first)), 1);
    }
    if first >= 0xFE || first & 0x40 == 0 {
        return (None, 1);
    }
    let len = first.leading_ones() as usize;
    let mut cp = u32::from(first) & ((0x80u32 >> len) - 1);
    let mut used = 1;
    for i in 1..len {
        match s.get(i) {
            Some(&b) if b & 0xC0 == 0x80 => {
                cp = (cp << 6) | u32::from(b & 0x3F);
                used += 1;
            }
            _ => return (None, used),
        }
    }
    const MIN: [u32; 5] = [0x80, 0x800, 0x1_0000, 0x20_0000, 0x400_0000];
    let overlong = cp < MIN[len - 2] && !(cp == 0 && len == 2);
    if !is_valid_codepoint(cp) || overlong {
        return (None, used);
    }
    (Some(cp), used)
}

/// A string token (with its quotes) decoded, or the error QEMU reports for it.
fn parse_string(token: &[u8]) -> Result<String, String> {
    let quote = token.first().copied().unwrap_or(b'"');
    // Never more bytes than the token: no reallocation leaves a copy of what may be
    // a passphrase behind.
    let mut out = String::with_capacity(token.len());
    let mut i = 1;
    while let Some(&b) = token.get(i) {
        if b == quote {
            break;
        }
        if b == b'\\' {
            let begin = i;
            i += 1;
            let escaped = token.get(i).copied().unwrap_or(0);
            i += 1;
            let c = match escaped {
                b'"' => '"',
                b'\'' => '\'',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    let mut cp = hex4(token.get(i..).unwrap_or(&[]));
                    i += 4;
                    if let Some(lead @ 0xD800..=0xDBFF) = cp {
                        if token.get(i) == Some(&b'\\') && token.get(i + 1) == Some(&b'u') {
                            cp = match hex4(token.get(i + 2..).unwrap_or(&[])) {
                                Some(trail @ 0xDC00..=0xDFFF) => {
                                    i += 6;
                                    Some(0x1_0000 + ((lead & 0x3FF) << 10) + (trail & 0x3FF))
                                }
                                _ => None,
                            };
                        }
                    }
                    match cp
                        .filter(|&cp| is_valid_codepoint(cp))
                        .and_then(char::from_u32)
                    {
                        Some(c) => c,
                        None => {
                            let shown = &token[begin..i.min(token.len())];
                            return Err(format!(
                                "{} is not a valid Unicode character",
                                String::from_utf8_lossy(shown)
                            ));
                        }
                    }
                }
                _ => return Err("invalid escape sequence in string".into()),
            };
            out.push(c);
        } else {
            let (cp, used) = mod_utf8_codepoint(&token[i..]);
            match cp.and_then(char::from_u32) {
                Some(c) => out.push(c),
                None => return Err("invalid UTF-8 sequence in string".into()),
            }
            i += used.max(1);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::lexer::JsonStreamer;
    use serde_json::json;

    /// The first message of `input` (newline-terminated).
    fn one(input: &str) -> Result<serde_json::Value, String> {
        let mut s = JsonStreamer::new();
        let mut out = Vec::new();
        s.feed(input.as_bytes(), &mut out);
        s.feed(b"\n", &mut out);
        out.into_iter().next().expect("a message")
    }

    #[test]
    fn qemu_parse_error_texts() {
        // Texts measured against QEMU 10.0.2's QMP monitor.
        let cases = [
            (r#"{"a" 1}"#, "missing : in object pair"),
            (r#"{"a":1 "b":2}"#, "expected separator in dict"),
            ("{1:2}", "key is not a string in object"),
            ("[1 2]", "expected separator in list"),
            ("[1,]", "expecting value"),
            (r#"{"a":}"#, "expecting value"),
            (r#"{"a":1,}"#, "expecting value"),
            (r#"{"a":1]"#, "expected separator in dict"),
            ("]", "expecting value"),
            (r#""\q""#, "invalid escape sequence in string"),
            (r#""\ud800""#, "\\ud800 is not a valid Unicode character"),
            (r#""\u12""#, "\\u12\" is not a valid Unicode character"),
            (r#"{"a":1,"a":2}"#, "duplicate key"),
            ("garbage", "invalid keyword 'garbage'"),
            ("tru", "invalid keyword 'tru'"),
        ];
        for (input, want) in cases {
            assert_eq!(
                one(input),
                Err(format!("JSON parse error, {want}")),
                "input {input}"
            );
        }
        let mut s = JsonStreamer::new();
        let mut out = Vec::new();
        s.feed(b"\"\xc3(\"", &mut out);
        assert_eq!(
            out,
            vec![Err(
                "JSON parse error, invalid UTF-8 sequence in string".to_string()
            )]
        );
    }

    #[test]
    fn values_as_qemu_reads_them() {
        assert_eq!(one("'it''s'"), Ok(json!("it"))); // two messages: 'it' then 's'
        assert_eq!(one(r#"'a"b'"#), Ok(json!("a\"b")));
        assert_eq!(
            one(r#""\u00e9\ud83d\ude00\u0000\/""#),
            Ok(json!("é😀\u{0}/"))
        );
        assert_eq!(one("-0"), Ok(json!(0)));
        assert_eq!(one("18446744073709551615"), Ok(json!(u64::MAX)));
        assert_eq!(one("1.5e3"), Ok(json!(1500.0)));
        assert_eq!(
            one("123456789012345678901234"),
            Ok(json!(1.2345678901234568e23))
        );
        assert_eq!(one("1e999"), Ok(json!(null)));
        assert_eq!(
            one(r#"{"a": [true, false, null, {}]}"#),
            Ok(json!({"a": [true, false, null, {}]}))
        );
    }
}
