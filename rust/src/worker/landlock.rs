//! Landlock: the worker takes away its own file system and network access, for root and other
//! callers alike (under root it is defence in depth beside the empty root; without root it is
//! the main file system barrier).
//!
//! The ruleset handles every file system access right the running kernel knows (best effort
//! across ABI versions: the set is the kernel's ABI, capped by what the `landlock` crate knows)
//! and grants none of them anywhere: after the jail the worker opens no path (snapshot outputs
//! arrive as descriptors; files it opened before keep the rights they were opened with). It also
//! handles TCP bind and connect (ABI 4) with no port allowed, and scopes abstract Unix sockets
//! and signals (ABI 6) to the worker itself.
//!
//! What the worker still does by path after the jail: the vsock device connects to the host's
//! `<vsock_path>_<port>` listeners when the guest opens a connection. Landlock restricts that
//! only from ABI 9 (`LANDLOCK_ACCESS_FS_RESOLVE_UNIX`); there the socket's directory gets that
//! one right. The vsock listener itself is bound while the VM is built, before any restriction.
//!
//! The one thread that works on files by path is a shared folder's file server (virtio-fs, see
//! `devices::virtio::fs`): it gets a ruleset of its own, the same one plus the rights beneath
//! each shared folder (reading only, for a read-only share; otherwise everything but making
//! device nodes, FIFOs and sockets), opened while the ruleset is built, before the jail.
//!
//! Landlock restricts a thread (and the threads it creates later), not a process, until ABI 8's
//! `TSYNC`; the VM's threads already exist when the jail is entered. So, as with seccomp, every
//! thread restricts itself: [`prepare`] builds the ruleset once before the build, the vCPU and
//! device threads apply it at their start (through [`super::seccomp::apply`]), the control
//! thread in the jail step. Each thread then has a domain of its own: signals between threads of
//! one process stay allowed only on kernels with Landlock erratum 2 fixed, so signals are
//! scoped only there (the vCPU kick is a signal from the control thread).

use std::io::Write;
use std::path::Path;
use std::sync::OnceLock;

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, Erratum, PathBeneath, PathFd,
    RestrictionStatus, Ruleset, RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus,
    Scope, ABI,
};

/// For tests: a path every confined worker thread tries to open (read-only) once it is
/// restricted, before its seccomp filter goes on (which would end the worker for the attempt),
/// logging the outcome to the VM's log. Proves the restriction with a real `open`.
pub const PROBE_ENV: &str = "SUPERMACHINE_VMM_PROBE_OPEN";

/// Why Landlock cannot be set up or applied.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("the Landlock ruleset cannot be built: {0}")]
    Build(String),
    #[error("the {thread} thread cannot restrict itself with Landlock: {msg}")]
    Restrict { thread: String, msg: String },
}

/// The ruleset every thread applies, or why there is none.
struct Prepared {
    ruleset: Result<RulesetCreated, String>,
    /// The file server's ruleset (see the module comment), when the VM shares folders.
    fs_ruleset: Option<Result<RulesetCreated, String>>,
    /// The ABI the ruleset was built for.
    abi: i32,
    /// What it restricts, for the report ("files, TCP, abstract sockets, signals").
    covers: String,
    /// The path of [`PROBE_ENV`], if set.
    probe: Option<std::ffi::CString>,
}

static PREPARED: OnceLock<Prepared> = OnceLock::new();

thread_local! {
    /// This thread has restricted itself.
    static RESTRICTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The Landlock ABI version of the running kernel, or why Landlock is not usable.
pub fn kernel_abi() -> Result<i32, String> {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: with the VERSION flag and no attributes the call only returns the ABI version.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if rc > 0 {
        return Ok(rc as i32);
    }
    let e = std::io::Error::last_os_error();
    Err(match e.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel was built without Landlock".to_string(),
        Some(libc::EOPNOTSUPP) => {
            "Landlock is built in but not enabled (add landlock to the lsm= boot parameter)"
                .to_string()
        }
        _ => crate::vmm::os_msg(&e),
    })
}

/// For `supermachine doctor`: the kernel's Landlock ABI, the one a worker uses (the same, or the
/// newest the crate knows if the kernel is newer), and what a worker's ruleset covers there
/// ("files, TCP, abstract sockets, signals"), built as a worker builds it (but not applied); or
/// why there is none.
pub fn host_summary() -> Result<(i32, i32, String), String> {
    let kernel = kernel_abi()?;
    let abi = ABI::from(kernel);
    let (_, covers) = build(abi, None).map_err(|e| e.to_string())?;
    Ok((kernel, abi as i32, covers))
}

/// One folder the file server may work in, and whether only to read it.
pub type FsRule<'a> = (&'a Path, bool);

/// Builds the worker's ruleset, once per process, before the VM is built (while `shared_dir`,
/// the vsock socket's directory, and the shared folders of `mounts` can still be opened). A
/// host without Landlock is not an error: [`restrict_thread`] then does nothing and
/// [`describe`] says why.
pub fn prepare(shared_dir: Option<&Path>, mounts: &[FsRule<'_>]) {
    PREPARED.get_or_init(|| {
        let probe = std::env::var_os(PROBE_ENV).and_then(|p| {
            use std::os::unix::ffi::OsStrExt;
            std::ffi::CString::new(p.as_bytes()).ok()
        });
        match kernel_abi() {
            Ok(kernel) => {
                // A kernel newer than the crate gets the crate's newest ABI: name that one.
                let abi = ABI::from(kernel);
                let (ruleset, covers) = match build(abi, shared_dir) {
                    Ok((r, c)) => (Ok(r), c),
                    Err(e) => (Err(e.to_string()), String::new()),
                };
                let fs_ruleset =
                    (!mounts.is_empty()).then(|| build_fs(abi, mounts).map_err(|e| e.to_string()));
                Prepared {
                    ruleset,
                    fs_ruleset,
                    abi: abi as i32,
                    covers,
                    probe,
                }
            }
            Err(why) => Prepared {
                ruleset: Err(why),
                fs_ruleset: None,
                abi: 0,
                covers: String::new(),
                probe,
            },
        }
    });
}

fn build(abi: ABI, shared_dir: Option<&Path>) -> Result<(RulesetCreated, String), LandlockError> {
    let err = |e: &dyn std::fmt::Display| LandlockError::Build(e.to_string());
    let mut covers = vec!["files"];
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| err(&e))?;
    // No TCP at all: the worker has no network device yet. The networking issue's user-mode
    // stack (passt) will run in a process of its own; if the worker ever has to reach it, grant
    // exactly that port or socket here.
    let net = AccessNet::from_all(abi);
    if !net.is_empty() {
        ruleset = ruleset.handle_access(net).map_err(|e| err(&e))?;
        covers.push("TCP");
    }
    let mut scopes: BitFlags<Scope> = Scope::from_all(abi) & Scope::AbstractUnixSocket;
    if Erratum::current().contains(Erratum::ScopedSignalHandling) {
        scopes |= Scope::from_all(abi) & Scope::Signal;
    }
    if scopes.contains(Scope::AbstractUnixSocket) {
        covers.push("abstract sockets");
    }
    if scopes.contains(Scope::Signal) {
        covers.push("signals");
    }
    if !scopes.is_empty() {
        ruleset = ruleset.scope(scopes).map_err(|e| err(&e))?;
    }
    let mut created = ruleset.create().map_err(|e| err(&e))?;
    // Where connecting to a named Unix socket is a Landlock right (ABI 9), the vsock device
    // keeps it for the socket's directory: guest-initiated connections reach the host's
    // `<vsock_path>_<port>` listeners there.
    let resolve_unix = AccessFs::from_all(abi) & AccessFs::ResolveUnix;
    if let (Some(dir), false) = (shared_dir, resolve_unix.is_empty()) {
        let fd = PathFd::new(dir).map_err(|e| err(&e))?;
        created = created
            .add_rule(PathBeneath::new(fd, resolve_unix))
            .map_err(|e| err(&e))?;
    }
    Ok((created, covers.join(", ")))
}

/// The file server's ruleset: the worker's, plus the rights beneath each shared folder.
fn build_fs(abi: ABI, mounts: &[FsRule<'_>]) -> Result<RulesetCreated, LandlockError> {
    let err = |e: &dyn std::fmt::Display| LandlockError::Build(e.to_string());
    let (mut created, _) = build(abi, None)?;
    let all = AccessFs::from_all(abi);
    let no_nodes =
        AccessFs::MakeChar | AccessFs::MakeBlock | AccessFs::MakeFifo | AccessFs::MakeSock;
    for &(dir, read_only) in mounts {
        let rights = if read_only {
            AccessFs::from_read(abi)
        } else {
            all & !no_nodes
        };
        let fd = PathFd::new(dir).map_err(|e| err(&e))?;
        created = created
            .add_rule(PathBeneath::new(fd, rights))
            .map_err(|e| err(&e))?;
    }
    Ok(created)
}

/// Restricts the calling thread with the prepared ruleset (and sets its `no_new_privs`, which
/// an unprivileged Landlock needs). Returns the enforcement status, or `None` when nothing was
/// prepared (the in-process VMM) or the host has no Landlock.
pub fn restrict_thread(thread: &str) -> Result<Option<RestrictionStatus>, LandlockError> {
    let Some(prepared) = PREPARED.get() else {
        return Ok(None);
    };
    let fail = |msg: String| LandlockError::Restrict {
        thread: thread.to_string(),
        msg,
    };
    let chosen = match (thread, &prepared.fs_ruleset) {
        // A file server whose ruleset could not be built must not run with the worker's
        // (it would fail every request) nor unrestricted.
        ("fs", Some(Err(why))) => return Err(fail(why.clone())),
        ("fs", Some(Ok(fs))) => Ok(fs),
        _ => prepared.ruleset.as_ref(),
    };
    let Ok(ruleset) = chosen else {
        return Ok(None);
    };
    // Once per thread: the control thread restricts itself in the jail step and again passes
    // through [`super::seccomp::apply`]; a second, identical domain would only cost a layer.
    if RESTRICTED.with(|r| r.replace(true)) {
        return Ok(None);
    }
    let status = ruleset
        .try_clone()
        .map_err(|e| fail(crate::vmm::os_msg(&e)))?
        .restrict_self()
        .map_err(|e| fail(e.to_string()))?;
    probe_open(thread);
    Ok(Some(status))
}

/// The protection the control thread's `status` amounts to, for the worker's report
/// (`"landlock ABI 7 (files, TCP, abstract sockets, signals)"`), or why there is none.
pub fn describe(status: Option<&RestrictionStatus>) -> Result<String, String> {
    let Some(prepared) = PREPARED.get() else {
        return Err("Landlock was not set up".into());
    };
    if let Err(why) = &prepared.ruleset {
        return Err(why.clone());
    }
    let name = format!("landlock ABI {} ({})", prepared.abi, prepared.covers);
    match status.map(|s| &s.ruleset) {
        Some(RulesetStatus::FullyEnforced) => Ok(name),
        Some(RulesetStatus::PartiallyEnforced) => Ok(format!("{name}, partially enforced")),
        Some(RulesetStatus::NotEnforced) | None => Err(format!(
            "the kernel did not enforce the ruleset (ABI {})",
            prepared.abi
        )),
    }
}

/// The [`PROBE_ENV`] test: try to open the path and log what happened.
fn probe_open(thread: &str) {
    let Some(path) = PREPARED.get().and_then(|p| p.probe.as_ref()) else {
        return;
    };
    // SAFETY: a valid NUL-terminated path; the descriptor, if any, is closed at once.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    let outcome = if fd >= 0 {
        // SAFETY: our own descriptor, just opened.
        unsafe { libc::close(fd) };
        "opened".to_string()
    } else {
        crate::vmm::os_msg(&std::io::Error::last_os_error())
    };
    let _ = writeln!(
        std::io::stderr(),
        "supermachine-vmm: probe: {thread} thread: open {}: {outcome}",
        path.to_string_lossy()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::{UnixListener, UnixStream};

    /// Runs `body` in a thread of its own restricted by a ruleset built as the worker builds it
    /// (the test harness's other threads stay unrestricted).
    fn restricted<T: Send + 'static>(
        shared_dir: Option<&Path>,
        body: impl FnOnce() -> T + Send + 'static,
    ) -> Option<(RulesetStatus, T)> {
        let abi = kernel_abi().ok()?;
        let (ruleset, covers) = build(ABI::from(abi), shared_dir).unwrap();
        assert!(covers.starts_with("files"), "{covers}");
        Some(
            std::thread::spawn(move || {
                let status = ruleset.restrict_self().unwrap();
                (status.ruleset, body())
            })
            .join()
            .unwrap(),
        )
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sm-landlock-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_restricted_thread_opens_and_binds_nothing_but_keeps_its_descriptors() {
        let dir = temp_dir("files");
        let kept = dir.join("kept");
        std::fs::write(&kept, b"kept").unwrap();
        let open_before = std::fs::File::open(&kept).unwrap();
        let d = dir.clone();
        let result = restricted(None, move || {
            let errno = |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error());
            let open = errno(std::fs::File::open(d.join("kept")).map(drop));
            let create = errno(std::fs::File::create(d.join("new")).map(drop));
            let bind = errno(UnixListener::bind(d.join("sock")).map(drop));
            let tcp = errno(std::net::TcpListener::bind("127.0.0.1:0").map(drop));
            let mut s = String::new();
            (&open_before).read_to_string(&mut s).unwrap();
            (open, create, bind, tcp, s)
        });
        std::fs::remove_dir_all(&dir).unwrap();
        let Some((status, (open, create, bind, tcp, read))) = result else {
            return; // no Landlock on this kernel: nothing to restrict
        };
        assert_eq!(status, RulesetStatus::FullyEnforced);
        assert_eq!(open, Some(libc::EACCES), "open after the restriction");
        assert_eq!(create, Some(libc::EACCES), "create after the restriction");
        assert_eq!(bind, Some(libc::EACCES), "binding a named socket");
        if kernel_abi().unwrap() >= 4 {
            assert_eq!(tcp, Some(libc::EACCES), "TCP bind");
        }
        assert_eq!(read, "kept", "a descriptor opened before keeps working");
    }

    #[test]
    fn the_file_server_reaches_its_shared_folders_and_nothing_else() {
        let dir = temp_dir("fs");
        let (rw, ro, outside) = (dir.join("rw"), dir.join("ro"), dir.join("outside"));
        for d in [&rw, &ro, &outside] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("f"), b"f").unwrap();
        }
        let Ok(abi) = kernel_abi() else {
            std::fs::remove_dir_all(&dir).unwrap();
            return; // no Landlock on this kernel
        };
        let ruleset = build_fs(ABI::from(abi), &[(&rw, false), (&ro, true)]).unwrap();
        let (a, b, c) = (rw.clone(), ro.clone(), outside.clone());
        let got = std::thread::spawn(move || {
            ruleset.restrict_self().unwrap();
            let errno = |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error());
            (
                errno(std::fs::read(a.join("f")).map(drop)),
                errno(std::fs::write(a.join("new"), b"n")),
                errno(std::fs::create_dir(a.join("sub"))),
                errno(std::fs::read(b.join("f")).map(drop)),
                errno(std::fs::write(b.join("new"), b"n")),
                errno(std::fs::read(c.join("f")).map(drop)),
                errno(std::fs::hard_link(c.join("f"), a.join("in"))),
                errno(std::fs::rename(a.join("f"), c.join("g"))),
            )
        })
        .join()
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let denied = Some(libc::EACCES);
        let xdev = Some(libc::EXDEV);
        assert_eq!(got.0, None, "read in the read-write share");
        assert_eq!(got.1, None, "create in the read-write share");
        assert_eq!(got.2, None, "mkdir in the read-write share");
        assert_eq!(got.3, None, "read in the read-only share");
        assert_eq!(got.4, denied, "create in the read-only share");
        assert_eq!(got.5, denied, "read outside");
        assert!(
            got.6 == denied || got.6 == xdev,
            "link in from outside: {:?}",
            got.6
        );
        assert!(got.7 == denied || got.7 == xdev, "rename out: {:?}", got.7);
    }

    #[test]
    fn a_restricted_thread_still_connects_to_the_vsock_listeners() {
        // As the vsock device does for a guest-initiated connection: connect to a named socket
        // bound by the host in the socket directory.
        let dir = temp_dir("vsock");
        let path = dir.join("v.sock_1234");
        let listener = UnixListener::bind(&path).unwrap();
        let result = restricted(Some(&dir), move || UnixStream::connect(&path).map(drop));
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
        if let Some((status, connected)) = result {
            assert_eq!(status, RulesetStatus::FullyEnforced);
            connected.unwrap();
        }
    }
}
