//! What this host supports: the protections a VM worker can run under, each with the reason it
//! is or is not available. Used by `supermachine doctor` and by the jail to choose its mode.
//!
//! [`probe`] is cheap (a few milliseconds, no VM): namespace and `pivot_root` support are probed
//! by cloning a short-lived child that shares our memory (`CLONE_VM | CLONE_VFORK`, so nothing is
//! copied) into the new namespaces; the child makes only raw system calls and exits.

use std::ffi::{c_int, c_void};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use serde::Serialize;

use super::cgroup::{self, Controller, Version};
use super::landlock;
use super::spawn::IdMaps;

/// One protection: whether this host offers it, and one sentence saying why or why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Protection {
    pub available: bool,
    pub detail: String,
}

impl Protection {
    fn yes(detail: impl Into<String>) -> Self {
        Protection {
            available: true,
            detail: detail.into(),
        }
    }

    fn no(detail: impl Into<String>) -> Self {
        Protection {
            available: false,
            detail: detail.into(),
        }
    }
}

/// Every protection a worker can use, as this host offers them.
#[derive(Debug, Clone, Serialize)]
pub struct Protections {
    /// `/dev/kvm` opens read-write: VMs can run at all.
    pub kvm: Protection,
    /// Running as root: the full jail (namespaces, `pivot_root`, privilege drop).
    pub root: Protection,
    pub mount_namespace: Protection,
    pub pid_namespace: Protection,
    pub ipc_namespace: Protection,
    pub uts_namespace: Protection,
    pub net_namespace: Protection,
    pub user_namespace: Protection,
    /// `pivot_root` into a fresh root inside a new mount namespace.
    pub pivot_root: Protection,
    /// seccomp-bpf filters.
    pub seccomp: Protection,
    /// Landlock: no file or TCP access, scoped abstract sockets and signals (the ABI version
    /// when available). Applied by every worker, root's too.
    pub landlock: Protection,
    pub cgroup_memory: Protection,
    pub cgroup_cpu: Protection,
    pub cgroup_pids: Protection,
    pub no_new_privs: Protection,
    /// KVM is `kvm_pvm`, a software nested hypervisor: guest kernel code is emulated (slow).
    pub kvm_pvm: Protection,
}

/// How strongly a worker can be jailed on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum JailLevel {
    /// Root: namespaces, `pivot_root`, an unprivileged uid/gid, seccomp, `no_new_privs`, and
    /// Landlock where the kernel has it.
    Full,
    /// Not root, user namespaces allowed: namespaces inside a user namespace, `pivot_root`,
    /// seccomp, `no_new_privs`, and Landlock where the kernel has it.
    Unprivileged,
    /// Neither: seccomp, `no_new_privs`, and Landlock where the kernel has it.
    Minimal,
}

impl JailLevel {
    pub fn name(self) -> &'static str {
        match self {
            JailLevel::Full => "full",
            JailLevel::Unprivileged => "unprivileged",
            JailLevel::Minimal => "minimal",
        }
    }
}

impl Protections {
    /// Name and value of every protection, in a stable order (names are the field names).
    pub fn entries(&self) -> [(&'static str, &Protection); 16] {
        [
            ("kvm", &self.kvm),
            ("root", &self.root),
            ("mount_namespace", &self.mount_namespace),
            ("pid_namespace", &self.pid_namespace),
            ("ipc_namespace", &self.ipc_namespace),
            ("uts_namespace", &self.uts_namespace),
            ("net_namespace", &self.net_namespace),
            ("user_namespace", &self.user_namespace),
            ("pivot_root", &self.pivot_root),
            ("seccomp", &self.seccomp),
            ("landlock", &self.landlock),
            ("cgroup_memory", &self.cgroup_memory),
            ("cgroup_cpu", &self.cgroup_cpu),
            ("cgroup_pids", &self.cgroup_pids),
            ("no_new_privs", &self.no_new_privs),
            ("kvm_pvm", &self.kvm_pvm),
        ]
    }

    /// The jail a worker gets on this host.
    pub fn jail_level(&self) -> JailLevel {
        if self.root.available {
            JailLevel::Full
        } else if self.user_namespace.available && self.pivot_root.available {
            JailLevel::Unprivileged
        } else {
            JailLevel::Minimal
        }
    }
}

/// Probes this host (a few milliseconds; creates no VM).
pub fn probe() -> Protections {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let is_root = euid == 0;
    let user = probe_user_namespace(is_root);
    // Unprivileged, the other namespaces can only be made together with a user namespace.
    let with_user = !is_root && user.available;
    let ns = |flag: c_int, what: &str| probe_namespace(flag, what, is_root, with_user);
    Protections {
        kvm: probe_kvm(),
        root: if is_root {
            Protection::yes("running as root: workers get the full jail (namespaces, pivot_root, an unprivileged uid)")
        } else {
            Protection::no(format!(
                "running as uid {euid}: the jail can only use what an unprivileged process may"
            ))
        },
        mount_namespace: ns(libc::CLONE_NEWNS, "a mount"),
        pid_namespace: ns(libc::CLONE_NEWPID, "a PID"),
        ipc_namespace: ns(libc::CLONE_NEWIPC, "an IPC"),
        uts_namespace: ns(libc::CLONE_NEWUTS, "a UTS"),
        net_namespace: ns(libc::CLONE_NEWNET, "a network"),
        user_namespace: user,
        pivot_root: probe_pivot_root(is_root, with_user),
        seccomp: probe_seccomp(),
        landlock: probe_landlock(),
        cgroup_memory: probe_cgroup(Controller::Memory, is_root),
        cgroup_cpu: probe_cgroup(Controller::Cpu, is_root),
        cgroup_pids: probe_cgroup(Controller::Pids, is_root),
        no_new_privs: probe_no_new_privs(),
        kvm_pvm: if Path::new("/sys/module/kvm_pvm").exists() {
            Protection::yes("KVM is kvm_pvm, a software nested hypervisor: guest kernel code is emulated and slow")
        } else {
            Protection::no("KVM is not kvm_pvm: guests run on the host's own virtualisation")
        },
    }
}

fn probe_kvm() -> Protection {
    const DEV: &str = "/dev/kvm";
    match kvm_ioctls::Kvm::new() {
        Ok(kvm) => match kvm.get_api_version() {
            // The KVM API version has been 12 since Linux 2.6.22; anything else is not KVM.
            12 => Protection::yes(format!("{DEV} opens read-write (KVM API version 12)")),
            v => Protection::no(format!(
                "{DEV} opens but answers KVM API version {v}, not 12: it is not a KVM device"
            )),
        },
        Err(e) => {
            let why = match e.errno() {
                libc::ENOENT => {
                    "does not exist: load kvm_intel or kvm_amd, or enable (nested) virtualisation"
                        .to_string()
                }
                libc::EACCES | libc::EPERM => {
                    "is not readable and writable by this user: add the user to the kvm group"
                        .to_string()
                }
                _ => format!(
                    "cannot be opened: {}",
                    io::Error::from_raw_os_error(e.errno())
                ),
            };
            Protection::no(format!("{DEV} {why}"))
        }
    }
}

/// Results a probe child writes into memory it shares with us.
#[derive(Default)]
struct ChildReport {
    /// The step that failed (0: none).
    step: AtomicI32,
    errno: AtomicI32,
    /// For [`userns_child`]: the id maps to write, as a worker's child writes them.
    maps: Option<IdMaps>,
}

/// Runs `child` in a clone sharing our memory (the parent waits until it exits) with `flags`.
/// Returns the clone's own error, or the child's report.
fn clone_probe(
    flags: c_int,
    child: extern "C" fn(*mut c_void) -> c_int,
    report: &ChildReport,
) -> io::Result<()> {
    const STACK: usize = 64 << 10;
    let mut stack = vec![0u8; STACK];
    // The stack grows down: pass its 16-byte aligned top.
    let top = (stack.as_mut_ptr() as usize + STACK) & !15;
    // SAFETY: `top` is the aligned end of a live buffer that outlives the child (CLONE_VFORK
    // suspends us until the child exits); `child` only makes raw system calls and writes
    // atomics in `report`, which also outlives it. Without CLONE_FS the child's cwd/root
    // changes stay its own.
    let pid = unsafe {
        libc::clone(
            child,
            top as *mut c_void,
            flags | libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            report as *const ChildReport as *mut c_void,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is a valid out-pointer.
    unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
    match report.step.load(Ordering::SeqCst) {
        0 => Ok(()),
        _ => Err(io::Error::from_raw_os_error(
            report.errno.load(Ordering::SeqCst),
        )),
    }
}

extern "C" fn exit_child(_: *mut c_void) -> c_int {
    // SAFETY: _exit ends the child only (no CLONE_THREAD) and touches no shared state.
    unsafe { libc::_exit(0) }
}

/// In a new user namespace: write the id maps as a worker's child does before it execs (a
/// worker that execs unmapped has no capabilities there, so this is what decides whether the
/// unprivileged jail works).
extern "C" fn userns_child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the ChildReport the parent keeps alive until we exit.
    let report = unsafe { &*(arg as *const ChildReport) };
    if let Some(maps) = &report.maps {
        // SAFETY: we are the child of clone, in our own new user namespace.
        if let Err((_, errno)) = unsafe { maps.write_own() } {
            report.errno.store(errno, Ordering::SeqCst);
            report.step.store(1, Ordering::SeqCst);
        }
    }
    // SAFETY: ends the child only.
    unsafe { libc::_exit(0) }
}

/// In a new mount namespace: make mounts private, mount a tmpfs over /proc (this namespace's
/// copy only), `pivot_root` into it and detach the old root, as the jail does.
extern "C" fn pivot_child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the ChildReport the parent keeps alive until we exit.
    let report = unsafe { &*(arg as *const ChildReport) };
    let fail = |step: i32| -> ! {
        // SAFETY: reads this thread's errno.
        let errno = unsafe { *libc::__errno_location() };
        report.errno.store(errno, Ordering::SeqCst);
        report.step.store(step, Ordering::SeqCst);
        // SAFETY: ends the child only.
        unsafe { libc::_exit(1) }
    };
    let root = c"/";
    let target = c"/proc";
    let tmpfs = c"tmpfs";
    let dot = c".";
    // SAFETY (all calls below): plain system calls on static NUL-terminated strings, in this
    // child's own mount namespace.
    unsafe {
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            fail(1);
        }
        if libc::mount(
            tmpfs.as_ptr(),
            target.as_ptr(),
            tmpfs.as_ptr(),
            0,
            std::ptr::null(),
        ) != 0
        {
            fail(2);
        }
        if libc::chdir(target.as_ptr()) != 0 {
            fail(3);
        }
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0 {
            fail(4);
        }
        if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0 {
            fail(5);
        }
        libc::_exit(0)
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Why unprivileged user namespaces are refused, from the sysctls that control them.
fn user_namespace_policy() -> Option<String> {
    if read_trimmed("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        return Some("user.max_user_namespaces is 0".into());
    }
    if read_trimmed("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        return Some("kernel.unprivileged_userns_clone is 0".into());
    }
    if read_trimmed("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref()
        == Some("1")
    {
        return Some(
            "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns is 1)"
                .into(),
        );
    }
    None
}

fn probe_user_namespace(is_root: bool) -> Protection {
    let report = ChildReport {
        maps: Some(IdMaps::for_caller()),
        ..ChildReport::default()
    };
    match clone_probe(libc::CLONE_NEWUSER, userns_child, &report) {
        Ok(()) => {
            let note = if is_root {
                "; the root jail does not need one"
            } else {
                ""
            };
            match user_namespace_policy().filter(|_| !is_root) {
                // Created, but AppArmor may still deny capabilities inside (pivot_root says).
                Some(policy) => {
                    Protection::yes(format!("a user namespace can be created, though {policy}"))
                }
                None => Protection::yes(format!("a user namespace can be created{note}")),
            }
        }
        Err(e) if report.step.load(Ordering::SeqCst) == 1 => {
            let why = if e.raw_os_error() == Some(libc::EACCES) {
                " (this process is not dumpable, so its /proc files are root's)".to_string()
            } else {
                String::new()
            };
            Protection::no(format!(
                "a user namespace can be created but its worker cannot map its ids: {e}{why}"
            ))
        }
        Err(e) => {
            let why = user_namespace_policy().unwrap_or_else(|| e.to_string());
            Protection::no(format!("cannot create a user namespace: {why}"))
        }
    }
}

fn probe_namespace(flag: c_int, what: &str, is_root: bool, with_user: bool) -> Protection {
    let flags = if with_user {
        flag | libc::CLONE_NEWUSER
    } else {
        flag
    };
    match clone_probe(flags, exit_child, &ChildReport::default()) {
        Ok(()) if with_user => Protection::yes(format!(
            "{what} namespace can be created inside a new user namespace"
        )),
        Ok(()) => Protection::yes(format!("{what} namespace can be created")),
        Err(e) if !is_root && !with_user => Protection::no(format!(
            "cannot create {what} namespace ({e}): it needs root or a user namespace"
        )),
        Err(e) => Protection::no(format!("cannot create {what} namespace: {e}")),
    }
}

fn probe_pivot_root(is_root: bool, with_user: bool) -> Protection {
    if !is_root && !with_user {
        return Protection::no(
            "pivot_root needs root or a user namespace, and neither is available",
        );
    }
    let flags = libc::CLONE_NEWNS | if with_user { libc::CLONE_NEWUSER } else { 0 };
    let report = ChildReport::default();
    match clone_probe(flags, pivot_child, &report) {
        Ok(()) => {
            Protection::yes("pivot_root into a fresh tmpfs root works in a new mount namespace")
        }
        Err(e) => {
            let step = match report.step.load(Ordering::SeqCst) {
                0 => "creating the mount namespace",
                1 => "making mounts private",
                2 => "mounting a tmpfs",
                3 => "entering the new root",
                4 => "pivot_root",
                _ => "detaching the old root",
            };
            Protection::no(format!(
                "pivot_root cannot be done here: {step} failed: {e}"
            ))
        }
    }
}

/// The `Seccomp:` mode of this process from /proc/self/status (0 none, 1 strict, 2 filter).
fn own_seccomp_mode() -> Option<String> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:").map(|v| v.trim().to_string()))
}

fn probe_seccomp() -> Protection {
    const SECCOMP_GET_ACTION_AVAIL: libc::c_ulong = 2;
    let action: u32 = libc::SECCOMP_RET_KILL_PROCESS;
    // SAFETY: SECCOMP_GET_ACTION_AVAIL only reads the u32 that `action` points to.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_GET_ACTION_AVAIL,
            0,
            &action as *const u32,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Protection::no(format!(
            "the kernel offers no seccomp filters that kill the process: {e}"
        ));
    }
    let note = match own_seccomp_mode().as_deref() {
        Some("2") => {
            " (this process already runs under a filter; the worker's filter is added to it)"
        }
        _ => "",
    };
    Protection::yes(format!(
        "seccomp-bpf filters with SECCOMP_RET_KILL_PROCESS are supported{note}"
    ))
}

fn probe_landlock() -> Protection {
    match landlock::host_summary() {
        Ok((kernel, used, covers)) => {
            let newer = if used == kernel {
                String::new()
            } else {
                format!(" (workers use ABI {used}, the newest they know)")
            };
            Protection::yes(format!(
                "Landlock ABI version {kernel}{newer}: every worker thread restricts itself \
                 ({covers}; nothing granted)"
            ))
        }
        Err(why) => Protection::no(format!("Landlock is not available: {why}")),
    }
}

fn probe_cgroup(controller: Controller, is_root: bool) -> Protection {
    let name = controller.name();
    match cgroup::locate(controller) {
        Ok(loc) => {
            let v = match loc.version {
                Version::V1 => "v1",
                Version::V2 => "v2",
            };
            let writable = is_root || {
                let path = std::ffi::CString::new(loc.group.as_os_str().as_encoded_bytes()).ok();
                // SAFETY: access only reads the NUL-terminated path.
                path.is_some_and(|p| unsafe { libc::access(p.as_ptr(), libc::W_OK) } == 0)
            };
            if writable {
                Protection::yes(format!(
                    "cgroup {v} {name} controller: VM groups go beneath {}",
                    loc.group.display()
                ))
            } else {
                Protection::no(format!(
                    "cgroup {v} {name} controller, but this user cannot create groups in {}",
                    loc.group.display()
                ))
            }
        }
        Err(e) => Protection::no(e.to_string()),
    }
}

fn probe_no_new_privs() -> Protection {
    // SAFETY: PR_GET_NO_NEW_PRIVS takes no pointers.
    let rc = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
    match rc {
        0 => Protection::yes(
            "no_new_privs is supported: the worker sets it before running guest code",
        ),
        1 => Protection::yes("no_new_privs is supported and already set on this process"),
        _ => Protection::no(format!(
            "no_new_privs is not supported: {}",
            io::Error::last_os_error()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_match_the_serialized_names() {
        let p = probe();
        let json = serde_json::to_value(&p).unwrap();
        let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        let mut names: Vec<&str> = p.entries().iter().map(|(n, _)| *n).collect();
        let mut keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
        names.sort_unstable();
        keys.sort_unstable();
        assert_eq!(names, keys);
        for (name, e) in p.entries() {
            assert!(!e.detail.is_empty(), "{name}");
            assert!(!e.detail.contains('\n'), "{name}: {}", e.detail);
        }
    }

    #[test]
    fn agrees_with_what_the_process_can_do() {
        let ns_before = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let cwd_before = std::env::current_dir().unwrap();
        let p = probe();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert_eq!(p.root.available, root);
        assert_eq!(
            p.kvm.available,
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok()
        );
        assert_eq!(
            p.kvm_pvm.available,
            Path::new("/sys/module/kvm_pvm").exists()
        );
        for c in Controller::ALL {
            let entry = match c {
                Controller::Memory => &p.cgroup_memory,
                Controller::Cpu => &p.cgroup_cpu,
                Controller::Pids => &p.cgroup_pids,
            };
            if root {
                assert_eq!(
                    entry.available,
                    cgroup::locate(c).is_ok(),
                    "{}",
                    entry.detail
                );
            }
        }
        // Landlock's answer is the kernel's: a version number, or a reason.
        assert!(
            p.landlock.detail.starts_with("Landlock ABI version ")
                || p.landlock.detail.starts_with("Landlock is not available: ")
        );
        if root {
            // Root can always unshare mount namespaces unless a seccomp filter forbids it.
            assert_eq!(p.jail_level(), JailLevel::Full);
        }
        // The probe children's mounts and chdir stay theirs.
        assert_eq!(std::fs::read_link("/proc/self/ns/mnt").unwrap(), ns_before);
        assert_eq!(std::env::current_dir().unwrap(), cwd_before);
    }

    #[test]
    fn a_namespace_probe_reports_clone_errors() {
        // An invalid flag combination must be reported, not taken for success.
        let e = clone_probe(
            libc::CLONE_NEWUSER | libc::CLONE_FS,
            exit_child,
            &ChildReport::default(),
        );
        assert!(e.is_err());
    }
}
