//! End-to-end harness: boots the test guest (resources/guest/) under a VMM and returns
//! what its console said.
//!
//! Included by the e2e test files with `#[path = "harness.rs"] mod harness;`.
//!
//! ```ignore
//! let out = Scenario::new("boot-2cpus").vmm(Vmm::Qemu).cpus(2).kernel(Kernel::Elf).run();
//! let marker = out.marker();
//! ```
//!
//! Two modes run the same scenario:
//! - **direct**: the VMM runs here, on this machine's `/dev/kvm`, when that is fast
//!   (hardware virtualisation). Decided by [`kvm_is_fast`], which times a tiny real-mode
//!   guest loop; `CRYPTVM_E2E_MODE=direct|nested` overrides.
//! - **nested**: otherwise (this project's machines have a software KVM, ~1000x slower for
//!   guest kernel code) the VMM runs inside an L1 "test host": QEMU TCG with nested SVM
//!   (`-cpu EPYC,+svm,+npt`) booting the same Debian kernel with an initramfs
//!   (resources/testhost/pack.sh) that loads kvm-amd and carries the VMM binary with its
//!   libraries, the guest, the scenario's files and a generated run script. The results
//!   come back as a tar archive on L1's first virtio disk and on L1's serial console
//!   (resources/testhost/launch.sh).
//!
//! A scenario's guest script becomes `/scenario.sh` in the guest's initramfs (an extra
//! newc archive appended to the cached one); the guest's /init (resources/guest/init)
//! prints `CRYPTVM-GUEST-UP ...`, runs it, prints `CRYPTVM-SCENARIO-END rc=N` and powers
//! off. Set `CRYPTVM_E2E_KEEP=1` to keep each run's folder (its path is printed).

// Each test binary uses a different subset of the harness.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The cryptvm binary built for these tests.
pub const CRYPTVM: &str = env!("CARGO_BIN_EXE_cryptvm");

/// The VMM that boots the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vmm {
    /// `qemu-system-x86_64 -enable-kvm -M pc` (QEMU 10), the reference peer.
    Qemu,
    /// `cryptvm run`, the product.
    Cryptvm,
}

impl Vmm {
    /// The VMM named by `CRYPTVM_E2E_VMM` (`qemu` or `cryptvm`), else `default`.
    pub fn from_env_or(default: Vmm) -> Vmm {
        match std::env::var("CRYPTVM_E2E_VMM").ok().as_deref() {
            Some("qemu") => Vmm::Qemu,
            Some("cryptvm") => Vmm::Cryptvm,
            Some(other) if !other.is_empty() => {
                panic!("CRYPTVM_E2E_VMM={other}: expected qemu or cryptvm")
            }
            _ => default,
        }
    }
}

/// Which form of the guest kernel the VMM loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// The Debian package's bzImage (`vmlinuz`).
    BzImage,
    /// The ELF `vmlinux` extracted from it (entered through its PVH note).
    Elf,
}

/// Where the VMM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// On this machine's `/dev/kvm`.
    Direct,
    /// Inside the QEMU TCG test host (L1).
    Nested,
}

/// One guest boot: which VMM, kernel, vCPUs, and what the guest runs.
#[derive(Clone, Debug)]
pub struct Scenario {
    name: String,
    vmm: Vmm,
    kernel: Kernel,
    cpus: u32,
    memory_mib: u32,
    guest_script: Option<String>,
    baked: Option<String>,
    files: Vec<(PathBuf, String)>,
    vmm_args: Vec<String>,
    vmm_env: Vec<(String, String)>,
    cmdline_extra: String,
    timeout: Duration,
    mode: Option<Mode>,
    return_files: bool,
    return_max_mib: u64,
    qmp: Option<Qmp>,
    driver: Option<String>,
    host_driver: Option<Vec<String>>,
}

/// Where the VMM's QMP server listens ([`Scenario::qmp`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qmp {
    /// A Unix socket next to the VMM (`qmp.sock` in the run folder; `/tmp/qmp.sock` in
    /// L1): `cryptvm run --qmp PATH`, `-qmp unix:PATH,server=on,wait=off`.
    Unix,
    /// TCP, reachable from this machine at `127.0.0.1:PORT` (a free port): in direct mode
    /// the VMM listens there; in nested mode it listens on port [`L1_QMP_PORT`] of all of
    /// L1's addresses and L1's user-mode network forwards the host port to it (pack.sh
    /// --net, launch.sh --hostfwd). `cryptvm run --qmp tcp:HOST:PORT`,
    /// `-qmp tcp:HOST:PORT,server=on,wait=off`.
    Tcp,
}

/// Files up to this size come back in [`Outcome::out_files`] unless
/// [`Scenario::return_files_up_to`] raises it.
const DEFAULT_RETURN_MAX_MIB: u64 = 16;

/// The port of L1 that a [`Qmp::Tcp`] VMM listens on in nested mode.
pub const L1_QMP_PORT: u16 = 4444;

/// What a scenario produced.
pub struct Outcome {
    /// Direct or nested.
    pub mode: Mode,
    /// The test host's (L1) serial console; empty in direct mode.
    pub console: String,
    /// The guest's (L2) serial console: the VMM's standard output.
    pub l2_console: String,
    /// The VMM's standard error.
    pub vmm_stderr: String,
    /// The VMM's exit status; `None` when it was killed or never reported one.
    pub exit_code: Option<i32>,
    /// Files the run left: in nested mode, L1's `/out` (which the run script may add
    /// to); in direct mode, the run folder. Keys are paths relative to that folder.
    pub out_files: BTreeMap<String, Vec<u8>>,
    /// Wall time of the whole run (L1 boot and teardown included in nested mode).
    pub elapsed: Duration,
    /// The VMM's run time as measured where it ran (inside L1 in nested mode).
    pub vmm_seconds: Option<f64>,
    /// The command line that ran the VMM, for messages.
    pub command: String,
    /// What the [`Scenario::driver`] script printed (stdout and stderr).
    pub driver_log: String,
    /// The driver script's exit status (`None`: no driver, or it never reported one).
    pub driver_rc: Option<i32>,
    /// What the [`Scenario::host_driver`] program printed (stdout and stderr).
    pub host_log: String,
    /// The host driver's exit status (`None`: no host driver, or killed).
    pub host_rc: Option<i32>,
    _dir: Option<tempfile::TempDir>,
}

/// The fields of the guest's `CRYPTVM-GUEST-UP key=value ...` line.
#[derive(Debug, Clone)]
pub struct Marker(pub BTreeMap<String, String>);

impl Marker {
    /// The value of `key`, or "" when absent.
    pub fn get(&self, key: &str) -> &str {
        self.0.get(key).map(String::as_str).unwrap_or("")
    }
}

impl Scenario {
    /// A scenario named `name` (used in messages and folder names): cryptvm, bzImage,
    /// 1 vCPU, 256 MiB, the guest's baked-in `boot` scenario, 150 s time limit.
    pub fn new(name: &str) -> Self {
        Scenario {
            name: name.to_string(),
            vmm: Vmm::Cryptvm,
            kernel: Kernel::BzImage,
            cpus: 1,
            memory_mib: 256,
            guest_script: None,
            baked: Some("boot".to_string()),
            files: Vec::new(),
            vmm_args: Vec::new(),
            vmm_env: Vec::new(),
            cmdline_extra: String::new(),
            timeout: Duration::from_secs(150),
            mode: None,
            return_files: false,
            return_max_mib: DEFAULT_RETURN_MAX_MIB,
            qmp: None,
            driver: None,
            host_driver: None,
        }
    }

    /// The VMM to boot the guest with.
    pub fn vmm(mut self, vmm: Vmm) -> Self {
        self.vmm = vmm;
        self
    }

    /// The kernel form to load.
    pub fn kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// Number of vCPUs.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Guest RAM in MiB.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// A shell script the guest runs (as `/scenario.sh`) after the marker line, instead
    /// of a baked-in scenario. Its exit status is printed as `CRYPTVM-SCENARIO-END rc=N`.
    pub fn guest_script(mut self, script: &str) -> Self {
        self.guest_script = Some(script.to_string());
        self.baked = None;
        self
    }

    /// Runs the guest's baked-in `/scenarios/NAME.sh` (resources/guest/scenarios/).
    pub fn baked(mut self, name: &str) -> Self {
        self.baked = Some(name.to_string());
        self.guest_script = None;
        self
    }

    /// Host files the VMM needs (disk images, configs): each `(source, name)` is placed
    /// in the run's files folder, which VMM arguments name as `@FILES@/name`.
    pub fn files<I, P>(mut self, files: I) -> Self
    where
        I: IntoIterator<Item = (P, String)>,
        P: Into<PathBuf>,
    {
        self.files
            .extend(files.into_iter().map(|(p, n)| (p.into(), n)));
        self
    }

    /// Extra VMM arguments, appended; `@FILES@` stands for the files folder.
    pub fn vmm_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.vmm_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Environment variables of the VMM process alone (in nested mode set by `env` in
    /// L1's run script; the command in messages shows them).
    pub fn vmm_env<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        self.vmm_env
            .extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Extra words for the guest kernel's command line.
    pub fn cmdline(mut self, extra: &str) -> Self {
        self.cmdline_extra = extra.to_string();
        self
    }

    /// Time limit of the whole run.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Brings the files folder back after the run (disk images the guest wrote): they
    /// appear in [`Outcome::out_files`] as `files/NAME` in both modes (in nested mode
    /// L1 copies them into its `/out`). Files over 16 MiB are not read back unless
    /// [`Scenario::return_files_up_to`] says otherwise.
    pub fn return_files(mut self) -> Self {
        self.return_files = true;
        self
    }

    /// [`Scenario::return_files`], reading back files of up to `mib` MiB (in nested mode
    /// L1's result disk then has room for several of them).
    pub fn return_files_up_to(mut self, mib: u64) -> Self {
        self.return_files = true;
        self.return_max_mib = mib.max(DEFAULT_RETURN_MAX_MIB);
        self
    }

    /// The size of L1's result disk (launch.sh --out-size): room for the logs and for a
    /// few files of the largest size that is read back.
    fn out_disk_mib(&self) -> u64 {
        64 + 2 * self.return_max_mib
    }

    /// Gives the VMM a QMP server (see [`Qmp`]).
    pub fn qmp(mut self, qmp: Qmp) -> Self {
        self.qmp = Some(qmp);
        self
    }

    /// A shell script that runs next to the VMM (inside L1 in nested mode), started right
    /// after the VMM, with:
    /// - `CRYPTVM_QMP`: the QMP address as `cryptvm run --qmp` takes it (socket path or
    ///   `tcp:HOST:PORT`);
    /// - `CRYPTVM_CTL`: `cryptvm ctl --socket ADDRESS` (cryptvm is carried into L1 for
    ///   this, whatever the VMM);
    /// - `CRYPTVM_CONSOLE`: the file the guest's console goes to, as it is written;
    /// - `CRYPTVM_VMM_PID`, `CRYPTVM_FILES` (the files folder), `CRYPTVM_OUT` (a folder
    ///   whose files come back in [`Outcome::out_files`]).
    ///
    /// Its output and status are [`Outcome::driver_log`] and [`Outcome::driver_rc`]. When it
    /// fails, the VMM gets 10 s more to finish, then is killed.
    pub fn driver(mut self, script: &str) -> Self {
        self.driver = Some(script.to_string());
        self
    }

    /// A program that runs on this machine while the scenario runs (needs [`Qmp::Tcp`]),
    /// with `CRYPTVM_QMP=127.0.0.1:PORT`, `CRYPTVM_CONSOLE` (a file here into which the
    /// guest's console is copied as it is written: in nested mode L1's console, which
    /// then carries the guest's lines too) and `CRYPTVM_FILES` (the files folder as the
    /// VMM sees it). Its output and status are [`Outcome::host_log`] and
    /// [`Outcome::host_rc`].
    pub fn host_driver<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.host_driver = Some(argv.into_iter().map(Into::into).collect());
        self
    }

    /// Forces a mode instead of the calibrated choice.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = Some(mode);
        self
    }

    /// Boots the guest and returns what happened. Panics only when the harness itself
    /// cannot work (guest build fails, QEMU missing); a guest or VMM failure is in the
    /// [`Outcome`] for the test to judge.
    ///
    /// Two failures of the nested TCG test host get one more run, the first printed in
    /// full; both happen to guests of either VMM (tests/e2e/README.md):
    /// - a guest kernel that stalls before its init is up (no `CRYPTVM-GUEST-UP`, the VMM
    ///   killed at the time limit with nothing on its standard error), hung in L1's KVM;
    /// - a guest that resets without its kernel saying why ([`Outcome::silent_guest_reset`]).
    ///
    /// Any other failure, and a second one of these, stands.
    pub fn run(&self) -> Outcome {
        let first = self.run_once();
        let why = if first.stalled_before_init() {
            "the guest kernel stalled before its init was up"
        } else if first.silent_guest_reset() {
            "the guest reset itself with no kernel message"
        } else {
            return first;
        };
        eprintln!(
            "e2e {}: {why} (a nested test host failure); once more. First run:\n{first}",
            self.name
        );
        self.run_once()
    }

    fn run_once(&self) -> Outcome {
        let mode = self.mode.unwrap_or_else(default_mode);
        let guest = guest_build();
        let dir = tempfile::Builder::new()
            .prefix(&format!("cryptvm-e2e-{}.", self.name))
            .tempdir()
            .expect("creating a run folder");
        let root = dir.path().to_path_buf();
        let keep = std::env::var_os("CRYPTVM_E2E_KEEP").is_some_and(|v| v == "1");
        eprintln!(
            "e2e {}: {:?} mode, {:?}, {:?}, {} vCPU(s), folder {}",
            self.name,
            mode,
            self.vmm,
            self.kernel,
            self.cpus,
            root.display()
        );

        // The guest's initramfs, with the scenario script appended as /scenario.sh.
        let initrd = root.join("initramfs.img");
        let mut image = fs::read(&guest.initramfs).expect("reading the guest initramfs");
        if let Some(script) = &self.guest_script {
            image.resize(image.len().next_multiple_of(512), 0);
            image.extend(newc_archive(&[(
                "scenario.sh",
                script.as_bytes(),
                0o100755,
            )]));
        }
        fs::write(&initrd, image).expect("writing the guest initramfs");
        let files_dir = root.join("files");
        fs::create_dir_all(&files_dir).expect("creating the files folder");

        let start = Instant::now();
        let mut outcome = match mode {
            Mode::Direct => self.run_direct(&guest, &root, &initrd),
            Mode::Nested => self.run_nested(&guest, &root, &initrd),
        };
        outcome.elapsed = start.elapsed();
        eprintln!(
            "e2e {}: VMM exit code {:?}, {:.1} s wall, VMM {:?} s",
            self.name,
            outcome.exit_code,
            outcome.elapsed.as_secs_f64(),
            outcome.vmm_seconds
        );
        if keep {
            let kept = dir.keep();
            eprintln!("e2e {}: kept {}", self.name, kept.display());
        } else {
            outcome._dir = Some(dir);
        }
        outcome
    }

    fn cmdline_string(&self) -> String {
        let mut cmdline = String::from("console=ttyS0 quiet panic=-1");
        if let Some(name) = &self.baked {
            cmdline.push_str(&format!(" cryptvm.scenario={name}"));
        }
        if !self.cmdline_extra.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&self.cmdline_extra);
        }
        cmdline
    }

    /// `K=V ` for each [`Scenario::vmm_env`] variable, for messages.
    fn env_prefix(&self) -> String {
        self.vmm_env
            .iter()
            .map(|(k, v)| format!("{} ", shell_join(&[format!("{k}={v}")])))
            .collect()
    }

    /// The VMM's argv, with the given paths for the kernel, initramfs and files folder.
    fn vmm_argv(&self, vmm_binary: &str, kernel: &str, initrd: &str, files: &str) -> Vec<String> {
        let mem = self.memory_mib;
        let mut argv: Vec<String> = match self.vmm {
            Vmm::Qemu => vec![
                vmm_binary.into(),
                "-enable-kvm".into(),
                "-M".into(),
                "pc".into(),
                "-cpu".into(),
                "host".into(),
                "-smp".into(),
                self.cpus.to_string(),
                "-m".into(),
                format!("{mem}M"),
                "-nodefaults".into(),
                "-no-user-config".into(),
                "-display".into(),
                "none".into(),
                "-serial".into(),
                "stdio".into(),
                "-no-reboot".into(),
                "-kernel".into(),
                kernel.into(),
                "-initrd".into(),
                initrd.into(),
                "-append".into(),
                self.cmdline_string(),
            ],
            Vmm::Cryptvm => vec![
                vmm_binary.into(),
                "run".into(),
                "--kernel".into(),
                kernel.into(),
                "--initrd".into(),
                initrd.into(),
                "--cmdline".into(),
                self.cmdline_string(),
                "--cpus".into(),
                self.cpus.to_string(),
                "--memory".into(),
                format!("{mem}M"),
                "--serial".into(),
                "stdio".into(),
            ],
        };
        argv.extend(self.vmm_args.iter().map(|a| a.replace("@FILES@", files)));
        argv
    }

    fn run_direct(&self, guest: &GuestBuild, root: &Path, initrd: &Path) -> Outcome {
        for (src, name) in &self.files {
            fs::copy(src, root.join("files").join(name))
                .unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
        }
        let binary = match self.vmm {
            Vmm::Qemu => "qemu-system-x86_64".to_string(),
            Vmm::Cryptvm => CRYPTVM.to_string(),
        };
        let kernel = match self.kernel {
            Kernel::BzImage => &guest.vmlinuz,
            Kernel::Elf => &guest.vmlinux,
        };
        let files = root.join("files").to_string_lossy().into_owned();
        let mut argv = self.vmm_argv(
            &binary,
            &kernel.to_string_lossy(),
            &initrd.to_string_lossy(),
            &files,
        );
        let host_port = self.qmp.filter(|&q| q == Qmp::Tcp).map(|_| free_port());
        let qmp_addr = match (self.qmp, host_port) {
            (Some(Qmp::Tcp), Some(port)) => Some(format!("tcp:127.0.0.1:{port}")),
            (Some(_), _) => Some(root.join("qmp.sock").to_string_lossy().into_owned()),
            (None, _) => None,
        };
        if let Some(addr) = &qmp_addr {
            argv.extend(self.qmp_args(addr));
        }
        let command = self.env_prefix() + &shell_join(&argv);
        let console_path = root.join("l2-console.txt");
        let stdout = fs::File::create(&console_path).expect("console file");
        let stderr = fs::File::create(root.join("vmm-stderr.txt")).expect("stderr file");
        let start = Instant::now();
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .envs(self.vmm_env.iter().map(|(k, v)| (k, v)))
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
        let mut drivers = Vec::new();
        if let (Some(script), Some(addr)) = (&self.driver, &qmp_addr) {
            fs::write(root.join("driver.sh"), script).expect("writing driver.sh");
            let mut cmd = Command::new("sh");
            cmd.arg(root.join("driver.sh"))
                .env("CRYPTVM_QMP", addr)
                .env("CRYPTVM_CTL", format!("{CRYPTVM} ctl --socket {addr}"))
                .env("CRYPTVM_CONSOLE", &console_path)
                .env("CRYPTVM_VMM_PID", child.id().to_string())
                .env("CRYPTVM_FILES", &files)
                .env("CRYPTVM_OUT", root);
            drivers.push(("driver", spawn_logged(cmd, root, "driver.log")));
        }
        if let (Some(argv), Some(port)) = (&self.host_driver, host_port) {
            drivers.push((
                "host",
                self.spawn_host_driver(argv, root, port, &console_path, &files),
            ));
        }
        let mut driver_rc = None;
        let mut host_rc = None;
        for (which, mut driver) in drivers {
            let rc = wait_with_timeout(&mut driver, self.timeout);
            if rc != Some(0) {
                // The guest may wait for what the driver never did: a short grace period.
                let _ = wait_with_timeout(&mut child, Duration::from_secs(10));
            }
            match which {
                "driver" => driver_rc = rc,
                _ => host_rc = rc,
            }
        }
        let status = wait_with_timeout(&mut child, self.timeout);
        let vmm_seconds = Some(start.elapsed().as_secs_f64());
        let out_files = read_tree(root, self.return_max_mib << 20);
        Outcome {
            mode: Mode::Direct,
            console: String::new(),
            l2_console: text(&out_files, "l2-console.txt"),
            vmm_stderr: text(&out_files, "vmm-stderr.txt"),
            exit_code: status,
            driver_log: text(&out_files, "driver.log"),
            driver_rc,
            host_log: text(&out_files, "host-driver.log"),
            host_rc,
            out_files,
            elapsed: Duration::ZERO,
            vmm_seconds,
            command,
            _dir: None,
        }
    }

    /// The VMM arguments of a QMP server at `addr` (a socket path or `tcp:HOST:PORT`).
    fn qmp_args(&self, addr: &str) -> Vec<String> {
        match self.vmm {
            Vmm::Qemu if addr.starts_with("tcp:") => {
                vec!["-qmp".into(), format!("{addr},server=on,wait=off")]
            }
            Vmm::Qemu => vec!["-qmp".into(), format!("unix:{addr},server=on,wait=off")],
            Vmm::Cryptvm => vec!["--qmp".into(), addr.to_string()],
        }
    }

    /// Starts the host driver, its output into `root/host-driver.log`.
    fn spawn_host_driver(
        &self,
        argv: &[String],
        root: &Path,
        port: u16,
        console: &Path,
        files: &str,
    ) -> std::process::Child {
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env("CRYPTVM_QMP", format!("127.0.0.1:{port}"))
            .env("CRYPTVM_CONSOLE", console)
            .env("CRYPTVM_FILES", files);
        spawn_logged(cmd, root, "host-driver.log")
    }

    fn run_nested(&self, guest: &GuestBuild, root: &Path, initrd: &Path) -> Outcome {
        let (binary, carry) = match self.vmm {
            Vmm::Qemu => ("qemu-system-x86_64".to_string(), vec!["--qemu".to_string()]),
            Vmm::Cryptvm => (
                "/usr/local/bin/cryptvm".to_string(),
                vec!["--bin".to_string(), CRYPTVM.to_string()],
            ),
        };
        let (kernel_file, kernel_kind) = match self.kernel {
            Kernel::BzImage => (&guest.vmlinuz, "vmlinuz"),
            Kernel::Elf => (&guest.vmlinux, "vmlinux"),
        };
        let mut argv = self.vmm_argv(
            &binary,
            &format!("/work/guest/{kernel_kind}"),
            "/work/guest/initramfs.img",
            "/work/files",
        );
        let qmp_addr = self.qmp.map(|q| match q {
            Qmp::Unix => "/tmp/qmp.sock".to_string(),
            Qmp::Tcp => format!("tcp:0.0.0.0:{L1_QMP_PORT}"),
        });
        if let Some(addr) = &qmp_addr {
            argv.extend(self.qmp_args(addr));
        }
        // `timeout` runs `env`, which sets the variables and runs the VMM.
        let env_args: Vec<String> = self
            .vmm_env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let command = if env_args.is_empty() {
            shell_join(&argv)
        } else {
            format!("env {} {}", shell_join(&env_args), shell_join(&argv))
        };
        // Inside L1 the VMM gets a time limit of its own, so that L1 still reports.
        let inner = self.timeout.as_secs().saturating_sub(30).max(20);
        // With a driver or a host driver the VMM runs in the background; for a host driver
        // its console also goes to L1's console as it is written (through tee).
        let vmm_run = if self.driver.is_none() && self.host_driver.is_none() {
            format!(
                "timeout -s KILL {inner} {command} </dev/null >/out/l2-console.txt 2>/out/vmm-stderr.txt\n"
            )
        } else {
            let mut s = String::new();
            let console = if self.host_driver.is_some() {
                s.push_str(
                    "mkfifo /tmp/l2-console.fifo\n\
                     tee /out/l2-console.txt </tmp/l2-console.fifo &\n",
                );
                "/tmp/l2-console.fifo"
            } else {
                "/out/l2-console.txt"
            };
            s.push_str(&format!(
                "timeout -s KILL {inner} {command} </dev/null >{console} 2>/out/vmm-stderr.txt &\n\
                 vmm=$!\n"
            ));
            if let (Some(script), Some(addr)) = (&self.driver, &qmp_addr) {
                fs::write(root.join("driver.sh"), script).expect("writing driver.sh");
                let ctl_addr = addr.replace("0.0.0.0", "127.0.0.1");
                s.push_str(&format!(
                    "CRYPTVM_QMP='{ctl_addr}' CRYPTVM_CTL='/usr/local/bin/cryptvm ctl --socket {ctl_addr}' \
                     CRYPTVM_CONSOLE=/out/l2-console.txt CRYPTVM_VMM_PID=$vmm CRYPTVM_FILES=/work/files \
                     CRYPTVM_OUT=/out timeout -s KILL {inner} sh /work/driver.sh >/out/driver.log 2>&1\n\
                     drc=$?\n\
                     echo \"$drc\" >/out/driver-rc\n\
                     echo \"CRYPTVM-RUN-DRIVER rc=$drc\"\n\
                     # A failed driver: the guest may wait for what it never did.\n\
                     [ $drc = 0 ] || {{ sleep 10; kill -9 $vmm 2>/dev/null; }} &\n"
                ));
            }
            s.push_str("wait $vmm\n");
            s
        };
        let run_sh = format!(
            "# Generated by tests/e2e/harness.rs for scenario {name}.\n\
             read -r t0 _ </proc/uptime\n\
             echo \"CRYPTVM-RUN-BEGIN uptime=$t0\"\n\
             {vmm_run}\
             rc=$?\n\
             read -r t1 _ </proc/uptime\n\
             echo \"$rc\" >/out/vmm-exit-code\n\
             echo \"$t0 $t1\" >/out/vmm-times\n\
             {collect}\
             echo \"CRYPTVM-RUN-END rc=$rc uptime=$t1\"\n\
             exit 0\n",
            name = self.name,
            collect = if self.return_files {
                "cp -r /work/files /out/files\n"
            } else {
                ""
            },
        );
        fs::write(root.join("run.sh"), run_sh).expect("writing run.sh");

        let mut pack = Command::new(repo_root().join("resources/testhost/pack.sh"));
        pack.arg("--out")
            .arg(root.join("l1.img"))
            .args(&carry)
            .arg("--file")
            .arg(format!("{}=guest/{kernel_kind}", kernel_file.display()))
            .arg("--file")
            .arg(format!("{}=guest/initramfs.img", initrd.display()))
            .arg("--run")
            .arg(root.join("run.sh"));
        for (src, name) in &self.files {
            pack.arg("--file")
                .arg(format!("{}=files/{name}", src.display()));
        }
        if self.driver.is_some() {
            pack.arg("--file")
                .arg(format!("{}=driver.sh", root.join("driver.sh").display()));
            if self.vmm != Vmm::Cryptvm {
                // For `cryptvm ctl`.
                pack.arg("--bin").arg(CRYPTVM);
            }
        }
        let host_port = (self.qmp == Some(Qmp::Tcp)).then(free_port);
        if host_port.is_some() {
            pack.arg("--net");
        }
        let packed = pack.output().expect("running resources/testhost/pack.sh");
        assert!(
            packed.status.success(),
            "resources/testhost/pack.sh failed:\n{}",
            String::from_utf8_lossy(&packed.stderr)
        );

        let out_dir = root.join("out");
        let console_path = root.join("l1-console.txt");
        let mut launch = Command::new(repo_root().join("resources/testhost/launch.sh"));
        launch
            .arg("--kernel")
            .arg(&guest.vmlinuz)
            .arg("--initrd")
            .arg(root.join("l1.img"))
            .arg("--console")
            .arg(&console_path)
            .arg("--out-dir")
            .arg(&out_dir)
            .arg("--timeout")
            .arg(self.timeout.as_secs().to_string())
            .arg("--out-size")
            .arg(self.out_disk_mib().to_string());
        if let Some(port) = host_port {
            launch.arg("--hostfwd").arg(format!("{port}:{L1_QMP_PORT}"));
        }
        let mut launched = spawn_logged(launch, root, "launch.log");
        let mut host_rc = None;
        if let (Some(argv), Some(port)) = (&self.host_driver, host_port) {
            // The console file exists once launch.sh has started QEMU.
            let mut driver = self.spawn_host_driver(argv, root, port, &console_path, "/work/files");
            host_rc = wait_with_timeout(&mut driver, self.timeout);
        }
        // launch.sh has a time limit of its own for each L1 boot (--timeout, plus QEMU's
        // kill grace), and boots L1 again (three times at most) after L1 died or hung.
        let status = wait_with_timeout(
            &mut launched,
            (self.timeout + Duration::from_secs(70)) * 4 + Duration::from_secs(30),
        );
        // The initrd is large; the results are all that is needed now.
        let _ = fs::remove_file(root.join("l1.img"));
        let console = fs::read(&console_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if status != Some(0) {
            eprintln!(
                "e2e {}: the test host exited with {:?}: {}",
                self.name,
                status,
                fs::read_to_string(root.join("launch.log")).unwrap_or_default()
            );
        }
        let out_files = read_tree(&out_dir, self.return_max_mib << 20);
        let exit_code = text(&out_files, "vmm-exit-code").trim().parse().ok();
        let vmm_seconds = text(&out_files, "vmm-times")
            .split_whitespace()
            .map(|t| t.parse::<f64>().ok())
            .collect::<Option<Vec<_>>>()
            .and_then(|t| (t.len() == 2).then(|| t[1] - t[0]));
        Outcome {
            mode: Mode::Nested,
            console,
            l2_console: text(&out_files, "l2-console.txt"),
            vmm_stderr: text(&out_files, "vmm-stderr.txt"),
            // 137: killed by the inner time limit.
            exit_code: exit_code.filter(|&c| c != 137),
            driver_log: text(&out_files, "driver.log"),
            driver_rc: text(&out_files, "driver-rc").trim().parse().ok(),
            host_log: fs::read_to_string(root.join("host-driver.log")).unwrap_or_default(),
            host_rc,
            out_files,
            elapsed: Duration::ZERO,
            vmm_seconds,
            command,
            _dir: None,
        }
    }
}

impl Outcome {
    /// The guest never reached its init's marker while the VMM reported no error and had
    /// to be killed.
    fn stalled_before_init(&self) -> bool {
        self.marker().is_none() && self.exit_code.is_none() && self.vmm_stderr.trim().is_empty()
    }

    /// The guest reset itself in the nested test host: its VMM exited 0 (as cryptvm and
    /// QEMU with `-no-reboot` do on a guest reset) without the guest powering off and
    /// without a QMP driver that succeeded (one that ends with `quit`), and the guest
    /// kernel printed no panic, oops or BUG first. QEMU TCG's nested SVM now and then
    /// triple-faults a guest of either VMM this way under load (docs/performance.md); a
    /// guest that crashes for a reason its kernel can see (a VMM bug) is not one of these.
    pub fn silent_guest_reset(&self) -> bool {
        const KERNEL_ERRORS: [&str; 4] = ["Kernel panic", "Oops", "BUG:", "general protection"];
        self.mode == Mode::Nested
            && self.exit_code == Some(0)
            && !self.powered_off()
            && self.driver_rc != Some(0)
            && self.host_rc != Some(0)
            && !KERNEL_ERRORS.iter().any(|e| self.l2_console.contains(e))
    }

    /// The guest's `CRYPTVM-GUEST-UP` line, parsed; `None` when the guest never got there.
    pub fn marker(&self) -> Option<Marker> {
        let line = self
            .l2_console
            .lines()
            .find_map(|l| l.trim_end_matches('\r').split_once("CRYPTVM-GUEST-UP"))?
            .1;
        Some(Marker(
            line.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
    }

    /// The exit status of the guest's scenario (`CRYPTVM-SCENARIO-END rc=N`).
    ///
    /// Only the digits count: the kernel's own "reboot: Power down" can land on the same
    /// line before the tty has written init's newline (`rc=0[   14.16] reboot: ...`).
    pub fn scenario_rc(&self) -> Option<i32> {
        scenario_rc_in(&self.l2_console)
    }

    /// Whether the guest kernel reported powering down.
    pub fn powered_off(&self) -> bool {
        self.l2_console.contains("reboot: Power down")
    }
}

/// The status in a console's `CRYPTVM-SCENARIO-END rc=N` line (see [`Outcome::scenario_rc`]).
pub fn scenario_rc_in(console: &str) -> Option<i32> {
    console.lines().find_map(|l| {
        let (_, rest) = l.split_once("CRYPTVM-SCENARIO-END rc=")?;
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..digits].parse().ok()
    })
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "mode: {:?}", self.mode)?;
        writeln!(f, "$ {}", self.command)?;
        writeln!(f, "VMM exit code: {:?}", self.exit_code)?;
        writeln!(f, "--- guest console ---\n{}", self.l2_console)?;
        writeln!(f, "--- VMM stderr ---\n{}", self.vmm_stderr)?;
        if self.driver_rc.is_some() || !self.driver_log.is_empty() {
            writeln!(
                f,
                "--- driver (exit status {:?}) ---\n{}",
                self.driver_rc, self.driver_log
            )?;
        }
        if self.host_rc.is_some() || !self.host_log.is_empty() {
            writeln!(
                f,
                "--- host driver (exit status {:?}) ---\n{}",
                self.host_rc, self.host_log
            )?;
        }
        if self.mode == Mode::Nested {
            // L1's QEMU warns about CPUID bits TCG lacks; those lines say nothing here.
            let console: Vec<&str> = self
                .console
                .lines()
                .filter(|l| !l.contains("TCG doesn't support requested feature"))
                .collect();
            writeln!(f, "--- test host console ---\n{}", console.join("\n"))?;
        }
        Ok(())
    }
}

/// The guest's files, from resources/guest/build.sh.
#[derive(Clone, Debug)]
pub struct GuestBuild {
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// The ELF kernel.
    pub vmlinux: PathBuf,
    /// The busybox initramfs (gzip'd newc).
    pub initramfs: PathBuf,
}

/// Builds the guest once per test binary (the script skips work already done).
pub fn guest_build() -> GuestBuild {
    static BUILD: OnceLock<GuestBuild> = OnceLock::new();
    BUILD
        .get_or_init(|| {
            let out = Command::new(repo_root().join("resources/guest/build.sh"))
                .stdin(Stdio::null())
                .output()
                .expect("running resources/guest/build.sh");
            assert!(
                out.status.success(),
                "resources/guest/build.sh failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let vars: BTreeMap<String, String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let path = |k: &str| PathBuf::from(vars.get(k).unwrap_or_else(|| panic!("{k}?")));
            GuestBuild {
                vmlinuz: path("VMLINUZ"),
                vmlinux: path("VMLINUX"),
                initramfs: path("INITRAMFS"),
            }
        })
        .clone()
}

/// Why this machine cannot run e2e scenarios (a missing tool), or `None` when it can.
/// Under `CI=true` always `None`: there a missing tool must fail the tests, not skip them.
pub fn skip_reason() -> Option<String> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        return None;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = ["qemu-system-x86_64", "apt-get", "dpkg-deb", "cpio", "lz4"]
        .into_iter()
        .filter(|tool| {
            !std::env::split_paths(&path)
                .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
                .any(|dir| dir.join(tool).is_file())
        })
        .collect();
    (!missing.is_empty()).then(|| format!("not installed: {}", missing.join(", ")))
}

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm/ has a parent")
        .to_path_buf()
}

/// Direct when `CRYPTVM_E2E_MODE=direct` or `/dev/kvm` is fast, else nested.
pub fn default_mode() -> Mode {
    match std::env::var("CRYPTVM_E2E_MODE").ok().as_deref() {
        Some("direct") => Mode::Direct,
        Some("nested") => Mode::Nested,
        Some(other) if !other.is_empty() => {
            panic!("CRYPTVM_E2E_MODE={other}: expected direct or nested")
        }
        _ if kvm_is_fast() => Mode::Direct,
        _ => Mode::Nested,
    }
}

/// Iterations of the calibration loop per chunk (two instructions each).
const CHUNK_ITERATIONS: u32 = 1_000_000;
/// Chunks: 5 x 2M = 10M guest instructions in all.
const CHUNKS: u32 = 5;
/// A KVM that needs longer than this for the 10M instructions is too slow for Linux.
const FAST_LIMIT: Duration = Duration::from_millis(500);

/// Whether `/dev/kvm` runs guest code at hardware speed: times ~10M instructions of a
/// real-mode loop (stopping early once over the limit). Measured once per process.
pub fn kvm_is_fast() -> bool {
    static FAST: OnceLock<bool> = OnceLock::new();
    *FAST.get_or_init(|| match time_kvm_loop() {
        Ok(t) => {
            let fast = t < FAST_LIMIT;
            eprintln!(
                "e2e: /dev/kvm ran the calibration loop in {:.3} s: {}",
                t.as_secs_f64(),
                if fast {
                    "fast, direct mode"
                } else {
                    "slow, nested mode"
                }
            );
            fast
        }
        Err(e) => {
            eprintln!("e2e: /dev/kvm is not usable ({e}): nested mode");
            false
        }
    })
}

/// Runs the calibration guest: at the reset vector (CS base 0xffff0000, IP 0xfff0,
/// real mode), `mov ecx, N; l: dec ecx; jnz l; out 0x80, al; jmp start`. Each `out`
/// exit ends a chunk; returns the time for all chunks, or the time so far once over
/// [`FAST_LIMIT`].
fn time_kvm_loop() -> Result<Duration, String> {
    use kvm_ioctls::{Kvm, VcpuExit};

    const BASE: u64 = 0xffff_0000;
    const SIZE: usize = 0x1_0000;
    let n = CHUNK_ITERATIONS.to_le_bytes();
    let code = [
        0x66, 0xb9, n[0], n[1], n[2], n[3], // mov ecx, N
        0x66, 0x49, // dec ecx
        0x75, 0xfc, // jnz -4
        0xe6, 0x80, // out 0x80, al
        0xeb, 0xf2, // jmp -14 (start)
    ];

    let kvm = Kvm::new().map_err(|e| format!("open: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("create VM: {e}"))?;
    let mem = Mapping::new(SIZE)?;
    // SAFETY: the mapping is SIZE bytes long and the code ends before its end.
    unsafe {
        std::ptr::copy_nonoverlapping(code.as_ptr(), mem.ptr.add(0xfff0), code.len());
    }
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: BASE,
        memory_size: SIZE as u64,
        userspace_addr: mem.ptr as u64,
    };
    // SAFETY: the region is a live anonymous mapping of SIZE bytes that outlives the VM
    // (`mem` is dropped after `vm` and `vcpu`, in reverse declaration order).
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("memory: {e}"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("vCPU: {e}"))?;
    let start = Instant::now();
    let mut chunks = 0;
    while chunks < CHUNKS {
        match vcpu.run().map_err(|e| format!("run: {e}"))? {
            VcpuExit::IoOut(0x80, _) => chunks += 1,
            other => return Err(format!("unexpected exit {other:?}")),
        }
        if start.elapsed() > FAST_LIMIT {
            break;
        }
    }
    Ok(start.elapsed())
}

/// An anonymous private mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> Result<Self, String> {
        // SAFETY: an anonymous mapping with no address hint touches no existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are the mapping made in `new`, unmapped only here.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A newc (SVR4, no CRC) cpio archive of regular files, as the kernel unpacks it.
pub fn newc_archive(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: usize, name: &str, data: &[u8], mode: u32) {
        let fields = [
            ino,
            mode as usize,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    let mut out = Vec::new();
    for (i, (name, data, mode)) in files.iter().enumerate() {
        entry(&mut out, i + 1, name, data, *mode);
    }
    entry(&mut out, 0, "TRAILER!!!", &[], 0);
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

/// Starts `cmd` in `dir` with no input, its stdout and stderr into `dir/log`.
fn spawn_logged(mut cmd: Command, dir: &Path, log: &str) -> std::process::Child {
    let out = fs::File::create(dir.join(log)).expect("creating a log file");
    let err = out.try_clone().expect("cloning a log file");
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// A TCP port of 127.0.0.1 that nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a free port")
        .port()
}

fn wait_with_timeout(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("waiting for the VMM") {
            return status.code();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every regular file under `dir` of at most `max` bytes, by relative path (large images
/// are skipped).
fn read_tree(dir: &Path, max: u64) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, max: u64, out: &mut BTreeMap<String, Vec<u8>>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                walk(base, &path, max, out);
            } else if meta.is_file() && meta.len() <= max {
                if let (Ok(rel), Ok(data)) = (path.strip_prefix(base), fs::read(&path)) {
                    out.insert(rel.to_string_lossy().into_owned(), data);
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, max, &mut out);
    out
}

fn text(files: &BTreeMap<String, Vec<u8>>, name: &str) -> String {
    files
        .get(name)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

/// Quotes argv for a POSIX shell.
pub fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_=.,/:+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
