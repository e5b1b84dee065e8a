//! `cryptvm img map` and `cryptvm img info --backing-chain` print what qemu-img 10 prints
//! for the same image, byte for byte (text and JSON), with the same exit status: sparse
//! raw files, qcow2 images with data, zero, discarded and compressed clusters, extended
//! L2 entries and preallocated metadata, backing chains, LUKS images (attached, and over
//! qcow2), qcow2 images written by cryptvm, and `--start-offset`/`--max-length`.
//! The images are made by qemu-img and qemu-io (or by cryptvm where said).

#[path = "../common/mod.rs"]
mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;

/// Runs `qemu-img ARGS` and `cryptvm img ARGS` in `dir`; asserts that they print the
/// same on stdout and exit with the same status. Returns both runs, qemu-img's first.
#[track_caller]
fn compare(dir: &Path, args: &[&str]) -> (Run, Run) {
    let theirs = run("qemu-img", args, Some(dir));
    let ours = cryptvm(dir, std::iter::once("img").chain(args.iter().copied()));
    assert_eq!(
        ours.stdout, theirs.stdout,
        "stdout differs:\n{theirs}\n{ours}"
    );
    assert_eq!(
        ours.status, theirs.status,
        "exit status differs:\n{theirs}\n{ours}"
    );
    (theirs, ours)
}

/// As [`compare`]; returns qemu-img's run.
#[track_caller]
fn same(dir: &Path, args: &[&str]) -> Run {
    compare(dir, args).0
}

/// As [`same`] for a command that fails, whose first line on stderr is also the same
/// (after the program's prefix).
#[track_caller]
fn same_error(dir: &Path, args: &[&str]) -> Run {
    let (theirs, ours) = compare(dir, args);
    let first = |r: &Run, prefix: &str| {
        let line = r.stderr.lines().next().unwrap_or_default().to_string();
        line.strip_prefix(prefix)
            .map(str::to_string)
            .unwrap_or(line)
    };
    assert_eq!(
        first(&ours, "cryptvm img: "),
        first(&theirs, "qemu-img: "),
        "stderr differs:\n{theirs}\n{ours}"
    );
    assert_ne!(theirs.status, Some(0), "expected a failure:\n{theirs}");
    assert!(!ours.stderr.contains("panicked"), "{ours}");
    theirs
}

/// `img map` of `image` (plus `extra` options) in both output formats, compared with
/// qemu-img; returns qemu-img's JSON map.
#[track_caller]
fn same_map(dir: &Path, extra: &[&str], image: &str) -> String {
    let mut args = vec!["map"];
    args.extend_from_slice(extra);
    args.push(image);
    same(dir, &args).ok();
    let mut json = vec!["map", "--output=json"];
    json.extend_from_slice(extra);
    json.push(image);
    same(dir, &json).ok().stdout
}

/// Writes `len` bytes of a pattern at `offset` of an existing file.
fn write_data(path: &Path, offset: u64, len: usize) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("opening a file to write");
    f.write_all_at(&pattern(offset, len), offset)
        .expect("writing data");
}

#[test]
fn map_of_sparse_raw_files_matches_qemu_img() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = Scratch::new("map-raw");
    // Holes at the start, in the middle and at the end.
    let holes = s.sparse("holes.raw", 10 << 20);
    write_data(&holes, 192 << 10, 128 << 10);
    write_data(&holes, 6400 << 10, 64 << 10);
    // Data at the start and at the end, a hole between.
    let ends = s.sparse("ends.raw", 4 << 20);
    write_data(&ends, 0, 64 << 10);
    write_data(&ends, (4 << 20) - 4096, 4096);
    s.sparse("empty.raw", 3 << 20);
    s.write("full.raw", &pattern(7, 1 << 20));
    // Not a whole number of sectors.
    s.write("odd.raw", &pattern(9, 1000));
    let map = same_map(s.path(), &[], "holes.raw");
    assert!(
        map.contains("\"zero\": true") && map.contains("\"data\": true"),
        "the fixture should have holes and data:\n{map}"
    );
    for image in ["ends.raw", "empty.raw", "full.raw", "odd.raw"] {
        same_map(s.path(), &[], image);
        same_map(s.path(), &["-f", "raw"], image);
    }
    // A window onto the file (the raw driver's offset and size).
    let window = r#"json:{"driver":"raw","offset":131072,"size":327680,"file":{"driver":"file","filename":"holes.raw"}}"#;
    same_map(s.path(), &[], window);
    same_map(
        s.path(),
        &["--image-opts"],
        "driver=raw,offset=65536,file.filename=ends.raw",
    );
}

#[test]
fn map_of_qcow2_clusters_matches_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("map-qcow2");
    let dir = s.path();
    qemu_img_ok(dir, &["create", "-q", "-f", "qcow2", "q.qcow2", "4M"]);
    qemu_io_cmds(
        dir,
        "qcow2",
        "q.qcow2",
        &[
            "write -P 1 0 256k",
            "write -z 64k 64k",
            "write -z -u 192k 64k",
            "write -z 512k 128k",
            "write -P 2 1M 192k",
            "discard 1088k 64k",
            "write -P 3 3968k 128k",
        ],
    );
    let map = same_map(dir, &[], "q.qcow2");
    for (what, text) in [
        ("data", "\"data\": true"),
        ("zero clusters", "\"present\": true, \"zero\": true"),
        ("unallocated clusters", "\"present\": false"),
    ] {
        assert!(map.contains(text), "the image should have {what}:\n{map}");
    }
    same_map(dir, &["-f", "qcow2"], "q.qcow2");
    // Clusters written in reverse order: adjacent in the guest, not in the file.
    qemu_img_ok(dir, &["create", "-q", "-f", "qcow2", "rev.qcow2", "1M"]);
    qemu_io_cmds(
        dir,
        "qcow2",
        "rev.qcow2",
        &[
            "write -P 1 128k 64k",
            "write -P 2 64k 64k",
            "write -P 3 0 64k",
        ],
    );
    let map = same_map(dir, &[], "rev.qcow2");
    assert_eq!(map.matches("\"data\": true").count(), 3, "{map}");
    same_map(dir, &["-U"], "q.qcow2");
    same_map(dir, &["--image-opts"], "driver=qcow2,file.filename=q.qcow2");

    // Small clusters, subclusters, preallocated metadata, a fully allocated image.
    qemu_img_ok(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "small.qcow2",
            "1M",
        ],
    );
    qemu_io_cmds(
        dir,
        "qcow2",
        "small.qcow2",
        &["write -P 4 1k 3k", "write -z 8k 1k"],
    );
    qemu_img_ok(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=128k",
            "x.qcow2",
            "2M",
        ],
    );
    qemu_io_cmds(
        dir,
        "qcow2",
        "x.qcow2",
        &["write -P 1 4k 8k", "write -z 64k 4k"],
    );
    qemu_img_ok(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "pm.qcow2",
            "2M",
        ],
    );
    qemu_io_cmds(dir, "qcow2", "pm.qcow2", &["write -P 1 64k 64k"]);
    qemu_img_ok(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=full",
            "pf.qcow2",
            "1M",
        ],
    );
    for image in ["small.qcow2", "x.qcow2", "pm.qcow2", "pf.qcow2"] {
        same_map(dir, &[], image);
    }
}

#[test]
fn map_of_a_backing_chain_matches_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("map-chain");
    let dir = s.path();
    qemu_img_ok(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    qemu_io_cmds(
        dir,
        "qcow2",
        "base.qcow2",
        &["write -P 1 0 1M", "write -P 9 3M 64k"],
    );
    let chain = ["-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"];
    qemu_img_ok(
        dir,
        &[&["create", "-q", "-f", "qcow2"][..], &chain].concat(),
    );
    qemu_io_cmds(
        dir,
        "qcow2",
        "mid.qcow2",
        &["write -P 2 512k 64k", "write -z 3M 64k"],
    );
    let chain = ["-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "6M"];
    qemu_img_ok(
        dir,
        &[&["create", "-q", "-f", "qcow2"][..], &chain].concat(),
    );
    qemu_io_cmds(dir, "qcow2", "top.qcow2", &["write -P 3 64k 64k"]);
    let map = same_map(dir, &[], "top.qcow2");
    for depth in 0..3 {
        assert!(
            map.contains(&format!("\"depth\": {depth}")),
            "the map should reach depth {depth}:\n{map}"
        );
    }
    // Absolute names: the file column shows each backing file's full name.
    let top = s.join("top.qcow2").display().to_string();
    same_map(dir, &[], &top);
    same_map(dir, &[], "mid.qcow2");

    // A raw backing file shorter than the overlay, not a whole cluster long.
    s.write("short.raw", &pattern(5, 1_000_000));
    qemu_img_ok(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "short.raw",
            "-F",
            "raw",
            "over.qcow2",
            "2M",
        ],
    );
    qemu_io_cmds(dir, "qcow2", "over.qcow2", &["write -P 6 128k 64k"]);
    same_map(dir, &[], "over.qcow2");
}

#[test]
fn map_of_a_compressed_image_matches_qemu_img() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = Scratch::new("map-compressed");
    // Compressible data (a pattern would be stored uncompressed).
    let src = s.sparse("src.raw", 2 << 20);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .expect("opening src.raw");
    f.write_all_at(&[0x5a; 256 << 10], 0).expect("writing");
    f.write_all_at(&[0xa5; 64 << 10], 1 << 20).expect("writing");
    qemu_img_ok(
        s.path(),
        &[
            "convert", "-c", "-f", "raw", "-O", "qcow2", "src.raw", "c.qcow2",
        ],
    );
    let json = same(s.path(), &["map", "--output=json", "c.qcow2"]).ok();
    assert!(json.stdout.contains("\"compressed\": true"), "{json}");
    // The text form cannot show compressed clusters: the same error and status.
    let text = same_error(s.path(), &["map", "c.qcow2"]);
    assert!(
        text.stderr.contains("compressed clusters"),
        "qemu-img should refuse:\n{text}"
    );
}

#[test]
fn map_of_luks_images_matches_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("map-luks");
    let dir = s.path();
    let object = s.secret_object();
    qemu_img_ok(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            &object,
            "-o",
            "key-secret=sec0,iter-time=10",
            "l.luks",
            "1M",
        ],
    );
    let attached = "driver=luks,key-secret=sec0,file.filename=l.luks";
    let json = same(
        dir,
        &[
            "map",
            "--output=json",
            "--object",
            &object,
            "--image-opts",
            attached,
        ],
    )
    .ok();
    assert!(json.stdout.contains("\"data\": true"), "{json}");
    same_error(dir, &["map", "--object", &object, "--image-opts", attached]);
    // Without the secret the image does not open.
    same_error(dir, &["map", "l.luks"]);

    // The LUKS image copied into a qcow2 image, opened as luks over qcow2.
    let luks_size = std::fs::metadata(s.join("l.luks")).expect("stat").len();
    qemu_img_ok(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "lq.qcow2",
            &luks_size.to_string(),
        ],
    );
    qemu_img_ok(
        dir,
        &[
            "convert", "-n", "-f", "raw", "-O", "qcow2", "l.luks", "lq.qcow2",
        ],
    );
    let over = r#"json:{"driver":"luks","key-secret":"sec0","file":{"driver":"qcow2","file":{"driver":"file","filename":"lq.qcow2"}}}"#;
    same(dir, &["map", "--output=json", "--object", &object, over]).ok();
    same_error(dir, &["map", "--object", &object, over]);
    same_map(dir, &[], "lq.qcow2");
}

#[test]
fn map_of_qcow2_images_written_by_cryptvm_matches_qemu_img() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = Scratch::new("map-ours");
    let dir = s.path();
    let src = s.sparse("src.raw", 3 << 20);
    write_data(&src, 64 << 10, 192 << 10);
    write_data(&src, 2 << 20, 4096);
    cryptvm(
        dir,
        ["img", "create", "-q", "-f", "qcow2", "new.qcow2", "4M"],
    )
    .ok();
    cryptvm(
        dir,
        [
            "img",
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "src.raw",
            "conv.qcow2",
        ],
    )
    .ok();
    cryptvm(
        dir,
        [
            "img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "conv.qcow2",
            "-F",
            "qcow2",
            "over.qcow2",
        ],
    )
    .ok();
    same_map(dir, &[], "new.qcow2");
    let map = same_map(dir, &[], "conv.qcow2");
    assert!(map.contains("\"data\": true"), "{map}");
    let map = same_map(dir, &[], "over.qcow2");
    assert!(map.contains("\"depth\": 1"), "{map}");
}

#[test]
fn map_ranges_and_option_errors_match_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("map-range");
    let dir = s.path();
    let raw = s.sparse("holes.raw", 10 << 20);
    write_data(&raw, 192 << 10, 128 << 10);
    qemu_img_ok(dir, &["create", "-q", "-f", "qcow2", "q.qcow2", "4M"]);
    qemu_io_cmds(
        dir,
        "qcow2",
        "q.qcow2",
        &["write -P 1 0 1M", "write -z 2M 64k"],
    );
    for image in ["holes.raw", "q.qcow2"] {
        for range in [
            &["-s", "200k", "-l", "64k"][..],
            &["--start-offset=1M", "--max-length", "1M"],
            &["--start-offset", "1.5k"],
            &["-s", "0x10", "-l", "10"],
            &["-l", "0"],
            &["-s", "512b", "--max-length=100M"],
            // At or beyond the end: JSON shows one empty entry.
            &["-s", "100M"],
            &["-s", "4M"],
        ] {
            same_map(dir, range, image);
        }
    }
    for args in [
        &["map", "-s", "foo", "holes.raw"][..],
        &["map", "-s", "", "holes.raw"],
        &["map", "-s", "12x", "holes.raw"],
        &["map", "-l", "-1", "holes.raw"],
        &["map", "-s", "8E", "holes.raw"],
        &["map", "-s", "99999999999999999999", "holes.raw"],
        &["map"],
        &["map", "a", "b"],
        &["map", "nosuch.img"],
    ] {
        same_error(dir, args);
    }
}

#[test]
fn info_of_a_backing_chain_matches_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("info-chain");
    let dir = s.path();
    qemu_img_ok(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    qemu_io_cmds(dir, "qcow2", "base.qcow2", &["write -P 1 0 64k"]);
    qemu_img_ok(dir, &["snapshot", "-c", "snap1", "base.qcow2"]);
    qemu_img_ok(
        dir,
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
    qemu_img_ok(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "8M",
        ],
    );
    s.write("base.raw", &pattern(3, 1 << 20));
    qemu_img_ok(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "over.qcow2",
        ],
    );
    for image in ["top.qcow2", "over.qcow2", "base.raw"] {
        for output in ["--output=human", "--output=json"] {
            let q = same(dir, &["info", "--backing-chain", output, image]).ok();
            assert!(q.stdout.contains(image), "{q}");
        }
    }
    let text = same(dir, &["info", "--backing-chain", "top.qcow2"]).ok();
    assert_eq!(text.stdout.matches("image: ").count(), 3, "{text}");
    same(
        dir,
        &["info", "--backing-chain", "-f", "qcow2", "mid.qcow2"],
    )
    .ok();
    same(dir, &["info", "--output=json", "top.qcow2"]).ok();
    same(dir, &["info", "--output=json", "base.raw"]).ok();

    // A backing file that names its own overlay, and a missing backing file.
    qemu_img_ok(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"]);
    qemu_img_ok(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2",
        ],
    );
    qemu_img_ok(
        dir,
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"],
    );
    same_error(dir, &["info", "--backing-chain", "a.qcow2"]);
    qemu_img_ok(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "orphan.qcow2",
            "1M",
        ],
    );
    let orphan = same(dir, &["info", "--backing-chain", "orphan.qcow2"]);
    assert_eq!(orphan.status, Some(1), "{orphan}");
}
