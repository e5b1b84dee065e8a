//! Hostile qcow2 images (issue 3, fourth "Done when"): an L1 table of billions of
//! entries, tables past the end of the file or inside the header, a refcount table
//! overlapping the L1 table, cluster_bits 40 and 8, a compressed cluster that does not
//! decompress (zlib and zstd), an unknown incompatible feature (named by bit, and by
//! name when the feature name table has it), a v3 header_length that is too small or
//! too large, a backing file name past the end of the file or too long, a snapshot
//! table of billions of entries, an L2 table past the end of the file. Each gives
//! exit status 1 (`compare`: 2), one clear line on stderr, no panic, no write (every
//! file stays byte-identical, even when cryptvm is asked to write into the image), and
//! finishes quickly under an address-space limit, so no huge allocation happens. A
//! data cluster pointing at the L1 table or a refcount block is never written, and an
//! image marked corrupt opens read-only.
//!
//! Every image starts as a valid one made by qemu-img and qemu-io, edited at the
//! header offsets of QEMU's `docs/interop/qcow2.txt`. Where QEMU refuses the same
//! image, the test checks that it does, which shows the edit is really invalid; where
//! QEMU opens it (it reads zeros past the end of the file and does not check table
//! overlaps when reading), `qemu-img check` must report it as broken.

#[path = "../common/mod.rs"]
mod common;

use std::time::Duration;

use common::qcow2_header as h;
use common::*;

/// Every cryptvm run is killed after this long...
const LIMIT: Duration = Duration::from_secs(20);
/// ...and may map at most this much memory (the images are 4 MiB; an L1 table of
/// 2^32 entries alone would need 32 GiB).
const MAX_AS: u64 = 1 << 30;

const MIB: u64 = 1 << 20;
/// Virtual size of the fixture.
const SIZE: u64 = 4 * MIB;

/// A valid qemu-made qcow2 image `h.qcow2` (64 KiB clusters, v3) with data at 0 and at
/// 1 MiB, and a zero-filled raw file of the same size. Checks that cryptvm reads the
/// untouched image under the same limits the hostile runs get.
fn fixture(tag: &str) -> Scratch {
    let s = Scratch::new(tag);
    run(
        "qemu-img",
        ["create", "-q", "-f", "qcow2", "h.qcow2", &SIZE.to_string()],
        Some(s.path()),
    )
    .ok();
    qemu_io_file(
        s.path(),
        "qcow2",
        "h.qcow2",
        &[
            "write -P 0x11 0 128k".to_string(),
            "write -P 0x22 1M 64k".to_string(),
        ],
    );
    s.sparse("zero.raw", SIZE);
    let r = cryptvm_limited(
        s.path(),
        ["img", "convert", "-O", "raw", "h.qcow2", "control.raw"],
        LIMIT,
        MAX_AS,
    )
    .ok();
    let got = read(&s.join("control.raw"));
    assert!(
        got[..128 << 10].iter().all(|&b| b == 0x11) && got[MIB as usize] == 0x22,
        "cryptvm misreads the untouched fixture:\n{r}"
    );
    std::fs::remove_file(s.join("control.raw")).expect("cleanup");
    s
}

/// Which commands a case runs.
#[derive(Clone, Copy, PartialEq)]
enum Cmds {
    /// The header or a table is bad: info, convert, compare, check, and a write attempt
    /// (`convert -n` into the image) all fail.
    All,
    /// Only reading data is bad: convert and compare fail; info and check may succeed
    /// or fail, but cleanly.
    Io,
}

/// What QEMU does with the edited image.
#[derive(Clone, Copy, PartialEq)]
enum Qemu {
    /// `qemu-img info` refuses it.
    Refuses,
    /// `qemu-img info` opens it, but `qemu-img check` reports errors or leaks.
    CheckFails,
}

/// Runs one cryptvm command on the hostile image under the limits.
fn run_limited(s: &Scratch, args: &[&str]) -> Run {
    cryptvm_limited(s.path(), args, LIMIT, MAX_AS)
}

/// Runs the case's commands on `h.qcow2` and checks each fails cleanly, mentioning one
/// of `mentions`, leaving every file as it was.
fn expect_failure(s: &Scratch, cmds: Cmds, qemu: Qemu, mentions: &[&str]) {
    let mut must_fail: Vec<(Vec<&str>, i32)> = vec![
        (vec!["img", "convert", "-O", "raw", "h.qcow2", "out.raw"], 1),
        (
            vec![
                "img", "convert", "-f", "qcow2", "-O", "raw", "h.qcow2", "out.raw",
            ],
            1,
        ),
        (
            vec![
                "img", "compare", "-f", "qcow2", "-F", "raw", "h.qcow2", "zero.raw",
            ],
            2,
        ),
    ];
    let mut may_fail: Vec<Vec<&str>> = Vec::new();
    let info = [
        vec!["img", "info", "h.qcow2"],
        vec!["img", "info", "--output=json", "-f", "qcow2", "h.qcow2"],
    ];
    if cmds == Cmds::All {
        must_fail.extend(info.iter().map(|a| (a.clone(), 1)));
        must_fail.push((
            vec![
                "img", "convert", "-n", "-f", "raw", "-O", "qcow2", "zero.raw", "h.qcow2",
            ],
            1,
        ));
    } else {
        may_fail.extend(info.iter().cloned());
    }
    if qemu == Qemu::Refuses {
        must_fail.push((vec!["img", "check", "h.qcow2"], 1));
    } else {
        may_fail.push(vec!["img", "check", "h.qcow2"]);
    }
    for (args, code) in must_fail {
        let before = Snapshot::take(s.path());
        let r = run_limited(s, &args);
        r.clean_error(code, mentions);
        if cmds == Cmds::Io {
            // The bad table is found while copying, after the target was created (as
            // qemu-img convert leaves it too); nothing else may change.
            let _ = std::fs::remove_file(s.join("out.raw"));
        }
        before.assert_unchanged(&r);
    }
    for args in may_fail {
        let before = Snapshot::take(s.path());
        let r = run_limited(s, &args);
        assert!(
            !r.stderr.contains("panicked") && r.status.is_some(),
            "cryptvm crashed:\n{r}"
        );
        match r.status {
            Some(0) => {}
            // `check` reports errors (2) or leaks (3) on stdout.
            Some(2 | 3) if args[1] == "check" => {}
            _ => r.clean_error(1, mentions),
        }
        before.assert_unchanged(&r);
    }
}

/// Edits `h.qcow2` of a fresh fixture with `edit` (given the image bytes and their
/// layout), checks what QEMU says about the result, then expects every command to fail.
fn hostile(
    tag: &str,
    cmds: Cmds,
    qemu: Qemu,
    mentions: &[&str],
    edit: impl FnOnce(&mut Vec<u8>, &Qcow2Layout),
) {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = fixture(tag);
    let path = s.join("h.qcow2");
    let mut bytes = read(&path);
    let layout = Qcow2Layout::parse(&bytes);
    edit(&mut bytes, &layout);
    std::fs::write(&path, &bytes).expect("writing the hostile image");
    match qemu {
        Qemu::Refuses => {
            let r = run("qemu-img", ["info", "h.qcow2"], Some(s.path()));
            assert_eq!(r.status, Some(1), "qemu-img accepts the image:\n{r}");
        }
        Qemu::CheckFails => {
            // A copy: qemu-img check may write (it does not with no -r, but be sure).
            std::fs::copy(&path, s.join("copy.qcow2")).expect("copy");
            let (status, report) = qemu_img_check(s.path(), "copy.qcow2");
            assert_ne!(status, Some(0), "qemu-img check finds nothing: {report:#}");
            std::fs::remove_file(s.join("copy.qcow2")).expect("cleanup");
        }
    }
    expect_failure(&s, cmds, qemu, mentions);
}

const L1: &[&str] = &["L1"];
const REFCOUNT: &[&str] = &["refcount"];
const OVERLAP: &[&str] = &["overlap", "intersect", "collide"];
const CLUSTER: &[&str] = &[
    "cluster size",
    "cluster_bits",
    "cluster bits",
    "cluster_size",
];
const BACKING: &[&str] = &["backing"];
const HEADER_LENGTH: &[&str] = &["header_length", "header length", "header too short"];

#[test]
fn l1_size_in_the_billions() {
    hostile("l1-huge", Cmds::All, Qemu::Refuses, L1, |b, _| {
        put_be32(b, h::L1_SIZE, u32::MAX);
    });
}

#[test]
fn l1_size_larger_than_qemu_allows() {
    // 2^26 entries: a 512 MiB table, more than QEMU's 32 MiB limit.
    hostile("l1-large", Cmds::All, Qemu::Refuses, L1, |b, _| {
        put_be32(b, h::L1_SIZE, 1 << 26);
    });
}

/// Just past the end of the file (the first cluster after it), and far past it.
fn past_eof(b: &[u8], l: &Qcow2Layout, far: bool) -> u64 {
    if far {
        1 << 40
    } else {
        (b.len() as u64).next_multiple_of(l.cluster_size())
    }
}

#[test]
fn l1_table_past_end_of_file() {
    for far in [false, true] {
        hostile("l1-eof", Cmds::All, Qemu::CheckFails, L1, |b, l| {
            let at = past_eof(b, l, far);
            put_be64(b, h::L1_TABLE_OFFSET, at);
        });
    }
}

#[test]
fn l1_table_in_the_header() {
    hostile("l1-header", Cmds::All, Qemu::CheckFails, L1, |b, _| {
        put_be64(b, h::L1_TABLE_OFFSET, 0);
    });
}

#[test]
fn l1_table_unaligned() {
    hostile("l1-unaligned", Cmds::All, Qemu::Refuses, L1, |b, l| {
        put_be64(b, h::L1_TABLE_OFFSET, l.l1_offset + 8);
    });
}

#[test]
fn refcount_table_past_end_of_file() {
    for far in [false, true] {
        hostile("rt-eof", Cmds::All, Qemu::CheckFails, REFCOUNT, |b, l| {
            let at = past_eof(b, l, far);
            put_be64(b, h::REFCOUNT_TABLE_OFFSET, at);
        });
    }
}

#[test]
fn refcount_table_in_the_header() {
    hostile(
        "rt-header",
        Cmds::All,
        Qemu::CheckFails,
        REFCOUNT,
        |b, _| {
            put_be64(b, h::REFCOUNT_TABLE_OFFSET, 0);
        },
    );
}

#[test]
fn refcount_table_overlaps_l1_table() {
    hostile("rt-l1", Cmds::All, Qemu::CheckFails, OVERLAP, |b, l| {
        put_be64(b, h::REFCOUNT_TABLE_OFFSET, l.l1_offset);
    });
}

#[test]
fn refcount_table_clusters_in_the_billions() {
    hostile("rt-huge", Cmds::All, Qemu::Refuses, REFCOUNT, |b, _| {
        put_be32(b, h::REFCOUNT_TABLE_CLUSTERS, u32::MAX);
    });
}

#[test]
fn cluster_bits_40() {
    hostile("cb40", Cmds::All, Qemu::Refuses, CLUSTER, |b, _| {
        put_be32(b, h::CLUSTER_BITS, 40);
    });
}

#[test]
fn cluster_bits_8() {
    hostile("cb8", Cmds::All, Qemu::Refuses, CLUSTER, |b, _| {
        put_be32(b, h::CLUSTER_BITS, 8);
    });
}

#[test]
fn unknown_incompatible_feature_is_named_by_bit() {
    // QEMU: "Unknown incompatible feature: 100000".
    hostile(
        "feature-bit",
        Cmds::All,
        Qemu::Refuses,
        &["bit 20", "100000"],
        |b, _| {
            let f = get_be64(b, h::INCOMPATIBLE_FEATURES);
            put_be64(b, h::INCOMPATIBLE_FEATURES, f | 1 << 20);
        },
    );
}

#[test]
fn unknown_incompatible_feature_is_named_by_the_feature_name_table() {
    hostile(
        "feature-name",
        Cmds::All,
        Qemu::Refuses,
        &["hostile-feature-x"],
        |b, _| {
            const FEATURE_NAME_TABLE: u32 = 0x6803_f857;
            let mut exts = qcow2_extensions(b);
            let table = exts
                .iter_mut()
                .find(|(k, _)| *k == FEATURE_NAME_TABLE)
                .expect("qemu-img writes a feature name table");
            // Entry: type (0 = incompatible), bit number, 46 bytes of name.
            let mut entry = vec![0u8, 20];
            entry.extend_from_slice(b"hostile-feature-x");
            entry.resize(48, 0);
            table.1.extend_from_slice(&entry);
            set_qcow2_extensions(b, &exts);
            let f = get_be64(b, h::INCOMPATIBLE_FEATURES);
            put_be64(b, h::INCOMPATIBLE_FEATURES, f | 1 << 20);
        },
    );
}

#[test]
fn header_length_too_small() {
    for (tag, len) in [("hlen-72", 72), ("hlen-99", 99), ("hlen-0", 0)] {
        hostile(tag, Cmds::All, Qemu::Refuses, HEADER_LENGTH, |b, _| {
            put_be32(b, h::HEADER_LENGTH, len);
        });
    }
}

#[test]
fn header_length_larger_than_a_cluster() {
    hostile(
        "hlen-big",
        Cmds::All,
        Qemu::Refuses,
        &["header", "header_length"],
        |b, l| {
            put_be32(b, h::HEADER_LENGTH, 2 * l.cluster_size() as u32);
        },
    );
}

#[test]
fn backing_file_name_past_end_of_file() {
    hostile("backing-eof", Cmds::All, Qemu::Refuses, BACKING, |b, _| {
        put_be64(b, h::BACKING_FILE_OFFSET, 1 << 40);
        put_be32(b, h::BACKING_FILE_SIZE, 10);
    });
}

#[test]
fn backing_file_name_too_long() {
    hostile("backing-long", Cmds::All, Qemu::Refuses, BACKING, |b, _| {
        put_be64(b, h::BACKING_FILE_OFFSET, 0x200);
        put_be32(b, h::BACKING_FILE_SIZE, u32::MAX);
    });
}

#[test]
fn snapshot_table_in_the_billions() {
    hostile(
        "snapshots-huge",
        Cmds::All,
        Qemu::Refuses,
        &["snapshot"],
        |b, l| {
            put_be32(b, h::NB_SNAPSHOTS, u32::MAX);
            put_be64(b, h::SNAPSHOTS_OFFSET, 2 * l.cluster_size());
        },
    );
}

#[test]
fn l2_table_past_end_of_file() {
    hostile(
        "l2-eof",
        Cmds::Io,
        Qemu::CheckFails,
        &["L2", "past", "beyond", "end of file", "eof", "outside"],
        |b, l| {
            let eof = past_eof(b, l, false);
            put_be64(b, l.l1_offset as usize, h::OFLAG_COPIED | eof);
        },
    );
}

/// A compressed image whose first compressed cluster's data is overwritten with bytes
/// that are neither valid deflate nor zstd. Reading it is an I/O error with a clear
/// message (qemu-img fails too); metadata commands still work; nothing is written.
fn bad_compressed_cluster(tag: &str, ctype: &str) {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new(tag);
    let mut text = Vec::new();
    let mut n = 0u32;
    while text.len() < SIZE as usize {
        text.extend_from_slice(format!("{n:06} compressible line of text\n").as_bytes());
        n += 1;
    }
    text.truncate(SIZE as usize);
    s.write("src.raw", &text);
    run(
        "qemu-img",
        [
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ctype}"),
            "src.raw",
            "h.qcow2",
        ],
        Some(s.path()),
    )
    .ok();
    std::fs::remove_file(s.join("src.raw")).expect("cleanup");
    s.sparse("zero.raw", SIZE);
    let path = s.join("h.qcow2");
    let mut b = read(&path);
    let l = Qcow2Layout::parse(&b);
    // Guest cluster 2: its entry is compressed, its data starts at the host offset.
    let entry = get_be64(
        b.as_slice(),
        l.l2_entry_pos(&b, 2 * l.cluster_size()).expect("L2"),
    );
    assert!(
        entry & h::OFLAG_COMPRESSED != 0,
        "cluster 2 is not compressed"
    );
    let offset_bits = 62 - (l.cluster_bits - 8);
    let host = (entry & ((1u64 << offset_bits) - 1)) as usize;
    b[host..host + 256].fill(0xff);
    std::fs::write(&path, &b).expect("writing the hostile image");
    let q = run(
        "qemu-img",
        ["convert", "-O", "raw", "h.qcow2", "qemu.raw"],
        Some(s.path()),
    );
    assert_eq!(q.status, Some(1), "qemu-img reads the garbage:\n{q}");
    let _ = std::fs::remove_file(s.join("qemu.raw"));

    let mentions = &["decompress", "compress", "input/output", "i/o error"];
    for (args, code) in [
        (vec!["img", "convert", "-O", "raw", "h.qcow2", "out.raw"], 1),
        (
            vec!["img", "compare", "-F", "raw", "h.qcow2", "zero.raw"],
            2,
        ),
        (
            vec!["img", "bench", "-c", "8", "-s", "64k", "-d", "2", "h.qcow2"],
            1,
        ),
    ] {
        let before = Snapshot::take(s.path());
        let r = run_limited(&s, &args);
        r.clean_error(code, mentions);
        // `convert` may leave a partial out.raw, as qemu-img does; nothing else changes.
        let _ = std::fs::remove_file(s.join("out.raw"));
        before.assert_unchanged(&r);
    }
    for args in [
        vec!["img", "info", "h.qcow2"],
        vec!["img", "check", "h.qcow2"],
    ] {
        let before = Snapshot::take(s.path());
        let r = run_limited(&s, &args).ok();
        before.assert_unchanged(&r);
    }
}

#[test]
fn compressed_cluster_that_does_not_inflate() {
    bad_compressed_cluster("bad-zlib", "zlib");
}

#[test]
fn compressed_cluster_that_does_not_zstd_decompress() {
    bad_compressed_cluster("bad-zstd", "zstd");
}

/// An L2 entry that points a data cluster at the image's own metadata (the L1 table,
/// a refcount block). QEMU reads it (the bytes of the table) but refuses to write
/// there, marking the image corrupt. cryptvm must refuse the write too, with one line;
/// the table stays intact and nothing but the corrupt bit may change.
#[test]
fn data_cluster_on_metadata_is_never_written() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    for (tag, which) in [("on-l1", "L1"), ("on-refblock", "refcount block")] {
        let s = fixture(tag);
        let path = s.join("h.qcow2");
        let mut b = read(&path);
        let l = Qcow2Layout::parse(&b);
        let target = if which == "L1" {
            l.l1_offset
        } else {
            get_be64(&b, l.refcount_table_offset as usize) & h::OFFSET_MASK
        };
        let pos = l.l2_entry_pos(&b, 0).expect("cluster 0 is allocated");
        put_be64(&mut b, pos, h::OFLAG_COPIED | target);
        std::fs::write(&path, &b).expect("writing the hostile image");
        s.write("ones.raw", &[0x01; 4096]);

        // QEMU's answer on a copy.
        std::fs::copy(&path, s.join("copy.qcow2")).expect("copy");
        let q = run(
            "qemu-io",
            ["-f", "qcow2", "copy.qcow2", "-c", "write -P 1 0 4k"],
            Some(s.path()),
        );
        assert!(
            q.stdout.contains("write failed") || q.stderr.contains("write failed"),
            "qemu-io writes over the {which}:\n{q}"
        );
        std::fs::remove_file(s.join("copy.qcow2")).expect("cleanup");

        // Only guest cluster 0 is written: a 4 KiB window over the qcow2 node.
        let window = format!(
            "driver=raw,offset=0,size=4096,file.driver=qcow2,file.file.filename={}",
            path.display()
        );
        let r = run_limited(
            &s,
            &[
                "img",
                "convert",
                "-n",
                "-f",
                "raw",
                "--target-image-opts",
                "ones.raw",
                &window,
            ],
        );
        r.clean_error(
            1,
            &[
                "overlap", "metadata", "L1", "refcount", "corrupt", "invalid",
            ],
        );
        let after = read(&path);
        let mut masked = after.clone();
        // Only the corrupt bit may have been set.
        let f = get_be64(&after, h::INCOMPATIBLE_FEATURES);
        assert_eq!(
            f & !h::INCOMPAT_CORRUPT,
            get_be64(&b, h::INCOMPATIBLE_FEATURES),
            "feature bits changed:\n{r}"
        );
        put_be64(
            &mut masked,
            h::INCOMPATIBLE_FEATURES,
            get_be64(&b, h::INCOMPATIBLE_FEATURES),
        );
        assert!(
            masked == b,
            "the image changed beyond the corrupt bit (the {which} was overwritten?):\n{r}"
        );
    }
}

/// An image marked corrupt (incompatible bit 1) opens read-only, as in QEMU: reading
/// works and gives qemu-img's bytes, writing fails with one line and changes nothing.
#[test]
fn corrupt_bit_means_read_only() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = fixture("corrupt-bit");
    let path = s.join("h.qcow2");
    let mut b = read(&path);
    let f = get_be64(&b, h::INCOMPATIBLE_FEATURES);
    put_be64(&mut b, h::INCOMPATIBLE_FEATURES, f | h::INCOMPAT_CORRUPT);
    std::fs::write(&path, &b).expect("writing the image");
    let q = run(
        "qemu-io",
        ["-f", "qcow2", "h.qcow2", "-c", "write 0 4k"],
        Some(s.path()),
    );
    assert_ne!(q.status, Some(0), "qemu-io writes a corrupt image:\n{q}");
    run(
        "qemu-img",
        ["convert", "-O", "raw", "h.qcow2", "qemu.raw"],
        Some(s.path()),
    )
    .ok();
    let before = Snapshot::take(s.path());
    let r = run_limited(&s, &["img", "convert", "-O", "raw", "h.qcow2", "ours.raw"]).ok();
    assert_same_bytes(
        &read(&s.join("ours.raw")),
        &read(&s.join("qemu.raw")),
        "reading a corrupt-marked image",
    );
    std::fs::remove_file(s.join("ours.raw")).expect("cleanup");
    before.assert_unchanged(&r);
    let r = run_limited(
        &s,
        &[
            "img", "convert", "-n", "-f", "raw", "-O", "qcow2", "zero.raw", "h.qcow2",
        ],
    );
    r.clean_error(1, &["corrupt"]);
    before.assert_unchanged(&r);
}

/// Issue 12: every refcount table entry points at one refcount block of all-ones
/// refcounts, so every cluster the table can address looks used. Before, the first
/// allocating write scanned ~10^13 clusters under the metadata lock, and `check` built
/// one message per "leaked" cluster without bound. Now a write refuses the table at
/// open, and `check` compares the refcounts of the file's clusters only (as QEMU
/// does) and keeps at most MAX_CHECK_MESSAGES messages, within the time and
/// address-space limits.
#[test]
fn refcount_table_repeating_one_full_block() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = fixture("reftable-dup");
    let path = s.join("h.qcow2");
    let mut bytes = read(&path);
    let l = Qcow2Layout::parse(&bytes);
    let cs = 1usize << l.cluster_bits;
    let full = bytes.len().div_ceil(cs) * cs;
    bytes.resize(full, 0);
    bytes.extend(std::iter::repeat_n(0xffu8, cs));
    // A table of two clusters after the block: more entries (and so more messages,
    // one per entry, as QEMU prints them) than a check keeps.
    let table = bytes.len();
    let clusters = 2;
    bytes.resize(table + clusters * cs, 0);
    for i in 0..clusters * cs / 8 {
        put_be64(&mut bytes, table + 8 * i, full as u64);
    }
    put_be64(&mut bytes, h::REFCOUNT_TABLE_OFFSET, table as u64);
    put_be32(&mut bytes, h::REFCOUNT_TABLE_CLUSTERS, clusters as u32);
    std::fs::write(&path, &bytes).expect("writing the hostile image");
    std::fs::copy(&path, s.join("copy.qcow2")).expect("copy");
    let (status, report) = qemu_img_check(s.path(), "copy.qcow2");
    assert_ne!(status, Some(0), "qemu-img check finds nothing: {report:#}");
    std::fs::remove_file(s.join("copy.qcow2")).expect("cleanup");

    let before = Snapshot::take(s.path());
    let write = [
        "img", "convert", "-n", "-f", "raw", "-O", "qcow2", "zero.raw", "h.qcow2",
    ];
    let r = run_limited(&s, &write);
    r.clean_error(1, &["both point at the refcount block"]);
    before.assert_unchanged(&r);

    let start = std::time::Instant::now();
    let r = run_limited(&s, &["img", "check", "h.qcow2"]);
    let took = start.elapsed();
    assert!(
        matches!(r.status, Some(2 | 3)),
        "check should report the damage: status {:?}, {}",
        r.status,
        r.stdout
    );
    let lines = r.stderr.lines().count();
    assert!(lines < 10_100, "{lines} lines of messages");
    assert!(
        r.stderr.contains("more messages like these"),
        "no summary of the messages left out"
    );
    assert!(took < LIMIT, "check took {took:?}");
    before.assert_unchanged(&r);
}

/// A dirty image (incompatible bit 0: refcounts may be stale) that repairing cannot make
/// whole: its first L2 table pointer leads past the end of the file, and the table it
/// used to point to is now a leaked cluster. Opening it for writing must refuse before
/// the repair writes anything (a dry run first): the file stays byte-identical, where a
/// repair that rebuilt the refcounts and only then found the broken entry had already
/// written them (issue 12).
#[test]
fn dirty_image_that_cannot_be_repaired_is_left_untouched() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = fixture("dirty-broken");
    let path = s.join("h.qcow2");
    let mut b = read(&path);
    let l = Qcow2Layout::parse(&b);
    let eof = past_eof(&b, &l, false);
    put_be64(&mut b, l.l1_offset as usize, h::OFLAG_COPIED | eof);
    let features = get_be64(&b, h::INCOMPATIBLE_FEATURES);
    put_be64(
        &mut b,
        h::INCOMPATIBLE_FEATURES,
        features | h::INCOMPAT_DIRTY,
    );
    std::fs::write(&path, &b).expect("writing the hostile image");

    // QEMU, on a copy, finds the image broken beyond the refcounts too.
    std::fs::copy(&path, s.join("copy.qcow2")).expect("copy");
    let (status, report) = qemu_img_check(s.path(), "copy.qcow2");
    assert_ne!(status, Some(0), "qemu-img check finds nothing: {report:#}");
    std::fs::remove_file(s.join("copy.qcow2")).expect("cleanup");

    let before = Snapshot::take(s.path());
    let r = run_limited(
        &s,
        &[
            "img", "convert", "-n", "-f", "raw", "-O", "qcow2", "zero.raw", "h.qcow2",
        ],
    );
    before.assert_unchanged(&r);
    r.clean_error(1, &["dirty image"]);
    assert!(r.stderr.contains("nothing was written"), "{r}");
}
