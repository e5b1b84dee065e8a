//! `cryptvm img resize` does what `qemu-img resize` (10.0.2) does (issue 13): each case
//! runs both tools on copies of the same image (made by qemu-img or by cryptvm) and
//! compares exit status, stdout and stderr (program name aside); after a resize,
//! `qemu-img info` gives the same virtual size, `qemu-img check` is clean and
//! `qemu-img compare` finds the two results identical, and data written before by
//! qemu-io reads back. Covered: raw, qcow2 (growth past what the L1 table's clusters
//! hold, shrinking, preallocation, internal snapshots), luks (attached, and over qcow2
//! through `json:`), and the refusals (shrink without `--shrink`, bad sizes, bad modes).

#[path = "../common/mod.rs"]
mod common;

use std::path::Path;

use common::*;

const SECRET: &str = "secret,id=s,data=resize-pass";

/// Two folders holding the same images (see `ImagePair`).
type Pair = ImagePair;

impl Pair {
    /// `resize ARGS` by both tools; asserts the same status, stdout and stderr.
    #[track_caller]
    fn resize(&self, args: &[&str]) -> (Run, Run) {
        let mut full = vec!["resize"];
        full.extend_from_slice(args);
        let theirs = run("qemu-img", &full, Some(&self.theirs()));
        let mut ours_args = vec!["img"];
        ours_args.extend(&full);
        let ours = cryptvm(&self.ours(), &ours_args);
        assert_eq!(ours.status, theirs.status, "exit status\n{ours}\n{theirs}");
        assert_eq!(ours.stdout, theirs.stdout, "stdout\n{ours}\n{theirs}");
        assert_eq!(
            stderr_messages(&ours.stderr, "cryptvm img: "),
            stderr_messages(&theirs.stderr, "qemu-img: "),
            "stderr\n{ours}\n{theirs}"
        );
        assert!(!ours.stderr.contains("panicked"), "{ours}");
        (ours, theirs)
    }

    /// After a resize: same virtual size, clean check (qcow2), identical contents.
    #[track_caller]
    fn same_result(&self, file: &str, fmt: &str) {
        let info = |d: &Path| {
            run(
                "qemu-img",
                ["info", "--output=json", "-f", fmt, file],
                Some(d),
            )
            .ok()
            .json()["virtual-size"]
                .clone()
        };
        assert_eq!(
            info(&self.ours()),
            info(&self.theirs()),
            "virtual size of {file}"
        );
        if fmt == "qcow2" {
            assert_qemu_check_clean(&self.ours(), file);
        }
        let theirs = self.theirs().join(file).display().to_string();
        assert_qemu_identical(&self.ours(), fmt, file, fmt, &theirs);
    }
}

#[test]
fn qcow2_grows_past_its_l1_clusters_and_shrinks() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let writes = [
        "write -P 0xab 0 1M",
        "write -P 0xcd 1000M 1M",
        "write -P 0x5a 300M 64k",
    ];
    let p = Pair::copied("resize-qcow2", |d| {
        qemu_img_ok(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=65536",
                "q.qcow2",
                "1G",
            ],
        );
        qemu_io_cmds(d, "qcow2", "q.qcow2", &writes);
    });
    // 1 GiB needs 2 L1 entries; 8 TiB needs 16384 (two clusters): the table moves.
    p.resize(&["q.qcow2", "8T"]);
    p.same_result("q.qcow2", "qcow2");
    let reads = [
        "read -P 0xab 0 1M",
        "read -P 0xcd 1000M 1M",
        "read -P 0x5a 300M 64k",
    ];
    qemu_io_cmds(&p.ours(), "qcow2", "q.qcow2", &reads);
    qemu_io_cmds(
        &p.ours(),
        "qcow2",
        "q.qcow2",
        &["write -P 0x77 7T 1M", "read -P 0x77 7T 1M"],
    );
    qemu_io_cmds(&p.theirs(), "qcow2", "q.qcow2", &["write -P 0x77 7T 1M"]);
    p.resize(&["q.qcow2", "1G"]);
    p.resize(&["--shrink", "-f", "qcow2", "q.qcow2", "500M"]);
    p.same_result("q.qcow2", "qcow2");
    qemu_io_cmds(
        &p.ours(),
        "qcow2",
        "q.qcow2",
        &["read -P 0xab 0 1M", "read -P 0x5a 300M 64k"],
    );
    let size = |d: &Path| std::fs::metadata(d.join("q.qcow2")).expect("stat").len();
    assert!(
        size(&p.ours()) <= size(&p.theirs()),
        "the file's unused tail is cut off"
    );
    p.resize(&["q.qcow2", "+1G"]);
    p.resize(&["--shrink", "q.qcow2", "--", "-100M"]);
    p.same_result("q.qcow2", "qcow2");
}

#[test]
fn qcow2_made_by_cryptvm_with_small_clusters() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = Pair::copied("resize-qcow2-small", |d| {
        let r = cryptvm(
            d,
            [
                "img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512",
                "c.qcow2",
                "64M",
            ],
        );
        r.ok();
        qemu_io_cmds(
            d,
            "qcow2",
            "c.qcow2",
            &["write -P 0x11 0 300k", "write -P 0x22 60M 1M"],
        );
    });
    // 512 B clusters: one L1 entry maps 32 KiB, one L1 cluster 2 MiB.
    p.resize(&["c.qcow2", "200M"]);
    p.same_result("c.qcow2", "qcow2");
    qemu_io_cmds(
        &p.ours(),
        "qcow2",
        "c.qcow2",
        &["read -P 0x11 0 300k", "read -P 0x22 60M 1M"],
    );
    p.resize(&["--shrink", "c.qcow2", "60M"]);
    p.same_result("c.qcow2", "qcow2");
    qemu_io_cmds(
        &p.ours(),
        "qcow2",
        "c.qcow2",
        &["read -P 0x11 0 300k", "read -P 0 59M 1M"],
    );
}

#[test]
fn qcow2_preallocation_modes() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = Pair::copied("resize-prealloc", |d| {
        for f in ["m.qcow2", "f.qcow2", "u.qcow2"] {
            qemu_img_ok(d, &["create", "-q", "-f", "qcow2", f, "10M"]);
            qemu_io_cmds(d, "qcow2", f, &["write -P 0x42 9M 1M"]);
        }
    });
    for (mode, f) in [
        ("metadata", "m.qcow2"),
        ("falloc", "f.qcow2"),
        ("full", "u.qcow2"),
    ] {
        p.resize(&[&format!("--preallocation={mode}"), f, "+20M"]);
        p.same_result(f, "qcow2");
        qemu_io_cmds(
            &p.ours(),
            "qcow2",
            f,
            &["read -P 0x42 9M 1M", "read -P 0 10M 20M"],
        );
        let (_, check) = qemu_img_check(&p.ours(), f);
        let (_, theirs) = qemu_img_check(&p.theirs(), f);
        assert_eq!(
            check["allocated-clusters"], theirs["allocated-clusters"],
            "{mode}: the new area is allocated"
        );
    }
    // Preallocation is for growing only.
    p.resize(&["--preallocation=full", "--shrink", "m.qcow2", "1M"]);
    p.resize(&["--preallocation=bogus", "m.qcow2", "1G"]);
}

#[test]
fn qcow2_with_internal_snapshots() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = Pair::copied("resize-snap", |d| {
        qemu_img_ok(d, &["create", "-q", "-f", "qcow2", "s.qcow2", "64M"]);
        qemu_io_cmds(
            d,
            "qcow2",
            "s.qcow2",
            &["write -P 0x33 0 1M", "write -P 0x44 60M 1M"],
        );
        qemu_img_ok(d, &["snapshot", "-c", "snap1", "s.qcow2"]);
        qemu_img_ok(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "v2.qcow2",
                "64M",
            ],
        );
        qemu_img_ok(d, &["snapshot", "-c", "snap1", "v2.qcow2"]);
    });
    // Version 3 records snapshot sizes: qemu-img resizes either way; version 2 refuses.
    p.resize(&["--shrink", "s.qcow2", "32M"]);
    p.same_result("s.qcow2", "qcow2");
    p.resize(&["s.qcow2", "1G"]);
    p.same_result("s.qcow2", "qcow2");
    qemu_img_ok(&p.ours(), &["snapshot", "-a", "snap1", "s.qcow2"]);
    qemu_io_cmds(
        &p.ours(),
        "qcow2",
        "s.qcow2",
        &["read -P 0x33 0 1M", "read -P 0x44 60M 1M"],
    );
    p.resize(&["v2.qcow2", "128M"]);
    p.resize(&["--shrink", "v2.qcow2", "32M"]);
}

#[test]
fn raw_grows_and_shrinks() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = Pair::copied("resize-raw", |d| {
        qemu_img_ok(d, &["create", "-q", "-f", "raw", "r.raw", "1M"]);
        qemu_io_cmds(d, "raw", "r.raw", &["write -P 0x61 0 1M"]);
        std::fs::write(d.join("odd.raw"), vec![7u8; 1000]).expect("write");
    });
    p.resize(&["-f", "raw", "r.raw", "+3M"]);
    p.same_result("r.raw", "raw");
    p.resize(&["-f", "raw", "--preallocation=falloc", "r.raw", "8M"]);
    p.resize(&["-f", "raw", "--preallocation=full", "r.raw", "9M"]);
    p.same_result("r.raw", "raw");
    p.resize(&["-f", "raw", "--preallocation=metadata", "r.raw", "10M"]);
    p.resize(&["-f", "raw", "r.raw", "512k"]);
    p.resize(&["-q", "-f", "raw", "--shrink", "r.raw", "512k"]);
    p.same_result("r.raw", "raw");
    qemu_io_cmds(&p.ours(), "raw", "r.raw", &["read -P 0x61 0 512k"]);
    // Probed raw: qemu-img's warning; sizes relative to the sector-rounded length.
    p.resize(&["odd.raw", "+24"]);
    p.resize(&["odd.raw", "--shrink", "1000"]);
    p.same_result("odd.raw", "raw");
}

#[test]
fn luks_attached_and_over_qcow2() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let obj = format!("--object={SECRET}");
    let p = Pair::copied("resize-luks", |d| {
        let o = obj.as_str();
        qemu_img_ok(
            d,
            &[
                "create",
                "-q",
                "-f",
                "luks",
                o,
                "-o",
                "key-secret=s,iter-time=10",
                "l.luks",
                "4M",
            ],
        );
        qemu_img_ok(
            d,
            &["convert", "-f", "raw", "-O", "qcow2", "l.luks", "lq.qcow2"],
        );
    });
    let opts = "driver=luks,key-secret=s,file.filename=l.luks";
    p.resize(&[&obj, "--image-opts", opts, "+1000"]);
    p.resize(&[&obj, "--image-opts", opts, "+1000"]);
    p.resize(&[&obj, "--image-opts", opts, "3M"]);
    p.resize(&[&obj, "--shrink", "--image-opts", opts, "3M"]);
    p.resize(&[&obj, "-f", "luks", "l.luks", "--", "-1M"]);
    p.resize(&[&obj, "--shrink", "-f", "luks", "l.luks", "--", "-1M"]);
    p.resize(&["l.luks", "8M"]);
    let len = |d: &Path| std::fs::metadata(d.join("l.luks")).expect("stat").len();
    assert_eq!(
        len(&p.ours()),
        len(&p.theirs()),
        "payload offset plus the new size"
    );
    let theirs = p.theirs().join("l.luks").display().to_string();
    let r = run(
        "qemu-img",
        [
            "compare",
            &obj,
            "--image-opts",
            opts,
            &format!("driver=luks,key-secret=s,file.filename={theirs}"),
        ],
        Some(&p.ours()),
    );
    assert_eq!(r.status, Some(0), "{r}");
    // luks over qcow2: the qcow2 image grows by what the luks volume grows.
    let stack = r#"json:{"driver":"luks","key-secret":"s","file":{"driver":"qcow2","file":{"driver":"file","filename":"lq.qcow2"}}}"#;
    p.resize(&[&obj, stack, "+16M"]);
    p.same_result("lq.qcow2", "qcow2");
    p.resize(&[&obj, "--shrink", stack, "2M"]);
    p.same_result("lq.qcow2", "qcow2");
}

#[test]
fn refusals_match_qemu_img() {
    if !require(&["qemu-img"]) {
        return;
    }
    let p = Pair::copied("resize-refuse", |d| {
        qemu_img_ok(d, &["create", "-q", "-f", "qcow2", "q.qcow2", "1G"]);
        qemu_img_ok(d, &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    });
    let cases: &[&[&str]] = &[
        &["q.qcow2", "512M"],
        &["q.qcow2", "--", "-1G"],
        &["-f", "raw", "r.raw", "1k"],
        &["q.qcow2", "1000"],
        &["q.qcow2", "+1000"],
        &["q.qcow2", "1x"],
        &["q.qcow2", ""],
        &["q.qcow2", "+"],
        &["q.qcow2", "0"],
        &["q.qcow2", "20E"],
        &["q.qcow2", "9E"],
        &["q.qcow2", "--", "-2G"],
        &["--shrink", "q.qcow2", "--", "-2G"],
        &["q.qcow2", "1G", "2G"],
        &["q.qcow2"],
        &["nope.qcow2", "1G"],
        &["--preallocation=full", "q.qcow2", "1G"],
        &["-f", "raw", "r.raw", "2p"],
    ];
    for args in cases {
        let (ours, _) = p.resize(args);
        assert_eq!(ours.status, Some(1), "{ours}");
    }
    p.same_result("q.qcow2", "qcow2");
    let ours = cryptvm(&p.ours(), ["img", "resize"]);
    assert_eq!(ours.status, Some(1), "{ours}");
}
