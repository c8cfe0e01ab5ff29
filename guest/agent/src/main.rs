//! supermachine-agent: the init process and exec agent of a supermachine microVM.
//!
//! As PID 1 it mounts the API file systems, switches to the overlay root and serves the exec
//! protocol (PROTOCOL.md) on vsock port 1024. As an ordinary process
//! (`supermachine-agent --listen unix:PATH`) it only serves the protocol, for tests.

// Every unsafe block says why it is sound, and unsafe functions spell out their unsafe operations.
#![warn(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

mod archive;
mod cgroup;
mod changes;
mod conn;
mod exec;
mod files;
mod init;
mod mounts;
mod net;
mod netetc;
mod netif;
mod power;
mod proto;
#[cfg(test)]
mod proto_fuzz;
mod reaper;
mod sockdiag;
mod spawn;
mod sync;
mod sys;
mod tcp;
mod tree;
mod users;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

pub const VSOCK_PORT: u32 = 1024;

pub struct Context {
    pub pid1: bool,
    /// Standard input of processes started without stdin.
    pub devnull: Option<OwnedFd>,
    /// The Unix socket to remove when the agent exits.
    pub unix_path: Option<PathBuf>,
    /// Outside a VM, whether `net` may reconfigure the network, /etc and host name the agent sees
    /// (`--allow-net-config`, for tests that run it in namespaces of its own).
    pub allow_net_config: bool,
    /// The root overlay's upper and lower directories, for `changes`: opened by PID 1 before the
    /// root switch, or given with `--upper`/`--lower` outside a VM.
    pub layers: Option<changes::Layers>,
}

impl Context {
    pub fn cleanup(&self) {
        if let Some(path) = &self.unix_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

enum Listen {
    Unix(PathBuf),
    Vsock(u32),
}

struct Args {
    listen: Listen,
    allow_net_config: bool,
    upper: Option<String>,
    lower: Option<String>,
}

const USAGE: &str = "usage: supermachine-agent [--listen unix:PATH | --listen vsock:PORT] \
[--allow-net-config] [--upper DIR [--lower DIR]] [--version]
As PID 1 (the init of a supermachine VM) it serves on vsock:1024 unless --listen is given.
Outside a VM the `net` request is refused unless --allow-net-config is given: it reconfigures the
network interface, /etc and host name the agent sees, so use it only in namespaces made for it.
--upper and --lower name an overlay's upper and lower directories for the `changes` request (as
PID 1 the agent uses its root overlay's).";

fn parse_args(pid1: bool) -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut listen = None;
    let mut allow_net_config = false;
    let (mut upper, mut lower) = (None, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--allow-net-config" => allow_net_config = true,
            "--upper" => upper = Some(args.next().ok_or("--upper needs a directory")?),
            "--lower" => lower = Some(args.next().ok_or("--lower needs a directory")?),
            "--version" | "-V" => {
                println!(
                    "supermachine-agent {} (protocol {})",
                    env!("CARGO_PKG_VERSION"),
                    proto::VERSION
                );
                std::process::exit(0);
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--listen" => {
                let value = args.next().ok_or("--listen needs an address")?;
                listen = Some(if let Some(path) = value.strip_prefix("unix:") {
                    Listen::Unix(PathBuf::from(path))
                } else if let Some(port) = value.strip_prefix("vsock:") {
                    Listen::Vsock(
                        port.parse()
                            .map_err(|_| format!("bad vsock port {port:?}"))?,
                    )
                } else {
                    return Err(format!(
                        "bad listen address {value:?} (expected unix:PATH or vsock:PORT)"
                    ));
                });
            }
            // The kernel passes unrecognised command line words to init: ignore them as PID 1.
            _ if pid1 => {}
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let listen = match listen {
        Some(l) => l,
        None if pid1 => Listen::Vsock(VSOCK_PORT),
        None => return Err(format!("nothing to do: not PID 1 and no --listen\n{USAGE}")),
    };
    if lower.is_some() && upper.is_none() {
        return Err(format!("--lower needs --upper\n{USAGE}"));
    }
    Ok(Args {
        listen,
        allow_net_config,
        upper,
        lower,
    })
}

fn listen_vsock(port: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: socket's result is checked before it is wrapped, so `sock` owns a new descriptor
    // nothing else owns (and closes it on the error returns; `fd` is only used while `sock`
    // lives). sockaddr_vm is a plain C struct of integers, for which all zeroes is valid; bind
    // reads exactly `len` = its size bytes from `addr`, a live local.
    unsafe {
        let fd = sys::cvt(libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let sock = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_vm = std::mem::zeroed();
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        sys::cvt(libc::bind(
            fd,
            &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
            len,
        ))?;
        sys::cvt(libc::listen(fd, 64))?;
        Ok(sock)
    }
}

fn listen_unix(path: &PathBuf) -> std::io::Result<OwnedFd> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    Ok(OwnedFd::from(UnixListener::bind(path)?))
}

fn serve(listener: OwnedFd, ctx: &'static Context) -> ! {
    loop {
        // SAFETY: null address and length pointers are allowed (the peer address is not wanted);
        // `listener` is borrowed, so it stays open for the call.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO) => {}
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                _ => power::fatal(&format!("accept: {}", sys::errno_text(&err)), ctx.pid1),
            }
            continue;
        }
        // SAFETY: accept4 succeeded (fd >= 0), so `fd` is a new descriptor that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // A thread that cannot be started drops (closes) its connection; the agent carries on.
        let _ = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || conn::serve(sock, ctx));
    }
}

fn main() {
    let started = std::time::Instant::now();
    let pid1 = std::process::id() == 1;
    // Before any thread exists, so that every thread inherits the mask: the reaper takes SIGCHLD.
    reaper::block_sigchld();
    // The kernel starts PID 1 with umask 0, which every command would inherit (new files 0666,
    // directories 0777); containers run with 022.
    // SAFETY: umask takes and returns an integer and touches no memory.
    unsafe { libc::umask(0o022) };
    let Args {
        listen,
        allow_net_config,
        upper,
        lower,
    } = match parse_args(pid1) {
        Ok(args) => args,
        Err(message) if pid1 => power::fatal(&message, true),
        Err(message) => {
            eprintln!("supermachine-agent: {message}");
            std::process::exit(2);
        }
    };
    let mut root = String::new();
    let mut layers = None;
    if let Some(upper) = &upper {
        match changes::Layers::open(upper, lower.as_deref()) {
            Ok(l) => layers = Some(l),
            Err(e) => power::fatal(
                &format!(
                    "cannot open --upper {upper} / --lower {}: {}",
                    lower.as_deref().unwrap_or("-"),
                    sys::errno_text(&e)
                ),
                pid1,
            ),
        }
    }
    if pid1 {
        match init::boot() {
            Ok((description, booted)) => {
                root = format!(", {description}");
                layers = layers.or(booted);
            }
            Err(message) => power::fatal(&message, true),
        }
        if let Err(why) = cgroup::setup() {
            power::console(&format!("exec containment off: {why}"));
        }
    } else {
        // Orphans of the processes we start come back to us, as they would to PID 1, and are reaped.
        // SAFETY: PR_SET_CHILD_SUBREAPER takes integer arguments only; no memory is involved.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    let devnull = sys::open(
        &std::ffi::CString::new("/dev/null").expect("literal"),
        libc::O_RDWR,
        0,
    )
    .ok();
    let (listener, shown, unix_path) = match &listen {
        Listen::Unix(path) => (
            listen_unix(path),
            format!("unix:{}", path.display()),
            Some(path.clone()),
        ),
        Listen::Vsock(port) => (listen_vsock(*port), format!("vsock port {port}"), None),
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => power::fatal(
            &format!("cannot listen on {shown}: {}", sys::errno_text(&e)),
            pid1,
        ),
    };
    let ctx: &'static Context = Box::leak(Box::new(Context {
        pid1,
        devnull,
        unix_path,
        allow_net_config,
        layers,
    }));
    reaper::start();
    let ms = started.elapsed().as_millis();
    power::console(&format!(
        "{} ready on {shown} (start-up {ms} ms{root})",
        env!("CARGO_PKG_VERSION")
    ));
    serve(listener, ctx);
}
