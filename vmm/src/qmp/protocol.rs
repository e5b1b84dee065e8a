//! One client's QMP session: the greeting, capabilities negotiation, the checks QEMU
//! makes on a request (`qmp_dispatch()`), and the reply.

use serde_json::{json, Map, Value};

use super::commands;
use super::lexer::Message;
use super::writer::qdict_order;
use super::{ErrorClass, QmpBackend, QmpError};

/// The greeting sent on connection. cryptvm offers no capabilities (no `oob`).
pub(crate) fn greeting() -> Value {
    json!({"QMP": {"version": commands::version(), "capabilities": []}})
}

/// What the server must do after sending a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Nothing.
    None,
    /// Negotiation completed: start sending events.
    Negotiated,
    /// `quit` succeeded: run [`Action::Quit`] once the reply is sent.
    Quit,
}

/// A session's state.
#[derive(Debug, Default)]
pub(crate) struct Session {
    negotiated: bool,
}

impl Session {
    /// A session awaiting `qmp_capabilities`.
    pub(crate) fn new() -> Self {
        Session::default()
    }

    /// Handles one message from the client; returns the reply and what to do next.
    pub(crate) fn handle(&mut self, message: Message, backend: &dyn QmpBackend) -> (Value, Effect) {
        let mut wipe = Vec::new();
        let answer = self.answer(message, backend, &mut wipe);
        // The request and its arguments may hold a passphrase (`object-add`).
        wipe.into_iter().for_each(block::secret::wipe_json);
        answer
    }

    /// [`Session::handle`]; what `wipe` gets is zeroized once the reply is made.
    fn answer(
        &mut self,
        message: Message,
        backend: &dyn QmpBackend,
        wipe: &mut Vec<Value>,
    ) -> (Value, Effect) {
        let request = match message {
            Ok(v) => v,
            Err(desc) => return (reply(None, Err(QmpError::generic(desc))), Effect::None),
        };
        let request = match request {
            Value::Object(request) => request,
            other => {
                wipe.push(other);
                let e = QmpError::generic("QMP input must be a JSON object");
                return (reply(None, Err(e)), Effect::None);
            }
        };
        let id = request.get("id").cloned();
        let (name, args) = match check_request(&request) {
            Ok(r) => r,
            Err(e) => {
                wipe.push(Value::Object(request));
                return (reply(id, Err(e)), Effect::None);
            }
        };
        let mut effect = Effect::None;
        let result = if !self.negotiated {
            let r = if name == "qmp_capabilities" {
                commands::qmp_capabilities(&args, false)
            } else {
                Err(QmpError::command_not_found(""))
            };
            match r {
                Ok(v) => {
                    self.negotiated = true;
                    effect = Effect::Negotiated;
                    Ok(v)
                }
                // QEMU rewrites every CommandNotFound before negotiation.
                Err(e) if e.class == ErrorClass::CommandNotFound => {
                    Err(QmpError::command_not_found(
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                    ))
                }
                Err(e) => Err(e),
            }
        } else {
            match commands::execute(name, &args, backend) {
                Some(r) => {
                    if r.is_ok() && name == "quit" {
                        effect = Effect::Quit;
                    }
                    r
                }
                None => Err(QmpError::command_not_found(format!(
                    "The command {name} has not been found"
                ))),
            }
        };
        wipe.push(Value::Object(args));
        wipe.push(Value::Object(request));
        (reply(id, result), effect)
    }
}

/// QEMU's checks of the request object, member by member in QDict order: returns the
/// command name and its arguments (empty when absent).
fn check_request(request: &Map<String, Value>) -> Result<(&str, Map<String, Value>), QmpError> {
    let mut name = None;
    for (key, value) in qdict_order(request) {
        match key.as_str() {
            "execute" => match value {
                Value::String(s) => name = Some(s.as_str()),
                _ => {
                    return Err(QmpError::generic(
                        "QMP input member 'execute' must be a string",
                    ))
                }
            },
            "arguments" => {
                if !value.is_object() {
                    return Err(QmpError::generic(
                        "QMP input member 'arguments' must be an object",
                    ));
                }
            }
            "id" => {}
            other => {
                return Err(QmpError::generic(format!(
                    "QMP input member '{other}' is unexpected"
                )))
            }
        }
    }
    let name = name.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))?;
    let args = match request.get("arguments") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    Ok((name, args))
}

/// `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`, with `id` if any.
pub(crate) fn reply(id: Option<Value>, result: Result<Value, QmpError>) -> Value {
    let mut m = Map::new();
    match result {
        Ok(v) => {
            m.insert("return".into(), v);
        }
        Err(e) => {
            m.insert(
                "error".into(),
                json!({"class": e.class.as_str(), "desc": e.desc}),
            );
        }
    }
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::super::lexer::JsonStreamer;
    use super::super::testing::FakeBackend;
    use super::super::writer::to_json;
    use super::*;

    /// Feeds `input` through a session; returns the replies as QEMU would print them.
    fn session_replies(session: &mut Session, input: &str) -> Vec<String> {
        let backend = FakeBackend::default();
        let mut streamer = JsonStreamer::new();
        let mut messages = Vec::new();
        streamer.feed(input.as_bytes(), &mut messages);
        messages
            .into_iter()
            .map(|m| to_json(&session.handle(m, &backend).0))
            .collect()
    }

    #[test]
    fn greeting_shape() {
        let text = to_json(&greeting());
        let want = format!(
            r#"{{"QMP": {{"version": {{"qemu": {{"micro": 0, "minor": 0, "major": 10}}, "package": "cryptvm {}"}}, "capabilities": []}}}}"#,
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(text, want);
    }

    #[test]
    fn replies_byte_for_byte_as_qemu() {
        // Each pair was measured against QEMU 10.0.2 (`-machine none`, QMP on a socket).
        let mut s = Session::new();
        let before = [
            (
                r#"{"execute":"query-status"}"#,
                r#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#,
            ),
            (
                r#"{"execute":"foo","id":1}"#,
                r#"{"id": 1, "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#,
            ),
            (
                r#"{"execute":"query-status","arguments":[1]}"#,
                r#"{"error": {"class": "GenericError", "desc": "QMP input member 'arguments' must be an object"}}"#,
            ),
            (
                r#"{"execute":"qmp_capabilities","arguments":{"foo":1}}"#,
                r#"{"error": {"class": "GenericError", "desc": "Parameter 'foo' is unexpected"}}"#,
            ),
            (
                r#"{"execute":"qmp_capabilities","id":2}"#,
                r#"{"return": {}, "id": 2}"#,
            ),
        ];
        for (input, want) in before {
            assert_eq!(session_replies(&mut s, input), [want], "{input}");
        }
        assert!(s.negotiated);
        let after = [
            (
                r#"{"execute":"qmp_capabilities","id":2}"#,
                r#"{"id": 2, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#,
            ),
            (
                r#"{"execute":"foo","id":{"a":[1]}}"#,
                r#"{"id": {"a": [1]}, "error": {"class": "CommandNotFound", "desc": "The command foo has not been found"}}"#,
            ),
            (
                "}",
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
            ),
            (
                "garbage\n",
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'garbage'"}}"#,
            ),
            (
                "[1,2]",
                r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
            ),
            (
                r#""str""#,
                r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
            ),
            (
                "{}",
                r#"{"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#,
            ),
            (
                r#"{"execute":1}"#,
                r#"{"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#,
            ),
            (
                r#"{"id":5}"#,
                r#"{"id": 5, "error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}}"#,
            ),
            (
                r#"{"execute":"query-status","bogus":1}"#,
                r#"{"error": {"class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}}"#,
            ),
            (
                r#"{"execute":"query-status","id":"x","control":{}}"#,
                r#"{"id": "x", "error": {"class": "GenericError", "desc": "QMP input member 'control' is unexpected"}}"#,
            ),
            (
                r#"{"exec-oob":"query-status"}"#,
                r#"{"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#,
            ),
            (
                r#"{"execute":"query-status","arguments":{"x":1}}"#,
                r#"{"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}"#,
            ),
            (
                r#"{"execute":"device_del"}"#,
                r#"{"error": {"class": "GenericError", "desc": "Parameter 'id' is missing"}}"#,
            ),
            (
                r#"{"execute":"device_del","arguments":{"id":1}}"#,
                r#"{"error": {"class": "GenericError", "desc": "Invalid parameter type for 'id', expected: string"}}"#,
            ),
            (
                r#"{"execute":"object-del","arguments":{"id":null}}"#,
                r#"{"error": {"class": "GenericError", "desc": "Invalid parameter type for 'id', expected: string"}}"#,
            ),
            (
                r#"{"execute":"blockdev-del","arguments":{}}"#,
                r#"{"error": {"class": "GenericError", "desc": "Parameter 'node-name' is missing"}}"#,
            ),
            (
                r#"{"execute":"device_del","arguments":{"id":"x","y":2}}"#,
                r#"{"error": {"class": "GenericError", "desc": "Parameter 'y' is unexpected"}}"#,
            ),
            (
                r#"{"execute":"device_del","arguments":{"y":1}}"#,
                r#"{"error": {"class": "GenericError", "desc": "Parameter 'id' is missing"}}"#,
            ),
            (
                r#"{"execute":"query-named-block-nodes","arguments":{"flat":"x"}}"#,
                r#"{"error": {"class": "GenericError", "desc": "Invalid parameter type for 'flat', expected: boolean"}}"#,
            ),
            (
                r#"{"execute":"query-kvm", "id": 1.5e3}"#,
                r#"{"return": {"enabled": true, "present": true}, "id": 1500}"#,
            ),
            (
                r#"{"execute":"query-kvm", "id": "\u00e9\ud83d\ude00"}"#,
                r#"{"return": {"enabled": true, "present": true}, "id": "\u00E9\uD83D\uDE00"}"#,
            ),
            (
                r#"{"execute":"query-status"}"#,
                r#"{"return": {"status": "running", "running": true}}"#,
            ),
        ];
        for (input, want) in after {
            assert_eq!(session_replies(&mut s, input), [want], "{input}");
        }
        assert_eq!(
            session_replies(&mut s, r#"{"a":@}"#),
            [
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}}"#,
                r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
            ]
        );
    }

    #[test]
    fn backend_errors_and_results_pass_through() {
        let backend = FakeBackend::default();
        let mut s = Session::new();
        let mut run = |req: Value| to_json(&s.handle(Ok(req), &backend).0);
        run(json!({"execute": "qmp_capabilities"}));
        assert_eq!(
            run(json!({"execute": "device_del", "arguments": {"id": "nope"}})),
            r#"{"error": {"class": "DeviceNotFound", "desc": "Device 'nope' not found"}}"#
        );
        assert_eq!(
            run(
                json!({"execute": "device_add", "arguments": {"driver": "virtio-blk-pci", "drive": "n0", "id": "d0"}})
            ),
            r#"{"return": {}}"#
        );
        assert_eq!(
            run(json!({"execute": "device_del", "arguments": {"id": "d0"}})),
            r#"{"return": {}}"#
        );
        assert_eq!(
            run(json!({"execute": "query-named-block-nodes", "arguments": {"flat": true}})),
            r#"{"return": [{"flat": true}]}"#
        );
        assert_eq!(
            run(json!({"execute": "system_powerdown", "arguments": {}})),
            r#"{"return": {}}"#
        );
        let (reply, effect) = s.handle(Ok(json!({"execute": "quit"})), &backend);
        assert_eq!(to_json(&reply), r#"{"return": {}}"#);
        assert_eq!(effect, Effect::Quit);
        assert_eq!(
            backend.quits(),
            0,
            "the server calls quit() after the reply"
        );
        let (reply, _) = s.handle(Ok(json!({"execute": "query-commands"})), &backend);
        let names: Vec<&str> = reply["return"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, commands::COMMANDS);
    }
}
