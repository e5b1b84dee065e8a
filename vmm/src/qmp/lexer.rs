//! Splitting a QMP byte stream into JSON messages, as QEMU's JSON lexer and streamer do
//! (qobject/json-lexer.c, json-streamer.c).
//!
//! QMP is not line-based: a message ends when its braces and brackets balance (or a
//! top-level scalar ends), so several messages may share a line and one may span lines;
//! `qemu.qmp` sends requests with no newline at all. After a lexical error the lexer
//! skips to a structural character or a control character (QEMU's recovery), so a client
//! can resynchronise with a newline or a `0xFF` byte.
//!
//! Limits (QEMU's are larger; see `docs/qmp.md`): a message's tokens may total
//! [`MAX_MESSAGE_SIZE`] bytes and nest [`MAX_NESTING`] deep. Past a limit the message is
//! answered with QEMU's error text and the rest of it is skipped up to the next control
//! character (a newline) or `0xFE`/`0xFF` byte, so memory stays bounded whatever is sent.

use serde_json::Value;

use super::parser;
use super::wipe::WipeBuf;

/// Bytes of tokens one message may hold (whitespace between tokens is not counted).
pub(crate) const MAX_MESSAGE_SIZE: usize = 1 << 20;

/// Open braces plus open brackets a message may have at once (QEMU's `MAX_NESTING`).
pub(crate) const MAX_NESTING: i64 = 1024;

/// A token's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenKind {
    /// `{`
    LCurly,
    /// `}`
    RCurly,
    /// `[`
    LSquare,
    /// `]`
    RSquare,
    /// `:`
    Colon,
    /// `,`
    Comma,
    /// An integer literal.
    Integer,
    /// A number with a fraction or exponent.
    Float,
    /// `[a-z]+`; the parser accepts only `true`, `false` and `null`.
    Keyword,
    /// A single- or double-quoted string, quotes and escapes included.
    String,
}

/// A token: its kind and where its text is in the message buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Token {
    /// The kind.
    pub kind: TokenKind,
    /// Start offset in the message text.
    pub start: usize,
    /// End offset (exclusive).
    pub end: usize,
}

/// Lexer states (QEMU's `json_lexer_state`, plus [`State::Overflow`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Start,
    Recovery,
    /// Skipping the rest of a message that exceeded a limit.
    Overflow,
    DqString,
    DqStringEscape,
    SqString,
    SqStringEscape,
    Zero,
    ExpDigits,
    ExpSign,
    ExpE,
    Mantissa,
    MantissaDigits,
    Digits,
    Sign,
    Keyword,
}

/// What a byte does in a state.
enum Step {
    /// Consume it and go to the state.
    Go(State),
    /// Consume it; it completes a token.
    Token(TokenKind),
    /// Do not consume it; the token so far is complete.
    Terminal(TokenKind),
    /// Consume and drop it (whitespace between tokens).
    Skip,
    /// Do not consume it; restart in the start state (end of recovery).
    Resync,
    /// Consume it; the token so far, with it, is a lexical error.
    Error,
}

fn step(state: State, b: u8) -> Step {
    use State as S;
    use Step::*;
    use TokenKind as K;
    match state {
        S::Start => match b {
            b'"' => Go(S::DqString),
            b'\'' => Go(S::SqString),
            b'0' => Go(S::Zero),
            b'1'..=b'9' => Go(S::Digits),
            b'-' => Go(S::Sign),
            b'{' => Token(K::LCurly),
            b'}' => Token(K::RCurly),
            b'[' => Token(K::LSquare),
            b']' => Token(K::RSquare),
            b',' => Token(K::Comma),
            b':' => Token(K::Colon),
            b'a'..=b'z' => Go(S::Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Skip,
            _ => Error,
        },
        S::Recovery => match b {
            b'\t' => Skip,
            0..=0x1F | 0xFE | 0xFF | b'[' | b']' | b'{' | b'}' | b':' | b',' => Resync,
            _ => Skip,
        },
        S::Overflow => match b {
            b'\t' => Skip,
            0..=0x1F | 0xFE | 0xFF => Resync,
            _ => Skip,
        },
        S::DqStringEscape => match b {
            0x20..=0xFD => Go(S::DqString),
            _ => Error,
        },
        S::DqString => match b {
            b'\\' => Go(S::DqStringEscape),
            b'"' => Token(K::String),
            0x20..=0xFD => Go(S::DqString),
            _ => Error,
        },
        S::SqStringEscape => match b {
            0x20..=0xFD => Go(S::SqString),
            _ => Error,
        },
        S::SqString => match b {
            b'\\' => Go(S::SqStringEscape),
            b'\'' => Token(K::String),
            0x20..=0xFD => Go(S::SqString),
            _ => Error,
        },
        S::Zero => match b {
            b'0'..=b'9' => Error,
            b'.' => Go(S::Mantissa),
            _ => Terminal(K::Integer),
        },
        S::ExpDigits => match b {
            b'0'..=b'9' => Go(S::ExpDigits),
            _ => Terminal(K::Float),
        },
        S::ExpSign => match b {
            b'0'..=b'9' => Go(S::ExpDigits),
            _ => Error,
        },
        S::ExpE => match b {
            b'-' | b'+' => Go(S::ExpSign),
            b'0'..=b'9' => Go(S::ExpDigits),
            _ => Error,
        },
        S::MantissaDigits => match b {
            b'0'..=b'9' => Go(S::MantissaDigits),
            b'e' | b'E' => Go(S::ExpE),
            _ => Terminal(K::Float),
        },
        S::Mantissa => match b {
            b'0'..=b'9' => Go(S::MantissaDigits),
            _ => Error,
        },
        S::Digits => match b {
            b'0'..=b'9' => Go(S::Digits),
            b'e' | b'E' => Go(S::ExpE),
            b'.' => Go(S::Mantissa),
            _ => Terminal(K::Integer),
        },
        S::Sign => match b {
            b'0' => Go(S::Zero),
            b'1'..=b'9' => Go(S::Digits),
            _ => Error,
        },
        S::Keyword => match b {
            b'a'..=b'z' => Go(S::Keyword),
            _ => Terminal(K::Keyword),
        },
    }
}

/// One message out of the stream: a parsed JSON value, or the description of a JSON
/// error as QEMU words it (`JSON parse error, ...`).
pub(crate) type Message = Result<Value, String>;

/// Turns a byte stream into messages (QEMU's `JSONMessageParser`).
pub(crate) struct JsonStreamer {
    state: State,
    /// The token being lexed (wiped: it may be a passphrase).
    token: WipeBuf,
    /// Text of the message's complete tokens, back to back (wiped too).
    text: WipeBuf,
    tokens: Vec<Token>,
    braces: i64,
    brackets: i64,
}

impl Default for JsonStreamer {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonStreamer {
    /// A streamer at the start of a stream.
    pub(crate) fn new() -> Self {
        JsonStreamer {
            state: State::Start,
            token: WipeBuf::default(),
            text: WipeBuf::default(),
            tokens: Vec::new(),
            braces: 0,
            brackets: 0,
        }
    }

    /// Feeds `bytes`; appends each message they complete to `out`.
    pub(crate) fn feed(&mut self, bytes: &[u8], out: &mut Vec<Message>) {
        for &b in bytes {
            self.feed_byte(b, out);
        }
    }

    fn feed_byte(&mut self, b: u8, out: &mut Vec<Message>) {
        loop {
            match step(self.state, b) {
                Step::Go(next) => {
                    self.token.push(b);
                    self.state = next;
                    if self.text.len() + self.token.len() > MAX_MESSAGE_SIZE {
                        self.overflow("JSON token size limit exceeded", out);
                    }
                    return;
                }
                Step::Token(kind) => {
                    self.token.push(b);
                    self.complete_token(kind, out);
                    return;
                }
                Step::Terminal(kind) => {
                    self.complete_token(kind, out);
                    // The byte starts whatever comes next.
                }
                Step::Skip => return,
                Step::Resync => self.state = State::Start,
                Step::Error => {
                    self.token.push(b);
                    // QEMU's token is a C string: a NUL ends it.
                    let shown = match self.token.iter().position(|&c| c == 0) {
                        Some(nul) => &self.token[..nul],
                        None => &self.token[..],
                    };
                    let desc = format!(
                        "JSON parse error, stray '{}'",
                        String::from_utf8_lossy(shown)
                    );
                    out.push(Err(desc));
                    self.reset_message();
                    self.state = State::Recovery;
                    return;
                }
            }
        }
    }

    /// Reports a limit error, drops the message and skips the rest of it.
    fn overflow(&mut self, desc: &str, out: &mut Vec<Message>) {
        out.push(Err(desc.to_string()));
        self.reset_message();
        self.state = State::Overflow;
    }

    fn reset_message(&mut self) {
        self.token.clear();
        self.text.clear();
        self.tokens.clear();
        self.braces = 0;
        self.brackets = 0;
        // Give back the memory of a large message.
        if self.text.capacity() > 64 << 10 {
            self.text.shrink_to(4 << 10);
            self.tokens.shrink_to(256);
        }
        if self.token.capacity() > 64 << 10 {
            self.token.shrink_to(256);
        }
    }

    /// QEMU's `json_message_process_token()`.
    fn complete_token(&mut self, kind: TokenKind, out: &mut Vec<Message>) {
        self.state = State::Start;
        match kind {
            TokenKind::LCurly => self.braces += 1,
            TokenKind::RCurly => self.braces -= 1,
            TokenKind::LSquare => self.brackets += 1,
            TokenKind::RSquare => self.brackets -= 1,
            _ => {}
        }
        if self.text.len() + self.token.len() + 1 > MAX_MESSAGE_SIZE {
            return self.overflow("JSON token size limit exceeded", out);
        }
        if self.braces + self.brackets > MAX_NESTING {
            return self.overflow("JSON nesting depth limit exceeded", out);
        }
        let start = self.text.len();
        self.text.extend_from_slice(&self.token);
        self.token.clear();
        self.tokens.push(Token {
            kind,
            start,
            end: self.text.len(),
        });
        if (self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0 {
            return;
        }
        out.push(parser::parse(&self.text, &self.tokens));
        self.reset_message();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn messages(input: &[u8]) -> Vec<Message> {
        let mut s = JsonStreamer::new();
        let mut out = Vec::new();
        s.feed(input, &mut out);
        out
    }

    #[test]
    fn messages_split_on_balance_not_lines() {
        let out = messages(b"{\"a\":\n1}{\"b\":[2]} 3 \"x\" [] ");
        assert_eq!(
            out,
            vec![
                Ok(json!({"a": 1})),
                Ok(json!({"b": [2]})),
                Ok(json!(3)),
                Ok(json!("x")),
                Ok(json!([]))
            ]
        );
        // A number at the very end has no terminator yet.
        let mut s = JsonStreamer::new();
        let mut out = Vec::new();
        s.feed(b"12", &mut out);
        assert!(out.is_empty());
        s.feed(b"3\n", &mut out);
        assert_eq!(out, vec![Ok(json!(123))]);
    }

    #[test]
    fn byte_at_a_time_equals_all_at_once() {
        let input =
            br#"{"execute": "x", "arguments": {"a": [1, 2.5e3, -0, true, null, 'q']}} @ {"b":1}"#;
        let mut s = JsonStreamer::new();
        let mut out = Vec::new();
        for b in input.iter() {
            s.feed(std::slice::from_ref(b), &mut out);
        }
        assert_eq!(out, messages(input));
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn stray_bytes_and_recovery() {
        // The newline that ends "-\n" belongs to the error token, so recovery swallows
        // "1.\n" up to the next newline: QEMU 10.0.2 answers nothing for it either.
        let out = messages(b"{\"a\":@}\n01\n-\n1.\n1.\n\xff\n\x00\n");
        let want = [
            "JSON parse error, stray '@'",
            "JSON parse error, expecting value",
            "JSON parse error, stray '01'",
            "JSON parse error, stray '-\n'",
            "JSON parse error, stray '1.\n'",
            "JSON parse error, stray '\u{FFFD}'",
            "JSON parse error, stray ''",
        ];
        let got: Vec<String> = out.into_iter().map(|m| m.unwrap_err()).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn oversized_message_gives_one_error_and_resyncs_at_newline() {
        let mut input = b"{\"execute\": \"x\", \"id\": \"".to_vec();
        input.extend(vec![b'a'; 3 * MAX_MESSAGE_SIZE]);
        input.extend(b"\"}\n{\"ok\": 1}");
        let out = messages(&input);
        assert_eq!(
            out,
            vec![
                Err("JSON token size limit exceeded".to_string()),
                Ok(json!({"ok": 1}))
            ]
        );
        // Many small tokens count too.
        let mut input = b"[".to_vec();
        for _ in 0..MAX_MESSAGE_SIZE / 2 {
            input.extend(b"1,");
        }
        input.extend(b"1]\n[2]");
        let out = messages(&input);
        assert_eq!(
            out,
            vec![
                Err("JSON token size limit exceeded".to_string()),
                Ok(json!([2]))
            ]
        );
    }

    #[test]
    fn nesting_limit() {
        let depth = MAX_NESTING as usize;
        let ok = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let out = messages(ok.as_bytes());
        assert!(out[0].is_ok());
        let deep = format!("{}{}\n[1]", "[".repeat(depth + 1), "]".repeat(depth + 1));
        let out = messages(deep.as_bytes());
        assert_eq!(
            out,
            vec![
                Err("JSON nesting depth limit exceeded".to_string()),
                Ok(json!([1]))
            ]
        );
    }
}
