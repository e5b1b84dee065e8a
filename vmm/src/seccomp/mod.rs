//! Seccomp filters for every thread of `cryptvm run` (docs/security.md,
//! "Seccomp").
//!
//! Each kind of thread ([`ThreadKind`]) has its own allow-list
//! ([`allowlist`]), compiled with `seccompiler` once, before any thread
//! starts ([`init`]). Each thread installs its own filter first thing
//! ([`thread_start`]); the main thread installs its filter once the VM is
//! built and the vCPU threads are started, and the vCPUs enter the guest only
//! after that (`Vm::run`, vstate/vm.rs). The `devices` and `block`
//! crates know nothing of seccomp: they call a start hook that [`init`] sets.
//!
//! # Stacking
//!
//! A thread inherits the filters of the thread that started it, and adding
//! its own only narrows what it may do: a call goes through only if every
//! stacked filter allows it. So a thread that starts threads after its own
//! filter is in place must allow what they need: the filter of a kind
//! includes the lists of the kinds it starts ([`ThreadKind::spawns`]), and so
//! on down. Today the main thread starts everything but the QMP clients
//! (started by `qmp-accept`), their writers and the queue threads of
//! hot-plugged disks (started by a QMP client) before its filter is
//! installed; the crypto pool is started up front for the same reason.
//!
//! # Violations
//!
//! With [`SeccompMode::On`] a forbidden call raises `SIGSYS`; the handler
//! installed here writes `cryptvm: thread 'NAME' made forbidden system call
//! NR (NAME); see docs/security.md` to stderr and ends the process with exit
//! status [`VIOLATION_EXIT_STATUS`]. With [`SeccompMode::Log`] the kernel
//! only logs the call (audit, `dmesg`) and lets it through.

mod allowlist;
mod glibc;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use allowlist::Allow;

/// Environment variable that makes the first thread of the named kind
/// (`vcpu`, `qmp-client`, ...) call `mount(2)`, which no list allows, right
/// after its filter is installed: the test of the violation report.
pub const SELFTEST_ENV: &str = "CRYPTVM_SECCOMP_SELFTEST";

/// Exit status of a process ended by a forbidden system call (128 + SIGSYS).
pub const VIOLATION_EXIT_STATUS: i32 = 159;

/// The kinds of threads of `cryptvm run`, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// The main thread: builds the VM, then waits for its end and stops it.
    Main,
    /// A vCPU thread (`vcpuN`).
    Vcpu,
    /// The event loop (`event-loop`): console input.
    EventLoop,
    /// A virtqueue's thread (`DISK-qN`): pops requests, hands them to the
    /// workers.
    VirtioQueue,
    /// A request worker (`io-w-N`): block I/O.
    IoWorker,
    /// A LUKS crypto thread (`crypto-N`).
    Crypto,
    /// The hot-unplug teardown thread (`hotplug`).
    Hotplug,
    /// The QMP listener (`qmp-accept`).
    QmpAccept,
    /// A QMP client's reader, where its commands run (`qmp-client-N`).
    QmpClient,
    /// A QMP client's writer (`qmp-writer-N`).
    QmpWriter,
    /// The QMP event bus's thread (`qmp-events`): sends throttled events.
    QmpEvents,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 11] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::EventLoop,
        ThreadKind::VirtioQueue,
        ThreadKind::IoWorker,
        ThreadKind::Crypto,
        ThreadKind::Hotplug,
        ThreadKind::QmpAccept,
        ThreadKind::QmpClient,
        ThreadKind::QmpWriter,
        ThreadKind::QmpEvents,
    ];

    /// The kind's name (as [`SELFTEST_ENV`] takes it).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::EventLoop => "event-loop",
            ThreadKind::VirtioQueue => "virtio-queue",
            ThreadKind::IoWorker => "io-worker",
            ThreadKind::Crypto => "crypto",
            ThreadKind::Hotplug => "hotplug",
            ThreadKind::QmpAccept => "qmp-accept",
            ThreadKind::QmpClient => "qmp-client",
            ThreadKind::QmpWriter => "qmp-writer",
            ThreadKind::QmpEvents => "qmp-events",
        }
    }

    /// The kind named `name`.
    pub fn from_name(name: &str) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The kinds of threads a thread of this kind starts after its filter is
    /// installed (they inherit its filter, so it includes their lists).
    pub fn spawns(self) -> &'static [ThreadKind] {
        match self {
            ThreadKind::QmpAccept => &[ThreadKind::QmpClient],
            // device_add starts the new disk's queue threads.
            ThreadKind::QmpClient => &[ThreadKind::QmpWriter, ThreadKind::VirtioQueue],
            _ => &[],
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `--seccomp` / `machine.seccomp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Filters installed; a forbidden call ends the process.
    #[default]
    On,
    /// No filters.
    Off,
    /// Filters installed; a forbidden call is logged by the kernel and
    /// allowed.
    Log,
}

impl SeccompMode {
    /// Parses `on`, `off` or `log`.
    pub fn parse(text: &str) -> Result<SeccompMode, String> {
        match text {
            "on" => Ok(SeccompMode::On),
            "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            _ => Err(format!("'{text}': expected on, off or log")),
        }
    }
}

/// Why the filters could not be set up or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused a list (a bug here).
    #[error("building the seccomp filter of the {kind} threads: {source}")]
    Build {
        /// The thread kind.
        kind: ThreadKind,
        /// seccompiler's error.
        #[source]
        source: seccompiler::Error,
    },
    /// The kernel refused a filter (no seccomp support?).
    #[error("installing the seccomp filter of thread '{thread}': {source}")]
    Apply {
        /// The thread's name.
        thread: String,
        /// seccompiler's error.
        #[source]
        source: seccompiler::Error,
    },
    /// `sigaction(SIGSYS)` failed.
    #[error("installing the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
    /// The filters were set up already in this process.
    #[error("the seccomp filters are set up already")]
    AlreadySetUp,
    /// [`SELFTEST_ENV`] names no thread kind.
    #[error("{SELFTEST_ENV}: unknown thread kind '{0}' (expected main, vcpu, event-loop, virtio-queue, io-worker, crypto, hotplug, qmp-accept, qmp-client, qmp-writer or qmp-events)")]
    UnknownSelftest(String),
}

/// The compiled filters.
struct Filters {
    programs: BTreeMap<ThreadKind, Vec<BpfProgram>>,
    selftest: Option<ThreadKind>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

thread_local! {
    /// This thread's name, NUL-padded, for the SIGSYS handler (which may not
    /// allocate or lock).
    static THREAD_NAME: Cell<[u8; 32]> = const { Cell::new([0; 32]) };
}

/// The allowed calls of `kind` with those of the kinds it starts, by number.
/// An entry without argument values allows any; else the values of each
/// argument checked.
fn allowed(kind: ThreadKind) -> BTreeMap<i64, Option<Vec<(u8, u64)>>> {
    let mut kinds = vec![kind];
    let mut i = 0;
    while i < kinds.len() {
        for &child in kinds[i].spawns() {
            if !kinds.contains(&child) {
                kinds.push(child);
            }
        }
        i += 1;
    }
    let mut map: BTreeMap<i64, Option<Vec<(u8, u64)>>> = BTreeMap::new();
    for k in kinds {
        for group in allowlist::own_groups(k) {
            for a in group.iter() {
                match a.arg {
                    None => {
                        map.insert(a.nr, None);
                    }
                    Some((index, values)) => {
                        let entry = map.entry(a.nr).or_insert_with(|| Some(Vec::new()));
                        if let Some(list) = entry {
                            for &(_, v) in values {
                                if !list.contains(&(index, v)) {
                                    list.push((index, v));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    map
}

/// The filter of `kind`: its allowed calls let through, anything else
/// trapped (`On`) or logged (`Log`).
fn program(kind: ThreadKind, mode: SeccompMode) -> Result<Vec<BpfProgram>, SeccompError> {
    let build = |source| SeccompError::Build { kind, source };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let allowed = allowed(kind);
    // A kind that opens no files: open calls fail (glibc's lazy probes), see `glibc`.
    let no_open = !allowed.contains_key(&libc::SYS_openat);
    if no_open {
        for nr in glibc::OPEN_CALLS {
            rules.insert(nr, Vec::new());
        }
    }
    for (nr, values) in allowed {
        let chain = match values {
            None => Vec::new(),
            Some(values) => values
                .into_iter()
                .map(|(index, v)| {
                    SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                        .and_then(|c| SeccompRule::new(vec![c]))
                })
                .collect::<Result<_, _>>()
                .map_err(|e| build(e.into()))?,
        };
        rules.insert(nr, chain);
    }
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| build(e.into()))?;
    let own = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| build(e.into()))?;
    // In the order installed: once the own filter is on, installing another may be
    // refused by it.
    Ok(if no_open {
        vec![glibc::no_open().map_err(build)?, own]
    } else {
        vec![own]
    })
}

/// Sets up the filters of `mode` for this process: compiles every kind's
/// filter, installs the SIGSYS handler, and hooks the thread starts of the
/// `devices` and `block` crates. [`SeccompMode::Off`] does nothing. Call it
/// once, before the VM's threads start.
pub fn init(mode: SeccompMode) -> Result<(), SeccompError> {
    if mode == SeccompMode::Off {
        return Ok(());
    }
    glibc::bound_arenas();
    let selftest = match std::env::var(SELFTEST_ENV) {
        Ok(name) if !name.is_empty() => {
            Some(ThreadKind::from_name(&name).ok_or(SeccompError::UnknownSelftest(name))?)
        }
        _ => None,
    };
    let mut programs = BTreeMap::new();
    for kind in ThreadKind::ALL {
        programs.insert(kind, program(kind, mode)?);
    }
    install_sigsys_handler()?;
    FILTERS
        .set(Filters { programs, selftest })
        .map_err(|_| SeccompError::AlreadySetUp)?;
    devices::threads::set_start_hook(|kind| {
        thread_start(match kind {
            devices::threads::DeviceThread::IoWorker => ThreadKind::IoWorker,
            devices::threads::DeviceThread::Queue => ThreadKind::VirtioQueue,
        })
    });
    block::threads::set_start_hook(|kind| match kind {
        block::threads::BlockThread::Crypto => thread_start(ThreadKind::Crypto),
    });
    // Started now, by a thread without a filter, rather than by the first
    // large request on an I/O worker.
    block::luks::crypto_pool::start();
    Ok(())
}

/// Whether [`init`] set filters up.
pub fn enabled() -> bool {
    FILTERS.get().is_some()
}

/// Installs the filter of `kind` on the calling thread, if [`init`] set
/// filters up (else does nothing).
pub fn apply_current(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    let current = std::thread::current();
    let name = current.name().unwrap_or(kind.name());
    let mut buf = [0u8; 32];
    let n = name.len().min(buf.len() - 1);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    THREAD_NAME.with(|t| t.set(buf));
    for program in &filters.programs[&kind] {
        seccompiler::apply_filter(program).map_err(|source| SeccompError::Apply {
            thread: name.to_string(),
            source,
        })?;
    }
    if filters.selftest == Some(kind) {
        selftest();
    }
    Ok(())
}

/// What a thread of `kind` runs first: [`apply_current`]; a thread that
/// cannot have its filter ends the process (it must not run unfiltered).
pub fn thread_start(kind: ThreadKind) {
    if let Err(e) = apply_current(kind) {
        eprintln!("cryptvm: {e}");
        std::process::exit(1);
    }
}

/// Makes a call no list allows (`mount` with no arguments: it would fail
/// with EFAULT were it let through).
fn selftest() {
    // SAFETY: mount(2) with null pointers reads nothing (EFAULT at worst);
    // the filter traps it before that.
    unsafe {
        libc::syscall(
            libc::SYS_mount,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_char>(),
            0 as libc::c_ulong,
            std::ptr::null::<libc::c_void>(),
        );
    }
}

/// The name of system call `nr` if a list or [`allowlist::NOTABLE`] has it.
fn syscall_name(nr: i64) -> Option<&'static str> {
    for kind in ThreadKind::ALL {
        for group in allowlist::own_groups(kind) {
            if let Some(a) = group.iter().find(|a: &&Allow| a.nr == nr) {
                return Some(a.name());
            }
        }
    }
    allowlist::NOTABLE
        .iter()
        .find(|(_, n)| *n == nr)
        .map(|(name, _)| *name)
}

/// The `_sigsys` member of `siginfo_t` (`<asm-generic/siginfo.h>`).
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// A fixed buffer filled without allocating.
struct Message {
    buf: [u8; 256],
    len: usize,
}

impl Message {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == 0 || self.len == self.buf.len() {
                return;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    fn number(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The report of a forbidden call `nr` made by thread `thread`.
fn violation_message(thread: &[u8], nr: i64) -> Message {
    let mut m = Message {
        buf: [0; 256],
        len: 0,
    };
    m.push(b"cryptvm: thread '");
    m.push(if thread.first().is_some_and(|&b| b != 0) {
        thread
    } else {
        b"?"
    });
    m.push(b"' made forbidden system call ");
    m.number(nr);
    m.push(b" (");
    m.push(syscall_name(nr).unwrap_or("unknown").as_bytes());
    m.push(b"); see docs/security.md\n");
    m
}

extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo_t; for
    // SIGSYS its union holds `_sigsys`, which SigsysInfo lays out.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let name = THREAD_NAME.try_with(Cell::get).unwrap_or([0; 32]);
    let m = violation_message(&name, i64::from(nr));
    // SAFETY: write(2) from a valid buffer, then _exit(2): both
    // async-signal-safe, and both allowed by every list.
    unsafe {
        libc::write(libc::STDERR_FILENO, m.buf.as_ptr().cast(), m.len);
        libc::_exit(VIOLATION_EXIT_STATUS);
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is valid; its fields are set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: sa_mask is a valid sigset_t to empty.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: installs a handler that only writes and exits.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_in_both_modes() {
        for kind in ThreadKind::ALL {
            for mode in [SeccompMode::On, SeccompMode::Log] {
                let p = program(kind, mode).expect("program");
                assert!(!p.is_empty(), "{kind}");
            }
        }
    }

    #[test]
    fn a_spawner_allows_what_its_threads_need() {
        for kind in ThreadKind::ALL {
            let mine = allowed(kind);
            for &child in kind.spawns() {
                for (nr, values) in allowed(child) {
                    let Some(have) = mine.get(&nr) else {
                        panic!("{kind} lacks {nr}, needed by {child}");
                    };
                    if let (Some(have), Some(values)) = (have, values) {
                        for v in values {
                            assert!(have.contains(&v), "{kind} lacks {nr} {v:?} ({child})");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn spawners_may_start_threads_and_filter_them() {
        for kind in ThreadKind::ALL {
            if kind.spawns().is_empty() {
                continue;
            }
            let mine = allowed(kind);
            for nr in [libc::SYS_clone, libc::SYS_clone3, libc::SYS_seccomp] {
                assert!(mine.contains_key(&nr), "{kind} cannot start threads");
            }
        }
    }

    #[test]
    fn nothing_dangerous_is_allowed() {
        for kind in ThreadKind::ALL {
            let mine = allowed(kind);
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_open_by_handle_at,
                libc::SYS_kexec_load,
                libc::SYS_kexec_file_load,
                libc::SYS_bpf,
                libc::SYS_perf_event_open,
                libc::SYS_process_vm_readv,
                libc::SYS_process_vm_writev,
                libc::SYS_setuid,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_fork,
            ] {
                assert!(!mine.contains_key(&nr), "{kind} allows {nr}");
            }
            // ioctl only with the listed requests.
            assert!(matches!(mine.get(&libc::SYS_ioctl), None | Some(Some(_))));
        }
    }

    #[test]
    fn only_vcpus_run_the_guest() {
        for kind in ThreadKind::ALL {
            let run = allowed(kind)
                .get(&libc::SYS_ioctl)
                .cloned()
                .flatten()
                .is_some_and(|v| v.contains(&(1, allowlist::KVM_RUN)));
            assert_eq!(run, kind == ThreadKind::Vcpu, "{kind}");
        }
    }

    #[test]
    fn kvm_request_numbers() {
        // From <linux/kvm.h> on x86_64.
        assert_eq!(allowlist::KVM_RUN, 0xae80);
        assert_eq!(allowlist::KVM_IRQFD, 0x4020_ae76);
        assert_eq!(allowlist::KVM_IOEVENTFD, 0x4040_ae79);
        assert_eq!(allowlist::KVM_SET_GSI_ROUTING, 0x4008_ae6a);
        assert_eq!(allowlist::KVM_SIGNAL_MSI, 0x4020_aea5);
        assert_eq!(allowlist::KVM_SET_USER_MEMORY_REGION, 0x4020_ae46);
        assert_eq!(allowlist::KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(allowlist::KVM_GET_SREGS, 0x8138_ae83);
    }

    #[test]
    fn the_report_names_thread_and_call() {
        let mut name = [0u8; 32];
        name[..5].copy_from_slice(b"vcpu0");
        let m = violation_message(&name, libc::SYS_mount);
        assert_eq!(
            std::str::from_utf8(&m.buf[..m.len]).unwrap(),
            "cryptvm: thread 'vcpu0' made forbidden system call 165 (mount); see docs/security.md\n"
        );
        let m = violation_message(&[0; 32], 9999);
        assert_eq!(
            std::str::from_utf8(&m.buf[..m.len]).unwrap(),
            "cryptvm: thread '?' made forbidden system call 9999 (unknown); see docs/security.md\n"
        );
    }

    #[test]
    fn modes_parse() {
        assert_eq!(SeccompMode::parse("on"), Ok(SeccompMode::On));
        assert_eq!(SeccompMode::parse("off"), Ok(SeccompMode::Off));
        assert_eq!(SeccompMode::parse("log"), Ok(SeccompMode::Log));
        assert!(SeccompMode::parse("bogus").is_err());
        for kind in ThreadKind::ALL {
            assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
        }
    }
}
