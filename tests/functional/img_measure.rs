//! `cryptvm img measure`, `dd` and `amend` do what qemu-img 10.0.2 does (issue 13):
//! each case runs both tools on copies of the same images (made by qemu-img and
//! qemu-io) and compares exit status, stdout and stderr (program name aside). After
//! `dd`, `qemu-img compare` finds the outputs identical and `qemu-img info` gives the
//! same sizes; after `amend`, `qemu-img info --output=json` shows the same
//! format-specific data and `qemu-img check` is clean.

#[path = "../common/mod.rs"]
mod common;

use std::path::Path;

use common::*;

const SECRET: &str = "secret,id=s,data=measure-pass";

/// Two folders holding the same images (see `ImagePair`).
type Pair = ImagePair;

impl Pair {
    /// Runs `args` by both tools; asserts the same status, stdout and stderr.
    #[track_caller]
    fn same(&self, args: &[&str]) -> (Run, Run) {
        let theirs = run("qemu-img", args, Some(&self.theirs()));
        let mut ours_args = vec!["img"];
        ours_args.extend(args);
        let ours = cryptvm(&self.ours(), &ours_args);
        assert_eq!(ours.status, theirs.status, "exit status\n{ours}\n{theirs}");
        assert_eq!(ours.stdout, theirs.stdout, "stdout\n{ours}\n{theirs}");
        assert_eq!(
            messages(&ours.stderr),
            messages(&theirs.stderr),
            "stderr\n{ours}\n{theirs}"
        );
        assert!(!ours.stderr.contains("panicked"), "{ours}");
        (ours, theirs)
    }

    /// `qemu-img info --output=json -f FMT FILE` in both folders: (ours, theirs).
    fn info(&self, fmt: &str, file: &str) -> (serde_json::Value, serde_json::Value) {
        let get = |d: &Path| {
            run(
                "qemu-img",
                ["info", "--output=json", "-f", fmt, file],
                Some(d),
            )
            .ok()
            .json()
        };
        (get(&self.ours()), get(&self.theirs()))
    }
}

/// stderr lines without the program's prefix and without the "Try ... --help" hint.
fn messages(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| !l.starts_with("Try '"))
        .map(|l| {
            // "qemu-img: ", "/usr/bin/qemu-img dd: " (getopt's), "cryptvm img: ".
            let program = [
                "cryptvm img: ",
                "qemu-img: ",
                "qemu-img dd: ",
                "qemu-img amend: ",
            ]
            .iter()
            .find_map(|p| {
                l.find(p)
                    .filter(|&at| !l[..at].contains(' '))
                    .map(|at| at + p.len())
            });
            program.map_or(l, |at| &l[at..]).to_string()
        })
        .collect()
}

fn qemu(dir: &Path, prog: &str, args: &[&str]) {
    run(prog, args, Some(dir)).ok();
}

/// Source images: raw (sparse, partly written), qcow2 (empty, partly written, with
/// zero clusters, compressed, small clusters), luks.
fn sources(d: &Path) {
    qemu(
        d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "sparse.raw", "10M"],
    );
    qemu(
        d,
        "qemu-img",
        &["create", "-q", "-f", "raw", "part.raw", "3000000"],
    );
    qemu(
        d,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 0 300k",
            "-c",
            "write -P 2 2M 5k",
            "part.raw",
        ],
    );
    qemu(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "empty.qcow2", "100M"],
    );
    qemu(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "part.qcow2", "100M"],
    );
    qemu(
        d,
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 3 0 1M",
            "-c",
            "write -P 4 50M 3k",
            "-c",
            "write -z 60M 1M",
            "-c",
            "write -P 5 99M 70k",
            "part.qcow2",
        ],
    );
    qemu(
        d,
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            "part.qcow2",
            "comp.qcow2",
        ],
    );
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "small.qcow2",
            "7M",
        ],
    );
    qemu(
        d,
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 6 5000 10000", "small.qcow2"],
    );
    qemu(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            SECRET,
            "-f",
            "luks",
            "-o",
            "key-secret=s,iter-time=10",
            "img.luks",
            "5M",
        ],
    );
}

/// `measure` of sizes and source images into each output format and option set, in
/// text (every size and source) and JSON (one size, two sources, the luks source).
fn measure_outputs_like_qemu_img(tag: &str, outputs: &[(&str, &str)]) {
    let p = Pair::made_twice(tag, sources);
    let mut cases = 0;
    for (fmt, opts) in outputs {
        for json in [false, true] {
            let mut base = vec!["measure", "--object", SECRET, "-O", fmt];
            if !opts.is_empty() {
                base.extend(["-o", opts]);
            }
            if json {
                base.push("--output=json");
            }
            let sizes: &[&str] = if json {
                &["123456789"]
            } else {
                &["0", "1000", "100G", "123456789"]
            };
            for size in sizes {
                let mut a = base.clone();
                a.extend(["--size", size]);
                p.same(&a);
                cases += 1;
            }
            let all = [
                ("sparse.raw", "raw"),
                ("part.raw", "raw"),
                ("empty.qcow2", "qcow2"),
                ("part.qcow2", "qcow2"),
                ("comp.qcow2", "qcow2"),
                ("small.qcow2", "qcow2"),
            ];
            let srcs = if json { &all[1..4] } else { &all[..] };
            for (src, sfmt) in srcs {
                let mut a = base.clone();
                a.extend(["-f", sfmt, src]);
                let (ours, _) = p.same(&a);
                assert_eq!(ours.status, Some(0), "{ours}");
                cases += 1;
            }
            let mut a = base.clone();
            a.extend([
                "--image-opts",
                "driver=luks,key-secret=s,file.filename=img.luks",
            ]);
            p.same(&a);
        }
    }
    assert!(cases >= 14 * outputs.len());
}

#[test]
fn measure_into_raw_and_luks_like_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    measure_outputs_like_qemu_img(
        "measure-raw-luks",
        &[("raw", ""), ("raw", "preallocation=full")],
    );
    // Into luks: the header's size plus the source's. Each qemu-img run here spends
    // about 3 s timing PBKDF2, so each cipher goes with one kind of source.
    let p = Pair::made_twice("measure-luks", sources);
    for (opts, tail) in [
        ("key-secret=s,iter-time=1", &["--size", "100G"][..]),
        (
            "key-secret=s,cipher-alg=aes-128,iter-time=1",
            &["--size", "1000", "--output=json"][..],
        ),
        (
            "key-secret=s,cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,iter-time=1",
            &["-f", "qcow2", "part.qcow2"][..],
        ),
    ] {
        let mut args = vec!["measure", "--object", SECRET, "-O", "luks", "-o", opts];
        args.extend(tail);
        let (ours, _) = p.same(&args);
        assert_eq!(ours.status, Some(0), "{ours}");
    }
}

#[test]
fn measure_into_qcow2_like_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    measure_outputs_like_qemu_img(
        "measure-qcow2",
        &[
            ("qcow2", ""),
            ("qcow2", "cluster_size=4k"),
            ("qcow2", "cluster_size=2M,refcount_bits=64"),
            ("qcow2", "refcount_bits=1,cluster_size=512"),
            ("qcow2", "compat=0.10"),
        ],
    );
    // The numbers themselves: a partly written qcow2 needs less than its full size.
    let p = Pair::made_twice("measure-numbers", sources);
    let (ours, _) = p.same(&["measure", "-O", "qcow2", "-f", "qcow2", "part.qcow2"]);
    assert!(ours.stdout.contains("bitmaps size: 0"), "{ours}");
    assert_ne!(ours.stdout.lines().next(), ours.stdout.lines().nth(1));
}

#[test]
fn measure_into_qcow2_with_options_like_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    measure_outputs_like_qemu_img(
        "measure-qcow2-opts",
        &[
            ("qcow2", "preallocation=full"),
            ("qcow2", "preallocation=metadata"),
            ("qcow2", "extended_l2=on,cluster_size=32k"),
            ("qcow2", "backing_file=x.qcow2"),
        ],
    );
    // qcow2's built-in LUKS adds its header (about 2 s of PBKDF2 timing per
    // qemu-img run: one size, one source).
    let p = Pair::made_twice("measure-qcow2-luks", sources);
    let opts = "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=1";
    for tail in [&["--size", "100G"][..], &["-f", "qcow2", "part.qcow2"][..]] {
        let mut args = vec!["measure", "--object", SECRET, "-O", "qcow2", "-o", opts];
        args.extend(tail);
        let (ours, _) = p.same(&args);
        assert_eq!(ours.status, Some(0), "{ours}");
    }
}

#[test]
fn measure_refusals_like_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = Pair::made_twice("measure-err", sources);
    let cases: &[&[&str]] = &[
        &["measure"],
        &["measure", "part.raw", "sparse.raw"],
        &["measure", "-f", "raw"],
        &["measure", "--size", "1G", "part.raw"],
        &["measure", "--size", "1x"],
        &["measure", "--size", "-1"],
        &["measure", "--size", "1G", "-O", "foo"],
        &["measure", "--size", "1G", "-o", "foo=bar"],
        &["measure", "--size", "1G", "-o", "help"],
        &[
            "measure",
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=3k",
        ],
        &[
            "measure",
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=abc",
        ],
        &[
            "measure",
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "lazy_refcounts=maybe",
        ],
        &[
            "measure",
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=x",
        ],
        &[
            "measure",
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=3",
        ],
        &["measure", "--size", "1G", "-O", "qcow2", "-o", "compat=9"],
        &[
            "measure",
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
        ],
        &[
            "measure",
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "preallocation=foo",
        ],
        &[
            "measure",
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=4k",
        ],
        &[
            "measure",
            "--size",
            "1G",
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks",
        ],
        &[
            "measure",
            "--size",
            "1P",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512",
        ],
        &["measure", "--size", "1G", "-O", "luks"],
        &[
            "measure",
            "--size",
            "1G",
            "-O",
            "luks",
            "-o",
            "key-secret=nope",
        ],
        &[
            "measure",
            "--size",
            "1G",
            "-O",
            "luks",
            "-o",
            "key-secret=s,foo=1",
        ],
        &[
            "measure",
            "--size",
            "1G",
            "-O",
            "luks",
            "-o",
            "key-secret=s,iter-time=1,cipher-alg=foo",
        ],
        &[
            "measure",
            "--size",
            "1G",
            "-O",
            "luks",
            "-o",
            "key-secret=s,iter-time=1,detached-header=on",
        ],
        &["measure", "nonexistent.img"],
        &["measure", "-f", "qcow2", "part.raw"],
    ];
    for args in cases {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["--object", SECRET]);
        let (ours, _) = p.same(&a);
        assert_eq!(ours.status, Some(1), "{ours}");
    }
}

#[test]
fn dd_like_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = Pair::made_twice("dd", sources);
    // Each operand set with two of the four source/target format pairs, so every pair
    // meets four of them (all 32 would cost some 200 qemu-img runs).
    let pairs = [
        ("part.raw", "raw", "raw"),
        ("part.raw", "raw", "qcow2"),
        ("part.qcow2", "qcow2", "raw"),
        ("part.qcow2", "qcow2", "qcow2"),
    ];
    let operands: [&[&str]; 8] = [
        &[],
        &["bs=4k"],
        &["bs=1000", "count=5"],
        &["bs=4k", "count=10", "skip=3"],
        &["bs=64k", "skip=2"],
        &["bs=1M", "count=2"],
        &["skip=1000000000"],
        &["bs=3000", "count=1000000", "skip=1"],
    ];
    let mut n = 0;
    for (i, ops) in operands.iter().enumerate() {
        for (src, sfmt, out_fmt) in [pairs[i % 4], pairs[(i + 1 + i / 4) % 4]] {
            n += 1;
            let out = format!("out{n}.{out_fmt}");
            let of = format!("of={out}");
            let iff = format!("if={src}");
            let mut a = vec!["dd", "-f", sfmt, "-O", out_fmt];
            a.extend(ops.iter().copied());
            a.extend([iff.as_str(), of.as_str()]);
            let (ours, _) = p.same(&a);
            assert_eq!(ours.status, Some(0), "{ours}");
            let (i_ours, i_theirs) = p.info(out_fmt, &out);
            assert_eq!(
                i_ours["virtual-size"], i_theirs["virtual-size"],
                "{out} {ops:?}"
            );
            if out_fmt == "qcow2" {
                assert_qemu_check_clean(&p.ours(), &out);
            }
            let theirs = p.theirs().join(&out).display().to_string();
            assert_qemu_identical(&p.ours(), out_fmt, &out, out_fmt, &theirs);
        }
    }
    // Refusals.
    let cases: &[&[&str]] = &[
        &["dd"],
        &["dd", "if=part.raw"],
        &["dd", "of=x.raw"],
        &["dd", "bs=x", "if=part.raw", "of=x.raw"],
        &["dd", "bs=0", "if=part.raw", "of=x.raw"],
        &["dd", "bs=3000000000", "if=part.raw", "of=x.raw"],
        &["dd", "count=-1", "if=part.raw", "of=x.raw"],
        &["dd", "skip=1q", "if=part.raw", "of=x.raw"],
        &["dd", "foo=1", "if=part.raw", "of=x.raw"],
        &["dd", "foo", "if=part.raw", "of=x.raw"],
        &["dd", "-O", "foo", "if=part.raw", "of=x.raw"],
        &["dd", "-O", "luks", "if=part.raw", "of=x.luks"],
        &["dd", "if=nonexistent", "of=x.raw"],
        &["dd", "-f", "qcow2", "if=part.raw", "of=x.raw"],
        &["dd", "if=part.raw", "of=/nonexistent/x.raw"],
        &["dd", "-o", "a", "if=part.raw", "of=x.raw"],
    ];
    for args in cases {
        let (ours, _) = p.same(args);
        assert_eq!(ours.status, Some(1), "{ours}");
    }
}

/// `qemu-img info`'s format-specific data of `file` in both folders must agree.
#[track_caller]
fn same_specific(p: &Pair, file: &str) -> serde_json::Value {
    let (o, t) = p.info("qcow2", file);
    assert_eq!(o["format-specific"], t["format-specific"], "{file}");
    assert_eq!(o["virtual-size"], t["virtual-size"], "{file}");
    assert_qemu_check_clean(&p.ours(), file);
    o["format-specific"]["data"].clone()
}

#[test]
fn amend_like_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = Pair::made_twice("amend", |d| {
        sources(d);
        qemu(
            d,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "v2.qcow2",
                "10M",
            ],
        );
        qemu(
            d,
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 9 0 100k", "v2.qcow2"],
        );
        qemu(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "v3.qcow2", "10M"],
        );
        qemu(
            d,
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 8 64k 100k", "v3.qcow2"],
        );
        qemu(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "back.qcow2", "10M"],
        );
        qemu(
            d,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "back.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        );
    });
    // lazy_refcounts on and off, with and without progress.
    for (opts, flags) in [
        ("lazy_refcounts=on", vec![]),
        ("lazy_refcounts=off", vec!["-p"]),
        ("lazy_refcounts=on", vec!["-q"]),
        ("lazy_refcounts=off", vec![]),
    ] {
        let mut a = vec!["amend", "-f", "qcow2", "-o", opts];
        a.extend(flags.iter().copied());
        a.push("v3.qcow2");
        let (ours, _) = p.same(&a);
        assert_eq!(ours.status, Some(0), "{ours}");
        let data = same_specific(&p, "v3.qcow2");
        assert_eq!(data["lazy-refcounts"], opts.ends_with("on"), "{data}");
    }
    // compat: 0.10 -> 1.1 (and lazy refcounts with it), 1.1 -> 0.10, and back.
    let (ours, _) = p.same(&["amend", "-o", "compat=1.1", "v2.qcow2"]);
    assert_eq!(ours.status, Some(0), "{ours}");
    assert_eq!(same_specific(&p, "v2.qcow2")["compat"], "1.1");
    p.same(&["amend", "-o", "compat=0.10", "v2.qcow2"]);
    assert_eq!(same_specific(&p, "v2.qcow2")["compat"], "0.10");
    p.same(&["amend", "-o", "compat=v3,lazy_refcounts=on", "v2.qcow2"]);
    assert_eq!(same_specific(&p, "v2.qcow2")["lazy-refcounts"], true);
    p.same(&["amend", "-o", "compat=0.10", "v3.qcow2"]);
    assert_eq!(same_specific(&p, "v3.qcow2")["compat"], "0.10");
    // The data is still there.
    assert_qemu_identical(
        &p.ours(),
        "qcow2",
        "v3.qcow2",
        "qcow2",
        &p.theirs().join("v3.qcow2").display().to_string(),
    );
    // Same backing file: nothing to do; a size change.
    p.same(&[
        "amend",
        "-o",
        "backing_file=back.qcow2,backing_fmt=qcow2",
        "top.qcow2",
    ]);
    p.same(&["amend", "-o", "size=20M", "empty.qcow2"]);
    same_specific(&p, "empty.qcow2");
    // Help.
    p.same(&["amend", "-f", "qcow2", "-o", "help"]);
    p.same(&["amend", "-o", "help", "part.qcow2"]);
    // Refusals.
    let cases: &[&[&str]] = &[
        &["amend", "part.qcow2"],
        &["amend", "-o", "lazy_refcounts=on"],
        &["amend", "-o", "cluster_size=4k", "part.qcow2"],
        &["amend", "-o", "preallocation=full", "part.qcow2"],
        &["amend", "-o", "foo=1", "part.qcow2"],
        &["amend", "-o", "compat=2", "part.qcow2"],
        &["amend", "-o", "lazy_refcounts=maybe", "part.qcow2"],
        &["amend", "-o", "refcount_bits=3", "part.qcow2"],
        &["amend", "-o", "backing_file=foo", "part.qcow2"],
        &["amend", "-o", "compat=0.10,lazy_refcounts=on", "part.qcow2"],
        &["amend", "-o", "encrypt.new-secret=s", "part.qcow2"],
        &["amend", "-o", "data_file=x", "part.qcow2"],
        &["amend", "-o", "lazy_refcounts=on", "part.raw"],
        &["amend", "-f", "raw", "-o", "lazy_refcounts=on", "part.raw"],
        &["amend", "-o", "lazy_refcounts=on", "nonexistent.qcow2"],
        &["amend", "-f", "raw", "-o", "help"],
    ];
    for args in cases {
        let (ours, _) = p.same(args);
        assert_eq!(ours.status, Some(1), "{ours}");
    }
    same_specific(&p, "part.qcow2");
}

#[test]
fn amend_refuses_what_it_does_not_implement() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let p = Pair::made_twice("amend-no", sources);
    let before = std::fs::read(p.ours().join("part.qcow2")).expect("read");
    // part.qcow2 has zero clusters: a downgrade would have to expand them.
    let r = cryptvm(
        &p.ours(),
        ["img", "amend", "-o", "compat=0.10", "part.qcow2"],
    );
    assert_eq!(r.status, Some(1), "{r}");
    assert!(r.stderr.starts_with("cryptvm img: Cannot downgrade"), "{r}");
    let r = cryptvm(
        &p.ours(),
        ["img", "amend", "-o", "refcount_bits=8", "part.qcow2"],
    );
    assert_eq!(r.status, Some(1), "{r}");
    assert!(r.stderr.contains("refcount width"), "{r}");
    let r = cryptvm(
        &p.ours(),
        [
            "img",
            "amend",
            "--object",
            SECRET,
            "-o",
            "new-secret=s",
            "-f",
            "luks",
            "img.luks",
        ],
    );
    assert_eq!(r.status, Some(1), "{r}");
    assert!(r.stderr.contains("luks key slots"), "{r}");
    assert_eq!(
        std::fs::read(p.ours().join("part.qcow2")).expect("read"),
        before
    );
    let r = cryptvm(&p.ours(), ["img", "measure", "-l", "x", "part.qcow2"]);
    assert_eq!(r.status, Some(1), "{r}");
}
