//! `cryptvm img convert -B BACKING [-F FMT]` (and `-o backing_file=,backing_fmt=`)
//! does what `qemu-img convert` (10.0.2) does (issue 13): both tools convert copies
//! of the same images (made by qemu-img and qemu-io); the targets then name the
//! same backing file and format, `qemu-img map` shows the same allocation and host
//! offsets, `qemu-img check` is clean and `qemu-img compare` finds the target
//! identical to the source where the new backing file reads as the source's. The
//! refusals come in qemu-img's words and exit status.

#[path = "../common/mod.rs"]
mod common;

use std::path::Path;

use common::*;

/// The images both tools start from: `base.qcow2` (8 MiB of data), `top.qcow2`
/// over it (data, zero clusters, a partial zero write, an all-zero data cluster,
/// clusters left to the backing file), `plain.qcow2` (no backing file) and
/// `small.qcow2` (a 4 MiB copy of base's start).
fn images(tag: &str) -> ImagePair {
    ImagePair::copied(tag, |d| {
        for (name, size) in [
            ("base.qcow2", "8M"),
            ("plain.qcow2", "8M"),
            ("small.qcow2", "4M"),
        ] {
            qemu_img_ok(d, &["create", "-q", "-f", "qcow2", name, size]);
        }
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
                "top.qcow2",
            ],
        );
        qemu_io_cmds(d, "qcow2", "base.qcow2", &["write -P 0x11 0 8M"]);
        qemu_io_cmds(d, "qcow2", "small.qcow2", &["write -P 0x11 0 4M"]);
        let top = [
            "write -P 0x22 1M 1M",
            "write -z 3M 1M",
            "write -z 5M 4k",
            "write -P 0x33 6M 8k",
            "write -P 0 7M 64k",
            "write -z 7232k 64k",
            "write -P 0x44 8128k 64k",
        ];
        qemu_io_cmds(d, "qcow2", "top.qcow2", &top);
        qemu_io_cmds(d, "qcow2", "plain.qcow2", &top);
    })
}

/// `ARGS` by both tools, each in its folder; asserts the same status, stdout
/// and stderr (program name aside).
#[track_caller]
fn both(p: &ImagePair, args: &[&str]) -> Run {
    let theirs = run("qemu-img", args, Some(&p.theirs()));
    let mut ours_args = vec!["img"];
    ours_args.extend(args);
    let ours = cryptvm(&p.ours(), &ours_args);
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

/// `qemu-img info` of `file` in `dir`: its backing fields and size.
fn backing_fields(dir: &Path, file: &str) -> [serde_json::Value; 4] {
    let j = run("qemu-img", ["info", "--output=json", "-U", file], Some(dir))
        .ok()
        .json();
    [
        j["backing-filename"].clone(),
        j["backing-filename-format"].clone(),
        j["full-backing-filename"].clone(),
        j["virtual-size"].clone(),
    ]
}

/// `qemu-img map --output=json` of `file` in `dir`, with the folder's path
/// taken out of the file names.
fn map(dir: &Path, file: &str) -> String {
    run("qemu-img", ["map", "--output=json", "-U", file], Some(dir))
        .ok()
        .stdout
        .replace(&dir.display().to_string(), "DIR")
}

/// Both targets named `out`: same backing fields, same map, clean check.
#[track_caller]
fn same_target(p: &ImagePair, out: &str) {
    assert_eq!(
        backing_fields(&p.ours(), out),
        backing_fields(&p.theirs(), out),
        "backing of {out}"
    );
    assert_eq!(map(&p.ours(), out), map(&p.theirs(), out), "map of {out}");
    assert_qemu_check_clean(&p.ours(), out);
}

/// `qemu-img compare` of `a` and `b` in our folder: identical.
#[track_caller]
fn identical(p: &ImagePair, a: &str, b: &str) {
    let r = run("qemu-img", ["compare", "-U", a, b], Some(&p.ours()));
    assert_eq!(r.status, Some(0), "{a} and {b} differ\n{r}");
}

#[test]
fn convert_with_a_backing_file_copies_only_the_top_image() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = images("convert-backing");
    let opt_spellings: [&[&str]; 4] = [
        &["-B", "base.qcow2", "-F", "qcow2"],
        &["-o", "backing_file=base.qcow2,backing_fmt=qcow2"],
        // -B and -F win over -o.
        &[
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "backing_file=small.qcow2,backing_fmt=raw",
        ],
        &[
            "-B",
            "base.qcow2",
            "-o",
            "backing_fmt=qcow2,cluster_size=16k",
        ],
    ];
    for (i, opts) in opt_spellings.iter().enumerate() {
        let out = format!("out{i}.qcow2");
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend(*opts);
        args.extend(["top.qcow2", &out]);
        both(&p, &args);
        same_target(&p, &out);
        assert_eq!(backing_fields(&p.ours(), &out)[0], "base.qcow2");
        identical(&p, "top.qcow2", &out);
    }
    // Fully allocated data (-S 0), and a single request at a time.
    for (i, extra) in [["-S", "0"], ["-m", "1"]].iter().enumerate() {
        let out = format!("tuned{i}.qcow2");
        let mut args = vec!["convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"];
        args.extend(extra);
        args.extend(["top.qcow2", &out]);
        both(&p, &args);
        same_target(&p, &out);
        identical(&p, "top.qcow2", &out);
    }
    // Compressed (-c): the top image's clusters compressed, the rest left to
    // the backing file.
    both(
        &p,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "c.qcow2",
        ],
    );
    same_target(&p, "c.qcow2");
    identical(&p, "top.qcow2", "c.qcow2");
    // Out-of-order writes lay the target out differently, but read the same.
    let ours = cryptvm(
        &p.ours(),
        [
            "img",
            "convert",
            "-W",
            "-m",
            "4",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "w.qcow2",
        ],
    )
    .ok();
    assert!(ours.stdout.is_empty(), "{ours}");
    assert_qemu_check_clean(&p.ours(), "w.qcow2");
    identical(&p, "top.qcow2", "w.qcow2");
}

#[test]
fn convert_with_a_backing_file_from_a_source_without_one_or_a_shorter_one() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = images("convert-backing-other");
    // A source without a backing file: what it leaves unallocated reads as
    // zeros, so it is written as zeroes over the new backing file.
    both(
        &p,
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "plain.qcow2",
            "plain-out.qcow2",
        ],
    );
    same_target(&p, "plain-out.qcow2");
    identical(&p, "plain.qcow2", "plain-out.qcow2");
    // A backing file shorter than the source: zeros past its end are left
    // unallocated (they read as zeros there).
    both(
        &p,
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "small.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "small-out.qcow2",
        ],
    );
    same_target(&p, "small-out.qcow2");
    // -n -B: an existing target takes the top image's ranges alone. It has a
    // backing file here: over none, cryptvm's qcow2 `write_zeroes` leaves an
    // unallocated cluster unallocated where QEMU sets the zero flag (the same
    // content, another map).
    for d in [p.ours(), p.theirs()] {
        qemu_img_ok(
            &d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "small.qcow2",
                "-F",
                "qcow2",
                "existing.qcow2",
                "8M",
            ],
        );
    }
    both(
        &p,
        &[
            "convert",
            "-n",
            "-B",
            "base.qcow2",
            "-O",
            "qcow2",
            "top.qcow2",
            "existing.qcow2",
        ],
    );
    same_target(&p, "existing.qcow2");
    // With the same backing file named, it reads as top.
    qemu_img_ok(
        &p.ours(),
        &[
            "rebase",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "existing.qcow2",
        ],
    );
    identical(&p, "top.qcow2", "existing.qcow2");
}

#[test]
fn convert_with_a_backing_file_refuses_as_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = images("convert-backing-errors");
    let refused: [&[&str]; 7] = [
        &["-B", "base.qcow2", "-F", "qcow2", "-O", "raw"],
        &["-B", "base.qcow2", "-O", "raw"],
        &["-B", "base.qcow2", "-F", "qcow2", "-O", "luks"],
        &["-B", "base.qcow2", "-O", "qcow2"],
        &["-o", "backing_file=base.qcow2", "-O", "qcow2"],
        &["-F", "qcow2", "-O", "qcow2"],
        &["-o", "backing_fmt=qcow2", "-O", "qcow2"],
    ];
    for opts in refused {
        let mut args = vec!["convert"];
        args.extend(opts);
        args.extend(["top.qcow2", "out.img"]);
        let before = Snapshot::take(&p.ours());
        let ours = both(&p, &args);
        assert_eq!(ours.status, Some(1), "{args:?}\n{ours}");
        before.assert_unchanged(&ours);
    }
    // Several sources.
    let before = Snapshot::take(&p.ours());
    let ours = both(
        &p,
        &[
            "convert",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "-O",
            "qcow2",
            "top.qcow2",
            "plain.qcow2",
            "out.img",
        ],
    );
    assert_eq!(ours.status, Some(1), "{ours}");
    before.assert_unchanged(&ours);
    // A backing file that does not open: the target is made, then fails to open.
    let ours = both(
        &p,
        &[
            "convert",
            "-B",
            "missing.qcow2",
            "-F",
            "qcow2",
            "-O",
            "qcow2",
            "top.qcow2",
            "out.img",
        ],
    );
    assert_eq!(ours.status, Some(1), "{ours}");
    assert!(p.ours().join("out.img").exists() && p.theirs().join("out.img").exists());
}
