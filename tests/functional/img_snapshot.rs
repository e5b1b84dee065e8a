//! `cryptvm img snapshot` and `cryptvm img convert -l` do what `qemu-img` (10.0.2) does
//! (issue 13): each case runs both tools on copies of the same qcow2 image (made by
//! qemu-img or by cryptvm, with data written by qemu-io before and after snapshots) and
//! compares exit status, stdout (the creation date masked) and stderr (program name
//! aside). After each operation `qemu-img check` is clean on our copy, `qemu-img
//! snapshot -l` lists the same snapshots on both copies, the active images compare
//! identical, and qemu-io reads the applied snapshot's data back.

#[path = "../common/mod.rs"]
mod common;

use std::path::Path;

use common::*;

/// Two folders holding the same images (see `ImagePair`).
type Pair = ImagePair;

impl Pair {
    /// `SUBCOMMAND ARGS` by both tools; asserts the same status, stdout (dates
    /// masked) and stderr.
    #[track_caller]
    fn both(&self, args: &[&str]) -> (Run, Run) {
        let theirs = run("qemu-img", args, Some(&self.theirs()));
        let mut ours_args = vec!["img"];
        ours_args.extend(args);
        let ours = cryptvm(&self.ours(), &ours_args);
        assert!(!ours.stderr.contains("panicked"), "{ours}");
        assert_eq!(
            ours.status, theirs.status,
            "exit status of {args:?}\n{ours}\n{theirs}"
        );
        assert_eq!(
            mask_dates(&ours.stdout),
            mask_dates(&theirs.stdout),
            "stdout of {args:?}\n{ours}\n{theirs}"
        );
        assert_eq!(
            stderr_messages(&ours.stderr, "cryptvm img: "),
            stderr_messages(&theirs.stderr, "qemu-img: "),
            "stderr of {args:?}\n{ours}\n{theirs}"
        );
        (ours, theirs)
    }

    /// After an operation on `file`: our copy checks clean, qemu-img lists the
    /// same snapshots on both copies, and the active images are identical.
    #[track_caller]
    fn same_state(&self, file: &str) {
        assert_qemu_check_clean(&self.ours(), file);
        assert_qemu_check_clean(&self.theirs(), file);
        let list = |d: &Path| {
            let r = run("qemu-img", ["snapshot", "-l", file], Some(d)).ok();
            mask_dates(&r.stdout)
        };
        assert_eq!(
            list(&self.ours()),
            list(&self.theirs()),
            "snapshot lists of {file}"
        );
        let theirs = self.theirs().join(file).display().to_string();
        assert_qemu_identical(&self.ours(), "qcow2", file, "qcow2", &theirs);
    }
}

/// Replaces every `YYYY-MM-DD HH:MM:SS` with `DATE` (the creation times differ).
fn mask_dates(s: &str) -> String {
    const SHAPE: &[u8] = b"dddd-dd-dd dd:dd:dd";
    let b = s.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        let fits = b.len() - i >= SHAPE.len()
            && SHAPE.iter().zip(&b[i..]).all(|(&want, &c)| {
                if want == b'd' {
                    c.is_ascii_digit()
                } else {
                    c == want
                }
            });
        if fits {
            out.push_str("DATE");
            i += SHAPE.len();
        } else {
            let ch = s[i..].chars().next().expect("in bounds");
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// A qcow2 image made by qemu-img or by cryptvm, with `opts`.
fn make_image(d: &Path, by_qemu: bool, opts: &str, size: &str) {
    let args = ["create", "-q", "-f", "qcow2", "-o", opts, "q.qcow2", size];
    if by_qemu {
        run("qemu-img", args, Some(d)).ok();
    } else {
        let mut a = vec!["img"];
        a.extend(args);
        cryptvm(d, &a).ok();
    }
}

/// Create, list, apply (by name and by ID) and delete, with writes between.
fn lifecycle(tag: &str, by_qemu: bool, opts: &str, size: &str, far: &str) {
    let p = Pair::copied(tag, |d| {
        make_image(d, by_qemu, opts, size);
        qemu_io_cmds(
            d,
            "qcow2",
            "q.qcow2",
            &["write -P 1 0 64k", &format!("write -P 5 {far} 64k")],
        );
    });
    let writes_both = |cmds: &[&str]| {
        qemu_io_cmds(&p.ours(), "qcow2", "q.qcow2", cmds);
        qemu_io_cmds(&p.theirs(), "qcow2", "q.qcow2", cmds);
    };
    // No snapshots: the list is empty.
    p.both(&["snapshot", "-l", "q.qcow2"]);
    p.both(&["snapshot", "-c", "s1", "q.qcow2"]);
    p.same_state("q.qcow2");
    writes_both(&["write -P 2 0 64k", "write -P 3 2M 128k"]);
    p.both(&["snapshot", "-c", "s2", "q.qcow2"]);
    p.same_state("q.qcow2");
    // qemu-img takes a name twice: a new ID.
    p.both(&["snapshot", "-q", "-c", "s1", "q.qcow2"]);
    let (ours, _) = p.both(&["snapshot", "-l", "q.qcow2"]);
    assert_eq!(ours.stdout.lines().count(), 5, "{ours}");
    assert!(
        ours.stdout.lines().nth(4).unwrap_or("").starts_with("3 "),
        "{ours}"
    );
    p.same_state("q.qcow2");
    writes_both(&["write -P 4 0 32k"]);
    // By name: the first of that name (ID 1).
    p.both(&["snapshot", "-a", "s1", "q.qcow2"]);
    p.same_state("q.qcow2");
    qemu_io_cmds(
        &p.ours(),
        "qcow2",
        "q.qcow2",
        &[
            "read -P 1 0 64k",
            "read -P 0 2M 128k",
            &format!("read -P 5 {far} 64k"),
        ],
    );
    // Writes after an apply do not reach the snapshots.
    writes_both(&["write -P 6 0 64k"]);
    p.both(&["snapshot", "-a", "2", "q.qcow2"]);
    p.same_state("q.qcow2");
    qemu_io_cmds(
        &p.ours(),
        "qcow2",
        "q.qcow2",
        &["read -P 2 0 64k", "read -P 3 2M 128k"],
    );
    // Deleting takes a name: the ID "2" names nothing.
    p.both(&["snapshot", "-d", "2", "q.qcow2"]);
    p.both(&["snapshot", "-d", "s1", "q.qcow2"]);
    p.same_state("q.qcow2");
    p.both(&["snapshot", "-a", "s1", "q.qcow2"]);
    p.same_state("q.qcow2");
    qemu_io_cmds(
        &p.ours(),
        "qcow2",
        "q.qcow2",
        &["read -P 2 0 64k", "read -P 3 2M 128k"],
    );
    p.both(&["snapshot", "-d", "s2", "q.qcow2"]);
    p.same_state("q.qcow2");
    p.both(&["snapshot", "-d", "s1", "q.qcow2"]);
    p.same_state("q.qcow2");
    let (ours, _) = p.both(&["snapshot", "-l", "q.qcow2"]);
    assert!(ours.stdout.is_empty(), "{ours}");
    // The data survives every snapshot's deletion.
    qemu_io_cmds(
        &p.ours(),
        "qcow2",
        "q.qcow2",
        &["read -P 2 0 64k", "read -P 3 2M 128k"],
    );
}

#[test]
fn qemu_made_image_side_by_side() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    lifecycle("snap-qemu", true, "cluster_size=65536", "64M", "40M");
}

#[test]
fn cryptvm_made_image_side_by_side() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    lifecycle("snap-ours", false, "cluster_size=65536", "64M", "40M");
}

#[test]
fn many_l2_tables_v2_and_small_clusters() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    // 4 KiB clusters: an L2 table maps 2 MiB, so the writes span several tables.
    lifecycle("snap-4k", true, "cluster_size=4096", "64M", "33M");
    lifecycle(
        "snap-v2",
        true,
        "compat=0.10,cluster_size=4096",
        "64M",
        "60M",
    );
    lifecycle(
        "snap-rc16",
        false,
        "cluster_size=4096,refcount_bits=16",
        "64M",
        "5M",
    );
}

#[test]
fn refusals_as_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = Pair::copied("snap-refuse", |d| {
        make_image(d, true, "cluster_size=65536", "4M");
        qemu_io_cmds(d, "qcow2", "q.qcow2", &["write -P 1 0 64k"]);
        run("qemu-img", ["snapshot", "-c", "s1", "q.qcow2"], Some(d)).ok();
        run(
            "qemu-img",
            ["create", "-q", "-f", "raw", "r.raw", "1M"],
            Some(d),
        )
        .ok();
    });
    for args in [
        &["snapshot", "-a", "nope", "q.qcow2"][..],
        &["snapshot", "-d", "nope", "q.qcow2"],
        &["snapshot", "-l", "-c", "x", "q.qcow2"],
        &["snapshot", "-c", "x", "-d", "s1", "q.qcow2"],
        &["snapshot", "-l", "q.qcow2", "extra"],
        &["snapshot"],
        &["snapshot", "-U", "-c", "x", "q.qcow2"],
        &["snapshot", "-c", "x", "r.raw"],
        &["snapshot", "-c", "x", "-f", "raw", "r.raw"],
        &["snapshot", "-a", "x", "-f", "raw", "r.raw"],
        &["snapshot", "-d", "x", "-f", "raw", "r.raw"],
        &["snapshot", "-l", "-f", "raw", "r.raw"],
        &["snapshot", "-l", "r.raw"],
        &["snapshot", "-U", "-l", "q.qcow2"],
        &["snapshot", "q.qcow2"],
    ] {
        let (ours, _) = p.both(args);
        if args.contains(&"nope") || args.contains(&"-U") && args.contains(&"-c") {
            assert_eq!(ours.status, Some(1), "{args:?}: {ours}");
        }
    }
    p.same_state("q.qcow2");
}

#[test]
fn convert_from_a_snapshot_as_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = Pair::copied("snap-convert", |d| {
        make_image(d, true, "cluster_size=65536", "8M");
        qemu_io_cmds(
            d,
            "qcow2",
            "q.qcow2",
            &["write -P 1 0 64k", "write -P 7 3M 64k"],
        );
        run("qemu-img", ["snapshot", "-c", "s1", "q.qcow2"], Some(d)).ok();
        qemu_io_cmds(
            d,
            "qcow2",
            "q.qcow2",
            &["write -P 2 0 64k", "write -P 8 5M 64k"],
        );
        run("qemu-img", ["snapshot", "-c", "s2", "q.qcow2"], Some(d)).ok();
        qemu_io_cmds(d, "qcow2", "q.qcow2", &["write -P 3 0 64k"]);
        run(
            "qemu-img",
            ["create", "-q", "-f", "raw", "r.raw", "1M"],
            Some(d),
        )
        .ok();
    });
    for (i, l) in [
        "1",
        "s1",
        "s2",
        "snapshot.id=1",
        "snapshot.name=s2",
        "snapshot.id=2,snapshot.name=s2",
    ]
    .iter()
    .enumerate()
    {
        for fmt in ["raw", "qcow2"] {
            let out = format!("o{i}.{fmt}");
            p.both(&["convert", "-l", l, "-O", fmt, "q.qcow2", &out]);
            let theirs = p.theirs().join(&out).display().to_string();
            assert_qemu_identical(&p.ours(), fmt, &out, fmt, &theirs);
        }
    }
    // What was converted is the snapshot's data, not the active image's.
    qemu_io_cmds(
        &p.ours(),
        "qcow2",
        "o1.qcow2",
        &["read -P 1 0 64k", "read -P 0 5M 64k"],
    );
    for l in [
        "nope",
        "snapshot.name=nope",
        "snapshot.id=1,snapshot.name=s2",
        "snapshot.foo=1",
    ] {
        let (ours, _) = p.both(&["convert", "-l", l, "q.qcow2", "bad.raw"]);
        assert_eq!(ours.status, Some(1), "{l}: {ours}");
        assert!(!p.ours().join("bad.raw").exists(), "{l}: target created");
    }
    p.both(&["convert", "-l", "s1", "-f", "raw", "r.raw", "bad.raw"]);
}

#[test]
fn refcount_overflow_as_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    // One-bit refcounts cannot share a cluster: creating a snapshot fails,
    // leaving the same leaked L1 copy as qemu-img leaves.
    let p = Pair::copied("snap-rc1", |d| {
        make_image(d, true, "refcount_bits=1", "4M");
        qemu_io_cmds(d, "qcow2", "q.qcow2", &["write -P 1 0 64k"]);
    });
    let (ours, _) = p.both(&["snapshot", "-c", "s", "q.qcow2"]);
    assert_eq!(ours.status, Some(1), "{ours}");
    let check = |d: &Path| run("qemu-img", ["check", "q.qcow2"], Some(d));
    let (a, b) = (check(&p.ours()), check(&p.theirs()));
    assert_eq!(
        (a.status, &a.stdout, &a.stderr),
        (b.status, &b.stdout, &b.stderr)
    );
    p.both(&["snapshot", "-l", "q.qcow2"]);
    qemu_io_cmds(&p.ours(), "qcow2", "q.qcow2", &["read -P 1 0 64k"]);
}

#[test]
fn masking_keeps_everything_but_dates() {
    assert_eq!(
        mask_dates("1  s1  0 B 2026-12-03 12:41:06  0000:00:00.000  0\n"),
        "1  s1  0 B DATE  0000:00:00.000  0\n"
    );
    assert_ne!(
        mask_dates("1 a 2026-12-03 12:41:06"),
        mask_dates("2 a 2026-12-03 12:41:06")
    );
}

#[test]
fn compressed_clusters_resizes_and_qemu_made_snapshots() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = Pair::copied("snap-mixed", |d| {
        make_image(d, true, "cluster_size=65536", "8M");
        qemu_io_cmds(
            d,
            "qcow2",
            "q.qcow2",
            &["write -P 1 0 256k", "write -c -P 9 1M 64k"],
        );
        // Made by qemu-img: ours applies and deletes them.
        run("qemu-img", ["snapshot", "-c", "small", "q.qcow2"], Some(d)).ok();
        run("qemu-img", ["resize", "-q", "q.qcow2", "16M"], Some(d)).ok();
        qemu_io_cmds(
            d,
            "qcow2",
            "q.qcow2",
            &["write -P 2 12M 64k", "write -c -P 4 2M 64k"],
        );
        run("qemu-img", ["snapshot", "-c", "big", "q.qcow2"], Some(d)).ok();
    });
    p.same_state("q.qcow2");
    p.both(&["snapshot", "-l", "q.qcow2"]);
    p.both(&["snapshot", "-c", "third", "q.qcow2"]);
    p.same_state("q.qcow2");
    // The snapshot is 8 MiB: applying it shrinks the image back.
    p.both(&["snapshot", "-a", "small", "q.qcow2"]);
    p.same_state("q.qcow2");
    // (The copies' disk sizes differ: the copy is not sparse.)
    let size = |d: &Path| {
        run("qemu-img", ["info", "--output=json", "q.qcow2"], Some(d))
            .ok()
            .json()["virtual-size"]
            .clone()
    };
    assert_eq!(size(&p.ours()), size(&p.theirs()));
    assert_eq!(size(&p.ours()), serde_json::json!(8 << 20));
    qemu_io_cmds(
        &p.ours(),
        "qcow2",
        "q.qcow2",
        &["read -P 1 0 256k", "read -P 9 1M 64k"],
    );
    p.both(&["snapshot", "-a", "big", "q.qcow2"]);
    p.same_state("q.qcow2");
    qemu_io_cmds(
        &p.ours(),
        "qcow2",
        "q.qcow2",
        &["read -P 4 2M 64k", "read -P 2 12M 64k"],
    );
    for name in ["small", "third", "big"] {
        p.both(&["snapshot", "-d", name, "q.qcow2"]);
        p.same_state("q.qcow2");
    }
    qemu_io_cmds(
        &p.ours(),
        "qcow2",
        "q.qcow2",
        &["read -P 4 2M 64k", "read -P 9 1M 64k"],
    );
}
