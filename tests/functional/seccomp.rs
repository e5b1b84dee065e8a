//! Seccomp filters on a real `cryptvm run` (docs/security.md, "Seccomp"): a
//! tiny guest that halts, a LUKS disk and a raw disk over files, QMP. Every
//! thread of the process runs under a filter; hot plug works under them; a
//! forbidden call ends the process with the documented message; `off`
//! installs none; a bad mode is refused.

#[path = "../common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A running `cryptvm run`, killed if the test ends first.
struct Vm {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vm {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cryptvm.log")).unwrap_or_default()
    }

    fn sock(&self) -> std::path::PathBuf {
        self.dir.path().join("vm.sock")
    }

    /// Waits for the exit; its status (`None`: killed by a signal or still
    /// running after `limit`).
    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until QMP listens, or the process ends (then false).
    fn wait_listening(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if UnixStream::connect(self.sock()).is_ok() {
                return true;
            }
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("cryptvm does not listen:\n{}", self.log());
    }
}

/// Starts the halting guest with a LUKS disk (over a file) and QMP, plus
/// `extra` options and environment.
fn start(extra: &[&str], env: &[(&str, &str)]) -> Vm {
    let dir = tempfile::Builder::new()
        .prefix("cryptvm-seccomp-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    std::fs::write(d.join("kernel"), common::halting_kernel()).unwrap();
    let img = common::cryptvm(
        d,
        [
            "img",
            "create",
            "--object",
            "secret,id=sec0,data=abc123",
            "-f",
            "luks",
            "-o",
            "key-secret=sec0,iter-time=10",
            "disk.luks",
            "4M",
        ],
    );
    assert_eq!(img.status, Some(0), "{img}");
    std::fs::write(d.join("plain.raw"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(d.join("extra.raw"), vec![0u8; 1 << 20]).unwrap();
    let log = std::fs::File::create(d.join("cryptvm.log")).unwrap();
    let mut cmd = Command::new(common::CRYPTVM);
    cmd.current_dir(d)
        .args([
            "run",
            "--kernel",
            "kernel",
            "--memory",
            "32M",
            "--cpus",
            "2",
            "--serial",
            "file:console.log",
            "--qmp",
            "vm.sock",
            "--object",
            "secret,id=sec0,data=abc123",
            "--blockdev",
            "driver=file,node-name=f0,filename=disk.luks",
            "--blockdev",
            "driver=luks,node-name=l0,file=f0,key-secret=sec0",
            "--device",
            "virtio-blk-pci,drive=l0,id=vd0",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("starting cryptvm run");
    Vm { child, dir }
}

/// A negotiated QMP connection.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        };
        let greeting = q.line();
        assert!(greeting["QMP"].is_object(), "{greeting}");
        let r = q.cmd("qmp_capabilities", json!({}));
        assert_eq!(r, json!({"return": {}}));
        q
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        let n = self.reader.read_line(&mut l).expect("reading QMP");
        assert!(n > 0, "QMP closed");
        serde_json::from_str(&l).unwrap()
    }

    /// Runs a command; its reply (events before it skipped).
    fn cmd(&mut self, execute: &str, arguments: Value) -> Value {
        let req = json!({"execute": execute, "arguments": arguments});
        self.writer
            .write_all(format!("{req}\n").as_bytes())
            .unwrap();
        loop {
            let v = self.line();
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    fn ok(&mut self, execute: &str, arguments: Value) -> Value {
        let r = self.cmd(execute, arguments.clone());
        assert!(r.get("return").is_some(), "{execute} {arguments}: {r}");
        r
    }
}

/// `(thread name, Seccomp, Seccomp_filters)` of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = entry.unwrap().path();
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue; // the thread ended meanwhile
        };
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().parse::<u32>().unwrap())
                .unwrap_or(0)
        };
        out.push((
            comm.trim().to_string(),
            field("Seccomp:"),
            field("Seccomp_filters:"),
        ));
    }
    out.sort();
    out
}

fn have_kvm() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("no usable /dev/kvm; skipping");
    }
    ok
}

/// Waits (up to 30 s: QMP listens before the vCPUs start, and a new thread
/// takes a moment to name itself and install its filter) until every thread
/// of `pid` runs under a filter and threads named as in `want` exist.
fn assert_all_filtered(
    pid: u32,
    want: &[&str],
    log: impl Fn() -> String,
) -> Vec<(String, u32, u32)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = threads(pid);
        let filtered = t
            .iter()
            .all(|(_, mode, filters)| *mode == 2 && *filters >= 1);
        let named = want
            .iter()
            .all(|w| t.iter().any(|(n, _, _)| n.starts_with(w)));
        if filtered && named {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "not every thread is filtered, or one of {want:?} is missing: {t:?}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_thread_is_filtered_and_hot_plug_works_under_the_filters() {
    if !have_kvm() {
        return;
    }
    let mut vm = start(&[], &[]);
    assert!(vm.wait_listening(), "cryptvm ended:\n{}", vm.log());
    let mut q = Qmp::connect(&vm.sock());
    let r = q.ok("query-status", json!({}));
    assert_eq!(r["return"]["running"], json!(true), "{r}");
    let pid = vm.child.id();
    assert_all_filtered(
        pid,
        &[
            "vcpu0",
            "vcpu1",
            "event-loop",
            "qmp-accept",
            "qmp-client-",
            "qmp-writer-",
            "hotplug",
            "qmp-events",
            "io-w-0",
            "io-vd0-q0",
        ],
        || vm.log(),
    );

    let d = vm.dir.path().to_path_buf();
    q.ok(
        "object-add",
        json!({"qom-type": "secret", "id": "sec1", "data": "abc123"}),
    );
    q.ok(
        "blockdev-add",
        json!({"node-name": "f1", "driver": "file",
               "filename": d.join("plain.raw").to_str().unwrap()}),
    );
    q.ok(
        "blockdev-add",
        json!({"node-name": "r1", "driver": "raw", "file": "f1"}),
    );
    q.ok(
        "blockdev-add",
        json!({"node-name": "f2", "driver": "file",
               "filename": d.join("disk.luks").to_str().unwrap(), "read-only": true}),
    );
    q.ok(
        "device_add",
        json!({"driver": "virtio-blk-pci", "drive": "r1", "id": "vd1", "num-queues": 2}),
    );
    for query in [
        "query-block",
        "query-named-block-nodes",
        "query-pci",
        "query-status",
        "query-version",
        "query-commands",
    ] {
        q.ok(query, json!({}));
    }
    // The halting guest never ejects: device_del only asks it to.
    q.ok("device_del", json!({"id": "vd1"}));
    // The new disk's queue threads and the new client's threads too.
    let mut second = Qmp::connect(&vm.sock());
    second.ok("query-block", json!({}));
    let after = assert_all_filtered(pid, &["io-vd1-q0", "io-vd1-q1"], || vm.log());
    let writers = after
        .iter()
        .filter(|(n, _, _)| n.starts_with("qmp-writer"))
        .count();
    assert!(writers >= 2, "{after:?}");
    drop(second);
    // A node no device uses goes; the one the ejecting disk holds stays.
    q.ok(
        "blockdev-add",
        json!({"node-name": "f3", "driver": "file",
               "filename": d.join("extra.raw").to_str().unwrap()}),
    );
    q.ok("blockdev-del", json!({"node-name": "f3"}));
    let r = q.cmd("blockdev-del", json!({"node-name": "r1"}));
    assert!(r.get("error").is_some(), "{r}");
    q.ok("blockdev-del", json!({"node-name": "f2"}));
    q.ok("object-del", json!({"id": "sec1"}));
    q.ok("system_powerdown", json!({}));
    q.ok("quit", json!({}));
    let status = vm.wait_exit(Duration::from_secs(60));
    let log = vm.log();
    assert_eq!(status, Some(0), "{log}");
    assert!(!log.contains("forbidden"), "{log}");
}

#[test]
fn a_forbidden_call_ends_the_process_naming_thread_and_call() {
    if !have_kvm() {
        return;
    }
    for (kind, thread) in [
        ("vcpu", "vcpu"),
        ("main", "main"),
        ("io-worker", "io-w-"),
        ("virtio-queue", "io-vd0-q"),
        ("qmp-client", "qmp-client-"),
        ("event-loop", "event-loop"),
        ("qmp-events", "qmp-events"),
        ("crypto", "crypto-"),
        ("hotplug", "hotplug"),
        ("qmp-accept", "qmp-accept"),
    ] {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        if kind == "crypto" && cpus < 2 {
            continue; // one CPU: no crypto pool
        }
        let mut vm = start(&[], &[("CRYPTVM_SECCOMP_SELFTEST", kind)]);
        if vm.wait_listening() && kind == "qmp-client" {
            let _ = UnixStream::connect(vm.sock());
        }
        let status = vm.wait_exit(Duration::from_secs(60));
        let log = vm.log();
        assert_eq!(status, Some(159), "{kind}: {log}");
        let line = log
            .lines()
            .find(|l| l.contains("forbidden system call"))
            .unwrap_or_else(|| panic!("{kind}: no report:\n{log}"));
        assert!(
            line.starts_with(&format!("cryptvm: thread '{thread}")),
            "{kind}: {line}"
        );
        assert!(
            line.ends_with("made forbidden system call 165 (mount); see docs/security.md")
                || line.contains("' made forbidden system call 165 (mount); see docs/security.md"),
            "{kind}: {line}"
        );
    }
}

#[test]
fn log_mode_lets_a_forbidden_call_through() {
    if !have_kvm() {
        return;
    }
    let mut vm = start(
        &["--seccomp", "log"],
        &[("CRYPTVM_SECCOMP_SELFTEST", "vcpu")],
    );
    assert!(vm.wait_listening(), "{}", vm.log());
    let pid = vm.child.id();
    assert_all_filtered(pid, &["vcpu0", "vcpu1"], || vm.log());
    let mut q = Qmp::connect(&vm.sock());
    q.ok("quit", json!({}));
    assert_eq!(
        vm.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        vm.log()
    );
}

#[test]
fn off_installs_no_filter() {
    if !have_kvm() {
        return;
    }
    let mut vm = start(&["--seccomp=off"], &[]);
    assert!(vm.wait_listening(), "{}", vm.log());
    let mut q = Qmp::connect(&vm.sock());
    q.ok("query-status", json!({}));
    std::thread::sleep(Duration::from_millis(500));
    let t = threads(vm.child.id());
    assert!(t.len() > 4, "{t:?}");
    for (name, mode, _) in &t {
        assert_eq!(*mode, 0, "thread '{name}': {t:?}");
    }
    q.ok("quit", json!({}));
    assert_eq!(
        vm.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        vm.log()
    );
}

#[test]
fn a_bad_mode_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = common::cryptvm(
        dir.path(),
        ["run", "--kernel", "nope", "--seccomp", "bogus"],
    );
    assert_eq!(r.status, Some(1), "{r}");
    assert!(
        r.stderr
            .contains("--seccomp: 'bogus': expected on, off or log"),
        "{r}"
    );
    std::fs::write(
        dir.path().join("vm.json"),
        r#"{"machine": {"seccomp": "strict"}}"#,
    )
    .unwrap();
    let r = common::cryptvm(dir.path(), ["run", "--config", "vm.json"]);
    assert_eq!(r.status, Some(1), "{r}");
    assert!(
        r.stderr
            .contains("machine.seccomp: 'strict': expected on, off or log"),
        "{r}"
    );
    let r = common::cryptvm(dir.path(), ["run", "--kernel", "nope", "--seccomp=off"]);
    assert!(r.stderr.contains("kernel"), "{r}");
    let r = common::cryptvm(dir.path(), ["run", "--kernel", "nope"]);
    assert_eq!(r.status, Some(1), "{r}");
    std::fs::write(dir.path().join("kernel"), common::halting_kernel()).unwrap();
    let r = Command::new(common::CRYPTVM)
        .current_dir(dir.path())
        .env("CRYPTVM_SECCOMP_SELFTEST", "nonsense")
        .args(["run", "--kernel", "kernel", "--memory", "32M"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("CRYPTVM_SECCOMP_SELFTEST: unknown thread kind 'nonsense'"),
        "{stderr}"
    );
}
