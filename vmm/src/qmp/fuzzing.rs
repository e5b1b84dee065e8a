//! Entry points for the fuzz targets in `fuzz/` (`qmp_lexer`, `qmp_parser`,
//! `qmp_dispatch`). The JSON streamer, the writer and the session are private to the
//! QMP server, and nothing public reaches them without a socket and its threads; these
//! wrappers call the very same code on the calling thread. Not part of the supported
//! API: hidden from the documentation and free to change.

use serde_json::Value;

use super::{lexer, protocol, writer, QmpBackend};

/// Longest message the streamer accepts before it reports an overflow (1 MiB).
pub const MAX_MESSAGE_SIZE: usize = lexer::MAX_MESSAGE_SIZE;

/// One message from the stream: a value, or the JSON error as the client reads it.
pub type Message = Result<Value, String>;

/// Feeds `chunks` one after the other (as reads from a socket arrive) to one new
/// streamer; returns every message they complete, in order.
pub fn stream(chunks: &[&[u8]]) -> Vec<Message> {
    let mut streamer = lexer::JsonStreamer::new();
    let mut out = Vec::new();
    for chunk in chunks {
        streamer.feed(chunk, &mut out);
    }
    out
}

/// `value` as the server writes it (QEMU's `qobject_to_json()`).
pub fn to_json(value: &Value) -> String {
    writer::to_json(value)
}

/// The greeting a client gets on connection.
pub fn greeting() -> Value {
    protocol::greeting()
}

/// One client's session, as the server runs it for each connection.
#[derive(Default)]
pub struct Session {
    inner: protocol::Session,
}

impl Session {
    /// A session awaiting `qmp_capabilities`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles one message as the server does: the reply, and whether it was a
    /// successful `quit` (after which the server would stop the VM).
    pub fn handle(&mut self, message: Message, backend: &dyn QmpBackend) -> (Value, bool) {
        let (reply, effect) = self.inner.handle(message, backend);
        (reply, effect == protocol::Effect::Quit)
    }
}
