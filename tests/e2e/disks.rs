//! End-to-end: a guest boots with virtio-blk-pci disks from the config file and uses
//! them as a Linux guest does (issue 5).
//!
//! Three disks, defined by `objects`/`blockdevs`/`devices` exactly as in the interface's
//! config file (a `--config` JSON file for cryptvm; the same JSON objects as `-object`,
//! `-blockdev` and `-device` arguments for QEMU 10, the reference):
//! - `vda`: luks with a detached header (made by QEMU's own LUKS code through
//!   resources/scripts/qemu-luks-create.py) over qcow2 over file, into which `qemu-io`
//!   wrote patterns before the boot;
//! - `vdb`: raw over file (`discard: unmap`), filled with one byte value by the test;
//! - `vdc`: raw over file, both nodes `read-only: true`.
//!
//! The guest (a script generated here from the same list of requests the test checks
//! afterwards) finds each disk by its serial, reports its name, size and read-only flag,
//! reads qemu-io's patterns on vda (with O_DIRECT and through the page cache), writes its
//! own at several offsets (O_DIRECT, and buffered followed by `sync`), discards and zeroes
//! ranges of vdb (BLKDISCARD and BLKZEROOUT through the guest's `blkio` helper, with the
//! queue limits that say the device takes DISCARD and WRITE_ZEROES), tries to write to
//! vdc, and reports each result as a `CRYPTVM-DISK KEY=VALUE` line. After power-off,
//! `qemu-io` reads the whole luks disk through the same detached-header stack against a
//! model of what it must hold, `qemu-img check` finds the qcow2 clean, the raw file holds
//! the expected bytes, and the read-only file is unchanged.
//!
//! ```sh
//! cargo test -p vmm --test e2e_disks qemu::                 # QEMU reference
//! cargo test -p vmm --test e2e_disks -- --include-ignored   # also cryptvm
//! CRYPTVM_E2E_VMM=qemu cargo test -p vmm --test e2e_disks -- --include-ignored cryptvm::
//! ```

#[path = "harness.rs"]
mod harness;

#[path = "../common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::{IoOp, Scratch};
use harness::{Outcome, Scenario, Vmm};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// Virtual size of the luks/qcow2 disk.
const LUKS_SIZE: u64 = 64 * MIB;
/// Size of the raw disk.
const RAW_SIZE: u64 = 8 * MIB;
/// Byte the test fills the raw disk with.
const RAW_FILL: u8 = 0x11;
/// Size of the read-only disk.
const RO_SIZE: u64 = MIB;

/// Serials of the three disks, as the guest reads them in /sys/block/vdX/serial.
const SERIAL_LUKS: &str = "cvm-luks0";
const SERIAL_RAW: &str = "cvm-raw1";
const SERIAL_RO: &str = "cvm-ro2";

/// What qemu-io writes into the luks disk before the boot.
const HOST_WRITES: &[IoOp] = &[
    IoOp::Write(0xab, 0, MIB),
    IoOp::Write(0xcd, 5 * MIB, 64 * KIB),
    IoOp::Write(0x5a, LUKS_SIZE - 64 * KIB, 64 * KIB),
];

/// How the guest writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    /// `dd oflag=direct`.
    Direct,
    /// `dd` through the page cache; `sync` afterwards.
    Buffered,
}

/// What the guest writes into the luks disk: (key, byte, offset, length, how).
const GUEST_WRITES: &[(&str, u8, u64, u64, How)] = &[
    // Whole clusters (64 KiB) that qemu-io left unallocated.
    ("w_direct_2m", 0xc3, 2 * MIB, 256 * KIB, How::Direct),
    // 4 KiB inside qemu-io's first pattern: read-modify-write of an allocated cluster.
    ("w_direct_in_ab", 0x3c, 512 * KIB, 4 * KIB, How::Direct),
    // Not cluster-aligned, across three clusters, through the page cache.
    (
        "w_buffered_40m",
        0x77,
        40 * MIB + 12 * KIB,
        132 * KIB,
        How::Buffered,
    ),
    // Near the end of the disk, inside qemu-io's last pattern.
    (
        "w_direct_end",
        0xe1,
        LUKS_SIZE - 8 * KIB,
        4 * KIB,
        How::Direct,
    ),
];

/// Ranges of the raw disk the guest discards and zeroes, and one it writes.
const RAW_DISCARD: (u64, u64) = (MIB, MIB);
const RAW_ZERO: (u64, u64) = (3 * MIB, MIB);
const RAW_WRITE: (u8, u64, u64) = (0x99, 6 * MIB, 64 * KIB);

/// Byte of the read-only disk.
const RO_FILL: u8 = 0x42;

/// A range of the luks disk nobody writes: it reads as the decryption of qcow2's zeros,
/// which the guest must see as the peer does (compared by SHA-256).
const UNWRITTEN: (u64, u64) = (32 * MIB, 64 * KIB);

/// The disk images and the VMM arguments that attach them.
struct Disks {
    scratch: Scratch,
    /// The luks disk's contents as they must read back after the guest ran: qemu-img's
    /// plain view of it before the boot with the guest's writes applied.
    model: Vec<u8>,
    /// SHA-256 (hex) of [`UNWRITTEN`] as the peer reads it.
    unwritten_sha256: String,
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
        json!({"node-name": "raw1-file", "driver": "file", "filename": f("disk1.raw"),
               "discard": "unmap"}),
        json!({"node-name": "disk1", "driver": "raw", "file": "raw1-file", "discard": "unmap"}),
        json!({"node-name": "ro2-file", "driver": "file", "filename": f("ro.raw"),
               "read-only": true}),
        json!({"node-name": "disk2", "driver": "raw", "file": "ro2-file", "read-only": true}),
    ];
    let devices = vec![
        json!({"driver": "virtio-blk-pci", "drive": "disk0", "id": "virtio-disk0",
               "serial": SERIAL_LUKS}),
        json!({"driver": "virtio-blk-pci", "drive": "disk1", "id": "virtio-disk1",
               "serial": SERIAL_RAW}),
        json!({"driver": "virtio-blk-pci", "drive": "disk2", "id": "virtio-disk2",
               "serial": SERIAL_RO}),
    ];
    (objects, blockdevs, devices)
}

impl Disks {
    /// Makes the images: a QEMU-made detached header, a qcow2 payload written through
    /// luks by qemu-io, the raw disk and the read-only disk.
    fn new() -> Self {
        let scratch = Scratch::new("e2e-disks");
        let dir = scratch.path();
        let luks = common::detached_luks_qcow2(&scratch, LUKS_SIZE);
        let opts = luks.qcow2_image_opts();
        let cmds: Vec<String> = HOST_WRITES.iter().map(IoOp::command).collect();
        common::qemu_io(&scratch.secret_object(), &opts, &cmds);
        let mut model = common::plain_view(dir, &scratch.secret_object(), &luks.qcow2_image_opts());
        assert_eq!(
            model.len() as u64,
            LUKS_SIZE,
            "qemu-img convert's plain image"
        );
        let mut expect_host = vec![0u8; LUKS_SIZE as usize];
        for op in HOST_WRITES {
            op.apply(&mut expect_host);
        }
        for op in HOST_WRITES {
            let (IoOp::Write(_, off, len) | IoOp::Zero(off, len) | IoOp::Discard(off, len)) = *op;
            let r = off as usize..(off + len) as usize;
            common::assert_same_bytes(&model[r.clone()], &expect_host[r], "qemu-io's pattern");
        }
        let (uoff, ulen) = UNWRITTEN;
        let unwritten_sha256 = common::hex(&common::openssl_sha256(
            &model[uoff as usize..(uoff + ulen) as usize],
        ));
        for &(_, byte, off, len, _) in GUEST_WRITES {
            model[off as usize..(off + len) as usize].fill(byte);
        }
        scratch.write("disk1.raw", &vec![RAW_FILL; RAW_SIZE as usize]);
        scratch.write("ro.raw", &vec![RO_FILL; RO_SIZE as usize]);

        let (objects, blockdevs, devices) = stack("");
        let config = json!({"objects": objects, "blockdevs": blockdevs, "devices": devices});
        scratch.write(
            "vm.json",
            serde_json::to_string_pretty(&config).unwrap().as_bytes(),
        );
        Disks {
            scratch,
            model,
            unwritten_sha256,
        }
    }

    /// The files the VMM needs, for [`Scenario::files`].
    fn files(&self) -> Vec<(std::path::PathBuf, String)> {
        [
            "pass.txt",
            "disk.header",
            "disk.qcow2",
            "disk1.raw",
            "ro.raw",
            "vm.json",
        ]
        .iter()
        .map(|n| (self.scratch.join(n), n.to_string()))
        .collect()
    }

    /// The VMM arguments that attach the disks: `--config` for cryptvm, the same JSON
    /// objects as `-object`/`-blockdev`/`-device` for QEMU.
    fn vmm_args(vmm: Vmm) -> Vec<String> {
        match vmm {
            Vmm::Cryptvm => vec!["--config".into(), "@FILES@/vm.json".into()],
            Vmm::Qemu => {
                let (objects, blockdevs, devices) = stack("@FILES@");
                let mut args = Vec::new();
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
                args
            }
        }
    }
}

/// The guest's script: shell helpers, then one check or request per line, each
/// reporting `CRYPTVM-DISK KEY=VALUE`.
fn guest_script() -> String {
    let mut s = String::from(
        r#"# Generated by tests/e2e/disks.rs.
r() { echo "CRYPTVM-DISK $1=$2"; }
# pat OCTAL LEN: LEN bytes of one value.
pat() { dd if=/dev/zero bs=$2 count=1 2>/dev/null | tr '\000' "\\$1"; }
# check KEY DEV OFFSET LEN OCTAL [IFLAG]: reads a range, compares it with the value.
check() {
    pat $5 $4 >/tmp/want
    if dd if=/dev/$2 of=/tmp/got bs=$4 count=1 skip=$3 iflag=skip_bytes${6:+,$6} 2>/tmp/err &&
        cmp -s /tmp/got /tmp/want; then
        r $1 ok
    else
        r $1 bad
        echo "CRYPTVM-DISK-INFO $1: $(tr '\n' ' ' </tmp/err) $(od -An -tx1 /tmp/got | head -2 | tr '\n' ' ')"
    fi
}
# write KEY DEV OFFSET LEN OCTAL [OFLAG]: writes a range of one value, reports dd's status.
write() {
    pat $5 $4 >/tmp/w
    dd if=/tmp/w of=/dev/$2 bs=$4 count=1 seek=$3 oflag=seek_bytes${6:+,$6} conv=notrunc 2>/tmp/err
    rc=$?
    r $1 $rc
    [ $rc = 0 ] || echo "CRYPTVM-DISK-INFO $1: $(tr '\n' ' ' </tmp/err)"
}
# The disks by serial (probing may still be going on).
n=0
while [ "$(ls -d /sys/block/vd* 2>/dev/null | wc -l)" -lt 3 ] && [ $n -lt 50 ]; do
    sleep 0.1; n=$((n + 1))
done
for d in /sys/block/vd*; do
    [ -e "$d" ] || continue
    s=$(cat $d/serial 2>/dev/null)
    name=${d##*/}
    echo "CRYPTVM-DISK-INFO $name serial=$s size=$(cat $d/size) ro=$(cat $d/ro) discard_max=$(cat $d/queue/discard_max_bytes) write_zeroes_max=$(cat $d/queue/write_zeroes_max_bytes) lbs=$(cat $d/queue/logical_block_size)"
    case "$s" in
        @LUKS@) L=$name; r luks_dev $name ;;
        @RAW@) R=$name; r raw_dev $name ;;
        @RO@) O=$name; r ro_dev $name ;;
    esac
done
[ -n "$L" ] && [ -n "$R" ] && [ -n "$O" ] || { r disks missing; exit 1; }
for v in L:luks R:raw O:ro; do
    eval dev=\$${v%%:*}
    k=${v#*:}
    r ${k}_size $(cat /sys/block/$dev/size)
    r ${k}_ro $(cat /sys/block/$dev/ro)
done
r raw_discard_max $(cat /sys/block/$R/queue/discard_max_bytes)
r raw_write_zeroes_max $(cat /sys/block/$R/queue/write_zeroes_max_bytes)
"#,
    )
    .replace("@LUKS@", SERIAL_LUKS)
    .replace("@RAW@", SERIAL_RAW)
    .replace("@RO@", SERIAL_RO);

    let oct = |b: u8| format!("{b:o}");
    // qemu-io's patterns, before the guest writes: O_DIRECT for the first, the page cache
    // for the others; and a range nobody wrote.
    for (i, op) in HOST_WRITES.iter().enumerate() {
        let IoOp::Write(b, off, len) = *op else {
            unreachable!()
        };
        let flag = if i == 0 { "direct" } else { "" };
        s += &format!("check r_host_{i} $L {off} {len} {} {flag}\n", oct(b));
    }
    let (uoff, ulen) = UNWRITTEN;
    s += &format!(
        "r r_unwritten_sha256 $(dd if=/dev/$L bs={ulen} count=1 skip={uoff} iflag=skip_bytes,direct 2>/dev/null | sha256sum | cut -d' ' -f1)\n"
    );
    // The guest's own writes.
    for &(key, b, off, len, how) in GUEST_WRITES {
        let flag = if how == How::Direct { "direct" } else { "" };
        s += &format!("write {key} $L {off} {len} {} {flag}\n", oct(b));
    }
    s += "sync; r sync $?\n";
    // Read back from the device, not the page cache.
    s += "echo 3 >/proc/sys/vm/drop_caches\n";
    for &(key, b, off, len, _) in GUEST_WRITES {
        s += &format!("check r{key} $L {off} {len} {} direct\n", oct(b));
    }

    // The raw disk: discard, zero, write; read back through a dropped cache.
    let (doff, dlen) = RAW_DISCARD;
    let (zoff, zlen) = RAW_ZERO;
    let (wb, woff, wlen) = RAW_WRITE;
    s += &format!("blkdiscard -o {doff} -l {dlen} /dev/$R 2>/tmp/err; r raw_discard $?\n");
    s += &format!("blkio zeroout /dev/$R {zoff} {zlen} 2>/tmp/err; r raw_zeroout $?\n");
    s += &format!("write raw_write $R {woff} {wlen} {}\n", oct(wb));
    s += "sync; echo 3 >/proc/sys/vm/drop_caches\n";
    s += &format!("check raw_discarded $R {doff} {dlen} 0 direct\n");
    s += &format!("check raw_zeroed $R {zoff} {zlen} 0 direct\n");
    s += &format!("check raw_written $R {woff} {wlen} {} direct\n", oct(wb));
    let fill = oct(RAW_FILL);
    s += &format!(
        "check raw_before_discard $R {} 4096 {fill} direct\n",
        doff - 4096
    );
    s += &format!(
        "check raw_after_discard $R {} 4096 {fill} direct\n",
        doff + dlen
    );
    s += &format!(
        "check raw_before_zero $R {} 4096 {fill} direct\n",
        zoff - 4096
    );
    s += &format!(
        "check raw_after_zero $R {} 4096 {fill} direct\n",
        zoff + zlen
    );

    // The read-only disk: reads work, a write (O_DIRECT, then fsync) fails.
    s += &format!("check ro_read $O 0 4096 {} direct\n", oct(RO_FILL));
    s += "pat 5 4096 >/tmp/w\n";
    s += "dd if=/tmp/w of=/dev/$O bs=4096 count=1 oflag=direct conv=notrunc,fsync 2>/tmp/err\n";
    s += "r ro_write_rc $?\n";
    s += "echo \"CRYPTVM-DISK-INFO ro write: $(tr '\\n' ' ' </tmp/err)\"\n";
    s += "r done yes\n";
    s
}

/// The guest's `CRYPTVM-DISK KEY=VALUE` reports.
fn reports(out: &Outcome) -> BTreeMap<String, String> {
    out.l2_console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').split_once("CRYPTVM-DISK "))
        .filter_map(|(_, kv)| kv.trim().split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Boots the guest with the three disks under `vmm` and checks everything.
fn two_disks_and_a_read_only_one(vmm: Vmm) {
    if let Some(reason) = harness::skip_reason() {
        eprintln!("skipped: {reason}");
        return;
    }
    if !common::require(&["qemu-img", "qemu-io", "qemu-system-x86_64", "python3"]) {
        return;
    }
    let disks = Disks::new();
    let name = match vmm {
        Vmm::Qemu => "disks-qemu",
        Vmm::Cryptvm => "disks-cryptvm",
    };
    let out = Scenario::new(name)
        .vmm(vmm)
        .cpus(2)
        .guest_script(&guest_script())
        .files(disks.files())
        .vmm_args(Disks::vmm_args(vmm))
        .return_files()
        .timeout(Duration::from_secs(240))
        .run();
    let rep = reports(&out);
    let get = |k: &str| rep.get(k).map(String::as_str).unwrap_or("(none)");

    assert!(
        out.marker().is_some(),
        "the guest never reached its init:\n{out}"
    );
    assert_eq!(
        get("done"),
        "yes",
        "the guest script did not finish:\n{out}"
    );
    // Device names follow the devices' order in the config.
    assert_eq!(
        (get("luks_dev"), get("raw_dev"), get("ro_dev")),
        ("vda", "vdb", "vdc"),
        "disks by serial:\n{out}"
    );
    for (key, want) in [
        ("luks_size", (LUKS_SIZE / 512).to_string()),
        ("raw_size", (RAW_SIZE / 512).to_string()),
        ("ro_size", (RO_SIZE / 512).to_string()),
        ("luks_ro", "0".into()),
        ("raw_ro", "0".into()),
        ("ro_ro", "1".into()),
    ] {
        assert_eq!(get(key), want, "{key}:\n{out}");
    }
    for key in ["raw_discard_max", "raw_write_zeroes_max"] {
        assert!(
            get(key).parse::<u64>().unwrap_or(0) > 0,
            "{key} = {}: the device does not offer it:\n{out}",
            get(key)
        );
    }
    let mut expect_ok: Vec<String> = (0..HOST_WRITES.len())
        .map(|i| format!("r_host_{i}"))
        .collect();
    for &(key, ..) in GUEST_WRITES {
        expect_ok.push(format!("r{key}"));
    }
    expect_ok.extend(
        [
            "raw_discarded",
            "raw_zeroed",
            "raw_written",
            "raw_before_discard",
            "raw_after_discard",
            "raw_before_zero",
            "raw_after_zero",
            "ro_read",
        ]
        .map(String::from),
    );
    for key in &expect_ok {
        assert_eq!(get(key), "ok", "{key}:\n{out}");
    }
    let mut expect_zero: Vec<&str> = GUEST_WRITES.iter().map(|w| w.0).collect();
    expect_zero.extend(["sync", "raw_discard", "raw_zeroout", "raw_write"]);
    for key in expect_zero {
        assert_eq!(get(key), "0", "{key} exit status:\n{out}");
    }
    assert_eq!(
        get("r_unwritten_sha256"),
        disks.unwritten_sha256,
        "SHA-256 of an unwritten range of the luks disk, guest against qemu-img:\n{out}"
    );
    assert!(
        get("ro_write_rc").parse::<i32>().is_ok_and(|rc| rc != 0),
        "a write to the read-only disk succeeded (rc {}):\n{out}",
        get("ro_write_rc")
    );
    assert_eq!(out.scenario_rc(), Some(0), "scenario status:\n{out}");
    assert!(out.powered_off(), "the guest did not power off:\n{out}");
    assert_eq!(out.exit_code, Some(0), "VMM exit code:\n{out}");

    // The images as the VMM left them, checked by the peers.
    let back = tempfile::tempdir().unwrap();
    for name in ["disk.header", "disk.qcow2", "disk1.raw", "ro.raw"] {
        let data = out
            .out_files
            .get(&format!("files/{name}"))
            .unwrap_or_else(|| panic!("{name} did not come back from the run:\n{out}"));
        std::fs::write(back.path().join(name), data).unwrap();
    }
    check_images(back.path(), &disks, &out);
}

/// The peers' view of the images after the run.
fn check_images(dir: &Path, disks: &Disks, out: &dyn std::fmt::Display) {
    common::assert_qemu_check_clean(dir, "disk.qcow2");
    let luks = common::Luks::detached(&dir.join("disk.header"), &dir.join("disk.qcow2"));
    let cmds = common::read_pattern_cmds(&disks.model, 512);
    let r = common::qemu_io(
        &disks.scratch.secret_object(),
        &luks.qcow2_image_opts(),
        &cmds,
    );
    assert_eq!(
        r.stdout.matches("read ").count(),
        cmds.len(),
        "qemu-io did not run every read:\n{r}\n{out}"
    );
    // And every byte, including those nobody wrote.
    let after = common::plain_view(
        dir,
        &disks.scratch.secret_object(),
        &luks.qcow2_image_opts(),
    );
    common::assert_same_bytes(&after, &disks.model, "the luks disk after the run");

    let mut raw = vec![RAW_FILL; RAW_SIZE as usize];
    for (off, len) in [RAW_DISCARD, RAW_ZERO] {
        raw[off as usize..(off + len) as usize].fill(0);
    }
    let (wb, woff, wlen) = RAW_WRITE;
    raw[woff as usize..(woff + wlen) as usize].fill(wb);
    common::assert_same_bytes(&common::read(&dir.join("disk1.raw")), &raw, "disk1.raw");
    common::assert_same_bytes(
        &common::read(&dir.join("ro.raw")),
        &vec![RO_FILL; RO_SIZE as usize],
        "ro.raw (read-only)",
    );
}

/// QEMU 10, the reference: proves the guest script, the images and the harness.
mod qemu {
    use super::*;

    #[test]
    fn two_disks_from_config() {
        two_disks_and_a_read_only_one(Vmm::Qemu);
    }
}

/// `cryptvm run --config`, the product (`CRYPTVM_E2E_VMM=qemu` swaps in QEMU).
mod cryptvm {
    use super::*;

    #[test]
    fn two_disks_from_config() {
        two_disks_and_a_read_only_one(Vmm::from_env_or(Vmm::Cryptvm));
    }
}

/// Parts that need no VM.
mod parts {
    use super::*;

    /// The config file holds the interface's shape, with relative file names; QEMU's
    /// arguments hold the same objects with the files folder in front.
    #[test]
    fn config_and_qemu_arguments_describe_the_same_stack() {
        let (o, b, d) = stack("");
        assert_eq!((o.len(), b.len(), d.len()), (1, 8, 3));
        assert_eq!(b[3]["header"], "hdr");
        let args = Disks::vmm_args(Vmm::Qemu);
        assert_eq!(args.len(), 2 * (1 + 8 + 3));
        let blockdev: Value = serde_json::from_str(&args[3]).unwrap();
        assert_eq!(args[2], "-blockdev");
        assert_eq!(blockdev["filename"], "@FILES@/disk.header");
        assert_eq!(
            Disks::vmm_args(Vmm::Cryptvm),
            ["--config", "@FILES@/vm.json"]
        );
    }

    /// The checks after the run notice images the guest did not write: the untouched
    /// images fail them.
    #[test]
    fn image_checks_notice_missing_guest_writes() {
        if !common::require(&["qemu-img", "qemu-io", "qemu-system-x86_64", "python3"]) {
            return;
        }
        let disks = Disks::new();
        let dir = disks.scratch.path().to_path_buf();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_images(&dir, &disks, &"(no run)")
        }));
        assert!(result.is_err(), "the untouched images passed the checks");
    }

    /// Every guest write has a read-back check, and the script checks every qemu-io
    /// pattern.
    #[test]
    fn guest_script_covers_every_request() {
        let script = guest_script();
        for &(key, ..) in GUEST_WRITES {
            assert!(script.contains(&format!("write {key} ")), "{key}");
            assert!(script.contains(&format!("check r{key} ")), "{key}");
        }
        for i in 0..HOST_WRITES.len() {
            assert!(script.contains(&format!("check r_host_{i} ")));
        }
    }
}
