//! The worker's side of the control channel: one VM per process. The owner starts the worker
//! with the channel as standard input (see [`super::spawn`]); the worker builds the VM it is
//! asked for, confines itself ([`super::jail`], [`super::seccomp`]) before the first guest
//! instruction, then serves requests until told to stop or until the owner goes away.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use super::console_ring::{self, ConsoleRing};
use super::jail;
use super::landlock;
use super::protocol::{
    self, ErrorKind, Frame, JailConfig, Reply, Request, SnapshotSummary, VmInfo, WireBase,
    WireError, WireTimings, PROTOCOL_VERSION,
};
use super::seccomp::{self, ThreadKind};
use super::spawn;
use crate::snapshot::memory::{LayerFile, MemoryLayer, MAX_CHAIN};
use crate::snapshot::SnapshotError;
use crate::vmm::persist::OpenedBase;
use crate::vmm::{MountConfig, Vmm, VmmError};

/// Exit status of a worker whose thread panicked (the message is on standard error).
pub const EXIT_PANIC: i32 = 101;
/// Exit status of a worker whose owner spoke another protocol version.
pub const EXIT_VERSION: i32 = 2;

/// The longest a single `Wait` may block, so the channel stays responsive.
const MAX_WAIT: Duration = Duration::from_millis(500);

/// Runs the worker; returns its exit status.
pub fn main() -> i32 {
    unblock_signals();
    install_panic_hook();
    // SAFETY: the owner started us with the control socket as descriptor 0 (see spawn.rs); we
    // take it over once.
    let channel = unsafe { UnixStream::from_raw_fd(0) };
    let mut worker = Worker {
        channel,
        vmm: None,
        protections: Vec::new(),
    };
    let status = worker.serve();
    if let Some(vmm) = worker.vmm.take() {
        vmm.stop();
        // The exit frees guest memory and the KVM objects at once; dropping them one by one
        // first would only delay it.
        std::mem::forget(vmm);
    }
    status
}

struct Worker {
    channel: UnixStream,
    vmm: Option<Vmm>,
    protections: Vec<String>,
}

type Handled = Result<(Reply, Vec<u8>), WireError>;

impl Worker {
    fn serve(&mut self) -> i32 {
        loop {
            let frame = match protocol::recv::<Request>(&self.channel) {
                Ok(Some(frame)) => frame,
                // The owner went away (or closed the channel): nobody can use this VM any more.
                Ok(None) => return 0,
                Err(e) => {
                    let _ = writeln!(std::io::stderr(), "supermachine-vmm: {e}");
                    return 1;
                }
            };
            let stop = matches!(frame.message, Request::Stop);
            let version_mismatch = matches!(
                frame.message,
                Request::Hello { version } if version != PROTOCOL_VERSION
            );
            let (reply, payload) = match self.handle(frame) {
                Ok(r) => r,
                Err(e) => (Reply::Error(e), Vec::new()),
            };
            if protocol::send(&self.channel, &reply, &payload, &[]).is_err() {
                return 1;
            }
            if version_mismatch {
                return EXIT_VERSION;
            }
            if stop {
                return 0;
            }
        }
    }

    fn vmm(&self) -> Result<&Vmm, WireError> {
        self.vmm.as_ref().ok_or_else(|| WireError {
            kind: ErrorKind::State,
            message: "no VM has been started in this worker".into(),
        })
    }

    fn handle(&mut self, frame: Frame<Request>) -> Handled {
        let Frame {
            message,
            payload,
            files,
        } = frame;
        let ok = |r: Reply| Ok((r, Vec::new()));
        match message {
            Request::Hello { version } => {
                if version != PROTOCOL_VERSION {
                    return Err(WireError {
                        kind: ErrorKind::State,
                        message: format!(
                            "the VMM worker speaks protocol {PROTOCOL_VERSION}, its owner {version}: \
                             reinstall supermachine so both come from one build"
                        ),
                    });
                }
                ok(Reply::Hello {
                    version,
                    pid: std::process::id(),
                })
            }
            Request::Start { mut config, jail } => {
                let wants_net = config.net.is_some();
                let mounts = config.mounts.clone();
                self.launch(files, wants_net, &mounts, &jail, |hook, net_fd| {
                    if let Some(net) = config.net.as_mut() {
                        net.backend_fd = net_fd;
                    }
                    Vmm::start_with(&config, hook)
                })
            }
            Request::Restore {
                dir,
                mut overrides,
                jail,
            } => {
                let wants_net = overrides.net.is_some();
                let mounts = overrides.mounts.clone();
                self.launch(files, wants_net, &mounts, &jail, |hook, net_fd| {
                    if let Some(net) = overrides.net.as_mut() {
                        net.backend_fd = net_fd;
                    }
                    Vmm::restore_with(&dir, &overrides, hook)
                })
            }
            Request::Info => ok(Reply::Info(Box::new(self.info()?))),
            Request::Status => {
                let vmm = self.vmm()?;
                ok(Reply::Status {
                    outcome: vmm.outcome(),
                    unhandled_exits: vmm.unhandled_exits(),
                })
            }
            Request::Wait { timeout_ms } => {
                let vmm = self.vmm()?;
                let outcome = vmm.wait(Some(Duration::from_millis(timeout_ms).min(MAX_WAIT)));
                ok(Reply::Status {
                    outcome,
                    unhandled_exits: vmm.unhandled_exits(),
                })
            }
            Request::Pause => {
                self.vmm()?.pause().map_err(runtime)?;
                ok(Reply::Ok)
            }
            Request::Resume => {
                self.vmm()?.resume().map_err(runtime)?;
                ok(Reply::Ok)
            }
            Request::Snapshot { base } => self.snapshot(files, base),
            Request::DirtyPages => Ok((Reply::Bytes, self.vmm()?.dirty_pages().map_err(runtime)?)),
            Request::ReadMemory { gpa, len } => {
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&l| l <= protocol::MAX_PAYLOAD)
                    .ok_or_else(|| config_error(format!("a read of {len} bytes is too large")))?;
                let data = self.vmm()?.read_memory(gpa, len).map_err(config_error)?;
                Ok((Reply::Bytes, data))
            }
            Request::WriteMemory { gpa } => {
                self.vmm()?
                    .write_memory(gpa, &payload)
                    .map_err(config_error)?;
                ok(Reply::Ok)
            }
            Request::DeviceStatus { index } => ok(Reply::DeviceStatus {
                status: self.vmm()?.device_status(index as usize),
            }),
            Request::NetCounters => ok(Reply::NetCounters {
                counters: self.vmm()?.net_counters(),
            }),
            Request::Timings => ok(Reply::Timings(self.timings()?)),
            Request::Stop => {
                // Stopped (vCPU threads joined) before the reply; the VM itself is torn down by
                // the process's exit, after the reply, so the owner does not wait for it.
                let outcome = self.vmm.as_ref().map(|vmm| {
                    vmm.stop();
                    vmm.outcome().unwrap_or(crate::vmm::Outcome::Stopped)
                });
                ok(Reply::Status {
                    outcome,
                    unhandled_exits: (0, 0),
                })
            }
        }
    }

    /// Builds the VM with `build`, confining the worker in the build's last step (after every
    /// file is open, before the vCPUs run).
    /// Builds the VM with `build`, given the jail hook and the network backend's descriptor.
    /// `files` are the console ring, then the network backend when `wants_net`, then optionally
    /// the log.
    fn launch(
        &mut self,
        files: Vec<File>,
        wants_net: bool,
        mounts: &[MountConfig],
        jail_config: &JailConfig,
        build: impl FnOnce(
            &mut dyn FnMut() -> Result<(), VmmError>,
            Option<RawFd>,
        ) -> Result<Vmm, VmmError>,
    ) -> Handled {
        if self.vmm.is_some() {
            return Err(WireError {
                kind: ErrorKind::State,
                message: "this worker already runs a VM".into(),
            });
        }
        let mut files = files.into_iter();
        let ring = files.next();
        let net = if wants_net { files.next() } else { None };
        let (Some(ring), true, log, None) =
            (ring, net.is_some() == wants_net, files.next(), files.next())
        else {
            return Err(WireError {
                kind: ErrorKind::State,
                message: "a start takes the console ring, the network backend (for a VM with a \
                          network card) and, optionally, a log file as descriptors"
                    .into(),
            });
        };
        if let Some(log) = log {
            // From now on this VM's messages (a panic, a forbidden call) go to its own log: a
            // worker started ahead of need did not know which VM it would serve.
            // SAFETY: dup2 onto standard error of a descriptor we own; the old one is closed.
            unsafe { libc::dup2(log.as_raw_fd(), 2) };
        }
        let ring = ConsoleRing::map(&ring).map_err(|e| WireError {
            kind: ErrorKind::Os,
            message: format!("cannot map the console ring: {e}"),
        })?;
        console_ring::install_mirror(ring);
        // The uid/gid the jail will switch to, if any: the threads started before it (filtered
        // and capability-less otherwise) must let it through.
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let drop_to = match (jail_config.uid, jail_config.gid) {
            (Some(u), Some(g)) if root && !jail_config.namespaces.iter().any(|n| n == "user") => {
                Some((u, g))
            }
            _ => None,
        };
        jail::prepare_threads(drop_to.is_some());
        if jail_config.seccomp {
            seccomp::prepare(seccomp_mode(), drop_to).map_err(|e| jail_error(e.to_string()))?;
        }
        // Built now, while the vsock socket's directory and the shared folders can still be
        // opened; every VM thread applies it (see landlock.rs), whatever the caller's privileges.
        let fs_rules: Vec<landlock::FsRule<'_>> = mounts
            .iter()
            .map(|m| (m.host_dir.as_path(), m.read_only))
            .collect();
        landlock::prepare(jail_config.shared_dir.as_deref(), &fs_rules);
        crate::snapshot::memory::preopen_pagemap().map_err(|e| WireError {
            kind: ErrorKind::Os,
            message: format!("cannot open /proc/self/pagemap: {e}"),
        })?;
        let mut jail_failure = None;
        let mut protections = Vec::new();
        let mut hook = || -> Result<(), VmmError> {
            let confine = || -> Result<Vec<String>, String> {
                let mut active =
                    jail::enter(jail_config, &jail_config.namespaces).map_err(|e| e.to_string())?;
                // After the jail's mounts and pivot_root, which a Landlock domain forbids.
                let status = landlock::restrict_thread("control").map_err(|e| e.to_string())?;
                match landlock::describe(status.as_ref()) {
                    Ok(name) => active.push(name),
                    Err(why) => missing(&format!("Landlock: {why}")),
                }
                if jail_config.seccomp {
                    seccomp::apply(ThreadKind::Control).map_err(|e| e.to_string())?;
                    active.push("seccomp".into());
                }
                Ok(active)
            };
            match confine() {
                Ok(active) => {
                    protections = active;
                    Ok(())
                }
                Err(e) => {
                    jail_failure = Some(e.clone());
                    Err(VmmError::Setup(e))
                }
            }
        };
        if let Ok(refused) = std::env::var(spawn::REFUSED_ENV) {
            missing(&format!(
                "stronger isolation was refused by this host: {refused}"
            ));
        }
        if !jail_config.seccomp {
            missing("seccomp: turned off by the owner (SUPERMACHINE_SECCOMP=off)");
        }
        let built = build(&mut hook, net.as_ref().map(|f| f.as_raw_fd()));
        if let Some(why) = jail_failure {
            return Err(jail_error(why));
        }
        self.vmm = Some(built.map_err(wire_error)?);
        self.protections = protections;
        Ok((Reply::Info(Box::new(self.info()?)), Vec::new()))
    }

    fn info(&self) -> Result<VmInfo, WireError> {
        Ok(VmInfo::describe(self.vmm()?, self.protections.clone()))
    }

    fn timings(&self) -> Result<WireTimings, WireError> {
        Ok(WireTimings::from(self.vmm()?))
    }

    /// Writes a snapshot into the descriptors passed with the request: `memory.bin`,
    /// `vmstate.bin`, then a diff base's chain (base first).
    fn snapshot(&self, files: Vec<File>, base: Option<WireBase>) -> Handled {
        let vmm = self.vmm()?;
        let mut files = files.into_iter();
        let (Some(memory), Some(state)) = (files.next(), files.next()) else {
            return Err(config_error(
                "a snapshot needs its memory and state files as descriptors".into(),
            ));
        };
        let layer_files: Vec<File> = files.collect();
        let base = match base {
            None if layer_files.is_empty() => None,
            None => {
                return Err(config_error(
                    "descriptors for a base that was not described".into(),
                ))
            }
            Some(b) => {
                if b.layers.len() != layer_files.len()
                    || b.layers.is_empty()
                    || b.layers.len() > MAX_CHAIN + 1
                {
                    return Err(config_error(format!(
                        "a base chain of {} layers came with {} files",
                        b.layers.len(),
                        layer_files.len()
                    )));
                }
                let layers = b
                    .layers
                    .into_iter()
                    .zip(layer_files)
                    .enumerate()
                    .map(|(i, (l, f))| MemoryLayer {
                        path: PathBuf::from(format!("base layer {i}")),
                        pages: l.pages,
                        id: l.id,
                        file: Some(LayerFile(std::sync::Arc::new(f))),
                    })
                    .collect();
                Some(OpenedBase {
                    reference: crate::snapshot::memory::BaseRef {
                        path: b.path,
                        id: b.id,
                        memory_len: b.memory_len,
                        memory_mtime_ns: b.memory_mtime_ns,
                    },
                    layers,
                })
            }
        };
        let report = vmm
            .snapshot_into(&memory, &state, base)
            .map_err(|e| wire_error(VmmError::Snapshot(e)))?;
        Ok((
            Reply::Snapshot(SnapshotSummary {
                memory_bytes: report.memory_bytes,
                state_bytes: report.state_bytes,
                memory_id: report.memory_id,
                diff_pages: report.diff_pages,
                compared_pages: report.compared_pages,
                phases: report
                    .phases
                    .iter()
                    .map(|(n, s)| (n.to_string(), *s))
                    .collect(),
            }),
            Vec::new(),
        ))
    }
}

/// The error kind of a VMM error, as the owner's exception classes see it.
pub fn error_kind(e: &VmmError) -> ErrorKind {
    use crate::vmm::builder::ErrorClass;
    match e {
        VmmError::Vm(crate::vmm::vm::VmError::OpenKvm(_)) => ErrorKind::Kvm,
        VmmError::Snapshot(SnapshotError::Write { .. }) => ErrorKind::SnapshotWrite,
        // A damaged or unfitting snapshot file; other snapshot errors keep their class below
        // (a missing file, a read error, a capture that failed because the VM had ended).
        VmmError::Snapshot(_) if e.class() == ErrorClass::Value => ErrorKind::Snapshot,
        _ => match e.class() {
            ErrorClass::NotFound => ErrorKind::NotFound,
            ErrorClass::Os => ErrorKind::Os,
            ErrorClass::Value => ErrorKind::Config,
            ErrorClass::Runtime => ErrorKind::Runtime,
        },
    }
}

/// A VMM error as it crosses the channel.
pub fn wire_error(e: VmmError) -> WireError {
    WireError {
        kind: error_kind(&e),
        message: e.to_string(),
    }
}

fn runtime(message: String) -> WireError {
    WireError {
        kind: ErrorKind::Runtime,
        message,
    }
}

fn config_error(message: String) -> WireError {
    WireError {
        kind: ErrorKind::Config,
        message,
    }
}

fn jail_error(message: String) -> WireError {
    WireError {
        kind: ErrorKind::Jail,
        message: format!("the VMM worker cannot confine itself: {message}"),
    }
}

/// Reports, on the VM's log, a protection this worker runs without and why: the owner only
/// sees the ones in force (`protections`), `supermachine doctor` the host's view.
fn missing(what: &str) {
    let _ = writeln!(std::io::stderr(), "supermachine-vmm: not in force: {what}");
}

fn seccomp_mode() -> seccomp::Mode {
    match std::env::var("SUPERMACHINE_SECCOMP").as_deref() {
        Ok("log") => seccomp::Mode::Log,
        _ => seccomp::Mode::Enforce,
    }
}

/// The owner blocks every signal around starting us (see spawn.rs) and exec keeps the mask.
fn unblock_signals() {
    // SAFETY: plain signal-mask calls on a valid, emptied sigset_t.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
}

/// A panic in any thread ends the whole worker at once, with the message on standard error: a
/// VMM with a dead vCPU or device thread must not linger half-working.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let _ = writeln!(std::io::stderr(), "panic: thread {name}: {msg}{at}");
        // SAFETY: _exit ends the process without running anything else.
        unsafe { libc::_exit(EXIT_PANIC) };
    }));
}
