//! End-to-end: concurrent O_DIRECT writers on a 2-queue encrypted disk, with the VMM given
//! many more worker threads than cores (issue 10).
//!
//! One virtio-blk-pci disk with `num-queues: 2` over the mission stack: luks with a
//! detached header (raw over file; made by QEMU's own LUKS code) over a qcow2 payload.
//! The guest (2 vCPUs, so both queues carry requests) runs `blkio writers`
//! (resources/guest/blkio.c): [`JOBS`] threads started together, each writing its own
//! [`REGION`] of the disk [`PASSES`] times in O_DIRECT requests of [`BLOCK`] bytes, each
//! block holding a pattern of (writer, pass, block); then a flush, then a concurrent
//! O_DIRECT read-back that compares every byte with the last pass's pattern. It prints
//! one `BLKIO-WRITERS ...` line. A guest-side watchdog reports `BLKIO-WRITERS-TIMEOUT` and
//! powers the guest off when the disk completes no request for [`STALL_SECS`], and the harness's time limit
//! stops a VMM that does not exit, so a hung data path fails the test, with the VMM's
//! standard error in the message.
//!
//! cryptvm runs with [`WORKERS`] request workers (`--io-workers`, see
//! [`worker_threads`]), what a 16-core host has, on the test host's 2 vCPUs. A script next
//! to the VMM samples the VMM's thread count, so the test knows it really ran with them.
//!
//! After power-off the peers check the image the VMM left: `qemu-img check` finds the
//! qcow2 payload clean, and `qemu-img compare` through the luks detached-header stack
//! (`--image-opts`) against a raw file of the expected patterns, computed here, finds them
//! identical, as does a byte-by-byte comparison of `qemu-img convert`'s plain image.
//!
//! ```sh
//! cargo test -p vmm --test e2e_concurrency qemu::         # QEMU 10, the reference
//! cargo test -p vmm --test e2e_concurrency cryptvm::      # cryptvm
//! cargo test -p vmm --test e2e_concurrency parts::        # no VM: pattern and checks
//! ```

#[path = "harness.rs"]
mod harness;

#[path = "../common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Scratch;
use harness::{Outcome, Qmp, Scenario, Vmm};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// Concurrent writers in the guest.
const JOBS: u64 = 8;
/// Bytes of the disk each writer owns.
const REGION: u64 = 4 * MIB;
/// Bytes of each O_DIRECT request.
const BLOCK: u64 = MIB;
/// Times each writer writes its whole region (the first allocates qcow2 clusters, the
/// others overwrite them).
const PASSES: u64 = 2;
/// Virtual size of the disk: the writers' regions, end to end.
const DISK_SIZE: u64 = JOBS * REGION;
/// Request queues of the virtio-blk device.
const QUEUES: u32 = 2;
/// Worker threads the VMM is given (the test host has 2 vCPUs); `CRYPTVM_E2E_WORKERS`
/// overrides it.
const WORKERS: u32 = 16;
/// Seconds without a completed request (while the writers run) after which the guest
/// reports the disk stuck and powers off. Under the nested test host a 1 MiB request
/// takes well under 5 s even with all eight in flight.
const STALL_SECS: u32 = 30;
/// Serial of the disk, as the guest reads it in /sys/block/vda/serial.
const SERIAL: &str = "cvm-writers0";

/// How the VMM is given [`WORKERS`] worker threads: environment variables and arguments.
fn worker_threads(vmm: Vmm) -> (Vec<(String, String)>, Vec<String>) {
    match vmm {
        // The request workers every disk queue shares (docs/disks.md).
        Vmm::Cryptvm => (
            Vec::new(),
            vec!["--io-workers".into(), workers().to_string()],
        ),
        // QEMU sizes its own I/O thread pool (up to 64 threads).
        Vmm::Qemu => (Vec::new(), Vec::new()),
    }
}

/// [`WORKERS`], or `CRYPTVM_E2E_WORKERS`.
fn workers() -> u32 {
    match std::env::var("CRYPTVM_E2E_WORKERS") {
        Ok(v) if !v.is_empty() => v
            .parse()
            .unwrap_or_else(|_| panic!("CRYPTVM_E2E_WORKERS={v}: expected a number")),
        _ => WORKERS,
    }
}

/// Word `i` (little-endian) of block `b` of writer `w` in pass `p`, as blkio.c computes
/// it: splitmix64 of the packed indices.
fn pattern_word(w: u64, p: u64, b: u64, i: u64) -> u64 {
    let mut z = (w << 56 ^ p << 48 ^ b << 32 ^ i ^ 0x6a09_e667_f3bc_c908)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What the disk holds after `blkio writers DEV JOBS REGION BLOCK PASSES`: each block
/// the last pass's pattern.
fn expected_disk() -> Vec<u8> {
    let mut disk = Vec::with_capacity(DISK_SIZE as usize);
    for w in 0..JOBS {
        for b in 0..REGION / BLOCK {
            for i in 0..BLOCK / 8 {
                disk.extend_from_slice(&pattern_word(w, PASSES - 1, b, i).to_le_bytes());
            }
        }
    }
    disk
}

/// The `blkio writers`/`check` arguments after the device.
fn blkio_args() -> String {
    format!("{JOBS} {REGION} {BLOCK} {PASSES}")
}

/// The `objects`, `blockdevs` and `devices` of the interface's config file, with file
/// names under `dir` (`""`: relative, as in the config file next to the images).
fn stack(dir: &str) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let f = |name: &str| {
        if dir.is_empty() {
            name.to_string()
        } else {
            format!("{dir}/{name}")
        }
    };
    let objects = vec![json!({"qom-type": "secret", "id": "sec0", "file": f("pass.txt")})];
    let blockdevs = vec![
        json!({"node-name": "hdr-storage", "driver": "file", "filename": f("disk.header")}),
        json!({"node-name": "hdr", "driver": "raw", "file": "hdr-storage"}),
        json!({"node-name": "payload", "driver": "qcow2",
               "file": {"driver": "file", "filename": f("disk.qcow2")}}),
        json!({"node-name": "disk0", "driver": "luks", "file": "payload", "header": "hdr",
               "key-secret": "sec0"}),
    ];
    let devices = vec![json!({"driver": "virtio-blk-pci", "drive": "disk0",
        "id": "virtio-disk0", "serial": SERIAL, "num-queues": QUEUES})];
    (objects, blockdevs, devices)
}

/// The VMM arguments that attach the disk (`--config` for cryptvm, the same JSON objects
/// as `-object`/`-blockdev`/`-device` for QEMU), then those of [`worker_threads`].
fn vmm_args(vmm: Vmm) -> Vec<String> {
    let mut args = Vec::new();
    match vmm {
        Vmm::Cryptvm => args.extend(["--config".to_string(), "@FILES@/vm.json".to_string()]),
        Vmm::Qemu => {
            let (objects, blockdevs, devices) = stack("@FILES@");
            for (opt, list) in [
                ("-object", objects),
                ("-blockdev", blockdevs),
                ("-device", devices),
            ] {
                for v in list {
                    args.push(opt.to_string());
                    args.push(v.to_string());
                }
            }
        }
    }
    args.extend(worker_threads(vmm).1);
    args
}

/// The images: a QEMU-made detached LUKS header and an empty qcow2 payload, with the
/// config file that names them.
fn make_disk() -> Scratch {
    let scratch = Scratch::new("e2e-writers");
    common::detached_luks_qcow2(&scratch, DISK_SIZE);
    let (objects, blockdevs, devices) = stack("");
    let config = json!({"objects": objects, "blockdevs": blockdevs, "devices": devices});
    scratch.write(
        "vm.json",
        serde_json::to_string_pretty(&config).unwrap().as_bytes(),
    );
    scratch
}

/// The guest's script: find the disk, report its queues and limits, run the writers under
/// a watchdog.
fn guest_script() -> String {
    r#"# Generated by tests/e2e/concurrency.rs.
n=0
while [ ! -b /dev/vda ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
[ -b /dev/vda ] || { echo "BLKIO-WRITERS-INFO no disk"; exit 1; }
q=/sys/block/vda/queue
echo "BLKIO-WRITERS-INFO serial=$(cat /sys/block/vda/serial) size=$(cat /sys/block/vda/size) queues=$(ls /sys/block/vda/mq | wc -l) max_sectors_kb=$(cat $q/max_sectors_kb) max_segments=$(cat $q/max_segments) nr_requests=$(cat $q/nr_requests)"
command -v blkio >/dev/null || { echo "BLKIO-WRITERS-INFO no blkio (resources/guest/build.sh needs cc)"; exit 1; }
# A disk that stops answering leaves the writers in uninterruptible sleep: when no
# request completes for @STALL@ s, say so, with the requests still in flight, and power off.
(
    last= still=0
    while :; do
        sleep 5
        read -r r1 _ _ _ w1 _ </sys/block/vda/stat
        if [ "$((r1 + w1))" = "$last" ]; then still=$((still + 5)); else still=0; fi
        last=$((r1 + w1))
        if [ $still -ge @STALL@ ]; then
            echo "BLKIO-WRITERS-TIMEOUT stalled=${still}s completed=$last inflight=$(cat /sys/block/vda/inflight | tr -s ' ' ,)"
            poweroff -f
        fi
    done
) &
watchdog=$!
echo "BLKIO-WRITERS-BEGIN"
blkio writers /dev/vda @ARGS@
rc=$?
kill $watchdog
exit $rc
"#
    .replace("@STALL@", &STALL_SECS.to_string())
    .replace("@ARGS@", &blkio_args())
}

/// Runs next to the VMM: the largest number of threads the VMM had, sampled until it
/// exits, into `vmm-threads` of the results.
const THREAD_SAMPLER: &str = r#"max=0
while [ -d /proc/$CRYPTVM_VMM_PID/task ]; do
    n=$(ls /proc/$CRYPTVM_VMM_PID/task 2>/dev/null | wc -l)
    if [ "$n" -gt "$max" ]; then max=$n; echo $max >"$CRYPTVM_OUT/vmm-threads"; fi
    sleep 0.2
done
echo "most VMM threads: $max"
"#;

/// The `KEY=VALUE` fields of the first console line starting with `tag` (followed by a
/// space), or `None`.
fn fields(out: &Outcome, tag: &str) -> Option<BTreeMap<String, String>> {
    let line = out.l2_console.lines().find_map(|l| {
        let l = l.trim_end_matches('\r');
        l.find(&format!("{tag} ")).map(|at| &l[at + tag.len()..])
    })?;
    Some(
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// Boots the guest under `vmm`, runs the writers, and checks the guest's read-back and
/// the image the VMM left.
fn eight_writers(vmm: Vmm) {
    if let Some(reason) = harness::skip_reason() {
        eprintln!("skipped: {reason}");
        return;
    }
    if !common::require(&["qemu-img", "qemu-system-x86_64", "python3"]) {
        return;
    }
    let scratch = make_disk();
    let name = match vmm {
        Vmm::Qemu => "writers-qemu",
        Vmm::Cryptvm => "writers-cryptvm",
    };
    let files: Vec<(PathBuf, String)> = ["pass.txt", "disk.header", "disk.qcow2", "vm.json"]
        .iter()
        .map(|n| (scratch.join(n), n.to_string()))
        .collect();
    let out = Scenario::new(name)
        .vmm(vmm)
        .cpus(2)
        .guest_script(&guest_script())
        .files(files)
        .vmm_args(vmm_args(vmm))
        .vmm_env(worker_threads(vmm).0)
        .qmp(Qmp::Unix)
        .driver(THREAD_SAMPLER)
        .return_files_up_to(2 * DISK_SIZE / MIB)
        .timeout(Duration::from_secs(240))
        .run();

    assert!(
        out.marker().is_some(),
        "the guest never reached its init:\n{out}"
    );
    assert!(
        !out.l2_console.contains("BLKIO-WRITERS-TIMEOUT"),
        "the disk completed no request for {STALL_SECS} s while the writers waited:\n{out}"
    );
    let info = fields(&out, "BLKIO-WRITERS-INFO")
        .unwrap_or_else(|| panic!("the guest did not report its disk:\n{out}"));
    let get = |m: &BTreeMap<String, String>, k: &str| m.get(k).cloned().unwrap_or_default();
    assert_eq!(get(&info, "serial"), SERIAL, "the disk:\n{out}");
    assert_eq!(
        get(&info, "size"),
        (DISK_SIZE / 512).to_string(),
        "size:\n{out}"
    );
    assert_eq!(
        get(&info, "queues"),
        QUEUES.to_string(),
        "the guest's hardware queues:\n{out}"
    );
    let result = fields(&out, "BLKIO-WRITERS").unwrap_or_else(|| {
        panic!(
            "the writers never reported (VMM exit code {:?}):\n{out}",
            out.exit_code
        )
    });
    let blocks = JOBS * REGION / BLOCK;
    for (key, want) in [
        ("writes", (blocks * PASSES).to_string()),
        ("write_errors", "0".into()),
        ("flush", "0".into()),
        ("reads", blocks.to_string()),
        ("read_errors", "0".into()),
        ("checked", DISK_SIZE.to_string()),
        ("bad", "0".into()),
    ] {
        assert_eq!(get(&result, key), want, "the guest's {key}:\n{out}");
    }
    assert_eq!(out.scenario_rc(), Some(0), "scenario status:\n{out}");
    assert!(out.powered_off(), "the guest did not power off:\n{out}");
    assert_eq!(out.exit_code, Some(0), "VMM exit code:\n{out}");
    assert!(
        !out.vmm_stderr.contains("panicked"),
        "a thread of the VMM panicked:\n{out}"
    );
    if vmm == Vmm::Cryptvm {
        let threads: u32 = String::from_utf8_lossy(
            out.out_files
                .get("vmm-threads")
                .map(Vec::as_slice)
                .unwrap_or(b"0"),
        )
        .trim()
        .parse()
        .unwrap_or(0);
        let workers = workers();
        assert!(
            threads >= workers,
            "the VMM had at most {threads} threads, fewer than the {workers} workers it was \
             to be given (worker_threads() in tests/e2e/concurrency.rs):\n{out}"
        );
    }

    let back = tempfile::tempdir().unwrap();
    for file in ["disk.header", "disk.qcow2"] {
        let data = out
            .out_files
            .get(&format!("files/{file}"))
            .unwrap_or_else(|| panic!("{file} did not come back from the run:\n{out}"));
        std::fs::write(back.path().join(file), data).unwrap();
    }
    check_image(back.path(), &scratch, &out);
}

/// The peers' view of the image: a clean qcow2 payload whose luks contents are the
/// writers' last patterns, every byte.
fn check_image(dir: &Path, scratch: &Scratch, out: &dyn std::fmt::Display) {
    common::assert_qemu_check_clean(dir, "disk.qcow2");
    let want = expected_disk();
    let model = dir.join("expected.raw");
    std::fs::write(&model, &want).unwrap();
    let luks = common::Luks::detached(&dir.join("disk.header"), &dir.join("disk.qcow2"));
    let raw_opts = format!("driver=raw,file.filename={}", model.display());
    let compared = common::run(
        "qemu-img",
        [
            "compare",
            "--object",
            &scratch.secret_object(),
            "--image-opts",
            &luks.qcow2_image_opts(),
            &raw_opts,
        ],
        None,
    );
    assert!(
        compared.status == Some(0) && compared.stdout.contains("Images are identical"),
        "qemu-img compare: the luks disk does not hold the writers' patterns:\n{compared}\n{out}"
    );
    let plain = common::plain_view(dir, &scratch.secret_object(), &luks.qcow2_image_opts());
    common::assert_same_bytes(&plain, &want, "the luks disk after the writers");
}

/// QEMU 10, the reference: proves the guest helper, the image checks and the harness.
mod qemu {
    use super::*;

    #[test]
    fn eight_writers_on_two_queues() {
        eight_writers(Vmm::Qemu);
    }
}

/// `cryptvm run --config` with many worker threads, the product (`CRYPTVM_E2E_VMM=qemu`
/// swaps in QEMU).
mod cryptvm {
    use super::*;

    #[test]
    fn eight_writers_on_two_queues() {
        eight_writers(Vmm::from_env_or(Vmm::Cryptvm));
    }
}

/// Parts that need no VM.
mod parts {
    use super::*;

    /// blkio.c built as build.sh builds it, in a folder that takes O_DIRECT; `None` when
    /// no C compiler is installed (outside CI).
    fn build_blkio(dir: &Path) -> Option<PathBuf> {
        if !common::require(&["cc"]) {
            return None;
        }
        let bin = dir.join("blkio");
        let src = harness::repo_root().join("resources/guest/blkio.c");
        let src = src.to_string_lossy();
        let out = bin.to_string_lossy();
        common::run("cc", ["-static", "-O2", "-pthread", "-o", &out, &src], None).ok();
        Some(bin)
    }

    fn target_tmp() -> tempfile::TempDir {
        // The target folder is on a disk (O_DIRECT works there; tmpfs refuses it).
        tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
    }

    /// The guest helper writes the patterns this file expects, and its read-back notices
    /// a changed byte (and where) and a wrong pass.
    #[test]
    fn blkio_writes_the_expected_patterns_and_notices_a_bad_byte() {
        let dir = target_tmp();
        let Some(blkio) = build_blkio(dir.path()) else {
            return;
        };
        let disk = dir.path().join("disk.raw");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(DISK_SIZE)
            .unwrap();
        let dev = disk.to_string_lossy().into_owned();
        let run = |cmd: &str, passes: u64| {
            let args: Vec<String> = [cmd.to_string(), dev.clone()]
                .into_iter()
                .chain(
                    format!("{JOBS} {REGION} {BLOCK} {passes}")
                        .split(' ')
                        .map(String::from),
                )
                .collect();
            common::run(&blkio.to_string_lossy(), &args, None)
        };
        let wrote = run("writers", PASSES);
        assert_eq!(wrote.status, Some(0), "{wrote}");
        assert!(wrote.stdout.contains(" bad=0 first_bad=none "), "{wrote}");
        common::assert_same_bytes(&common::read(&disk), &expected_disk(), "blkio's patterns");

        let at = 3 * REGION + BLOCK + 4321;
        let mut bytes = common::read(&disk);
        bytes[at as usize] ^= 0x40;
        std::fs::write(&disk, &bytes).unwrap();
        let checked = run("check", PASSES);
        assert_eq!(checked.status, Some(1), "{checked}");
        assert!(
            checked.stdout.contains(&format!(" bad=1 first_bad={at} ")),
            "{checked}"
        );
        let earlier = run("check", PASSES - 1);
        assert_eq!(earlier.status, Some(1), "{earlier}");
        assert!(earlier.stdout.contains(" first_bad=0 "), "{earlier}");
    }

    /// The checks after the run notice a disk the writers did not write, and one whose
    /// payload holds all but one of their blocks.
    #[test]
    fn image_checks_notice_missing_writes() {
        if !common::require(&["qemu-img", "qemu-io", "python3"]) {
            return;
        }
        let scratch = make_disk();
        let dir = scratch.path().to_path_buf();
        let fails = |what: &str| {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                check_image(&dir, &scratch, &"(no run)")
            }));
            assert!(result.is_err(), "{what} passed the checks");
        };
        fails("the untouched image");

        // Every block as the writers leave it, but one written in an earlier pass.
        let luks =
            common::Luks::detached(&scratch.join("disk.header"), &scratch.join("disk.qcow2"));
        let mut want = expected_disk();
        let stale = (5 * REGION + 2 * BLOCK) as usize;
        for (i, chunk) in want[stale..stale + BLOCK as usize]
            .chunks_mut(8)
            .enumerate()
        {
            chunk.copy_from_slice(&pattern_word(5, PASSES - 2, 2, i as u64).to_le_bytes());
        }
        let plain = scratch.write("want.raw", &want);
        common::run(
            "qemu-img",
            [
                "convert",
                "-n",
                "--object",
                &scratch.secret_object(),
                "-f",
                "raw",
                &plain.to_string_lossy(),
                "--target-image-opts",
                &luks.qcow2_image_opts(),
            ],
            None,
        )
        .ok();
        fails("an image with one stale block");

        // And the image as the writers leave it passes (the checks are not always false).
        std::fs::write(&plain, expected_disk()).unwrap();
        common::run(
            "qemu-img",
            [
                "convert",
                "-n",
                "--object",
                &scratch.secret_object(),
                "-f",
                "raw",
                &plain.to_string_lossy(),
                "--target-image-opts",
                &luks.qcow2_image_opts(),
            ],
            None,
        )
        .ok();
        check_image(&dir, &scratch, &"(qemu-img's writes)");
    }

    /// The config file and QEMU's arguments describe the same 2-queue stack; cryptvm is
    /// given its workers.
    #[test]
    fn both_vmms_get_the_same_two_queue_stack() {
        let (o, b, d) = stack("");
        assert_eq!((o.len(), b.len(), d.len()), (1, 4, 1));
        assert_eq!(d[0]["num-queues"], QUEUES);
        assert_eq!(b[3]["header"], "hdr");
        let args = vmm_args(Vmm::Qemu);
        let device: Value = serde_json::from_str(args.last().unwrap()).unwrap();
        assert_eq!(args[args.len() - 2], "-device");
        assert_eq!(device["num-queues"], QUEUES);
        assert_eq!(vmm_args(Vmm::Cryptvm)[..2], ["--config", "@FILES@/vm.json"]);
        let (env, extra) = worker_threads(Vmm::Cryptvm);
        assert!(
            env.iter().any(|(_, v)| v == &workers().to_string())
                || extra.contains(&workers().to_string()),
            "cryptvm is not given its workers"
        );
        assert!(guest_script().contains(&format!("blkio writers /dev/vda {}", blkio_args())));
    }
}
