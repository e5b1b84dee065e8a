//! `cryptvm img convert -c -O qcow2` makes what `qemu-img convert -c` makes (issue 13):
//!
//! - the same clusters compressed, stored uncompressed (those that do not compress) and
//!   left out (zeros), as `qemu-img map --output=json` shows them, for zlib and zstd,
//!   4 KiB, 64 KiB and 2 MiB clusters, `-S 0` (zeros written compressed too) and `-W`;
//! - an image `qemu-img check` finds clean, `qemu-img compare` finds identical to the
//!   source, and about as large as qemu-img's own (within a few percent; zstd here is
//!   ruzstd's fastest level, which stores a few clusters raw that libzstd shrinks);
//! - writes into its compressed clusters by qemu-io copy them out and keep the
//!   refcounts right; images qemu-img compressed read back through cryptvm;
//! - `-c` where qemu-img refuses it (a format that cannot compress, preallocation)
//!   fails with qemu-img's message.

#[path = "../common/mod.rs"]
mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// 64 KiB clusters of the source, by kind.
const CLUSTERS: usize = 48;
const CS: usize = 64 << 10;

/// A source of clusters that compress (a byte repeated, lines of text, half noise
/// half zeros), that do not (noise, noise with a few zeros) and zeros, with a short
/// tail that is not a whole cluster.
fn source() -> Vec<u8> {
    let mut data = Vec::with_capacity(CLUSTERS * CS + 4096);
    for i in 0..CLUSTERS {
        let noise = pattern(i as u64 + 1, CS);
        let cluster: Vec<u8> = match i % 6 {
            0 => noise,
            1 => vec![i as u8; CS],
            2 => vec![0; CS],
            3 => (0..)
                .flat_map(|n: u32| format!("{n:06} compressible line of text\n").into_bytes())
                .take(CS)
                .collect(),
            4 => {
                let mut c = noise;
                c[CS / 2..].fill(0);
                c
            }
            _ => {
                let mut c = noise;
                c[100..200].fill(0);
                c
            }
        };
        data.extend(cluster);
    }
    data.extend(pattern(99, 1000));
    data.extend([0x11; 3096]);
    data
}

/// What `qemu-img map --output=json` says of each `unit`-byte piece of the image, so
/// that two maps compare whatever the host offsets and merging.
fn clusters(dir: &Path, image: &str, unit: u64) -> Vec<(bool, bool, bool, bool)> {
    let r = run("qemu-img", ["map", "--output=json", image], Some(dir)).ok();
    let mut out = Vec::new();
    for e in r.json().as_array().expect("a map is an array") {
        let flag = |k: &str| e[k].as_bool().unwrap_or(false);
        let key = (
            flag("present"),
            flag("zero"),
            flag("data"),
            flag("compressed"),
        );
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let pieces = (start + len).div_ceil(unit) - start / unit;
        out.extend(std::iter::repeat_n(key, pieces as usize));
    }
    out
}

/// `qemu-img check IMAGE` finds nothing wrong.
#[track_caller]
fn assert_clean(dir: &Path, image: &str) {
    let r = run("qemu-img", ["check", image], Some(dir)).ok();
    assert!(r.stdout.contains("No errors were found"), "{r}");
}

#[test]
fn convert_c_makes_what_qemu_img_makes() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = Scratch::new("convert-c");
    let dir = s.path();
    s.write("src.raw", &source());
    let mut failed = Vec::new();
    for (extra, unit) in [
        (vec![], 64 << 10),
        (vec!["-o", "compression_type=zstd"], 64 << 10),
        (vec!["-o", "cluster_size=4096"], 4096),
        (vec!["-o", "cluster_size=2M"], 2 << 20),
        (vec!["-o", "compat=0.10"], 64 << 10),
        (vec!["-o", "refcount_bits=1"], 64 << 10),
        (vec!["-S", "0"], 64 << 10),
        (vec!["-W", "-m", "4"], 64 << 10),
    ] {
        let name = extra.join(" ");
        let mut args = vec!["convert", "-c", "-f", "raw", "-O", "qcow2"];
        args.extend(&extra);
        let mut theirs = args.clone();
        theirs.extend(["src.raw", "theirs.qcow2"]);
        qemu_img_ok(dir, &theirs);
        let mut ours = vec!["img"];
        ours.extend(&args);
        ours.extend(["src.raw", "ours.qcow2"]);
        cryptvm(dir, &ours).ok();
        assert_clean(dir, "ours.qcow2");
        run(
            "qemu-img",
            [
                "compare",
                "-f",
                "raw",
                "-F",
                "qcow2",
                "src.raw",
                "ours.qcow2",
            ],
            Some(dir),
        )
        .ok();
        let (a, b) = (
            clusters(dir, "ours.qcow2", unit),
            clusters(dir, "theirs.qcow2", unit),
        );
        // ruzstd (zstd's level 1 or so) and libzstd (level 3) disagree now and then
        // on whether a cluster shrinks at all (noise then a run of zeros: ruzstd
        // stores it raw; noise with a few zeros: libzstd's block overhead is larger).
        let zstd = name.contains("zstd");
        let stored_raw = |x: &(bool, bool, bool, bool), y: &(bool, bool, bool, bool)| {
            zstd && x.2 && y.2 && x.1 == y.1
        };
        let first = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x != y && !stored_raw(x, y));
        if a.len() != b.len() || first.is_some() {
            eprintln!("{name}: maps differ first at cluster {first:?}");
            failed.push(name.clone());
        }
        assert!(
            a.iter().any(|c| c.3),
            "{name}: no compressed cluster at all"
        );
        let size = |f: &str| std::fs::metadata(dir.join(f)).expect("stat").len() as f64;
        let (ours_len, theirs_len) = (size("ours.qcow2"), size("theirs.qcow2"));
        let ratio = ours_len / theirs_len;
        // With -W, chunks that finish out of order leave the tails of partly
        // filled host clusters behind when another chunk has taken the next one.
        // qemu-img's own -W layout varies from run to run (1.93 to 1.94 MB here against
        // cryptvm's 1.84 MB), so with -W only "not much larger" is a property.
        let most = if zstd {
            1.08
        } else if name.contains("-W") {
            1.10
        } else {
            1.03
        };
        let least = if name.contains("-W") { 0.85 } else { 0.95 };
        if !(least..=most).contains(&ratio) {
            eprintln!("{name}: {ours_len} bytes, qemu-img {theirs_len}");
            failed.push(format!("{name} (size)"));
        }
        // The image file ends on a sector, as qemu-img's does.
        assert_eq!(ours_len as u64 % 512, 0, "{name}");
        for f in ["ours.qcow2", "theirs.qcow2"] {
            std::fs::remove_file(dir.join(f)).expect("rm");
        }
    }
    assert!(failed.is_empty(), "differ from qemu-img: {failed:?}");
}

#[test]
fn writes_into_compressed_clusters_and_qemu_images_read_back() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("convert-c-rw");
    let dir = s.path();
    let data = source();
    s.write("src.raw", &data);
    // qemu-io writes into cryptvm's compressed clusters: they are copied out, and the
    // host clusters they shared keep the right refcounts.
    cryptvm(
        dir,
        ["img", "convert", "-c", "-O", "qcow2", "src.raw", "c.qcow2"],
    )
    .ok();
    qemu_io_cmds(
        dir,
        "qcow2",
        "c.qcow2",
        &[
            "write -P 0xab 65636 100",
            "write -P 0xcd 196608 65536",
            "write -z 458752 65536",
            "discard 1048576 65536",
        ],
    );
    let mut expect = data.clone();
    expect[65636..65736].fill(0xab);
    expect[196608..262144].fill(0xcd);
    expect[458752..524288].fill(0);
    expect[1048576..1114112].fill(0);
    assert_clean(dir, "c.qcow2");
    cryptvm(dir, ["img", "convert", "-O", "raw", "c.qcow2", "back.raw"]).ok();
    assert_same_bytes(&read(&s.join("back.raw")), &expect, "after qemu-io writes");
    // And the other way: qemu-img's compressed images read through cryptvm.
    for o in ["compression_type=zlib", "compression_type=zstd"] {
        qemu_img_ok(
            dir,
            &[
                "convert", "-c", "-O", "qcow2", "-o", o, "src.raw", "q.qcow2",
            ],
        );
        cryptvm(dir, ["img", "convert", "-O", "raw", "q.qcow2", "q.raw"]).ok();
        let mut want = data.clone();
        want.resize(data.len().next_multiple_of(512), 0);
        assert_same_bytes(&read(&s.join("q.raw")), &want, o);
        let info: Value = cryptvm(dir, ["img", "info", "--output=json", "q.qcow2"])
            .ok()
            .json();
        assert_eq!(
            info["format-specific"]["data"]["compression-type"],
            o.trim_start_matches("compression_type="),
            "{info}"
        );
    }
}

#[test]
fn convert_c_is_refused_where_qemu_img_refuses_it() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = Scratch::new("convert-c-refused");
    let dir = s.path();
    s.write("src.raw", &source());
    s.sparse("target.raw", (CLUSTERS * CS + 4096) as u64);
    for args in [
        vec!["convert", "-c", "-O", "raw", "src.raw", "out.img"],
        vec![
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "src.raw",
            "out.img",
        ],
        vec!["convert", "-n", "-c", "-O", "raw", "src.raw", "target.raw"],
        vec![
            "convert",
            "-c",
            "--object",
            "secret,id=s,data=x",
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s",
            "src.raw",
            "out.img",
        ],
    ] {
        let theirs = run("qemu-img", &args, Some(dir));
        assert_eq!(theirs.status, Some(1), "{theirs}");
        let before = Snapshot::take(dir);
        let mut full = vec!["img"];
        full.extend(&args);
        let ours = cryptvm(dir, &full);
        let message = theirs.stderr.trim().trim_start_matches("qemu-img: ");
        ours.clean_error(1, &[message]);
        before.assert_unchanged(&ours);
    }
    // An unknown compression type, in QEMU's words (qemu-img names the target first).
    let args = [
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compression_type=lz4",
        "src.raw",
        "out.img",
    ];
    let theirs = run("qemu-img", args, Some(dir));
    let want = "Parameter 'compression-type' does not accept value 'lz4'";
    assert!(theirs.stderr.contains(want), "{theirs}");
    let mut full = vec!["img"];
    full.extend(args);
    cryptvm(dir, &full).clean_error(1, &[want]);
}
