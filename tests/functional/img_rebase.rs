//! `cryptvm img rebase` and `cryptvm img commit` do what `qemu-img rebase` and
//! `qemu-img commit` (10.0.2) do (issue 13): each case runs both tools on copies of the
//! same backing chain (base <- mid <- top, made by qemu-img and qemu-io, or with a top
//! made by cryptvm) and compares exit status, stdout and stderr (program name aside);
//! afterwards `qemu-img info` shows the same backing file and format, `qemu-img check`
//! is clean, `qemu-img compare` finds every image of the chain identical to qemu-img's,
//! and the patterns written before read back through the new chain.

#[path = "../common/mod.rs"]
mod common;

use std::path::Path;

use common::*;

/// The images of the chain, top last.
const CHAIN: [&str; 3] = ["base.qcow2", "mid.qcow2", "top.qcow2"];

/// What each image holds (qemu-io commands), and what reads back through top.
const BASE_WRITES: [&str; 2] = ["write -P 1 0 1M", "write -P 5 3M 512k"];
const MID_WRITES: [&str; 2] = ["write -P 2 512k 1M", "write -z 0 64k"];
const TOP_WRITES: [&str; 2] = ["write -P 3 1M 64k", "write -P 6 3200k 4k"];
/// The content of top over the whole chain.
const TOP_READS: [&str; 8] = [
    "read -P 0 0 64k",
    "read -P 1 64k 448k",
    "read -P 2 512k 512k",
    "read -P 3 1M 64k",
    "read -P 2 1088k 448k",
    "read -P 0 1536k 1536k",
    "read -P 5 3M 128k",
    "read -P 6 3200k 4k",
];

/// Two folders holding the same images (see `ImagePair`).
type Pair = ImagePair;

impl Pair {
    /// The standard chain (qemu-made unless `our_top`), plus `other.qcow2`.
    fn chain(tag: &str, our_top: bool) -> Self {
        Pair::copied(tag, |d| {
            qemu_img_ok(d, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
            qemu_img_ok(
                d,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    "base.qcow2",
                    "-F",
                    "qcow2",
                    "mid.qcow2",
                ],
            );
            let top = [
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "mid.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ];
            if our_top {
                let mut args = vec!["img"];
                args.extend(top);
                cryptvm(d, &args).ok();
            } else {
                qemu_img_ok(d, &top);
            }
            qemu_img_ok(d, &["create", "-q", "-f", "qcow2", "other.qcow2", "4M"]);
            qemu_io_cmds(d, "qcow2", "base.qcow2", &BASE_WRITES);
            qemu_io_cmds(d, "qcow2", "mid.qcow2", &MID_WRITES);
            qemu_io_cmds(d, "qcow2", "top.qcow2", &TOP_WRITES);
            qemu_io_cmds(d, "qcow2", "other.qcow2", &["write -P 4 0 2M"]);
        })
    }

    /// `ARGS` by both tools; asserts the same status, stdout and stderr.
    #[track_caller]
    fn both(&self, args: &[&str]) -> Run {
        let theirs = run("qemu-img", args, Some(&self.theirs()));
        let mut ours_args = vec!["img"];
        ours_args.extend(args);
        let ours = cryptvm(&self.ours(), &ours_args);
        assert!(!ours.stderr.contains("panicked"), "{ours}");
        assert_eq!(ours.status, theirs.status, "exit status\n{ours}\n{theirs}");
        assert_eq!(ours.stdout, theirs.stdout, "stdout\n{ours}\n{theirs}");
        assert_eq!(
            stderr_messages(&ours.stderr, "cryptvm img: "),
            stderr_messages(&theirs.stderr, "qemu-img: "),
            "stderr\n{ours}\n{theirs}"
        );
        ours
    }

    /// Every image of the chain (and `other.qcow2`): same backing fields, clean
    /// check, same content as qemu-img's.
    #[track_caller]
    fn same_chain(&self) {
        for file in CHAIN.iter().chain(&["other.qcow2"]) {
            let info = |d: &Path| {
                let j = run("qemu-img", ["info", "--output=json", "-U", file], Some(d))
                    .ok()
                    .json();
                (
                    j["backing-filename"].clone(),
                    j["backing-filename-format"].clone(),
                    j["virtual-size"].clone(),
                )
            };
            assert_eq!(
                info(&self.ours()),
                info(&self.theirs()),
                "backing of {file}"
            );
            assert_qemu_check_clean(&self.ours(), file);
            let theirs = self.theirs().join(file).display().to_string();
            assert_qemu_identical(&self.ours(), "qcow2", file, "qcow2", &theirs);
        }
    }

    /// The backing file name `file` names in our copy (JSON null when none).
    fn backing(&self, file: &str) -> serde_json::Value {
        run(
            "qemu-img",
            ["info", "--output=json", file],
            Some(&self.ours()),
        )
        .ok()
        .json()["backing-filename"]
            .clone()
    }
}

#[test]
fn rebase_unsafe_rewrites_only_the_reference() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = Pair::chain("rebase-unsafe", false);
    p.both(&[
        "rebase",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    assert_eq!(p.backing("top.qcow2"), "base.qcow2");
    p.same_chain();
    // Top's own data is all that changed hands: mid's part is gone from its view.
    qemu_io_cmds(
        &p.ours(),
        "qcow2",
        "top.qcow2",
        &["read -P 3 1M 64k", "read -P 1 512k 64k"],
    );
    // A name that does not exist (unsafe mode opens nothing), a raw format, none.
    p.both(&[
        "rebase",
        "-u",
        "-b",
        "nowhere.qcow2",
        "-F",
        "raw",
        "top.qcow2",
    ]);
    let ours = run(
        "qemu-img",
        ["info", "--output=json", "top.qcow2"],
        Some(&p.ours()),
    )
    .ok()
    .json();
    assert_eq!(ours["backing-filename"], "nowhere.qcow2");
    assert_eq!(ours["backing-filename-format"], "raw");
    p.both(&["rebase", "-u", "-b", "", "top.qcow2"]);
    assert!(p.backing("top.qcow2").is_null());
    p.both(&[
        "rebase",
        "-u",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    p.same_chain();
    qemu_io_cmds(&p.ours(), "qcow2", "top.qcow2", &TOP_READS);
    // -u without -b: no backing file.
    p.both(&["rebase", "-u", "-q", "top.qcow2"]);
    assert!(p.backing("top.qcow2").is_null());
    p.same_chain();
}

#[test]
fn rebase_safe_keeps_the_content() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    for our_top in [false, true] {
        let tag = if our_top {
            "rebase-safe-ours"
        } else {
            "rebase-safe"
        };
        // Onto base (in the chain): mid's data is copied into top.
        let p = Pair::chain(tag, our_top);
        p.both(&["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"]);
        assert_eq!(p.backing("top.qcow2"), "base.qcow2");
        p.same_chain();
        qemu_io_cmds(&p.ours(), "qcow2", "top.qcow2", &TOP_READS);
        // Onto another image: everything that differs from it is copied.
        p.both(&[
            "rebase",
            "-q",
            "-b",
            "other.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ]);
        assert_eq!(p.backing("top.qcow2"), "other.qcow2");
        p.same_chain();
        qemu_io_cmds(&p.ours(), "qcow2", "top.qcow2", &TOP_READS);
        // Onto nothing: everything the old backing chain provided.
        p.both(&["rebase", "-b", "", "top.qcow2"]);
        assert!(p.backing("top.qcow2").is_null());
        p.same_chain();
        qemu_io_cmds(&p.ours(), "qcow2", "top.qcow2", &TOP_READS);
        // Mid onto another image.
        p.both(&["rebase", "-b", "other.qcow2", "-F", "qcow2", "mid.qcow2"]);
        p.same_chain();
        qemu_io_cmds(
            &p.ours(),
            "qcow2",
            "mid.qcow2",
            &[
                "read -P 0 0 64k",
                "read -P 2 512k 1M",
                "read -P 0 1536k 512k",
            ],
        );
        // From no backing file onto one: the zeros the image showed are kept.
        p.both(&["rebase", "-b", "other.qcow2", "-F", "qcow2", "base.qcow2"]);
        assert_eq!(p.backing("base.qcow2"), "other.qcow2");
        p.same_chain();
        qemu_io_cmds(
            &p.ours(),
            "qcow2",
            "base.qcow2",
            &["read -P 1 0 1M", "read -P 0 1M 2M", "read -P 5 3M 512k"],
        );
    }
}

#[test]
fn rebase_refusals() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = Pair::chain("rebase-refusals", false);
    let r = p.both(&["rebase", "top.qcow2"]);
    assert_eq!(r.status, Some(1));
    p.both(&["rebase", "-u", "-b", "base.qcow2", "top.qcow2", "extra"]);
    p.both(&["rebase", "-f", "bogus", "-b", "", "top.qcow2"]);
    p.both(&["rebase", "-b", "base.qcow2", "-F", "bogus", "top.qcow2"]);
    // -b without -F: refused when the header is to be changed.
    let r = p.both(&["rebase", "-u", "-b", "base.qcow2", "top.qcow2"]);
    assert_eq!(r.status, Some(1));
    p.both(&["rebase", "-b", "nowhere.qcow2", "-F", "qcow2", "top.qcow2"]);
    p.both(&["rebase", "-b", "", "nowhere.qcow2"]);
    // A raw image has no backing file to change.
    qemu_img_ok(&p.theirs(), &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    qemu_img_ok(&p.ours(), &["create", "-q", "-f", "raw", "r.raw", "1M"]);
    for args in [
        &[
            "rebase",
            "-f",
            "raw",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "r.raw",
        ][..],
        &["rebase", "-f", "raw", "-b", "", "r.raw"],
        &["commit", "-f", "raw", "r.raw"],
    ] {
        let r = p.both(args);
        assert_eq!(r.status, Some(1), "{r}");
    }
    // Safe mode needs the old backing chain.
    for d in [p.ours(), p.theirs()] {
        std::fs::rename(d.join("mid.qcow2"), d.join("mid.moved")).expect("rename");
    }
    let r = p.both(&["rebase", "-b", "", "top.qcow2"]);
    assert_eq!(r.status, Some(1));
    assert_eq!(p.backing("top.qcow2"), "mid.qcow2");
    let r = p.both(&["commit", "top.qcow2"]);
    assert_eq!(r.status, Some(1));
    for d in [p.ours(), p.theirs()] {
        std::fs::rename(d.join("mid.moved"), d.join("mid.qcow2")).expect("rename");
    }
    p.same_chain();
    qemu_io_cmds(&p.ours(), "qcow2", "top.qcow2", &TOP_READS);
}

#[test]
fn commit_into_the_backing_file_empties_the_top() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = Pair::chain("commit", false);
    let r = p.both(&["commit", "top.qcow2"]);
    assert_eq!(r.stdout, "Image committed.\n");
    p.same_chain();
    qemu_io_cmds(&p.ours(), "qcow2", "top.qcow2", &TOP_READS);
    qemu_io_cmds(&p.ours(), "qcow2", "mid.qcow2", &TOP_READS);
    // The top allocates nothing any more.
    let map = run(
        "qemu-img",
        ["map", "--output=json", "top.qcow2"],
        Some(&p.ours()),
    )
    .ok()
    .json();
    let top_data = map
        .as_array()
        .expect("map list")
        .iter()
        .any(|e| e["depth"] == 0 && e["present"] == true);
    assert!(!top_data, "top still allocates data: {map}");
}

#[test]
fn commit_down_two_levels_and_with_d() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = Pair::chain("commit-base", false);
    p.both(&["commit", "-b", "base.qcow2", "top.qcow2"]);
    p.same_chain();
    qemu_io_cmds(&p.ours(), "qcow2", "base.qcow2", &TOP_READS);
    // -b implies -d: top and mid keep their data.
    qemu_io_cmds(&p.ours(), "qcow2", "top.qcow2", &["read -P 3 1M 64k"]);
    qemu_io_cmds(&p.ours(), "qcow2", "mid.qcow2", &["read -P 2 512k 64k"]);

    let p = Pair::chain("commit-d", false);
    p.both(&["commit", "-d", "-q", "top.qcow2"]);
    p.same_chain();
    qemu_io_cmds(&p.ours(), "qcow2", "mid.qcow2", &TOP_READS);
    qemu_io_cmds(
        &p.ours(),
        "qcow2",
        "top.qcow2",
        &["read -P 3 1M 64k", "read -P 6 3200k 4k"],
    );
    // A rate limit slows nothing this small down, but is taken.
    p.both(&["commit", "-r", "1G", "-q", "mid.qcow2"]);
    p.same_chain();
    qemu_io_cmds(&p.ours(), "qcow2", "base.qcow2", &TOP_READS);
}

#[test]
fn commit_refusals() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = Pair::chain("commit-refusals", false);
    for args in [
        &["commit", "base.qcow2"][..],
        &["commit", "-b", "nowhere.qcow2", "top.qcow2"],
        &["commit", "-r", "abc", "top.qcow2"],
        &["commit"],
        &["commit", "-f", "bogus", "top.qcow2"],
        &["commit", "nowhere.qcow2"],
    ] {
        let r = p.both(args);
        assert_eq!(r.status, Some(1), "{r}");
    }
    p.same_chain();
    qemu_io_cmds(&p.ours(), "qcow2", "top.qcow2", &TOP_READS);
}
