//! The server over real sockets, with a fake backend.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::testing::FakeBackend;
use super::transport::{Address, Stream};
use super::{EventBus, QmpServer, QmpServerError};

const TIMEOUT: Duration = Duration::from_secs(20);

/// A raw QMP client that reads `\r\n`-terminated lines.
struct Client {
    stream: Stream,
    pending: Vec<u8>,
}

impl Client {
    fn connect(address: &str) -> Client {
        let stream = Address::parse(address)
            .unwrap()
            .connect(TIMEOUT)
            .unwrap_or_else(|e| panic!("connecting to {address}: {e}"));
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Client {
            stream,
            pending: Vec::new(),
        }
    }

    /// Connects and reads the greeting.
    fn greeted(address: &str) -> Client {
        let mut c = Client::connect(address);
        let greeting = c.line();
        assert!(
            greeting.starts_with(r#"{"QMP": {"version": {"qemu": "#),
            "{greeting}"
        );
        c
    }

    /// Connects, reads the greeting and negotiates.
    fn negotiated(address: &str) -> Client {
        let mut c = Client::greeted(address);
        assert_eq!(
            c.cmd(r#"{"execute": "qmp_capabilities"}"#),
            r#"{"return": {}}"#
        );
        c
    }

    fn send(&mut self, text: &str) {
        self.stream.write_all(text.as_bytes()).unwrap();
    }

    /// The next line, without its `\r\n` (which must be there).
    fn line(&mut self) -> String {
        self.try_line()
            .unwrap_or_else(|| panic!("connection closed; got {:?}", self.pending))
    }

    /// The next line, or `None` at end of stream.
    fn try_line(&mut self) -> Option<String> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(end) = self.pending.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.pending.drain(..end + 2).collect();
                return Some(String::from_utf8(line[..end].to_vec()).unwrap());
            }
            assert!(Instant::now() < deadline, "no reply within {TIMEOUT:?}");
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// Sends a request and returns the next line.
    fn cmd(&mut self, request: &str) -> String {
        self.send(request);
        self.line()
    }

    /// Whether the connection is closed (a read returns end of stream at once).
    fn try_line_now(&mut self) -> bool {
        self.stream
            .set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let mut buf = [0u8; 64];
        let closed = matches!(self.stream.read(&mut buf), Ok(0));
        self.stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        closed
    }

    /// Whether a line arrives within `wait`.
    fn quiet_for(&mut self, wait: Duration) -> bool {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 4096];
        let quiet = match self.stream.read(&mut buf) {
            Ok(n) => {
                self.pending.extend_from_slice(&buf[..n]);
                n == 0
            }
            Err(_) => true,
        };
        self.stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        quiet && self.pending.is_empty()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    backend: Arc<FakeBackend>,
    events: Arc<EventBus>,
    server: QmpServer,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let events = EventBus::new();
        let backend = Arc::new(FakeBackend::with_events(Arc::clone(&events)));
        let server =
            QmpServer::start(path.to_str().unwrap(), backend.clone(), Arc::clone(&events)).unwrap();
        Fixture {
            _dir: dir,
            path,
            backend,
            events,
            server,
        }
    }

    fn address(&self) -> &str {
        self.server.local_address()
    }
}

fn error_of(line: &str) -> (String, String) {
    let v: Value = serde_json::from_str(line).unwrap();
    (
        v["error"]["class"].as_str().unwrap_or("").to_string(),
        v["error"]["desc"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn greeting_negotiation_and_id_echo() {
    let f = Fixture::new();
    let mut c = Client::connect(f.address());
    let greeting: Value = serde_json::from_str(&c.line()).unwrap();
    assert_eq!(greeting["QMP"]["capabilities"], json!([]));
    assert_eq!(greeting["QMP"]["version"]["qemu"]["major"], 10);
    assert!(greeting["QMP"]["version"]["package"]
        .as_str()
        .unwrap()
        .starts_with("cryptvm "));
    assert_eq!(
        c.cmd(r#"{"execute":"query-status","id":"a"}"#),
        r#"{"id": "a", "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#
    );
    assert_eq!(
        c.cmd(r#"{"execute":"qmp_capabilities","arguments":{"enable":[]},"id":[1,{"x":null}]}"#),
        r#"{"return": {}, "id": [1, {"x": null}]}"#
    );
    assert_eq!(
        c.cmd(r#"{"execute":"query-status","id":7}"#),
        r#"{"return": {"status": "running", "running": true}, "id": 7}"#
    );
    assert_eq!(
        c.cmd(r#"{"execute":"query-kvm","id":true}"#),
        r#"{"return": {"enabled": true, "present": true}, "id": true}"#
    );
    let version: Value = serde_json::from_str(&c.cmd(r#"{"execute":"query-version"}"#)).unwrap();
    assert_eq!(version["return"], greeting["QMP"]["version"]);
}

#[test]
fn requests_without_newlines_or_split_anywhere() {
    // qemu.qmp sends requests with no terminator; others split them arbitrarily.
    let f = Fixture::new();
    let mut c = Client::greeted(f.address());
    c.send(r#"{"execute":"qmp_capabilities"}"#);
    assert_eq!(c.line(), r#"{"return": {}}"#);
    c.send(r#"{"execute":"query-kvm","id":1}{"execute":"query-kvm","id":2}"#);
    assert!(c.line().ends_with(r#""id": 1}"#));
    assert!(c.line().ends_with(r#""id": 2}"#));
    for b in br#"{"execute": "query-status", "id": 3}"#.iter() {
        c.send(std::str::from_utf8(std::slice::from_ref(b)).unwrap());
    }
    assert!(c.line().ends_with(r#""id": 3}"#));
}

#[test]
fn every_error_class() {
    let f = Fixture::new();
    let mut c = Client::negotiated(f.address());
    assert_eq!(
        error_of(&c.cmd(r#"{"execute":"device_del","arguments":{"id":1}}"#)),
        (
            "GenericError".into(),
            "Invalid parameter type for 'id', expected: string".into()
        )
    );
    assert_eq!(
        error_of(&c.cmd(r#"{"execute":"foo"}"#)),
        (
            "CommandNotFound".into(),
            "The command foo has not been found".into()
        )
    );
    assert_eq!(
        error_of(&c.cmd(r#"{"execute":"device_del","arguments":{"id":"nope"}}"#)),
        ("DeviceNotFound".into(), "Device 'nope' not found".into())
    );
    for class in ["DeviceNotActive", "KVMMissingCap", "GenericError"] {
        let req = json!({"execute": "object-add",
            "arguments": {"qom-type": "fail", "class": class, "desc": "d"}});
        assert_eq!(
            error_of(&c.cmd(&req.to_string())),
            (class.to_string(), "d".into())
        );
    }
}

#[test]
fn malformed_input_gets_errors_and_the_session_goes_on() {
    let f = Fixture::new();
    let mut c = Client::negotiated(f.address());
    let cases = [
        ("garbage\n", "JSON parse error, invalid keyword 'garbage'"),
        ("{\"execute\":\n}\n", "JSON parse error, expecting value"),
        ("[1,2]\n", "QMP input must be a JSON object"),
        ("42\n", "QMP input must be a JSON object"),
        ("{}\n", "QMP input lacks member 'execute'"),
        (
            "{\"execute\":[]}\n",
            "QMP input member 'execute' must be a string",
        ),
        (
            "{\"execute\":\"query-kvm\",\"extra\":1}\n",
            "QMP input member 'extra' is unexpected",
        ),
        (
            "{\"execute\":\"query-kvm\",\"arguments\":\"x\"}\n",
            "QMP input member 'arguments' must be an object",
        ),
        ("\u{1}\n", "JSON parse error, stray '\u{1}'"),
        ("{\"a\":1,\"a\":2}\n", "JSON parse error, duplicate key"),
    ];
    for (input, desc) in cases {
        assert_eq!(
            error_of(&c.cmd(input)),
            ("GenericError".into(), desc.into()),
            "{input:?}"
        );
    }
    // Invalid UTF-8 and an 0xFF resynchronisation byte.
    c.send("{\"execute\":\"qmp_capabilities\",\"id\":\"");
    c.stream.write_all(b"\xc3(\"}\n").unwrap();
    assert_eq!(
        error_of(&c.line()).1,
        "JSON parse error, invalid UTF-8 sequence in string"
    );
    c.stream.write_all(b"{\"execute\": \xff").unwrap();
    assert_eq!(error_of(&c.line()).1, "JSON parse error, stray '\u{FFFD}'");
    assert_eq!(
        c.cmd(r#"{"execute":"query-status"}"#),
        r#"{"return": {"status": "running", "running": true}}"#
    );
}

#[test]
fn ten_mib_line_is_refused_and_the_connection_stays_usable() {
    let f = Fixture::new();
    let mut c = Client::negotiated(f.address());
    let mut big = br#"{"execute":"query-status","id":""#.to_vec();
    big.extend(vec![b'x'; 10 << 20]);
    big.extend(b"\"}\n");
    let mut writer = c.stream.try_clone().unwrap();
    let t = std::thread::spawn(move || writer.write_all(&big).unwrap());
    assert_eq!(
        error_of(&c.line()),
        (
            "GenericError".into(),
            "JSON token size limit exceeded".into()
        )
    );
    t.join().unwrap();
    assert_eq!(
        c.cmd(r#"{"execute":"query-status","id":2}"#),
        r#"{"return": {"status": "running", "running": true}, "id": 2}"#
    );
    // Deep nesting is refused the same way.
    let deep = format!("{}{}\n", "[".repeat(5000), "]".repeat(5000));
    assert_eq!(
        error_of(&c.cmd(&deep)).1,
        "JSON nesting depth limit exceeded"
    );
    assert!(c
        .cmd(r#"{"execute":"query-kvm"}"#)
        .starts_with(r#"{"return""#));
}

#[test]
fn fifty_clients_at_once() {
    let f = Fixture::new();
    let address = f.address().to_string();
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let address = address.clone();
            std::thread::spawn(move || {
                let mut c = Client::negotiated(&address);
                for j in 0..20 {
                    let id = format!("{i}-{j}");
                    let reply = c.cmd(&json!({"execute": "query-status", "id": id}).to_string());
                    assert_eq!(
                        reply,
                        format!(r#"{{"return": {{"status": "running", "running": true}}, "id": "{id}"}}"#)
                    );
                }
                c
            })
        })
        .collect();
    // Hold every connection open until all have finished.
    let clients: Vec<Client> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(clients.len(), 50);
    assert_eq!(f.events.subscribers(), 50);
}

#[test]
fn client_that_disconnects_mid_command_does_not_affect_others() {
    let f = Fixture::new();
    let mut other = Client::negotiated(f.address());
    {
        let mut gone = Client::negotiated(f.address());
        gone.send(r#"{"execute":"device_add","arguments":{"driver":"virtio-blk-pci","drive":"n0","id":"slow0"}}"#);
        gone.send(r#"{"execute":"device_add","arguments":{"driver":"virtio-blk-pci","drive":"n0","id":"slow1"}}"#);
        // Dropped here, while the first command runs.
    }
    assert_eq!(
        other.cmd(r#"{"execute":"query-kvm"}"#),
        r#"{"return": {"enabled": true, "present": true}}"#
    );
    // The command still completed; new clients are served.
    let deadline = Instant::now() + TIMEOUT;
    while !f
        .backend
        .calls
        .lock()
        .unwrap()
        .iter()
        .any(|c| c == "device_add")
    {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut late = Client::negotiated(f.address());
    assert!(late
        .cmd(r#"{"execute":"query-status"}"#)
        .contains("running"));
    assert!(other
        .cmd(r#"{"execute":"query-pci"}"#)
        .starts_with(r#"{"return""#));
    // A client that half-closes after sending still gets its reply.
    let mut half = Client::negotiated(f.address());
    half.send(r#"{"execute":"query-kvm","id":9}"#);
    if let Stream::Unix(s) = &half.stream {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    assert!(half.line().ends_with(r#""id": 9}"#));
}

#[test]
fn a_backend_panic_is_an_error_reply() {
    let f = Fixture::new();
    let mut c = Client::negotiated(f.address());
    let (class, desc) =
        error_of(&c.cmd(r#"{"execute":"device_add","arguments":{"driver":"virtio-blk-pci","drive":"n0","id":"panic"}}"#));
    assert_eq!(class, "GenericError");
    assert!(desc.contains("internal error"), "{desc}");
    assert!(c
        .cmd(r#"{"execute":"query-kvm"}"#)
        .starts_with(r#"{"return""#));
}

#[test]
fn events_only_after_negotiation_and_to_all_clients() {
    let f = Fixture::new();
    let mut a = Client::negotiated(f.address());
    let mut b = Client::negotiated(f.address());
    let mut pending = Client::greeted(f.address());
    f.events.emit("STOP", Value::Null);
    for c in [&mut a, &mut b] {
        let line = c.line();
        assert!(
            line.starts_with(r#"{"timestamp": {"seconds": "#)
                && line.ends_with(r#"}, "event": "STOP"}"#),
            "{line}"
        );
    }
    assert!(
        pending.quiet_for(Duration::from_millis(300)),
        "event before negotiation"
    );
    assert_eq!(
        pending.cmd(r#"{"execute":"qmp_capabilities"}"#),
        r#"{"return": {}}"#
    );
    // device_del's DEVICE_DELETED (emitted by the backend) reaches everyone.
    assert_eq!(
        a.cmd(r#"{"execute":"device_add","arguments":{"driver":"virtio-blk-pci","drive":"n0","id":"d0"}}"#),
        r#"{"return": {}}"#
    );
    a.send(r#"{"execute":"device_del","arguments":{"id":"d0"},"id":"del"}"#);
    let (first, second) = (a.line(), a.line());
    // The event and the reply, in either order.
    let (reply, event) = if first.starts_with(r#"{"return""#) {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(reply, r#"{"return": {}, "id": "del"}"#);
    for line in [event, b.line(), pending.line()] {
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "DEVICE_DELETED", "{line}");
        assert_eq!(
            v["data"],
            json!({"device": "d0", "path": "/machine/peripheral/d0"})
        );
        assert!(v["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    }
}

#[test]
fn a_client_that_never_reads_is_dropped_not_waited_for() {
    let f = Fixture::new();
    let _stuck = Client::negotiated(f.address());
    let mut reader = Client::negotiated(f.address());
    let start = Instant::now();
    for i in 0..20_000 {
        f.events.emit("TEST", json!({ "i": i }));
        // Keep the reading client's queue drained.
        if i % 500 == 499 {
            for _ in 0..500 {
                reader.line();
            }
        }
    }
    assert!(start.elapsed() < Duration::from_secs(10), "emit blocked");
    assert_eq!(
        f.events.subscribers(),
        1,
        "the stuck client is disconnected"
    );
    assert!(reader
        .cmd(r#"{"execute":"query-kvm"}"#)
        .starts_with(r#"{"return""#));
}

#[test]
fn quit_replies_then_stops_the_vm() {
    let f = Fixture::new();
    let mut c = Client::negotiated(f.address());
    assert_eq!(
        c.cmd(r#"{"execute":"quit","id":1}"#),
        r#"{"return": {}, "id": 1}"#
    );
    let deadline = Instant::now() + TIMEOUT;
    while f.backend.quits() == 0 {
        assert!(Instant::now() < deadline, "quit() not called");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn socket_is_0600_and_stop_disconnects_and_removes_it() {
    let f = Fixture::new();
    assert!(std::fs::symlink_metadata(&f.path)
        .unwrap()
        .file_type()
        .is_socket());
    assert_eq!(mode(&f.path), 0o600);
    // No private folder is left behind.
    let entries: Vec<_> = std::fs::read_dir(f.path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("qmp.sock")]);
    let mut c = Client::negotiated(f.address());
    let Fixture { server, path, .. } = f;
    server.stop();
    assert_eq!(c.try_line(), None, "client still connected after stop");
    assert!(!path.exists(), "socket file left behind");
    assert!(UnixStream::connect(&path).is_err());
}

#[test]
fn stale_socket_replaced_live_socket_and_other_files_refused() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::default());
    let start = |p: &Path| QmpServer::start(p.to_str().unwrap(), backend.clone(), EventBus::new());

    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let server = start(&stale).unwrap();
    Client::negotiated(server.local_address());
    assert_eq!(mode(&stale), 0o600);

    match start(&stale) {
        Err(e @ QmpServerError::InUse(_)) => assert!(e.to_string().contains("in use"), "{e}"),
        other => panic!("expected InUse, got {other:?}"),
    }
    drop(server);

    let file = dir.path().join("file");
    std::fs::write(&file, b"precious").unwrap();
    match start(&file) {
        Err(e @ QmpServerError::NotASocket(_)) => {
            assert!(e.to_string().contains("not a socket"), "{e}")
        }
        other => panic!("expected NotASocket, got {other:?}"),
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");

    let missing = dir.path().join("no/such/dir/q.sock");
    let e = start(&missing).unwrap_err();
    assert!(matches!(e, QmpServerError::Listen { .. }), "{e:?}");
    let e = start(Path::new("tcp:localhost:port")).unwrap_err();
    assert!(matches!(e, QmpServerError::InvalidAddress { .. }), "{e:?}");
}

#[test]
fn tcp_listener() {
    let events = EventBus::new();
    let server = QmpServer::start(
        "tcp:127.0.0.1:0",
        Arc::new(FakeBackend::default()),
        Arc::clone(&events),
    )
    .unwrap();
    let address = server.local_address().to_string();
    assert!(address.starts_with("tcp:127.0.0.1:"), "{address}");
    let mut c = Client::negotiated(&address);
    assert!(c.cmd(r#"{"execute":"query-status"}"#).contains("running"));
    events.emit("POWERDOWN", Value::Null);
    assert!(c.line().ends_with(r#""event": "POWERDOWN"}"#));
    drop(server);
    assert_eq!(c.try_line(), None);
}

/// Issue 12: `tcp::PORT` (every interface, unauthenticated) is refused; the host
/// must be named.
#[test]
fn tcp_without_a_host_is_refused() {
    let e =
        QmpServer::start("tcp::0", Arc::new(FakeBackend::default()), EventBus::new()).unwrap_err();
    match &e {
        QmpServerError::InvalidAddress { reason, .. } => {
            assert!(reason.contains("no host"), "{reason}");
            assert!(reason.contains("tcp:127.0.0.1:0"), "{reason}");
        }
        other => panic!("expected InvalidAddress, got {other:?}"),
    }
}

/// Issue 12: a client that connects and never negotiates is disconnected after
/// NEGOTIATION_TIMEOUT (before, 128 of them locked everyone out for good); one
/// that negotiated stays, however long it waits for events.
#[test]
fn clients_that_never_negotiate_time_out() {
    let f = Fixture::new();
    let mut negotiated = Client::negotiated(f.address());
    let start = Instant::now();
    let mut idle = Client::greeted(f.address());
    let mut trickle = Client::greeted(f.address());
    // A byte every second keeps no client alive past the deadline.
    let mut closed_at = None;
    while start.elapsed() < super::server::NEGOTIATION_TIMEOUT + Duration::from_secs(8) {
        let _ = trickle.stream.write_all(b" ");
        if idle.try_line_now() {
            closed_at = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let closed_at = closed_at.expect("the idle client is still connected");
    assert!(
        closed_at >= super::server::NEGOTIATION_TIMEOUT - Duration::from_secs(1),
        "closed too early: {closed_at:?}"
    );
    assert_eq!(
        trickle.try_line(),
        None,
        "the trickling client is disconnected too"
    );
    assert!(negotiated
        .cmd(r#"{"execute":"query-status"}"#)
        .contains("running"));
}

#[test]
fn a_flood_of_io_errors_reaches_clients_once_per_second_per_node() {
    let f = Fixture::new();
    let mut c = Client::negotiated(f.address());
    let error = |node: &str, n: u32| {
        json!({"device": "", "node-name": node, "operation": "write",
                           "action": "report", "nospace": false, "reason": format!("r{n}")})
    };
    let start = Instant::now();
    for n in 0..10_000 {
        f.events.emit("BLOCK_IO_ERROR", error("a", n));
    }
    f.events.emit("BLOCK_IO_ERROR", error("b", 0));
    f.events.emit("DEVICE_DELETED", json!({"device": "d0"}));
    // At once: the first of each node, and the unthrottled event.
    let first: Vec<String> = (0..3).map(|_| c.line()).collect();
    assert!(
        first[0].contains(r#""node-name": "a""#) && first[0].contains("\"r0\""),
        "{first:?}"
    );
    assert!(first[1].contains(r#""node-name": "b""#), "{first:?}");
    assert!(first[2].contains("DEVICE_DELETED"), "{first:?}");
    // A second later: the newest of the rest, and nothing else.
    let last = c.line();
    let waited = start.elapsed();
    assert!(last.contains("\"r9999\""), "{last}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "the held event came after {waited:?}"
    );
    assert!(c.quiet_for(Duration::from_millis(1500)), "more events came");
}

#[test]
fn device_add_of_isa_debug_exit_is_refused_as_qemu_refuses_it() {
    let f = Fixture::new();
    let mut c = Client::negotiated(f.address());
    for args in [
        r#"{"driver":"isa-debug-exit","iobase":244,"iosize":4}"#,
        // Before any property is read.
        r#"{"driver":"isa-debug-exit","colour":"blue"}"#,
    ] {
        let req = format!(r#"{{"execute":"device_add","arguments":{args}}}"#);
        assert_eq!(
            error_of(&c.cmd(&req)),
            (
                "GenericError".into(),
                "Bus 'isa.0' does not support hotplugging".into()
            )
        );
    }
}
