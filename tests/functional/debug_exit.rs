//! The guest sets `cryptvm run`'s exit status: tiny PVH guests write to an
//! `isa-debug-exit` port (status `(V << 1) | 1`, as QEMU), or loop until `--timeout`
//! stops them (status 124). They run on this machine's `/dev/kvm` (software KVM is
//! fast enough for a few instructions).

#[path = "../common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use common::without_slow_kvm_warning;

/// `mov al, 5; out 0xf4, al`, then `1: hlt; jmp 1b`.
const WRITE_5_TO_F4: &[u8] = &[0xb0, 0x05, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd];

/// `mov dx, 0x502; mov ax, 0x121; out dx, ax` (a 2-byte write at offset 1 of the default
/// range 0x501..0x502), then `1: hlt; jmp 1b`.
const WRITE_0X121_TO_502: &[u8] = &[
    0x66, 0xba, 0x02, 0x05, 0x66, 0xb8, 0x21, 0x01, 0x66, 0xef, 0xf4, 0xeb, 0xfd,
];

/// `1: jmp 1b`: busy forever.
const SPIN: &[u8] = &[0xeb, 0xfe];

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

/// `cryptvm run --kernel kernel --memory 32M --serial file:console.log EXTRA...` in `dir`
/// with `code` as the kernel; returns the run and how long it took.
fn run_guest(dir: &Path, code: &[u8], extra: &[&str]) -> (common::Run, Duration) {
    std::fs::write(dir.join("kernel"), common::pvh_kernel(code)).unwrap();
    let mut args = vec![
        "run",
        "--kernel",
        "kernel",
        "--memory",
        "32M",
        "--serial",
        "file:console.log",
    ];
    args.extend(extra);
    let start = Instant::now();
    let run = common::cryptvm(dir, &args);
    (run, start.elapsed())
}

#[test]
fn a_write_of_5_to_port_0xf4_exits_with_11() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (run, _) = run_guest(
        dir.path(),
        WRITE_5_TO_F4,
        &["--device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
    );
    assert_eq!(run.status, Some(11), "{run}");
    assert!(without_slow_kvm_warning(&run.stderr).is_empty(), "{run}");
}

#[test]
fn the_config_file_device_with_qemus_defaults_takes_a_2_byte_write() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("vm.json"),
        json!({"devices": [{"driver": "isa-debug-exit"}]}).to_string(),
    )
    .unwrap();
    let (run, _) = run_guest(dir.path(), WRITE_0X121_TO_502, &["--config", "vm.json"]);
    // (0x121 << 1) | 1 = 0x243; a process status keeps the low 8 bits.
    assert_eq!(run.status, Some(0x43), "{run}");
}

#[test]
fn without_the_device_the_write_goes_nowhere() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (run, _) = run_guest(dir.path(), WRITE_5_TO_F4, &["--timeout", "1"]);
    assert_eq!(run.status, Some(124), "{run}");
}

#[test]
fn a_guest_that_loops_forever_is_stopped_by_the_timeout() {
    if !have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (run, took) = run_guest(dir.path(), SPIN, &["--timeout", "2"]);
    assert_eq!(run.status, Some(124), "{run}");
    let stderr = without_slow_kvm_warning(&run.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{run}");
    assert!(lines[0].contains("--timeout"), "{run}");
    assert!(took >= Duration::from_secs(2), "took {took:?}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn bad_device_properties_and_timeouts_are_refused_before_kvm() {
    let dir = tempfile::tempdir().unwrap();
    let (run, _) = run_guest(
        dir.path(),
        SPIN,
        &["--device", "isa-debug-exit,iobase=0xf4,colour=blue"],
    );
    run.clean_error(1, &["Property 'isa-debug-exit.colour' not found"]);
    let (run, _) = run_guest(dir.path(), SPIN, &["--timeout", "soon"]);
    run.clean_error(1, &["--timeout"]);
    // Its ports are the serial port's.
    let (run, _) = run_guest(
        dir.path(),
        SPIN,
        &["--device", "isa-debug-exit,iobase=0x3f8"],
    );
    if have_kvm() {
        run.clean_error(
            1,
            &["devices[0]: isa-debug-exit: I/O ports 0x3f8..0x3f9 overlap"],
        );
    }
}
