//! The worker confines itself once its VM is built and before any guest instruction runs:
//! `pivot_root` into an empty read-only root (inside the mount namespace it was started in),
//! drop to an unprivileged uid/gid, give up every capability, and forbid privilege gains.
//!
//! The VM's files (kernel, disks, snapshot memory, /dev/kvm, /proc/self/pagemap) were opened
//! during the build; the worker keeps those descriptors and needs no path afterwards. Snapshot
//! outputs arrive as descriptors (see [`super::protocol::Request::Snapshot`]).

use std::ffi::CString;
use std::path::Path;
use std::sync::OnceLock;

use super::protocol::JailConfig;

/// Why the worker could not confine itself.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot {what}: {msg}")]
    Step { what: String, msg: String },
}

fn check(ret: libc::c_int, what: &str) -> Result<(), JailError> {
    if ret < 0 {
        return Err(JailError::Step {
            what: what.to_string(),
            msg: crate::vmm::os_msg(&std::io::Error::last_os_error()),
        });
    }
    Ok(())
}

fn c(path: &Path) -> Result<CString, JailError> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Step {
        what: "use the jail directory".into(),
        msg: "its path has a NUL byte".into(),
    })
}

/// Confines the calling process as `config` says. `namespaces` are those the worker was started
/// in (the root is only pivoted inside its own mount namespace). Returns the protections now in
/// force, by name.
pub fn enter(config: &JailConfig, namespaces: &[String]) -> Result<Vec<String>, JailError> {
    let mut active: Vec<String> = namespaces
        .iter()
        .map(|n| format!("{n} namespace"))
        .collect();
    if let Some(parent) = &config.root_parent {
        if namespaces.iter().any(|n| n == "mount") {
            pivot_into_empty_root(&parent.join("root"), config.shared_dir.as_deref())?;
            active.push("empty read-only root".into());
        }
    }
    if namespaces.iter().any(|n| n == "uts") {
        let name = b"supermachine-vmm";
        // SAFETY: a valid buffer and its length.
        check(
            unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) },
            "set the host name",
        )?;
    }
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        if let (Some(uid), Some(gid)) = (config.uid, config.gid) {
            if !namespaces.iter().any(|n| n == "user") {
                drop_to(uid, gid)?;
                active.push(format!("uid {uid} gid {gid}"));
            }
        }
    }
    drop_capabilities()?;
    active.push("no capabilities".into());
    // SAFETY: prctl with integer arguments only.
    check(
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        "set no_new_privs",
    )?;
    active.push("no_new_privs".into());
    // Not dumpable: no ptrace from other processes of the same uid, no core with guest memory.
    // SAFETY: as above.
    check(
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) },
        "make the worker undumpable",
    )?;
    Ok(active)
}

/// Whether each VM thread gives up its own capabilities when it confines itself (set once per
/// worker by [`prepare_threads`]; unset in-process, where threads keep what the caller has).
static THREADS_DROP_CAPS: OnceLock<bool> = OnceLock::new();

/// Says, before the VM's threads start, whether they must drop their capabilities themselves:
/// capabilities belong to each thread, and [`enter`] empties only the calling thread's. Under
/// root the switch to an unprivileged uid empties every thread's (glibc makes each thread change
/// its ids), and a thread must keep `CAP_SETUID` until then or that switch aborts the process; in
/// a user namespace the worker stays root there and nothing else would take them away.
pub fn prepare_threads(uid_change_pending: bool) {
    let _ = THREADS_DROP_CAPS.set(!uid_change_pending);
}

/// A VM thread's part of the jail, at its start: its capabilities, unless the uid change will
/// take them (see [`prepare_threads`]).
pub fn confine_thread() -> Result<(), JailError> {
    if THREADS_DROP_CAPS.get() == Some(&true) {
        drop_capabilities()?;
    }
    Ok(())
}

/// Makes `root` (created here, under the owner's private runtime directory) an empty tmpfs and
/// the process's root, read-only, with the old root detached.
fn pivot_into_empty_root(root: &Path, shared: Option<&Path>) -> Result<(), JailError> {
    let none = CString::new("none").expect("literal");
    let tmpfs = CString::new("tmpfs").expect("literal");
    let slash = CString::new("/").expect("literal");
    let old = CString::new("old").expect("literal");
    let old_abs = CString::new("/old").expect("literal");
    let opts = CString::new("size=64k,mode=0755").expect("literal");
    let root_c = c(root)?;
    // SAFETY: every call below takes valid NUL-terminated strings and integer flags; they only
    // change this process's mount namespace, which it was started in (never the host's).
    unsafe {
        // Nothing done here may propagate back to the host's mounts.
        check(
            libc::mount(
                none.as_ptr(),
                slash.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            "make the mounts private",
        )?;
        let made = libc::mkdir(root_c.as_ptr(), 0o755);
        if made < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            check(made, "create the jail root")?;
        }
        check(
            libc::mount(
                tmpfs.as_ptr(),
                root_c.as_ptr(),
                tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                opts.as_ptr().cast(),
            ),
            "mount the jail root",
        )?;
        if let Some(dir) = shared {
            share_dir(root, dir)?;
        }
        check(libc::chdir(root_c.as_ptr()), "enter the jail root")?;
        check(
            libc::mkdir(old.as_ptr(), 0o700),
            "create the old-root mount point",
        )?;
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), old.as_ptr()) as libc::c_int,
            "pivot_root into the jail",
        )?;
        check(libc::chdir(slash.as_ptr()), "enter the new root")?;
        check(
            libc::umount2(old_abs.as_ptr(), libc::MNT_DETACH),
            "detach the old root",
        )?;
        check(
            libc::rmdir(old_abs.as_ptr()),
            "remove the old-root mount point",
        )?;
        check(
            libc::mount(
                none.as_ptr(),
                slash.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            ),
            "make the jail root read-only",
        )?;
    }
    Ok(())
}

/// Bind-mounts `dir` (absolute) at the same path under `root`: no devices, no set-uid, no
/// execution.
fn share_dir(root: &Path, dir: &Path) -> Result<(), JailError> {
    let relative = dir.strip_prefix("/").map_err(|_| JailError::Step {
        what: "share the socket directory".into(),
        msg: "its path is not absolute".into(),
    })?;
    let target = root.join(relative);
    std::fs::create_dir_all(&target).map_err(|e| JailError::Step {
        what: format!("create {} in the jail", dir.display()),
        msg: crate::vmm::os_msg(&e),
    })?;
    let (src, dst) = (c(dir)?, c(&target)?);
    // SAFETY: valid strings and flags; the mount lives in this worker's own namespace.
    unsafe {
        check(
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ),
            "share the socket directory",
        )?;
        check(
            libc::mount(
                std::ptr::null(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT
                    | libc::MS_BIND
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                std::ptr::null(),
            ),
            "restrict the shared socket directory",
        )?;
    }
    Ok(())
}

/// Drops every group and switches to `uid`/`gid` for good (real, effective and saved ids).
fn drop_to(uid: u32, gid: u32) -> Result<(), JailError> {
    // SAFETY: credential calls with plain integers; glibc applies them to every thread.
    unsafe {
        check(
            libc::setgroups(0, std::ptr::null()),
            "drop supplementary groups",
        )?;
        check(libc::setresgid(gid, gid, gid), "set the group id")?;
        check(libc::setresuid(uid, uid, uid), "set the user id")?;
        if libc::getuid() != uid || libc::geteuid() != uid || libc::getegid() != gid {
            return Err(JailError::Step {
                what: "drop privileges".into(),
                msg: "the ids did not change".into(),
            });
        }
    }
    Ok(())
}

/// Empties the capability bounding set and the permitted/effective/inheritable sets of the
/// calling thread (each thread has its own: see [`prepare_threads`]).
fn drop_capabilities() -> Result<(), JailError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    for cap in 0..=63 {
        // SAFETY: prctl with integer arguments; an unknown capability gives EINVAL, ignored.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
    }
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data::default(); 2];
    // SAFETY: capset reads a valid header and two data structs (version 3 layout).
    check(
        unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) }
            as libc::c_int,
        "drop capabilities",
    )
}
