//! Helpers shared by the integration tests in `tests/<purpose>/*.rs`.
//!
//! Each test file includes this module with `#[path = "../common/mod.rs"] mod common;`
//! and is built as an integration-test target of the `vmm` package, so that
//! `CARGO_BIN_EXE_cryptvm` names the binary under test.
//!
//! Expected values never come from cryptvm itself: they come from the peer tools
//! (`qemu-img`, `qemu-io`, QEMU's QMP `blockdev-create`, `cryptsetup`, `openssl`) or from
//! patterns computed here.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub const CRYPTVM: &str = env!("CARGO_BIN_EXE_cryptvm");

/// A command that runs longer than this is killed and fails its test.
const TIMEOUT: Duration = Duration::from_secs(300);

/// Size of a disk sector, the unit of LUKS1 offsets and of IV generation.
pub const SECTOR: usize = 512;

/// The workspace root (the folder holding `resources/` and `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm/ has a parent")
        .to_path_buf()
}

/// The outcome of one command.
pub struct Run {
    /// The command line, for messages.
    pub cmd: String,
    /// Exit status; `None` when killed by a signal.
    pub status: Option<i32>,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "$ {}", self.cmd)?;
        writeln!(f, "exit status: {:?}", self.status)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}

impl Run {
    /// Asserts exit status 0 and returns self.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.status, Some(0), "command failed:\n{self}");
        self
    }

    /// Asserts a failure the way the interface contract wants it: the given exit status,
    /// exactly one non-empty line on stderr that mentions one of `mentions`
    /// (case-insensitive), and no panic.
    #[track_caller]
    pub fn clean_error(&self, code: i32, mentions: &[&str]) {
        assert_eq!(self.status, Some(code), "wrong exit status:\n{self}");
        assert!(
            !self.stderr.contains("panicked") && !self.stdout.contains("panicked"),
            "cryptvm panicked:\n{self}"
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert!(
            lines.len() == 1 && !lines[0].trim().is_empty(),
            "expected exactly one error line on stderr:\n{self}"
        );
        let line = lines[0].to_lowercase();
        assert!(
            mentions.iter().any(|m| line.contains(&m.to_lowercase())),
            "the error should mention one of {mentions:?}:\n{self}"
        );
    }

    /// Asserts that neither stdout nor stderr contains `secret`.
    #[track_caller]
    pub fn never_shows(&self, secret: &str) {
        assert!(
            !self.stdout.contains(secret) && !self.stderr.contains(secret),
            "the passphrase appears in the output:\n{self}"
        );
    }

    /// Parses stdout as JSON.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }
}

/// Runs `program` with `args` in `cwd` (or the current folder), with no standard input,
/// capturing its output; kills it after [`TIMEOUT`].
pub fn run<I, S>(program: &str, args: I, cwd: Option<&Path>) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let cmd = std::iter::once(program.to_string())
        .chain(args.iter().map(|a| shell_quote(&a.to_string_lossy())))
        .collect::<Vec<_>>()
        .join(" ");
    // Peer tools may live in sbin folders that a non-login PATH lacks (cryptsetup).
    let resolved = if program.contains('/') {
        PathBuf::from(program)
    } else {
        find_tool(program).unwrap_or_else(|| PathBuf::from(program))
    };
    let mut command = Command::new(resolved);
    command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd}: {e}"));
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd}: still running after {TIMEOUT:?}, killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().expect("stdout reader")).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().expect("stderr reader")).into_owned();
    Run {
        cmd,
        status: status.code(),
        stdout,
        stderr,
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=.,/:+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `cryptvm ARGS...` in `cwd`.
pub fn cryptvm<I, S>(cwd: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(CRYPTVM, args, Some(cwd))
}

/// Where `tool` is: on PATH, or in /usr/sbin or /sbin.
pub fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Whether `tool` is installed (see [`find_tool`]).
pub fn have_tool(tool: &str) -> bool {
    find_tool(tool).is_some()
}

/// Returns whether all `tools` are installed. When one is missing, a test that needs it
/// fails loudly under CI (`CI=true`) and is skipped with a note elsewhere.
pub fn require(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have_tool(t)).collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("peer tools {missing:?} are not installed (CI=true: .ci/run installs them)");
    }
    eprintln!("SKIPPED: peer tools {missing:?} are not installed");
    false
}

/// The peer tools the LUKS interop tests use.
pub const PEERS: &[&str] = &[
    "qemu-img",
    "qemu-io",
    "qemu-system-x86_64",
    "cryptsetup",
    "python3",
];

/// A scratch folder with a passphrase file in it.
pub struct Scratch {
    /// The folder (removed on drop).
    pub dir: tempfile::TempDir,
    /// The passphrase: distinctive, so that tests can check it is never printed.
    pub pass: String,
    /// `pass.txt` in `dir`, holding `pass` with no newline.
    pub pass_file: PathBuf,
}

impl Scratch {
    /// A new scratch folder whose passphrase contains `tag`.
    pub fn new(tag: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cryptvm-test-")
            .tempdir()
            .expect("creating a temporary folder");
        let pass = format!("Pw-{tag}-9f3b7c1e");
        let pass_file = dir.path().join("pass.txt");
        std::fs::write(&pass_file, &pass).expect("writing pass.txt");
        Scratch {
            dir,
            pass,
            pass_file,
        }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A path in the folder.
    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `--object` value defining secret `sec0` from the passphrase file.
    pub fn secret_object(&self) -> String {
        format!("secret,id=sec0,file={}", self.pass_file.display())
    }

    /// `cryptvm img convert -n` of the raw file `src` into the existing image
    /// `image_opts` describes (`--target-image-opts`, secret `sec0`); it must succeed.
    pub fn cryptvm_writes(&self, src: &str, image_opts: &str) -> Run {
        let secret = self.secret_object();
        cryptvm(
            self.path(),
            [
                "img",
                "convert",
                "--object",
                &secret,
                "-n",
                "-f",
                "raw",
                "--target-image-opts",
                src,
                image_opts,
            ],
        )
        .ok()
    }

    /// Writes `bytes` to `name` in the folder and returns its path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.join(name);
        std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        p
    }

    /// Creates `name` as a sparse file of `len` zero bytes and returns its path.
    pub fn sparse(&self, name: &str, len: u64) -> PathBuf {
        let p = self.join(name);
        let f = std::fs::File::create(&p).expect("creating a sparse file");
        f.set_len(len).expect("sizing a sparse file");
        p
    }
}

/// A LUKS block stack: payload file plus, if detached, a header file.
#[derive(Clone, Debug)]
pub struct Luks {
    /// The payload (for an attached header: the whole image).
    pub payload: PathBuf,
    /// The detached header, if any.
    pub header: Option<PathBuf>,
}

impl Luks {
    /// A detached-header stack.
    pub fn detached(header: &Path, payload: &Path) -> Self {
        Luks {
            payload: payload.to_path_buf(),
            header: Some(header.to_path_buf()),
        }
    }

    /// An attached-header image.
    pub fn attached(image: &Path) -> Self {
        Luks {
            payload: image.to_path_buf(),
            header: None,
        }
    }

    /// The `--image-opts` form for a payload that is a qcow2 image (`file.driver=qcow2`).
    pub fn qcow2_image_opts(&self) -> String {
        self.image_opts()
            .replacen("file.filename=", "file.driver=qcow2,file.file.filename=", 1)
    }

    /// QEMU's dotted `--image-opts` form, with key-secret `sec0`.
    pub fn image_opts(&self) -> String {
        let mut s = format!(
            "driver=luks,key-secret=sec0,file.filename={}",
            self.payload.display()
        );
        if let Some(h) = &self.header {
            s.push_str(&format!(",header.filename={}", h.display()));
        }
        s
    }

    /// The QMP blockdev options, with key-secret `sec0`.
    pub fn json(&self) -> Value {
        let mut v = serde_json::json!({
            "driver": "luks",
            "key-secret": "sec0",
            "file": { "driver": "file", "filename": self.payload },
        });
        if let Some(h) = &self.header {
            v["header"] = serde_json::json!({ "driver": "file", "filename": h });
        }
        v
    }

    /// A `json:{...}` filename.
    pub fn json_filename(&self) -> String {
        format!("json:{}", self.json())
    }

    /// The files of the stack.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut v = vec![self.payload.clone()];
        v.extend(self.header.clone());
        v
    }
}

/// A cipher/mode/ivgen/hash combination, named as QEMU's luks creation options name it.
#[derive(Clone, Copy, Debug)]
pub struct Combo {
    /// `cipher-alg`: aes-256, serpent-128, cast5-128, ...
    pub cipher_alg: &'static str,
    /// `cipher-mode`: xts, cbc, ecb, ctr.
    pub cipher_mode: &'static str,
    /// `ivgen-alg`: plain, plain64, essiv.
    pub ivgen_alg: &'static str,
    /// `ivgen-hash-alg` (essiv only).
    pub ivgen_hash_alg: Option<&'static str>,
    /// `hash-alg`: the PBKDF2/AF hash.
    pub hash_alg: &'static str,
}

impl Combo {
    /// The cipher family (`aes`), as the LUKS1 header and cryptsetup name it.
    pub fn cipher_name(&self) -> &'static str {
        self.cipher_alg.split('-').next().expect("cipher name")
    }

    /// Key bits of the block cipher (`aes-192` -> 192).
    pub fn cipher_bits(&self) -> u32 {
        self.cipher_alg
            .rsplit('-')
            .next()
            .and_then(|b| b.parse().ok())
            .expect("cipher-alg ends in its key bits")
    }

    /// Master key bits: doubled for XTS.
    pub fn key_bits(&self) -> u32 {
        self.cipher_bits() * if self.cipher_mode == "xts" { 2 } else { 1 }
    }

    /// The LUKS1 cipher-mode string, as cryptsetup takes it and the header stores it.
    pub fn mode_spec(&self) -> String {
        match self.ivgen_hash_alg {
            Some(h) => format!("{}-{}:{}", self.cipher_mode, self.ivgen_alg, h),
            None => format!("{}-{}", self.cipher_mode, self.ivgen_alg),
        }
    }

    /// cryptsetup's `--cipher` value.
    pub fn cryptsetup_cipher(&self) -> String {
        format!("{}-{}", self.cipher_name(), self.mode_spec())
    }

    /// qemu-img / cryptvm `-o` creation options for this combo.
    pub fn create_opts(&self) -> String {
        let mut s = format!(
            "cipher-alg={},cipher-mode={},ivgen-alg={},hash-alg={}",
            self.cipher_alg, self.cipher_mode, self.ivgen_alg, self.hash_alg
        );
        if let Some(h) = self.ivgen_hash_alg {
            s.push_str(&format!(",ivgen-hash-alg={h}"));
        }
        s
    }

    /// A name for messages and files.
    pub fn name(&self) -> String {
        format!("{}-{}-{}", self.cipher_alg, self.mode_spec(), self.hash_alg).replace(':', "_")
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), distinct per `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Reads a whole file.
#[track_caller]
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Asserts two byte strings are equal, reporting the first differing offset.
#[track_caller]
pub fn assert_same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: {} bytes, expected {}; first difference at offset {first} (got {:02x?}, want {:02x?})",
        got.len(),
        want.len(),
        got.get(first..(first + 16).min(got.len())).unwrap_or(&[]),
        want.get(first..(first + 16).min(want.len())).unwrap_or(&[]),
    );
}

/// The contents of every file under a folder, to check that a command left them
/// byte-identical.
pub struct Snapshot {
    root: PathBuf,
    files: BTreeMap<PathBuf, Vec<u8>>,
}

impl Snapshot {
    /// Reads every file under `root`.
    pub fn take(root: &Path) -> Self {
        let mut files = BTreeMap::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("listing a folder") {
                let path = entry.expect("folder entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let bytes = read(&path);
                    files.insert(path, bytes);
                }
            }
        }
        Snapshot {
            root: root.to_path_buf(),
            files,
        }
    }

    /// Asserts that the folder holds exactly the same files with the same bytes.
    #[track_caller]
    pub fn assert_unchanged(&self, after: &Run) {
        let now = Snapshot::take(&self.root);
        let before: Vec<_> = self.files.keys().collect();
        let later: Vec<_> = now.files.keys().collect();
        assert_eq!(before, later, "the set of files changed after:\n{after}");
        for (path, bytes) in &self.files {
            let got = &now.files[path];
            if got != bytes {
                let first = got.iter().zip(bytes).position(|(a, b)| a != b);
                panic!(
                    "{} changed (length {} -> {}, first difference at {first:?}) after:\n{after}",
                    path.display(),
                    bytes.len(),
                    got.len()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Peer tools
// ---------------------------------------------------------------------------------------

/// `qemu-io --object SECRET --image-opts OPTS -c CMD...`; asserts success and that no
/// pattern check failed.
#[track_caller]
pub fn qemu_io(secret_object: &str, image_opts: &str, cmds: &[String]) -> Run {
    let mut args = vec![
        "--object".to_string(),
        secret_object.to_string(),
        "--image-opts".to_string(),
        image_opts.to_string(),
    ];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    let r = run("qemu-io", &args, None).ok();
    assert!(
        !r.stdout.contains("failed") && !r.stderr.contains("failed") && r.stderr.is_empty(),
        "qemu-io reported a failure:\n{r}"
    );
    r
}

/// `qemu-img info --output=json` of a LUKS stack.
#[track_caller]
pub fn qemu_img_info(secret_object: &str, luks: &Luks) -> Value {
    run(
        "qemu-img",
        [
            "info",
            "--output=json",
            "--object",
            secret_object,
            "--image-opts",
            &luks.image_opts(),
        ],
        None,
    )
    .ok()
    .json()
}

/// `resources/scripts/qemu-luks-create.py`: a header made by QEMU's own LUKS code through
/// QMP `blockdev-create`. `size` is `None` for a detached header (file gets header only).
pub fn qemu_create(pass_file: &Path, target: &Path, size: Option<u64>, opts: &str) -> Run {
    let script = repo_root().join("resources/scripts/qemu-luks-create.py");
    let mut args = vec![
        script.display().to_string(),
        "--passphrase-file".into(),
        pass_file.display().to_string(),
    ];
    match size {
        None => args.extend(["--header".into(), target.display().to_string()]),
        Some(n) => args.extend([
            "--file".into(),
            target.display().to_string(),
            "--size".into(),
            n.to_string(),
        ]),
    }
    if !opts.is_empty() {
        args.extend(["-o".into(), opts.to_string()]);
    }
    run("python3", &args, None)
}

/// `cryptsetup luksFormat --type luks1 --header HEADER PAYLOAD` (or attached when `header`
/// is `None`) with `--pbkdf-force-iterations 1000`, the LUKS1 minimum, which also sets the
/// master-key digest iterations to 1000 (cryptsetup otherwise spends 125 ms on those).
pub fn cryptsetup_format(
    pass_file: &Path,
    header: Option<&Path>,
    payload: &Path,
    combo: &Combo,
) -> Run {
    let mut args: Vec<String> = vec![
        "luksFormat".into(),
        "--type".into(),
        "luks1".into(),
        "--batch-mode".into(),
        "--cipher".into(),
        combo.cryptsetup_cipher(),
        "--key-size".into(),
        combo.key_bits().to_string(),
        "--hash".into(),
        combo.hash_alg.into(),
        "--pbkdf-force-iterations".into(),
        "1000".into(),
        "--key-file".into(),
        pass_file.display().to_string(),
    ];
    if let Some(h) = header {
        args.extend(["--header".into(), h.display().to_string()]);
    }
    args.push(payload.display().to_string());
    run("cryptsetup", &args, None)
}

/// One key slot as `cryptsetup luksDump` shows it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DumpSlot {
    /// ENABLED.
    pub enabled: bool,
    /// PBKDF2 iterations (enabled slots).
    pub iterations: Option<u64>,
    /// Key material offset in sectors (enabled slots).
    pub key_material_offset: Option<u64>,
    /// AF stripes (enabled slots).
    pub stripes: Option<u64>,
}

/// A LUKS1 header as `cryptsetup luksDump` shows it.
#[derive(Clone, Debug, Default)]
pub struct Dump {
    /// Version.
    pub version: u32,
    /// Cipher name (aes).
    pub cipher_name: String,
    /// Cipher mode (xts-plain64).
    pub cipher_mode: String,
    /// Hash spec (sha256).
    pub hash_spec: String,
    /// Payload offset in sectors.
    pub payload_offset: u64,
    /// MK bits.
    pub mk_bits: u32,
    /// MK iterations.
    pub mk_iterations: u64,
    /// UUID.
    pub uuid: String,
    /// Key slots 0..8.
    pub slots: Vec<DumpSlot>,
}

/// Runs `cryptsetup luksDump` on a header file and parses it.
#[track_caller]
pub fn luks_dump(header: &Path) -> Dump {
    let r = run(
        "cryptsetup",
        [OsStr::new("luksDump"), header.as_os_str()],
        None,
    )
    .ok();
    parse_luks_dump(&r.stdout)
}

/// Parses `cryptsetup luksDump` output (LUKS1).
pub fn parse_luks_dump(text: &str) -> Dump {
    let mut d = Dump::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        let num = || value.parse::<u64>().unwrap_or(u64::MAX);
        if let Some(n) = key.strip_prefix("Key Slot ") {
            let _ = n;
            d.slots.push(DumpSlot {
                enabled: value == "ENABLED",
                ..DumpSlot::default()
            });
            continue;
        }
        match key {
            "Version" => d.version = num() as u32,
            "Cipher name" => d.cipher_name = value.into(),
            "Cipher mode" => d.cipher_mode = value.into(),
            "Hash spec" => d.hash_spec = value.into(),
            "Payload offset" => d.payload_offset = num(),
            "MK bits" => d.mk_bits = num() as u32,
            "MK iterations" => d.mk_iterations = num(),
            "UUID" => d.uuid = value.into(),
            "Iterations" => d.slots.last_mut().expect("slot").iterations = Some(num()),
            "Key material offset" => {
                d.slots.last_mut().expect("slot").key_material_offset = Some(num())
            }
            "AF stripes" => d.slots.last_mut().expect("slot").stripes = Some(num()),
            _ => {}
        }
    }
    d
}

/// `cryptsetup luksOpen --test-passphrase --header HDR --key-file KEY HDR`: checks the
/// passphrase opens a key slot, with no device-mapper.
pub fn cryptsetup_test_passphrase(header: &Path, key_file: &Path) -> Run {
    run(
        "cryptsetup",
        [
            OsStr::new("luksOpen"),
            OsStr::new("--test-passphrase"),
            OsStr::new("--header"),
            header.as_os_str(),
            OsStr::new("--key-file"),
            key_file.as_os_str(),
            header.as_os_str(),
        ],
        None,
    )
}

/// The master key, from `cryptsetup luksDump --dump-master-key`.
#[track_caller]
pub fn cryptsetup_master_key(header: &Path, key_file: &Path) -> Vec<u8> {
    let r = run(
        "cryptsetup",
        [
            OsStr::new("luksDump"),
            OsStr::new("--dump-master-key"),
            OsStr::new("--batch-mode"),
            OsStr::new("--key-file"),
            key_file.as_os_str(),
            header.as_os_str(),
        ],
        None,
    )
    .ok();
    let mut hex = String::new();
    let mut in_key = false;
    for line in r.stdout.lines() {
        if let Some(rest) = line.strip_prefix("MK dump:") {
            in_key = true;
            hex.push_str(rest);
        } else if in_key && line.starts_with(|c: char| c.is_whitespace()) {
            hex.push_str(line);
        } else {
            in_key = false;
        }
    }
    let digits: String = hex.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    assert!(!digits.is_empty(), "no MK dump in:\n{r}");
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `openssl enc -d -CIPHER -K key -iv iv -nopad` over one buffer (CBC/ECB decryption with
/// no padding) or `-e` with `encrypt`.
#[track_caller]
pub fn openssl_enc(
    cipher: &str,
    encrypt: bool,
    key: &[u8],
    iv: Option<&[u8]>,
    data: &[u8],
) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("in");
    let output = dir.path().join("out");
    std::fs::write(&input, data).expect("writing openssl input");
    let mut args: Vec<String> = vec![
        "enc".into(),
        if encrypt { "-e" } else { "-d" }.into(),
        format!("-{cipher}"),
        "-nopad".into(),
        "-K".into(),
        hex(key),
        "-in".into(),
        input.display().to_string(),
        "-out".into(),
        output.display().to_string(),
    ];
    if let Some(iv) = iv {
        args.extend(["-iv".into(), hex(iv)]);
    }
    run("openssl", &args, None).ok();
    read(&output)
}

/// SHA-256 with `openssl dgst`.
#[track_caller]
pub fn openssl_sha256(data: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("in");
    let output = dir.path().join("out");
    std::fs::write(&input, data).expect("writing openssl input");
    run(
        "openssl",
        [
            OsStr::new("dgst"),
            OsStr::new("-sha256"),
            OsStr::new("-binary"),
            OsStr::new("-out"),
            output.as_os_str(),
            input.as_os_str(),
        ],
        None,
    )
    .ok();
    read(&output)
}

// ---------------------------------------------------------------------------------------
// qcow2
// ---------------------------------------------------------------------------------------

/// Reads a big-endian `u32` at `at` (qcow2 header fields are big-endian).
pub fn get_be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

/// Reads a big-endian `u64` at `at`.
pub fn get_be64(buf: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

/// Writes a big-endian `u16` at `at`.
pub fn put_be16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Writes a big-endian `u32` at `at`.
pub fn put_be32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Writes a big-endian `u64` at `at`.
pub fn put_be64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Byte offsets of the qcow2 header fields, from QEMU's `docs/interop/qcow2.txt`.
pub mod qcow2_header {
    /// "QFI\xfb".
    pub const MAGIC: usize = 0;
    /// 2 or 3 (u32).
    pub const VERSION: usize = 4;
    /// Offset of the backing file name (u64).
    pub const BACKING_FILE_OFFSET: usize = 8;
    /// Length of the backing file name (u32).
    pub const BACKING_FILE_SIZE: usize = 16;
    /// log2 of the cluster size (u32).
    pub const CLUSTER_BITS: usize = 20;
    /// Virtual size (u64).
    pub const SIZE: usize = 24;
    /// Entries of the active L1 table (u32).
    pub const L1_SIZE: usize = 36;
    /// Offset of the active L1 table (u64).
    pub const L1_TABLE_OFFSET: usize = 40;
    /// Offset of the refcount table (u64).
    pub const REFCOUNT_TABLE_OFFSET: usize = 48;
    /// Clusters of the refcount table (u32).
    pub const REFCOUNT_TABLE_CLUSTERS: usize = 56;
    /// Internal snapshots (u32).
    pub const NB_SNAPSHOTS: usize = 60;
    /// Offset of the snapshot table (u64).
    pub const SNAPSHOTS_OFFSET: usize = 64;
    /// Incompatible feature bits (u64, v3).
    pub const INCOMPATIBLE_FEATURES: usize = 72;
    /// Compatible feature bits (u64, v3).
    pub const COMPATIBLE_FEATURES: usize = 80;
    /// Autoclear feature bits (u64, v3).
    pub const AUTOCLEAR_FEATURES: usize = 88;
    /// log2 of the refcount width (u32, v3).
    pub const REFCOUNT_ORDER: usize = 96;
    /// Length of the header structure (u32, v3).
    pub const HEADER_LENGTH: usize = 100;
    /// Incompatible feature bit 0: refcounts may be stale (lazy refcounts).
    pub const INCOMPAT_DIRTY: u64 = 1;
    /// Incompatible feature bit 1: the image is marked corrupt.
    pub const INCOMPAT_CORRUPT: u64 = 2;
    /// L1/L2 entry flag: the cluster's refcount is exactly 1.
    pub const OFLAG_COPIED: u64 = 1 << 63;
    /// L2 entry flag: the cluster is compressed.
    pub const OFLAG_COMPRESSED: u64 = 1 << 62;
    /// L2 entry flag (v3): the cluster reads as zeros.
    pub const OFLAG_ZERO: u64 = 1;
    /// Host offset bits of a standard L1 or L2 entry.
    pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
}

/// The metadata locations of a qcow2 file, read from its header and L1 table.
#[derive(Clone, Debug)]
pub struct Qcow2Layout {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size.
    pub size: u64,
    /// Offset of the L1 table.
    pub l1_offset: u64,
    /// Entries of the L1 table.
    pub l1_size: u32,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
}

impl Qcow2Layout {
    /// Parses the header of a qcow2 image held in `img`.
    #[track_caller]
    pub fn parse(img: &[u8]) -> Self {
        use qcow2_header as h;
        assert_eq!(&img[..4], b"QFI\xfb", "not a qcow2 image");
        let version = get_be32(img, h::VERSION);
        Qcow2Layout {
            cluster_bits: get_be32(img, h::CLUSTER_BITS),
            size: get_be64(img, h::SIZE),
            l1_offset: get_be64(img, h::L1_TABLE_OFFSET),
            l1_size: get_be32(img, h::L1_SIZE),
            refcount_table_offset: get_be64(img, h::REFCOUNT_TABLE_OFFSET),
            refcount_order: if version >= 3 {
                get_be32(img, h::REFCOUNT_ORDER)
            } else {
                4
            },
        }
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The file offset of the L2 entry that maps guest offset `guest` (standard L2
    /// entries of 8 bytes), or `None` when its L2 table is not allocated.
    pub fn l2_entry_pos(&self, img: &[u8], guest: u64) -> Option<usize> {
        use qcow2_header as h;
        let per_l2 = self.cluster_size() / 8;
        let cluster = guest >> self.cluster_bits;
        let l1_index = cluster / per_l2;
        let l1_entry = get_be64(img, (self.l1_offset + 8 * l1_index) as usize);
        let l2 = l1_entry & h::OFFSET_MASK;
        (l2 != 0).then(|| (l2 + 8 * (cluster % per_l2)) as usize)
    }

    /// The file offset of the refcount entry of host cluster `index`, for 16-bit
    /// refcounts (QEMU's default).
    #[track_caller]
    pub fn refcount16_pos(&self, img: &[u8], index: u64) -> usize {
        assert_eq!(self.refcount_order, 4, "16-bit refcounts expected");
        let per_block = self.cluster_size() / 2;
        let block = get_be64(
            img,
            (self.refcount_table_offset + 8 * (index / per_block)) as usize,
        );
        assert!(block != 0, "no refcount block for cluster {index}");
        (block + 2 * (index % per_block)) as usize
    }
}

/// One request as qemu-io runs it, which tests also apply to an in-memory model of the
/// disk to know what it must read back.
#[derive(Clone, Copy, Debug)]
pub enum IoOp {
    /// `write -P BYTE OFFSET LEN`.
    Write(u8, u64, u64),
    /// `write -z OFFSET LEN`: reads back as zeros.
    Zero(u64, u64),
    /// `discard OFFSET LEN`. Only whole clusters are discarded; the model treats them as
    /// reading zeros, which holds for v3 images (zero flag over a backing file) and for
    /// images without a backing file. Tests use cluster-aligned ranges.
    Discard(u64, u64),
}

impl IoOp {
    /// The qemu-io command.
    pub fn command(&self) -> String {
        match *self {
            IoOp::Write(b, off, len) => format!("write -P {b:#04x} {off} {len}"),
            IoOp::Zero(off, len) => format!("write -z {off} {len}"),
            IoOp::Discard(off, len) => format!("discard {off} {len}"),
        }
    }

    /// Applies the request to `model`.
    pub fn apply(&self, model: &mut [u8]) {
        match *self {
            IoOp::Write(b, off, len) => model[off as usize..(off + len) as usize].fill(b),
            IoOp::Zero(off, len) | IoOp::Discard(off, len) => {
                model[off as usize..(off + len) as usize].fill(0)
            }
        }
    }
}

/// `qemu-io -f FMT FILE -c CMD...` in `cwd`; asserts success and that no pattern check
/// failed.
#[track_caller]
pub fn qemu_io_file(cwd: &Path, fmt: &str, file: &str, cmds: &[String]) -> Run {
    let mut args = vec!["-f".to_string(), fmt.to_string(), file.to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    let r = run("qemu-io", &args, Some(cwd)).ok();
    assert!(
        !r.stdout.contains("failed") && !r.stderr.contains("failed") && r.stderr.is_empty(),
        "qemu-io reported a failure:\n{r}"
    );
    r
}

/// Runs `ops` through qemu-io on `file` and applies them to `model`.
#[track_caller]
pub fn qemu_io_ops(cwd: &Path, fmt: &str, file: &str, ops: &[IoOp], model: &mut [u8]) {
    let cmds: Vec<String> = ops.iter().map(IoOp::command).collect();
    qemu_io_file(cwd, fmt, file, &cmds);
    for op in ops {
        op.apply(model);
    }
}

/// qemu-io `read -P` commands that check every run of equal bytes of at least
/// `min_run` bytes in `model`.
pub fn read_pattern_cmds(model: &[u8], min_run: usize) -> Vec<String> {
    let mut cmds = Vec::new();
    let mut start = 0;
    while start < model.len() {
        let b = model[start];
        let end = model[start..]
            .iter()
            .position(|&x| x != b)
            .map_or(model.len(), |n| start + n);
        if end - start >= min_run {
            cmds.push(format!("read -P {b:#04x} {start} {}", end - start));
        }
        start = end;
    }
    cmds
}

/// `qemu-img check --output=json [-f qcow2] FILE` in `cwd`: the exit status and the
/// report.
#[track_caller]
pub fn qemu_img_check(cwd: &Path, file: &str) -> (Option<i32>, Value) {
    let r = run(
        "qemu-img",
        ["check", "--output=json", "-f", "qcow2", file],
        Some(cwd),
    );
    let v = r.json();
    (r.status, v)
}

/// Asserts that `qemu-img check` finds no errors and no leaks in `file`.
#[track_caller]
pub fn assert_qemu_check_clean(cwd: &Path, file: &str) {
    let r = run("qemu-img", ["check", "-f", "qcow2", file], Some(cwd));
    assert!(
        r.status == Some(0) && r.stdout.contains("No errors were found on the image."),
        "qemu-img check finds problems in {file}:\n{r}"
    );
}

/// `qemu-img compare` of two images in `cwd`; asserts they are identical.
#[track_caller]
pub fn assert_qemu_identical(cwd: &Path, fmt1: &str, file1: &str, fmt2: &str, file2: &str) {
    let r = run(
        "qemu-img",
        ["compare", "-f", fmt1, "-F", fmt2, file1, file2],
        Some(cwd),
    );
    assert_eq!(
        r.status,
        Some(0),
        "qemu-img compare: {file1} and {file2} differ:\n{r}"
    );
}

/// The QMP blockdev options of a qcow2 node over a file.
pub fn qcow2_json(file: &Path) -> Value {
    serde_json::json!({
        "driver": "qcow2",
        "file": { "driver": "file", "filename": file },
    })
}

/// Runs `cryptvm ARGS...` in `cwd` killed after `limit`, with its address space capped
/// at `max_address_space` bytes (`prlimit --as`) and no core file, so that a huge
/// allocation or a loop shows as a failure rather than a stuck or swapping machine.
/// Without `prlimit` only the time limit applies.
#[track_caller]
pub fn cryptvm_limited<I, S>(cwd: &Path, args: I, limit: Duration, max_address_space: u64) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut full: Vec<std::ffi::OsString> = vec![
        "-s".into(),
        "KILL".into(),
        format!("{}", limit.as_secs().max(1)).into(),
    ];
    if have_tool("prlimit") {
        full.extend([
            "prlimit".into(),
            format!("--as={max_address_space}").into(),
            "--core=0".into(),
            "--".into(),
        ]);
    }
    full.push(CRYPTVM.into());
    full.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
    let r = run("timeout", &full, Some(cwd));
    assert!(
        r.status != Some(137) && r.status != Some(124),
        "cryptvm ran longer than {limit:?} and was killed:\n{r}"
    );
    r
}

/// The header extensions of a v3 image: (type, data), up to the end marker.
pub fn qcow2_extensions(b: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut at = get_be32(b, qcow2_header::HEADER_LENGTH) as usize;
    let mut out = Vec::new();
    loop {
        let (kind, len) = (get_be32(b, at), get_be32(b, at + 4) as usize);
        if kind == 0 {
            return out;
        }
        out.push((kind, b[at + 8..at + 8 + len].to_vec()));
        at += 8 + len.div_ceil(8) * 8;
    }
}

/// Rewrites the header extensions of an image with no backing file name (which would
/// follow them); qemu-img images have room up to the end of the first cluster.
pub fn set_qcow2_extensions(b: &mut [u8], exts: &[(u32, Vec<u8>)]) {
    let mut at = get_be32(b, qcow2_header::HEADER_LENGTH) as usize;
    for (kind, data) in exts {
        put_be32(b, at, *kind);
        put_be32(b, at + 4, data.len() as u32);
        let padded = data.len().div_ceil(8) * 8;
        b[at + 8..at + 8 + padded].fill(0);
        b[at + 8..at + 8 + data.len()].copy_from_slice(data);
        at += 8 + padded;
    }
    b[at..at + 8].fill(0);
}

/// A luks disk of `size` bytes in `scratch`: a detached header `disk.header` made by
/// QEMU's LUKS code (iter-time 10 ms, as the VMM unlocks it inside the TCG test host)
/// over a qcow2 payload `disk.qcow2`.
pub fn detached_luks_qcow2(scratch: &Scratch, size: u64) -> Luks {
    let header = scratch.join("disk.header");
    let made = qemu_create(&scratch.pass_file, &header, None, "iter-time=10");
    assert_eq!(made.status, Some(0), "qemu-luks-create.py:\n{made}");
    let size = size.to_string();
    run(
        "qemu-img",
        ["create", "-q", "-f", "qcow2", "disk.qcow2", size.as_str()],
        Some(scratch.path()),
    )
    .ok();
    Luks::detached(&header, &scratch.join("disk.qcow2"))
}

/// The plain contents of the image `image_opts` describes, by `qemu-img convert -O raw`
/// into `dir` (the file is removed again).
pub fn plain_view(dir: &Path, secret: &str, image_opts: &str) -> Vec<u8> {
    let plain = dir.join("plain.raw");
    let target = plain.display().to_string();
    run(
        "qemu-img",
        [
            "convert",
            "--object",
            secret,
            "--image-opts",
            image_opts,
            "-O",
            "raw",
            target.as_str(),
        ],
        None,
    )
    .ok();
    let data = read(&plain);
    std::fs::remove_file(&plain).expect("removing plain.raw");
    data
}

/// Two folders holding the same images, `theirs` for qemu-img and `ours` for cryptvm,
/// so that both tools run the same commands on the same file names.
pub struct ImagePair {
    /// The scratch folder holding both.
    pub s: Scratch,
}

impl ImagePair {
    /// Runs `make` in `theirs`, then copies what it made into `ours`.
    pub fn copied(tag: &str, make: impl Fn(&Path)) -> Self {
        let s = Scratch::new(tag);
        let theirs = s.join("theirs");
        std::fs::create_dir(&theirs).expect("mkdir");
        make(&theirs);
        let ours = s.join("ours");
        std::fs::create_dir(&ours).expect("mkdir");
        for e in std::fs::read_dir(&theirs).expect("readdir") {
            let e = e.expect("entry");
            std::fs::copy(e.path(), ours.join(e.file_name())).expect("copy");
        }
        ImagePair { s }
    }

    /// Runs `make` in each folder (made twice rather than copied: a copy may lose the
    /// allocated zero blocks qemu-img leaves, which `measure` and `map` see).
    pub fn made_twice(tag: &str, make: impl Fn(&Path)) -> Self {
        let s = Scratch::new(tag);
        for side in ["theirs", "ours"] {
            let d = s.join(side);
            std::fs::create_dir(&d).expect("mkdir");
            make(&d);
        }
        ImagePair { s }
    }

    /// cryptvm's folder.
    pub fn ours(&self) -> PathBuf {
        self.s.join("ours")
    }

    /// qemu-img's folder.
    pub fn theirs(&self) -> PathBuf {
        self.s.join("theirs")
    }
}

/// A minimal ELF64 kernel with a PVH entry note whose code halts forever
/// (`1: hlt; jmp 1b`), so the VM keeps running without using the CPU.
pub fn halting_kernel() -> Vec<u8> {
    pvh_kernel(&[0xf4, 0xeb, 0xfd])
}

/// A minimal ELF64 kernel with a PVH entry note: `code` runs in 32-bit protected mode at
/// 16 MiB, no interrupts, nothing else set up.
pub fn pvh_kernel(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x100_0000;
    let mut note = Vec::new();
    note.extend(4u32.to_le_bytes()); // name size
    note.extend(4u32.to_le_bytes()); // descriptor size
    note.extend(18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend(b"Xen\0");
    note.extend((LOAD as u32).to_le_bytes());
    let data = 64 + 56 * 2u64;
    let mut f = Vec::new();
    f.extend(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend(2u16.to_le_bytes()); // ET_EXEC
    f.extend(62u16.to_le_bytes()); // x86-64
    f.extend(1u32.to_le_bytes());
    f.extend(LOAD.to_le_bytes()); // entry
    f.extend(64u64.to_le_bytes()); // program headers
    f.extend(0u64.to_le_bytes());
    f.extend(0u32.to_le_bytes());
    f.extend(64u16.to_le_bytes());
    f.extend(56u16.to_le_bytes());
    f.extend(2u16.to_le_bytes());
    f.extend([0u8; 6]);
    let mut phdr = |ty: u32, off: u64, addr: u64, len: u64| {
        f.extend(ty.to_le_bytes());
        f.extend(5u32.to_le_bytes());
        for v in [off, addr, addr, len, len, 8] {
            f.extend(v.to_le_bytes());
        }
    };
    phdr(1, data, LOAD, code.len() as u64); // PT_LOAD
    phdr(4, data + code.len() as u64, 0, note.len() as u64); // PT_NOTE
    f.extend(code);
    f.extend(note);
    f
}

/// stderr lines without the program's `prefix` and without the "Try ... --help" hint.
pub fn stderr_messages(stderr: &str, prefix: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| !l.starts_with("Try '"))
        .map(|l| l.strip_prefix(prefix).unwrap_or(l).to_string())
        .collect()
}

/// `qemu-img ARGS` in `dir`; asserts success.
#[track_caller]
pub fn qemu_img_ok(dir: &Path, args: &[&str]) {
    run("qemu-img", args, Some(dir)).ok();
}

/// `qemu-io -f FMT -c CMD... FILE` in `dir`; asserts success and no failed command
/// (a `read -P` that finds other bytes).
#[track_caller]
pub fn qemu_io_cmds(dir: &Path, fmt: &str, file: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(file);
    let r = run("qemu-io", &args, Some(dir)).ok();
    assert!(!r.stdout.contains("failed"), "qemu-io {cmds:?}:\n{r}");
}

/// `cryptvm run`'s standard error without the warning it prints on a machine
/// without hardware virtualisation (vmm/src/vstate/hw_virt.rs).
pub fn without_slow_kvm_warning(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| !l.starts_with("cryptvm: warning: this CPU has no hardware virtualisation"))
        .map(|l| format!("{l}\n"))
        .collect()
}
