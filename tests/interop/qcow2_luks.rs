//! qcow2 with built-in encryption (`encrypt.format=luks`; legacy `aes` read only)
//! against QEMU (issue 14, item 4).
//!
//! - Images qemu-img creates and qemu-io writes read identically in cryptvm
//!   (`cryptvm img convert -O raw` gives what `qemu-img convert -O raw` gives, and
//!   what the test's model of the writes says), and `cryptvm img info` (text and
//!   JSON) shows what `qemu-img info` shows.
//! - Images cryptvm creates (`img create`, `img convert -O qcow2`) and writes read
//!   identically in qemu-io / `qemu-img convert` and pass `qemu-img check`.
//! - A wrong or missing key gets qemu-img's error; creating `encrypt.format=aes` is
//!   refused.

#[path = "../common/mod.rs"]
mod common;

use std::path::Path;

use common::*;

const MIB: u64 = 1 << 20;
/// Virtual size of the test disks.
const SIZE: u64 = 4 * MIB;

/// Writes through qemu-io: (pattern, offset, length): aligned, unaligned, across
/// clusters, the last bytes.
const WRITES: &[(u8, u64, u64)] = &[
    (0x5a, 0, 64 << 10),
    (0xa5, 70_001, 300_000),
    (0x3c, MIB - 100, 4196),
    (0x11, SIZE - 511, 511),
];

/// `--image-opts` of an encrypted qcow2 image with secret `sec0`.
fn opts(path: &Path) -> String {
    format!(
        "driver=qcow2,encrypt.key-secret=sec0,file.filename={}",
        path.display()
    )
}

/// The raw bytes the writes leave on a zeroed disk, with a zero write over
/// `[128 KiB, 192 KiB)` after them.
fn model() -> Vec<u8> {
    let mut m = vec![0u8; SIZE as usize];
    for &(p, off, len) in WRITES {
        m[off as usize..(off + len) as usize].fill(p);
    }
    m[128 << 10..192 << 10].fill(0);
    m
}

/// Makes the writes with qemu-io.
fn qemu_writes(s: &Scratch, image: &Path) {
    let mut cmds: Vec<String> = WRITES
        .iter()
        .map(|(p, off, len)| format!("write -P {p:#x} {off} {len}"))
        .collect();
    cmds.push(format!("write -z {} {}", 128 << 10, 64 << 10));
    qemu_io(&s.secret_object(), &opts(image), &cmds);
}

/// `PROGRAM img convert` (or `qemu-img convert`) of the encrypted image to raw.
fn to_raw(s: &Scratch, program: &str, image: &Path, out: &str) -> Vec<u8> {
    let secret = s.secret_object();
    let o = opts(image);
    let args = [
        "convert",
        "--object",
        &secret,
        "--image-opts",
        &o,
        "-O",
        "raw",
        out,
    ];
    if program == "qemu-img" {
        run("qemu-img", args, Some(s.path())).ok();
    } else {
        cryptvm(s.path(), std::iter::once("img").chain(args)).ok();
    }
    read(&s.join(out))
}

/// `img info` of cryptvm and qemu-img agree, in text and JSON.
fn check_info(s: &Scratch, image: &Path) {
    let name = image.display().to_string();
    for extra in [&[][..], &["--output=json"][..]] {
        let mut args = vec!["info"];
        args.extend_from_slice(extra);
        args.push(&name);
        let q = run("qemu-img", &args, Some(s.path())).ok();
        let c = cryptvm(s.path(), std::iter::once("img").chain(args.iter().copied())).ok();
        assert_eq!(c.stdout, q.stdout, "img info {extra:?} differs:\n{c}\n{q}");
    }
}

/// `qemu-img check` of an encrypted image finds nothing.
fn qemu_check(s: &Scratch, image: &Path) {
    let secret = s.secret_object();
    let o = opts(image);
    let r = run(
        "qemu-img",
        ["check", "--object", &secret, "--image-opts", &o],
        Some(s.path()),
    )
    .ok();
    assert!(r.stdout.contains("No errors were found"), "{r}");
}

/// The encrypt.* creation options of the tested specs (iter-time kept small).
const SPECS: &[&str] = &[
    "encrypt.iter-time=10",
    "encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.hash-alg=sha1",
    "encrypt.iter-time=10,encrypt.cipher-alg=twofish-256,encrypt.cipher-mode=xts,encrypt.ivgen-alg=plain",
];

#[test]
fn qemu_made_images_read_identically() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    for (i, spec) in SPECS.iter().enumerate() {
        let s = Scratch::new("q2lq");
        let image = s.join(&format!("q{i}.qcow2"));
        let o = format!("encrypt.format=luks,encrypt.key-secret=sec0,{spec}");
        run(
            "qemu-img",
            [
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                &s.secret_object(),
                "-o",
                &o,
                image.to_str().unwrap(),
                &SIZE.to_string(),
            ],
            Some(s.path()),
        )
        .ok();
        qemu_writes(&s, &image);
        let want = to_raw(&s, "qemu-img", &image, "want.raw");
        assert_same_bytes(&want, &model(), "qemu-img's view vs the model");
        let got = to_raw(&s, "cryptvm", &image, "got.raw");
        assert_same_bytes(&got, &want, &format!("cryptvm's view of {spec}"));
        run(
            "qemu-img",
            ["compare", "-f", "raw", "-F", "raw", "want.raw", "got.raw"],
            Some(s.path()),
        )
        .ok();
        check_info(&s, &image);
    }
}

#[test]
fn cryptvm_made_images_work_in_qemu() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    for (i, spec) in SPECS.iter().enumerate() {
        let s = Scratch::new("q2lc");
        let image = s.join(&format!("c{i}.qcow2"));
        let o = format!("encrypt.format=luks,encrypt.key-secret=sec0,{spec}");
        let secret = s.secret_object();
        let made = cryptvm(
            s.path(),
            [
                "img",
                "create",
                "-f",
                "qcow2",
                "--object",
                &secret,
                "-o",
                &o,
                image.to_str().unwrap(),
                &SIZE.to_string(),
            ],
        )
        .ok();
        made.never_shows(&s.pass);
        // The Formatting line is qemu-img's.
        let twin = s.join(&format!("c{i}.qcow2.qemu"));
        let q = run(
            "qemu-img",
            [
                "create",
                "-f",
                "qcow2",
                "--object",
                &secret,
                "-o",
                &o,
                twin.to_str().unwrap(),
                &SIZE.to_string(),
            ],
            Some(s.path()),
        )
        .ok();
        assert_eq!(
            made.stdout,
            q.stdout.replace(".qcow2.qemu'", ".qcow2'"),
            "Formatting line"
        );
        qemu_check(&s, &image);
        check_info(&s, &image);
        // cryptvm writes; QEMU reads.
        let data = model();
        s.write("src.raw", &data);
        s.cryptvm_writes("src.raw", &opts(&image));
        qemu_check(&s, &image);
        cryptvm(s.path(), ["img", "check", image.to_str().unwrap()]).ok();
        let seen = to_raw(&s, "qemu-img", &image, "seen.raw");
        assert_same_bytes(
            &seen,
            &data,
            &format!("QEMU's view of cryptvm's writes ({spec})"),
        );
        qemu_io(
            &secret,
            &opts(&image),
            &[
                format!("read -P 0x5a 0 {}", 64 << 10),
                format!("read -P 0 {} {}", 128 << 10, 64 << 10),
                format!("read -P 0x11 {} 511", SIZE - 511),
            ],
        );
        // QEMU writes over cryptvm's clusters; cryptvm reads.
        qemu_io(
            &secret,
            &opts(&image),
            &["write -P 0x77 4096 1000".to_string()],
        );
        let mut data = data;
        data[4096..5096].fill(0x77);
        let got = to_raw(&s, "cryptvm", &image, "got.raw");
        assert_same_bytes(&got, &data, "cryptvm's view after qemu-io's write");
    }
}

#[test]
fn convert_to_encrypted_qcow2() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("q2lv");
    let data = model();
    s.write("src.raw", &data);
    let secret = s.secret_object();
    cryptvm(
        s.path(),
        [
            "img",
            "convert",
            "--object",
            &secret,
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            "src.raw",
            "out.qcow2",
        ],
    )
    .ok()
    .never_shows(&s.pass);
    let out = s.join("out.qcow2");
    qemu_check(&s, &out);
    let seen = to_raw(&s, "qemu-img", &out, "seen.raw");
    assert_same_bytes(&seen, &data, "QEMU's view of the converted image");
    // Compression and encryption together are refused, as qemu-img refuses them.
    let r = cryptvm(
        s.path(),
        [
            "img",
            "convert",
            "--object",
            &secret,
            "-c",
            "-O",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            "src.raw",
            "out2.qcow2",
        ],
    );
    r.clean_error(1, &["Compression and encryption"]);
}

/// stderr of a failed command without the program name before the first colon.
fn message(r: &Run) -> String {
    assert_ne!(r.status, Some(0), "expected a failure:\n{r}");
    r.stderr
        .split_once(": ")
        .map(|(_, m)| m.to_string())
        .unwrap_or_default()
}

#[test]
fn wrong_or_missing_key_gets_qemus_error() {
    if !require(&["qemu-img"]) {
        return;
    }
    let s = Scratch::new("q2lk");
    let secret = s.secret_object();
    run(
        "qemu-img",
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            &secret,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            "k.qcow2",
            "1M",
        ],
        Some(s.path()),
    )
    .ok();
    std::fs::write(s.join("bad.txt"), "not-the-passphrase").unwrap();
    let bad = format!("secret,id=sec0,file={}", s.join("bad.txt").display());
    let image_opts = "driver=qcow2,encrypt.key-secret=sec0,file.filename=k.qcow2";
    let cases: Vec<Vec<&str>> = vec![
        vec![
            "convert",
            "--object",
            &bad,
            "--image-opts",
            image_opts,
            "-O",
            "raw",
            "o.raw",
        ],
        vec!["convert", "k.qcow2", "-O", "raw", "o.raw"],
        vec![
            "convert",
            "--object",
            &secret,
            "--image-opts",
            "driver=qcow2,encrypt.format=aes,encrypt.key-secret=sec0,file.filename=k.qcow2",
            "-O",
            "raw",
            "o.raw",
        ],
    ];
    for args in cases {
        let q = run("qemu-img", &args, Some(s.path()));
        let c = cryptvm(s.path(), std::iter::once("img").chain(args.iter().copied()));
        assert_eq!(message(&c), message(&q), "\n{c}\n{q}");
        c.never_shows(&s.pass);
    }
}

#[test]
fn legacy_aes_is_read_never_created() {
    if !require(&["qemu-img", "qemu-io"]) {
        return;
    }
    let s = Scratch::new("q2la");
    let secret = s.secret_object();
    // qemu-img still makes them; cryptvm reads them but never makes them.
    run(
        "qemu-img",
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            &secret,
            "-o",
            "encrypt.format=aes,encrypt.key-secret=sec0",
            "aes.qcow2",
            &SIZE.to_string(),
        ],
        Some(s.path()),
    )
    .ok();
    let image = s.join("aes.qcow2");
    qemu_writes(&s, &image);
    let want = to_raw(&s, "qemu-img", &image, "want.raw");
    assert_same_bytes(&want, &model(), "qemu-img's view vs the model");
    let got = to_raw(&s, "cryptvm", &image, "got.raw");
    assert_same_bytes(&got, &want, "cryptvm's view of the AES image");
    check_info(&s, &image);
    let r = cryptvm(
        s.path(),
        [
            "img",
            "create",
            "-f",
            "qcow2",
            "--object",
            &secret,
            "-o",
            "encrypt.format=aes,encrypt.key-secret=sec0",
            "new.qcow2",
            "1M",
        ],
    );
    r.clean_error(1, &["encrypt.format=aes"]);
    assert!(!s.join("new.qcow2").exists());
}
