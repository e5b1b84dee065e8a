//! `cryptvm ctl`: a QMP client for scripts, for cryptvm's control socket and QEMU's alike.
//!
//! ```text
//! cryptvm ctl --socket PATH|tcp:HOST:PORT [--timeout SECS] [COMMAND [ARGUMENTS-JSON]]
//! ```
//!
//! It reads the greeting, negotiates, then either sends COMMAND and prints the reply, or
//! (with no COMMAND) sends each JSON request of its standard input in turn on the same
//! connection and prints each reply, one JSON line each, exactly as the server wrote it.
//! In that mode `{"wait-event": NAME, "timeout": SECS, "data": {...}}` waits for the
//! first event NAME (whose data contains the given members, if any) received since
//! negotiation and not yet printed, and prints it. Events are otherwise kept, not
//! printed. Exit status: 0; 1 when a reply was an error or a wait timed out; 2 on a
//! usage, connection or protocol error (one line on stderr).

use std::collections::VecDeque;
use std::io::{self, BufRead, Read, Write};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::qmp::{Address, Stream};

const USAGE: &str =
    "usage: cryptvm ctl --socket PATH|tcp:HOST:PORT [--timeout SECS] [COMMAND [ARGUMENTS-JSON]]
Sends COMMAND (with ARGUMENTS-JSON, an object) over QMP and prints the reply as one JSON
line; with no COMMAND, sends each JSON request read from stdin and prints each reply.
On stdin, {\"wait-event\": NAME, \"timeout\": SECS, \"data\": {...}} prints the first event
NAME (with those data members) received and not yet printed, waiting for it if need be.
--timeout bounds connecting and each reply (default 30 s).
Exit status: 0; 1 on an error reply or a wait that timed out; 2 on other errors.";

/// Default `--timeout`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest line accepted from the server.
const MAX_LINE: usize = 64 << 20;

/// Events kept for `wait-event` (the oldest are dropped past this).
const MAX_KEPT_EVENTS: usize = 10_000;

/// Why `ctl` stopped with exit status 2.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Bad command line.
    #[error("{0} (see cryptvm ctl --help)")]
    Usage(String),
    /// Bad request on standard input.
    #[error("stdin line {line}: {reason}")]
    Input {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// Could not connect.
    #[error("connecting to '{address}': {source}")]
    Connect {
        /// The address.
        address: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The connection failed or closed.
    #[error("'{address}': {what}")]
    Connection {
        /// The address.
        address: String,
        /// What happened.
        what: String,
    },
    /// The server does not speak QMP as expected.
    #[error("'{address}': {what}")]
    Protocol {
        /// The address.
        address: String,
        /// What was wrong.
        what: String,
    },
    /// Writing the output failed.
    #[error("writing the output: {0}")]
    Output(#[source] io::Error),
}

/// Entry point of `cryptvm ctl ARGS`; returns the exit status.
pub fn main(args: &[String]) -> u8 {
    let stdin = io::stdin();
    let stdout = io::stdout();
    run(
        args,
        &mut stdin.lock(),
        &mut stdout.lock(),
        &mut io::stderr(),
    )
}

/// `cryptvm ctl` with its standard streams given: returns the exit status.
pub fn run(
    args: &[String],
    input: &mut dyn BufRead,
    output: &mut dyn Write,
    errors: &mut dyn Write,
) -> u8 {
    let options = match Options::parse(args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            let _ = writeln!(output, "{USAGE}");
            return 0;
        }
        Err(e) => {
            let _ = writeln!(errors, "cryptvm ctl: {e}");
            return 2;
        }
    };
    match session(&options, input, output) {
        Ok(Outcome::Success) => 0,
        Ok(Outcome::ErrorReply) => 1,
        Ok(Outcome::WaitTimedOut(name)) => {
            let _ = writeln!(errors, "cryptvm ctl: timed out waiting for {name}");
            1
        }
        Err(e) => {
            let _ = writeln!(errors, "cryptvm ctl: {e}");
            2
        }
    }
}

/// The command line.
#[derive(Debug)]
struct Options {
    address: String,
    timeout: Duration,
    /// COMMAND and its arguments; `None`: requests from stdin.
    command: Option<(String, Map<String, Value>)>,
}

impl Options {
    /// Parses the arguments; `None` for `--help`.
    fn parse(args: &[String]) -> Result<Option<Options>, CtlError> {
        let usage = |m: String| CtlError::Usage(m);
        let mut address = None;
        let mut timeout = DEFAULT_TIMEOUT;
        let mut positional = Vec::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (key, inline) = match arg.split_once('=') {
                Some((k, v)) if k.starts_with("--") => (k, Some(v.to_string())),
                _ => (arg.as_str(), None),
            };
            let mut value = |name: &str| {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| usage(format!("{name} needs a value")))
            };
            match key {
                "-h" | "--help" => return Ok(None),
                "--socket" => address = Some(value("--socket")?),
                "--timeout" => {
                    let text = value("--timeout")?;
                    timeout = parse_seconds(&text)
                        .ok_or_else(|| usage(format!("invalid --timeout '{text}'")))?;
                }
                k if k.starts_with("--") => return Err(usage(format!("unknown option '{k}'"))),
                _ => positional.push(arg.clone()),
            }
        }
        let address = address.ok_or_else(|| usage("--socket PATH is required".into()))?;
        let command = match positional.as_slice() {
            [] => None,
            [name] => Some((name.clone(), Map::new())),
            [name, json] => match serde_json::from_str::<Value>(json) {
                Ok(Value::Object(args)) => Some((name.clone(), args)),
                Ok(_) => return Err(usage("ARGUMENTS-JSON must be a JSON object".into())),
                Err(e) => return Err(usage(format!("ARGUMENTS-JSON is not JSON: {e}"))),
            },
            [_, _, extra, ..] => return Err(usage(format!("unexpected argument '{extra}'"))),
        };
        Ok(Some(Options {
            address,
            timeout,
            command,
        }))
    }
}

/// A non-negative, finite number of seconds.
fn parse_seconds(text: &str) -> Option<Duration> {
    let secs: f64 = text.trim().parse().ok()?;
    (0.0..1e9)
        .contains(&secs)
        .then(|| Duration::from_secs_f64(secs))
}

/// How a session ended, short of a [`CtlError`].
enum Outcome {
    Success,
    /// At least one reply was an error.
    ErrorReply,
    /// A `wait-event` timed out (the event name).
    WaitTimedOut(String),
}

fn session(
    options: &Options,
    input: &mut dyn BufRead,
    output: &mut dyn Write,
) -> Result<Outcome, CtlError> {
    let mut conn = Connection::open(&options.address, options.timeout)?;
    conn.negotiate()?;
    let print = |output: &mut dyn Write, line: &str| {
        writeln!(output, "{line}")
            .and_then(|()| output.flush())
            .map_err(CtlError::Output)
    };
    if let Some((name, args)) = &options.command {
        let mut request = Map::new();
        request.insert("execute".into(), Value::String(name.clone()));
        if !args.is_empty() {
            request.insert("arguments".into(), Value::Object(args.clone()));
        }
        let reply = conn.request(&Value::Object(request).to_string(), name)?;
        print(output, &reply.raw)?;
        return Ok(if reply.is_error() {
            Outcome::ErrorReply
        } else {
            Outcome::Success
        });
    }
    let mut outcome = Outcome::Success;
    for (n, line) in input.lines().enumerate() {
        let line_no = n + 1;
        let line = line.map_err(|e| CtlError::Input {
            line: line_no,
            reason: e.to_string(),
        })?;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let bad = |reason: String| CtlError::Input {
            line: line_no,
            reason,
        };
        let request = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(bad("not a JSON object".into())),
            Err(e) => return Err(bad(format!("invalid JSON: {e}"))),
        };
        if request.contains_key("wait-event") {
            let wait = WaitEvent::parse(&request, options.timeout).map_err(bad)?;
            match conn.wait_event(&wait)? {
                Some(event) => print(output, &event.raw)?,
                None => return Ok(Outcome::WaitTimedOut(wait.name)),
            }
        } else {
            let what = request
                .get("execute")
                .and_then(Value::as_str)
                .unwrap_or("the request")
                .to_string();
            let reply = conn.request(text, &what)?;
            print(output, &reply.raw)?;
            if reply.is_error() {
                outcome = Outcome::ErrorReply;
            }
        }
    }
    Ok(outcome)
}

/// A `wait-event` pseudo-request.
#[derive(Debug)]
struct WaitEvent {
    name: String,
    timeout: Duration,
    /// Members the event's data must have.
    data: Map<String, Value>,
}

impl WaitEvent {
    fn parse(request: &Map<String, Value>, default_timeout: Duration) -> Result<Self, String> {
        let mut wait = WaitEvent {
            name: String::new(),
            timeout: default_timeout,
            data: Map::new(),
        };
        for (key, value) in request {
            match (key.as_str(), value) {
                ("wait-event", Value::String(name)) => wait.name = name.clone(),
                ("wait-event", _) => return Err("'wait-event' must be an event name".into()),
                ("timeout", Value::Number(n)) => {
                    wait.timeout = n
                        .as_f64()
                        .and_then(|s| parse_seconds(&s.to_string()))
                        .ok_or("'timeout' must be a number of seconds")?;
                }
                ("timeout", _) => return Err("'timeout' must be a number of seconds".into()),
                ("data", Value::Object(data)) => wait.data = data.clone(),
                ("data", _) => return Err("'data' must be an object".into()),
                (other, _) => return Err(format!("unexpected member '{other}' in wait-event")),
            }
        }
        Ok(wait)
    }

    fn matches(&self, message: &Message) -> bool {
        let value = &message.value;
        value.get("event").and_then(Value::as_str) == Some(self.name.as_str())
            && self
                .data
                .iter()
                .all(|(k, v)| value.get("data").and_then(|d| d.get(k)) == Some(v))
    }
}

/// A message from the server: its line as sent (without `\r\n`) and its value.
#[derive(Debug)]
struct Message {
    raw: String,
    value: Value,
}

impl Message {
    fn is_event(&self) -> bool {
        self.value.get("event").is_some()
    }

    fn is_error(&self) -> bool {
        self.value.get("error").is_some()
    }
}

/// An open QMP connection.
struct Connection {
    address: String,
    stream: Stream,
    timeout: Duration,
    pending: Vec<u8>,
    /// Events received and not printed.
    events: VecDeque<Message>,
}

impl Connection {
    /// Connects and reads the greeting.
    fn open(address: &str, timeout: Duration) -> Result<Connection, CtlError> {
        let parsed = Address::parse(address)
            .map_err(|reason| CtlError::Usage(format!("invalid --socket '{address}': {reason}")))?;
        let stream = parsed
            .connect(timeout)
            .map_err(|source| CtlError::Connect {
                address: address.to_string(),
                source,
            })?;
        let _ = stream.set_write_timeout(Some(timeout.max(Duration::from_millis(1))));
        let mut conn = Connection {
            address: address.to_string(),
            stream,
            timeout,
            pending: Vec::new(),
            events: VecDeque::new(),
        };
        let deadline = Instant::now() + timeout;
        let greeting = conn
            .read_message(deadline)?
            .ok_or_else(|| conn.connection_error("timed out waiting for the QMP greeting"))?;
        if greeting.value.get("QMP").is_none() {
            return Err(conn.protocol_error(format!("not a QMP greeting: {}", greeting.raw)));
        }
        Ok(conn)
    }

    fn connection_error(&self, what: impl Into<String>) -> CtlError {
        CtlError::Connection {
            address: self.address.clone(),
            what: what.into(),
        }
    }

    fn protocol_error(&self, what: impl Into<String>) -> CtlError {
        CtlError::Protocol {
            address: self.address.clone(),
            what: what.into(),
        }
    }

    /// Sends `qmp_capabilities`.
    fn negotiate(&mut self) -> Result<(), CtlError> {
        let reply = self.request(r#"{"execute": "qmp_capabilities"}"#, "qmp_capabilities")?;
        if reply.is_error() {
            return Err(self.protocol_error(format!("negotiation failed: {}", reply.raw)));
        }
        Ok(())
    }

    /// Sends one request (JSON text) and returns its reply; events that arrive in the
    /// meantime are kept. `what` names the request in errors.
    fn request(&mut self, text: &str, what: &str) -> Result<Message, CtlError> {
        let mut line = text.as_bytes().to_vec();
        line.push(b'\n');
        self.stream
            .write_all(&line)
            .map_err(|e| self.connection_error(format!("sending {what}: {e}")))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let Some(message) = self.read_message(deadline)? else {
                return Err(
                    self.connection_error(format!("timed out waiting for the reply to {what}"))
                );
            };
            if message.is_event() {
                self.keep_event(message);
            } else {
                return Ok(message);
            }
        }
    }

    fn keep_event(&mut self, event: Message) {
        if self.events.len() >= MAX_KEPT_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// The first kept or arriving event that `wait` matches; `None` on timeout.
    fn wait_event(&mut self, wait: &WaitEvent) -> Result<Option<Message>, CtlError> {
        if let Some(i) = self.events.iter().position(|e| wait.matches(e)) {
            return Ok(self.events.remove(i));
        }
        let deadline = Instant::now() + wait.timeout;
        while let Some(message) = self.read_message(deadline)? {
            if wait.matches(&message) {
                return Ok(Some(message));
            }
            if message.is_event() {
                self.keep_event(message);
            }
        }
        Ok(None)
    }

    /// The next message, or `None` at `deadline`. A closed connection is an error.
    fn read_message(&mut self, deadline: Instant) -> Result<Option<Message>, CtlError> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\r', '\n']);
                if text.trim().is_empty() {
                    continue;
                }
                let value: Value = serde_json::from_str(text).map_err(|e| {
                    self.protocol_error(format!("the server sent invalid JSON ({e}): {text}"))
                })?;
                return Ok(Some(Message {
                    raw: text.to_string(),
                    value,
                }));
            }
            if self.pending.len() > MAX_LINE {
                return Err(self.protocol_error("the server sent a line longer than 64 MiB"));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.stream
                .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))
                .map_err(|e| self.connection_error(e.to_string()))?;
            let mut buf = [0u8; 64 << 10];
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(self.connection_error("the server closed the connection")),
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.connection_error(e.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::qmp::testing::FakeBackend;
    use crate::qmp::{EventBus, QmpServer};

    struct Fixture {
        _dir: tempfile::TempDir,
        events: Arc<EventBus>,
        server: QmpServer,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let events = EventBus::new();
        let backend = Arc::new(FakeBackend::with_events(Arc::clone(&events)));
        let path = dir.path().join("q.sock");
        let server =
            QmpServer::start(path.to_str().unwrap(), backend, Arc::clone(&events)).unwrap();
        Fixture {
            _dir: dir,
            events,
            server,
        }
    }

    /// Runs ctl with `args` and `stdin`: (status, stdout, stderr).
    fn ctl(args: &[&str], stdin: &str) -> (u8, String, String) {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = run(&args, &mut stdin.as_bytes(), &mut out, &mut err);
        (
            status,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn one_command() {
        let f = fixture();
        let sock = f.server.local_address();
        let (status, out, err) = ctl(&["--socket", sock, "query-status"], "");
        assert_eq!(
            (status, out.as_str(), err.as_str()),
            (
                0,
                "{\"return\": {\"status\": \"running\", \"running\": true}}\n",
                ""
            )
        );
        let (status, out, _) = ctl(
            &[
                "--timeout=5",
                "device_del",
                r#"{"id": "nope"}"#,
                &format!("--socket={sock}"),
            ],
            "",
        );
        assert_eq!(status, 1);
        assert_eq!(
            out,
            "{\"error\": {\"class\": \"DeviceNotFound\", \"desc\": \"Device 'nope' not found\"}}\n"
        );
        let (status, out, _) = ctl(
            &[
                "--socket",
                sock,
                "query-named-block-nodes",
                r#"{"flat": true}"#,
            ],
            "",
        );
        assert_eq!(
            (status, out.as_str()),
            (0, "{\"return\": [{\"flat\": true}]}\n")
        );
    }

    #[test]
    fn usage_and_connection_errors_exit_2_with_one_line() {
        let f = fixture();
        let sock = f.server.local_address();
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (vec!["query-status"], "--socket PATH is required"),
            (vec!["--socket"], "--socket needs a value"),
            (
                vec!["--socket", sock, "--timeout", "soon"],
                "invalid --timeout 'soon'",
            ),
            (
                vec!["--socket", sock, "--bogus"],
                "unknown option '--bogus'",
            ),
            (
                vec!["--socket", sock, "device_del", "[1]"],
                "ARGUMENTS-JSON must be a JSON object",
            ),
            (
                vec!["--socket", sock, "device_del", "{"],
                "ARGUMENTS-JSON is not JSON",
            ),
            (
                vec!["--socket", sock, "a", "{}", "b"],
                "unexpected argument 'b'",
            ),
            (
                vec!["--socket", "/nonexistent/q.sock", "query-status"],
                "connecting to '/nonexistent/q.sock'",
            ),
            (
                vec!["--socket", "tcp:localhost:x", "query-status"],
                "invalid --socket",
            ),
        ];
        for (args, want) in cases {
            let (status, out, err) = ctl(&args, "");
            assert_eq!(status, 2, "{args:?}: {err}");
            assert!(out.is_empty(), "{args:?}: {out}");
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            assert!(
                err.starts_with("cryptvm ctl: ") && err.contains(want),
                "{args:?}: {err}"
            );
        }
        let (status, out, _) = ctl(&["--help"], "");
        assert_eq!(status, 0);
        assert!(out.starts_with("usage: cryptvm ctl"));
    }

    #[test]
    fn stdin_requests_on_one_connection_with_wait_event() {
        let f = fixture();
        let sock = f.server.local_address();
        let stdin = r#"
            {"execute": "device_add", "arguments": {"driver": "virtio-blk-pci", "drive": "n0", "id": "d0"}, "id": 1}
            {"execute": "device_del", "arguments": {"id": "d0"}}
            {"wait-event": "DEVICE_DELETED", "timeout": 10, "data": {"device": "d0"}}
            {"execute": "query-kvm"}
        "#;
        let (status, out, err) = ctl(&["--socket", sock], stdin);
        assert_eq!(status, 0, "{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert_eq!(lines[0], r#"{"return": {}, "id": 1}"#);
        assert_eq!(lines[1], r#"{"return": {}}"#);
        let event: Value = serde_json::from_str(lines[2]).unwrap();
        assert_eq!(event["event"], "DEVICE_DELETED");
        assert_eq!(event["data"]["device"], "d0");
        assert_eq!(
            lines[3],
            r#"{"return": {"enabled": true, "present": true}}"#
        );
    }

    #[test]
    fn wait_event_for_a_later_event_and_timeout() {
        let f = fixture();
        let sock = f.server.local_address().to_string();
        let events = Arc::clone(&f.events);
        let emitter = std::thread::spawn(move || {
            // Once the ctl client has negotiated, emit the event it waits for.
            let deadline = Instant::now() + Duration::from_secs(20);
            while events.subscribers() == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(200));
            events.emit("OTHER", json!({}));
            events.emit("POWERDOWN", Value::Null);
        });
        let (status, out, err) = ctl(
            &["--socket", &sock],
            "{\"wait-event\": \"POWERDOWN\", \"timeout\": 20}\n{\"wait-event\": \"OTHER\"}\n",
        );
        emitter.join().unwrap();
        assert_eq!(status, 0, "{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].ends_with(r#""event": "POWERDOWN"}"#), "{out}");
        assert!(
            lines[1].ends_with(r#""event": "OTHER", "data": {}}"#),
            "{out}"
        );

        let start = Instant::now();
        let (status, out, err) = ctl(
            &["--socket", &sock],
            "{\"execute\": \"query-kvm\"}\n{\"wait-event\": \"DEVICE_DELETED\", \"timeout\": 0.3}\n{\"execute\": \"query-kvm\"}\n",
        );
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(status, 1);
        assert_eq!(out.lines().count(), 1, "{out}");
        assert_eq!(err, "cryptvm ctl: timed out waiting for DEVICE_DELETED\n");
    }

    #[test]
    fn stdin_errors() {
        let f = fixture();
        let sock = f.server.local_address();
        // An error reply: printed, and the rest still runs; exit status 1.
        let (status, out, _) = ctl(
            &["--socket", sock],
            "{\"execute\": \"nope\"}\n{\"execute\": \"query-kvm\"}\n",
        );
        assert_eq!(status, 1);
        assert_eq!(out.lines().count(), 2, "{out}");
        for (input, want) in [
            ("not json\n", "stdin line 1: invalid JSON"),
            ("\n[1]\n", "stdin line 2: not a JSON object"),
            (
                "{\"wait-event\": 1}\n",
                "'wait-event' must be an event name",
            ),
            (
                "{\"wait-event\": \"X\", \"timeout\": \"1\"}\n",
                "'timeout' must be a number",
            ),
            (
                "{\"wait-event\": \"X\", \"when\": 1}\n",
                "unexpected member 'when'",
            ),
        ] {
            let (status, _, err) = ctl(&["--socket", sock], input);
            assert_eq!(status, 2, "{input}");
            assert!(err.contains(want), "{input}: {err}");
        }
        // quit's reply is printed like any other.
        let (status, out, err) = ctl(&["--socket", sock], "{\"execute\": \"quit\"}\n");
        assert_eq!(
            (status, out.as_str(), err.as_str()),
            (0, "{\"return\": {}}\n", "")
        );
    }

    #[test]
    fn reply_timeout() {
        let f = fixture();
        let sock = f.server.local_address();
        let (status, _, err) = ctl(
            &[
                "--socket",
                sock,
                "--timeout",
                "0.1",
                "device_add",
                r#"{"driver": "virtio-blk-pci", "drive": "n0", "id": "slow"}"#,
            ],
            "",
        );
        assert_eq!(status, 2);
        assert!(
            err.contains("timed out waiting for the reply to device_add"),
            "{err}"
        );
    }
}
