//! QMP `blockdev-create` and the `job-*` commands side by side with QEMU 10
//! (`qemu-system-x86_64 -machine none`): the same command sequence to both (the
//! libvirt-style flow: a file node, a qcow2 or luks image created on it, `job-dismiss`,
//! the format node added), the same replies and `JOB_STATUS_CHANGE` events (modulo
//! timestamps and the folder), and images `qemu-img` reads alike.

#[path = "../common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A QMP connection that keeps replies and events apart.
struct Qmp {
    conn: UnixStream,
    pending: Vec<u8>,
    replies: Vec<String>,
    events: Vec<String>,
    dir: String,
}

impl Qmp {
    fn connect(address: &str, dir: &Path) -> Qmp {
        let conn = UnixStream::connect(address).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut q = Qmp {
            conn,
            pending: Vec::new(),
            replies: Vec::new(),
            events: Vec::new(),
            dir: dir.to_str().unwrap().to_string(),
        };
        q.line();
        q.cmd(json!({"execute": "qmp_capabilities"}));
        q
    }

    fn line(&mut self) -> Value {
        loop {
            if let Some(end) = self.pending.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.pending.drain(..end + 2).collect();
                return serde_json::from_slice(&line[..end]).unwrap();
            }
            let mut buf = [0u8; 65536];
            let n = self.conn.read(&mut buf).unwrap_or_else(|e| {
                panic!(
                    "reading QMP: {e}; replies {:?} events {:?}",
                    self.replies, self.events
                )
            });
            assert!(n > 0, "QMP closed");
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    /// Records `v` (without its timestamp, the folder as `DIR`); true for an event.
    fn record(&mut self, mut v: Value) -> bool {
        let event = v.get("event").is_some();
        if let Some(m) = v.as_object_mut() {
            m.remove("timestamp");
        }
        let text = v.to_string().replace(&self.dir, "DIR");
        if event {
            self.events.push(text);
        } else {
            self.replies.push(text);
        }
        event
    }

    fn cmd(&mut self, request: Value) -> Value {
        let text = request.to_string().replace("DIR", &self.dir);
        self.conn.write_all(text.as_bytes()).unwrap();
        loop {
            let v = self.line();
            if !self.record(v.clone()) {
                return v;
            }
        }
    }

    /// Waits for job `id`'s `concluded` event.
    fn concluded(&mut self, id: &str) {
        let want = json!({"data": {"status": "concluded", "id": id}, "event": "JOB_STATUS_CHANGE"})
            .to_string();
        while !self.events.contains(&want) {
            let v = self.line();
            self.record(v);
        }
    }

    /// `blockdev-create`, waiting for the job to conclude.
    fn create(&mut self, id: &str, options: Value) -> Value {
        let r = self.cmd(
            json!({"execute": "blockdev-create", "arguments": {"job-id": id, "options": options}}),
        );
        if r.get("return").is_some() {
            self.concluded(id);
        }
        r
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(address: &Path, p: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while UnixStream::connect(address).is_err() {
        assert!(p.0.try_wait().unwrap().is_none(), "exited before listening");
        assert!(Instant::now() < deadline, "not listening");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_qemu(dir: &Path) -> (Proc, String) {
    let sock = dir.join("qmp.sock");
    let mut cmd = Command::new(common::find_tool("qemu-system-x86_64").unwrap());
    cmd.args([
        "-machine",
        "none",
        "-nodefaults",
        "-display",
        "none",
        "-qmp",
    ])
    .arg(format!("unix:{},server=on,wait=off", sock.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    let mut p = Proc(cmd.spawn().unwrap());
    wait_for(&sock, &mut p);
    (p, sock.to_str().unwrap().to_string())
}

fn start_cryptvm(dir: &Path) -> (Proc, String) {
    std::fs::write(dir.join("kernel"), common::halting_kernel()).unwrap();
    let mut cmd = Command::new(common::CRYPTVM);
    cmd.current_dir(dir)
        .args([
            "run",
            "--kernel",
            "kernel",
            "--memory",
            "32M",
            "--serial",
            "file:console.log",
            "--qmp",
            "qmp.sock",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let mut p = Proc(cmd.spawn().unwrap());
    let sock = dir.join("qmp.sock");
    wait_for(&sock, &mut p);
    (p, sock.to_str().unwrap().to_string())
}

/// The command sequence both get.
fn session(q: &mut Qmp) {
    // The file for the qcow2 image, then a file node on it.
    q.create(
        "jf",
        json!({"driver": "file", "filename": "DIR/a.qcow2", "size": 0}),
    );
    q.cmd(json!({"execute": "job-dismiss", "arguments": {"id": "jf"}}));
    q.cmd(json!({"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "DIR/a.qcow2", "node-name": "f1"}}));
    q.create("jq", json!({"driver": "qcow2", "file": "f1", "size": 67108864, "cluster-size": 65536, "lazy-refcounts": true}));
    q.cmd(json!({"execute": "query-jobs"}));
    q.cmd(json!({"execute": "job-dismiss", "arguments": {"id": "jq"}}));
    q.cmd(json!({"execute": "blockdev-add", "arguments": {"driver": "qcow2", "node-name": "q1", "file": "f1"}}));
    q.cmd(json!({"execute": "query-jobs"}));

    // luks, its secret first.
    q.cmd(json!({"execute": "object-add", "arguments": {"qom-type": "secret", "id": "sec0", "data": "abc123"}}));
    q.create(
        "jlf",
        json!({"driver": "file", "filename": "DIR/l.luks", "size": 0}),
    );
    q.cmd(json!({"execute": "job-dismiss", "arguments": {"id": "jlf"}}));
    q.cmd(json!({"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "DIR/l.luks", "node-name": "f2"}}));
    q.create("jl", json!({"driver": "luks", "file": "f2", "size": 4194304, "key-secret": "sec0", "iter-time": 10}));
    q.cmd(json!({"execute": "job-dismiss", "arguments": {"id": "jl"}}));
    q.cmd(json!({"execute": "blockdev-add", "arguments": {"driver": "luks", "node-name": "l1", "file": "f2", "key-secret": "sec0"}}));

    // luks with a detached header (QEMU 9.0's `header`).
    for (id, name) in [("jh", "h.luks"), ("jd", "d.raw")] {
        q.create(
            id,
            json!({"driver": "file", "filename": format!("DIR/{name}"), "size": 0}),
        );
        q.cmd(json!({"execute": "job-dismiss", "arguments": {"id": id}}));
    }
    q.cmd(json!({"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "DIR/h.luks", "node-name": "fh"}}));
    q.cmd(json!({"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "DIR/d.raw", "node-name": "fd"}}));
    q.create("jdh", json!({"driver": "luks", "header": "fh", "file": "fd", "size": 1048576, "key-secret": "sec0", "iter-time": 10}));
    q.cmd(json!({"execute": "blockdev-add", "arguments": {"driver": "luks", "node-name": "l2", "header": "fh", "file": "fd", "key-secret": "sec0"}}));
    q.create(
        "e4",
        json!({"driver": "luks", "size": 1048576, "key-secret": "sec0"}),
    );
    q.create(
        "e5",
        json!({"driver": "luks", "file": "fd", "size": 1048576}),
    );
    q.cmd(json!({"execute": "query-jobs"}));
    for id in ["jdh", "e4", "e5"] {
        q.cmd(json!({"execute": "job-dismiss", "arguments": {"id": id}}));
    }

    // Errors: at once, and in the job.
    q.cmd(json!({"execute": "blockdev-create", "arguments": {"options": {"driver": "file", "filename": "DIR/x", "size": 0}}}));
    q.cmd(json!({"execute": "blockdev-create", "arguments": {"job-id": "e1", "options": {"driver": "foo"}}}));
    q.cmd(json!({"execute": "blockdev-create", "arguments": {"job-id": "e1"}}));
    q.cmd(json!({"execute": "blockdev-create", "arguments": {"job-id": "e1", "options": {"driver": "file", "filename": "DIR/x"}}}));
    q.cmd(json!({"execute": "blockdev-create", "arguments": {"job-id": "a b", "options": {"driver": "file", "filename": "DIR/x", "size": 0}}}));
    q.create(
        "e1",
        json!({"driver": "qcow2", "file": "nope", "size": 1048576}),
    );
    q.cmd(json!({"execute": "blockdev-create", "arguments": {"job-id": "e1", "options": {"driver": "file", "filename": "DIR/x", "size": 0}}}));
    q.cmd(json!({"execute": "query-jobs"}));
    q.cmd(json!({"execute": "job-cancel", "arguments": {"id": "e1"}}));
    q.cmd(json!({"execute": "job-complete", "arguments": {"id": "e1"}}));
    q.cmd(json!({"execute": "job-finalize", "arguments": {"id": "e1"}}));
    q.cmd(json!({"execute": "job-dismiss", "arguments": {"id": "e1"}}));
    q.cmd(json!({"execute": "job-dismiss", "arguments": {"id": "e1"}}));
    q.cmd(json!({"execute": "job-dismiss", "arguments": {}}));
    q.create("e2", json!({"driver": "qcow2", "file": {"driver": "file", "filename": "DIR/a.qcow2"}, "size": 1000}));
    q.cmd(json!({"execute": "query-jobs"}));
    q.cmd(json!({"execute": "job-dismiss", "arguments": {"id": "e2"}}));
    q.create(
        "e3",
        json!({"driver": "file", "filename": "/nonexistent-dir/x", "size": 0}),
    );
    q.cmd(json!({"execute": "query-jobs"}));
    q.cmd(json!({"execute": "job-dismiss", "arguments": {"id": "e3"}}));
    q.cmd(json!({"execute": "quit"}));
}

fn info(path: &Path) -> Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = v.as_object_mut().unwrap();
    for k in ["filename", "actual-size", "children"] {
        m.remove(k);
    }
    if let Some(data) = v
        .pointer_mut("/format-specific/data")
        .and_then(Value::as_object_mut)
    {
        // Random or benchmarked per volume.
        for k in ["uuid", "master-key-iters", "slots", "detached-header"] {
            data.remove(k);
        }
    }
    v
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn luks_opts(path: &Path) -> String {
    format!(
        "driver=luks,key-secret=sec0,file.filename={}",
        path.display()
    )
}

#[test]
fn blockdev_create_as_qemu() {
    if !common::require(&["qemu-system-x86_64", "qemu-img", "qemu-io"]) {
        return;
    }
    let qdir = tempfile::tempdir().unwrap();
    let cdir = tempfile::tempdir().unwrap();
    let (mut qemu, qsock) = start_qemu(qdir.path());
    let (mut ours, csock) = start_cryptvm(cdir.path());
    let mut q = Qmp::connect(&qsock, qdir.path());
    let mut c = Qmp::connect(&csock, cdir.path());
    session(&mut q);
    session(&mut c);
    assert_eq!(c.replies, q.replies, "replies");
    // SHUTDOWN: cryptvm sends it once quit's reply is out (docs/qmp.md), QEMU before.
    let jobs = |q: &Qmp| -> Vec<String> {
        q.events
            .iter()
            .filter(|e| e.contains("JOB_STATUS_CHANGE"))
            .cloned()
            .collect()
    };
    assert_eq!(jobs(&c), jobs(&q), "events");
    let _ = qemu.0.wait();
    let _ = ours.0.wait();

    let (qa, ca) = (qdir.path().join("a.qcow2"), cdir.path().join("a.qcow2"));
    assert_eq!(info(&ca), info(&qa));
    qemu_img(&["check", ca.to_str().unwrap()]);

    let (ql, cl) = (qdir.path().join("l.luks"), cdir.path().join("l.luks"));
    assert_eq!(info(&cl), info(&ql));
    assert_eq!(
        std::fs::metadata(&cl).unwrap().len(),
        std::fs::metadata(&ql).unwrap().len()
    );
    let secret = "secret,id=sec0,data=abc123";
    for p in [&ql, &cl] {
        let out = Command::new("qemu-io")
            .args([
                "--object",
                secret,
                "--image-opts",
                &luks_opts(p),
                "-c",
                "write -P 0 0 4M",
                "-c",
                "write -P 0x5a 4096 65536",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for name in ["h.luks", "d.raw"] {
        assert_eq!(
            std::fs::metadata(cdir.path().join(name)).unwrap().len(),
            std::fs::metadata(qdir.path().join(name)).unwrap().len(),
            "{name}"
        );
    }
    let detached = |d: &Path| {
        format!(
            "driver=luks,key-secret=sec0,header.driver=file,header.filename={},file.driver=file,file.filename={}",
            d.join("h.luks").display(),
            d.join("d.raw").display()
        )
    };
    for d in [qdir.path(), cdir.path()] {
        let out = Command::new("qemu-io")
            .args([
                "--object",
                secret,
                "--image-opts",
                &detached(d),
                "-c",
                "write -P 0x33 0 1M",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    qemu_img(&[
        "compare",
        "--object",
        secret,
        "--image-opts",
        &detached(qdir.path()),
        &detached(cdir.path()),
    ]);
    qemu_img(&[
        "compare",
        "--object",
        secret,
        "--image-opts",
        &luks_opts(&ql),
        &luks_opts(&cl),
    ]);
}
