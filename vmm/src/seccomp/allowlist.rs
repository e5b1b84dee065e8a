//! The allow-lists: which system calls (and which `ioctl` requests, `prctl`
//! options, ...) each kind of thread may make. docs/security.md lists them in
//! prose; keep the two together.
//!
//! A list is built from groups ([`BASE`], [`FILE_IO`], ...). A thread that
//! starts other threads after its own filter is in place also gets the lists
//! of those threads ([`ThreadKind::spawns`]): seccomp filters stack, and a
//! child is held to its parent's filter as well as its own.

use kvm_bindings::{
    kvm_ioeventfd, kvm_irq_level, kvm_irq_routing, kvm_irqfd, kvm_msi, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region,
};

use super::ThreadKind;

/// One allowed system call: its number (`libc::SYS_*` name kept for
/// messages), and optionally the values one of its arguments may take
/// (`(argument index, values)`; none: any value).
#[derive(Debug, Clone, Copy)]
pub(super) struct Allow {
    /// `SYS_name`, as `libc` spells the constant.
    pub sys: &'static str,
    /// The system call number.
    pub nr: i64,
    /// The argument checked, and its allowed values.
    pub arg: Option<(u8, &'static [Named])>,
}

impl Allow {
    /// The system call's name (`read`).
    pub fn name(&self) -> &'static str {
        self.sys.strip_prefix("SYS_").unwrap_or(self.sys)
    }
}

/// A named argument value (an `ioctl` request, a `prctl` option).
pub(super) type Named = (&'static str, u64);

/// `Allow`s for syscalls with any arguments: `any![SYS_read, SYS_write]`.
macro_rules! any {
    ($($sys:ident),* $(,)?) => {
        &[$(Allow { sys: stringify!($sys), nr: libc::$sys, arg: None }),*]
    };
}

/// An `Allow` for a syscall whose argument `$arg` must be one of `$values`.
macro_rules! only {
    ($sys:ident, $arg:expr, $values:expr) => {
        Allow {
            sys: stringify!($sys),
            nr: libc::$sys,
            arg: Some(($arg, $values)),
        }
    };
}

const KVMIO: u64 = 0xAE;

const fn io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}

const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

const fn iow(nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

/// `KVM_RUN`.
pub(super) const KVM_RUN: u64 = io(0x80);
/// `KVM_CHECK_EXTENSION`.
pub(super) const KVM_CHECK_EXTENSION: u64 = io(0x03);
/// `KVM_GET_REGS`.
pub(super) const KVM_GET_REGS: u64 = ior(0x81, std::mem::size_of::<kvm_regs>());
/// `KVM_GET_SREGS`.
pub(super) const KVM_GET_SREGS: u64 = ior(0x83, std::mem::size_of::<kvm_sregs>());
/// `KVM_IRQFD`.
pub(super) const KVM_IRQFD: u64 = iow(0x76, std::mem::size_of::<kvm_irqfd>());
/// `KVM_IOEVENTFD`.
pub(super) const KVM_IOEVENTFD: u64 = iow(0x79, std::mem::size_of::<kvm_ioeventfd>());
/// `KVM_SET_GSI_ROUTING`.
pub(super) const KVM_SET_GSI_ROUTING: u64 = iow(0x6a, std::mem::size_of::<kvm_irq_routing>());
/// `KVM_SIGNAL_MSI`.
pub(super) const KVM_SIGNAL_MSI: u64 = iow(0xa5, std::mem::size_of::<kvm_msi>());
/// `KVM_SET_USER_MEMORY_REGION`.
pub(super) const KVM_SET_USER_MEMORY_REGION: u64 =
    iow(0x46, std::mem::size_of::<kvm_userspace_memory_region>());
/// `KVM_IRQ_LINE`.
pub(super) const KVM_IRQ_LINE: u64 = iow(0x61, std::mem::size_of::<kvm_irq_level>());

/// The KVM VM requests devices make after the VM is built: interrupt lines
/// and doorbells of hot-plugged disks, MSI routes, BARs moved.
const KVM_VM_IOCTLS: &[Named] = &[
    ("KVM_IRQFD", KVM_IRQFD),
    ("KVM_IOEVENTFD", KVM_IOEVENTFD),
    ("KVM_SET_GSI_ROUTING", KVM_SET_GSI_ROUTING),
    ("KVM_SIGNAL_MSI", KVM_SIGNAL_MSI),
    ("KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION),
    ("KVM_IRQ_LINE", KVM_IRQ_LINE),
    ("KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION),
];

/// A vCPU's own requests, and the VM's (devices run on the vCPU that
/// touched their registers).
const VCPU_IOCTLS: &[Named] = &[
    ("KVM_RUN", KVM_RUN),
    ("KVM_GET_REGS", KVM_GET_REGS),
    ("KVM_GET_SREGS", KVM_GET_SREGS),
    ("KVM_IRQFD", KVM_IRQFD),
    ("KVM_IOEVENTFD", KVM_IOEVENTFD),
    ("KVM_SET_GSI_ROUTING", KVM_SET_GSI_ROUTING),
    ("KVM_SIGNAL_MSI", KVM_SIGNAL_MSI),
    ("KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION),
    ("KVM_IRQ_LINE", KVM_IRQ_LINE),
    ("KVM_CHECK_EXTENSION", KVM_CHECK_EXTENSION),
];

/// The terminal: raw mode on and off, its size; `FIONBIO` and `FIOCLEX` as
/// the standard library sets them on descriptors.
const TERMINAL_IOCTLS: &[Named] = &[
    ("TCGETS", libc::TCGETS),
    ("TCSETS", libc::TCSETS),
    ("TCSETSW", libc::TCSETSW),
    ("TCSETSF", libc::TCSETSF),
    ("TIOCGWINSZ", libc::TIOCGWINSZ),
    ("FIONBIO", libc::FIONBIO),
    ("FIOCLEX", libc::FIOCLEX),
];

/// `ioctl`s the standard library makes on sockets (`set_nonblocking`).
const SOCKET_IOCTLS: &[Named] = &[("FIONBIO", libc::FIONBIO), ("FIOCLEX", libc::FIOCLEX)];

/// The `prctl` options a thread start makes (the thread's name; the seccomp
/// filter's `PR_SET_NO_NEW_PRIVS`).
const PRCTL_OPTIONS: &[Named] = &[
    ("PR_SET_NAME", libc::PR_SET_NAME as u64),
    ("PR_GET_NAME", libc::PR_GET_NAME as u64),
    ("PR_SET_NO_NEW_PRIVS", libc::PR_SET_NO_NEW_PRIVS as u64),
    ("PR_GET_NO_NEW_PRIVS", libc::PR_GET_NO_NEW_PRIVS as u64),
    ("PR_GET_SECCOMP", libc::PR_GET_SECCOMP as u64),
];

/// `seccomp(2)` operations: only adding a filter (a new thread's own).
const SECCOMP_OPERATIONS: &[Named] = &[(
    "SECCOMP_SET_MODE_FILTER",
    libc::SECCOMP_SET_MODE_FILTER as u64,
)];

/// What every thread needs: memory, locks, time, signals (the vCPU kick, the
/// forbidden-call report), thread exit, messages on stderr, random seeds.
pub(super) const BASE: &[Allow] = any![
    SYS_read,
    SYS_write,
    SYS_readv,
    SYS_writev,
    SYS_close,
    SYS_brk,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_mprotect,
    SYS_madvise,
    SYS_mlock,
    SYS_mlock2,
    SYS_munlock,
    SYS_futex,
    SYS_get_robust_list,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_sched_yield,
    SYS_sched_getaffinity,
    SYS_clock_gettime,
    SYS_clock_getres,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_gettimeofday,
    SYS_getrandom,
    SYS_getpid,
    SYS_gettid,
    SYS_tgkill,
    SYS_rt_sigreturn,
    SYS_rt_sigprocmask,
    SYS_sigaltstack,
    SYS_restart_syscall,
    SYS_exit,
    SYS_exit_group,
];

/// Reading and writing open files: the block layer's I/O, flushes and size
/// changes, its file locks.
pub(super) const FILE_IO: &[Allow] = any![
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_lseek,
    SYS_fsync,
    SYS_fdatasync,
    SYS_sync_file_range,
    SYS_fallocate,
    SYS_ftruncate,
    SYS_fadvise64,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_fstatfs,
    SYS_flock,
    SYS_fcntl,
    SYS_dup,
];

/// Copying descriptors (an eventfd handed to KVM and kept).
pub(super) const DESCRIPTORS: &[Allow] = any![SYS_fcntl, SYS_dup, SYS_dup3];

/// Opening files by name (`blockdev-add`, `object-add` with a secret file):
/// paths resolved, folders read.
pub(super) const FILE_OPEN: &[Allow] = any![
    SYS_openat,
    SYS_open,
    SYS_stat,
    SYS_lstat,
    SYS_statfs,
    SYS_readlink,
    SYS_readlinkat,
    SYS_getcwd,
    SYS_getdents64,
    SYS_access,
    SYS_faccessat,
    SYS_faccessat2,
];

/// Waiting for descriptors: epoll, eventfds, poll.
pub(super) const POLL: &[Allow] = any![
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_eventfd2,
    SYS_poll,
    SYS_ppoll,
];

/// QMP's connections: accepting, reading, writing, timeouts, closing.
pub(super) const SOCKET: &[Allow] = any![
    SYS_accept4,
    SYS_accept,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_sendto,
    SYS_sendmsg,
    SYS_shutdown,
    SYS_getsockopt,
    SYS_setsockopt,
    SYS_getsockname,
    SYS_getpeername,
    SYS_fcntl,
];

/// The `ioctl`s on QMP's sockets.
pub(super) const SOCKET_CTL: &[Allow] = &[only!(SYS_ioctl, 1, SOCKET_IOCTLS)];

/// Removing the QMP socket's file when the server stops.
pub(super) const UNLINK: &[Allow] = any![SYS_unlink, SYS_unlinkat];

/// Starting threads (and their filters).
pub(super) const SPAWN: &[Allow] = &[
    Allow {
        sys: "SYS_clone",
        nr: libc::SYS_clone,
        arg: None,
    },
    Allow {
        sys: "SYS_clone3",
        nr: libc::SYS_clone3,
        arg: None,
    },
    only!(SYS_prctl, 0, PRCTL_OPTIONS),
    only!(SYS_seccomp, 0, SECCOMP_OPERATIONS),
];

/// The KVM VM requests of the control plane (hot plug, teardown).
pub(super) const KVM_VM: &[Allow] = &[only!(SYS_ioctl, 1, KVM_VM_IOCTLS)];

/// A vCPU's KVM requests.
pub(super) const KVM_VCPU: &[Allow] = &[only!(SYS_ioctl, 1, VCPU_IOCTLS)];

/// The host terminal (raw mode restored at exit).
pub(super) const TERMINAL: &[Allow] = &[only!(SYS_ioctl, 1, TERMINAL_IOCTLS)];

/// The groups a thread of `kind` is allowed, its own (without those of the
/// threads it starts: see [`super::rules`]).
pub(super) fn own_groups(kind: ThreadKind) -> &'static [&'static [Allow]] {
    match kind {
        // After the VM is built the main thread waits for the end, then stops
        // everything: kicks the vCPUs, joins, flushes and closes the disks,
        // removes the QMP socket, restores the terminal.
        ThreadKind::Main => &[
            BASE,
            DESCRIPTORS,
            FILE_IO,
            FILE_OPEN,
            POLL,
            SOCKET,
            SOCKET_CTL,
            UNLINK,
            KVM_VM,
            TERMINAL,
        ],
        // KVM_RUN, and the devices' register accesses it returns with.
        ThreadKind::Vcpu => &[BASE, DESCRIPTORS, KVM_VCPU, POLL],
        ThreadKind::EventLoop => &[BASE, DESCRIPTORS, POLL, TERMINAL],
        ThreadKind::VirtioQueue => &[BASE, DESCRIPTORS, POLL],
        ThreadKind::IoWorker => &[BASE, DESCRIPTORS, FILE_IO, POLL],
        ThreadKind::Crypto => &[BASE],
        // Ejected disks: doorbells and interrupts let go, queue threads
        // stopped, the disk flushed, DEVICE_DELETED sent.
        ThreadKind::Hotplug => &[BASE, DESCRIPTORS, FILE_IO, POLL, SOCKET, SOCKET_CTL, KVM_VM],
        ThreadKind::QmpAccept => &[BASE, DESCRIPTORS, POLL, SOCKET, SOCKET_CTL, UNLINK, SPAWN],
        // Every command runs here: blockdev-add opens and reads images,
        // device_add wires a disk to KVM and starts its queue threads.
        ThreadKind::QmpClient => &[
            BASE,
            DESCRIPTORS,
            FILE_IO,
            FILE_OPEN,
            POLL,
            SOCKET,
            SOCKET_CTL,
            KVM_VM,
            SPAWN,
        ],
        ThreadKind::QmpWriter => &[BASE, DESCRIPTORS, POLL, SOCKET, SOCKET_CTL],
        // Hands held events to the clients' writers (a client gone: its
        // socket shut down).
        ThreadKind::QmpEvents => &[BASE, DESCRIPTORS, POLL, SOCKET, SOCKET_CTL],
    }
}

/// Forbidden calls worth naming in a report (the allowed ones are named by
/// the lists).
pub(super) const NOTABLE: &[(&str, i64)] = &[
    ("execve", libc::SYS_execve),
    ("execveat", libc::SYS_execveat),
    ("ptrace", libc::SYS_ptrace),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("setuid", libc::SYS_setuid),
    ("setgid", libc::SYS_setgid),
    ("socket", libc::SYS_socket),
    ("connect", libc::SYS_connect),
    ("bind", libc::SYS_bind),
    ("listen", libc::SYS_listen),
    ("fork", libc::SYS_fork),
    ("vfork", libc::SYS_vfork),
    ("kill", libc::SYS_kill),
    ("ioctl", libc::SYS_ioctl),
    ("openat", libc::SYS_openat),
    ("clone", libc::SYS_clone),
    ("clone3", libc::SYS_clone3),
    ("prctl", libc::SYS_prctl),
    ("seccomp", libc::SYS_seccomp),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("chroot", libc::SYS_chroot),
    ("pivot_root", libc::SYS_pivot_root),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("mknodat", libc::SYS_mknodat),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("memfd_create", libc::SYS_memfd_create),
    ("mkdir", libc::SYS_mkdir),
    ("mkdirat", libc::SYS_mkdirat),
    ("rename", libc::SYS_rename),
    ("renameat2", libc::SYS_renameat2),
    ("chmod", libc::SYS_chmod),
    ("fchmodat", libc::SYS_fchmodat),
    ("socketpair", libc::SYS_socketpair),
    ("pipe2", libc::SYS_pipe2),
    ("wait4", libc::SYS_wait4),
    ("uname", libc::SYS_uname),
    ("sysinfo", libc::SYS_sysinfo),
    ("getrusage", libc::SYS_getrusage),
    ("getuid", libc::SYS_getuid),
    ("geteuid", libc::SYS_geteuid),
    ("rt_sigaction", libc::SYS_rt_sigaction),
    ("sched_setaffinity", libc::SYS_sched_setaffinity),
    ("membarrier", libc::SYS_membarrier),
    ("pidfd_open", libc::SYS_pidfd_open),
];
