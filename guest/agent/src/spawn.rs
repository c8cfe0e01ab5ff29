//! Starts a process the way `posix_spawn` does: `clone(CLONE_VM | CLONE_VFORK)`, so no page tables
//! are copied and the parent takes no copy-on-write faults afterwards (both are expensive in a guest
//! whose kernel is emulated). The child shares our memory until it calls `execve`, so it only makes
//! raw system calls on data prepared beforehand, and reports a failure through shared memory.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use crate::reaper::{self, Reaper};
use crate::users::Identity;

pub struct Spec {
    /// Paths to try with `execve`, in order (the PATH search for a bare command name).
    pub candidates: Vec<CString>,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub cwd: Option<CString>,
    pub identity: Option<Identity>,
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    /// `cgroup.procs` of the exec's cgroup, open for writing, or -1: the child moves itself there
    /// first, so that everything it starts is contained from the beginning.
    pub cgroup_procs: RawFd,
    /// stdin is a terminal that becomes the controlling terminal of the child's new session.
    pub controlling_tty: bool,
}

/// The step at which the child failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(i32)]
pub enum Stage {
    None = 0,
    Setsid,
    Setgroups,
    Setgid,
    Setuid,
    Chdir,
    Dup,
    Exec,
    Cgroup,
    Tty,
}

pub struct Failure {
    /// The child that failed (already reaped), 0 if none was started.
    pub pid: libc::pid_t,
    pub stage: Stage,
    pub errno: i32,
    /// For `Stage::Exec`: the candidate whose error is reported.
    pub path: Option<CString>,
}

#[repr(C)]
struct Shared {
    candidates: *const *const libc::c_char,
    ncandidates: usize,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    set_ids: bool,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: *const libc::gid_t,
    ngroups: usize,
    fds: [RawFd; 3],
    cgroup_procs: RawFd,
    controlling_tty: bool,
    /// Bit `n - 1` set: signal `n` is ignored by the agent and must be reset in the child.
    ignored: u64,
    // Written by the child on failure.
    stage: i32,
    errno: i32,
    failed_candidate: usize,
}

/// One system call with up to four arguments, `Err(errno)` on failure. It takes no locks and
/// allocates nothing, so the child below may use it while it shares the parent's memory.
///
/// # Safety
///
/// The arguments must be valid for system call `n`: every pointer among them must point to live
/// memory of the size and layout that call reads or writes, and the call must not invalidate
/// anything Rust code relies on (for example close a descriptor that an `OwnedFd` owns).
unsafe fn raw(n: libc::c_long, a: usize, b: usize, c: usize, d: usize) -> Result<(), i32> {
    // SAFETY: the caller guarantees the arguments suit system call `n`; `__errno_location` returns
    // the calling thread's errno, which is valid to read.
    unsafe {
        let ret = libc::syscall(n, a, b, c, d);
        if ret < 0 {
            Err(*libc::__errno_location())
        } else {
            Ok(())
        }
    }
}

/// Runs in the child, on its own stack, sharing the parent's memory. Raw system calls only.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: only the `clone` in `spawn` runs this function, with `arg` pointing to that call's
    // `Shared`. CLONE_VFORK suspends the calling thread until this child has called execve or
    // exited, so `Shared`, the stack buffer this runs on (which `spawn` borrows exclusively) and
    // everything `Shared` points to (the NUL-terminated candidate, argv, envp and cwd strings,
    // the null-terminated pointer arrays and the group list, owned by `spawn`'s frame and its
    // `Spec`) stay alive, and the `&mut Shared` aliases nothing in use meanwhile. The other threads
    // keep running in this same memory, so the child touches nothing else: raw system calls only
    // (no allocator, locks or stdio), and `candidates` is indexed below `ncandidates`; the one
    // byte written to `cgroup_procs` comes from a static literal. The
    // sigaction and sigset buffers are locals of the kernel's sizes (32 and 8 bytes on x86_64).
    // The errno that `raw` writes and reads is the suspended thread's thread-local (the child
    // keeps its thread pointer), which no running thread uses. All signals stay blocked until
    // the mask is cleared just before execve, so no handler runs on this stack before that.
    unsafe {
        let s = &mut *(arg as *mut Shared);
        let fail = |s: &mut Shared, stage: Stage, errno: i32| -> libc::c_int {
            std::ptr::write_volatile(&mut s.errno, errno);
            std::ptr::write_volatile(&mut s.stage, stage as i32);
            libc::syscall(libc::SYS_exit_group, 127);
            127
        };
        if s.cgroup_procs >= 0 {
            // "0" moves the writing process (cgroup v2); done before any privilege is dropped.
            let zero = b"0";
            if let Err(e) = raw(
                libc::SYS_write,
                s.cgroup_procs as usize,
                zero.as_ptr() as usize,
                1,
                0,
            ) {
                return fail(s, Stage::Cgroup, e);
            }
        }
        if let Err(e) = raw(libc::SYS_setsid, 0, 0, 0, 0) {
            return fail(s, Stage::Setsid, e);
        }
        if s.set_ids {
            if let Err(e) = raw(libc::SYS_setgroups, s.ngroups, s.groups as usize, 0, 0) {
                return fail(s, Stage::Setgroups, e);
            }
            let gid = s.gid as usize;
            if let Err(e) = raw(libc::SYS_setresgid, gid, gid, gid, 0) {
                return fail(s, Stage::Setgid, e);
            }
            let uid = s.uid as usize;
            if let Err(e) = raw(libc::SYS_setresuid, uid, uid, uid, 0) {
                return fail(s, Stage::Setuid, e);
            }
        }
        if !s.cwd.is_null() {
            if let Err(e) = raw(libc::SYS_chdir, s.cwd as usize, 0, 0, 0) {
                return fail(s, Stage::Chdir, e);
            }
        }
        for (target, &fd) in s.fds.iter().enumerate() {
            if let Err(e) = raw(libc::SYS_dup2, fd as usize, target, 0, 0) {
                return fail(s, Stage::Dup, e);
            }
        }
        if s.controlling_tty {
            // The session setsid made above has no terminal yet: stdin's becomes it, so the
            // terminal's ^C and ^Z reach the foreground process group.
            if let Err(e) = raw(libc::SYS_ioctl, 0, libc::TIOCSCTTY as usize, 0, 0) {
                return fail(s, Stage::Tty, e);
            }
        }
        // Ignored dispositions survive execve (the agent ignores SIGPIPE, and may inherit more
        // from whoever started it), and every signal is blocked around the clone: give the
        // program the defaults. Only the ignored signals need a system call each.
        let default_action = [0u64; 4];
        for sig in 1..=64usize {
            if s.ignored >> (sig - 1) & 1 == 1 {
                let _ = raw(
                    libc::SYS_rt_sigaction,
                    sig,
                    default_action.as_ptr() as usize,
                    0,
                    8,
                );
            }
        }
        let empty: u64 = 0;
        let _ = raw(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as usize,
            &empty as *const u64 as usize,
            0,
            8,
        );

        // execvpe semantics: skip candidates that do not exist, remember EACCES.
        let mut errno = libc::ENOENT;
        let mut reported = 0;
        for i in 0..s.ncandidates {
            let path = *s.candidates.add(i);
            let e = match raw(
                libc::SYS_execve,
                path as usize,
                s.argv as usize,
                s.envp as usize,
                0,
            ) {
                Err(e) => e,
                Ok(()) => libc::ENOEXEC,
            };
            match e {
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {
                    if errno != libc::EACCES {
                        errno = e;
                        reported = i;
                    }
                }
                libc::EACCES => {
                    if errno != libc::EACCES {
                        errno = e;
                        reported = i;
                    }
                }
                _ => {
                    errno = e;
                    reported = i;
                    break;
                }
            }
        }
        std::ptr::write_volatile(&mut s.failed_candidate, reported);
        fail(s, Stage::Exec, errno)
    }
}

fn pointers(items: &[CString]) -> Vec<*const libc::c_char> {
    items
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Starts the process. Returns its pid and a pidfd (readable once it has exited), or the failure.
/// `stack` is reused between calls; it only hosts the child until `execve`.
/// The signals this process ignores, as a bit set (bit `n - 1` for signal `n`). Read once: the
/// agent sets its dispositions at start-up and never changes them afterwards.
fn ignored_signals() -> u64 {
    static IGNORED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *IGNORED.get_or_init(|| {
        let mut mask = 0u64;
        for sig in 1..=64usize {
            let mut old = [0u64; 4];
            // SAFETY: a query only (no new action); `old` has room for the kernel's sigaction
            // (handler, flags, restorer, 8-byte mask).
            let queried =
                unsafe { raw(libc::SYS_rt_sigaction, sig, 0, old.as_mut_ptr() as usize, 8) };
            if queried.is_ok() && old[0] == libc::SIG_IGN as u64 {
                mask |= 1 << (sig - 1);
            }
        }
        mask
    })
}

pub fn spawn(spec: &Spec, stack: &mut Vec<u8>) -> Result<(libc::pid_t, OwnedFd), Failure> {
    let candidates = pointers(&spec.candidates);
    let argv = pointers(&spec.argv);
    let envp = pointers(&spec.envp);
    let (set_ids, uid, gid, groups): (bool, u32, u32, &[u32]) = match &spec.identity {
        Some(id) => (true, id.uid, id.gid, &id.groups),
        None => (false, 0, 0, &[]),
    };
    let mut shared = Shared {
        candidates: candidates.as_ptr(),
        ncandidates: spec.candidates.len(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: spec.cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        set_ids,
        uid,
        gid,
        groups: groups.as_ptr(),
        ngroups: groups.len(),
        fds: [spec.stdin, spec.stdout, spec.stderr],
        cgroup_procs: spec.cgroup_procs,
        controlling_tty: spec.controlling_tty,
        ignored: ignored_signals(),
        stage: 0,
        errno: 0,
        failed_candidate: 0,
    };
    const STACK: usize = 32 * 1024;
    if stack.len() < STACK {
        stack.resize(STACK, 0);
    }
    // Top of the stack, 16-byte aligned.
    let top = ((stack.as_mut_ptr() as usize + stack.len()) & !15) as *mut libc::c_void;

    let mut pidfd: libc::c_int = -1;
    // SAFETY: the sigsets are plain bit arrays (all zeroes is valid) passed as live pointers.
    // For clone: `child` is the entry point written for it (see its comment); `top` is the
    // 16-byte aligned end of `stack`'s STACK bytes, memory that `spawn` borrows exclusively; `arg`
    // is `shared`, whose pointers refer to `candidates`, `argv`, `envp` and `spec`, all alive
    // until `spawn` returns; with CLONE_VFORK this thread, and so this frame, stays suspended
    // until the child has called execve or exited. CLONE_PIDFD stores the new pidfd in `pidfd`,
    // a live local. Every signal is blocked across the clone so that no handler can run on the
    // child's stack while it shares our memory; the previous mask is restored afterwards. errno
    // is read right after the failed clone, on this thread.
    let (pid, clone_errno) = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let reaper: &Reaper = reaper::get();
        let mut table = reaper.lock();
        let pid = libc::clone(
            child,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
            &mut shared as *mut Shared as *mut libc::c_void,
            &mut pidfd as *mut libc::c_int,
        );
        let clone_errno = if pid < 0 {
            *libc::__errno_location()
        } else {
            0
        };
        if pid > 0 {
            Reaper::register(&mut table, pid);
        }
        drop(table);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        (pid, clone_errno)
    };
    if pid < 0 {
        return Err(Failure {
            pid: 0,
            stage: Stage::None,
            errno: clone_errno,
            path: None,
        });
    }
    // SAFETY: clone succeeded with CLONE_PIDFD, so the kernel stored a new (close-on-exec)
    // descriptor in `pidfd` that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: `&shared.stage` is a valid, aligned, initialised i32. The child wrote it (if at all)
    // through the pointer passed to clone before it exited or called execve, which CLONE_VFORK
    // waited for, so the read does not race with the write.
    let stage = unsafe { std::ptr::read_volatile(&shared.stage) };
    if stage != 0 {
        // The child has exited; collect it.
        reaper::get().wait(pid);
        let stage = match stage {
            1 => Stage::Setsid,
            2 => Stage::Setgroups,
            3 => Stage::Setgid,
            4 => Stage::Setuid,
            5 => Stage::Chdir,
            6 => Stage::Dup,
            8 => Stage::Cgroup,
            9 => Stage::Tty,
            _ => Stage::Exec,
        };
        let path = if stage == Stage::Exec {
            spec.candidates.get(shared.failed_candidate).cloned()
        } else {
            None
        };
        return Err(Failure {
            pid,
            stage,
            errno: shared.errno,
            path,
        });
    }
    Ok((pid, pidfd))
}

impl Failure {
    pub fn message(&self, spec: &Spec) -> String {
        let err = crate::sys::errno_text(&io::Error::from_raw_os_error(self.errno));
        let show = |c: &CString| String::from_utf8_lossy(c.as_bytes()).into_owned();
        match self.stage {
            Stage::None => format!("cannot start a process: {err}"),
            Stage::Setsid => format!("setsid: {err}"),
            Stage::Setgroups => format!("setgroups: {err}"),
            Stage::Setgid => format!("setgid: {err}"),
            Stage::Setuid => format!("setuid: {err}"),
            Stage::Chdir => format!(
                "chdir {}: {err}",
                spec.cwd.as_ref().map(show).unwrap_or_default()
            ),
            Stage::Dup => format!("dup2: {err}"),
            Stage::Cgroup => format!("cannot enter the exec's cgroup: {err}"),
            Stage::Tty => format!("cannot give the process its terminal: {err}"),
            Stage::Exec => self.exec_failure(spec).1,
        }
    }

    /// For a failed `execve`: the exit status a shell (and docker) reports, 127 when the program
    /// was not found and 126 when it was found but could not be executed, and the line a shell
    /// would print, worded for supermachine: `exec: foo: not found`.
    pub fn exec_failure(&self, spec: &Spec) -> (u8, String) {
        let show = |c: &CString| String::from_utf8_lossy(c.as_bytes()).into_owned();
        let name = show(&spec.argv[0]);
        if matches!(self.errno, libc::ENOENT | libc::ENOTDIR) {
            (127, format!("exec: {name}: not found"))
        } else {
            let err = crate::sys::errno_text(&io::Error::from_raw_os_error(self.errno));
            let path = self.path.as_ref().map(show).unwrap_or(name);
            (126, format!("exec: {path}: {err}"))
        }
    }
}
