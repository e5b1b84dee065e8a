//! Tests of the qcow2 driver, many against qemu-img / qemu-io (skipped with
//! a note when those tools are missing).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use super::*;
use crate::node::BlockNode;

mod concurrent;

fn have(tool: &str) -> bool {
    let ok = Command::new(tool).arg("--version").output().is_ok();
    if !ok {
        eprintln!("{tool} not found: skipping the peer part of this test");
    }
    ok
}

fn run(tool: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(tool).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn qemu_img(args: &[&str]) -> String {
    String::from_utf8_lossy(&run("qemu-img", args).stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The guest content of an image, as qemu-img converts it to raw.
fn qemu_raw(image: &Path) -> Vec<u8> {
    let out = image.with_extension("qemu.raw");
    qemu_img(&["convert", "-O", "raw", p(image), p(&out)]);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

/// `qemu-img check` must pass without errors or leaks.
fn assert_qemu_clean(image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", p(image)])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {}: {text}",
        image.display()
    );
}

fn read_all(n: &dyn BlockNode) -> Vec<u8> {
    let mut v = vec![0u8; n.size() as usize];
    n.read_at(0, &mut v).unwrap();
    v
}

/// Deterministic pseudo-random bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, b: &mut [u8]) {
        for x in b.iter_mut() {
            *x = self.next() as u8;
        }
    }
}

fn opts(cluster: u64, v3: bool, refcount_bits: u32) -> CreateOptions {
    CreateOptions {
        cluster_size: cluster,
        v3,
        refcount_bits,
        ..CreateOptions::default()
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// Random writes, discards and write-zeroes against a reference, then
/// read-back, `qemu-img check` and comparison with qemu's view.
fn round_trip(dir: &Path, o: &CreateOptions, size: u64, ops: usize, seed: u64, backing: bool) {
    let img = dir.join(format!(
        "rt-{}-{}-{}.qcow2",
        o.cluster_size, o.v3, o.refcount_bits
    ));
    let mut rng = Rng(seed);
    let mut reference = vec![0u8; size as usize];
    let mut o = o.clone();
    if backing {
        let b = dir.join("backing.raw");
        rng.fill(&mut reference);
        std::fs::write(&b, &reference).unwrap();
        o.backing_file = Some("backing.raw".into());
        o.backing_fmt = Some("raw".into());
    }
    create(&img, Some(size), &o).unwrap();
    let cs = o.cluster_size;
    {
        let n = Qcow2Node::open_path(&img, false).unwrap();
        for _ in 0..ops {
            let off = rng.below(size);
            let max = (size - off).min(4 * cs + 3000);
            let len = 1 + rng.below(max);
            let r = off as usize..(off + len) as usize;
            match rng.below(8) {
                0..=4 => {
                    let mut d = vec![0u8; len as usize];
                    rng.fill(&mut d);
                    n.write_at(off, &d).unwrap();
                    reference[r].copy_from_slice(&d);
                }
                5 => {
                    n.write_zeroes(off, len).unwrap();
                    reference[r].fill(0);
                }
                6 => {
                    n.discard(off, len).unwrap();
                    let mut got = vec![0u8; len as usize];
                    n.read_at(off, &mut got).unwrap();
                    for (i, (g, e)) in got.iter().zip(&reference[r.clone()]).enumerate() {
                        assert!(
                            g == e || *g == 0,
                            "discarded byte {} changed",
                            off as usize + i
                        );
                    }
                    reference[r].copy_from_slice(&got);
                }
                _ => {
                    let mut got = vec![0u8; len as usize];
                    n.read_at(off, &mut got).unwrap();
                    assert!(got == reference[r], "read at {off} len {len} differs");
                }
            }
            if rng.below(40) == 0 {
                n.flush().unwrap();
            }
        }
        assert!(read_all(&n) == reference, "read-back differs");
        n.flush().unwrap();
        let report = n.check(Repair::None).unwrap();
        assert!(report.is_clean(), "own check: {report:?}");
    }
    let n = Qcow2Node::open_path(&img, true).unwrap();
    assert!(read_all(&n) == reference, "reopened image differs");
    if have("qemu-img") {
        assert_qemu_clean(&img);
        assert!(qemu_raw(&img) == reference, "qemu reads differently");
    }
}

#[test]
fn round_trips_across_formats() {
    let d = tmp();
    round_trip(d.path(), &opts(65536, true, 16), 8 << 20, 150, 1, false);
    round_trip(d.path(), &opts(65536, false, 16), 8 << 20, 150, 2, false);
    round_trip(d.path(), &opts(512, true, 1), 1 << 20, 300, 3, false);
    round_trip(d.path(), &opts(512, true, 64), 1 << 20, 300, 4, false);
    round_trip(d.path(), &opts(512, false, 16), 1 << 20, 200, 5, false);
    round_trip(d.path(), &opts(2 << 20, true, 16), 12 << 20, 40, 6, false);
    round_trip(d.path(), &opts(2 << 20, false, 16), 12 << 20, 40, 7, false);
}

#[test]
fn round_trips_over_backing_files() {
    let d = tmp();
    round_trip(d.path(), &opts(65536, true, 16), 4 << 20, 150, 11, true);
    let d = tmp();
    round_trip(d.path(), &opts(65536, false, 16), 4 << 20, 150, 12, true);
    let d = tmp();
    round_trip(d.path(), &opts(512, true, 64), 512 << 10, 200, 13, true);
}

/// Creates with qemu-img and with `create`, and compares the files byte for byte.
fn same_as_qemu_create(dir: &Path, qemu_opts: &str, o: &CreateOptions, size: &str, bytes: u64) {
    let theirs = dir.join("theirs.qcow2");
    let ours = dir.join("ours.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !qemu_opts.is_empty() {
        args.extend(["-o", qemu_opts]);
    }
    args.extend([p(&theirs), size]);
    qemu_img(&args);
    create(&ours, Some(bytes), o).unwrap();
    let (la, lb) = (
        std::fs::metadata(&theirs).unwrap().len(),
        std::fs::metadata(&ours).unwrap().len(),
    );
    assert_eq!(la, lb, "file sizes differ for '{qemu_opts}'");
    let cmp = Command::new("cmp")
        .args([p(&theirs), p(&ours)])
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "'{qemu_opts}': {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    assert_qemu_clean(&ours);
}

#[test]
fn create_matches_qemu_img() {
    if !have("qemu-img") {
        return;
    }
    let d = tmp();
    let dir = d.path();
    std::fs::write(dir.join("base.raw"), vec![0u8; 1 << 20]).unwrap();
    let base = CreateOptions::default;
    same_as_qemu_create(dir, "", &base(), "1G", 1 << 30);
    same_as_qemu_create(dir, "compat=0.10", &opts(65536, false, 16), "1G", 1 << 30);
    same_as_qemu_create(dir, "cluster_size=512", &opts(512, true, 16), "1G", 1 << 30);
    same_as_qemu_create(
        dir,
        "cluster_size=2M",
        &opts(2 << 20, true, 16),
        "1G",
        1 << 30,
    );
    same_as_qemu_create(dir, "refcount_bits=1", &opts(65536, true, 1), "1G", 1 << 30);
    same_as_qemu_create(
        dir,
        "cluster_size=512,refcount_bits=64",
        &opts(512, true, 64),
        "1G",
        1 << 30,
    );
    let lazy = CreateOptions {
        lazy_refcounts: true,
        ..base()
    };
    same_as_qemu_create(dir, "lazy_refcounts=on", &lazy, "1G", 1 << 30);
    let zstd = CreateOptions {
        compression_type: CompressionType::Zstd,
        ..base()
    };
    same_as_qemu_create(dir, "compression_type=zstd", &zstd, "1G", 1 << 30);
    let prealloc = CreateOptions {
        preallocation: Preallocation::Metadata,
        ..base()
    };
    same_as_qemu_create(dir, "preallocation=metadata", &prealloc, "600M", 600 << 20);
    let prealloc512 = CreateOptions {
        preallocation: Preallocation::Metadata,
        ..opts(512, true, 16)
    };
    same_as_qemu_create(
        dir,
        "preallocation=metadata,cluster_size=512",
        &prealloc512,
        "20M",
        20 << 20,
    );
    let backed = CreateOptions {
        backing_file: Some("base.raw".into()),
        backing_fmt: Some("raw".into()),
        ..base()
    };
    same_as_qemu_create(
        dir,
        "backing_file=base.raw,backing_fmt=raw",
        &backed,
        "1M",
        1 << 20,
    );
    let backed512 = CreateOptions {
        backing_file: Some("base.raw".into()),
        backing_fmt: Some("raw".into()),
        ..opts(512, true, 16)
    };
    same_as_qemu_create(
        dir,
        "backing_file=base.raw,backing_fmt=raw,cluster_size=512",
        &backed512,
        "1M",
        1 << 20,
    );
    let backed_v2 = CreateOptions {
        backing_file: Some("base.raw".into()),
        backing_fmt: Some("raw".into()),
        ..opts(65536, false, 16)
    };
    same_as_qemu_create(
        dir,
        "backing_file=base.raw,backing_fmt=raw,compat=0.10",
        &backed_v2,
        "1M",
        1 << 20,
    );
    // An odd size is rounded up to whole sectors, as qemu-img does.
    same_as_qemu_create(dir, "", &base(), "1000", 1000);
}

fn qemu_io(image: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(p(image));
    let out = run("qemu-io", &args);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "qemu-io {cmds:?}: {text}");
}

#[test]
fn reads_images_qemu_wrote() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tmp();
    let dir = d.path();
    // Plain image with data, zero clusters and discards.
    let img = dir.join("plain.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "8M"]);
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0xab 1000 100k",
            "write -P 0xcd 1M 192k",
            "write -z 1088k 64k",
            "discard 1152k 64k",
            "write -P 0x11 8000k 192k",
        ],
    );
    let n = Qcow2Node::open_path(&img, true).unwrap();
    assert!(read_all(&n) == qemu_raw(&img));

    // A chain of three over a qcow2 base, each layer writing part of the disk.
    let base = dir.join("base.qcow2");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "4M"]);
    qemu_io(&base, "qcow2", &["write -P 1 0 4M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&mid),
    ]);
    qemu_io(&mid, "qcow2", &["write -P 2 100k 1M", "write -z 2M 64k"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        p(&top),
        "6M",
    ]);
    qemu_io(&top, "qcow2", &["write -P 3 900k 300k", "discard 3M 128k"]);
    let expect = qemu_raw(&top);
    {
        let n = Qcow2Node::open_path(&top, false).unwrap();
        assert_eq!(n.children().len(), 2);
        assert!(read_all(&n) == expect, "chain of three reads differently");
        // Writes over the chain: copy-on-write from the layers below.
        n.write_at(65536 * 20 + 7, b"over the chain").unwrap();
        n.write_zeroes(4 << 20, 70000).unwrap();
    }
    let mut expect = expect;
    expect[65536 * 20 + 7..65536 * 20 + 21].copy_from_slice(b"over the chain");
    expect[4 << 20..(4 << 20) + 70000].fill(0);
    assert_qemu_clean(&top);
    assert!(qemu_raw(&top) == expect);
}

#[test]
fn reads_compressed_clusters() {
    if !have("qemu-img") {
        return;
    }
    let d = tmp();
    let dir = d.path();
    let src = dir.join("src.raw");
    let mut data = vec![0u8; 3 << 20];
    let mut rng = Rng(99);
    for (i, chunk) in data.chunks_mut(4096).enumerate() {
        match i % 4 {
            0 => rng.fill(chunk),     // incompressible
            1 => chunk.fill(i as u8), // compressible
            2 => {}                   // zeros
            _ => chunk.copy_from_slice(&[b"qcow2 compressed ".as_slice(); 241].concat()[..4096]),
        }
    }
    std::fs::write(&src, &data).unwrap();
    for (ctype, cluster) in [
        ("zlib", "64k"),
        ("zstd", "64k"),
        ("zlib", "4k"),
        ("zstd", "2M"),
    ] {
        let img = dir.join(format!("c-{ctype}-{cluster}.qcow2"));
        let o = format!("compression_type={ctype},cluster_size={cluster}");
        qemu_img(&["convert", "-c", "-O", "qcow2", "-o", &o, p(&src), p(&img)]);
        {
            let n = Qcow2Node::open_path(&img, false).unwrap();
            assert_eq!(n.info()["data"]["compression-type"], ctype);
            assert!(
                read_all(&n) == data,
                "{o}: compressed image reads differently"
            );
            // Partial writes into compressed clusters copy them first.
            n.write_at(70000, b"partial").unwrap();
            n.write_at(2 << 20, &[7u8; 5000]).unwrap();
        }
        let mut expect = data.clone();
        expect[70000..70007].copy_from_slice(b"partial");
        expect[2 << 20..(2 << 20) + 5000].fill(7);
        assert_qemu_clean(&img);
        assert!(qemu_raw(&img) == expect, "{o}: after writes");
    }
}

#[test]
fn writes_compressed_clusters_and_overwrites_them() {
    let d = tmp();
    let dir = d.path();
    let cs = 65536usize;
    // 40 clusters and a partial one: noise, a byte pattern, zeros, text.
    let size = 40 * cs + 3072;
    let mut data = vec![0u8; size];
    let mut rng = Rng(7);
    for (i, chunk) in data.chunks_mut(cs).enumerate() {
        match i % 4 {
            0 => rng.fill(chunk),
            1 => chunk.fill(i as u8),
            2 => {}
            _ => {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = b"compressed qcow2 data, "[j % 23];
                }
            }
        }
    }
    for (ctype, refcount_bits) in [(CompressionType::Zlib, 16), (CompressionType::Zstd, 1)] {
        let img = dir.join(format!("w-{ctype:?}.qcow2"));
        let opts = CreateOptions {
            compression_type: ctype,
            refcount_bits,
            ..CreateOptions::default()
        };
        create(&img, Some(size as u64), &opts).unwrap();
        {
            let n = Qcow2Node::open_path(&img, false).unwrap();
            assert_eq!(n.compressed_write_unit(), Some(cs as u64));
            // Not whole clusters.
            assert!(n.write_compressed(512, &data[..cs], None).is_err());
            assert!(n.write_compressed(0, &data[..cs - 512], None).is_err());
            // Zero clusters are skipped, as convert does.
            for (i, chunk) in data.chunks(cs).enumerate() {
                if i % 4 != 2 {
                    n.write_compressed((i * cs) as u64, chunk, None).unwrap();
                }
            }
            n.write_compressed(0, &[], None).unwrap();
            // Compressed clusters are written once, never over data.
            let e = n
                .write_compressed(cs as u64, &data[cs..2 * cs], None)
                .unwrap_err();
            assert!(
                matches!(
                    e,
                    crate::BlockError::Qcow2 {
                        source: Qcow2Error::CompressedOverwrite { .. },
                        ..
                    }
                ),
                "{e}"
            );
            assert!(read_all(&n) == data, "{ctype:?}: reads differently");
            let r = n.check(Repair::None).unwrap();
            assert!(r.is_clean(), "{ctype:?}: {:?}", r.messages);
            // The noise clusters do not compress; the others do, and so
            // does the partial last one (padded with zeros).
            assert_eq!(r.compressed_clusters, 21, "{ctype:?}");
            n.flush().unwrap();
        }
        assert_eq!(std::fs::metadata(&img).unwrap().len() % 512, 0);
        if !have("qemu-img") {
            continue;
        }
        assert_qemu_clean(&img);
        assert!(qemu_raw(&img) == data, "{ctype:?}: qemu reads differently");
        // Overwrites: partial, whole, discard; the old compressed
        // references go (qemu-img check counts every one).
        let mut expect = data.clone();
        {
            let n = Qcow2Node::open_path(&img, false).unwrap();
            n.write_at(cs as u64 + 100, b"partial").unwrap();
            expect[cs + 100..cs + 107].copy_from_slice(b"partial");
            n.write_at(3 * cs as u64, &vec![9u8; cs]).unwrap();
            expect[3 * cs..4 * cs].fill(9);
            n.discard(5 * cs as u64, cs as u64).unwrap();
            expect[5 * cs..6 * cs].fill(0);
            n.write_zeroes(7 * cs as u64, 2 * cs as u64).unwrap();
            expect[7 * cs..9 * cs].fill(0);
            assert!(read_all(&n) == expect, "{ctype:?}: after writes");
            n.flush().unwrap();
            let r = n.check(Repair::None).unwrap();
            assert!(r.is_clean(), "{ctype:?}: {:?}", r.messages);
        }
        assert_qemu_clean(&img);
        assert!(qemu_raw(&img) == expect, "{ctype:?}: qemu after writes");
    }
}

/// Header bytes of a fresh default image, modified by `f`, must be refused
/// with an error containing `want`, without changing the file.
fn refused(dir: &Path, name: &str, want: &str, f: impl Fn(&mut Vec<u8>)) {
    let img = dir.join(format!("{name}.qcow2"));
    create(&img, Some(8 << 20), &CreateOptions::default()).unwrap();
    let mut b = std::fs::read(&img).unwrap();
    f(&mut b);
    std::fs::write(&img, &b).unwrap();
    for ro in [true, false] {
        let err = match Qcow2Node::open_path(&img, ro) {
            Ok(_) => panic!("{name}: hostile image was opened"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(want), "{name}: '{err}' lacks '{want}'");
        assert!(!err.contains('\n'), "{name}: multi-line error");
    }
    assert!(
        std::fs::read(&img).unwrap() == b,
        "{name}: file was written"
    );
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn hostile_headers_are_refused() {
    let d = tmp();
    let dir = d.path();
    refused(dir, "l1-billions", "L1 table too large", |b| {
        put32(b, 36, 3_000_000_000)
    });
    refused(dir, "l1-past-eof", "beyond the end of the file", |b| {
        put64(b, 40, 1 << 40)
    });
    refused(dir, "l1-in-header", "points into the header", |b| {
        put64(b, 40, 0)
    });
    refused(dir, "l1-unaligned", "not aligned", |b| {
        put64(b, 40, 0x30008)
    });
    refused(dir, "rt-overlaps-l1", "overlaps the L1 table", |b| {
        put64(b, 48, 0x30000)
    });
    refused(dir, "rt-huge", "refcount table too large", |b| {
        put32(b, 56, 0x7fff_ffff)
    });
    refused(dir, "cluster-bits-40", "cluster size", |b| put32(b, 20, 40));
    refused(dir, "cluster-bits-8", "cluster size", |b| put32(b, 20, 8));
    refused(dir, "snapshots", "too many snapshots", |b| {
        put32(b, 60, 1 << 30)
    });
    refused(dir, "l1-too-small", "L1 table is too small", |b| {
        put64(b, 24, 1 << 50)
    });
    refused(dir, "refcount-order", "refcount_order", |b| put32(b, 96, 7));
    refused(dir, "header-length", "header length", |b| {
        put32(b, 100, 100_000)
    });
    refused(dir, "version", "version", |b| put32(b, 4, 4));
    refused(dir, "magic", "not in qcow2 format", |b| b[0] = b'X');
    refused(dir, "encrypted", "encrypted", |b| put32(b, 32, 2));
    refused(
        dir,
        "unknown-feature",
        "Unknown incompatible feature: 20",
        |b| put64(b, 72, 1 << 5),
    );
    // A feature name table that names the unknown bit: the name is shown.
    refused(dir, "named-feature", "extended L2 entries", |b| {
        // Entry 4 of the table (bit 4, "extended L2 entries") renamed to bit 9.
        let entry = 0x70 + 8 + 4 * 48;
        assert_eq!(&b[entry + 2..entry + 10], b"extended");
        b[entry + 1] = 9;
        put64(b, 72, 1 << 9);
    });
    refused(dir, "ext-too-long", "header extension", |b| {
        put32(b, 0x74, 0x100000)
    });
    refused(dir, "backing-name", "backing file name", |b| {
        put64(b, 8, 0x200);
        put32(b, 16, 5000);
    });
}

#[test]
fn corrupt_compressed_cluster_is_an_io_error() {
    if !have("qemu-img") {
        return;
    }
    let d = tmp();
    let src = d.path().join("src.raw");
    std::fs::write(&src, vec![0x5au8; 1 << 20]).unwrap();
    let img = d.path().join("c.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", p(&src), p(&img)]);
    let n = Qcow2Node::open_path(&img, true).unwrap();
    let mut m = n.lock_meta().unwrap();
    let (entry, _) = m.l2_entry(0).unwrap();
    let ClusterKind::Compressed { offset, size } = m.classify(entry).unwrap() else {
        panic!("not compressed");
    };
    drop(m);
    drop(n);
    let mut b = std::fs::read(&img).unwrap();
    // Only the start: the last sector may hold the next cluster's data.
    assert!(size > 16);
    b[offset as usize..offset as usize + 16].fill(0xff);
    std::fs::write(&img, &b).unwrap();
    let n = Qcow2Node::open_path(&img, true).unwrap();
    let mut buf = vec![0u8; 4096];
    let err = n.read_at(0, &mut buf).unwrap_err().to_string();
    assert!(err.contains("does not decompress"), "{err}");
    // Other clusters still read.
    n.read_at(65536, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0x5a));
}

use super::meta::ClusterKind;

#[test]
fn corrupt_bit_means_read_only_and_autoclear_is_cleared() {
    let d = tmp();
    let img = d.path().join("x.qcow2");
    create(&img, Some(1 << 20), &CreateOptions::default()).unwrap();
    let mut b = std::fs::read(&img).unwrap();
    put64(&mut b, 72, 1 << 1);
    std::fs::write(&img, &b).unwrap();
    let n = Qcow2Node::open_path(&img, false).unwrap();
    assert!(n.read_only());
    assert_eq!(n.info()["data"]["corrupt"], true);
    let err = n.write_at(0, b"x").unwrap_err().to_string();
    assert!(err.contains("corrupt"), "{err}");
    drop(n);
    assert!(std::fs::read(&img).unwrap() == b);

    put64(&mut b, 72, 0);
    put64(&mut b, 88, (1 << 0) | (1 << 7));
    std::fs::write(&img, &b).unwrap();
    let n = Qcow2Node::open_path(&img, false).unwrap();
    assert_eq!(n.header().unwrap().autoclear, 1 | 1 << 7, "no write yet");
    n.write_at(0, b"x").unwrap();
    assert_eq!(n.header().unwrap().autoclear, 0);
    drop(n);
    assert_eq!(&std::fs::read(&img).unwrap()[88..96], &[0u8; 8]);
}

#[test]
fn lazy_refcounts_dirty_image_is_repaired() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tmp();
    let img = d.path().join("lazy.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        p(&img),
        "4M",
    ]);
    // qemu-io dies without closing the image: the dirty bit stays set.
    let _ = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x42 0 300k",
            "-c",
            "abort",
            p(&img),
        ])
        .output()
        .unwrap();
    let h = std::fs::read(&img).unwrap();
    assert_eq!(h[79] & 1, 1, "dirty bit not set by qemu-io");
    let expect = {
        let n = Qcow2Node::open_path(&img, true).unwrap();
        let v = read_all(&n);
        assert!(v[..300 << 10].iter().all(|&x| x == 0x42));
        assert_eq!(n.image_info()["dirty-flag"], true);
        v
    };
    {
        let n = Qcow2Node::open_path(&img, false).unwrap();
        assert!(read_all(&n) == expect);
        n.write_at(1 << 20, b"after repair").unwrap();
    }
    assert_eq!(
        std::fs::read(&img).unwrap()[79] & 1,
        0,
        "dirty bit left set"
    );
    assert_qemu_clean(&img);
}

#[test]
fn extended_l2_images_read() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = tmp();
    let dir = d.path();
    let base = dir.join("b.qcow2");
    let img = dir.join("e.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "2M"]);
    qemu_io(&base, "qcow2", &["write -P 0x77 0 2M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=64k",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        p(&img),
    ]);
    qemu_io(
        &img,
        "qcow2",
        &[
            "write -P 0x12 2k 2k",
            "write -z 6k 4k",
            "write -P 0x34 100k 1k",
            "discard 128k 64k",
        ],
    );
    let n = Qcow2Node::open_path(&img, true).unwrap();
    assert_eq!(n.info()["data"]["extended-l2"], true);
    assert!(read_all(&n) == qemu_raw(&img));
    drop(n);
    let err = Qcow2Node::open_path(&img, false).err().unwrap().to_string();
    assert!(err.contains("extended L2"), "{err}");
}

#[test]
fn check_finds_and_repairs_leaks_and_corruptions() {
    let d = tmp();
    let img = d.path().join("k.qcow2");
    create(&img, Some(4 << 20), &CreateOptions::default()).unwrap();
    {
        let n = Qcow2Node::open_path(&img, false).unwrap();
        n.write_at(0, &[1u8; 200000]).unwrap();
    }
    let file = |rw: bool| -> crate::NodeRef {
        let n = Qcow2Node::open_path(&img, !rw).unwrap();
        let f = n.children()[0].1.clone();
        drop(n);
        f
    };
    let clean = check(file(false), Repair::None).unwrap();
    assert!(clean.is_clean(), "{clean:?}");
    assert_eq!(clean.allocated_clusters, 4);
    assert_eq!(clean.total_clusters, 64);
    // Refcount block at 0x20000 (16-bit entries): leak cluster 20, drop cluster 4 (an L2 table).
    let mut b = std::fs::read(&img).unwrap();
    b.resize(21 * 65536, 0);
    b[0x20000 + 40..0x20000 + 42].copy_from_slice(&1u16.to_be_bytes());
    b[0x20000 + 8..0x20000 + 10].copy_from_slice(&0u16.to_be_bytes());
    std::fs::write(&img, &b).unwrap();
    let r = check(file(false), Repair::None).unwrap();
    assert_eq!((r.leaks, r.corruptions), (1, 2), "{r:?}"); // refcount 0 and its COPIED flag
    assert!(r
        .messages
        .iter()
        .any(|m| m == "Leaked cluster 20 refcount=1 reference=0"));
    // A referenced cluster with refcount 0 needs the refcounts rebuilt, which
    // `-r leaks` may not do: QEMU stops with an I/O error, repairing nothing.
    let before = std::fs::read(&img).unwrap();
    let r = check(file(true), Repair::Leaks).unwrap();
    assert!(r.failed, "{r:?}");
    assert_eq!(r.leaks_fixed, 0);
    assert_eq!(
        r.messages.last().unwrap(),
        "ERROR need to rebuild refcount structures"
    );
    assert_eq!(std::fs::read(&img).unwrap(), before);
    let r = check(file(true), Repair::All).unwrap();
    // Rebuilt: the COPIED flag is then right for the new refcount.
    assert_eq!(
        (r.leaks, r.corruptions, r.leaks_fixed, r.corruptions_fixed),
        (0, 0, 1, 1),
        "{r:?}"
    );
    assert!(r
        .messages
        .iter()
        .any(|m| m == "Rebuilding refcount structure"));
    let r = check(file(false), Repair::None).unwrap();
    assert!(r.is_clean(), "{r:?}");
    if have("qemu-img") {
        assert_qemu_clean(&img);
    }
}

#[test]
fn graph_options_and_backing_choices() {
    use crate::blockdev::OpenContext;
    use crate::{BlockGraph, SecretStore};
    use serde_json::json;
    let d = tmp();
    let dir = d.path();
    std::fs::write(dir.join("base.raw"), vec![9u8; 1 << 20]).unwrap();
    let o = CreateOptions {
        backing_file: Some("base.raw".into()),
        backing_fmt: Some("raw".into()),
        ..CreateOptions::default()
    };
    create(&dir.join("top.qcow2"), None, &o).unwrap();
    let secrets = SecretStore::new();
    let ctx = OpenContext {
        secrets: &secrets,
        base_dir: Some(dir),
        no_io: false,
        read_only: false,
        backing_files: crate::blockdev::BackingFiles::Contained,
        legacy_aes: false,
    };
    let mut g = BlockGraph::new();
    let file = json!({"driver": "file", "filename": "top.qcow2"});
    g.add(
        "b[0]",
        json!({"node-name": "auto", "driver": "qcow2", "file": file, "read-only": true}),
        &ctx,
        false,
    )
    .unwrap();
    let auto = g.get("auto").unwrap();
    assert_eq!(auto.size(), 1 << 20);
    let mut buf = [0u8; 4];
    auto.read_at(100, &mut buf).unwrap();
    assert_eq!(buf, [9; 4]);
    assert_eq!(auto.image_info()["backing-filename-format"], "raw");
    g.add(
        "b[1]",
        json!({"node-name": "none", "driver": "qcow2", "file": file, "backing": null,
               "read-only": true, "l2-cache-size": "1M", "lazy-refcounts": false}),
        &ctx,
        false,
    )
    .unwrap();
    g.get("none").unwrap().read_at(100, &mut buf).unwrap();
    assert_eq!(buf, [0; 4]);
    assert_eq!(g.get("none").unwrap().children().len(), 1);
    g.add(
        "b[2]",
        json!({"node-name": "other", "driver": "qcow2", "file": file, "read-only": true,
               "backing": {"driver": "raw", "file": {"driver": "file", "filename": "base.raw"}}}),
        &ctx,
        false,
    )
    .unwrap();
    assert!(g.children_of("other").iter().any(|(r, _)| r == "backing"));
    let err = g
        .add(
            "b[3]",
            json!({"node-name": "bad", "driver": "qcow2", "file": file, "bogus": 1}),
            &ctx,
            false,
        )
        .unwrap_err()
        .to_string();
    assert_eq!(err, "b[3].bogus: unknown option");
    let info = auto.info();
    assert_eq!(
        info,
        json!({"type":"qcow2","data":{"compat":"1.1","compression-type":"zlib",
               "lazy-refcounts":false,"refcount-bits":16,"corrupt":false,"extended-l2":false}})
    );
}

#[test]
fn concurrent_writers_and_readers() {
    let d = tmp();
    let img = d.path().join("mt.qcow2");
    create(&img, Some(16 << 20), &opts(4096, true, 16)).unwrap();
    let n = Arc::new(Qcow2Node::open_path(&img, false).unwrap());
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let n = n.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(t as u64 + 1);
                for _ in 0..200 {
                    // Each thread owns every fourth 64 KiB stripe.
                    let stripe = rng.below(64) * 4 + t as u64;
                    let off = stripe * 65536 + rng.below(60000);
                    let len = 1 + rng.below(5000) as usize;
                    n.write_at(off, &vec![t + 1; len]).unwrap();
                    let mut back = vec![0u8; len];
                    n.read_at(off, &mut back).unwrap();
                    assert!(back.iter().all(|&x| x == t + 1));
                    if rng.below(20) == 0 {
                        n.discard(stripe * 65536, 65536).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    n.flush().unwrap();
    assert!(n.check(Repair::None).unwrap().is_clean());
    drop(n);
    if have("qemu-img") {
        assert_qemu_clean(&img);
    }
}

fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// The byte position of the L2 entry of guest cluster `gc` (64 KiB
/// clusters, standard entries) in the image bytes `b`.
fn l2_entry_pos(b: &[u8], gc: u64) -> usize {
    let l1 = get64(b, 40) as usize;
    let l2 = get64(b, l1 + (gc / 8192) as usize * 8) & super::meta::OFFSET_MASK;
    assert_ne!(l2, 0, "guest cluster {gc} has no L2 table");
    l2 as usize + (gc % 8192) as usize * 8
}

/// An image with guest clusters 0..3 allocated (0x11, 0x22, 0x33), 64 KiB clusters.
fn three_cluster_image(img: &Path) {
    create(img, Some(8 << 20), &CreateOptions::default()).unwrap();
    let n = Qcow2Node::open_path(img, false).unwrap();
    for (i, v) in [0x11u8, 0x22, 0x33].into_iter().enumerate() {
        n.write_at(i as u64 * 65536, &[v; 65536]).unwrap();
    }
}

/// A named request against a node.
type Attempt<'a> = (&'a str, Box<dyn Fn() -> crate::Result<()> + 'a>);

/// A data cluster pointed at metadata (hostile image) is never written
/// over, by in-place writes, copy-on-write or discards: the request fails
/// with one clear line and the file is left byte for byte as it was (not
/// even the autoclear bits are cleared). Reading such a cluster works.
#[test]
fn data_cluster_on_metadata_is_never_written() {
    let d = tmp();
    let pristine = d.path().join("pristine.qcow2");
    three_cluster_image(&pristine);
    let base = std::fs::read(&pristine).unwrap();
    let l1_off = get64(&base, 40);
    let rt_off = get64(&base, 48);
    let rb_off = get64(&base, rt_off as usize) & super::meta::OFFSET_MASK;
    let l2_off = get64(&base, l1_off as usize) & super::meta::OFFSET_MASK;
    let targets = [
        ("L1 table", l1_off),
        ("refcount table", rt_off),
        ("refcount block", rb_off),
        ("L2 table", l2_off),
    ];
    for (what, target) in targets {
        for copied in [true, false] {
            let case = format!("{what}, copied {copied}");
            let img = d.path().join("h.qcow2");
            let mut b = base.clone();
            // Guest cluster 1 points at the metadata; autoclear bit 7 set.
            let flag = if copied { super::meta::OFLAG_COPIED } else { 0 };
            let at = l2_entry_pos(&b, 1);
            put64(&mut b, at, flag | target);
            put64(&mut b, 88, 1 << 7);
            std::fs::write(&img, &b).unwrap();
            let n = Qcow2Node::open_path(&img, false).unwrap();
            // Reading is fine: the metadata's bytes.
            let mut c = vec![0u8; 65536];
            n.read_at(65536, &mut c).unwrap();
            assert!(c == b[target as usize..target as usize + 65536], "{case}");
            let attempts: [Attempt<'_>; 5] = [
                ("write", Box::new(|| n.write_at(65536 + 512, &[0xee; 4096]))),
                // Starts in a good cluster: nothing of it may be written either.
                (
                    "spanning write",
                    Box::new(|| n.write_at(0, &[0xee; 3 << 16])),
                ),
                (
                    "partial write",
                    Box::new(|| n.write_at(65536 - 4, &[0xee; 8])),
                ),
                ("discard", Box::new(|| n.discard(0, 3 << 16))),
                ("write zeroes", Box::new(|| n.write_zeroes(65536, 65536))),
            ];
            for (op, f) in attempts {
                let err = f().expect_err(&format!("{case}: {op} succeeded"));
                let msg = err.to_string();
                assert!(
                    msg.contains(&format!("metadata ({what})"))
                        && msg.contains("the image is corrupt")
                        && !msg.contains('\n'),
                    "{case}: {op}: {msg}"
                );
                if copied && op != "discard" && op != "write zeroes" {
                    assert!(
                        msg.starts_with("qcow2: guest data at host offset 0x")
                            && msg.contains("would overwrite metadata"),
                        "{case}: {op}: {msg}"
                    );
                }
            }
            // The good clusters are still writable in place.
            n.write_at(2 << 16, &[0x44; 100]).unwrap();
            drop(n);
            let after = std::fs::read(&img).unwrap();
            let mut expect = b.clone();
            let c2 = get64(&b, l2_entry_pos(&b, 2)) & super::meta::OFFSET_MASK;
            expect[c2 as usize..c2 as usize + 100].fill(0x44);
            // The good write cleared the autoclear bits.
            put64(&mut expect, 88, 0);
            assert!(after == expect, "{case}: the image changed");
        }
    }
}

/// A refused write changes nothing at all, not even the header.
#[test]
fn refused_write_leaves_header_alone() {
    let d = tmp();
    let img = d.path().join("h.qcow2");
    three_cluster_image(&img);
    let mut b = std::fs::read(&img).unwrap();
    let l1_off = get64(&b, 40);
    let at = l2_entry_pos(&b, 0);
    put64(&mut b, at, super::meta::OFLAG_COPIED | l1_off);
    put64(&mut b, 88, 1 << 7);
    std::fs::write(&img, &b).unwrap();
    {
        let n = Qcow2Node::open_path(&img, false).unwrap();
        let err = n.write_at(0, &[1; 4096]).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "qcow2: guest data at host offset {l1_off:#x} would overwrite metadata (L1 table)"
            )),
            "{err}"
        );
    }
    assert!(std::fs::read(&img).unwrap() == b, "the image changed");
}

/// Metadata allocated while the image is open (L2 tables, refcount blocks,
/// a grown refcount table) is protected too; freed metadata is not, so the
/// clusters can be reused for data and written in place.
#[test]
fn overlap_set_follows_metadata_changes() {
    let d = tmp();
    let img = d.path().join("g.qcow2");
    // 512-byte clusters: many L2 tables, refcount blocks and a refcount
    // table that must grow.
    create(&img, Some(8 << 20), &opts(512, true, 16)).unwrap();
    let n = Qcow2Node::open_path(&img, false).unwrap();
    let mut rng = Rng(7);
    let mut reference = vec![0u8; 8 << 20];
    for _ in 0..300 {
        let off = rng.below((8 << 20) - 5000);
        let len = 1 + rng.below(5000) as usize;
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        n.write_at(off, &data).unwrap();
        reference[off as usize..off as usize + len].copy_from_slice(&data);
    }
    {
        let m = n.lock_meta().unwrap();
        for (i, &e) in m.l1.iter().enumerate() {
            let off = e & super::meta::OFFSET_MASK;
            if off != 0 {
                let k = m.overlap.find(off >> 9);
                assert_eq!(k, Some(super::overlap::MetaKind::L2), "L1 entry {i}");
            }
        }
        for &e in &m.reftable {
            let off = e & super::meta::OFFSET_MASK;
            if off != 0 {
                assert!(m.overlap.find(off >> 9).is_some());
            }
        }
        let rt = m.header.refcount_table_offset >> 9;
        assert_eq!(
            m.overlap.find(rt),
            Some(super::overlap::MetaKind::RefcountTable)
        );
        assert_eq!(
            m.overlap.find(m.header.l1_table_offset >> 9),
            Some(super::overlap::MetaKind::L1)
        );
    }
    // Every data cluster is still written in place (no false positives).
    let mut all = vec![0u8; 8 << 20];
    rng.fill(&mut all);
    n.write_at(0, &all).unwrap();
    assert!(read_all(&n) == all);
    // A data entry pointed at an L2 table allocated in this session is refused.
    let (gc, l2) = {
        let mut m = n.lock_meta().unwrap();
        let l2 = *m.l1.last().unwrap() & super::meta::OFFSET_MASK;
        let gc = 5;
        let (e, _) = m.l2_entry(gc).unwrap();
        m.set_l2_entry(gc, super::meta::OFLAG_COPIED | l2).unwrap();
        (gc, (l2, e))
    };
    let err = n.write_at(gc * 512, &[1; 512]).unwrap_err().to_string();
    assert!(err.contains("metadata (L2 table)"), "{err}");
    n.lock_meta().unwrap().set_l2_entry(gc, l2.1).unwrap();
    // Discarding frees clusters; the freed L2 tables of a v3 image stay
    // (zero flags), freed data clusters are reused and written in place.
    n.discard(0, 4 << 20).unwrap();
    n.flush().unwrap();
    n.write_at(0, &all[..4 << 20]).unwrap();
    n.write_at(100, &all[..4 << 20]).unwrap();
    let mut expect = all.clone();
    expect.copy_within(0..4 << 20, 100);
    assert!(read_all(&n) == expect);
    n.flush().unwrap();
    assert!(n.check(Repair::None).unwrap().is_clean());
    drop(n);
    if have("qemu-img") {
        assert_qemu_clean(&img);
    }
}

#[test]
fn overlap_lookup() {
    use super::overlap::{MetaKind, Overlap};
    let d = tmp();
    let img = d.path().join("o.qcow2");
    create(&img, Some(1 << 20), &CreateOptions::default()).unwrap();
    let n = Qcow2Node::open_path(&img, false).unwrap();
    let m = n.lock_meta().unwrap();
    let mut h = m.header.clone();
    h.l1_table_offset = 10 << 16;
    h.l1_size = 8192 * 3; // three clusters: 10..13
    h.refcount_table_offset = 12 << 16; // overlaps the L1 (hostile)
    h.refcount_table_clusters = 1;
    let l1 = vec![0, 20 << 16, 0x8000_0000_0000_0000 | (21 << 16)];
    let rt = vec![30 << 16];
    let mut o = Overlap::build(&m.storage, &h, &l1, &rt);
    assert_eq!(o.find(0), Some(MetaKind::Header));
    assert_eq!(o.find(1), None);
    assert_eq!(o.find(9), None);
    assert_eq!(o.find(10), Some(MetaKind::L1));
    assert_eq!(o.find(11), Some(MetaKind::L1));
    assert!(o.find(12).is_some());
    assert_eq!(o.find(13), None);
    assert_eq!(o.find(20), Some(MetaKind::L2));
    assert_eq!(o.find(21), Some(MetaKind::L2));
    assert_eq!(o.find(30), Some(MetaKind::RefcountBlock));
    assert_eq!(o.find_range(13, 20), None);
    assert_eq!(o.find_range(13, 21), Some((20, MetaKind::L2)));
    o.remove(20);
    assert_eq!(o.find(20), None);
    o.insert(40, MetaKind::L2);
    assert_eq!(o.find(40), Some(MetaKind::L2));
    o.set_range(MetaKind::L1, 50 << 16, 8, 16);
    assert_eq!(o.find(10), None);
    assert_eq!(o.find(12), Some(MetaKind::RefcountTable));
    assert_eq!(o.find(50), Some(MetaKind::L1));
    assert_eq!(Overlap::disabled().find(0), None);
}

/// Internal snapshots: their table and L1 tables are protected as well.
#[test]
fn data_cluster_on_snapshot_metadata_is_refused() {
    if !have("qemu-img") {
        return;
    }
    let d = tmp();
    let img = d.path().join("s.qcow2");
    three_cluster_image(&img);
    qemu_img(&["snapshot", "-c", "s1", p(&img)]);
    // The snapshot made the clusters shared; write a fresh cluster 1.
    {
        let n = Qcow2Node::open_path(&img, false).unwrap();
        n.write_at(65536, &[0x55; 65536]).unwrap();
    }
    let base = std::fs::read(&img).unwrap();
    let sn_off = get64(&base, 64);
    let sn_l1 = get64(&base, sn_off as usize);
    for (what, target) in [("snapshot table", sn_off), ("snapshot L1 table", sn_l1)] {
        let mut b = base.clone();
        let at = l2_entry_pos(&b, 1);
        put64(&mut b, at, super::meta::OFLAG_COPIED | target);
        std::fs::write(&img, &b).unwrap();
        {
            let n = Qcow2Node::open_path(&img, false).unwrap();
            let err = n.write_at(65536, &[1; 4096]).unwrap_err().to_string();
            assert!(err.contains(&format!("metadata ({what})")), "{err}");
        }
        assert!(
            std::fs::read(&img).unwrap() == b,
            "{what}: the image changed"
        );
    }
}

/// Fragmentation is counted within each L2 table, as qemu-img does: the
/// first cluster of a table is never fragmented.
#[test]
fn check_counts_fragmentation_per_l2_table() {
    let d = tmp();
    let img = d.path().join("f.qcow2");
    // 512-byte clusters: 64 guest clusters per L2 table.
    create(&img, Some(1 << 20), &opts(512, true, 16)).unwrap();
    {
        let n = Qcow2Node::open_path(&img, false).unwrap();
        // Table A, then its data at X; table B at X+1, its data at X+2: the
        // data of the two tables is not contiguous, but that is no
        // fragmentation.
        n.write_at(0, &[1; 512]).unwrap();
        n.write_at(64 * 512, &[2; 512]).unwrap();
        n.write_at(65 * 512, &[3; 512]).unwrap();
    }
    let file = || -> crate::NodeRef {
        let n = Qcow2Node::open_path(&img, true).unwrap();
        n.children()[0].1.clone()
    };
    let r = check(file(), Repair::None).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(
        (r.allocated_clusters, r.fragmented_clusters),
        (3, 0),
        "{r:?}"
    );
    {
        // Guest cluster 1 (table A) lands after everything: fragmented.
        let n = Qcow2Node::open_path(&img, false).unwrap();
        n.write_at(512, &[4; 512]).unwrap();
    }
    let r = check(file(), Repair::None).unwrap();
    assert_eq!(
        (r.allocated_clusters, r.fragmented_clusters),
        (4, 1),
        "{r:?}"
    );
    if have("qemu-img") {
        let out = qemu_img(&["check", "--output=json", p(&img)]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["allocated-clusters"], r.allocated_clusters);
        assert_eq!(v["fragmented-clusters"], r.fragmented_clusters);
    }
}

/// Growing past what the L1 table's cluster holds moves the table; data
/// survives, the refcounts stay right, and shrinking frees what lies past
/// the new end; unaligned sizes and preallocated shrinks are refused.
#[test]
fn resize_grows_l1_and_shrinks() {
    use crate::resize::{Prealloc, ResizeError};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.qcow2");
    let opts = CreateOptions {
        cluster_size: 512,
        ..CreateOptions::default()
    };
    create(&path, Some(1 << 20), &opts).unwrap();
    let node = Qcow2Node::open_path(&path, false).unwrap();
    node.write_at(1000, &[0x5a; 3000]).unwrap();
    node.write_at((1 << 20) - 512, &[0x6b; 512]).unwrap();
    let l1_before = node.header().unwrap().l1_table_offset;
    // 512 B clusters: an L1 cluster maps 2 MiB.
    node.resize(64 << 20).unwrap();
    let h = node.header().unwrap();
    assert_ne!(h.l1_table_offset, l1_before, "the L1 table moved");
    assert_eq!((h.size, h.l1_size, node.size()), (64 << 20, 2048, 64 << 20));
    let mut buf = vec![0u8; 3000];
    node.read_at(1000, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    let r = node.check(Repair::None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    let err = node.resize(1000).unwrap_err();
    assert!(matches!(
        err,
        crate::BlockError::Resize(ResizeError::Unaligned)
    ));
    let err = node.truncate(4096, Prealloc::Full).unwrap_err();
    assert!(matches!(
        err,
        crate::BlockError::Resize(ResizeError::ShrinkPreallocated)
    ));
    node.resize(4096).unwrap();
    assert_eq!(node.size(), 4096);
    node.read_at(1000, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    let r = node.check(Repair::None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    drop(node);
    let node = Qcow2Node::open_path(&path, true).unwrap();
    assert_eq!(node.size(), 4096);
}

/// Random writes between snapshot creation, application and deletion on
/// one open node (its cached state must stay right across them): every
/// snapshot applied reads as it was taken, the own check stays clean after
/// each operation, and qemu-img agrees at the end.
#[test]
fn snapshots_on_one_open_node() {
    let d = tmp();
    for (i, o) in [
        opts(65536, true, 16),
        opts(4096, false, 16),
        opts(4096, true, 2),
    ]
    .iter()
    .enumerate()
    {
        let img = d.path().join(format!("snap-{i}.qcow2"));
        let size = 8u64 << 20;
        create(&img, Some(size), o).unwrap();
        let n = Qcow2Node::open_path(&img, false).unwrap();
        let mut rng = Rng(40 + i as u64);
        let mut reference = vec![0u8; size as usize];
        let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
        // Two-bit refcounts hold 3: applying adds the snapshot's reference before
        // dropping the old active one (as QEMU), so one snapshot at most.
        let max_snaps = if o.refcount_bits == 2 { 1 } else { 4 };
        let mut done = [0u32; 3];
        for round in 0..16 {
            for _ in 0..20 {
                let off = rng.below(size - 200_000);
                let len = 1 + rng.below(150_000);
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                n.write_at(off, &data).unwrap();
                reference[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            let pick = rng.below(4);
            match pick {
                0 | 3 if snaps.len() < max_snaps => {
                    let name = format!("s{round}");
                    n.snapshot_create(&name, 0, 0).unwrap();
                    snaps.push((name, reference.clone()));
                    done[0] += 1;
                }
                1 | 3 if !snaps.is_empty() => {
                    done[1] += 1;
                    let k = rng.below(snaps.len() as u64) as usize;
                    n.snapshot_goto(&snaps[k].0).unwrap();
                    reference = snaps[k].1.clone();
                    assert!(
                        read_all(&n) == reference,
                        "snapshot {} reads differently",
                        snaps[k].0
                    );
                }
                2 if !snaps.is_empty() => {
                    done[2] += 1;
                    let k = rng.below(snaps.len() as u64) as usize;
                    let (name, _) = snaps.remove(k);
                    let id = n
                        .snapshot_list()
                        .unwrap()
                        .into_iter()
                        .find(|s| s.name == name)
                        .unwrap()
                        .id;
                    n.snapshot_delete(&id, &name).unwrap();
                }
                _ => {}
            }
            let report = n.check(Repair::None).unwrap();
            assert!(report.is_clean(), "round {round}: {report:?}");
            assert!(
                read_all(&n) == reference,
                "round {round}: active image differs"
            );
            let names: Vec<String> = n
                .snapshot_list()
                .unwrap()
                .into_iter()
                .map(|s| s.name)
                .collect();
            let want: Vec<String> = snaps.iter().map(|s| s.0.clone()).collect();
            assert_eq!(names, want);
        }
        assert!(done.iter().all(|&k| k > 0), "every operation ran: {done:?}");
        n.flush().unwrap();
        drop(n);
        if have("qemu-img") {
            assert_qemu_clean(&img);
            assert!(qemu_raw(&img) == reference, "qemu reads differently");
        }
    }
}

#[test]
fn backing_change_and_make_empty() {
    let dir = tmp();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    create(&base, Some(1 << 20), &CreateOptions::default()).unwrap();
    let o = CreateOptions {
        backing_file: Some(p(&base).to_string()),
        backing_fmt: Some("qcow2".into()),
        ..CreateOptions::default()
    };
    create(&top, None, &o).unwrap();
    let small_img = dir.path().join("small.qcow2");
    create(&small_img, Some(1 << 20), &opts(512, true, 16)).unwrap();
    {
        let n = Qcow2Node::open_path(&top, false).unwrap();
        n.write_at(65536, &[7u8; 70000]).unwrap();
        n.flush().unwrap();
        // A long name with a format; then none again.
        let long = "x".repeat(1000);
        let b = Qcow2Node::open_path(&base, false).unwrap();
        b.change_backing_file(Some(&long), Some("raw")).unwrap();
        let h = b.header().unwrap();
        assert_eq!(h.backing_file.as_deref(), Some(long.as_str()));
        assert_eq!(h.backing_format().as_deref(), Some("raw"));
        b.change_backing_file(None, None).unwrap();
        let too_long = "y".repeat(1024);
        assert!(b.change_backing_file(Some(&too_long), None).is_err());
        // A name that does not fit in a 512-byte header cluster: refused, untouched.
        let small = Qcow2Node::open_path(&small_img, false).unwrap();
        let e = small
            .change_backing_file(Some(&long), Some("raw"))
            .unwrap_err();
        assert!(matches!(
            e,
            crate::BlockError::Qcow2 {
                source: Qcow2Error::HeaderFull,
                ..
            }
        ));
        assert!(small.header().unwrap().backing_file.is_none());
        n.make_empty().unwrap();
        let st = n.block_status(0, 1 << 20).unwrap();
        assert!(!st.allocated && st.len == 1 << 20, "{st:?}");
        n.change_backing_file(Some("other.img"), None).unwrap();
    }
    let h = Qcow2Node::open_path(&base, true).unwrap().header().unwrap();
    assert!(h.backing_file.is_none() && h.backing_format().is_none());
    // Reopened without its backing (the new name does not exist): the header says so.
    let file = std::fs::read(&top).unwrap();
    let parsed = Header::parse(&file[..65536]).unwrap();
    assert_eq!(parsed.backing_file.as_deref(), Some("other.img"));
    assert!(parsed.backing_format().is_none());
    if have("qemu-img") {
        std::fs::write(dir.path().join("other.img"), vec![0u8; 1 << 20]).unwrap();
        assert_qemu_clean(&top);
        assert_qemu_clean(&base);
        assert_qemu_clean(&small_img);
    }
}
