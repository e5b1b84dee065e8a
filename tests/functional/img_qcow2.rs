//! `cryptvm img` on qcow2 answers as `qemu-img` does for the same job (issue 3, items 5
//! and 6 of "Build"):
//!
//! - `img create -f qcow2` with each option (`cluster_size`, `backing_file`/`-b`,
//!   `backing_fmt`/`-F`, `lazy_refcounts`, `compat`, `refcount_bits`, `preallocation`,
//!   `extended_l2`) prints qemu-img's "Formatting" line and makes an image that passes
//!   `qemu-img check` and that `qemu-img info` and `qemu-img map` describe as they
//!   describe qemu-img's own image made with the same options; bad options fail with
//!   one line and leave no file, where qemu-img fails too. `img convert -O qcow2`
//!   makes what `qemu-img convert -O qcow2` makes.
//! - `img info` prints exactly qemu-img's text and JSON for qcow2 images: default,
//!   v2, backing files (relative and with an "actual path"), lazy refcounts, dirty,
//!   corrupt, 512 B and 2 MiB clusters, refcount width 1, compressed, an internal
//!   snapshot.
//! - `img check` reports what `qemu-img check` reports (text, stderr lines, JSON,
//!   exit status 0/2/3, 63 for raw) for clean images, leaks, corruptions and a dirty
//!   image, and `-r leaks` / `-r all` repair them: afterwards `qemu-img check` is clean
//!   and the data is unchanged.
//! - `img bench` prints qemu-img bench's first line and its "Run completed" line, and
//!   `-w` writes what qemu-img bench writes (over a backing file too, and through the
//!   luks-over-qcow2 stack, which qemu-img bench cannot open).

#[path = "../common/mod.rs"]
mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Asserts two command outputs are equal line by line, naming the first difference.
#[track_caller]
fn assert_same_lines(ours: &Run, theirs: &Run, what: &str) {
    let (a, b): (Vec<&str>, Vec<&str>) = (
        ours.stdout.lines().collect(),
        theirs.stdout.lines().collect(),
    );
    if let Some(i) = (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)) {
        panic!(
            "{what}: line {} differs\n  cryptvm:  {:?}\n  qemu-img: {:?}\n{ours}\n{theirs}",
            i + 1,
            a.get(i),
            b.get(i)
        );
    }
}

/// Runs the same `img` arguments through qemu-img and cryptvm in `cwd`.
fn both(cwd: &Path, args: &[&str]) -> (Run, Run) {
    let theirs = run("qemu-img", args, Some(cwd));
    let mut full = vec!["img"];
    full.extend_from_slice(args);
    let ours = cryptvm(cwd, &full);
    (ours, theirs)
}

/// Runs `check` on every case, then fails once naming each case that failed (each
/// failure's own message is printed as it happens), so that one run shows every
/// difference.
fn every<T>(cases: impl IntoIterator<Item = T>, name: impl Fn(&T) -> String, check: impl Fn(T)) {
    let mut failed = Vec::new();
    for case in cases {
        let n = name(&case);
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(case))).is_ok();
        if !ok {
            failed.push(n);
        }
    }
    assert!(failed.is_empty(), "failed cases: {failed:#?}");
}

// ---------------------------------------------------------------------------------------
// create
// ---------------------------------------------------------------------------------------

/// `qemu-img map --output=json`, with host offsets dropped and neighbouring extents of
/// the same kind merged (host layouts may differ; what is allocated may not).
fn map_shape(dir: &Path, file: &str) -> Vec<(u64, u64, Value)> {
    let map = run("qemu-img", ["map", "--output=json", file], Some(dir))
        .ok()
        .json();
    let mut out: Vec<(u64, u64, Value)> = Vec::new();
    for e in map.as_array().expect("map is an array") {
        let kind = serde_json::json!([
            e["depth"],
            e["present"],
            e["zero"],
            e["data"],
            e["compressed"]
        ]);
        let start = e["start"].as_u64().expect("start");
        let len = e["length"].as_u64().expect("length");
        match out.last_mut() {
            Some(last) if last.2 == kind && last.0 + last.1 == start => last.1 += len,
            _ => out.push((start, len, kind)),
        }
    }
    out
}

/// `qemu-img info --output=json` of `file` in `dir`.
fn qemu_info(dir: &Path, file: &str) -> Value {
    run("qemu-img", ["info", "--output=json", file], Some(dir))
        .ok()
        .json()
}

/// Two folders with the same backing files, so that both tools can be given the same
/// relative names.
struct Pair {
    s: Scratch,
}

impl Pair {
    fn new(tag: &str) -> Self {
        let s = Scratch::new(tag);
        for d in ["ours", "theirs"] {
            let dir = s.join(d);
            std::fs::create_dir(&dir).expect("mkdir");
            run(
                "qemu-img",
                ["create", "-q", "-f", "raw", "base.raw", "48M"],
                Some(&dir),
            )
            .ok();
            run(
                "qemu-img",
                [
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "cluster_size=4096",
                    "base.qcow2",
                    "40M",
                ],
                Some(&dir),
            )
            .ok();
        }
        Pair { s }
    }
    fn ours(&self) -> std::path::PathBuf {
        self.s.join("ours")
    }
    fn theirs(&self) -> std::path::PathBuf {
        self.s.join("theirs")
    }
}

/// `img create -f qcow2 ARGS disk.qcow2 [SIZE]` by both tools. With `compare_images`,
/// the images must match; otherwise both are removed and the two runs returned.
fn create_case(p: &Pair, args: &[&str], size: Option<&str>, compare_images: bool) -> (Run, Run) {
    let mut full = vec!["create", "-f", "qcow2"];
    full.extend_from_slice(args);
    full.push("disk.qcow2");
    full.extend(size);
    let what = full.join(" ");
    let theirs = run("qemu-img", &full, Some(&p.theirs())).ok();
    let mut ours_args = vec!["img"];
    ours_args.extend(&full);
    let ours = cryptvm(&p.ours(), &ours_args).ok();
    if !compare_images {
        for d in [p.ours(), p.theirs()] {
            std::fs::remove_file(d.join("disk.qcow2")).expect("cleanup");
        }
        return (ours, theirs);
    }
    assert_qemu_check_clean(&p.ours(), "disk.qcow2");

    let (o, t) = (
        qemu_info(&p.ours(), "disk.qcow2"),
        qemu_info(&p.theirs(), "disk.qcow2"),
    );
    for key in [
        "virtual-size",
        "format",
        "cluster-size",
        "format-specific",
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
        "dirty-flag",
        "encrypted",
    ] {
        assert_eq!(
            o.get(key),
            t.get(key),
            "{what}: qemu-img info {key}\n{o:#}\n{t:#}"
        );
    }
    let (_, oc) = qemu_img_check(&p.ours(), "disk.qcow2");
    let (_, tc) = qemu_img_check(&p.theirs(), "disk.qcow2");
    for key in [
        "total-clusters",
        "allocated-clusters",
        "compressed-clusters",
    ] {
        assert_eq!(
            oc.get(key),
            tc.get(key),
            "{what}: qemu-img check {key}\n{oc:#}\n{tc:#}"
        );
    }
    assert_eq!(
        map_shape(&p.ours(), "disk.qcow2"),
        map_shape(&p.theirs(), "disk.qcow2"),
        "{what}: qemu-img map"
    );
    for d in [p.ours(), p.theirs()] {
        std::fs::remove_file(d.join("disk.qcow2")).expect("cleanup");
    }
    (ours, theirs)
}

/// Option sets for `img create -f qcow2`, with the size (`None`: the backing file's).
fn create_cases() -> Vec<(Vec<&'static str>, Option<&'static str>)> {
    vec![
        (vec![], Some("64M")),
        (vec!["-o", "cluster_size=512"], Some("1M")),
        (vec!["-o", "cluster_size=2M"], Some("100M")),
        (vec!["-o", "cluster_size=4096"], Some("1000000")),
        (vec!["-o", "compat=0.10"], Some("64M")),
        (vec!["-o", "compat=v2"], Some("3M")),
        (vec!["-o", "compat=1.1"], Some("3M")),
        (vec!["-o", "compat=v3"], Some("3M")),
        (vec!["-o", "lazy_refcounts=on"], Some("64M")),
        (vec!["-o", "lazy_refcounts=off,compat=0.10"], Some("64M")),
        (vec!["-o", "refcount_bits=1"], Some("64M")),
        (vec!["-o", "refcount_bits=8,cluster_size=512"], Some("4M")),
        (vec!["-o", "refcount_bits=64"], Some("64M")),
        (vec!["-o", "preallocation=off"], Some("8M")),
        (vec!["-o", "preallocation=metadata"], Some("8M")),
        (
            vec!["-o", "preallocation=metadata,cluster_size=512"],
            Some("2M"),
        ),
        (vec!["-b", "base.qcow2", "-F", "qcow2"], None),
        (vec!["-b", "base.raw", "-F", "raw"], Some("64M")),
        (vec!["-o", "backing_file=base.raw,backing_fmt=raw"], None),
        (
            vec![
                "-o",
                "compat=0.10,cluster_size=4096",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
            ],
            None,
        ),
        (
            vec!["-o", "cluster_size=4096", "-o", "lazy_refcounts=on"],
            Some("16M"),
        ),
        (vec![], Some("1T")),
    ]
}

#[test]
fn create_matches_qemu_img() {
    if !require(&["qemu-img"]) {
        return;
    }
    let p = Pair::new("create");
    for (args, size) in create_cases() {
        create_case(&p, &args, size, true);
    }
}

/// qemu-img create prints every option's value ("Formatting 'disk.qcow2', fmt=qcow2
/// cluster_size=65536 extended_l2=off compression_type=zlib size=... lazy_refcounts=off
/// refcount_bits=16"); cryptvm prints the same line, as it does for raw and luks.
#[test]
fn create_prints_qemu_img_formatting_line() {
    if !require(&["qemu-img"]) {
        return;
    }
    let p = Pair::new("create-line");
    for (args, size) in create_cases() {
        let (ours, theirs) = create_case(&p, &args, size, false);
        assert_eq!(
            ours.stdout, theirs.stdout,
            "the Formatting line\n{ours}\n{theirs}"
        );
    }
}

/// Extended L2 is optional: cryptvm creates it as qemu-img does, or refuses it with
/// one line naming it and leaves no file.
#[test]
fn create_extended_l2_matches_qemu_img_or_is_refused() {
    if !require(&["qemu-img"]) {
        return;
    }
    let p = Pair::new("create-extl2");
    let before = Snapshot::take(&p.ours());
    let probe = cryptvm(
        &p.ours(),
        [
            "img",
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "probe.qcow2",
            "1M",
        ],
    );
    if probe.status == Some(0) {
        std::fs::remove_file(p.ours().join("probe.qcow2")).expect("cleanup");
        create_case(&p, &["-o", "extended_l2=on"], Some("64M"), true);
        create_case(
            &p,
            &["-o", "extended_l2=on,cluster_size=2M"],
            Some("64M"),
            true,
        );
    } else {
        eprintln!(
            "NOTE: cryptvm refuses to create extended L2: {}",
            probe.stderr.trim()
        );
        probe.clean_error(1, &["extended l2", "extended_l2", "subcluster"]);
        before.assert_unchanged(&probe);
    }
}

/// Options qemu-img refuses: cryptvm refuses them with one line and leaves no file.
#[test]
fn create_refuses_what_qemu_img_refuses() {
    if !require(&["qemu-img"]) {
        return;
    }
    let p = Pair::new("create-errors");
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (vec!["-o", "cluster_size=1000"], &["cluster"]),
        (vec!["-o", "cluster_size=256"], &["cluster"]),
        (vec!["-o", "cluster_size=4M"], &["cluster"]),
        (
            vec!["-o", "lazy_refcounts=on,compat=0.10"],
            &["lazy", "compat"],
        ),
        (vec!["-o", "refcount_bits=3"], &["refcount"]),
        (vec!["-o", "refcount_bits=128"], &["refcount"]),
        (
            vec!["-o", "refcount_bits=64,compat=0.10"],
            &["refcount", "compat"],
        ),
        (vec!["-o", "compat=0.9"], &["compat", "0.9"]),
        (
            vec!["-o", "preallocation=bogus"],
            &["preallocation", "bogus"],
        ),
        (vec!["-o", "bogus=1"], &["bogus"]),
        (
            vec!["-b", "base.raw"],
            &["backing format", "backing_fmt", "-F"],
        ),
        // qemu-img opens the backing file even when the size is given (unless -u).
        (
            vec!["-b", "missing.qcow2", "-F", "qcow2"],
            &["missing.qcow2"],
        ),
    ];
    every(
        cases,
        |c| format!("{:?}", c.0),
        |(args, mentions)| {
            let mut full = vec!["create", "-f", "qcow2"];
            full.extend(&args);
            full.extend(["disk.qcow2", "1M"]);
            let theirs = run("qemu-img", &full, Some(&p.theirs()));
            assert_eq!(
                theirs.status,
                Some(1),
                "qemu-img accepts {args:?}:\n{theirs}"
            );
            let before = Snapshot::take(&p.ours());
            let mut ours_args = vec!["img"];
            ours_args.extend(&full);
            let ours = cryptvm(&p.ours(), &ours_args);
            ours.clean_error(1, mentions);
            before.assert_unchanged(&ours);
        },
    );
}

/// `img convert -O qcow2 [-o ...] SRC NEW` makes an image that qemu reads as the source
/// and checks clean, described by `qemu-img info` as qemu-img's own conversion is.
#[test]
fn convert_to_new_qcow2_matches_qemu_img() {
    if !require(&["qemu-img"]) {
        return;
    }
    let p = Pair::new("convert-new");
    let mut src = pattern(71, 5 * MIB as usize);
    src[MIB as usize..2 * MIB as usize].fill(0);
    for d in [p.ours(), p.theirs()] {
        std::fs::write(d.join("src.raw"), &src).expect("write");
    }
    every(
        [
            vec![],
            vec!["-o", "cluster_size=4096,compat=0.10"],
            vec!["-o", "cluster_size=2M,refcount_bits=1"],
        ],
        |c| format!("{c:?}"),
        |opts| {
            let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
            args.extend(&opts);
            args.extend(["src.raw", "new.qcow2"]);
            run("qemu-img", &args, Some(&p.theirs())).ok();
            let mut full = vec!["img"];
            full.extend(&args);
            cryptvm(&p.ours(), &full).ok();
            assert_qemu_check_clean(&p.ours(), "new.qcow2");
            assert_qemu_identical(&p.ours(), "qcow2", "new.qcow2", "raw", "src.raw");
            let (o, t) = (
                qemu_info(&p.ours(), "new.qcow2"),
                qemu_info(&p.theirs(), "new.qcow2"),
            );
            for key in ["virtual-size", "format", "cluster-size", "format-specific"] {
                assert_eq!(o.get(key), t.get(key), "{opts:?}: qemu-img info {key}");
            }
            for d in [p.ours(), p.theirs()] {
                std::fs::remove_file(d.join("new.qcow2")).expect("cleanup");
            }
        },
    );
}

// ---------------------------------------------------------------------------------------
// info
// ---------------------------------------------------------------------------------------

/// `img info` text (from the image's folder, probed and with `-f qcow2`, and by absolute
/// path from `/`) and JSON equal qemu-img's.
fn info_matches(dir: &Path, file: &str) {
    let abs = dir.join(file).display().to_string();
    for (cwd, args) in [
        (dir, vec!["info", file]),
        (dir, vec!["info", "-f", "qcow2", file]),
        (Path::new("/"), vec!["info", abs.as_str()]),
    ] {
        let (ours, theirs) = both(cwd, &args);
        let theirs = theirs.ok();
        let ours = ours.ok();
        assert_same_lines(&ours, &theirs, &format!("img {}", args.join(" ")));
    }
    let (ours, theirs) = both(dir, &["info", "--output=json", file]);
    let (o, t) = (ours.ok().json(), theirs.ok().json());
    assert_eq!(
        o, t,
        "img info --output=json {file}\ncryptvm: {o:#}\nqemu-img: {t:#}"
    );
}

#[test]
fn info_matches_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("info");
    let d = s.path();
    let create = |args: &[&str]| {
        let mut full = vec!["create", "-q", "-f", "qcow2"];
        full.extend_from_slice(args);
        run("qemu-img", &full, Some(d)).ok();
    };
    let write = |file: &str| {
        qemu_io_file(
            d,
            "qcow2",
            file,
            &[
                "write -P 0x5a 0 300k".to_string(),
                "write -z 1M 128k".to_string(),
            ],
        );
    };
    run(
        "qemu-img",
        ["create", "-q", "-f", "raw", "base.raw", "8M"],
        Some(d),
    )
    .ok();
    create(&["default.qcow2", "8M"]);
    write("default.qcow2");
    create(&["-o", "compat=0.10", "v2.qcow2", "8M"]);
    write("v2.qcow2");
    create(&["-b", "base.raw", "-F", "raw", "over-raw.qcow2"]);
    write("over-raw.qcow2");
    create(&[
        "-b",
        "default.qcow2",
        "-F",
        "qcow2",
        "-o",
        "compat=0.10",
        "over-qcow2.qcow2",
        "16M",
    ]);
    create(&["-o", "lazy_refcounts=on", "lazy.qcow2", "8M"]);
    write("lazy.qcow2");
    create(&["-o", "cluster_size=512", "c512.qcow2", "3M"]);
    write("c512.qcow2");
    create(&["-o", "cluster_size=2M", "c2m.qcow2", "9M"]);
    write("c2m.qcow2");
    create(&["-o", "refcount_bits=1", "rc1.qcow2", "8M"]);
    create(&["-o", "preallocation=metadata", "prealloc.qcow2", "4M"]);
    run(
        "qemu-img",
        [
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "default.qcow2",
            "zstd.qcow2",
        ],
        Some(d),
    )
    .ok();
    // Dirty: lazy refcounts and an aborted qemu-io.
    create(&["-o", "lazy_refcounts=on", "dirty.qcow2", "8M"]);
    let r = run(
        "sh",
        [
            "-c",
            "ulimit -c 0; exec qemu-io -f qcow2 dirty.qcow2 -c 'write 0 64k' -c abort",
        ],
        Some(d),
    );
    assert_ne!(r.status, Some(0), "{r}");
    assert_eq!(qemu_info(d, "dirty.qcow2")["dirty-flag"], true);
    // An internal snapshot ("Snapshot list:").
    std::fs::copy(s.join("default.qcow2"), s.join("snap.qcow2")).expect("copy");
    run(
        "qemu-img",
        ["snapshot", "-c", "snap1", "snap.qcow2"],
        Some(d),
    )
    .ok();
    // Corrupt: the corrupt bit set by hand.
    std::fs::copy(s.join("default.qcow2"), s.join("corrupt.qcow2")).expect("copy");
    let mut b = read(&s.join("corrupt.qcow2"));
    let f = get_be64(&b, qcow2_header::INCOMPATIBLE_FEATURES);
    put_be64(
        &mut b,
        qcow2_header::INCOMPATIBLE_FEATURES,
        f | qcow2_header::INCOMPAT_CORRUPT,
    );
    std::fs::write(s.join("corrupt.qcow2"), &b).expect("write");

    let files = [
        "default.qcow2",
        "v2.qcow2",
        "over-raw.qcow2",
        "over-qcow2.qcow2",
        "lazy.qcow2",
        "c512.qcow2",
        "c2m.qcow2",
        "rc1.qcow2",
        "prealloc.qcow2",
        "zstd.qcow2",
        "corrupt.qcow2",
        "dirty.qcow2",
        "snap.qcow2",
    ];
    every(
        files,
        |f| f.to_string(),
        |file| {
            let before = Snapshot::take(d);
            info_matches(d, file);
            let after = cryptvm(d, ["img", "info", file]);
            before.assert_unchanged(&after);
        },
    );
}

// ---------------------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------------------

/// Sorted stderr lines.
fn stderr_lines(r: &Run) -> Vec<String> {
    let mut v: Vec<String> = r.stderr.lines().map(str::to_string).collect();
    v.sort();
    v
}

/// `img check` and `img check --output=json` (probed, and with `-f qcow2`) report what
/// qemu-img check reports for `file`, with its exit status. Nothing is written.
fn check_matches(dir: &Path, file: &str) {
    let before = Snapshot::take(dir);
    for args in [vec!["check", file], vec!["check", "-f", "qcow2", file]] {
        let (ours, theirs) = both(dir, &args);
        assert_eq!(
            ours.status, theirs.status,
            "img {args:?}: exit status\n{ours}\n{theirs}"
        );
        assert_same_lines(&ours, &theirs, &format!("img {args:?}"));
        assert_eq!(
            stderr_lines(&ours),
            stderr_lines(&theirs),
            "img {args:?}: messages on stderr\n{ours}\n{theirs}"
        );
    }
    let (ours, theirs) = both(dir, &["check", "--output=json", file]);
    assert_eq!(
        ours.status, theirs.status,
        "check --output=json\n{ours}\n{theirs}"
    );
    assert_eq!(
        check_counts(&ours.json()),
        check_counts(&theirs.json()),
        "check --output=json\n{ours}\n{theirs}"
    );
    before.assert_unchanged(&ours);
}

/// A `check --output=json` report with QEMU's optional counts made explicit: QEMU
/// leaves out a count that is 0 (`leaks`, `corruptions`, `fragmented-clusters`, ...);
/// a count present as 0 means the same.
fn check_counts(v: &Value) -> Value {
    let mut v = v.clone();
    let map = v.as_object_mut().expect("check report is an object");
    for key in [
        "image-end-offset",
        "total-clusters",
        "allocated-clusters",
        "fragmented-clusters",
        "compressed-clusters",
        "check-errors",
        "leaks",
        "corruptions",
        "leaks-fixed",
        "corruptions-fixed",
    ] {
        map.entry(key).or_insert(Value::from(0));
    }
    v
}

/// A qemu-made image with data in guest clusters 0, 1, 2 and 16 (64 KiB clusters:
/// host clusters 5, 6, 7 and 8 after header, refcount table, refcount block, L1, L2).
fn data_image(s: &Scratch, name: &str) -> Vec<u8> {
    run(
        "qemu-img",
        ["create", "-q", "-f", "qcow2", name, "4M"],
        Some(s.path()),
    )
    .ok();
    qemu_io_file(
        s.path(),
        "qcow2",
        name,
        &[
            "write -P 0x11 0 192k".to_string(),
            "write -P 0x22 1M 64k".to_string(),
        ],
    );
    read(&s.join(name))
}

/// The host cluster that guest offset `guest` maps to.
fn host_cluster(b: &[u8], l: &Qcow2Layout, guest: u64) -> u64 {
    let e = get_be64(b, l.l2_entry_pos(b, guest).expect("allocated"));
    (e & qcow2_header::OFFSET_MASK) >> l.cluster_bits
}

/// Leaks: an L2 entry cleared (its data cluster keeps refcount 1), and two clusters
/// appended to the file with refcount 1.
fn make_leaks(b: &mut Vec<u8>) {
    let l = Qcow2Layout::parse(b);
    let pos = l.l2_entry_pos(b, 64 << 10).expect("allocated");
    put_be64(b, pos, 0);
    let end = b.len() as u64 >> l.cluster_bits;
    b.resize(b.len() + 2 * l.cluster_size() as usize, 0);
    for c in [end, end + 1] {
        let at = l.refcount16_pos(b, c);
        put_be16(b, at, 1);
    }
}

/// Corruptions: a used data cluster with refcount 0, another with refcount 2 (a leak
/// and a wrong COPIED flag).
fn make_corruptions(b: &mut [u8]) {
    let l = Qcow2Layout::parse(b);
    let c0 = host_cluster(b, &l, 0);
    let c2 = host_cluster(b, &l, 2 * l.cluster_size());
    let at = l.refcount16_pos(b, c0);
    put_be16(b, at, 0);
    let at = l.refcount16_pos(b, c2);
    put_be16(b, at, 2);
}

#[test]
fn check_clean_images_matches_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("check-clean");
    data_image(&s, "data.qcow2");
    let d = s.path();
    run(
        "qemu-img",
        ["create", "-q", "-f", "qcow2", "empty.qcow2", "1G"],
        Some(d),
    )
    .ok();
    run(
        "qemu-img",
        [
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "data.qcow2",
            "comp.qcow2",
        ],
        Some(d),
    )
    .ok();
    run(
        "qemu-img",
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata,refcount_bits=64",
            "pre.qcow2",
            "5M",
        ],
        Some(d),
    )
    .ok();
    run(
        "qemu-img",
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,cluster_size=512",
            "-b",
            "data.qcow2",
            "-F",
            "qcow2",
            "v2.qcow2",
        ],
        Some(d),
    )
    .ok();
    qemu_io_file(
        d,
        "qcow2",
        "v2.qcow2",
        &["write -P 0x33 1000 100000".to_string()],
    );
    // v2.qcow2 has 512 B clusters: its data spans several L2 tables (QEMU counts
    // fragmentation within each L2 table).
    every(
        [
            "data.qcow2",
            "empty.qcow2",
            "comp.qcow2",
            "pre.qcow2",
            "v2.qcow2",
        ],
        |f| f.to_string(),
        |f| check_matches(d, f),
    );
}

/// Repairs `file` with `img check -r MODE` on one copy and `qemu-img check -r MODE` on
/// another: the same exit status, stdout and stderr (but for the program's name), and
/// byte-identical files afterwards, so every repair (rebuilt refcount structures
/// included, placed where QEMU places them) is QEMU's. When qemu-img's repair worked,
/// the data is what it was before. Then both tools check the repaired copy and agree.
fn repair_matches(s: &Scratch, file: &str, mode: &str) {
    let d = s.path();
    // (Some damage makes qemu-img refuse to read the image before the repair.)
    let readable = run(
        "qemu-img",
        ["convert", "-O", "raw", file, "before.raw"],
        Some(d),
    )
    .status
        == Some(0);
    std::fs::copy(s.join(file), s.join("ours.qcow2")).expect("copy");
    std::fs::copy(s.join(file), s.join("theirs.qcow2")).expect("copy");
    let ours = cryptvm(d, ["img", "check", "-r", mode, "ours.qcow2"]);
    let theirs = run("qemu-img", ["check", "-r", mode, "theirs.qcow2"], Some(d));
    let what = format!("check -r {mode} of {file}");
    assert!(!ours.stderr.contains("panicked"), "{ours}");
    assert_eq!(
        ours.status, theirs.status,
        "{what}: exit status\n{ours}\n{theirs}"
    );
    assert_eq!(
        ours.stdout, theirs.stdout,
        "{what}: stdout\n{ours}\n{theirs}"
    );
    assert_eq!(
        ours.stderr.replace("cryptvm img: ", "qemu-img: "),
        theirs.stderr,
        "{what}: stderr\n{ours}\n{theirs}"
    );
    assert_same_bytes(
        &read(&s.join("ours.qcow2")),
        &read(&s.join("theirs.qcow2")),
        &format!("{what}: the repaired file"),
    );
    if readable && theirs.status == Some(0) {
        assert_qemu_identical(d, "qcow2", "ours.qcow2", "raw", "before.raw");
    }
    check_matches(d, "ours.qcow2");
    for f in ["before.raw", "ours.qcow2", "theirs.qcow2"] {
        let _ = std::fs::remove_file(s.join(f));
    }
}

/// Every repair mode on `file`, each on a fresh copy.
fn repairs_match(s: &Scratch, file: &str) {
    check_matches(s.path(), file);
    for mode in ["leaks", "all"] {
        repair_matches(s, file, mode);
    }
}

/// The refcount table entry `index` of the image in `b`.
fn reftable_pos(b: &[u8], index: u64) -> usize {
    (Qcow2Layout::parse(b).refcount_table_offset + 8 * index) as usize
}

/// Damaged refcount structures that only a rebuild repairs (QEMU's
/// `rebuild_refcount_structure`): a refcount block that two table entries share
/// (refcount 2), a refcount table moved to an empty cluster (every refcount reads 0),
/// a table entry with reserved bits, a block past the end of the file, in QEMU's
/// default geometry and in 4 KiB clusters with 8-bit and 1-bit refcounts. Also a
/// preallocated zero cluster whose offset is not aligned (zeroed by `-r all`), and a
/// leak in an image marked corrupt (the repair clears the mark).
#[test]
fn check_rebuilds_refcount_structures_as_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("check-rebuild");
    let base = data_image(&s, "base.qcow2");
    let cs = Qcow2Layout::parse(&base).cluster_size() as usize;
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();

    let mut b = base.clone();
    let first = get_be64(&b, reftable_pos(&b, 0));
    let at = reftable_pos(&b, 1);
    put_be64(&mut b, at, first);
    cases.push(("shared-refblock".into(), b));

    let mut b = base.clone();
    let at = b.len() as u64;
    b.resize(b.len() + cs, 0);
    put_be64(&mut b, qcow2_header::REFCOUNT_TABLE_OFFSET, at);
    cases.push(("moved-reftable".into(), b));

    let mut b = base.clone();
    let past = (b.len() + 10 * cs) as u64;
    let at = reftable_pos(&b, 1);
    put_be64(&mut b, at, past);
    cases.push(("refblock-past-the-end".into(), b));

    let mut b = base.clone();
    let l = Qcow2Layout::parse(&b);
    let pos = l.l2_entry_pos(&b, MIB).expect("allocated");
    let host = get_be64(&b, pos) & qcow2_header::OFFSET_MASK;
    put_be64(&mut b, pos, (host + 0x200) | qcow2_header::OFLAG_ZERO);
    cases.push(("unaligned-zero-cluster".into(), b));

    let mut b = base.clone();
    make_leaks(&mut b);
    let bits = get_be64(&b, qcow2_header::INCOMPATIBLE_FEATURES);
    put_be64(
        &mut b,
        qcow2_header::INCOMPATIBLE_FEATURES,
        bits | qcow2_header::INCOMPAT_CORRUPT,
    );
    cases.push(("corrupt-bit-and-leaks".into(), b));

    for (tag, opts) in [
        ("4k-8bit", "cluster_size=4096,refcount_bits=8"),
        ("4k-1bit", "cluster_size=4096,refcount_bits=1"),
    ] {
        let name = format!("{tag}.qcow2");
        run(
            "qemu-img",
            ["create", "-q", "-f", "qcow2", "-o", opts, &name, "4M"],
            Some(s.path()),
        )
        .ok();
        qemu_io_file(
            s.path(),
            "qcow2",
            &name,
            &["write -P 0x44 0 300k".into(), "write -P 0x55 2M 12k".into()],
        );
        let mut b = read(&s.join(&name));
        let cs = Qcow2Layout::parse(&b).cluster_size() as usize;
        let at = b.len() as u64;
        b.resize(b.len() + cs, 0);
        put_be64(&mut b, qcow2_header::REFCOUNT_TABLE_OFFSET, at);
        cases.push((format!("moved-reftable-{tag}"), b));
    }

    every(
        cases,
        |(tag, _)| tag.clone(),
        |(tag, bytes)| {
            let file = format!("{tag}.qcow2");
            std::fs::write(s.join(&file), &bytes).expect("write");
            repairs_match(&s, &file);
        },
    );
}

#[test]
fn check_leaks_matches_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("check-leaks");
    let mut b = data_image(&s, "leaks.qcow2");
    make_leaks(&mut b);
    std::fs::write(s.join("leaks.qcow2"), &b).expect("write");
    let (status, report) = qemu_img_check(s.path(), "leaks.qcow2");
    assert_eq!(
        (status, &report["leaks"]),
        (Some(3), &Value::from(3)),
        "{report:#}"
    );
    repairs_match(&s, "leaks.qcow2");
}

#[test]
fn check_corruptions_matches_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("check-corrupt");
    let mut b = data_image(&s, "bad.qcow2");
    make_corruptions(&mut b);
    std::fs::write(s.join("bad.qcow2"), &b).expect("write");
    let (status, report) = qemu_img_check(s.path(), "bad.qcow2");
    assert_eq!(status, Some(2), "{report:#}");
    assert!(report["corruptions"].as_u64() >= Some(2), "{report:#}");
    // (`-r leaks` gives up, as QEMU does, on a refcount that is too low: only a
    // rebuild may fix it, "Check failed: Input/output error".)
    repairs_match(&s, "bad.qcow2");

    // Leaks and corruptions together.
    let mut b = data_image(&s, "both.qcow2");
    make_leaks(&mut b);
    make_corruptions(&mut b);
    std::fs::write(s.join("both.qcow2"), &b).expect("write");
    repairs_match(&s, "both.qcow2");
}

/// A refcount table entry with reserved bits set: both tools find it and rebuild.
/// qemu-img's rebuild then stops ("Preventing invalid write on metadata (overlaps with
/// refcount block)": the new block goes where the broken entry points, which its
/// overlap check still counts as metadata) and leaves the image marked corrupt;
/// cryptvm's rebuild completes, after which qemu-img finds the image clean and reads
/// the data it read before.
#[test]
fn check_repairs_a_reftable_entry_with_reserved_bits() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("check-reserved");
    let d = s.path();
    let mut b = data_image(&s, "bad.qcow2");
    let at = reftable_pos(&b, 0);
    let e = get_be64(&b, at);
    put_be64(&mut b, at, e | 1);
    std::fs::write(s.join("bad.qcow2"), &b).expect("write");
    check_matches(d, "bad.qcow2");
    run(
        "qemu-img",
        ["convert", "-O", "raw", "bad.qcow2", "before.raw"],
        Some(d),
    )
    .ok();
    let theirs = run("qemu-img", ["check", "-r", "all", "bad.qcow2"], Some(d));
    assert_eq!(theirs.status, Some(1), "{theirs}");
    std::fs::write(s.join("bad.qcow2"), &b).expect("write");
    let ours = cryptvm(d, ["img", "check", "-r", "all", "bad.qcow2"]).ok();
    assert!(
        ours.stderr.starts_with(
            "ERROR refcount table entry 0 has reserved bits set\nLeaked cluster 2 refcount=1 reference=0\nRebuilding refcount structure\n"
        ),
        "{ours}"
    );
    assert!(
        ours.stdout.contains("No errors were found on the image."),
        "{ours}"
    );
    assert_qemu_check_clean(d, "bad.qcow2");
    assert_qemu_identical(d, "qcow2", "bad.qcow2", "raw", "before.raw");
}

/// A lazy-refcounts image left dirty by an aborted qemu-io: its refcounts are stale.
#[test]
fn check_dirty_image_matches_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("check-dirty");
    let d = s.path();
    run(
        "qemu-img",
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "dirty.qcow2",
            "4M",
        ],
        Some(d),
    )
    .ok();
    let r = run(
        "sh",
        [
            "-c",
            "ulimit -c 0; exec qemu-io -f qcow2 dirty.qcow2 -c 'write -P 0x11 0 1M' -c 'write -P 0x12 3M 5000' -c abort",
        ],
        Some(d),
    );
    assert_ne!(r.status, Some(0), "{r}");
    check_matches(d, "dirty.qcow2");
    repair_matches(&s, "dirty.qcow2", "all");
    // `-r leaks` cannot repair refcounts that are too low and fails as qemu-img does.
    // qemu-img then clears the dirty bit as it closes the image, which leaves stale
    // refcounts unmarked (a later write could allocate a used cluster); cryptvm keeps
    // the bit, so that the next writer repairs them first. Nothing else differs.
    std::fs::copy(s.join("dirty.qcow2"), s.join("ours.qcow2")).expect("copy");
    std::fs::copy(s.join("dirty.qcow2"), s.join("theirs.qcow2")).expect("copy");
    let ours = cryptvm(d, ["img", "check", "-r", "leaks", "ours.qcow2"]);
    let theirs = run(
        "qemu-img",
        ["check", "-r", "leaks", "theirs.qcow2"],
        Some(d),
    );
    assert_eq!(
        (
            ours.status,
            ours.stderr.replace("cryptvm img: ", "qemu-img: ")
        ),
        (theirs.status, theirs.stderr.clone()),
        "{ours}\n{theirs}"
    );
    assert_eq!(theirs.status, Some(1), "{theirs}");
    let (mut o, t) = (read(&s.join("ours.qcow2")), read(&s.join("theirs.qcow2")));
    let bits = qcow2_header::INCOMPATIBLE_FEATURES;
    assert_eq!(get_be64(&o, bits) & qcow2_header::INCOMPAT_DIRTY, 1);
    assert_eq!(get_be64(&t, bits) & qcow2_header::INCOMPAT_DIRTY, 0);
    let clean = get_be64(&o, bits) & !qcow2_header::INCOMPAT_DIRTY;
    put_be64(&mut o, bits, clean);
    assert_same_bytes(
        &o,
        &t,
        "check -r leaks of the dirty image, but for the dirty bit",
    );
}

/// qemu-img check exits 63 for formats without checks.
#[test]
fn check_raw_is_not_supported_as_in_qemu_img() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = Scratch::new("check-raw");
    s.sparse("disk.raw", MIB);
    let (ours, theirs) = both(s.path(), &["check", "-f", "raw", "disk.raw"]);
    assert_eq!(theirs.status, Some(63), "{theirs}");
    ours.clean_error(63, &["does not support checks", "not supported"]);
}

// ---------------------------------------------------------------------------------------
// bench
// ---------------------------------------------------------------------------------------

/// "Run completed in 0.123 seconds."
fn is_completed_line(line: &str) -> bool {
    line.strip_prefix("Run completed in ")
        .and_then(|r| r.strip_suffix(" seconds."))
        .and_then(|n| n.split_once('.'))
        .is_some_and(|(a, b)| {
            !a.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.len() == 3
                && b.bytes().all(|c| c.is_ascii_digit())
        })
}

#[test]
fn bench_prints_what_qemu_img_bench_prints() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("bench-lines");
    let d = s.path();
    run(
        "qemu-img",
        ["create", "-q", "-f", "qcow2", "theirs.qcow2", "8M"],
        Some(d),
    )
    .ok();
    qemu_io_file(
        d,
        "qcow2",
        "theirs.qcow2",
        &["write -P 0x5a 0 2M".to_string()],
    );
    std::fs::copy(s.join("theirs.qcow2"), s.join("ours.qcow2")).expect("copy");
    let cases = [
        vec!["-c", "100"],
        vec!["-c", "50", "-d", "4", "-s", "8k"],
        vec!["-c", "20", "-s", "4096", "-S", "12345", "-o", "777"],
        vec!["-c", "10", "-d", "1", "-s", "1M"],
        vec!["-f", "qcow2", "-c", "10"],
        vec!["-w", "-c", "10", "-d", "2"],
        vec!["-w", "-c", "10", "--pattern=90", "-S", "64k"],
        vec!["-w", "-c", "10", "--pattern=0x5a"],
        vec!["-q", "-c", "5"],
    ];
    every(
        cases,
        |c| format!("{c:?}"),
        |opts| {
            let mut t = vec!["bench"];
            t.extend(&opts);
            let mut o = t.clone();
            t.push("theirs.qcow2");
            o.push("ours.qcow2");
            let theirs = run("qemu-img", &t, Some(d)).ok();
            let mut full = vec!["img"];
            full.extend(&o);
            let ours = cryptvm(d, &full).ok();
            let (ol, tl): (Vec<&str>, Vec<&str>) = (
                ours.stdout.lines().collect(),
                theirs.stdout.lines().collect(),
            );
            assert_eq!(
                ol.len(),
                tl.len(),
                "bench {opts:?}: lines\n{ours}\n{theirs}"
            );
            if let (Some(a), Some(b)) = (ol.first(), tl.first()) {
                assert_eq!(a, b, "bench {opts:?}: first line\n{ours}\n{theirs}");
            }
            assert!(
                tl.len() == 2 && is_completed_line(tl[1]),
                "qemu-img's output:\n{theirs}"
            );
            assert!(
                is_completed_line(ol[1]),
                "bench {opts:?}: second line\n{ours}"
            );
        },
    );
    assert_qemu_check_clean(d, "ours.qcow2");
}

/// `bench -w` writes what qemu-img bench -w writes: unaligned offsets, steps and sizes
/// (partial clusters), with and without a pattern, over a raw backing file (copy-on-write
/// and zeros over backing data) and in 512 B clusters. No request wraps around the end
/// of the disk (QEMU versions wrap differently).
#[test]
fn bench_writes_what_qemu_img_bench_writes() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("bench-writes");
    let d = s.path();
    s.write("base.raw", &pattern(61, 6 * MIB as usize));
    let images: Vec<Vec<&str>> = vec![
        vec!["-o", "cluster_size=65536"],
        vec!["-o", "cluster_size=512"],
        vec!["-b", "base.raw", "-F", "raw"],
        vec![
            "-b",
            "base.raw",
            "-F",
            "raw",
            "-o",
            "compat=0.10,cluster_size=4096",
        ],
    ];
    // Without and then with a start offset (-o).
    let runs: Vec<Vec<&str>> = vec![
        vec![
            "-w",
            "-c",
            "40",
            "-d",
            "4",
            "-s",
            "5000",
            "-S",
            "70001",
            "--pattern=90",
        ],
        vec!["-w", "-c", "30", "-d", "8", "-s", "4096", "-S", "100000"],
        vec![
            "-w",
            "-c",
            "40",
            "-d",
            "4",
            "-s",
            "5000",
            "-S",
            "70001",
            "-o",
            "777",
            "--pattern=90",
        ],
        vec![
            "-w",
            "-c",
            "5",
            "-d",
            "1",
            "-s",
            "1M",
            "-o",
            "100",
            "--pattern=7",
        ],
    ];
    let pairs = runs.iter().flat_map(|b| images.iter().map(move |c| (b, c)));
    every(
        pairs,
        |(b, c)| format!("create {c:?}, bench {b:?}"),
        |(bench, create)| {
            let what = format!("create {create:?}, bench {bench:?}");
            for name in ["ours.qcow2", "theirs.qcow2"] {
                let _ = std::fs::remove_file(s.join(name));
                let mut args = vec!["create", "-q", "-f", "qcow2"];
                args.extend(create);
                args.extend([name, "6M"]);
                run("qemu-img", &args, Some(d)).ok();
            }
            let mut t = vec!["bench"];
            t.extend(bench);
            t.push("theirs.qcow2");
            run("qemu-img", &t, Some(d)).ok();
            let mut o = vec!["img", "bench"];
            o.extend(bench);
            o.push("ours.qcow2");
            cryptvm(d, &o).ok();
            assert_qemu_check_clean(d, "ours.qcow2");
            let r = run(
                "qemu-img",
                [
                    "compare",
                    "-f",
                    "qcow2",
                    "-F",
                    "qcow2",
                    "ours.qcow2",
                    "theirs.qcow2",
                ],
                Some(d),
            );
            assert_eq!(r.status, Some(0), "{what}: images differ\n{r}");
        },
    );
    // The pattern really is there: qemu-io reads the requests back, and zeros between.
    run(
        "qemu-img",
        ["create", "-q", "-f", "qcow2", "p.qcow2", "6M"],
        Some(d),
    )
    .ok();
    cryptvm(
        d,
        [
            "img",
            "bench",
            "-w",
            "-c",
            "3",
            "-s",
            "5000",
            "-S",
            "70001",
            "-o",
            "777",
            "--pattern=90",
            "p.qcow2",
        ],
    )
    .ok();
    qemu_io_file(
        d,
        "qcow2",
        "p.qcow2",
        &[
            "read -P 0 0 777".to_string(),
            "read -P 90 777 5000".to_string(),
            "read -P 0 5777 65001".to_string(),
            "read -P 90 70778 5000".to_string(),
            "read -P 0 75778 65001".to_string(),
            "read -P 90 140779 5000".to_string(),
            "read -P 0 145779 100000".to_string(),
        ],
    );
}

/// `bench` on the luks-over-qcow2 stack through a `json:` name and `--object` (which
/// qemu-img bench lacks): reads print qemu-img bench's first line; writes land in the
/// qcow2 payload encrypted, read back by qemu-io through the stack.
#[test]
fn bench_on_the_luks_over_qcow2_stack() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("bench-stack");
    let d = s.path();
    cryptvm(
        d,
        [
            "img",
            "create",
            "-q",
            "--object",
            &s.secret_object(),
            "-f",
            "luks",
            "-o",
            "detached-header=true,key-secret=sec0,iter-time=10",
            "hdr.img",
        ],
    )
    .ok();
    run(
        "qemu-img",
        ["create", "-q", "-f", "qcow2", "payload.qcow2", "8M"],
        Some(d),
    )
    .ok();
    let stack = serde_json::json!({
        "driver": "luks", "key-secret": "sec0",
        "file": qcow2_json(&s.join("payload.qcow2")),
        "header": {"driver": "file", "filename": s.join("hdr.img")},
    });
    let name = format!("json:{stack}");
    let w = cryptvm(
        d,
        [
            "img",
            "bench",
            "--object",
            &s.secret_object(),
            "-w",
            "-c",
            "16",
            "-d",
            "4",
            "-s",
            "64k",
            "--pattern=90",
            &name,
        ],
    )
    .ok();
    w.never_shows(&s.pass);
    assert_eq!(
        w.stdout.lines().next(),
        Some("Sending 16 write requests, 65536 bytes each, 4 in parallel (starting at offset 0, step size 65536)")
    );
    let opts = format!(
        "driver=luks,key-secret=sec0,file.driver=qcow2,file.file.filename={},header.filename={}",
        s.join("payload.qcow2").display(),
        s.join("hdr.img").display()
    );
    qemu_io(&s.secret_object(), &opts, &["read -P 90 0 1M".to_string()]);
    // (The rest of the disk decrypts zero clusters: not zeros, so not checked.)
    let payload = read(&s.join("payload.qcow2"));
    assert!(
        !payload.windows(4096).any(|w| w.iter().all(|&b| b == 90)),
        "plaintext in the qcow2 payload"
    );
    assert_qemu_check_clean(d, "payload.qcow2");
    let r = cryptvm(
        d,
        [
            "img",
            "bench",
            "--object",
            &s.secret_object(),
            "-c",
            "100",
            "-s",
            "4k",
            "--image-opts",
            &opts,
        ],
    )
    .ok();
    assert_eq!(
        r.stdout.lines().next(),
        Some("Sending 100 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)")
    );
    assert!(
        r.stdout.lines().nth(1).is_some_and(is_completed_line),
        "{r}"
    );
}
