//! End-to-end: QMP hotplug of a LUKS disk with a detached header into a running guest,
//! and its removal, twice (issue 6).
//!
//! The guest boots with no disk and runs the "hotplug" scenario
//! (resources/guest/scenarios/hotplug.sh, with this file's `hp_io`). Over QMP a driver
//! sends exactly the seven commands of QEMU's "Add LUKS volume to a VM with a detached
//! header" (docs/devel/luks-detached-header.rst; one secret id throughout): object-add
//! secret, blockdev-add file + raw for the header, file + qcow2 for the payload, luks
//! with `header`, device_add virtio-blk-pci. The guest must see /dev/vda within 2 s of
//! device_add's reply (no rescan by hand: the kernel's ACPI PCI hotplug; on a test host
//! where QEMU misses that too, within 1.5x QEMU's latency in the same run), read what
//! qemu-io wrote before the boot, and write its own. Then device_del, the guest ejects,
//! DEVICE_DELETED, blockdev-del of the luks, qcow2, raw and both file nodes, object-del;
//! then the same seven commands again: the guest reads its own writes of the first round
//! and writes more; the same removal; `quit`. Afterwards qemu-io reads the whole disk
//! through the same detached-header stack against a model of what it must hold, and
//! `qemu-img check` finds the qcow2 clean.
//!
//! Two drivers, each against QEMU 10 (the reference) and cryptvm:
//! - `ctl_*`: resources/testhost/qmp-hotplug.sh next to the VMM (inside the L1 test
//!   host), with ONE `cryptvm ctl` connection to the VMM's Unix socket; it follows the
//!   guest through its console (the file the VMM writes it to) and measures the latency
//!   from device_add's reply to the guest's `seen` line.
//! - `python_*`: resources/testhost/qmp-hotplug.py on this machine, with the PyPI
//!   `qemu.qmp` library (unmodified) over TCP (L1's user-mode network forwards a port of
//!   127.0.0.1 to the VMM's `tcp:0.0.0.0:4444`); it follows the guest through L1's console,
//!   into which the guest's console is copied. Its interpreter: `$CRYPTVM_QMP_PYTHON`,
//!   else the virtual environment of resources/testhost/qmp-venv.sh (which .ci/run
//!   makes), else `python3` when it imports qemu.qmp; none: skipped, failed under CI=true.
//!
//! ```sh
//! cargo test -p vmm --test e2e_hotplug qemu::                  # QEMU reference
//! cargo test -p vmm --test e2e_hotplug cryptvm::ctl            # cryptvm, cryptvm ctl
//! CRYPTVM_E2E_KEEP=1 cargo test -p vmm --test e2e_hotplug qemu::python -- --nocapture
//! ```

#[path = "harness.rs"]
mod harness;

#[path = "../common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use common::{IoOp, Scratch};
use harness::{Outcome, Qmp, Scenario, Vmm};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// Virtual size of the disk.
const DISK_SIZE: u64 = 32 * MIB;

/// Add/remove rounds.
const ROUNDS: u32 = 2;

/// The guest must see the disk this soon after device_add's reply (issue 6)...
const MAX_LATENCY_S: f64 = 2.0;
/// ...or, on a test host slow enough that QEMU itself misses that, within this multiple
/// of QEMU's latency in the same run (environment.md: emulation timings are compared
/// with the peer's, never with a fixed figure).
const MAX_LATENCY_VS_QEMU: f64 = 1.5;

/// What qemu-io writes before the boot.
const HOST_WRITES: &[IoOp] = &[
    IoOp::Write(0xab, 0, MIB),
    IoOp::Write(0xcd, 9 * MIB, 64 * KIB),
    IoOp::Write(0x5a, DISK_SIZE - 64 * KIB, 64 * KIB),
];

/// How the guest writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    /// `dd oflag=direct`.
    Direct,
    /// `dd` through the page cache, then `sync`.
    Buffered,
}

/// The guest's writes: (round, key, byte, offset, length, how).
const GUEST_WRITES: &[(u32, &str, u8, u64, u64, How)] = &[
    // Clusters qemu-io left unallocated.
    (1, "w1_new", 0xc3, 2 * MIB, 256 * KIB, How::Direct),
    // Inside qemu-io's first pattern.
    (1, "w1_in_ab", 0x3c, 512 * KIB, 4 * KIB, How::Direct),
    // Not cluster-aligned, through the page cache.
    (
        1,
        "w1_buffered",
        0x77,
        5 * MIB + 12 * KIB,
        100 * KIB,
        How::Buffered,
    ),
    // Round 2: over part of round 1's write, and somewhere new.
    (
        2,
        "w2_over_w1",
        0x69,
        2 * MIB + 64 * KIB,
        8 * KIB,
        How::Direct,
    ),
    (
        2,
        "w2_new",
        0x96,
        12 * MIB + 4 * KIB,
        64 * KIB,
        How::Buffered,
    ),
];

/// Secret and node names of the procedure (the drivers use the same).
const NODES: [&str; 5] = [
    "libvirt-1-storage",
    "libvirt-1-format",
    "libvirt-2-storage",
    "libvirt-2-format",
    "libvirt-3-format",
];

/// The images: header, payload, passphrase, and the model of the disk's contents.
struct Disk {
    scratch: Scratch,
    /// The plain contents as qemu-img sees them before the boot.
    before: Vec<u8>,
}

impl Disk {
    fn new() -> Self {
        let scratch = Scratch::new("e2e-hotplug");
        let dir = scratch.path();
        common::detached_luks_qcow2(&scratch, DISK_SIZE);
        let cmds: Vec<String> = HOST_WRITES.iter().map(IoOp::command).collect();
        common::qemu_io(&scratch.secret_object(), &opts(dir), &cmds);
        let before = plain_view(dir, &scratch.secret_object());
        assert_eq!(before.len() as u64, DISK_SIZE, "qemu-img's plain image");
        let mut expect = vec![0u8; DISK_SIZE as usize];
        for op in HOST_WRITES {
            op.apply(&mut expect);
            let IoOp::Write(_, off, len) = *op else {
                unreachable!()
            };
            let r = off as usize..(off + len) as usize;
            common::assert_same_bytes(&before[r.clone()], &expect[r], "qemu-io's pattern");
        }
        Disk { scratch, before }
    }

    /// The disk after the guest's writes up to `round` (0: before the boot).
    fn model(&self, round: u32) -> Vec<u8> {
        let mut m = self.before.clone();
        for &(r, _, b, off, len, _) in GUEST_WRITES {
            if r <= round {
                m[off as usize..(off + len) as usize].fill(b);
            }
        }
        m
    }

    fn files(&self) -> Vec<(PathBuf, String)> {
        ["pass.txt", "disk.header", "disk.qcow2"]
            .iter()
            .map(|n| (self.scratch.join(n), n.to_string()))
            .collect()
    }
}

/// qemu-io's `--image-opts` for luks (detached header) over qcow2 over file in `dir`.
fn opts(dir: &Path) -> String {
    common::Luks::detached(&dir.join("disk.header"), &dir.join("disk.qcow2")).qcow2_image_opts()
}

/// The plain contents of the disk in `dir`, by `qemu-img convert -O raw`.
fn plain_view(dir: &Path, secret: &str) -> Vec<u8> {
    common::plain_view(dir, secret, &opts(dir))
}

/// The ranges written so far (by qemu-io, and by the guest up to `round`), cut where
/// they overlap: over each piece the disk holds one byte value.
fn pieces(round: u32) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = HOST_WRITES
        .iter()
        .map(|op| match *op {
            IoOp::Write(_, off, len) | IoOp::Zero(off, len) | IoOp::Discard(off, len) => {
                (off, off + len)
            }
        })
        .collect();
    ranges.extend(
        GUEST_WRITES
            .iter()
            .filter(|w| w.0 <= round)
            .map(|w| (w.3, w.3 + w.4)),
    );
    let mut cuts: Vec<u64> = ranges.iter().flat_map(|&(a, b)| [a, b]).collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2)
        .map(|w| (w[0], w[1]))
        .filter(|&(a, b)| ranges.iter().any(|&(s, e)| s <= a && b <= e))
        .map(|(a, b)| (a, b - a))
        .collect()
}

/// The one byte value of `model` over a range (a test design error otherwise).
fn uniform(model: &[u8], off: u64, len: u64) -> u8 {
    let r = &model[off as usize..(off + len) as usize];
    assert!(
        r.iter().all(|&b| b == r[0]),
        "range {off}+{len} is not uniform"
    );
    r[0]
}

/// The guest's /scenario.sh: `hp_io ROUND` checks what the disk must hold when the
/// round begins (O_DIRECT, and once through the page cache), writes the round's
/// patterns, reads them back from the device, and reports `CRYPTVM-HPIO KEY=VALUE`;
/// then the baked hotplug scenario runs.
fn guest_script(disk: &Disk) -> String {
    let mut s = format!(
        r#"# Generated by tests/e2e/hotplug.rs.
HP_ROUNDS={ROUNDS}
HP_WAIT=60
HP_LINGER=30
r() {{ echo "CRYPTVM-HPIO $1=$2"; }}
pat() {{ dd if=/dev/zero bs=$2 count=1 2>/dev/null | tr '\000' "\\$1"; }}
bad=0
# check KEY OFFSET LEN OCTAL [IFLAG]
check() {{
    pat $4 $3 >/tmp/want
    if dd if=/dev/vda of=/tmp/got bs=$3 count=1 skip=$2 iflag=skip_bytes${{5:+,$5}} 2>/tmp/err &&
        cmp -s /tmp/got /tmp/want; then
        r $1 ok
    else
        r $1 bad; bad=$((bad + 1))
        echo "CRYPTVM-HPIO-INFO $1: $(tr '\n' ' ' </tmp/err) $(od -An -tx1 /tmp/got | head -2 | tr '\n' ' ')"
    fi
}}
# write KEY OFFSET LEN OCTAL [OFLAG]
write() {{
    pat $4 $3 >/tmp/w
    dd if=/tmp/w of=/dev/vda bs=$3 count=1 seek=$2 oflag=seek_bytes${{5:+,$5}} conv=notrunc 2>/tmp/err
    rc=$?
    r $1 $rc
    [ $rc = 0 ] || {{ bad=$((bad + 1)); echo "CRYPTVM-HPIO-INFO $1: $(tr '\n' ' ' </tmp/err)"; }}
}}
hp_io() {{
    bad=0
    case $1 in
"#
    );
    let oct = |b: u8| format!("{b:o}");
    for round in 1..=ROUNDS {
        s += &format!("    {round})\n");
        let model = disk.model(round - 1);
        for (i, (off, len)) in pieces(round - 1).into_iter().enumerate() {
            let b = uniform(&model, off, len);
            // The first piece through the page cache, the others with O_DIRECT.
            let flag = if i == 0 { "" } else { "direct" };
            s += &format!(
                "        check r{round}_before_{i} {off} {len} {} {flag}\n",
                oct(b)
            );
        }
        for &(r, key, b, off, len, how) in GUEST_WRITES.iter().filter(|w| w.0 == round) {
            let _ = r;
            let flag = if how == How::Direct { "direct" } else { "" };
            s += &format!("        write {key} {off} {len} {} {flag}\n", oct(b));
        }
        s += "        sync; r sync_$1 $?\n";
        s += "        echo 3 >/proc/sys/vm/drop_caches\n";
        for &(_, key, b, off, len, _) in GUEST_WRITES.iter().filter(|w| w.0 == round) {
            s += &format!("        check r_{key} {off} {len} {} direct\n", oct(b));
        }
        s += "        ;;\n";
    }
    s += "    esac\n    r round_$1_bad $bad\n    [ $bad = 0 ]\n}\n. /scenarios/hotplug.sh\n";
    s
}

/// The guest's `CRYPTVM-HPIO KEY=VALUE` reports.
fn reports(out: &Outcome) -> BTreeMap<String, String> {
    out.l2_console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').split_once("CRYPTVM-HPIO "))
        .filter_map(|(_, kv)| kv.trim().split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The `CRYPTVM-HP WORD key=value ...` lines of the guest, as (WORD, fields).
fn hp_lines(out: &Outcome) -> Vec<(String, BTreeMap<String, String>)> {
    out.l2_console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').split_once("CRYPTVM-HP "))
        .map(|(_, rest)| {
            let mut words = rest.split_whitespace();
            let word = words.next().unwrap_or("").to_string();
            let fields = words
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            (word, fields)
        })
        .collect()
}

/// Which driver sends the commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Driver {
    /// resources/testhost/qmp-hotplug.sh with `cryptvm ctl`, next to the VMM.
    Ctl,
    /// resources/testhost/qmp-hotplug.py with qemu.qmp, on this machine.
    Python,
}

/// The Python interpreter that imports qemu.qmp, if any.
fn qmp_python() -> Option<String> {
    let imports = |py: &str| {
        std::process::Command::new(py)
            .args(["-c", "import qemu.qmp"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if let Ok(py) = std::env::var("CRYPTVM_QMP_PYTHON") {
        assert!(
            imports(&py),
            "CRYPTVM_QMP_PYTHON={py} does not import qemu.qmp"
        );
        return Some(py);
    }
    let venv = std::env::var("CRYPTVM_QMP_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            std::env::var("CRYPTVM_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                        .join(".cache/cryptvm")
                })
                .join("qmp-venv")
        });
    let py = venv.join("bin/python3").display().to_string();
    [py, "python3".to_string()].into_iter().find(|p| imports(p))
}

/// The requests a driver sent, in order: `execute` names, and `wait-event` as
/// `wait-event:NAME`. `prefix` starts each request line of its log.
fn requests(log: &str, prefix: &str) -> Vec<(String, Value)> {
    log.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .map(|j| serde_json::from_str::<Value>(j.trim()).expect("a request line is JSON"))
        .map(|v| {
            let name = match (v.get("execute"), v.get("wait-event")) {
                (Some(e), _) => e.as_str().unwrap_or("").to_string(),
                (None, Some(w)) => format!("wait-event:{}", w.as_str().unwrap_or("")),
                _ => String::new(),
            };
            (name, v)
        })
        .collect()
}

/// The `HOTPLUG round=R latency_s=S ...` lines of a driver's output: latency per round.
fn latencies(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.starts_with("HOTPLUG round="))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix("latency_s="))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

/// QEMU's latencies with `driver` in this process: its test's run, made once (by
/// whichever of its test and cryptvm's asks first; the other waits for it).
fn qemu_latencies(driver: Driver) -> Vec<f64> {
    static CTL: OnceLock<Vec<f64>> = OnceLock::new();
    static PYTHON: OnceLock<Vec<f64>> = OnceLock::new();
    let cell = match driver {
        Driver::Ctl => &CTL,
        Driver::Python => &PYTHON,
    };
    cell.get_or_init(|| hotplug(Vmm::Qemu, driver)).clone()
}

/// Checks cryptvm's latencies: each under [`MAX_LATENCY_S`], or else the worst under
/// [`MAX_LATENCY_VS_QEMU`] times QEMU's worst with the same driver in this run.
fn check_latencies(name: &str, lat: &[f64], driver: Driver, out: &Outcome) {
    let worst = lat.iter().copied().fold(0.0, f64::max);
    if worst < MAX_LATENCY_S {
        return;
    }
    let qemu = qemu_latencies(driver);
    let qemu_worst = qemu.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "{name}: worst latency {worst:.3} s, over {MAX_LATENCY_S} s; QEMU's in this run: {qemu:?}"
    );
    assert!(
        !qemu.is_empty() && worst <= MAX_LATENCY_VS_QEMU * qemu_worst,
        "the guest saw the disk {worst} s after device_add's reply: over {MAX_LATENCY_S} s \
         and over {MAX_LATENCY_VS_QEMU}x QEMU's {qemu_worst} s in this run:\n{out}"
    );
}

/// Boots the guest under `vmm`, drives the hotplug rounds with `driver`, checks it all;
/// returns the latency of each round (none when skipped).
fn hotplug(vmm: Vmm, driver: Driver) -> Vec<f64> {
    if let Some(reason) = harness::skip_reason() {
        eprintln!("skipped: {reason}");
        return Vec::new();
    }
    if !common::require(&["qemu-img", "qemu-io", "qemu-system-x86_64", "python3"]) {
        return Vec::new();
    }
    let python = match driver {
        Driver::Python => match qmp_python() {
            Some(py) => Some(py),
            None if std::env::var("CI").is_ok_and(|v| v == "true") => panic!(
                "no Python with qemu.qmp (CI=true: .ci/run makes it with \
                 resources/testhost/qmp-venv.sh)"
            ),
            None => {
                eprintln!(
                    "SKIPPED: no Python with qemu.qmp (resources/testhost/qmp-venv.sh makes one)"
                );
                return Vec::new();
            }
        },
        Driver::Ctl => None,
    };
    let disk = Disk::new();
    let name = format!(
        "hotplug-{}-{}",
        match vmm {
            Vmm::Qemu => "qemu",
            Vmm::Cryptvm => "cryptvm",
        },
        match driver {
            Driver::Ctl => "ctl",
            Driver::Python => "python",
        }
    );
    let root = harness::repo_root();
    let mut scenario = Scenario::new(&name)
        .vmm(vmm)
        .cpus(2)
        .guest_script(&guest_script(&disk))
        .files(disk.files())
        .return_files()
        .timeout(Duration::from_secs(240));
    scenario = match driver {
        Driver::Ctl => {
            let script = std::fs::read_to_string(root.join("resources/testhost/qmp-hotplug.sh"))
                .expect("reading qmp-hotplug.sh");
            scenario
                .qmp(Qmp::Unix)
                .driver(&format!("HP_ROUNDS={ROUNDS}\nexport HP_ROUNDS\n{script}"))
        }
        Driver::Python => scenario.qmp(Qmp::Tcp).host_driver([
            python.expect("checked above"),
            root.join("resources/testhost/qmp-hotplug.py")
                .display()
                .to_string(),
            "--secret-file".into(),
            disk.scratch.pass_file.display().to_string(),
            "--rounds".into(),
            ROUNDS.to_string(),
            "--timeout".into(),
            "200".into(),
        ]),
    };
    let out = {
        // One VM at a time: the latency limit is judged in emulation time, which a
        // second test host on the same cores would stretch.
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let first = scenario.run();
        // Two stalls of the nested test host get one more run (tests/e2e/README.md):
        // - for either VMM, a guest kernel that never reaches its init (no
        //   CRYPTVM-GUEST-UP, nothing from the VMM but the TCP warning): the known L1 KVM
        //   hang, which Scenario::run retries only when the VMM had to be killed, while
        //   here the driver gives up and quits it;
        // - for the QEMU reference, a guest that stalls mid-I/O (docs/performance.md).
        // cryptvm's cases never get the second kind.
        let log = match driver {
            Driver::Ctl => &first.driver_log,
            Driver::Python => &first.host_log,
        };
        let before_init = first.marker().is_none()
            && log.contains("HOTPLUG failed")
            && first
                .vmm_stderr
                .lines()
                .all(|l| l.trim().is_empty() || l.contains("warning: QMP on 'tcp:"));
        let qemu_stall = matches!(vmm, Vmm::Qemu) && log.contains("HOTPLUG failed: no 'CRYPTVM-HP");
        if before_init || qemu_stall {
            eprintln!(
                "e2e {name}: the guest stalled in the test host; once more. First run:\n{first}"
            );
            scenario.run()
        } else {
            first
        }
    };

    // The driver: its status, the commands it sent, the latencies it measured.
    let (log, transcript, prefix, rc) = match driver {
        Driver::Ctl => (
            out.driver_log.clone(),
            String::from_utf8_lossy(
                out.out_files
                    .get("qmp-transcript.txt")
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
            )
            .into_owned(),
            "-> ",
            out.driver_rc,
        ),
        Driver::Python => (
            out.host_log.clone(),
            out.host_log.clone(),
            "QMP -> ",
            out.host_rc,
        ),
    };
    assert_eq!(
        rc,
        Some(0),
        "the driver failed:\n{out}\n--- transcript ---\n{transcript}"
    );
    assert!(log.contains("HOTPLUG done"), "driver output:\n{out}");
    check_requests(&requests(&transcript, prefix), &transcript, &disk, driver);
    check_events(&transcript, driver, &out);
    let lat = latencies(&log);
    assert_eq!(lat.len(), ROUNDS as usize, "latency lines:\n{out}");
    for (i, l) in lat.iter().enumerate() {
        eprintln!(
            "{name}: round {}: the guest saw /dev/vda {l:.3} s after device_add's reply",
            i + 1
        );
    }
    // QEMU is the reference: its latencies are what cryptvm's are judged against.
    if matches!(vmm, Vmm::Cryptvm) {
        check_latencies(&name, &lat, driver, &out);
    }

    // The guest: no disk at boot, the disk each round, every check and write right.
    let hp = hp_lines(&out);
    let get = |word: &str, round: Option<u32>| {
        hp.iter()
            .find(|(w, f)| {
                w == word && round.is_none_or(|r| f.get("round") == Some(&r.to_string()))
            })
            .map(|(_, f)| f.clone())
            .unwrap_or_else(|| panic!("no 'CRYPTVM-HP {word}' line for round {round:?}:\n{out}"))
    };
    assert_eq!(get("boot", None)["disks"], "0", "disks at boot:\n{out}");
    for round in 1..=ROUNDS {
        let seen = get("seen", Some(round));
        assert_eq!(seen["dev"], "vda", "round {round}:\n{out}");
        assert_eq!(
            seen["sectors"],
            (DISK_SIZE / 512).to_string(),
            "round {round}: the disk's size:\n{out}"
        );
        assert_eq!(
            get("io-done", Some(round))["rc"],
            "0",
            "round {round} I/O:\n{out}"
        );
        get("gone", Some(round));
    }
    assert_eq!(get("end", None)["failed"], "0", "guest:\n{out}");
    assert!(
        !hp.iter()
            .any(|(w, _)| w == "timeout" || w == "linger-expired"),
        "the guest waited in vain:\n{out}"
    );
    let rep = reports(&out);
    let mut expected = 0;
    for round in 1..=ROUNDS {
        for (i, _) in pieces(round - 1).iter().enumerate() {
            let key = format!("r{round}_before_{i}");
            assert_eq!(
                rep.get(&key).map(String::as_str),
                Some("ok"),
                "{key}:\n{out}"
            );
            expected += 1;
        }
        for &(_, key, ..) in GUEST_WRITES.iter().filter(|w| w.0 == round) {
            assert_eq!(rep.get(key).map(String::as_str), Some("0"), "{key}:\n{out}");
            let back = format!("r_{key}");
            assert_eq!(
                rep.get(&back).map(String::as_str),
                Some("ok"),
                "{back}:\n{out}"
            );
            expected += 1;
        }
        let sync = format!("sync_{round}");
        assert_eq!(
            rep.get(&sync).map(String::as_str),
            Some("0"),
            "{sync}:\n{out}"
        );
    }
    assert_eq!(
        rep.values().filter(|v| *v == "ok").count(),
        expected,
        "every check reported once:\n{out}"
    );
    // `quit` ends the VM: QEMU and cryptvm exit 0.
    assert_eq!(out.exit_code, Some(0), "VMM exit code:\n{out}");

    // The images as the VMM left them, read by the peers.
    let back = tempfile::tempdir().unwrap();
    for file in ["disk.header", "disk.qcow2"] {
        let data = out
            .out_files
            .get(&format!("files/{file}"))
            .unwrap_or_else(|| panic!("{file} did not come back from the run:\n{out}"));
        std::fs::write(back.path().join(file), data).unwrap();
    }
    common::assert_qemu_check_clean(back.path(), "disk.qcow2");
    let model = disk.model(ROUNDS);
    let cmds = common::read_pattern_cmds(&model, 512);
    let r = common::qemu_io(&disk.scratch.secret_object(), &opts(back.path()), &cmds);
    assert_eq!(
        r.stdout.matches("read ").count(),
        cmds.len(),
        "qemu-io did not run every read:\n{r}"
    );
    let after = plain_view(back.path(), &disk.scratch.secret_object());
    common::assert_same_bytes(&after, &model, "the disk after the run");
    lat
}

/// The driver sent exactly: one query-version, then per round the seven commands and
/// the removal, then `quit`.
#[track_caller]
fn check_requests(sent: &[(String, Value)], transcript: &str, disk: &Disk, driver: Driver) {
    let mut want: Vec<&str> = vec!["query-version"];
    for _ in 0..ROUNDS {
        want.extend(["object-add"]);
        want.extend(["blockdev-add"; 5]);
        want.push("device_add");
        want.push("device_del");
        if driver == Driver::Ctl {
            // ctl's pseudo-request (qemu.qmp's event listener sends nothing).
            want.push("wait-event:DEVICE_DELETED");
        }
        want.extend(["blockdev-del"; 5]);
        want.push("object-del");
    }
    want.push("quit");
    let names: Vec<&str> = sent.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, want, "the requests sent:\n{transcript}");

    // The arguments of the procedure: one secret, the header under raw, the payload
    // under qcow2, luks over both with that secret, the device on the luks node.
    let pass = std::fs::read_to_string(&disk.scratch.pass_file).unwrap();
    let adds: Vec<&Value> = sent
        .iter()
        .filter(|(n, _)| n == "object-add" || n == "blockdev-add" || n == "device_add")
        .map(|(_, v)| &v["arguments"])
        .collect();
    for round in adds.chunks(7) {
        assert_eq!(round[0]["qom-type"], "secret");
        assert_eq!(round[0]["data"], pass.as_str());
        let secret = round[0]["id"].as_str().unwrap();
        let node = |i: usize| (round[i + 1]["node-name"].as_str().unwrap(), &round[i + 1]);
        assert_eq!(
            (0..5).map(|i| node(i).0).collect::<Vec<_>>(),
            NODES,
            "{transcript}"
        );
        assert_eq!(node(0).1["driver"], "file");
        assert!(node(0).1["filename"]
            .as_str()
            .unwrap()
            .ends_with("/disk.header"));
        assert_eq!(node(1).1["driver"], "raw");
        assert_eq!(node(1).1["file"], NODES[0]);
        assert_eq!(node(2).1["driver"], "file");
        assert!(node(2).1["filename"]
            .as_str()
            .unwrap()
            .ends_with("/disk.qcow2"));
        assert_eq!(node(3).1["driver"], "qcow2");
        assert_eq!(node(3).1["file"], NODES[2]);
        assert_eq!(node(4).1["driver"], "luks");
        assert_eq!(node(4).1["file"], NODES[3]);
        assert_eq!(node(4).1["header"], NODES[1]);
        assert_eq!(node(4).1["key-secret"], secret, "one secret id throughout");
        assert_eq!(round[6]["driver"], "virtio-blk-pci");
        assert_eq!(round[6]["drive"], NODES[4]);
    }
    let dels: Vec<&str> = sent
        .iter()
        .filter(|(n, _)| n == "blockdev-del")
        .map(|(_, v)| v["arguments"]["node-name"].as_str().unwrap())
        .collect();
    for round in dels.chunks(5) {
        assert_eq!(round[0], NODES[4], "luks first: {transcript}");
        let mut sorted = round.to_vec();
        sorted.sort_unstable();
        let mut all = NODES.to_vec();
        all.sort_unstable();
        assert_eq!(sorted, all, "every node deleted: {transcript}");
    }
}

/// Each device_del was followed by the device's DEVICE_DELETED, and no reply was an error.
#[track_caller]
fn check_events(transcript: &str, driver: Driver, out: &Outcome) {
    let (reply_prefix, event_marker) = match driver {
        Driver::Ctl => ("<- ", "\"event\": \"DEVICE_DELETED\""),
        Driver::Python => ("QMP <- ", "\"event\": \"DEVICE_DELETED\""),
    };
    let replies: Vec<&str> = transcript
        .lines()
        .filter_map(|l| l.strip_prefix(reply_prefix))
        .collect();
    assert!(
        !replies
            .iter()
            .any(|r| r.contains("\"error\"") || r.starts_with("error")),
        "an error reply:\n{transcript}"
    );
    let deleted = replies
        .iter()
        .filter(|r| {
            r.replace("\":\"", "\": \"").contains(event_marker) && r.contains("\"virtio-disk2\"")
        })
        .count();
    assert_eq!(
        deleted, ROUNDS as usize,
        "DEVICE_DELETED for virtio-disk2 once per round:\n{transcript}\n{out}"
    );
}

/// QEMU 10, the reference: proves the guest, the drivers and the harness.
mod qemu {
    use super::*;

    #[test]
    fn ctl_seven_commands_twice() {
        qemu_latencies(Driver::Ctl);
    }

    #[test]
    fn python_qemu_qmp_seven_commands_twice() {
        qemu_latencies(Driver::Python);
    }
}

/// `cryptvm run --qmp`, the product (`CRYPTVM_E2E_VMM=qemu` swaps in QEMU).
mod cryptvm {
    use super::*;

    #[test]
    fn ctl_seven_commands_twice() {
        hotplug(Vmm::from_env_or(Vmm::Cryptvm), Driver::Ctl);
    }

    #[test]
    fn python_qemu_qmp_seven_commands_twice() {
        hotplug(Vmm::from_env_or(Vmm::Cryptvm), Driver::Python);
    }
}

/// Parts that need no VM.
mod parts {
    use super::*;

    /// The guest's checks cover every written range exactly once per round, and the
    /// pieces are uniform in the model (no VM: only the arithmetic).
    #[test]
    fn pieces_cover_the_writes() {
        let p0 = pieces(0);
        assert_eq!(p0.len(), HOST_WRITES.len());
        let p1 = pieces(1);
        // w1_in_ab cuts qemu-io's first pattern in three; w1_new and w1_buffered are new.
        assert_eq!(p1.len(), HOST_WRITES.len() + 2 + 2);
        let total: u64 = p1.iter().map(|p| p.1).sum();
        let written: u64 = HOST_WRITES
            .iter()
            .map(|op| match *op {
                IoOp::Write(_, _, l) | IoOp::Zero(_, l) | IoOp::Discard(_, l) => l,
            })
            .sum::<u64>()
            + GUEST_WRITES
                .iter()
                .filter(|w| w.0 == 1)
                .map(|w| w.4)
                .sum::<u64>()
            - 4 * KIB; // w1_in_ab lies inside qemu-io's first pattern
        assert_eq!(total, written);
    }

    /// The driver scripts send the secret id the luks node names (one id throughout)
    /// and the node names this test checks.
    #[test]
    fn drivers_use_one_secret_id() {
        let root = harness::repo_root();
        for file in [
            "resources/testhost/qmp-hotplug.sh",
            "resources/testhost/qmp-hotplug.py",
        ] {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            assert!(!text.contains("libvirt-2-format-secret"), "{file}");
            assert!(text.contains("libvirt-4-format-secret"), "{file}");
            for node in NODES {
                assert!(text.contains(node), "{file}: {node}");
            }
        }
    }
}
