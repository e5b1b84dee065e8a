//! What glibc does behind the program's back, made safe under the filters.
//!
//! glibc's malloc opens files lazily, once per process, from whichever thread gets
//! there first: `/proc/sys/vm/overcommit_memory` the first time a thread's heap
//! shrinks (`check_may_shrink_heap`, reached from `free`), and
//! `/sys/devices/system/cpu/online` the first time it would make a ninth arena
//! (`__get_nprocs`). A QMP writer thread freeing a buffer under load killed the VMM
//! that way. So: the arena limit is set beforehand ([`bound_arenas`], glibc's own
//! default of 8 per CPU: glibc then never counts CPUs), and threads that have no
//! business opening files get `EACCES` from `open`/`openat` ([`no_open`]) instead of
//! being killed; glibc takes a failed open as "no information" and goes on.

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The calls [`no_open`] makes fail.
pub const OPEN_CALLS: [i64; 2] = [libc::SYS_open, libc::SYS_openat];

/// Sets malloc's arena limit, so that no allocation counts CPUs later. Call it before
/// the filters, with no other thread running.
pub fn bound_arenas() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let arenas = i32::try_from(cpus.saturating_mul(8)).unwrap_or(i32::MAX);
    // SAFETY: sets one malloc tunable; any value is valid.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, arenas);
    }
}

/// A filter under which `open` and `openat` fail with `EACCES` and every other call
/// passes, installed before the thread's own filter (of two filters the stricter
/// result wins, so the own filter lets the open calls through to this one).
pub fn no_open() -> Result<BpfProgram, seccompiler::Error> {
    let rules = OPEN_CALLS.iter().map(|&nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    use super::super::{program, SeccompMode, ThreadKind};
    use super::*;

    const CHILD_ENV: &str = "CRYPTVM_GLIBC_TEST_CHILD";
    const TEST: &str =
        "seccomp::glibc::tests::threads_that_allocate_and_free_under_their_filters_live";
    const THREADS: usize = 12;

    /// The filters each test thread installs.
    static PROGRAMS: std::sync::OnceLock<Vec<BpfProgram>> = std::sync::OnceLock::new();

    /// A raw thread (no Rust runtime allocation before its filter): filters first,
    /// then the first allocation of the thread (a new arena), then enough small
    /// blocks freed together that the thread's heap shrinks.
    extern "C" fn thread(_: *mut libc::c_void) -> *mut libc::c_void {
        for p in PROGRAMS.get().expect("programs") {
            seccompiler::apply_filter(p).expect("apply");
        }
        let blocks: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; 512]).collect();
        drop(std::hint::black_box(blocks));
        std::ptr::null_mut()
    }

    /// In the child: THREADS raw threads alive at once; exits 0 if all of them ran.
    fn child(mode: &str) -> ! {
        let programs = if mode == "vmm" {
            super::super::install_sigsys_handler().expect("handler");
            bound_arenas();
            program(ThreadKind::QmpWriter, SeccompMode::On).expect("program")
        } else {
            // Only `openat` refused, with death: what glibc does is then visible.
            let rules = BTreeMap::from([(libc::SYS_openat, Vec::new())]);
            let kill = SeccompFilter::new(
                rules,
                SeccompAction::Allow,
                SeccompAction::KillProcess,
                TargetArch::x86_64,
            )
            .and_then(BpfProgram::try_from)
            .expect("filter");
            vec![kill]
        };
        PROGRAMS.set(programs).expect("once");
        let mut ids = [0 as libc::pthread_t; THREADS];
        for id in ids.iter_mut() {
            // SAFETY: `id` is valid to write; `thread` has the signature
            // pthread_create wants and ignores its argument.
            let r =
                unsafe { libc::pthread_create(id, std::ptr::null(), thread, std::ptr::null_mut()) };
            assert_eq!(r, 0);
        }
        for id in ids {
            // SAFETY: joins a thread created above, once.
            unsafe { libc::pthread_join(id, std::ptr::null_mut()) };
        }
        std::process::exit(0)
    }

    /// Under the VMM's filters (the QMP writer's, which has no open calls) the
    /// threads live; under a filter that kills on `openat` the same threads die by
    /// SIGSYS, which shows that glibc opens a file on this path.
    #[test]
    fn threads_that_allocate_and_free_under_their_filters_live() {
        if let Ok(mode) = std::env::var(CHILD_ENV) {
            child(&mode);
        }
        let run = |mode: &str| {
            Command::new(std::env::current_exe().expect("test binary"))
                .args(["--exact", TEST, "--test-threads=1", "--nocapture"])
                .env(CHILD_ENV, mode)
                .status()
                .expect("running the child")
        };
        let killed = run("kill-on-openat");
        assert_eq!(killed.signal(), Some(libc::SIGSYS), "{killed:?}");
        let vmm = run("vmm");
        assert_eq!(vmm.code(), Some(0), "{vmm:?}");
    }
}
