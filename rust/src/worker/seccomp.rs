//! seccomp-bpf allow-lists per thread kind, compiled with `seccompiler`.
//!
//! A worker calls [`prepare`] once, before it builds the VM: that compiles the four filters
//! (vCPU, device, file server, control) into a process-global and installs the `SIGSYS` handler. Each thread
//! then installs its own filter with [`apply`] (no TSYNC: the kinds need different lists), the
//! vCPU and device threads at their start, the control thread once the VM is built and jailed.
//! Without [`prepare`], [`apply`] does nothing: the in-process VMM is never filtered.
//!
//! The lists were taken from what the threads really call (the VMM's tests run under `strace -f`,
//! the system calls grouped by thread name), then widened with harmless calls the same code may
//! make on paths the tests did not take (allocator growth, a restarted sleep, a panic message).
//! Where a call is dangerous with some arguments only, an argument rule narrows it: `socket`
//! only for `AF_UNIX`, `ioctl` only for the KVM and descriptor requests in use, `mmap` and
//! `mprotect` never with `PROT_EXEC`, `tgkill` only with the vCPU kick and `SIGABRT`.
//!
//! Everything else traps: `SIGSYS` reaches [`handle_sigsys`], which writes one line naming the
//! thread and the call to stderr and ends the whole process with [`EXIT_SECCOMP_DENIED`]. An
//! exit code rather than a fatal signal because the worker is PID 1 of its PID namespace, and
//! such a process ignores signals it sends itself with their default action. One exception:
//! glibc blocks every signal around `clone` when it creates a thread, and a trap while `SIGSYS`
//! is blocked is delivered by the kernel as a plain `SIGSYS` kill (no line, "killed by signal
//! 31"); the owner should report both the same way.
//!
//! Not allowed for any kind: starting programs (`execve`, `execveat`), new processes or threads
//! (`fork`, `vfork`, `clone`, `clone3`: every thread exists before its filter is installed, and
//! one created later would inherit its creator's list anyway), opening paths (`open`, `openat`,
//! `openat2`, `creat`: after the jail the worker only uses descriptors it holds or is sent;
//! the one exception is the file server of a shared folder, whose own list has `openat2` and
//! the `*at` calls, see [`ThreadKind::Fs`]),
//! other socket families, `ptrace`, `process_vm_*`, mounts and root changes, namespaces,
//! credentials, `bpf`, `perf_event_open`, keyrings, modules, `kexec`, `personality`,
//! `userfaultfd`, `prctl` and `seccomp` itself.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Exit status of a worker that made a forbidden system call (128 + `SIGSYS`, as a shell would
/// report a process killed by that signal).
pub const EXIT_SECCOMP_DENIED: i32 = 159;

/// Which filter a thread installs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread: `KVM_RUN` and the device emulation it does on MMIO/PIO exits.
    Vcpu,
    /// A device's own thread (the vsock event loop).
    Device,
    /// The thread of a shared folder's file server (virtio-fs): the only kind that may open
    /// and change files, and only relative to directory descriptors (Landlock confines it to
    /// the shared folders).
    Fs,
    /// The worker's main thread: the control channel, snapshots, pause/resume.
    Control,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Fs => "fs",
            ThreadKind::Control => "control",
        }
    }
}

/// What a filter does with a call outside its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// End the worker (trap, diagnose on stderr, exit with [`EXIT_SECCOMP_DENIED`]).
    Enforce,
    /// Allow the call but have the kernel log it (`SECCOMP_RET_LOG`, audit type 1326): for
    /// finding what a list lacks without killing the worker.
    Log,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("the {kind} seccomp filter cannot be compiled: {msg}")]
    Compile { kind: &'static str, msg: String },
    #[error("the seccomp filters were already prepared in {prepared:?} mode, not {asked:?}")]
    ModeMismatch { prepared: Mode, asked: Mode },
    #[error("the SIGSYS handler for seccomp cannot be installed: {0}")]
    Handler(String),
    #[error("no_new_privs cannot be set for the {kind} thread: {msg}")]
    NoNewPrivs { kind: &'static str, msg: String },
    #[error("the {kind} seccomp filter cannot be installed: {msg}")]
    Install { kind: &'static str, msg: String },
    #[error("the {kind} thread cannot be confined: {msg}")]
    Confine { kind: &'static str, msg: String },
}

/// The argument rule of one allowed call. Values are compared on the low 32 bits, which hold
/// every value the rules name (requests, families, commands, signals, protections).
#[derive(Debug, Clone, Copy)]
enum Args {
    /// Any arguments.
    Any,
    /// Argument `arg` is one of `values`.
    OneOf {
        arg: u8,
        values: &'static [u64],
    },
    /// Argument `arg` (a `PROT_*` set) does not contain `PROT_EXEC`.
    NoExec {
        arg: u8,
    },
    /// The signal (argument 2 of `tgkill`) is the vCPU kick or `SIGABRT`; the kick's number is
    /// only known at run time.
    KickOrAbort,
    /// `setresuid`/`setresgid` to exactly the ids the worker drops to (all three the same), and
    /// `setgroups` to none: the jail's privilege drop runs in every thread (glibc makes each
    /// thread change its own ids), including threads already filtered. Nothing else may change.
    DropUid,
    DropGid,
    NoGroups,
}

/// One allowed system call.
#[derive(Debug, Clone, Copy)]
struct Allow {
    nr: libc::c_long,
    name: &'static str,
    args: Args,
}

/// `allow!(SYS_name)` or `allow!(SYS_name, rule)`.
macro_rules! allow {
    ($sys:ident) => {
        allow!($sys, Args::Any)
    };
    ($sys:ident, $args:expr) => {
        Allow {
            nr: libc::$sys,
            name: stringify!($sys),
            args: $args,
        }
    };
}

/// `(libc::SYS_name, "SYS_name")`.
macro_rules! named {
    ($($sys:ident),* $(,)?) => {
        &[$((libc::$sys, stringify!($sys))),*]
    };
}

// ioctl request numbers (`_IOC` of asm-generic/ioctl.h; KVM's from linux/kvm.h), so the lists
// can name exactly the requests each thread makes.
const KVMIO: u64 = 0xAE;
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const fn io(nr: u64) -> u64 {
    ioc(0, nr, 0)
}
const fn iow<T>(nr: u64) -> u64 {
    ioc(1, nr, std::mem::size_of::<T>())
}
const fn ior<T>(nr: u64) -> u64 {
    ioc(2, nr, std::mem::size_of::<T>())
}
const fn iowr<T>(nr: u64) -> u64 {
    ioc(3, nr, std::mem::size_of::<T>())
}

use kvm_bindings as kb;

const KVM_RUN: u64 = io(0x80);
const KVM_GET_REGS: u64 = ior::<kb::kvm_regs>(0x81);
const KVM_GET_SREGS: u64 = ior::<kb::kvm_sregs>(0x83);
const KVM_GET_MSRS: u64 = iowr::<kb::kvm_msrs>(0x88);
const KVM_GET_FPU: u64 = ior::<kb::kvm_fpu>(0x8c);
const KVM_GET_LAPIC: u64 = ior::<kb::kvm_lapic_state>(0x8e);
const KVM_GET_MP_STATE: u64 = ior::<kb::kvm_mp_state>(0x98);
const KVM_GET_VCPU_EVENTS: u64 = ior::<kb::kvm_vcpu_events>(0x9f);
const KVM_GET_DEBUGREGS: u64 = ior::<kb::kvm_debugregs>(0xa1);
const KVM_GET_TSC_KHZ: u64 = io(0xa3);
const KVM_GET_XSAVE: u64 = ior::<kb::kvm_xsave>(0xa4);
const KVM_GET_XCRS: u64 = ior::<kb::kvm_xcrs>(0xa6);
const KVM_KVMCLOCK_CTRL: u64 = io(0xad);
const KVM_GET_XSAVE2: u64 = ior::<kb::kvm_xsave>(0xcf);
const KVM_GET_IRQCHIP: u64 = iowr::<kb::kvm_irqchip>(0x62);
const KVM_GET_PIT2: u64 = ior::<kb::kvm_pit_state2>(0x9f);
const KVM_GET_CLOCK: u64 = ior::<kb::kvm_clock_data>(0x7c);
const KVM_GET_DIRTY_LOG: u64 = iow::<kb::kvm_dirty_log>(0x42);
const KVM_CLEAR_DIRTY_LOG: u64 = iowr::<kb::kvm_clear_dirty_log>(0xc0);
/// Rust's `set_nonblocking` on sockets.
const FIONBIO: u64 = libc::FIONBIO;
/// Close-on-exec through ioctl (what some libraries use instead of fcntl).
const FIOCLEX: u64 = libc::FIOCLEX;

const PROT: Args = Args::NoExec { arg: 2 };
const UNIX_ONLY: Args = Args::OneOf {
    arg: 0,
    values: &[libc::AF_UNIX as u64],
};
/// Descriptor flags and status flags, and duplicating with close-on-exec; not locks, leases,
/// owners or signals.
const FCNTL: Args = Args::OneOf {
    arg: 1,
    values: &[
        libc::F_GETFD as u64,
        libc::F_SETFD as u64,
        libc::F_GETFL as u64,
        libc::F_SETFL as u64,
        libc::F_DUPFD_CLOEXEC as u64,
    ],
};

/// Every kind: the runtime underneath any Rust thread.
const COMMON: &[Allow] = &[
    // The SIGSYS handler's own calls (it must be able to report and exit under any filter),
    // and the end of a thread or of the process.
    allow!(SYS_write),
    allow!(SYS_exit_group),
    allow!(SYS_rt_sigreturn),
    allow!(SYS_exit),
    // The allocator (glibc malloc grows arenas with mprotect, frees with madvise) and the
    // thread's own stacks at exit; never executable memory.
    allow!(SYS_brk),
    allow!(SYS_mmap, PROT),
    allow!(SYS_mprotect, PROT),
    allow!(SYS_munmap),
    allow!(SYS_mremap),
    allow!(SYS_madvise),
    // Locks, condition variables, time, sleeping (and a sleep restarted after the vCPU kick).
    allow!(SYS_futex),
    allow!(SYS_clock_gettime),
    allow!(SYS_gettimeofday),
    allow!(SYS_nanosleep),
    allow!(SYS_clock_nanosleep),
    allow!(SYS_restart_syscall),
    allow!(SYS_sched_yield),
    allow!(SYS_getpid),
    allow!(SYS_gettid),
    // Signal masks, the alternate signal stack Rust sets up and removes per thread, and the
    // vCPU kick (`VmControl::finish` and pause kick every vCPU) or an abort.
    allow!(SYS_rt_sigprocmask),
    allow!(SYS_sigaltstack),
    // Rust's SIGSEGV/SIGBUS handler (stack-overflow detection) restores the default action
    // for a fault that is not a guard-page hit, so the fault ends the worker as that signal
    // (a SIGBUS from a shrunk memory file is reported as such).
    allow!(SYS_rt_sigaction),
    allow!(SYS_tgkill, Args::KickOrAbort),
    // The jail's privilege drop, to the prepared ids only (see `Args::DropUid`).
    allow!(SYS_setresuid, Args::DropUid),
    allow!(SYS_setresgid, Args::DropGid),
    allow!(SYS_setgroups, Args::NoGroups),
    // Hash-map seeds.
    allow!(SYS_getrandom),
    // Descriptors this thread already holds.
    allow!(SYS_read),
    allow!(SYS_close),
    allow!(SYS_fcntl, FCNTL),
];

/// vCPU threads: `KVM_RUN`, and on MMIO/PIO exits the device emulation — virtio-blk I/O on
/// the disk file, serial output to the console log, eventfd writes for interrupts and for the
/// vsock device's kick.
const VCPU: &[Allow] = &[
    allow!(
        SYS_ioctl,
        Args::OneOf {
            arg: 1,
            // KVM_GET_REGS: the instruction pointer reported with an internal error.
            values: &[KVM_RUN, KVM_GET_REGS],
        }
    ),
    allow!(SYS_pread64),
    allow!(SYS_pwrite64),
    allow!(SYS_preadv),
    allow!(SYS_pwritev),
    allow!(SYS_readv),
    allow!(SYS_writev),
    allow!(SYS_lseek),
    allow!(SYS_fsync),
    allow!(SYS_fdatasync),
    allow!(SYS_fstat),
    allow!(SYS_statx),
];

/// The vsock event thread: polls the listening socket, host connections and its eventfd;
/// accepts, connects to `<path>_<port>` (Unix sockets only), relays bytes; times with the clock.
const DEVICE: &[Allow] = &[
    allow!(
        SYS_ioctl,
        Args::OneOf {
            arg: 1,
            values: &[FIONBIO, FIOCLEX],
        }
    ),
    allow!(SYS_poll),
    allow!(SYS_ppoll),
    allow!(SYS_epoll_create1),
    allow!(SYS_epoll_ctl),
    allow!(SYS_epoll_wait),
    allow!(SYS_epoll_pwait),
    allow!(SYS_eventfd2),
    allow!(SYS_timerfd_create),
    allow!(SYS_timerfd_settime),
    allow!(SYS_timerfd_gettime),
    allow!(SYS_socket, UNIX_ONLY),
    allow!(SYS_connect),
    allow!(SYS_accept4),
    allow!(SYS_shutdown),
    allow!(SYS_sendto),
    allow!(SYS_recvfrom),
    allow!(SYS_sendmsg),
    allow!(SYS_recvmsg),
    allow!(SYS_getsockopt),
    allow!(SYS_readv),
    allow!(SYS_writev),
    allow!(SYS_fstat),
    allow!(SYS_statx),
    // A rate-limited disk's timer thread serves delayed requests on the disk file.
    allow!(SYS_pread64),
    allow!(SYS_pwrite64),
    allow!(SYS_preadv),
    allow!(SYS_pwritev),
    allow!(SYS_fsync),
    allow!(SYS_fdatasync),
];

/// The file server of a shared folder (`devices::virtio::fs`): waits for its kick, and works
/// on the folder only through descriptors it holds: `openat2` (which the server always calls
/// with `RESOLVE_BENEATH` and friends; seccomp cannot see inside `open_how`, Landlock limits it
/// to the shared folders), the `*at` calls relative to a directory, and I/O on open files.
/// Not `open`, `openat`, `mknodat`, `chdir` or any call that takes a path alone.
const FS: &[Allow] = &[
    allow!(SYS_poll),
    allow!(SYS_ppoll),
    allow!(SYS_openat2),
    allow!(SYS_newfstatat),
    allow!(SYS_fstat),
    allow!(SYS_statx),
    allow!(SYS_fstatfs),
    allow!(SYS_mkdirat),
    allow!(SYS_symlinkat),
    allow!(SYS_readlinkat),
    allow!(SYS_linkat),
    allow!(SYS_unlinkat),
    allow!(SYS_renameat2),
    allow!(SYS_fchownat),
    allow!(SYS_fchmod),
    allow!(SYS_fchmodat2),
    allow!(SYS_ftruncate),
    allow!(SYS_utimensat),
    allow!(SYS_pread64),
    allow!(SYS_pwrite64),
    allow!(SYS_lseek),
    allow!(SYS_getdents64),
    allow!(SYS_fsync),
    allow!(SYS_fdatasync),
];

/// Calls only the [`FS`] list may make (every other kind must not touch files by name).
const FS_ONLY: &[(libc::c_long, &str)] = named![
    SYS_openat2,
    SYS_mkdirat,
    SYS_symlinkat,
    SYS_readlinkat,
    SYS_linkat,
    SYS_renameat2,
    SYS_fchownat,
    SYS_fchmod,
    SYS_fchmodat2,
    SYS_utimensat,
    SYS_getdents64,
];

/// The control thread after the jail: the control socket (descriptors arrive with
/// SCM_RIGHTS), pause (kicks) and resume, snapshots — vCPU and VM state through KVM's GET
/// requests, the dirty log, guest memory written to and compared with descriptors it was
/// passed (mapped, read, written, sized, synced), `/proc/self/pagemap` opened before the jail
/// — and the VM's end (joining threads, removing the vsock socket file in the jail).
const CONTROL: &[Allow] = &[
    allow!(
        SYS_ioctl,
        Args::OneOf {
            arg: 1,
            values: &[
                KVM_GET_REGS,
                KVM_GET_SREGS,
                KVM_GET_MSRS,
                KVM_GET_FPU,
                KVM_GET_LAPIC,
                KVM_GET_MP_STATE,
                KVM_GET_VCPU_EVENTS,
                KVM_GET_DEBUGREGS,
                KVM_GET_TSC_KHZ,
                KVM_GET_XSAVE,
                KVM_GET_XSAVE2,
                KVM_GET_XCRS,
                KVM_KVMCLOCK_CTRL,
                KVM_GET_IRQCHIP,
                KVM_GET_PIT2,
                KVM_GET_CLOCK,
                KVM_GET_DIRTY_LOG,
                KVM_CLEAR_DIRTY_LOG,
                FIONBIO,
                FIOCLEX,
            ],
        }
    ),
    allow!(SYS_sendmsg),
    allow!(SYS_recvmsg),
    allow!(SYS_sendto),
    allow!(SYS_recvfrom),
    allow!(SYS_shutdown),
    allow!(SYS_poll),
    allow!(SYS_ppoll),
    allow!(SYS_epoll_create1),
    allow!(SYS_epoll_ctl),
    allow!(SYS_epoll_wait),
    allow!(SYS_epoll_pwait),
    allow!(SYS_eventfd2),
    allow!(SYS_pread64),
    allow!(SYS_pwrite64),
    allow!(SYS_preadv),
    allow!(SYS_pwritev),
    allow!(SYS_readv),
    allow!(SYS_writev),
    allow!(SYS_lseek),
    allow!(SYS_fsync),
    allow!(SYS_fdatasync),
    allow!(SYS_ftruncate),
    allow!(SYS_fallocate),
    allow!(SYS_fstat),
    allow!(SYS_newfstatat),
    allow!(SYS_statx),
    allow!(SYS_mincore),
    allow!(SYS_dup),
    allow!(SYS_unlink),
    allow!(SYS_unlinkat),
    allow!(SYS_sched_getaffinity),
];

/// Names of calls no list allows, for the diagnostic line.
const DENIED_NAMES: &[(libc::c_long, &str)] = named![
    SYS_open,
    SYS_openat,
    SYS_creat,
    SYS_execve,
    SYS_execveat,
    SYS_fork,
    SYS_vfork,
    SYS_clone,
    SYS_clone3,
    SYS_kill,
    SYS_ptrace,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_mount,
    SYS_umount2,
    SYS_pivot_root,
    SYS_chroot,
    SYS_chdir,
    SYS_unshare,
    SYS_setns,
    SYS_setuid,
    SYS_setgid,
    SYS_setresuid,
    SYS_setresgid,
    SYS_bind,
    SYS_listen,
    SYS_bpf,
    SYS_perf_event_open,
    SYS_keyctl,
    SYS_add_key,
    SYS_init_module,
    SYS_finit_module,
    SYS_kexec_load,
    SYS_personality,
    SYS_userfaultfd,
    SYS_prctl,
    SYS_seccomp,
    SYS_memfd_create,
    SYS_rename,
    SYS_renameat,
    SYS_mkdir,
    SYS_socketpair,
    SYS_mknodat,
    SYS_mknod,
    SYS_link,
    SYS_symlink,
    SYS_chmod,
    SYS_fchmodat,
    SYS_chown,
    SYS_lchown,
    SYS_truncate,
];

fn list(kind: ThreadKind) -> impl Iterator<Item = &'static Allow> {
    let own = match kind {
        ThreadKind::Vcpu => VCPU,
        ThreadKind::Device => DEVICE,
        ThreadKind::Fs => FS,
        ThreadKind::Control => CONTROL,
    };
    COMMON.iter().chain(own)
}

/// How many distinct system calls the filter of `kind` allows (some with argument rules).
pub fn allowed_count(kind: ThreadKind) -> usize {
    let mut nrs: Vec<_> = list(kind).map(|a| a.nr).collect();
    nrs.sort_unstable();
    nrs.dedup();
    nrs.len()
}

/// The name of system call `nr`, when the lists know it.
fn syscall_name(nr: libc::c_long) -> Option<&'static str> {
    COMMON
        .iter()
        .chain(VCPU)
        .chain(DEVICE)
        .chain(FS)
        .chain(CONTROL)
        .map(|a| (a.nr, a.name))
        .chain(DENIED_NAMES.iter().copied())
        .chain(FS_ONLY.iter().copied())
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| name.trim_start_matches("SYS_"))
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, seccompiler::Error> {
    Ok(SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        op,
        value,
    )?)
}

fn rules(args: Args) -> Result<Vec<SeccompRule>, seccompiler::Error> {
    let one = |arg: u8, op: SeccompCmpOp, value: u64| -> Result<SeccompRule, seccompiler::Error> {
        Ok(SeccompRule::new(vec![cond(arg, op, value)?])?)
    };
    match args {
        Args::Any => Ok(Vec::new()),
        Args::OneOf { arg, values } => values
            .iter()
            .map(|&v| one(arg, SeccompCmpOp::Eq, v))
            .collect(),
        Args::NoExec { arg } => Ok(vec![one(
            arg,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?]),
        Args::KickOrAbort => [crate::vmm::vcpu::kick_signal(), libc::SIGABRT]
            .iter()
            .map(|&s| one(2, SeccompCmpOp::Eq, s as u64))
            .collect(),
        Args::DropUid | Args::DropGid => {
            // Without prepared ids: only the no-op "leave every id as it is" (-1, -1, -1).
            let id = match (args, DROP_IDS.get().copied().flatten()) {
                (Args::DropUid, Some((uid, _))) => u64::from(uid),
                (Args::DropGid, Some((_, gid))) => u64::from(gid),
                _ => u64::from(u32::MAX),
            };
            Ok(vec![SeccompRule::new(vec![
                cond(0, SeccompCmpOp::Eq, id)?,
                cond(1, SeccompCmpOp::Eq, id)?,
                cond(2, SeccompCmpOp::Eq, id)?,
            ])?])
        }
        Args::NoGroups => Ok(vec![one(0, SeccompCmpOp::Eq, 0)?]),
    }
}

fn compile(kind: ThreadKind, mode: Mode) -> Result<BpfProgram, SeccompError> {
    let err = |e: seccompiler::Error| SeccompError::Compile {
        kind: kind.name(),
        msg: e.to_string(),
    };
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for a in list(kind) {
        let r = rules(a.args).map_err(err)?;
        // An unconditional entry wins over argument rules for the same call (an empty rule
        // list means "always").
        match map.get_mut(&a.nr) {
            Some(existing) if existing.is_empty() => {}
            Some(existing) if r.is_empty() => existing.clear(),
            Some(existing) => existing.extend(r),
            None => {
                map.insert(a.nr, r);
            }
        }
    }
    let mismatch = match mode {
        Mode::Enforce => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| err(e.into()))?;
    let filter =
        SeccompFilter::new(map, mismatch, SeccompAction::Allow, arch).map_err(|e| err(e.into()))?;
    BpfProgram::try_from(filter).map_err(|e| err(e.into()))
}

struct Prepared {
    mode: Mode,
    vcpu: BpfProgram,
    device: BpfProgram,
    fs: BpfProgram,
    control: BpfProgram,
}

static PREPARED: OnceLock<Prepared> = OnceLock::new();
/// The uid and gid the worker will drop to, if any (set by [`prepare`] before compiling).
static DROP_IDS: OnceLock<Option<(u32, u32)>> = OnceLock::new();

/// Compiles the three filters and installs the `SIGSYS` handler, once per process; from then on
/// [`apply`] installs filters. Calling it again with the same mode does nothing. `drop_to` is
/// the (uid, gid) the jail will switch to after threads are already filtered: the only ids any
/// filter lets a thread change to.
pub fn prepare(mode: Mode, drop_to: Option<(u32, u32)>) -> Result<(), SeccompError> {
    let _ = DROP_IDS.set(drop_to);
    if PREPARED.get().is_none() {
        let prepared = Prepared {
            mode,
            vcpu: compile(ThreadKind::Vcpu, mode)?,
            device: compile(ThreadKind::Device, mode)?,
            fs: compile(ThreadKind::Fs, mode)?,
            control: compile(ThreadKind::Control, mode)?,
        };
        install_sigsys_handler()?;
        // A concurrent call may have won; the mode check below covers both.
        let _ = PREPARED.set(prepared);
    }
    match PREPARED.get() {
        Some(p) if p.mode != mode => Err(SeccompError::ModeMismatch {
            prepared: p.mode,
            asked: mode,
        }),
        _ => Ok(()),
    }
}

/// Whether [`prepare`] has run, so that threads starting from now on are filtered.
pub fn active() -> bool {
    PREPARED.get().is_some()
}

/// Installs the calling thread's filter (after setting `no_new_privs`, which unprivileged
/// seccomp requires); does nothing unless filters were prepared (the in-process VMM never
/// filters). A filter cannot be removed: the thread keeps it until it ends.
///
/// It is every worker thread's one confinement point, so it first does the thread's part of the
/// jail ([`super::jail::confine_thread`]) and restricts it with the worker's Landlock ruleset
/// when one was prepared ([`super::landlock::prepare`]; also without seccomp filters, and never
/// in-process): both go on first, while the thread may still make those calls.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    super::jail::confine_thread().map_err(|e| SeccompError::Confine {
        kind: kind.name(),
        msg: e.to_string(),
    })?;
    super::landlock::restrict_thread(kind.name()).map_err(|e| SeccompError::Confine {
        kind: kind.name(),
        msg: e.to_string(),
    })?;
    let Some(p) = PREPARED.get() else {
        return Ok(());
    };
    let program = match kind {
        ThreadKind::Vcpu => &p.vcpu,
        ThreadKind::Device => &p.device,
        ThreadKind::Fs => &p.fs,
        ThreadKind::Control => &p.control,
    };
    set_label(std::thread::current().name().unwrap_or(kind.name()));
    // A blocked SIGSYS would turn the trap into a plain kill without the diagnostic line.
    // SAFETY: the sigset is initialised by sigemptyset/sigaddset before use; pthread_sigmask
    // only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(SeccompError::NoNewPrivs {
            kind: kind.name(),
            msg: crate::vmm::os_msg(&std::io::Error::last_os_error()),
        });
    }
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install {
        kind: kind.name(),
        msg: e.to_string(),
    })
}

thread_local! {
    /// The calling thread's name (NUL-padded), for the SIGSYS handler: set by `apply`, read
    /// without allocating or locking.
    static LABEL: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

fn set_label(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(buf.len());
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    LABEL.with(|l| l.set(buf));
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: the sigaction struct is zero-initialised (a valid value), then filled with a
    // handler of the SA_SIGINFO signature and an empty mask; sigaction copies it.
    let rc = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = handle_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(SeccompError::Handler(crate::vmm::os_msg(
            &std::io::Error::last_os_error(),
        )));
    }
    Ok(())
}

/// Appends `s` to `buf` at `*at`, as far as it fits.
fn push(buf: &mut [u8], at: &mut usize, s: &[u8]) {
    for &b in s {
        if *at < buf.len() {
            buf[*at] = b;
            *at += 1;
        }
    }
}

/// Appends the decimal digits of `n`.
fn push_num(buf: &mut [u8], at: &mut usize, n: i64) {
    if n < 0 {
        push(buf, at, b"-");
    }
    let mut digits = [0u8; 20];
    let mut v = n.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    push(buf, at, &digits[i..]);
}

/// The diagnostic line for a denied call `nr` made by thread `label`.
fn diagnostic(buf: &mut [u8; 160], label: &[u8; 16], nr: i64) -> usize {
    let mut at = 0;
    let name_len = label.iter().position(|&b| b == 0).unwrap_or(label.len());
    push(buf, &mut at, b"seccomp: thread ");
    push(
        buf,
        &mut at,
        if name_len == 0 {
            b"?"
        } else {
            &label[..name_len]
        },
    );
    push(buf, &mut at, b" made a forbidden system call ");
    push_num(buf, &mut at, nr);
    if let Some(name) = syscall_name(nr) {
        push(buf, &mut at, b" (");
        push(buf, &mut at, name.as_bytes());
        push(buf, &mut at, b")");
    }
    push(buf, &mut at, b"\n");
    at
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` (x86_64 and the other 64-bit ABIs): after
/// signo, errno, code and padding (16 bytes) comes `_sigsys { void *call_addr; int syscall; }`.
const SI_SYSCALL_OFFSET: usize = 24;

/// Reports the forbidden call on stderr and ends the process: only async-signal-safe work
/// (a thread-local read, stack buffers, `write`, `exit_group`), all of it allowed by every list.
extern "C" fn handle_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; for SIGSYS raised
    // by seccomp the `_sigsys` member is the active one and holds the call number at this
    // offset (a 4-byte int, read unaligned to make no alignment assumption).
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let label = LABEL.with(|l| l.get());
    let mut buf = [0u8; 160];
    let len = diagnostic(&mut buf, &label, i64::from(nr));
    // SAFETY: write and exit_group are async-signal-safe; buf outlives the call. Nothing is
    // left to clean up: the process ends here.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::syscall(libc::SYS_exit_group, EXIT_SECCOMP_DENIED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ThreadKind; 4] = [
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Fs,
        ThreadKind::Control,
    ];

    #[test]
    fn every_kind_compiles_and_keeps_the_handlers_calls() {
        for kind in ALL {
            for mode in [Mode::Enforce, Mode::Log] {
                assert!(!compile(kind, mode).unwrap().is_empty());
            }
            let nrs: Vec<_> = list(kind).map(|a| a.nr).collect();
            for needed in [
                libc::SYS_write,
                libc::SYS_exit_group,
                libc::SYS_rt_sigreturn,
            ] {
                assert!(nrs.contains(&needed), "{kind:?} lacks {needed}");
            }
        }
    }

    #[test]
    fn no_list_allows_a_dangerous_call() {
        for kind in ALL {
            // The privilege drop is allowed only to the prepared ids (an exact argument rule).
            for a in list(kind)
                .filter(|a| !matches!(a.args, Args::DropUid | Args::DropGid | Args::NoGroups))
            {
                assert!(
                    !DENIED_NAMES.iter().any(|(nr, _)| *nr == a.nr),
                    "{kind:?} allows {}",
                    a.name
                );
                assert!(
                    kind == ThreadKind::Fs || !FS_ONLY.iter().any(|(nr, _)| *nr == a.nr),
                    "{kind:?} allows the file server's {}",
                    a.name
                );
            }
        }
        // The file server resolves beneath directories only: no plain open, no mknod.
        let fs: Vec<_> = list(ThreadKind::Fs).map(|a| a.nr).collect();
        for nr in [
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_mknodat,
            libc::SYS_chdir,
        ] {
            assert!(!fs.contains(&nr), "the file server may call {nr}");
        }
    }

    #[test]
    fn the_diagnostic_line_names_thread_and_call() {
        let mut label = [0u8; 16];
        label[..5].copy_from_slice(b"vcpu0");
        let mut buf = [0u8; 160];
        let n = diagnostic(&mut buf, &label, libc::SYS_socket);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "seccomp: thread vcpu0 made a forbidden system call 41 (socket)\n"
        );
        let n = diagnostic(&mut buf, &[0; 16], 999);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "seccomp: thread ? made a forbidden system call 999\n"
        );
    }

    #[test]
    fn kvm_request_numbers_match_the_kernel_headers() {
        // Values from linux/kvm.h as printed by the C preprocessor on x86_64.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_GET_MSRS, 0xc008_ae88);
        assert_eq!(KVM_GET_LAPIC, 0x8400_ae8e);
        assert_eq!(KVM_GET_XSAVE, 0x9000_aea4);
        assert_eq!(KVM_GET_IRQCHIP, 0xc208_ae62);
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010_ae42);
    }
}
