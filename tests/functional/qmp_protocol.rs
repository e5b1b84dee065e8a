//! The QMP protocol end to end: cryptvm's server against QEMU's (the same bytes in, the
//! same bytes out), `cryptvm ctl` against both, the PyPI `qemu.qmp` library against
//! cryptvm, and the control socket of a real `cryptvm run` (a tiny guest that halts)
//! under abuse: commands before negotiation, malformed JSON, a 10 MiB line, 50 clients
//! at once, clients vanishing mid-command; then `quit`.
//!
//! Expected protocol bytes come from QEMU 10's QMP monitor (`qemu-system-x86_64
//! -machine none`), run side by side; deliberate differences are listed in
//! `docs/qmp.md`.

#[path = "../common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm::control::{Action, Query};
use vmm::qmp::{EventBus, QmpBackend, QmpError, QmpServer};

const TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// A raw QMP connection.
// ---------------------------------------------------------------------------------------

trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// A QMP client that sends raw bytes and reads `\r\n`-terminated lines.
struct Qmp {
    conn: Box<dyn Conn>,
    pending: Vec<u8>,
}

impl Qmp {
    /// Connects to a Unix socket path or `tcp:HOST:PORT` and reads the greeting.
    fn connect(address: &str) -> (Qmp, String) {
        let conn: Box<dyn Conn> = match address.strip_prefix("tcp:") {
            Some(hostport) => {
                let s = TcpStream::connect(hostport).unwrap_or_else(|e| panic!("{address}: {e}"));
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                Box::new(s)
            }
            None => {
                let s = UnixStream::connect(address).unwrap_or_else(|e| panic!("{address}: {e}"));
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                Box::new(s)
            }
        };
        let mut q = Qmp {
            conn,
            pending: Vec::new(),
        };
        let greeting = q.line();
        (q, greeting)
    }

    /// Connects, checks the greeting's shape and negotiates.
    fn negotiated(address: &str) -> Qmp {
        let (mut q, greeting) = Qmp::connect(address);
        let g: Value = serde_json::from_str(&greeting).unwrap();
        assert!(g["QMP"]["version"]["qemu"]["major"].is_u64(), "{greeting}");
        assert_eq!(
            q.cmd(r#"{"execute":"qmp_capabilities"}"#),
            r#"{"return": {}}"#
        );
        q
    }

    fn send(&mut self, bytes: &[u8]) {
        self.conn.write_all(bytes).expect("sending to QMP");
    }

    /// The next line without its `\r\n`.
    fn line(&mut self) -> String {
        self.try_line()
            .expect("the QMP server closed the connection")
    }

    fn try_line(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.pending.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.pending.drain(..end + 2).collect();
                return Some(String::from_utf8(line[..end].to_vec()).expect("UTF-8 from QMP"));
            }
            let mut buf = [0u8; 65536];
            match self.conn.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) => panic!("reading from QMP: {e} (got {:?})", self.pending),
            }
        }
    }

    fn cmd(&mut self, request: &str) -> String {
        self.send(request.as_bytes());
        self.line()
    }

    /// Sends `input`, then a `query-status` with a marker id; returns the lines that
    /// came before the marker's reply. Works for inputs that draw 0, 1 or more replies.
    fn transcript(&mut self, input: &[u8], marker: usize) -> Vec<String> {
        self.send(input);
        let id = format!("sync-{marker}");
        self.send(
            json!({"execute": "query-status", "id": id})
                .to_string()
                .as_bytes(),
        );
        let mut lines = Vec::new();
        loop {
            let line = self.line();
            if line.contains(&format!("\"{id}\"")) {
                return lines;
            }
            lines.push(line);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Processes.
// ---------------------------------------------------------------------------------------

/// A background process, killed when dropped.
struct Proc {
    child: Child,
    what: String,
    log: PathBuf,
}

impl Proc {
    fn spawn(what: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Proc {
            child,
            what: what.to_string(),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `address` accepts connections (the process must stay alive).
    fn wait_for_socket(&mut self, address: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = match address.strip_prefix("tcp:") {
                Some(hp) => TcpStream::connect(hp).is_ok(),
                None => Path::new(address).exists() && UnixStream::connect(address).is_ok(),
            };
            if ok {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({status}) before listening on {address}:\n{}",
                    self.what,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} does not listen on {address}:\n{}",
                self.what,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to exit; its exit code.
    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "{} still running {limit:?} after quit:\n{}",
                self.what,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `qemu-system-x86_64 -machine none` with QMP on `dir/qemu.sock`.
fn start_qemu(dir: &Path) -> (Proc, String) {
    let sock = dir.join("qemu.sock");
    let mut cmd = Command::new(common::find_tool("qemu-system-x86_64").unwrap());
    cmd.args([
        "-machine",
        "none",
        "-nodefaults",
        "-display",
        "none",
        "-qmp",
    ])
    .arg(format!("unix:{},server=on,wait=off", sock.display()));
    let mut p = Proc::spawn("qemu-system-x86_64", cmd, dir.join("qemu.log"));
    let address = sock.to_str().unwrap().to_string();
    p.wait_for_socket(&address);
    (p, address)
}

/// `cryptvm run` of the halting kernel with `--qmp qmp`; waits until QMP listens.
fn start_vm(dir: &Path, qmp: &str) -> Proc {
    std::fs::write(dir.join("kernel"), common::halting_kernel()).unwrap();
    let mut cmd = Command::new(common::CRYPTVM);
    cmd.current_dir(dir).args([
        "run",
        "--kernel",
        "kernel",
        "--memory",
        "32M",
        "--serial",
        "file:console.log",
        "--qmp",
        qmp,
    ]);
    let mut p = Proc::spawn("cryptvm run", cmd, dir.join("cryptvm.log"));
    let address = if qmp.starts_with("tcp:") {
        qmp.to_string()
    } else {
        dir.join(qmp).to_str().unwrap().to_string()
    };
    p.wait_for_socket(&address);
    p
}

/// A TCP port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `cryptvm ctl ARGS` with `stdin`.
fn ctl(args: &[&str], stdin: &str) -> common::Run {
    let mut child = Command::new(common::CRYPTVM)
        .arg("ctl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    common::Run {
        cmd: format!("cryptvm ctl {}", args.join(" ")),
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// An in-process cryptvm QMP server with a stand-in VM.
// ---------------------------------------------------------------------------------------

/// A stand-in for the VM: devices are ids in a list; `device_del` reports
/// `DEVICE_DELETED` at once.
struct StandIn {
    devices: Mutex<Vec<String>>,
    events: Arc<EventBus>,
}

impl QmpBackend for StandIn {
    fn vcpus(&self) -> u8 {
        1
    }

    fn execute(&self, action: Action) -> Result<Value, QmpError> {
        match action {
            Action::ObjectDel(id) => Err(QmpError::generic(format!("object '{id}' not found"))),
            Action::BlockdevDel(name) => Err(QmpError::generic(format!(
                "Failed to find node with node-name='{name}'"
            ))),
            Action::DeviceAdd(d) => {
                let id = d.props.id.unwrap_or_default();
                self.devices.lock().unwrap().push(id);
                Ok(json!({}))
            }
            Action::DeviceDel(id) => {
                let mut devices = self.devices.lock().unwrap();
                let Some(i) = devices.iter().position(|d| *d == id) else {
                    return Err(QmpError::device_not_found(format!(
                        "Device '{id}' not found"
                    )));
                };
                devices.remove(i);
                self.events.emit(
                    "DEVICE_DELETED",
                    json!({"device": id, "path": format!("/machine/peripheral/{id}")}),
                );
                Ok(json!({}))
            }
            Action::Query(Query::Status) => Ok(json!({"status": "running", "running": true})),
            Action::Query(_) => Ok(json!([])),
            Action::ObjectAdd(_) | Action::BlockdevAdd(_) => Ok(json!({})),
            Action::SystemPowerdown | Action::Quit => Ok(json!({})),
            Action::BlockdevCreate { .. } | Action::Job { .. } => Ok(json!({})),
        }
    }
}

fn start_server(dir: &Path) -> (QmpServer, String) {
    let events = EventBus::new();
    let backend = Arc::new(StandIn {
        devices: Mutex::new(Vec::new()),
        events: Arc::clone(&events),
    });
    let path = dir.join("cryptvm.sock");
    let server = QmpServer::start(path.to_str().unwrap(), backend, events).unwrap();
    let address = server.local_address().to_string();
    (server, address)
}

// ---------------------------------------------------------------------------------------
// The inputs both servers must answer alike.
// ---------------------------------------------------------------------------------------

/// Inputs sent in order on one connection, starting before negotiation. Each is
/// followed by a marker request, so an input may draw any number of replies.
fn protocol_cases() -> Vec<Vec<u8>> {
    let text: &[&str] = &[
        // Before negotiation.
        r#"{"execute":"query-status"}"#,
        r#"{"execute":"foo","id":1}"#,
        r#"{"execute":"query-version","arguments":[1]}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"foo":1}}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":"x"}}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":[1]}}"#,
        "garbage\n",
        r#"{"execute":"qmp_capabilities","arguments":{"enable":[]},"id":{"n":[1,2.5]}}"#,
        // After.
        r#"{"execute":"qmp_capabilities","id":2}"#,
        r#"{"execute":"foo","id":{"a":[1]}}"#,
        "{\"execute\":\n}\n",
        "}",
        "]",
        "tru\n",
        "@\n",
        "{\"a\":@}\n",
        "01\n",
        "-\n",
        "1.\n",
        "\"\\q\"\n",
        "\"\\ud800\"\n",
        "\"\\u12\"\n",
        r#"{"a":1,"a":2}"#,
        r#"{"a" 1}"#,
        r#"{"a":1 "b":2}"#,
        "{1:2}",
        "[1 2]",
        "[1,]",
        r#"{"a":}"#,
        r#"{"a":1,}"#,
        r#"{"a":1]"#,
        "[1,2]",
        r#""str""#,
        "42\n",
        "null\n",
        "{}",
        r#"{"execute":1}"#,
        r#"{"id":5}"#,
        r#"{"execute":"query-status","bogus":1}"#,
        r#"{"execute":"query-status","zz":1,"aa":2,"id":3}"#,
        r#"{"execute":"query-status","id":"x","control":{}}"#,
        r#"{"execute":"query-status","arguments":[1]}"#,
        r#"{"execute":"query-status","arguments":null}"#,
        r#"{"execute":"query-status","arguments":{"x":1}}"#,
        r#"{"exec-oob":"query-status"}"#,
        r#"{"execute":"device_del"}"#,
        r#"{"execute":"device_del","arguments":{"id":1}}"#,
        r#"{"execute":"device_del","arguments":{"y":1}}"#,
        r#"{"execute":"device_del","arguments":{"id":"x","y":2}}"#,
        r#"{"execute":"device_del","arguments":{"id":"nope"}}"#,
        r#"{"execute":"object-del","arguments":{"id":null}}"#,
        r#"{"execute":"object-del","arguments":{"id":"nope"}}"#,
        r#"{"execute":"blockdev-del","arguments":{}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":[]}}"#,
        r#"{"execute":"blockdev-del","arguments":{"node-name":"nope"}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":"x"}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":null}}"#,
        r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
        r#"{"execute":"query-pci","arguments":{"x":1}}"#,
        r#"{"execute":"query-block","arguments":{"x":1}}"#,
        r#"{"execute":"system_powerdown","arguments":{"x":1}}"#,
        r#"{"execute":"quit","arguments":{"x":1}}"#,
        r#"{"execute":"query-status","id":1.5e3}"#,
        r#"{"execute":"query-status","id":12345678901234567890123}"#,
        r#"{"execute":"query-status","id":-0}"#,
        r#"{"execute":"query-status","id":1.0}"#,
        r#"{"execute":"query-status","id":0.1}"#,
        r#"{"execute":"query-status","id":18446744073709551615}"#,
        r#"{"execute":"query-status","id":-9223372036854775808}"#,
        r#"{"execute":"query-status","id":"\u00e9\ud83d\ude00\u007f/\u0001\u0000\""}"#,
        r#"{"execute":"query-status","id":'single "quoted"'}"#,
        r#"{"execute":"query-status","id":{"z":1,"a":[true,false,null],"m":{}}}"#,
        r#"{"execute":"query-status","id":"m1"}{"execute":"query-status","id":"m2"}"#,
        "  \t\r\n",
        "{\"execute\":\"query-status\",\n\"id\":\n\"split\"\n}\n",
    ];
    let mut cases: Vec<Vec<u8>> = text.iter().map(|s| s.as_bytes().to_vec()).collect();
    // Bytes that are not UTF-8.
    cases.push(b"\xff\n".to_vec());
    cases.push(b"\"\xc3(\"\n".to_vec());
    cases.push(b"{\"execute\":\"query-status\",\"id\":\"\xc3\xa9\"}".to_vec());
    cases
}

/// The replies of `address` to [`protocol_cases`] (from connection to the last case).
fn protocol_transcript(address: &str) -> Vec<(String, Vec<String>)> {
    let (mut q, _) = Qmp::connect(address);
    protocol_cases()
        .iter()
        .enumerate()
        .map(|(i, case)| {
            (
                String::from_utf8_lossy(case).into_owned(),
                q.transcript(case, i),
            )
        })
        .collect()
}

fn assert_same_transcripts(ours: &[(String, Vec<String>)], qemu: &[(String, Vec<String>)]) {
    let mut differences = Vec::new();
    for ((input, got), (_, want)) in ours.iter().zip(qemu) {
        if got != want {
            differences.push(format!(
                "input {input:?}\n  cryptvm: {got:?}\n  QEMU:    {want:?}"
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "{} of {} inputs answered differently:\n{}",
        differences.len(),
        ours.len(),
        differences.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// cryptvm's server next to QEMU's.
// ---------------------------------------------------------------------------------------

#[test]
fn cryptvm_answers_protocol_inputs_byte_for_byte_as_qemu() {
    if !common::require(&["qemu-system-x86_64"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_qemu, qemu_sock) = start_qemu(dir.path());
    let (_server, ours) = start_server(dir.path());
    let qemu = protocol_transcript(&qemu_sock);
    let ours = protocol_transcript(&ours);
    assert_same_transcripts(&ours, &qemu);
    // Greetings: the same shape, cryptvm's own package and no capabilities.
    let (_, g_qemu) = Qmp::connect(&qemu_sock);
    let (_, g_ours) = Qmp::connect(_server.local_address());
    let (g_qemu, g_ours): (Value, Value) = (
        serde_json::from_str(&g_qemu).unwrap(),
        serde_json::from_str(&g_ours).unwrap(),
    );
    let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(keys(&g_ours["QMP"]), keys(&g_qemu["QMP"]));
    assert_eq!(
        keys(&g_ours["QMP"]["version"]),
        keys(&g_qemu["QMP"]["version"])
    );
    assert_eq!(
        keys(&g_ours["QMP"]["version"]["qemu"]),
        keys(&g_qemu["QMP"]["version"]["qemu"])
    );
    assert_eq!(g_ours["QMP"]["capabilities"], json!([]));
}

#[test]
fn ctl_against_qemu() {
    if !common::require(&["qemu-system-x86_64"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_qemu, sock) = start_qemu(dir.path());
    let r = ctl(&["--socket", &sock, "query-status"], "");
    assert_eq!(r.status, Some(0), "{r}");
    assert_eq!(
        r.stdout,
        "{\"return\": {\"status\": \"running\", \"running\": true}}\n"
    );
    let r = ctl(&["--socket", &sock, "device_del", r#"{"id": "nope"}"#], "");
    assert_eq!(r.status, Some(1), "{r}");
    assert_eq!(
        r.stdout,
        "{\"error\": {\"class\": \"DeviceNotFound\", \"desc\": \"Device 'nope' not found\"}}\n"
    );
    // One connection: an event that arrives with a reply is kept for wait-event.
    let r = ctl(
        &["--socket", &sock, "--timeout", "20"],
        r#"{"execute": "stop", "id": 1}
{"execute": "query-status"}
{"wait-event": "STOP", "timeout": 10}
{"execute": "cont"}
{"wait-event": "RESUME"}
"#,
    );
    assert_eq!(r.status, Some(0), "{r}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{r}");
    assert_eq!(lines[0], r#"{"return": {}, "id": 1}"#);
    assert_eq!(
        lines[1],
        r#"{"return": {"status": "paused", "running": false}}"#
    );
    assert!(lines[2].ends_with(r#""event": "STOP"}"#), "{r}");
    assert!(lines[4].ends_with(r#""event": "RESUME"}"#), "{r}");
    let r = ctl(
        &["--socket", &sock],
        "{\"wait-event\": \"DEVICE_DELETED\", \"timeout\": 0.5}\n",
    );
    r.clean_error(1, &["timed out waiting for DEVICE_DELETED"]);
    // quit: the reply arrives before QEMU goes.
    let r = ctl(&["--socket", &sock, "quit"], "");
    assert_eq!(
        (r.status, r.stdout.as_str()),
        (Some(0), "{\"return\": {}}\n"),
        "{r}"
    );
    ctl(&["--socket", &sock, "--timeout", "2", "query-status"], "").clean_error(2, &[&sock]);
}

#[test]
fn ctl_against_cryptvm_server() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, sock) = start_server(dir.path());
    let r = ctl(
        &["--socket", &sock],
        r#"{"execute": "device_add", "arguments": {"driver": "virtio-blk-pci", "drive": "n0", "id": "d0"}}
{"execute": "device_del", "arguments": {"id": "d0"}, "id": "del"}
{"wait-event": "DEVICE_DELETED", "data": {"device": "d0"}}
"#,
    );
    assert_eq!(r.status, Some(0), "{r}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines[..2],
        [r#"{"return": {}}"#, r#"{"return": {}, "id": "del"}"#]
    );
    assert!(
        lines[2].ends_with(r#""event": "DEVICE_DELETED", "data": {"device": "d0", "path": "/machine/peripheral/d0"}}"#),
        "{r}"
    );
    ctl(&["query-status"], "").clean_error(2, &["--socket"]);
    ctl(
        &[
            "--socket",
            &dir.path().join("none").display().to_string(),
            "quit",
        ],
        "",
    )
    .clean_error(2, &["connecting"]);
}

/// The Python interpreter of resources/testhost/qmp-venv.sh's environment, if made.
fn qemu_qmp_python() -> Option<PathBuf> {
    let venv = std::env::var_os("CRYPTVM_QMP_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            let cache = std::env::var_os("CRYPTVM_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/cryptvm"))
                })?;
            Some(cache.join("qmp-venv"))
        })?;
    let python = venv.join("bin/python3");
    python.exists().then_some(python)
}

const QEMU_QMP_SCRIPT: &str = r#"
import asyncio, sys
from qemu.qmp import QMPClient, ExecuteError

async def main(address):
    qmp = QMPClient('cryptvm-test')
    await qmp.connect(address)
    print('greeting', qmp.greeting.QMP.version['qemu']['major'])
    print('status', (await qmp.execute('query-status'))['status'])
    with qmp.listener('DEVICE_DELETED') as listener:
        await qmp.execute('device_add', {'driver': 'virtio-blk-pci', 'drive': 'n0', 'id': 'd0'})
        await qmp.execute('device_del', {'id': 'd0'})
        event = await asyncio.wait_for(listener.get(), 10)
        print('event', event['event'], event['data']['device'])
    try:
        await qmp.execute('device_del', {'id': 'nope'})
    except ExecuteError as e:
        print('error', e.error_class, str(e))
    await qmp.disconnect()

asyncio.run(main(sys.argv[1]))
"#;

#[test]
fn qemu_qmp_library_against_cryptvm_server() {
    let Some(python) = qemu_qmp_python() else {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "no qemu.qmp environment under CI (.ci/run makes it with resources/testhost/qmp-venv.sh)"
        );
        eprintln!("SKIPPED: no qemu.qmp environment (make it with resources/testhost/qmp-venv.sh)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_server, sock) = start_server(dir.path());
    let script = dir.path().join("client.py");
    std::fs::write(&script, QEMU_QMP_SCRIPT).unwrap();
    let r = common::run(
        python.to_str().unwrap(),
        [script.to_str().unwrap(), &sock],
        None,
    )
    .ok();
    assert_eq!(
        r.stdout,
        "greeting 10\nstatus running\nevent DEVICE_DELETED d0\nerror DeviceNotFound Device 'nope' not found\n",
        "{r}"
    );
}

/// Abuse that must leave the server at `sock` (a Unix socket) serving: a 10 MiB
/// message, deep nesting, clients that vanish mid-request, mid-command or before the
/// greeting, 50 clients at once.
fn survives_abuse(sock: &str) {
    let mut q = Qmp::negotiated(sock);
    // A 10 MiB line: one error, and the session goes on.
    let mut big = br#"{"execute":"query-status","id":""#.to_vec();
    big.extend(vec![b'x'; 10 << 20]);
    big.extend(b"\"}\n");
    assert_eq!(
        q.transcript(&big, 1),
        [r#"{"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}"#]
    );
    let deep = format!("{}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(
        q.transcript(deep.as_bytes(), 2),
        [r#"{"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}}"#]
    );

    // Clients that vanish: mid-request, mid-command, before the greeting is read.
    for i in 0..10 {
        if i % 3 == 2 {
            drop(UnixStream::connect(sock).unwrap());
            continue;
        }
        let (mut gone, _) = Qmp::connect(sock);
        if i % 3 == 0 {
            gone.send(br#"{"execute":"qmp_capab"#);
        } else {
            gone.send(br#"{"execute":"qmp_capabilities"}{"execute":"query-pci"}{"execute":"query-block"}"#);
        }
    }
    let mut raw = UnixStream::connect(sock).unwrap();
    raw.write_all(br#"{"execute":"qmp_capabilities"}{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#)
        .unwrap();
    drop(raw);

    // 50 clients at once, each its own session.
    let clients: Vec<_> = (0..50)
        .map(|i| {
            let sock = sock.to_string();
            std::thread::spawn(move || {
                let mut c = Qmp::negotiated(&sock);
                for j in 0..5 {
                    let reply = c.cmd(&json!({"execute": "query-status", "id": [i, j]}).to_string());
                    assert_eq!(
                        reply,
                        format!(r#"{{"return": {{"status": "running", "running": true}}, "id": [{i}, {j}]}}"#)
                    );
                }
                c
            })
        })
        .collect();
    let clients: Vec<Qmp> = clients.into_iter().map(|t| t.join().unwrap()).collect();
    drop(clients);

    assert_eq!(
        q.cmd(r#"{"execute":"query-status"}"#),
        r#"{"return": {"status": "running", "running": true}}"#
    );
}

#[test]
fn cryptvm_server_survives_abuse() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, sock) = start_server(dir.path());
    survives_abuse(&sock);
}

// ---------------------------------------------------------------------------------------
// The control socket of a real `cryptvm run`.
// ---------------------------------------------------------------------------------------

#[test]
fn run_answers_protocol_inputs_as_qemu_and_survives_abuse() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = start_vm(dir.path(), "vm.sock");
    let sock = dir.path().join("vm.sock").to_str().unwrap().to_string();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "QMP socket mode");

    if common::require(&["qemu-system-x86_64"]) {
        let (_qemu, qemu_sock) = start_qemu(dir.path());
        assert_same_transcripts(
            &protocol_transcript(&sock),
            &protocol_transcript(&qemu_sock),
        );
    }

    survives_abuse(&sock);

    let mut q = Qmp::negotiated(&sock);
    // The VM runs on; quit replies, then cryptvm exits 0 and removes the socket.
    assert_eq!(
        q.cmd(r#"{"execute":"query-status"}"#),
        r#"{"return": {"status": "running", "running": true}}"#
    );
    let mut watcher = Qmp::negotiated(&sock);
    assert_eq!(
        q.cmd(r#"{"execute":"quit","id":"bye"}"#),
        r#"{"return": {}, "id": "bye"}"#
    );
    assert_eq!(vm.wait_exit(TIMEOUT), Some(0), "{}", vm.log());
    // Other clients see the connection close (after any SHUTDOWN event).
    while let Some(line) = watcher.try_line() {
        assert!(line.contains("\"event\""), "{line}");
    }
    assert!(!Path::new(&sock).exists(), "socket file left behind");
}

#[test]
fn run_over_tcp_with_ctl() {
    let dir = tempfile::tempdir().unwrap();
    let address = format!("tcp:127.0.0.1:{}", free_port());
    let mut vm = start_vm(dir.path(), &address);
    let r = ctl(&["--socket", &address, "query-status"], "");
    assert_eq!(
        (r.status, r.stdout.as_str()),
        (
            Some(0),
            "{\"return\": {\"status\": \"running\", \"running\": true}}\n"
        ),
        "{r}"
    );
    let r = ctl(&["--socket", &address, "query-kvm"], "");
    assert_eq!(
        r.stdout, "{\"return\": {\"enabled\": true, \"present\": true}}\n",
        "{r}"
    );
    let r = ctl(
        &["--socket", &address, "device_del", r#"{"id": "nope"}"#],
        "",
    );
    assert_eq!(r.status, Some(1), "{r}");
    assert!(r.stdout.contains("DeviceNotFound"), "{r}");
    // The power button (the halting guest ignores it) and its event.
    let r = ctl(
        &["--socket", &address],
        "{\"execute\": \"system_powerdown\"}\n{\"wait-event\": \"POWERDOWN\", \"timeout\": 10}\n",
    );
    assert_eq!(r.status, Some(0), "{r}\n--- cryptvm run ---\n{}", vm.log());
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[0], r#"{"return": {}}"#, "{r}");
    assert!(lines[1].contains(r#""event": "POWERDOWN""#), "{r}");
    let r = ctl(&["--socket", &address], "{\"execute\": \"quit\"}\n");
    let exit = vm.wait_exit(TIMEOUT);
    assert_eq!(
        (r.status, r.stdout.as_str()),
        (Some(0), "{\"return\": {}}\n"),
        "{r}\n--- cryptvm run (exit {exit:?}) ---\n{}",
        vm.log()
    );
    assert_eq!(exit, Some(0), "{}", vm.log());
}

/// The refusals of the hotplug commands (unknown node, duplicate id, a node used twice,
/// bad properties, a node in use, unknown ids, a second `device_del` while one is
/// pending) are QEMU 10's, class and text, next to `qemu-system-x86_64 -M pc -S`.
#[test]
fn hotplug_refusals_match_qemu() {
    if !common::require(&["qemu-system-x86_64"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("qemu.sock");
    let mut cmd = Command::new(common::find_tool("qemu-system-x86_64").unwrap());
    cmd.args([
        "-machine",
        "pc,accel=tcg",
        "-S",
        "-nodefaults",
        "-display",
        "none",
        "-qmp",
    ])
    .arg(format!("unix:{},server=on,wait=off", sock.display()));
    let mut qemu = Proc::spawn("qemu-system-x86_64", cmd, dir.path().join("qemu.log"));
    let qemu_address = sock.to_str().unwrap().to_string();
    qemu.wait_for_socket(&qemu_address);
    let _vm = start_vm(dir.path(), "vm.sock");
    let vm_address = dir.path().join("vm.sock").to_str().unwrap().to_string();

    let file = disk.to_str().unwrap();
    let blk = |drive: &str, id: &str, extra: Value| {
        let mut a = json!({"driver": "virtio-blk-pci", "drive": drive, "id": id});
        a.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({"execute": "device_add", "arguments": a}).to_string()
    };
    let requests = [
        json!({"execute": "blockdev-add",
               "arguments": {"node-name": "f", "driver": "file", "filename": file}})
        .to_string(),
        blk("nope", "d0", json!({})),
        blk("f", "d0", json!({})),
        blk("f", "d0", json!({})),
        blk("f", "d1", json!({})),
        blk("f", "d3", json!({"colour": "x"})),
        blk("f", "d4", json!({"queue-size": 100})),
        r#"{"execute": "device_add", "arguments": {"driver": "e1000x"}}"#.into(),
        r#"{"execute": "device_add", "arguments": {"drive": "f"}}"#.into(),
        r#"{"execute": "blockdev-del", "arguments": {"node-name": "f"}}"#.into(),
        r#"{"execute": "blockdev-del", "arguments": {"node-name": "zz"}}"#.into(),
        r#"{"execute": "device_del", "arguments": {"id": "zz"}}"#.into(),
        r#"{"execute": "device_del", "arguments": {"id": "d0"}}"#.into(),
        r#"{"execute": "device_del", "arguments": {"id": "d0"}}"#.into(),
        r#"{"execute": "blockdev-del", "arguments": {"node-name": "f"}}"#.into(),
        r#"{"execute": "object-del", "arguments": {"id": "zz"}}"#.into(),
    ];
    let transcript = |address: &str| -> Vec<(String, Vec<String>)> {
        let mut q = Qmp::negotiated(address);
        requests
            .iter()
            .enumerate()
            .map(|(i, r)| (r.clone(), q.transcript(r.as_bytes(), i)))
            .collect()
    };
    let want = transcript(&qemu_address);
    let got = transcript(&vm_address);
    assert!(
        want.iter()
            .filter(|(_, l)| l.iter().any(|l| l.contains("\"error\"")))
            .count()
            >= 12,
        "QEMU should refuse most of these: {want:?}"
    );
    assert_same_transcripts(&got, &want);
}

/// `device_add` of an `isa-debug-exit` (cold-plug only: `--device`, the config's
/// `devices`) is refused in QEMU 10's words, before its properties are read, next to
/// `qemu-system-x86_64 -M pc -S`.
#[test]
fn isa_debug_exit_hotplug_is_refused_as_qemu_refuses_it() {
    if !common::require(&["qemu-system-x86_64"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qemu.sock");
    let mut cmd = Command::new(common::find_tool("qemu-system-x86_64").unwrap());
    cmd.args([
        "-machine",
        "pc,accel=tcg",
        "-S",
        "-nodefaults",
        "-display",
        "none",
        "-qmp",
    ])
    .arg(format!("unix:{},server=on,wait=off", sock.display()));
    let mut qemu = Proc::spawn("qemu-system-x86_64", cmd, dir.path().join("qemu.log"));
    let qemu_address = sock.to_str().unwrap().to_string();
    qemu.wait_for_socket(&qemu_address);
    let _vm = start_vm(dir.path(), "vm.sock");
    let vm_address = dir.path().join("vm.sock").to_str().unwrap().to_string();
    let requests = [
        r#"{"execute": "device_add", "arguments": {"driver": "isa-debug-exit", "iobase": 244, "iosize": 4}}"#,
        r#"{"execute": "device_add", "arguments": {"driver": "isa-debug-exit", "colour": "x"}}"#,
        r#"{"execute": "device_add", "arguments": {"driver": "isa-debug-exit", "id": "x"}}"#,
    ];
    let transcript = |address: &str| -> Vec<(String, Vec<String>)> {
        let mut q = Qmp::negotiated(address);
        requests
            .iter()
            .enumerate()
            .map(|(i, r)| (r.to_string(), q.transcript(r.as_bytes(), i)))
            .collect()
    };
    let want = transcript(&qemu_address);
    let got = transcript(&vm_address);
    assert!(
        want.iter()
            .all(|(_, l)| l.iter().any(|l| l.contains("does not support hotplugging"))),
        "QEMU should refuse each: {want:?}"
    );
    assert_same_transcripts(&got, &want);
}

/// A 1 MiB LUKS image made by qemu-img, keyed by `secret` (a `--object` secret `s0`),
/// its PBKDF2 cost QEMU's `iter-time` (milliseconds on this machine).
fn qemu_luks_image(image: &Path, secret: &str, iter_time_ms: u32) {
    let opts = format!("key-secret=s0,iter-time={iter_time_ms}");
    let args = [
        "create", "-q", "-f", "luks", "--object", secret, "-o", &opts,
    ];
    common::run(
        "qemu-img",
        args.into_iter().chain([image.to_str().unwrap(), "1M"]),
        None,
    )
    .ok();
}

/// [`start_vm`] with QMP on `dir/qmp.sock`; the VM and the socket's address.
fn start_vm_at_socket(dir: &Path) -> (Proc, String) {
    let vm = start_vm(dir, "qmp.sock");
    (vm, dir.join("qmp.sock").to_str().unwrap().to_string())
}

/// QMP answers other clients while a `blockdev-add` unlocks LUKS for seconds: the
/// unlock holds neither the server's nor the machine's locks (issue 12). The header's
/// PBKDF2 cost is QEMU's `iter-time=2500` (milliseconds on this machine).
#[test]
fn qmp_answers_while_a_luks_unlock_runs() {
    if !common::require(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("slow.luks");
    qemu_luks_image(&image, "secret,id=s0,data=pw", 2500);
    let (mut vm, address) = start_vm_at_socket(dir.path());

    // Client A adds the secret, then the luks node, on its own thread.
    let a_address = address.clone();
    let image_name = image.to_str().unwrap().to_string();
    let unlock = std::thread::spawn(move || {
        let mut a = Qmp::negotiated(&a_address);
        let secret =
            r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0","data":"pw"}}"#;
        assert_eq!(a.cmd(secret), r#"{"return": {}}"#);
        let add = json!({"execute": "blockdev-add", "arguments": {
            "driver": "luks", "node-name": "slow", "key-secret": "s0",
            "file": {"driver": "file", "filename": image_name}}});
        let sent = Instant::now();
        let reply = a.cmd(&add.to_string());
        (reply, sent, Instant::now())
    });

    // Client B meanwhile: each answer comes at once, before A's.
    std::thread::sleep(Duration::from_millis(300));
    let mut b = Qmp::negotiated(&address);
    let mut answered = Vec::new();
    for query in [
        "query-status",
        "query-named-block-nodes",
        "query-pci",
        "query-block",
    ] {
        let asked = Instant::now();
        let reply = b.cmd(&json!({ "execute": query }).to_string());
        assert!(reply.starts_with(r#"{"return""#), "{query}: {reply}");
        assert!(
            !reply.contains("\"slow\""),
            "{query} during the unlock: {reply}"
        );
        answered.push((query, asked.elapsed(), Instant::now()));
    }
    let (reply, sent, replied) = unlock.join().unwrap();
    assert_eq!(reply, r#"{"return": {}}"#, "blockdev-add:\n{}", vm.log());
    let unlock_time = replied - sent;
    assert!(
        unlock_time > Duration::from_secs(1),
        "the unlock took only {unlock_time:?}: the header proves nothing"
    );
    for (query, took, at) in answered {
        assert!(
            at < replied && took < Duration::from_millis(500),
            "{query} took {took:?}, answered {} during an unlock of {unlock_time:?}",
            if at < replied {
                "before it ended"
            } else {
                "only after it"
            }
        );
    }
    // The node is there once the unlock is done.
    let nodes = b.cmd(r#"{"execute":"query-named-block-nodes"}"#);
    assert!(nodes.contains(r#""node-name": "slow""#), "{nodes}");
    assert_eq!(b.cmd(r#"{"execute":"quit"}"#), r#"{"return": {}}"#);
    assert_eq!(vm.wait_exit(TIMEOUT), Some(0), "{}", vm.log());
}

/// Mappings of process `pid` from /proc/PID/smaps: (size in bytes, VmFlags).
fn mappings(pid: u32) -> Vec<(u64, String)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let mut out = Vec::new();
    let mut size = 0;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    size = b - a;
                    continue;
                }
            }
        }
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            out.push((size, flags.trim().to_string()));
        }
    }
    out
}

/// A running `cryptvm run` with an open LUKS disk keeps its secrets out of core dumps:
/// its guest RAM and the pages of the disk's key schedule are `MADV_DONTDUMP`, as
/// /proc/PID/smaps shows ("dd"); the key pages go with the node (issue 12). (The process is also
/// non-dumpable: `vmm::core_dumps`' unit test, as root cannot see it from outside.)
#[test]
fn guest_ram_and_key_schedules_stay_out_of_core_dumps() {
    if !common::require(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.luks");
    qemu_luks_image(&image, "secret,id=s0,data=pw", 10);
    let (mut vm, address) = start_vm_at_socket(dir.path());
    let pid = vm.child.id();
    let dont_dump = |m: &[(u64, String)]| -> Vec<u64> {
        m.iter()
            .filter(|(_, f)| f.split_whitespace().any(|f| f == "dd"))
            .map(|(size, _)| *size)
            .collect()
    };
    let before = dont_dump(&mappings(pid));
    // The 32 MiB of guest RAM (the smallest mapping that holds it).
    assert!(
        before.iter().any(|&s| s >= 32 << 20),
        "no guest RAM mapping is MADV_DONTDUMP: {before:?}"
    );
    let mut q = Qmp::negotiated(&address);
    let secret =
        r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0","data":"pw"}}"#;
    assert_eq!(q.cmd(secret), r#"{"return": {}}"#);
    let add = json!({"execute": "blockdev-add", "arguments": {
        "driver": "luks", "node-name": "d", "key-secret": "s0",
        "file": {"driver": "file", "filename": image.to_str().unwrap()}}});
    assert_eq!(q.cmd(&add.to_string()), r#"{"return": {}}"#);
    let after = dont_dump(&mappings(pid));
    let small = |v: &[u64]| v.iter().filter(|&&s| s <= 64 << 10).count();
    assert!(
        small(&after) > small(&before),
        "no new small MADV_DONTDUMP mapping for the key schedule: {before:?} -> {after:?}"
    );
    assert_eq!(
        q.cmd(r#"{"execute":"blockdev-del","arguments":{"node-name":"d"}}"#),
        r#"{"return": {}}"#
    );
    let gone = dont_dump(&mappings(pid));
    assert_eq!(
        small(&gone),
        small(&before),
        "the key schedule's pages outlive the node: {gone:?}"
    );
    assert_eq!(q.cmd(r#"{"execute":"quit"}"#), r#"{"return": {}}"#);
    assert_eq!(vm.wait_exit(TIMEOUT), Some(0), "{}", vm.log());
}

/// How often `needle` occurs in the readable memory of process `pid`
/// (/proc/PID/maps and /proc/PID/mem; needs ptrace rights, which root has).
fn occurrences_in_memory(pid: u32, needle: &[u8]) -> usize {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
    let mut found = 0;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.read_exact_at(&mut buf, a).is_err() {
            continue;
        }
        let mut i = 0;
        while let Some(p) = buf[i..].iter().position(|&c| c == needle[0]) {
            let at = i + p;
            if buf[at..].starts_with(needle) {
                found += 1;
            }
            i = at + 1;
        }
    }
    found
}

/// A passphrase sent over QMP leaves no copy in the VMM once its secret is deleted:
/// the read buffer, the lexer's buffers, the parsed request and every clone of the
/// arguments are zeroized (issue 12). The whole memory of `cryptvm run` is searched.
#[test]
fn a_deleted_secret_leaves_no_copy_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, address) = start_vm_at_socket(dir.path());
    let pid = vm.child.id();
    // Built here, so that the test's own binary holds no copy either way.
    let pass: String = ["cRyPtVm", "PaSs", "7f3a9e", "QmPwIpE"].concat();
    let mut q = Qmp::negotiated(&address);
    let add = json!({"execute": "object-add",
                     "arguments": {"qom-type": "secret", "id": "s0", "data": pass}});
    assert_eq!(q.cmd(&add.to_string()), r#"{"return": {}}"#);
    assert_eq!(
        occurrences_in_memory(pid, pass.as_bytes()),
        1,
        "the secret store should hold the passphrase once, and nothing else"
    );
    // A refused object-add (duplicate id) leaves nothing either.
    let dup = q.cmd(&add.to_string());
    assert!(dup.contains("GenericError"), "{dup}");
    assert_eq!(
        q.cmd(r#"{"execute":"object-del","arguments":{"id":"s0"}}"#),
        r#"{"return": {}}"#
    );
    assert_eq!(
        occurrences_in_memory(pid, pass.as_bytes()),
        0,
        "copies of a deleted passphrase remain in cryptvm's memory"
    );
    assert_eq!(q.cmd(r#"{"execute":"quit"}"#), r#"{"return": {}}"#);
    assert_eq!(vm.wait_exit(TIMEOUT), Some(0), "{}", vm.log());
}

/// The same after the passphrase unlocked a LUKS node (the KDF's copies of it) and the
/// node and the secret were deleted.
#[test]
fn a_deleted_secret_leaves_no_copy_after_an_unlock() {
    if !common::require(&["qemu-img"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pass: String = ["cRyPtVm", "LuKs", "51c0de", "UnLoCk"].concat();
    let pass_file = dir.path().join("pass");
    std::fs::write(&pass_file, &pass).unwrap();
    let image = dir.path().join("d.luks");
    qemu_luks_image(
        &image,
        &format!("secret,id=s0,file={}", pass_file.display()),
        10,
    );
    std::fs::remove_file(&pass_file).unwrap();
    let (mut vm, address) = start_vm_at_socket(dir.path());
    let pid = vm.child.id();
    let mut q = Qmp::negotiated(&address);
    let add = json!({"execute": "object-add",
                     "arguments": {"qom-type": "secret", "id": "s0", "data": pass}});
    assert_eq!(q.cmd(&add.to_string()), r#"{"return": {}}"#);
    let node = json!({"execute": "blockdev-add", "arguments": {
        "driver": "luks", "node-name": "d", "key-secret": "s0",
        "file": {"driver": "file", "filename": image.to_str().unwrap()}}});
    assert_eq!(q.cmd(&node.to_string()), r#"{"return": {}}"#);
    assert_eq!(
        occurrences_in_memory(pid, pass.as_bytes()),
        1,
        "after the unlock, only the secret store should hold the passphrase"
    );
    for del in [
        r#"{"execute":"blockdev-del","arguments":{"node-name":"d"}}"#,
        r#"{"execute":"object-del","arguments":{"id":"s0"}}"#,
    ] {
        assert_eq!(q.cmd(del), r#"{"return": {}}"#, "{del}");
    }
    assert_eq!(occurrences_in_memory(pid, pass.as_bytes()), 0);
    assert_eq!(q.cmd(r#"{"execute":"quit"}"#), r#"{"return": {}}"#);
    assert_eq!(vm.wait_exit(TIMEOUT), Some(0), "{}", vm.log());
}

/// Two disks over one detached header node through QMP: the second
/// `blockdev-add` reuses the first one's unlock (no second key derivation:
/// it returns at once while the first took over a second); the header node
/// cannot go while a disk uses it; deleting one disk leaves the other in
/// the graph (block/src/luks/shared.rs tests its I/O after that).
#[test]
fn two_disks_share_one_detached_header_unlock() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let made = common::run(
        common::CRYPTVM,
        [
            "img",
            "create",
            "-q",
            "--object",
            "secret,id=s0,data=pw",
            "-f",
            "luks",
            "-o",
            "key-secret=s0,iter-time=1500,detached-header=true",
            "shared.header",
        ],
        Some(d),
    );
    assert_eq!(made.status, Some(0), "{}", made.stderr);
    for p in ["p0.img", "p1.img"] {
        std::fs::write(d.join(p), vec![0u8; 1 << 20]).unwrap();
    }
    let (mut vm, address) = start_vm_at_socket(d);
    let mut q = Qmp::negotiated(&address);
    let ok = r#"{"return": {}}"#;
    let secret =
        r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0","data":"pw"}}"#;
    assert_eq!(q.cmd(secret), ok);
    let hdr = json!({"execute": "blockdev-add", "arguments": {
        "driver": "file", "node-name": "hdr", "filename": d.join("shared.header")}});
    assert_eq!(q.cmd(&hdr.to_string()), ok);
    let mut add = |name: &str, payload: &str| {
        let add = json!({"execute": "blockdev-add", "arguments": {
            "driver": "luks", "node-name": name, "key-secret": "s0", "header": "hdr",
            "file": {"driver": "file", "filename": d.join(payload)}}});
        let sent = Instant::now();
        let reply = q.cmd(&add.to_string());
        (reply, sent.elapsed())
    };
    let (r0, t0) = add("d0", "p0.img");
    assert_eq!(r0, ok, "{}", vm.log());
    let (r1, t1) = add("d1", "p1.img");
    assert_eq!(r1, ok, "{}", vm.log());
    assert!(
        t0 > Duration::from_millis(500) && t1 * 4 < t0,
        "the first unlock took {t0:?}, the second {t1:?}: it should reuse the first"
    );
    let del = |name: &str| {
        json!({"execute": "blockdev-del", "arguments": {"node-name": name}}).to_string()
    };
    let refused = q.cmd(&del("hdr"));
    assert!(refused.contains("in use"), "{refused}");
    assert_eq!(q.cmd(&del("d0")), ok);
    let nodes = q.cmd(r#"{"execute":"query-named-block-nodes"}"#);
    assert!(nodes.contains(r#""node-name": "d1""#), "{nodes}");
    assert!(!nodes.contains(r#""node-name": "d0""#), "{nodes}");
    assert_eq!(q.cmd(&del("d1")), ok);
    assert_eq!(q.cmd(&del("hdr")), ok);
    assert_eq!(q.cmd(r#"{"execute":"quit"}"#), ok);
    assert_eq!(vm.wait_exit(TIMEOUT), Some(0), "{}", vm.log());
}
