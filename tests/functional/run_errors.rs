//! `cryptvm run` failures: one line on stderr naming the problem, exit status 1, no panic.

#[path = "../common/mod.rs"]
mod common;

use std::path::Path;

/// A minimal ELF64 "kernel" (the guest never runs: every test here fails before).
fn tiny_elf() -> Vec<u8> {
    let load: u64 = 0x100_0000;
    let mut f = Vec::new();
    f.extend(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend(2u16.to_le_bytes());
    f.extend(62u16.to_le_bytes());
    f.extend(1u32.to_le_bytes());
    f.extend(load.to_le_bytes());
    f.extend(64u64.to_le_bytes());
    f.extend(0u64.to_le_bytes());
    f.extend(0u32.to_le_bytes());
    f.extend(64u16.to_le_bytes());
    f.extend(56u16.to_le_bytes());
    f.extend(1u16.to_le_bytes());
    f.extend([0u8; 6]);
    f.extend(1u32.to_le_bytes());
    f.extend(5u32.to_le_bytes());
    for v in [120u64, load, load, 4, 4, 8] {
        f.extend(v.to_le_bytes());
    }
    f.extend([0xf4u8; 4]);
    f
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vmlinux"), tiny_elf()).unwrap();
    dir
}

fn run(dir: &Path, args: &[&str]) -> common::Run {
    let mut all = vec!["run"];
    all.extend(args);
    common::cryptvm(dir, all)
}

#[test]
fn missing_kernel_file() {
    let dir = setup();
    run(dir.path(), &["--kernel", "nonexistent-vmlinuz"]).clean_error(1, &["nonexistent-vmlinuz"]);
    run(dir.path(), &[]).clean_error(1, &["no kernel"]);
}

#[test]
fn random_bytes_are_not_a_kernel() {
    let dir = setup();
    let noise: Vec<u8> = (0..100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.path().join("noise"), noise).unwrap();
    run(dir.path(), &["--kernel", "noise"]).clean_error(1, &["not a kernel"]);
}

#[test]
fn initramfs_larger_than_memory() {
    let dir = setup();
    let f = std::fs::File::create(dir.path().join("big.cpio")).unwrap();
    f.set_len(40 << 20).unwrap();
    run(
        dir.path(),
        &[
            "--kernel", "vmlinux", "--initrd", "big.cpio", "--memory", "32M",
        ],
    )
    .clean_error(1, &["memory too small for the initramfs"]);
    run(
        dir.path(),
        &["--kernel", "vmlinux", "--initrd", "missing.cpio"],
    )
    .clean_error(1, &["missing.cpio"]);
}

#[test]
fn vcpu_count_out_of_range() {
    let dir = setup();
    run(dir.path(), &["--kernel", "vmlinux", "--cpus", "0"]).clean_error(1, &["--cpus", "vCPU"]);
    run(dir.path(), &["--kernel", "vmlinux", "--cpus", "33"]).clean_error(1, &["1 to 32"]);
    std::fs::write(dir.path().join("vm.json"), r#"{"machine": {"cpus": 0}}"#).unwrap();
    run(dir.path(), &["--config", "vm.json", "--kernel", "vmlinux"])
        .clean_error(1, &["machine.cpus"]);
}

#[test]
fn no_kvm_device() {
    let dir = setup();
    let mut cmd = std::process::Command::new(common::CRYPTVM);
    cmd.current_dir(dir.path())
        .args(["run", "--kernel", "vmlinux"])
        .env("CRYPTVM_KVM_DEVICE", dir.path().join("no-such-kvm"))
        .stdin(std::process::Stdio::null());
    let out = cmd.output().unwrap();
    let r = common::Run {
        cmd: "CRYPTVM_KVM_DEVICE=... cryptvm run --kernel vmlinux".into(),
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    r.clean_error(1, &["no KVM"]);
}

#[test]
fn bad_config_json() {
    let dir = setup();
    let cases = [
        ("{\"machine\": ", "invalid JSON"),
        (
            r#"{"machine": {"cpus": "two"}}"#,
            "machine.cpus: expected an integer",
        ),
        (r#"{"machine": {"memory": "lots"}}"#, "machine.memory"),
        (
            r#"{"boot": {"kernel": "vmlinux", "initramfs": "x"}}"#,
            "boot.initramfs: unknown key",
        ),
        (r#"{"devices": [42]}"#, "devices[0]: expected an object"),
        (r#"{"serial": "pty"}"#, "serial"),
        (r#"[1, 2]"#, "expected a JSON object"),
    ];
    for (text, mention) in cases {
        std::fs::write(dir.path().join("vm.json"), text).unwrap();
        run(dir.path(), &["--config", "vm.json"]).clean_error(1, &[mention]);
    }
    run(dir.path(), &["--config", "missing.json"]).clean_error(1, &["missing.json"]);
    run(dir.path(), &["--kernel", "vmlinux", "--bogus", "1"]).clean_error(1, &["--bogus"]);
}

/// Disks from the config that cannot be built stop `run` before the guest starts, with
/// the entry's key path, the secret never printed and the images untouched.
#[test]
fn bad_disk_config() {
    let dir = setup();
    let d = dir.path();
    let secret = "correct-horse-battery";
    let create = common::cryptvm(
        d,
        [
            "img",
            "create",
            "--object",
            &format!("secret,id=s0,data={secret}"),
            "-f",
            "luks",
            "-o",
            "key-secret=s0,iter-time=10",
            "disk.luks",
            "4M",
        ],
    );
    assert_eq!(create.status, Some(0), "{create}");
    std::fs::write(d.join("disk.raw"), vec![0x5au8; 1 << 20]).unwrap();
    let before = (
        std::fs::read(d.join("disk.luks")).unwrap(),
        std::fs::read(d.join("disk.raw")).unwrap(),
    );
    let raw = r#"{"node-name": "r", "driver": "file", "filename": "disk.raw"}"#;
    let luks = r#"{"node-name": "l", "driver": "luks", "key-secret": "s0",
                   "file": {"driver": "file", "filename": "disk.luks"}}"#;
    let disk = |drive: &str, id: &str| {
        format!(r#"{{"driver": "virtio-blk-pci", "drive": "{drive}", "id": "{id}"}}"#)
    };
    let cases = [
        (
            format!(
                r#"{{"blockdevs": [{raw}], "devices": [{}]}}"#,
                disk("nope", "d0")
            ),
            "devices[0]: Property 'virtio-blk-device.drive' can't find value 'nope'",
        ),
        (
            format!(
                r#"{{"objects": [{{"qom-type": "secret", "id": "s0", "data": "wrong-{secret}"}}],
                    "blockdevs": [{luks}]}}"#
            ),
            "blockdevs[0]",
        ),
        (
            format!(r#"{{"blockdevs": [{luks}]}}"#),
            "blockdevs[0].key-secret",
        ),
        (
            format!(
                r#"{{"blockdevs": [{raw}], "devices": [{}, {}]}}"#,
                disk("r", "d0"),
                disk("r", "d1")
            ),
            "devices[1]: Permission conflict on node 'r'",
        ),
        (
            format!(
                r#"{{"blockdevs": [{raw}, {{"node-name": "r2", "driver": "raw", "file": "r"}}],
                    "devices": [{}, {}]}}"#,
                disk("r", "d0"),
                disk("r2", "d0")
            ),
            "devices[1]: Duplicate device ID 'd0'",
        ),
        (
            format!(
                r#"{{"blockdevs": [{raw}], "devices": [{{"driver": "virtio-blk-pci",
                    "drive": "r", "queue-size": 100}}]}}"#
            ),
            "devices[0]: invalid queue-size property (100), must be a power of 2",
        ),
        (
            format!(
                r#"{{"blockdevs": [{raw}], "devices": [{{"driver": "virtio-blk-pci",
                    "drive": "r", "colour": "blue"}}]}}"#
            ),
            "devices[0]: Property 'virtio-blk-pci.colour' not found",
        ),
        (
            format!(
                r#"{{"blockdevs": [{raw}], "devices": [{{"driver": "virtio-blk-pci",
                    "drive": "r", "addr": "0x0"}}]}}"#
            ),
            "devices[0]: PCI slot must be in 1..=31",
        ),
    ];
    for (text, mention) in &cases {
        std::fs::write(d.join("vm.json"), text).unwrap();
        let r = run(d, &["--kernel", "vmlinux", "--config", "vm.json"]);
        r.clean_error(1, &[mention]);
        r.never_shows(secret);
    }
    let after = (
        std::fs::read(d.join("disk.luks")).unwrap(),
        std::fs::read(d.join("disk.raw")).unwrap(),
    );
    assert!(before == after, "a failed run changed an image");
}

/// `cryptvm run ARGS` in `dir` with a KVM device that does not exist: whatever it
/// reports was found before /dev/kvm would have been opened.
fn run_without_kvm(dir: &Path, args: &[&str]) -> common::Run {
    let out = std::process::Command::new(common::CRYPTVM)
        .current_dir(dir)
        .arg("run")
        .args(args)
        .env("CRYPTVM_KVM_DEVICE", "/nonexistent/kvm")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    common::Run {
        cmd: format!(
            "CRYPTVM_KVM_DEVICE=/nonexistent/kvm cryptvm run {}",
            args.join(" ")
        ),
        status: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every config error is reported, naming its entry and key, before /dev/kvm is opened
/// (the run has a KVM path that does not exist and still gets the config error), from
/// the config file and from the command line. A misspelt blockdev key is named, not
/// reported as the mandatory key it should have been. No image file needs to exist:
/// nothing is opened before the config is checked.
#[test]
fn config_errors_come_before_kvm() {
    let dir = setup();
    let d = dir.path();
    let raw = r#"{"node-name": "r", "driver": "file", "filename": "disk.raw"}"#;
    let disk = |extra: &str| format!(r#"{{"driver": "virtio-blk-pci", "drive": "r"{extra}}}"#);
    let file_cases = [
        (
            format!(
                r#"{{"blockdevs": [{raw}], "devices": [{}]}}"#,
                disk(r#", "num-queues": 0"#)
            ),
            "devices[0]: Property virtio-blk-pci.num-queues doesn't take value 0",
        ),
        (
            format!(
                r#"{{"blockdevs": [{raw}], "devices": [{}]}}"#,
                disk(r#", "queue-size": 100"#)
            ),
            "devices[0]: invalid queue-size property (100), must be a power of 2 (max 1024)",
        ),
        (
            format!(
                r#"{{"blockdevs": [{raw}], "devices": [{}]}}"#,
                disk(r#", "colour": "blue""#)
            ),
            "devices[0]: Property 'virtio-blk-pci.colour' not found",
        ),
        (
            format!(
                r#"{{"blockdevs": [{raw}], "devices": [{}]}}"#,
                r#"{"driver": "virtio-blk-pci", "drive": "nope"}"#
            ),
            "devices[0]: Property 'virtio-blk-device.drive' can't find value 'nope'",
        ),
        (
            format!(
                r#"{{"blockdevs": [{raw}], "devices": [{}, {}]}}"#,
                disk(r#", "id": "d0""#),
                disk(r#", "id": "d0""#)
            ),
            "devices[1]: Duplicate device ID 'd0'",
        ),
        (
            r#"{"blockdevs": [{"node-name": "r", "driver": "file", "filenmae": "disk.raw"}]}"#
                .to_string(),
            "blockdevs[0].filenmae: unknown option",
        ),
        (
            r#"{"objects": [{"qom-type": "secret", "id": "s0", "data": "x"}],
                "blockdevs": [{"node-name": "l", "driver": "luks", "key-secert": "s0",
                               "file": {"driver": "file", "filename": "disk.luks"}}]}"#
                .to_string(),
            "blockdevs[0].key-secert: unknown option",
        ),
    ];
    let check = |r: common::Run, want: &str| {
        r.clean_error(1, &[want]);
        assert!(
            !r.stderr.contains("KVM") && !r.stderr.contains("missing"),
            "the config error must come first, by the key's name:\n{r}"
        );
    };
    for (text, want) in &file_cases {
        std::fs::write(d.join("vm.json"), text).unwrap();
        check(
            run_without_kvm(d, &["--kernel", "vmlinux", "--config", "vm.json"]),
            want,
        );
    }
    let blockdev = "driver=file,node-name=r,filename=disk.raw";
    let line_cases: [(&[&str], &str); 7] = [
        (
            &[
                "--blockdev",
                blockdev,
                "--device",
                "virtio-blk-pci,drive=r,num-queues=9999",
            ],
            "devices[0]: Property virtio-blk-pci.num-queues doesn't take value 9999",
        ),
        (
            &[
                "--blockdev",
                blockdev,
                "--device",
                "virtio-blk-pci,drive=r,queue-size=2048",
            ],
            "devices[0]: invalid queue-size property (2048)",
        ),
        (
            &[
                "--blockdev",
                blockdev,
                "--device",
                "virtio-blk-pci,drive=r,num-queus=2",
            ],
            "devices[0]: Property 'virtio-blk-pci.num-queus' not found",
        ),
        (
            &[
                "--blockdev",
                blockdev,
                "--device",
                "virtio-blk-pci,drive=rr",
            ],
            "devices[0]: Property 'virtio-blk-device.drive' can't find value 'rr'",
        ),
        (
            &[
                "--blockdev",
                blockdev,
                "--device",
                "virtio-blk-pci,drive=r,id=d0",
                "--device",
                "virtio-blk-pci,drive=r,id=d0",
            ],
            "devices[1]: Duplicate device ID 'd0'",
        ),
        (
            &["--blockdev", "driver=file,node-name=r,filenmae=disk.raw"],
            "blockdevs[0].filenmae: unknown option",
        ),
        (
            &[
                "--object",
                "secret,id=s0,data=x",
                "--blockdev",
                "driver=luks,node-name=l,key-secert=s0,file.driver=file,file.filename=disk.luks",
            ],
            "blockdevs[0].key-secert: unknown option",
        ),
    ];
    for (args, want) in line_cases {
        let mut all = vec!["--kernel", "vmlinux"];
        all.extend(args);
        check(run_without_kvm(d, &all), want);
    }
    // A good config gets as far as the KVM device, which is missing.
    std::fs::write(
        d.join("vm.json"),
        format!(r#"{{"blockdevs": [{raw}], "devices": [{}]}}"#, disk("")),
    )
    .unwrap();
    run_without_kvm(d, &["--kernel", "vmlinux", "--config", "vm.json"]).clean_error(1, &["no KVM"]);
}
