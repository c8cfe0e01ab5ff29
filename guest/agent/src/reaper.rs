//! Reaps every child (and, as PID 1, every orphan) from one thread and hands the exit statuses of
//! the processes the agent started to the connections that wait for them.
//!
//! SIGCHLD stays blocked in every thread; the reaper takes it with `sigwaitinfo` and then collects
//! all zombies with `waitpid(-1, WNOHANG)`. A connection registers its child while holding the
//! table lock across the `clone`, so the reaper can never reap a child before it is registered.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

#[derive(Default)]
pub struct Reaper {
    table: Mutex<HashMap<libc::pid_t, Option<libc::c_int>>>,
    exited: Condvar,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

pub fn get() -> &'static Reaper {
    REAPER.get_or_init(Reaper::default)
}

fn sigchld_set() -> libc::sigset_t {
    // SAFETY: sigset_t is a plain bit array, for which all zeroes is a valid value;
    // sigemptyset and sigaddset only write to the local `set` they are given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        set
    }
}

/// Blocks SIGCHLD in the calling thread; call from `main` before any other thread starts.
pub fn block_sigchld() {
    let set = sigchld_set();
    // SAFETY: `set` is a valid sigset_t borrowed for the call; a null old-set pointer is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

pub type Table<'a> = MutexGuard<'a, HashMap<libc::pid_t, Option<libc::c_int>>>;

impl Reaper {
    pub fn lock(&self) -> Table<'_> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a child started while `table` was held.
    pub fn register(table: &mut Table<'_>, pid: libc::pid_t) {
        table.insert(pid, None);
    }

    /// Waits for the reaper to collect `pid` and returns its raw wait status.
    pub fn wait(&self, pid: libc::pid_t) -> libc::c_int {
        let mut table = self.lock();
        loop {
            if let Some(Some(status)) = table.get(&pid) {
                let status = *status;
                table.remove(&pid);
                return status;
            }
            table = self.exited.wait(table).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn run(&self) -> ! {
        let set = sigchld_set();
        loop {
            // SAFETY: siginfo_t is a plain C struct of integers (and a union of them), for which
            // all zeroes is a valid value.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `set` and `info` are valid locals; the kernel writes one siginfo_t to `info`.
            unsafe { libc::sigwaitinfo(&set, &mut info) };
            loop {
                let mut status: libc::c_int = 0;
                // SAFETY: waitpid writes one int to `status`, a valid local.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    if pid < 0
                        && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                    {
                        continue;
                    }
                    break;
                }
                let mut table = self.lock();
                if let Some(slot) = table.get_mut(&pid) {
                    *slot = Some(status);
                    self.exited.notify_all();
                }
            }
        }
    }
}

pub fn start() {
    std::thread::Builder::new()
        .name("reaper".into())
        .stack_size(64 * 1024)
        .spawn(|| get().run())
        .expect("cannot start the reaper thread");
}
