//! PID 1 duties: API file systems, the root file system switch, hostname and loopback.
//!
//! Every system call is expensive in a guest whose kernel is emulated, so directories that the
//! initramfs already contains are not created again: `mkdir` only runs after a mount reported ENOENT.

use std::ffi::CString;
use std::io;

use crate::changes::Layers;
use crate::sys;

pub struct Cmdline {
    pub root: String,
    pub fstype: String,
    pub hostname: String,
    /// Whether `/run` and `/tmp` are tmpfs mounts (`sm.tmpfs=none`: they are the root's own
    /// directories, as in a container build, so what a step writes there is part of its layer).
    pub tmpfs: bool,
}

impl Cmdline {
    pub fn parse(text: &str) -> Cmdline {
        let mut out = Cmdline {
            root: "/dev/vda".into(),
            fstype: "squashfs".into(),
            hostname: "supermachine".into(),
            tmpfs: true,
        };
        for word in text.split_ascii_whitespace() {
            if let Some(v) = word.strip_prefix("sm.root=") {
                out.root = v.to_string();
            } else if let Some(v) = word.strip_prefix("sm.rootfstype=") {
                out.fstype = v.to_string();
            } else if let Some(v) = word.strip_prefix("sm.hostname=") {
                out.hostname = v.to_string();
            } else if let Some(v) = word.strip_prefix("sm.tmpfs=") {
                out.tmpfs = v != "none";
            }
        }
        out
    }
}

fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL in built-in strings")
}

fn mount_raw(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let (source, target) = (c(source), c(target));
    let fstype = fstype.map(c);
    let data = data.map(c);
    // SAFETY: source and target are NUL-terminated CStrings, fstype and data are either such
    // CStrings or null (which mount accepts for both); all outlive the call.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    sys::cvt(ret).map(|_| ())
}

fn mkdir(path: &str, mode: libc::mode_t) -> io::Result<()> {
    let p = c(path);
    // SAFETY: `p` is a NUL-terminated CString that outlives the call.
    match sys::cvt(unsafe { libc::mkdir(p.as_ptr(), mode) }) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Mounts, creating the mount point only if it is missing. `mode` is the mount point's mode.
fn mount(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
    mode: libc::mode_t,
) -> Result<(), String> {
    let what = fstype.unwrap_or(source);
    let describe = |e: io::Error| format!("mount {what} on {target}: {}", sys::errno_text(&e));
    match mount_raw(source, target, fstype, flags, data) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !target.is_empty() => {
            // The mount point (or the source) is missing: create the mount point, try once more.
            match mkdir(target, mode) {
                Ok(()) => mount_raw(source, target, fstype, flags, data).map_err(describe),
                Err(_) => Err(describe(e)),
            }
        }
        other => other.map_err(describe),
    }
}

fn ensure_stdio() {
    for fd in 0..3 {
        // SAFETY: F_GETFD takes no argument and only inspects the descriptor table; on a closed
        // descriptor it fails with EBADF.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            let console = c("/dev/console");
            // SAFETY: `console` is a NUL-terminated CString that outlives the call; without
            // O_CREAT no mode argument is read.
            let mut opened = unsafe { libc::open(console.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
            if opened < 0 {
                let null = c("/dev/null");
                // SAFETY: as above, a live CString and no O_CREAT.
                opened = unsafe { libc::open(null.as_ptr(), libc::O_RDWR) };
            }
            if opened >= 0 && opened != fd {
                // SAFETY: integers only. `opened` was just opened here and nothing else owns it;
                // `fd` was found closed, so dup2 replaces no descriptor that any OwnedFd or File
                // owns. This runs during boot, before any other thread exists.
                unsafe {
                    libc::dup2(opened, fd);
                    libc::close(opened);
                }
            }
        }
    }
}

const NOSUID_NODEV: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV;

/// The API file systems under `/`. /dev first: the console and the root device live there.
fn mount_api() -> Result<(), String> {
    match mount(
        "devtmpfs",
        "/dev",
        Some("devtmpfs"),
        libc::MS_NOSUID,
        Some("mode=0755"),
        0o755,
    ) {
        Err(e) if e.ends_with("Device or resource busy") => {}
        other => other?,
    }
    ensure_stdio();
    mount(
        "proc",
        "/proc",
        Some("proc"),
        NOSUID_NODEV | libc::MS_NOEXEC,
        None,
        0o555,
    )?;
    mount(
        "sysfs",
        "/sys",
        Some("sysfs"),
        NOSUID_NODEV | libc::MS_NOEXEC,
        None,
        0o555,
    )?;
    mount(
        "devpts",
        "/dev/pts",
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("gid=5,mode=0620,ptmxmode=0666"),
        0o755,
    )?;
    mount(
        "shm",
        "/dev/shm",
        Some("tmpfs"),
        NOSUID_NODEV,
        Some("mode=1777"),
        0o1777,
    )?;
    Ok(())
}

/// The scratch file systems: tmpfs on `/run` and `/tmp`.
fn mount_scratch() -> Result<(), String> {
    mount(
        "run",
        "/run",
        Some("tmpfs"),
        NOSUID_NODEV,
        Some("mode=0755"),
        0o755,
    )?;
    mount(
        "tmp",
        "/tmp",
        Some("tmpfs"),
        NOSUID_NODEV,
        Some("mode=1777"),
        0o1777,
    )
}

/// Mounts the cgroup v2 hierarchy on `target` (for exec containment, see `cgroup`).
pub fn mount_cgroup2(target: &str) -> Result<(), String> {
    mount(
        "cgroup2",
        target,
        Some("cgroup2"),
        NOSUID_NODEV | libc::MS_NOEXEC,
        None,
        0o555,
    )
}

/// The overlay's options. Directory renames copy (`redirect_dir=off`) and a metadata change copies
/// the whole file up (`metacopy=off`): either way the upper directory alone holds every change
/// (see `changes`), with no reference back into the image.
const OVERLAY_OPTIONS: &str =
    "lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work,redirect_dir=off,metacopy=off";

/// Read-only root + tmpfs upper layer as an overlay, the API mounts moved into it, then the overlay
/// moved onto `/` and made the root (what `switch_root` does; the initramfs itself cannot be
/// unmounted and stays underneath). Returns the overlay's halves, opened before they become
/// unreachable by path.
fn switch_root(cmd: &Cmdline) -> Result<Layers, String> {
    mount(
        &cmd.root,
        "/mnt/lower",
        Some(&cmd.fstype),
        libc::MS_RDONLY,
        None,
        0o755,
    )?;
    mount("rw", "/mnt/rw", Some("tmpfs"), 0, Some("mode=0755"), 0o755)?;
    for dir in ["/mnt/rw/upper", "/mnt/rw/work"] {
        mkdir(dir, 0o755).map_err(|e| format!("mkdir {dir}: {}", sys::errno_text(&e)))?;
    }
    mount(
        "overlay",
        "/mnt/root",
        Some("overlay"),
        0,
        Some(OVERLAY_OPTIONS),
        0o755,
    )?;
    let layers = Layers::open("/mnt/rw/upper", Some("/mnt/lower"))
        .map_err(|e| format!("open the overlay's layers: {}", sys::errno_text(&e)))?;
    let scratch: &[(&str, libc::mode_t)] = if cmd.tmpfs {
        &[("/run", 0o755), ("/tmp", 0o1777)]
    } else {
        &[]
    };
    for &(dir, mode) in [("/dev", 0o755), ("/proc", 0o555), ("/sys", 0o555)]
        .iter()
        .chain(scratch)
    {
        mount(
            dir,
            &format!("/mnt/root{dir}"),
            None,
            libc::MS_MOVE,
            None,
            mode,
        )?;
    }
    let fail = |what: &str| {
        let e = io::Error::last_os_error();
        format!("{what}: {}", sys::errno_text(&e))
    };
    let (root, dot, slash) = (c("/mnt/root"), c("."), c("/"));
    // SAFETY: every pointer is a NUL-terminated CString that outlives the block, or null where
    // mount accepts null (no file system type or data for MS_MOVE).
    unsafe {
        if libc::chdir(root.as_ptr()) != 0 {
            return Err(fail("chdir /mnt/root"));
        }
        if libc::mount(
            dot.as_ptr(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        ) != 0
        {
            return Err(fail("move /mnt/root to /"));
        }
        if libc::chroot(dot.as_ptr()) != 0 {
            return Err(fail("chroot"));
        }
        if libc::chdir(slash.as_ptr()) != 0 {
            return Err(fail("chdir /"));
        }
    }
    Ok(layers)
}

fn loopback_up() {
    // SAFETY: `sock` is a raw descriptor created and closed here and owned by nothing else.
    // `ifreq` is a plain C struct (a name array and a union of integers, sockaddrs and a raw
    // pointer), for which all zeroes is valid; the name "lo" is copied in and stays NUL-terminated by the
    // zeroes after it. SIOCSIFFLAGS reads one ifreq from `&req`, which outlives the call.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return;
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo") {
            *dst = *src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags =
            (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as libc::c_short;
        libc::ioctl(sock, libc::SIOCSIFFLAGS, &req);
        libc::close(sock);
    }
}

/// Everything PID 1 does before serving; returns what the root is, for the console, and the
/// overlay's layers (none when the initramfs stays the root). An error is fatal (the caller
/// powers off).
pub fn boot() -> Result<(String, Option<Layers>), String> {
    mount_api()?;
    let cmdline =
        std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("read /proc/cmdline: {e}"))?;
    let cmd = Cmdline::parse(&cmdline);
    if cmd.tmpfs || cmd.root == "none" {
        mount_scratch()?;
    }
    let (root, layers) = if cmd.root == "none" {
        ("root: initramfs".to_string(), None)
    } else {
        let layers = switch_root(&cmd)?;
        (
            format!("root: {} ({}) + tmpfs overlay", cmd.root, cmd.fstype),
            Some(layers),
        )
    };
    // SAFETY: sethostname reads exactly `len` bytes from the string's buffer (no NUL needed); the
    // kernel rejects lengths above its limit with EINVAL.
    unsafe { libc::sethostname(cmd.hostname.as_ptr().cast(), cmd.hostname.len()) };
    loopback_up();
    Ok((root, layers))
}

#[cfg(test)]
mod tests {
    use super::Cmdline;

    #[test]
    fn defaults_and_overrides() {
        let c = Cmdline::parse("console=ttyS0 reboot=k panic=-1\n");
        assert_eq!(
            (c.root.as_str(), c.fstype.as_str(), c.hostname.as_str()),
            ("/dev/vda", "squashfs", "supermachine")
        );
        assert!(c.tmpfs);
        assert!(!Cmdline::parse("sm.tmpfs=none").tmpfs);
        let c = Cmdline::parse("sm.root=none sm.rootfstype=ext4 quiet sm.hostname=box sm.rootx=1");
        assert_eq!(
            (c.root.as_str(), c.fstype.as_str(), c.hostname.as_str()),
            ("none", "ext4", "box")
        );
        // The last occurrence wins, as for kernel parameters.
        assert_eq!(
            Cmdline::parse("sm.root=/dev/vdb sm.root=/dev/vdc").root,
            "/dev/vdc"
        );
    }
}
