//! Starting a worker process: `clone` straight into fresh namespaces, with the control socket as
//! its standard input and every other inherited descriptor closed, then `execve`.
//!
//! Why not `std::process::Command`: it cannot create namespaces, and its `pre_exec` hook makes
//! it `fork` the whole (possibly large, multi-threaded) Python process. A `CLONE_VM |
//! CLONE_VFORK` child shares our memory until it execs, as `posix_spawn` does, so starting a
//! worker costs the same whatever the caller's size; the child runs only async-signal-safe code.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Which namespaces a worker gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Mount, PID, IPC, UTS and network namespaces (needs root).
    Namespaces,
    /// The same inside a new user namespace (unprivileged; the host must allow user namespaces).
    UserNamespaces,
    /// None: the worker shares the caller's namespaces.
    None,
}

impl Isolation {
    fn clone_flags(self) -> libc::c_int {
        let base = libc::CLONE_NEWNS
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWNET;
        match self {
            Isolation::Namespaces => base,
            Isolation::UserNamespaces => base | libc::CLONE_NEWUSER,
            Isolation::None => 0,
        }
    }

    /// What this isolation is, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Isolation::Namespaces => "namespaces",
            Isolation::UserNamespaces => "namespaces inside a user namespace",
            Isolation::None => "no namespaces",
        }
    }

    /// Names of the namespaces, for reports.
    pub fn names(self) -> Vec<String> {
        let mut out: Vec<String> = match self {
            Isolation::None => return Vec::new(),
            _ => ["mount", "pid", "ipc", "uts", "network"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        };
        if self == Isolation::UserNamespaces {
            out.push("user".into());
        }
        out
    }
}

/// A started worker.
pub struct Spawned {
    pub pid: libc::pid_t,
    pub channel: UnixStream,
    pub isolation: Isolation,
}

/// Environment variables a worker inherits (its own settings); nothing else of the caller's
/// environment reaches it.
const PASSED_ENV: &[&str] = &[
    "SUPERMACHINE_SECCOMP",
    "RUST_BACKTRACE",
    super::landlock::PROBE_ENV,
];

/// Set for a worker started with weaker isolation than asked for: what this host refused and
/// why ("namespaces inside a user namespace: Operation not permitted"), for the worker's report.
pub const REFUSED_ENV: &str = "SUPERMACHINE_VMM_REFUSED";

struct ChildArgs<'a> {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    channel: RawFd,
    null: RawFd,
    log: RawFd,
    /// For a new user namespace: the id maps the child writes for itself before it execs.
    maps: Option<&'a IdMaps>,
    /// errno of a failed exec, written by the child (it shares our memory until it execs).
    exec_errno: libc::c_int,
    /// What the child was doing when it failed.
    failed_step: &'static str,
}

/// The files a child in a new user namespace writes, and what it writes into them: root inside
/// mapped to the caller's uid and gid (the only ids an unprivileged process may map).
///
/// The child writes them itself, before `execve`: a process that execs in a user namespace where
/// its uid is not (yet) mapped to root loses every capability there, and the jail then cannot
/// mount or `pivot_root`. The owner cannot write them first: with `CLONE_VFORK` it is suspended
/// until the child has exec'd. They are `/proc` files of the memory the child shares with the
/// caller, so a caller that is not dumpable (owned by root there) cannot give its worker a user
/// namespace: the spawn then falls back, and says why.
pub(super) struct IdMaps {
    uid_map: CString,
    setgroups: CString,
    gid_map: CString,
    uid_line: CString,
    deny: CString,
    gid_line: CString,
}

impl IdMaps {
    pub(super) fn for_caller() -> IdMaps {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let c = |s: String| CString::new(s).expect("no NUL in a formatted id");
        IdMaps {
            uid_map: c("/proc/self/uid_map".into()),
            setgroups: c("/proc/self/setgroups".into()),
            gid_map: c("/proc/self/gid_map".into()),
            uid_line: c(format!("0 {uid} 1\n")),
            deny: c("deny\n".into()),
            gid_line: c(format!("0 {gid} 1\n")),
        }
    }

    /// Writes the maps of the calling process (a child just cloned into a new user namespace),
    /// with raw system calls only. Returns the failed step and its errno.
    ///
    /// # Safety
    /// Only for the child of `clone`: it changes the calling process's user namespace maps.
    pub(super) unsafe fn write_own(&self) -> Result<(), (&'static str, libc::c_int)> {
        for (path, data, step) in [
            (&self.uid_map, &self.uid_line, "write its uid_map"),
            (&self.setgroups, &self.deny, "write its setgroups"),
            (&self.gid_map, &self.gid_line, "write its gid_map"),
        ] {
            let errno = write_file(path, data);
            if errno != 0 {
                return Err((step, errno));
            }
        }
        Ok(())
    }
}

/// Writes `data` to the file at `path` in one `write`, with raw system calls only (this runs in
/// the child of `clone`). Returns 0, or the errno.
///
/// # Safety
/// Both must be valid NUL-terminated strings.
unsafe fn write_file(path: &CString, data: &CString) -> libc::c_int {
    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return *libc::__errno_location();
    }
    let len = data.as_bytes().len();
    let written = libc::write(fd, data.as_ptr().cast(), len);
    let errno = *libc::__errno_location();
    libc::close(fd);
    match written {
        n if n == len as isize => 0,
        n if n < 0 => errno,
        _ => libc::EIO,
    }
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the ChildArgs the parent passed to clone; the parent is suspended
    // (CLONE_VFORK) until we exec or exit, so it stays alive and unaliased.
    let args = unsafe { &mut *(arg as *mut ChildArgs<'_>) };
    // SAFETY: only async-signal-safe system calls on descriptors and pointers prepared by the
    // parent; nothing here allocates or takes a lock.
    unsafe {
        if let Some(maps) = args.maps {
            if let Err((step, errno)) = maps.write_own() {
                args.exec_errno = errno;
                args.failed_step = step;
                libc::_exit(127);
            }
        }
        if libc::dup2(args.channel, 0) < 0
            || libc::dup2(args.null, 1) < 0
            || libc::dup2(args.log, 2) < 0
        {
            args.exec_errno = *libc::__errno_location();
            libc::_exit(127);
        }
        // Close every other inherited descriptor: the caller's files, sockets and other VMs'
        // channels must not reach the worker.
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        libc::execve(args.program, args.argv, args.envp);
        args.exec_errno = *libc::__errno_location();
        libc::_exit(127);
    }
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in an argument"))
}

/// Starts `program --worker` with the strongest `isolation` of `wanted` that this host allows
/// (falling back from namespaces to none when creating them is refused), its standard error
/// going to `log`.
pub fn spawn(program: &Path, wanted: Isolation, log: Option<&File>) -> io::Result<Spawned> {
    let (ours, theirs) = UnixStream::pair()?;
    let null = File::options().write(true).open("/dev/null")?;
    let log_fd = log.map_or(null.as_raw_fd(), |f| f.as_raw_fd());
    let program_c = cstring(program.as_os_str())?;
    let argv_c = [
        program_c.clone(),
        CString::new("--worker").expect("literal"),
    ];
    let argv: Vec<*const libc::c_char> = argv_c
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let env_c: Vec<CString> = PASSED_ENV
        .iter()
        .filter_map(|k| std::env::var_os(k).map(|v| (k, v)))
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the environment")
            })
        })
        .collect::<io::Result<_>>()?;
    let mut attempts = vec![wanted];
    if wanted == Isolation::Namespaces {
        attempts.push(Isolation::UserNamespaces);
    }
    if wanted != Isolation::None {
        attempts.push(Isolation::None);
    }
    let mut last_err = None;
    let mut refused = Vec::new();
    for isolation in attempts {
        // The worker reports what it runs without, and why (see [`REFUSED_ENV`]).
        let refused_c = (!refused.is_empty())
            .then(|| CString::new(format!("{REFUSED_ENV}={}", refused.join("; "))))
            .transpose()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a NUL byte in an error"))?;
        let envp: Vec<*const libc::c_char> = env_c
            .iter()
            .chain(refused_c.as_ref())
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        match clone_exec(
            &program_c,
            &argv,
            &envp,
            theirs.as_raw_fd(),
            null.as_raw_fd(),
            log_fd,
            isolation,
        ) {
            Ok(pid) => {
                return Ok(Spawned {
                    pid,
                    channel: ours,
                    isolation,
                });
            }
            Err(e) if is_refusal(&e) && isolation != Isolation::None => {
                refused.push(format!(
                    "{}: {}",
                    isolation.describe(),
                    crate::vmm::os_msg(&e)
                ));
                last_err = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::other("no way to start the worker")))
}

/// A step of the child before its exec that failed.
#[derive(Debug)]
struct StepError {
    step: &'static str,
    errno: libc::c_int,
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let err = io::Error::from_raw_os_error(self.errno);
        write!(
            f,
            "the worker could not {}: {}",
            self.step,
            crate::vmm::os_msg(&err)
        )?;
        // The id maps are /proc files of the caller's memory, which the child shares until it
        // execs: a caller that is not dumpable (it changed its ids, or asked to be) has them
        // owned by root, and the child may not write them. The errno alone would not say so.
        if self.errno == libc::EACCES {
            write!(f, " (likely: the caller is not dumpable)")?;
        }
        Ok(())
    }
}

impl std::error::Error for StepError {}

/// An error that means "not allowed here", after which weaker isolation is tried.
fn is_refusal(e: &io::Error) -> bool {
    let errno = e.raw_os_error().or_else(|| {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<StepError>())
            .map(|s| s.errno)
    });
    matches!(
        errno,
        Some(libc::EPERM | libc::EINVAL | libc::ENOSPC | libc::EUSERS | libc::EACCES)
    )
}

fn clone_exec(
    program: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    channel: RawFd,
    null: RawFd,
    log: RawFd,
    isolation: Isolation,
) -> io::Result<libc::pid_t> {
    const STACK: usize = 64 << 10;
    let mut stack = vec![0u8; STACK];
    let maps = (isolation == Isolation::UserNamespaces).then(IdMaps::for_caller);
    let mut args = ChildArgs {
        program: program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        channel,
        null,
        log,
        maps: maps.as_ref(),
        exec_errno: 0,
        failed_step: "start",
    };
    // Block every signal while the child shares our memory: a handler of the caller's must not
    // run on the child's stack. The worker unblocks them first thing (exec keeps the mask).
    // SAFETY: plain signal-mask calls on valid sigset_t values.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: the stack is ours and outlives the child's use of it (CLONE_VFORK suspends us
    // until the child execs or exits); child_main only touches `args`.
    let pid = unsafe {
        libc::clone(
            child_main,
            stack.as_mut_ptr().add(STACK).cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD | isolation.clone_flags(),
            (&mut args as *mut ChildArgs<'_>).cast(),
        )
    };
    let clone_err = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    if pid < 0 {
        return Err(clone_err);
    }
    if args.exec_errno != 0 {
        kill_and_reap(pid);
        let err = io::Error::from_raw_os_error(args.exec_errno);
        // The id maps are /proc files of the caller's memory, which the child shares: a caller
        // that is not dumpable (it changed its ids, or said so) owns them as root, and the
        // child may not write them. Say so, since the errno alone does not.
        if args.failed_step != "start" {
            return Err(io::Error::other(StepError {
                step: args.failed_step,
                errno: args.exec_errno,
            }));
        }
        return Err(err);
    }
    drop(stack);
    Ok(pid)
}

/// Kills a worker and collects it.
pub fn kill_and_reap(pid: libc::pid_t) {
    // SAFETY: `pid` is our child (not yet reaped, so the id cannot have been reused).
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
}
