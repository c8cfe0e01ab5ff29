//! Containment of each exec's process tree in a cgroup v2 of its own (PID 1 only).
//!
//! At start-up the agent mounts cgroup2 on `/sys/fs/cgroup`, enables the `pids` (and, where the
//! kernel has it, `cpu`) controller and creates `/sys/fs/cgroup/exec`, the parent of every exec's
//! cgroup. Its `pids.max` keeps some threads free for the agent and the kernel, so that no process
//! tree can stop the agent from starting the thread of its next connection; with the `cpu`
//! controller all execs together weigh as much as the agent (which stays in the root cgroup) when
//! both want the CPU. Each exec gets `exec/<n>` with its own `pids.max`; its process moves itself
//! there before `execve` (see `spawn`), so every descendant starts inside. When the exec ends the
//! agent writes `cgroup.kill`, which the kernel applies to every process in the cgroup, forks in
//! flight included, waits (bounded) for it to empty and removes it.
//!
//! Outside a VM (`--listen`) or on a kernel without cgroup2 there is no containment: an exec's
//! process group is all the agent can kill.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sys;

const MOUNT_POINT: &str = "/sys/fs/cgroup";
/// The parent of every exec's cgroup.
const EXECS: &str = "/sys/fs/cgroup/exec";
/// `pids.max` of an exec that does not ask for another value: room for a parallel build or a
/// threaded server, while a fork bomb in a small guest stays far from exhausting its memory.
pub const DEFAULT_PIDS_MAX: u64 = 1024;
/// Threads (processes count as threads) that the execs together leave to the agent and the kernel.
const RESERVED_THREADS: u64 = 256;
/// Fewest threads the execs together may use, whatever the kernel's `threads-max`.
const MIN_EXECS_PIDS: u64 = 64;
/// How long the agent waits for a killed cgroup to empty before it reports the exec's exit anyway
/// (the processes have SIGKILL pending; the cgroup is then removed by a later exec).
const EMPTY_WAIT: Duration = Duration::from_secs(3);
/// Tries at a name for a new cgroup before the exec runs without one (names taken by others).
const NAME_TRIES: u32 = 8;

static ENABLED: AtomicBool = AtomicBool::new(false);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// Cgroups of execs that kept their background processes, removed once they are empty.
static LEFTOVERS: Mutex<Vec<CString>> = Mutex::new(Vec::new());

fn c(path: &str) -> CString {
    CString::new(path).expect("no NUL in cgroup paths")
}

/// Writes `value` to an existing (control) file with one `write`, as the kernel expects.
fn write_control(path: &str, value: &[u8]) -> io::Result<()> {
    let fd = sys::open(&c(path), libc::O_WRONLY, 0)?;
    let n = sys::write(fd.as_raw_fd(), value)?;
    if n != value.len() {
        return Err(io::ErrorKind::WriteZero.into());
    }
    Ok(())
}

fn mkdir(path: &CString) -> io::Result<()> {
    // SAFETY: `path` is a NUL-terminated CString that outlives the call.
    sys::cvt(unsafe { libc::mkdir(path.as_ptr(), 0o755) }).map(|_| ())
}

fn rmdir(path: &CString) -> io::Result<()> {
    // SAFETY: `path` is a NUL-terminated CString that outlives the call.
    sys::cvt(unsafe { libc::rmdir(path.as_ptr()) }).map(|_| ())
}

/// `pids.max` for the parent of all execs: the kernel's thread limit less the agent's reserve.
pub fn execs_pids_max(threads_max: u64) -> u64 {
    threads_max
        .saturating_sub(RESERVED_THREADS)
        .max(MIN_EXECS_PIDS)
}

/// The kernel refuses `pids.max` values above its largest pid count (`PID_MAX_LIMIT`, 4 Mi).
const PIDS_MAX_LIMIT: u64 = 4 * 1024 * 1024;

/// The text written to `pids.max` for an exec's `pids_max` request: 0 means no limit of its own
/// (the limit of all execs together still applies), as does any value the kernel would refuse.
pub fn pids_max_value(pids_max: u64) -> Vec<u8> {
    if pids_max == 0 || pids_max > PIDS_MAX_LIMIT {
        b"max".to_vec()
    } else {
        pids_max.to_string().into_bytes()
    }
}

/// Sets up containment; called once by PID 1 after the root switch. `Err` says why execs will run
/// uncontained (the agent carries on without it).
pub fn setup() -> Result<(), String> {
    let step = |what: &str, e: io::Error| format!("{what}: {}", sys::errno_text(&e));
    crate::init::mount_cgroup2(MOUNT_POINT)?;
    let subtree = format!("{MOUNT_POINT}/cgroup.subtree_control");
    write_control(&subtree, b"+pids").map_err(|e| step("enable the pids controller", e))?;
    // Without CONFIG_FAIR_GROUP_SCHED there is no cpu controller; the pids limit still holds.
    let _ = write_control(&subtree, b"+cpu");
    match mkdir(&c(EXECS)) {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
            return Err(step(&format!("mkdir {EXECS}"), e))
        }
        _ => {}
    }
    let threads_max = std::fs::read_to_string("/proc/sys/kernel/threads-max")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if threads_max > 0 {
        let limit = execs_pids_max(threads_max).to_string();
        write_control(&format!("{EXECS}/pids.max"), limit.as_bytes())
            .map_err(|e| step("limit the pids of all execs", e))?;
    }
    write_control(&format!("{EXECS}/cgroup.subtree_control"), b"+pids")
        .map_err(|e| step("enable the pids controller for execs", e))?;
    ENABLED.store(true, Ordering::Relaxed);
    Ok(())
}

/// The cgroup of one exec.
pub struct ExecGroup {
    dir: CString,
    /// `cgroup.procs`, open for writing: the new process writes "0" to it to move itself in.
    procs: OwnedFd,
}

impl ExecGroup {
    /// A new cgroup for an exec, or `None` where there is no containment (or no cgroup could be
    /// made: the exec then runs as it would without cgroups rather than not at all).
    pub fn create(pids_max: u64) -> Option<ExecGroup> {
        if !ENABLED.load(Ordering::Relaxed) {
            return None;
        }
        remove_leftovers();
        for _ in 0..NAME_TRIES {
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            let dir = format!("{EXECS}/{id}");
            match mkdir(&c(&dir)) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(_) => return None,
            }
            let made = (|| -> io::Result<OwnedFd> {
                write_control(&format!("{dir}/pids.max"), &pids_max_value(pids_max))?;
                sys::open(&c(&format!("{dir}/cgroup.procs")), libc::O_WRONLY, 0)
            })();
            let dir = c(&dir);
            return match made {
                Ok(procs) => Some(ExecGroup { dir, procs }),
                Err(_) => {
                    let _ = rmdir(&dir);
                    None
                }
            };
        }
        None
    }

    pub fn procs_fd(&self) -> libc::c_int {
        self.procs.as_raw_fd()
    }

    fn path(&self, file: &str) -> String {
        format!("{}/{file}", String::from_utf8_lossy(self.dir.as_bytes()))
    }

    /// Sends SIGKILL to every process in the cgroup (the kernel also catches forks in flight).
    pub fn kill(&self) {
        let _ = write_control(&self.path("cgroup.kill"), b"1");
    }

    /// Ends the cgroup: with `keep` its processes go on and it is removed once they are gone;
    /// otherwise they are killed, and the cgroup is removed once empty (waiting a bounded time).
    pub fn finish(self, keep: bool) {
        if rmdir(&self.dir).is_ok() {
            return;
        }
        if !keep {
            self.kill();
            let deadline = Instant::now() + EMPTY_WAIT;
            while Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
                match rmdir(&self.dir) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                    _ => return,
                }
            }
        }
        LEFTOVERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.dir);
    }
}

/// How long a freeze waits for every exec's processes to stop before the work it guards goes on
/// anyway (a process in a long uninterruptible wait freezes only when it leaves it).
const FREEZE_WAIT: Duration = Duration::from_secs(2);
/// How many holders of [`freeze_execs`] there are: the first freezes, the last thaws.
static FREEZERS: Mutex<u32> = Mutex::new(0);

/// Every exec's processes, background ones included, kept frozen (cgroup v2's freezer on the
/// parent of all execs) until this is dropped; the agent itself, in the root cgroup, runs on.
pub struct Frozen(());

/// Freezes every exec's processes and waits (bounded by [`FREEZE_WAIT`]) until they are; `None`
/// where there is no containment. A frozen process holds its state: one that was stopped stays
/// stopped when thawed, and a fatal signal (an exec's `cgroup.kill`) still ends it.
pub fn freeze_execs() -> Option<Frozen> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    let mut holders = FREEZERS.lock().unwrap_or_else(|e| e.into_inner());
    if *holders == 0 {
        write_control(&format!("{EXECS}/cgroup.freeze"), b"1").ok()?;
        let events = format!("{EXECS}/cgroup.events");
        let deadline = Instant::now() + FREEZE_WAIT;
        while !is_frozen(&std::fs::read(&events).unwrap_or_default()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    *holders += 1;
    Some(Frozen(()))
}

/// Whether the text of a `cgroup.events` file says the cgroup is frozen.
fn is_frozen(events: &[u8]) -> bool {
    events
        .split(|&b| b == b'\n')
        .any(|line| line == b"frozen 1")
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let mut holders = FREEZERS.lock().unwrap_or_else(|e| e.into_inner());
        *holders -= 1;
        if *holders == 0 {
            let _ = write_control(&format!("{EXECS}/cgroup.freeze"), b"0");
        }
    }
}

/// Removes the cgroups of earlier execs whose processes have all exited.
fn remove_leftovers() {
    let mut leftovers = LEFTOVERS.lock().unwrap_or_else(|e| e.into_inner());
    leftovers.retain(|dir| matches!(rmdir(dir), Err(e) if e.raw_os_error() == Some(libc::EBUSY)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execs_leave_threads_to_the_agent() {
        // A 256 MiB guest has a threads-max of about 1900.
        assert_eq!(execs_pids_max(1900), 1900 - RESERVED_THREADS);
        assert_eq!(execs_pids_max(100), MIN_EXECS_PIDS);
        assert_eq!(execs_pids_max(0), MIN_EXECS_PIDS);
    }

    #[test]
    fn pids_max_text() {
        assert_eq!(pids_max_value(0), b"max");
        assert_eq!(pids_max_value(1), b"1");
        assert_eq!(pids_max_value(PIDS_MAX_LIMIT), b"4194304");
        assert_eq!(pids_max_value(PIDS_MAX_LIMIT + 1), b"max");
        assert_eq!(pids_max_value(u64::MAX), b"max");
    }

    #[test]
    fn no_containment_without_setup() {
        // Unit tests never run setup(): no cgroup is made and nothing touches the host's cgroups.
        assert!(ExecGroup::create(DEFAULT_PIDS_MAX).is_none());
        assert!(freeze_execs().is_none());
    }

    #[test]
    fn frozen_is_read_from_cgroup_events() {
        assert!(is_frozen(b"populated 1\nfrozen 1\n"));
        assert!(!is_frozen(b"populated 1\nfrozen 0\n"));
        assert!(!is_frozen(b""));
        assert!(!is_frozen(b"frozen 10\n"));
    }
}
