//! `cryptvm img` behaves as `qemu-img` for the same job: raw create/info/convert/compare,
//! `json:` filenames with the raw driver's `offset`/`size`, the `-p` progress line, and
//! every form of the `secret` object (`data`, `file`, `format=base64`, JSON, and
//! `keyid` + `iv` AES-256-CBC-encrypted secrets), and convert's copy (`-m`, `-W`, `-S`,
//! zero runs as holes, read errors, the final flush). Expected values come from qemu-img,
//! qemu-io, strace and openssl run on the same inputs.

#[path = "../common/mod.rs"]
mod common;

use common::*;

/// Standard base64 with padding (RFC 4648), for secrets.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_helper_matches_rfc4648() {
    // RFC 4648 section 10 test vectors.
    for (plain, enc) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(plain.as_bytes()), enc);
    }
}

#[test]
fn raw_create_and_info_match_qemu_img() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = Scratch::new("raw-create");
    for size in ["3M", "1G", "1000", "64K"] {
        cryptvm(s.path(), ["img", "create", "-f", "raw", "ours.raw", size]).ok();
        run(
            "qemu-img",
            [
                "create",
                "-f",
                "raw",
                &s.join("theirs.raw").display().to_string(),
                size,
            ],
            None,
        )
        .ok();
        let len = |n: &str| std::fs::metadata(s.join(n)).expect("stat").len();
        assert_eq!(len("ours.raw"), len("theirs.raw"), "size {size}");

        let theirs = run(
            "qemu-img",
            [
                "info",
                "--output=json",
                "-f",
                "raw",
                &s.join("ours.raw").display().to_string(),
            ],
            None,
        )
        .ok()
        .json();
        let ours = cryptvm(
            s.path(),
            ["img", "info", "--output=json", "-f", "raw", "ours.raw"],
        )
        .ok()
        .json();
        for key in ["virtual-size", "format"] {
            assert_eq!(ours[key], theirs[key], "img info {key} for size {size}");
        }
        let text = cryptvm(s.path(), ["img", "info", "ours.raw"]).ok();
        let qemu_text = run("qemu-img", ["info", "ours.raw"], Some(s.path())).ok();
        for prefix in ["image:", "file format:", "virtual size:"] {
            let want = qemu_text
                .stdout
                .lines()
                .find(|l| l.starts_with(prefix))
                .expect("qemu-img info line");
            assert!(
                text.stdout.lines().any(|l| l == want),
                "img info should show '{want}':\n{text}"
            );
        }
    }
}

#[test]
fn compare_matches_qemu_img() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = Scratch::new("compare");
    let a = pattern(1, 1 << 20);
    s.write("a.raw", &a);
    s.write("same.raw", &a);
    let mut b = a.clone();
    b[777_777] ^= 0x80;
    s.write("one-byte.raw", &b);
    // A whole number of sectors: for a file that ends mid-sector qemu-img
    // reports the mismatch at the file's last byte (from block status, which
    // cryptvm does not model); both agree that the images differ.
    s.write("prefix.raw", &a[..4096]);
    let mut zero_tail = a.clone();
    zero_tail.extend(std::iter::repeat_n(0, 8192));
    s.write("zero-tail.raw", &zero_tail);
    let mut data_tail = a.clone();
    data_tail.extend(std::iter::repeat_n(0xee, 8192));
    s.write("data-tail.raw", &data_tail);
    for (x, y) in [
        ("a.raw", "same.raw"),
        ("a.raw", "one-byte.raw"),
        ("a.raw", "prefix.raw"),
        ("prefix.raw", "a.raw"),
        ("a.raw", "zero-tail.raw"),
        ("data-tail.raw", "a.raw"),
    ] {
        let theirs = run(
            "qemu-img",
            ["compare", "-f", "raw", "-F", "raw", x, y],
            Some(s.path()),
        );
        let ours = cryptvm(s.path(), ["img", "compare", "-f", "raw", "-F", "raw", x, y]);
        assert_eq!(ours.status, theirs.status, "exit status\n{ours}\n{theirs}");
        assert_eq!(ours.stdout, theirs.stdout, "output\n{ours}\n{theirs}");
    }
    // An error is exit status 2, as qemu-img.
    let before = Snapshot::take(s.path());
    let theirs = run(
        "qemu-img",
        ["compare", "a.raw", "missing.raw"],
        Some(s.path()),
    );
    assert_eq!(theirs.status, Some(2));
    let ours = cryptvm(s.path(), ["img", "compare", "a.raw", "missing.raw"]);
    ours.clean_error(2, &["missing.raw"]);
    before.assert_unchanged(&ours);
}

#[test]
fn convert_raw_with_progress_matches_qemu_img() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = Scratch::new("progress");
    let a = pattern(2, 3 << 20);
    s.write("a.raw", &a);
    let theirs = run(
        "qemu-img",
        ["convert", "-p", "-O", "raw", "a.raw", "theirs.raw"],
        Some(s.path()),
    )
    .ok();
    let ours = cryptvm(
        s.path(),
        ["img", "convert", "-p", "-O", "raw", "a.raw", "ours.raw"],
    )
    .ok();
    assert_same_bytes(&read(&s.join("ours.raw")), &a, "convert -p output");
    // qemu-img's last progress report, e.g. "(100.00/100%)".
    let last = theirs
        .stdout
        .split(['\r', '\n'])
        .map(str::trim)
        .rfind(|t| !t.is_empty())
        .expect("qemu-img -p prints progress")
        .to_string();
    assert!(
        ours.stdout.contains(&last),
        "convert -p should end at '{last}':\n{ours}"
    );
    // Without -p nothing is printed.
    let quiet = cryptvm(
        s.path(),
        ["img", "convert", "-O", "raw", "a.raw", "quiet.raw"],
    )
    .ok();
    assert_eq!(quiet.stdout, "", "convert without -p prints nothing");
}

/// The raw driver's `offset` and `size` through a `json:` filename and `--image-opts`.
#[test]
fn raw_offset_and_size_match_qemu_img() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = Scratch::new("raw-offset");
    let a = pattern(3, 1 << 20);
    let path = s.write("a.raw", &a);
    let json = format!(
        r#"json:{{"driver":"raw","offset":4096,"size":65536,"file":{{"driver":"file","filename":"{}"}}}}"#,
        path.display()
    );
    run(
        "qemu-img",
        ["convert", "-O", "raw", &json, "theirs.raw"],
        Some(s.path()),
    )
    .ok();
    cryptvm(s.path(), ["img", "convert", "-O", "raw", &json, "ours.raw"]).ok();
    assert_same_bytes(
        &read(&s.join("theirs.raw")),
        &a[4096..4096 + 65536],
        "qemu-img's slice",
    );
    assert_same_bytes(
        &read(&s.join("ours.raw")),
        &a[4096..4096 + 65536],
        "raw offset/size",
    );

    let opts = format!(
        "driver=raw,offset=512,size=2048,file.filename={}",
        path.display()
    );
    let info = cryptvm(
        s.path(),
        ["img", "info", "--output=json", "--image-opts", &opts],
    )
    .ok()
    .json();
    let theirs = run(
        "qemu-img",
        ["info", "--output=json", "--image-opts", &opts],
        None,
    )
    .ok()
    .json();
    assert_eq!(info["virtual-size"], theirs["virtual-size"]);
}

/// Every form of the secret object opens the same LUKS image in qemu-io and in cryptvm.
#[test]
fn secret_object_forms_match_qemu() {
    if !require(&["qemu-img", "qemu-io", "openssl"]) {
        return;
    }
    let s = Scratch::new("secrets");
    let img = s.join("disk.luks");
    run(
        "qemu-img",
        [
            "create",
            "--object",
            &s.secret_object(),
            "-f",
            "luks",
            "-o",
            "key-secret=sec0,iter-time=10",
            &img.display().to_string(),
            "1M",
        ],
        None,
    )
    .ok();
    let luks = Luks::attached(&img);
    qemu_io(
        &s.secret_object(),
        &luks.image_opts(),
        &["write -P 0x6b 0 1M".to_string()],
    );

    // keyid + iv: the passphrase encrypted with AES-256-CBC (PKCS#7 padding) under a
    // 32-byte master secret, all base64, as QEMU's secret object takes it.
    let master = pattern(4, 32);
    let iv = pattern(5, 16);
    let mut padded = s.pass.as_bytes().to_vec();
    let pad = 16 - padded.len() % 16;
    padded.extend(std::iter::repeat_n(pad as u8, pad));
    let ciphertext = openssl_enc("aes-256-cbc", true, &master, Some(&iv), &padded);
    let pass_b64 = base64(s.pass.as_bytes());

    let forms: Vec<Vec<String>> = vec![
        vec![format!("secret,id=sec0,data={}", s.pass)],
        vec![s.secret_object()],
        vec![format!("secret,id=sec0,data={pass_b64},format=base64")],
        vec![format!(
            r#"{{"qom-type":"secret","id":"sec0","file":"{}"}}"#,
            s.pass_file.display()
        )],
        vec![
            format!("secret,id=master,data={},format=base64", base64(&master)),
            format!(
                "secret,id=sec0,keyid=master,iv={},data={},format=base64",
                base64(&iv),
                base64(&ciphertext)
            ),
        ],
    ];
    for objects in forms {
        // qemu-io accepts the form and reads the data...
        let mut qargs: Vec<String> = Vec::new();
        for o in &objects {
            qargs.extend(["--object".into(), o.clone()]);
        }
        qargs.extend([
            "--image-opts".into(),
            luks.image_opts(),
            "-c".into(),
            "read -P 0x6b 0 1M".into(),
        ]);
        let q = run("qemu-io", &qargs, None).ok();
        assert!(!q.stdout.contains("failed"), "{q}");
        // ...and so does cryptvm.
        let mut args: Vec<String> = vec!["img".into(), "convert".into()];
        for o in &objects {
            args.extend(["--object".into(), o.clone()]);
        }
        args.extend([
            "-O".into(),
            "raw".into(),
            luks.json_filename(),
            "out.raw".into(),
        ]);
        let r = cryptvm(s.path(), &args).ok();
        assert!(
            !r.stderr.contains(&s.pass) && !r.stdout.contains(&s.pass),
            "passphrase printed:\n{r}"
        );
        assert_same_bytes(
            &read(&s.join("out.raw")),
            &[0x6b; 1 << 20],
            "decrypted data",
        );
        std::fs::remove_file(s.join("out.raw")).expect("cleanup");
    }
}

// ---------------------------------------------------------------------------------------
// convert: the copy (requests in flight, write order, sparse detection, the final flush)
// ---------------------------------------------------------------------------------------

/// 6 MiB of data, fully written (no holes in the file), with zero runs of many lengths
/// and alignments: leading, unaligned, shorter and longer than 4 KiB, across the 2 MiB
/// request boundary, a whole MiB, and at the end.
fn zero_runs_source() -> Vec<u8> {
    let mut b = pattern(61, 6 << 20);
    for (at, len) in [
        (0, 3 * 512),
        (10_000, 4096),
        (65_536, 65_536),
        (200 << 10, 3000),
        ((2 << 20) - 4096, 8192),
        (3 << 20, 1 << 20),
        ((5 << 20) + 512, 7 * 512),
        ((6 << 20) - 65_536, 65_536),
    ] {
        b[at..at + len].fill(0);
    }
    b
}

/// `qemu-img map --output=json` of `file` in `dir`.
fn qemu_map(dir: &std::path::Path, fmt: &str, file: &str) -> String {
    run(
        "qemu-img",
        ["map", "--output=json", "-f", fmt, file],
        Some(dir),
    )
    .ok()
    .stdout
}

/// Zero runs become holes exactly where qemu-img makes them, for every `-S`: the same
/// `qemu-img map` (allocation, zero flags and, for qcow2, host offsets: writes go in
/// source order) for a new raw file, a new qcow2 image, and `-n` into a qcow2 image
/// full of other data (zero runs written as zeroes).
#[test]
fn convert_sparse_output_matches_qemu_img() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let (ours, theirs) = (Scratch::new("sparse-ours"), Scratch::new("sparse-theirs"));
    let src = zero_runs_source();
    for s in [&ours, &theirs] {
        s.write("src.raw", &src);
    }
    for sparse in [
        vec![],
        vec!["-S", "0"],
        vec!["-S", "1k"],
        vec!["-S", "12k"],
        vec!["-S", "64k"],
    ] {
        for (fmt, existing) in [("raw", false), ("qcow2", false), ("qcow2", true)] {
            let what = format!("{sparse:?} -O {fmt}{}", if existing { " -n" } else { "" });
            let mut args = vec!["convert", "-f", "raw", "-O", fmt];
            args.extend(&sparse);
            if existing {
                args.push("-n");
                for s in [&ours, &theirs] {
                    run(
                        "qemu-img",
                        ["create", "-q", "-f", fmt, "t.img", "6M"],
                        Some(s.path()),
                    )
                    .ok();
                    qemu_io_file(s.path(), fmt, "t.img", &["write -P 0x33 0 6M".to_string()]);
                }
            }
            args.extend(["src.raw", "t.img"]);
            run("qemu-img", &args, Some(theirs.path())).ok();
            let mut full = vec!["img"];
            full.extend(&args);
            cryptvm(ours.path(), &full).ok();
            assert_qemu_identical(ours.path(), "raw", "src.raw", fmt, "t.img");
            assert_eq!(
                qemu_map(ours.path(), fmt, "t.img"),
                qemu_map(theirs.path(), fmt, "t.img"),
                "{what}: cryptvm's allocation (left) differs from qemu-img's"
            );
            for s in [&ours, &theirs] {
                std::fs::remove_file(s.join("t.img")).expect("cleanup");
            }
        }
    }
}

/// In source order (no `-W`) the mission stack's qcow2 payload is laid out as qemu-img
/// lays it out, however many requests are in flight, although cryptvm's requests
/// encrypt and write at the same time and only allocate in turn: into fresh copies of
/// one empty qcow2 under one detached header, `convert -n` of a source with zero runs
/// by each tool gives the same `qemu-img map` (host offsets) and the same ciphertext.
#[test]
fn convert_into_the_mission_stack_allocates_in_source_order() {
    if !require(&["qemu-img", "qemu-system-x86_64", "python3"]) {
        return;
    }
    let s = Scratch::new("alloc-order");
    let mut src = pattern(64, (13 << 20) + 3 * 512);
    for (at, len) in [
        (65_536, 65_536),
        (3 << 20, 1 << 20),
        ((7 << 20) + 4096, 8192),
    ] {
        src[at..at + len].fill(0);
    }
    s.write("src.raw", &src);
    let luks = detached_luks_qcow2(&s, src.len() as u64);
    std::fs::copy(s.join("disk.qcow2"), s.join("empty.qcow2")).expect("copy");
    let secret = s.secret_object();
    let stack = |file: &str| luks.qcow2_image_opts().replace("disk.qcow2", file);
    let theirs = stack("theirs.qcow2");
    std::fs::copy(s.join("empty.qcow2"), s.join("theirs.qcow2")).expect("copy");
    let args = [
        "--object",
        &secret,
        "-n",
        "-f",
        "raw",
        "--target-image-opts",
    ];
    let mut qemu = vec!["convert"];
    qemu.extend(args);
    qemu.extend(["src.raw", &theirs]);
    run("qemu-img", &qemu, Some(s.path())).ok();
    for flags in [vec![], vec!["-m", "2"], vec!["-m", "16"]] {
        std::fs::copy(s.join("empty.qcow2"), s.join("ours.qcow2")).expect("copy");
        let ours = stack("ours.qcow2");
        let mut full = vec!["img", "convert"];
        full.extend(&flags);
        full.extend(args);
        full.extend(["src.raw", &ours]);
        cryptvm(s.path(), &full).ok();
        assert_eq!(
            qemu_map(s.path(), "qcow2", "ours.qcow2"),
            qemu_map(s.path(), "qcow2", "theirs.qcow2"),
            "{flags:?}: cryptvm's layout (left) differs from qemu-img's"
        );
        assert_qemu_identical(s.path(), "qcow2", "ours.qcow2", "qcow2", "theirs.qcow2");
        assert_qemu_check_clean(s.path(), "ours.qcow2");
    }
}

/// `-m`, `-W`, `-S`, `-C` and `-U` as qemu-img takes them: bad values fail with
/// qemu-img's message and create nothing; good ones copy every byte. Options this tool
/// does not implement (`-c`, `-B`, `-l`, `-r`) fail cleanly instead of being ignored.
#[test]
fn convert_copy_options_match_qemu_img() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = Scratch::new("copy-options");
    // Not a whole number of 2 MiB requests.
    let src = pattern(62, (9 << 20) + 3 * 512);
    s.write("src.raw", &src);
    for bad in [
        vec!["-m", "0"],
        vec!["-m", "17"],
        vec!["-m", "x"],
        vec!["-S", "100"],
        vec!["-S", "17M"],
        vec!["-S", "x"],
    ] {
        let mut args = vec!["convert"];
        args.extend(&bad);
        args.extend(["-O", "raw", "src.raw", "out.raw"]);
        let theirs = run("qemu-img", &args, Some(s.path()));
        assert_eq!(theirs.status, Some(1), "{theirs}");
        let before = Snapshot::take(s.path());
        let mut full = vec!["img"];
        full.extend(&args);
        let ours = cryptvm(s.path(), &full);
        let message = theirs.stderr.trim().trim_start_matches("qemu-img: ");
        ours.clean_error(1, &[message]);
        before.assert_unchanged(&ours);
    }
    // `-c` is implemented now (tests/functional/img_compress.rs): refused only where
    // qemu-img refuses it, in its words.
    {
        let before = Snapshot::take(s.path());
        let ours = cryptvm(
            s.path(),
            ["img", "convert", "-c", "-O", "raw", "src.raw", "out.img"],
        );
        ours.clean_error(1, &["Compression not supported for this file format"]);
        before.assert_unchanged(&ours);
    }
    for unsupported in [vec!["-B", "src.raw", "-O", "qcow2"], vec!["-r", "1M"]] {
        let mut args = vec!["img", "convert"];
        args.extend(&unsupported);
        args.extend(["src.raw", "out.img"]);
        let before = Snapshot::take(s.path());
        let ours = cryptvm(s.path(), &args);
        ours.clean_error(1, &["not supported"]);
        before.assert_unchanged(&ours);
    }
    // `-l` is implemented now (tests/functional/img_snapshot.rs); a raw source keeps
    // no snapshots, refused in qemu-img's words.
    {
        let before = Snapshot::take(s.path());
        let ours = cryptvm(
            s.path(),
            ["img", "convert", "-l", "snap1", "src.raw", "out.img"],
        );
        ours.clean_error(
            1,
            &["does not support temporarily loading internal snapshots"],
        );
        before.assert_unchanged(&ours);
    }
    for good in [
        vec!["-m", "1"],
        vec!["-m", "16"],
        vec!["-W"],
        vec!["-m", "3", "-W"],
        vec!["-C"],
        vec!["-U", "-S", "0"],
    ] {
        let mut args = vec!["img", "convert"];
        args.extend(&good);
        args.extend(["-O", "raw", "src.raw", "out.raw"]);
        cryptvm(s.path(), &args).ok();
        assert_same_bytes(&read(&s.join("out.raw")), &src, &format!("{good:?}"));
        std::fs::remove_file(s.join("out.raw")).expect("cleanup");
    }
}

/// Every number of requests in flight, in order or not, copies the mission stack (luks
/// with a detached header over qcow2 over file) both ways: qemu-img reads back what
/// cryptvm encrypted, qemu-img check finds the qcow2 payload clean, and cryptvm decrypts
/// it back to the source bytes.
#[test]
fn convert_through_the_mission_stack_with_requests_in_flight() {
    if !require(&["qemu-img", "qemu-system-x86_64", "python3"]) {
        return;
    }
    let s = Scratch::new("in-flight");
    let size = (21 << 20) + 3 * 512;
    let src = pattern(63, size);
    s.write("src.raw", &src);
    let luks = detached_luks_qcow2(&s, size as u64);
    let stack = luks.qcow2_image_opts();
    let secret = s.secret_object();
    for flags in [
        vec![],
        vec!["-m", "1"],
        vec!["-m", "16"],
        vec!["-W"],
        vec!["-m", "2", "-W"],
    ] {
        let mut args = vec!["img", "convert", "--object", &secret];
        args.extend(&flags);
        args.extend(["-n", "-f", "raw", "--target-image-opts", "src.raw", &stack]);
        cryptvm(s.path(), &args).ok().never_shows(&s.pass);
        let same = run(
            "qemu-img",
            [
                "compare",
                "--object",
                &secret,
                "--image-opts",
                &format!("driver=raw,file.filename={}", s.join("src.raw").display()),
                &stack,
            ],
            None,
        );
        assert_eq!(
            same.status,
            Some(0),
            "{flags:?}: qemu-img reads other data:\n{same}"
        );
        assert_qemu_check_clean(s.path(), "disk.qcow2");

        let mut args = vec!["img", "convert", "--object", &secret];
        args.extend(&flags);
        args.extend(["--image-opts", &stack, "-O", "raw", "back.raw"]);
        cryptvm(s.path(), &args).ok();
        assert_same_bytes(
            &read(&s.join("back.raw")),
            &src,
            &format!("{flags:?}: decrypted"),
        );
        std::fs::remove_file(s.join("back.raw")).expect("cleanup");
    }
}

/// A source that fails to read in its middle (a compressed qcow2 cluster that does not
/// inflate, 6 MiB in): the copy stops with qemu-img's "error while reading" message and
/// exit status 1, whatever the number of requests in flight and their order, without
/// waiting forever for the failed request's turn.
#[test]
fn convert_stops_at_a_read_error_in_the_middle() {
    if !require(&["qemu-img"]) {
        return;
    }
    use qcow2_header as h;
    let s = Scratch::new("read-error");
    let mut text = Vec::new();
    for n in 0.. {
        if text.len() >= 16 << 20 {
            break;
        }
        text.extend_from_slice(format!("{n:06} compressible line of text\n").as_bytes());
    }
    text.truncate(16 << 20);
    s.write("text.raw", &text);
    run(
        "qemu-img",
        [
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "text.raw",
            "bad.qcow2",
        ],
        Some(s.path()),
    )
    .ok();
    let path = s.join("bad.qcow2");
    let mut b = read(&path);
    let l = Qcow2Layout::parse(&b);
    let guest = (6 << 20) + l.cluster_size();
    let entry = get_be64(&b, l.l2_entry_pos(&b, guest).expect("L2 table"));
    assert!(
        entry & h::OFLAG_COMPRESSED != 0,
        "the cluster is not compressed"
    );
    let host = (entry & ((1u64 << (62 - (l.cluster_bits - 8))) - 1)) as usize;
    b[host..host + 256].fill(0xff);
    std::fs::write(&path, &b).expect("writing the damaged image");
    let theirs = run(
        "qemu-img",
        ["convert", "-O", "raw", "bad.qcow2", "q.raw"],
        Some(s.path()),
    );
    assert_eq!(theirs.status, Some(1), "{theirs}");
    assert!(
        theirs.stderr.contains("error while reading at byte"),
        "{theirs}"
    );
    for flags in [
        vec![],
        vec!["-m", "1"],
        vec!["-m", "16"],
        vec!["-W", "-m", "16"],
    ] {
        let mut args = vec!["img", "convert"];
        args.extend(&flags);
        args.extend(["-O", "raw", "bad.qcow2", "out.raw"]);
        let ours = cryptvm_limited(s.path(), &args, std::time::Duration::from_secs(60), 8 << 30);
        ours.clean_error(1, &["error while reading at byte 6291456: "]);
    }
}

/// A completed convert is durable: the last thing done to each target file is an
/// fdatasync (for qcow2, after the metadata is written), as qemu-img flushes on close.
#[test]
fn convert_flushes_the_target_last() {
    if !require(&["qemu-img", "qemu-system-x86_64", "python3", "strace"]) {
        return;
    }
    let s = Scratch::new("flush-last");
    let size = 5 << 20;
    s.write("src.raw", &pattern(64, size));
    let luks = detached_luks_qcow2(&s, size as u64);
    let stack = luks.qcow2_image_opts();
    let secret = s.secret_object();
    for (target, file) in [
        (vec!["-O", "raw", "src.raw", "new.raw"], "new.raw"),
        (vec!["-O", "qcow2", "src.raw", "new.qcow2"], "new.qcow2"),
        (
            vec![
                "--object",
                &secret,
                "-n",
                "-f",
                "raw",
                "--target-image-opts",
                "src.raw",
                &stack,
            ],
            "disk.qcow2",
        ),
    ] {
        let mut args = vec![
            "-f",
            "-y",
            "-qq",
            "-e",
            "trace=write,pwrite64,pwritev,pwritev2,fallocate,ftruncate,fsync,fdatasync",
            "-o",
            "trace.txt",
            CRYPTVM,
            "img",
            "convert",
        ];
        args.extend(&target);
        run("strace", &args, Some(s.path())).ok();
        let trace = String::from_utf8(read(&s.join("trace.txt"))).expect("utf-8 trace");
        let calls: Vec<&str> = trace
            .lines()
            .filter(|l| l.contains(&format!("/{file}>")))
            .collect();
        assert!(
            calls.iter().any(|l| l.contains("pwrite")),
            "{file}: no writes seen:\n{trace}"
        );
        let last = calls.last().expect("calls");
        assert!(
            last.contains("fdatasync(") || last.contains("fsync("),
            "{file}: the last call is not a flush: {last}\n{trace}"
        );
    }
}

/// `-t`/`-T` cache modes do what they say, as in qemu-img: `none` opens with O_DIRECT,
/// `unsafe` leaves out the final flush, `writethrough` flushes every write; a bad mode is qemu-img's error.
#[test]
fn cache_modes_are_applied() {
    if !require(&["qemu-img", "strace"]) {
        return;
    }
    let s = Scratch::new("cache-modes");
    let size = 4 << 20;
    s.write("src.raw", &pattern(65, size));
    let trace = |args: &[&str]| -> String {
        let mut all = vec![
            "-f",
            "-y",
            "-qq",
            "-e",
            "trace=openat,pwrite64,pwritev,fsync,fdatasync",
            "-o",
            "trace.txt",
            CRYPTVM,
            "img",
        ];
        all.extend(args);
        let _ = std::fs::remove_file(s.join("new.raw"));
        run("strace", &all, Some(s.path())).ok();
        String::from_utf8(read(&s.join("trace.txt"))).expect("utf-8 trace")
    };
    let new_raw = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.contains("/new.raw"))
            .map(str::to_string)
            .collect()
    };
    let flushes = |calls: &[String]| calls.iter().filter(|l| l.contains("fdatasync(")).count();
    let writes = |calls: &[String]| calls.iter().filter(|l| l.contains("pwrite")).count();

    let t = trace(&["convert", "-t", "none", "-O", "raw", "src.raw", "new.raw"]);
    let calls = new_raw(&t);
    assert!(
        calls
            .iter()
            .any(|l| l.contains("openat(") && l.contains("O_DIRECT")),
        "-t none: the target is opened with O_DIRECT:\n{t}"
    );
    let t = trace(&["convert", "-T", "none", "-O", "raw", "src.raw", "new.raw"]);
    assert!(
        t.lines()
            .any(|l| l.contains("src.raw") && l.contains("openat(") && l.contains("O_DIRECT")),
        "-T none: the source is opened with O_DIRECT:\n{t}"
    );
    let calls = new_raw(&trace(&["convert", "-O", "raw", "src.raw", "new.raw"]));
    assert!(flushes(&calls) >= 1, "writeback: one flush at the end");
    let calls = new_raw(&trace(&[
        "convert", "-t", "unsafe", "-O", "raw", "src.raw", "new.raw",
    ]));
    assert_eq!(flushes(&calls), 0, "-t unsafe: flushes are left out");
    assert!(writes(&calls) >= 1);
    let calls = new_raw(&trace(&[
        "convert",
        "-t",
        "writethrough",
        "-O",
        "raw",
        "src.raw",
        "new.raw",
    ]));
    assert!(
        flushes(&calls) >= writes(&calls),
        "-t writethrough: every write flushed ({} writes, {} flushes)",
        writes(&calls),
        flushes(&calls)
    );
    // A bad mode: qemu-img's words.
    cryptvm(s.path(), ["img", "bench", "-t", "fast", "src.raw"])
        .clean_error(1, &["Invalid cache option: fast"]);
    // On tmpfs (O_DIRECT only since Linux 6.6) both tools succeed or fail alike.
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        let dir = tempfile::tempdir_in(shm).expect("tmpfs folder");
        let img = dir.path().join("t.raw");
        std::fs::write(&img, vec![0u8; 1 << 20]).expect("image");
        let img = img.to_str().unwrap();
        let theirs = run("qemu-img", ["bench", "-t", "none", "-c", "1", img], None);
        let ours = cryptvm(dir.path(), ["img", "bench", "-t", "none", "-c", "1", img]);
        assert_eq!(
            ours.status, theirs.status,
            "cryptvm img bench -t none on tmpfs fails as qemu-img's does:\n{ours}"
        );
    }
}

/// `convert -p | head -c 1`: the closed pipe ends cryptvm as it ends qemu-img (SIGPIPE,
/// or done first), never a panic or a hang (issue 13).
#[test]
fn convert_progress_into_a_closed_pipe_ends_quietly() {
    let s = Scratch::new("pipe");
    s.sparse("a.raw", 64 << 20);
    let script = format!(
        "timeout 60 '{}' img convert -p -O raw a.raw b.raw 2>err.txt | head -c 1 >/dev/null; \
         echo ${{PIPESTATUS[0]}}",
        CRYPTVM
    );
    let r = run("bash", ["-c", &script], Some(s.path())).ok();
    let status = r.stdout.trim();
    let err = std::fs::read_to_string(s.join("err.txt")).unwrap();
    assert!(
        status == "141" || status == "0",
        "exit status {status} (124: hung; 101: panicked):\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// `img --help` prints the usage (exit 0) and names every subcommand; no command at all
/// is qemu-img's error (issue 13).
#[test]
fn help_lists_every_subcommand() {
    let s = Scratch::new("help");
    let r = cryptvm(s.path(), ["img", "--help"]).ok();
    for cmd in ["bench", "check", "compare", "convert", "create", "info"] {
        assert!(r.stdout.contains(&format!("\n  {cmd} ")), "{cmd}:\n{r}");
    }
    let none = cryptvm(s.path(), ["img"]);
    assert_eq!(none.status, Some(1), "{none}");
    assert!(
        none.stderr
            .starts_with("cryptvm img: Not enough arguments\n"),
        "{none}"
    );
}

/// `-o help` of create and convert, with and without a target file, is qemu-img's list
/// in qemu-img's layout: the same header and footer, and each option listed is one that
/// qemu-img lists with the same type and text (only options cryptvm implements are
/// listed; for raw and luks without a file that is all of them, byte for byte).
#[test]
fn option_help_matches_qemu_img() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = Scratch::new("opt-help");
    let cases: [&[&str]; 8] = [
        &["create", "-f", "raw", "-o", "help"],
        &["create", "-f", "luks", "-o", "help"],
        &["create", "-f", "qcow2", "-o", "help"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,help",
            "new.qcow2",
            "1M",
        ],
        &["create", "-f", "luks", "-o", "help", "new.luks"],
        &["convert", "-O", "luks", "-o", "help"],
        &["convert", "-O", "raw", "-o", "help", "a", "b"],
        &["convert", "-O", "qcow2", "-o", "?", "a", "b"],
    ];
    for args in cases {
        let theirs = run("qemu-img", args, Some(s.path())).ok();
        let mut full = vec!["img"];
        full.extend(args);
        let ours = cryptvm(s.path(), &full).ok();
        let (o, t): (Vec<&str>, Vec<&str>) = (
            ours.stdout.lines().collect(),
            theirs.stdout.lines().collect(),
        );
        assert_eq!(o.first(), t.first(), "{args:?}: header\n{ours}\n{theirs}");
        let footer = |v: &[&str]| v.iter().rev().take_while(|l| !l.starts_with("  ")).count();
        assert_eq!(
            o[o.len() - footer(&o)..],
            t[t.len() - footer(&t)..],
            "{args:?}: footer\n{ours}\n{theirs}"
        );
        for line in o.iter().filter(|l| l.starts_with("  ")) {
            let name = line.trim_start().split('=').next().unwrap();
            let same = t.iter().any(|l| l == line)
                || (name == "preallocation"
                    && t.iter()
                        .any(|l| l.trim_start().starts_with("preallocation=<str>")));
            assert!(
                same,
                "{args:?}: '{line}' is not qemu-img's\n{ours}\n{theirs}"
            );
        }
        if matches!(args, [_, "-f", "raw" | "luks", "-o", "help"]) {
            assert_eq!(ours.stdout, theirs.stdout, "{args:?}");
        }
        assert!(!s.join("new.qcow2").exists() && !s.join("new.luks").exists());
    }
}

/// `-o` given several times is merged as qemu-img merges it, and a key given twice
/// keeps its last value (it used to be refused as given twice).
#[test]
fn repeated_options_merge_as_in_qemu_img() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = Scratch::new("opt-merge");
    let secret = s.secret_object();
    for (fmt, opts) in [
        (
            "qcow2",
            vec![
                "-o",
                "cluster_size=4096",
                "-o",
                "cluster_size=8192,lazy_refcounts=on",
            ],
        ),
        (
            "luks",
            vec![
                "-o",
                "key-secret=sec0",
                "-o",
                "iter-time=10",
                "-o",
                "iter-time=20",
            ],
        ),
    ] {
        let mut args = vec!["create", "--object", &secret, "-f", fmt];
        args.extend(&opts);
        let (mut t, mut o) = (args.clone(), vec!["img"]);
        o.extend(&args);
        t.extend(["theirs.img", "1M"]);
        o.extend(["ours.img", "1M"]);
        let theirs = run("qemu-img", &t, Some(s.path())).ok();
        let ours = cryptvm(s.path(), &o).ok();
        assert_eq!(
            ours.stdout.replace("ours.img", "theirs.img"),
            theirs.stdout,
            "{fmt}\n{ours}\n{theirs}"
        );
        if fmt == "qcow2" {
            let info = |f: &str| {
                let v = run("qemu-img", ["info", "--output=json", f], Some(s.path())).json();
                (
                    v["cluster-size"].clone(),
                    v["format-specific"]["data"]["lazy-refcounts"].clone(),
                )
            };
            assert_eq!(info("ours.img"), info("theirs.img"));
            assert_eq!(info("ours.img").0, 8192);
        }
    }
}

/// Run through a symlink named `qemu-img`, cryptvm is `cryptvm img` with qemu-img's
/// name in its messages: stdout, stderr and exit status equal the real qemu-img's for
/// the same commands (success, a missing file, an unsupported check, a usage error).
#[test]
fn runs_as_qemu_img_through_a_symlink() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = Scratch::new("as-qemu-img");
    let link = s.join("qemu-img");
    std::os::unix::fs::symlink(CRYPTVM, &link).expect("symlink");
    let link = link.to_str().expect("utf-8 path").to_string();
    let cases: [&[&str]; 7] = [
        &["create", "-f", "raw", "a.raw", "1M"],
        &["info", "a.raw"],
        &["map", "--output=json", "a.raw"],
        &["info", "nosuch"],
        &["check", "-f", "raw", "a.raw"],
        &["resize", "a.raw"],
        &["create", "-f", "qcow2", "-o", "help"],
    ];
    for args in cases {
        let theirs = run("qemu-img", args, Some(s.path()));
        if args[0] == "create" && args.len() == 5 {
            std::fs::remove_file(s.join("a.raw")).expect("cleanup");
        }
        let ours = run(&link, args, Some(s.path()));
        // Both repeat their argv[0] in "Try '... --help'" hints.
        let real = find_tool("qemu-img").expect("qemu-img");
        let their_err = theirs
            .stderr
            .replace(real.to_str().expect("utf-8"), "qemu-img");
        let our_err = ours.stderr.replace(&link, "qemu-img");
        let expected = (theirs.status, theirs.stdout.as_str(), their_err.as_str());
        if args.contains(&"help") {
            // The options listed are those implemented (option_help_matches_qemu_img).
            assert_eq!(ours.status, theirs.status, "{args:?}\n{ours}");
            assert!(
                ours.stdout.starts_with("Supported qcow2 options:\n"),
                "{ours}"
            );
            continue;
        }
        assert_eq!(
            (ours.status, ours.stdout.as_str(), our_err.as_str()),
            expected,
            "{args:?}\n{ours}\n{theirs}"
        );
    }
}

/// A scratch folder with `l.luks` (1 MiB, made by qemu-img, keyed by the passphrase in
/// `good`) and a wrong passphrase in `bad`.
fn luks_with_passphrases(tag: &str) -> Scratch {
    let s = Scratch::new(tag);
    s.write("good", b"right");
    s.write("bad", b"wrong");
    let args = [
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        "secret,id=s,file=good",
    ];
    let rest = ["-o", "key-secret=s,iter-time=10", "l.luks", "1M"];
    run("qemu-img", args.into_iter().chain(rest), Some(s.path())).ok();
    s
}

/// `img info` opens an image for its metadata only, as qemu-img does: a LUKS image
/// whose key-secret holds a wrong passphrase (or names no secret at all) is described
/// all the same, as with the right one, where `check` and `convert` refuse it.
#[test]
fn info_needs_no_passphrase() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = luks_with_passphrases("info-nokey");
    let opts = |secret: &str| format!("driver=luks,key-secret={secret},file.filename=l.luks");
    let info = |tool: &str, pass: &str, secret: &str| {
        let object = format!("secret,id=sec0,file={pass}");
        let args = ["info", "--object", &object, "--image-opts", &opts(secret)];
        if tool == "qemu-img" {
            run("qemu-img", args, Some(s.path()))
        } else {
            let mut full = vec!["img"];
            full.extend(args);
            cryptvm(s.path(), &full)
        }
    };
    let good = info("cryptvm", "good", "sec0").ok();
    for (pass, secret) in [("bad", "sec0"), ("good", "nosuch")] {
        info("qemu-img", pass, secret).ok();
        let ours = info("cryptvm", pass, secret).ok();
        assert_eq!(ours.stdout, good.stdout, "{pass} {secret}");
    }
    let r = cryptvm(
        s.path(),
        [
            "img",
            "check",
            "--object",
            "secret,id=sec0,file=bad",
            "--image-opts",
            &opts("sec0"),
        ],
    );
    assert_eq!(r.status, Some(1), "{r}");
}

/// `check` of a format without checks opens the image first, as qemu-img does: a wrong
/// passphrase is reported as such, the right one gets "does not support checks" (63).
#[test]
fn check_of_a_luks_image_opens_it_first() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = luks_with_passphrases("check-luks");
    let opts = "driver=luks,key-secret=s,file.filename=l.luks";
    for (pass, status, says) in [
        ("bad", 1, "Invalid password, cannot unlock any keyslot"),
        ("good", 63, "This image format does not support checks"),
    ] {
        let object = format!("secret,id=s,file={pass}");
        let args = ["check", "--object", object.as_str(), "--image-opts", opts];
        let q = run("qemu-img", args, Some(s.path()));
        assert_eq!(q.status, Some(status), "{q}");
        assert!(q.stderr.contains(says), "{q}");
        let ours = cryptvm(s.path(), std::iter::once("img").chain(args));
        assert_eq!(ours.status, Some(status), "{ours}");
        assert!(ours.stderr.contains(says), "{ours}");
        ours.never_shows("right");
    }
}

/// An image that cannot be opened is reported as qemu-img reports it, byte for byte:
/// a missing file, a bare detached LUKS header opened as an image, a wrong passphrase
/// (issue 13).
#[test]
fn open_errors_match_qemu_img() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = luks_with_passphrases("open-errors");
    cryptvm(
        s.path(),
        [
            "img",
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            "secret,id=s,file=good",
            "-o",
            "key-secret=s,detached-header=true,iter-time=10",
            "hdr.img",
        ],
    )
    .ok();
    let cases: &[&[&str]] = &[
        &["info", "nosuch.img"],
        &["info", "hdr.img"],
        &["compare", "hdr.img", "nosuch.img"],
        &["compare", "l.luks", "nosuch.img"],
        &[
            "check",
            "--object",
            "secret,id=s,file=bad",
            "--image-opts",
            "driver=luks,key-secret=s,file.filename=l.luks",
        ],
    ];
    for args in cases {
        let q = run("qemu-img", args.iter().copied(), Some(s.path()));
        let ours = cryptvm(s.path(), std::iter::once("img").chain(args.iter().copied()));
        assert_eq!(ours.status, q.status, "{q}\n{ours}");
        assert_eq!(
            ours.stderr.strip_prefix("cryptvm img: "),
            q.stderr.strip_prefix("qemu-img: "),
            "{q}\n{ours}"
        );
    }
}

/// `json:` file names that leave the format out (`file.filename` dotted or nested) are
/// probed as qemu-img probes them: `img info` prints what qemu-img prints.
#[test]
fn json_names_without_a_format_are_probed() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = Scratch::new("json-probe");
    run(
        "qemu-img",
        ["create", "-q", "-f", "qcow2", "x.qcow2", "1M"],
        Some(s.path()),
    )
    .ok();
    for name in [
        r#"json:{"file.driver":"file","file.filename":"x.qcow2"}"#,
        r#"json:{"file":{"filename":"x.qcow2"}}"#,
        r#"json:{"driver":"qcow2","file.filename":"x.qcow2"}"#,
    ] {
        let theirs = run("qemu-img", ["info", name], Some(s.path())).ok();
        let ours = cryptvm(s.path(), ["img", "info", name]).ok();
        assert_eq!(ours.stdout, theirs.stdout, "{name}");
    }
}
