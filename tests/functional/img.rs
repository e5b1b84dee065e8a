//! `cryptvm img` behaves as `qemu-img` for the same job: raw create/info/convert/compare,
//! `json:` filenames with the raw driver's `offset`/`size`, the `-p` progress line, and
//! every form of the `secret` object (`data`, `file`, `format=base64`, JSON, and
//! `keyid` + `iv` AES-256-CBC-encrypted secrets). Expected values come from qemu-img,
//! qemu-io and openssl run on the same inputs.

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
