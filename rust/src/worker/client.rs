//! The owner's side: starts a worker for one VM and drives it over the control channel.
//!
//! Nothing the worker says is trusted beyond its shape: every frame is bounded, every call has
//! a deadline, and a worker that breaks the protocol, stops answering or dies is killed and
//! reported as a crashed VMM ([`Outcome::VmmCrash`], or [`Outcome::OutOfMemory`] when its
//! memory limit was hit). Other VMs and the owner's process are not affected.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::cgroup::{Limits, VmCgroup};
use super::console_ring::ConsoleRing;
use super::protocol::{
    self, ChannelError, ErrorKind, Frame, JailConfig, Reply, Request, SnapshotSummary, VmInfo,
    WireBase, WireError, WireLayer, WireTimings, PROTOCOL_VERSION,
};
use super::seccomp::EXIT_SECCOMP_DENIED;
use super::server::EXIT_PANIC;
use super::spawn::{self, Isolation};
use crate::snapshot::{AtomicDir, MEMORY_FILE, VMSTATE_FILE};
use crate::vmm::persist::{open_base, RestoreOverrides};
use crate::vmm::{MachineConfig, Outcome};

/// Deadline of an ordinary request.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of the greeting: a worker that cannot answer it this soon is broken (it has done
/// nothing yet but start).
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of a start or restore (a build reads the kernel, maps memory, creates vCPUs).
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline of a snapshot: it writes all of guest RAM.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(900);
/// How long a stopping worker gets to exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);
/// The most of the worker's log read to explain a crash.
const LOG_TAIL: u64 = 16 << 10;

/// How to run a VM's worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerOptions {
    /// The `supermachine-vmm` executable.
    pub program: PathBuf,
    /// Namespaces to start it in (weaker ones are used where the host refuses these).
    pub isolation: IsolationChoice,
    /// The per-VM directory (owner-made, private) the jail's empty root is created under, and
    /// where the worker's log goes.
    pub runtime_dir: Option<PathBuf>,
    /// Unprivileged ids to drop to (when the owner is root).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub seccomp: bool,
    pub limits: Limits,
    /// Name of the per-VM cgroup (unique per VM).
    pub cgroup_name: Option<String>,
    /// Bytes of console kept in the shared ring.
    pub console_capacity: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsolationChoice {
    Namespaces,
    UserNamespaces,
    None,
}

/// Why a worker call failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The VMM reported an error; the VM (if any) is still there.
    #[error("{}", .0.message)]
    Vmm(WireError),
    /// The worker is gone; the VM ended with this outcome.
    #[error("{}", .0.reason())]
    Crashed(Outcome),
    #[error("cannot start the VMM worker {program}: {msg}")]
    Spawn { program: String, msg: String },
    #[error("cannot set the VM's resource limits: {0}")]
    Limits(String),
    #[error("cannot write the snapshot: {0}")]
    Snapshot(String),
}

struct Process {
    /// Raw wait status once reaped.
    status: Option<i32>,
    /// Set when the worker was killed for misbehaving (the reason to report).
    killed_for: Option<String>,
    outcome: Option<Outcome>,
}

/// A VM whose VMM runs in its own worker process.
pub struct WorkerVm {
    channel: Mutex<std::os::unix::net::UnixStream>,
    pid: libc::pid_t,
    process: Mutex<Process>,
    ring: ConsoleRing,
    info: VmInfo,
    /// Taken by whoever collects the worker (the group can only go once it is empty).
    cgroup: Mutex<Option<VmCgroup>>,
    log: Option<PathBuf>,
    memory_limit: Option<u64>,
    isolation: Isolation,
    /// When the owner's start/restore call began, and the owner-side phases before the build.
    called_ns: u64,
    owner_phases: Vec<(String, f64)>,
}

impl WorkerVm {
    /// Boots `config` in a new worker.
    pub fn start(config: &MachineConfig, options: &WorkerOptions) -> Result<WorkerVm, WorkerError> {
        let capacity = config.console_capacity;
        let vsock = config.vsock_path.clone();
        let net_fd = config.net.as_ref().and_then(|n| n.backend_fd);
        Self::launch(options, capacity, vsock, net_fd, &|jail| Request::Start {
            config: Box::new(config.clone()),
            jail,
        })
    }

    /// Restores the snapshot in `dir` in a new worker.
    pub fn restore(
        dir: &Path,
        overrides: &RestoreOverrides,
        options: &WorkerOptions,
    ) -> Result<WorkerVm, WorkerError> {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let vsock = overrides.vsock_path.clone();
        let net_fd = overrides.net.as_ref().and_then(|n| n.backend_fd);
        Self::launch(options, options.console_capacity, vsock, net_fd, &|jail| {
            Request::Restore {
                dir: dir.clone(),
                overrides: Box::new(overrides.clone()),
                jail,
            }
        })
    }

    /// Runs `request` in a spare worker if one is ready, else in a new one. A spare that dies
    /// before it answers (it was killed while idle, and its end had not shown yet when it was
    /// taken) costs one more try in a new worker, never the caller's VM.
    fn launch(
        options: &WorkerOptions,
        console_capacity: usize,
        vsock_path: Option<PathBuf>,
        net_fd: Option<RawFd>,
        request: &dyn Fn(JailConfig) -> Request,
    ) -> Result<WorkerVm, WorkerError> {
        let first = Self::launch_in(
            options,
            console_capacity,
            vsock_path.clone(),
            net_fd,
            request,
            true,
        )?;
        match first {
            Some(vm) => Ok(vm),
            // Without a spare there is no second chance: `None` cannot come back.
            None => Self::launch_in(
                options,
                console_capacity,
                vsock_path,
                net_fd,
                request,
                false,
            )?
            .ok_or_else(|| {
                WorkerError::Crashed(Outcome::VmmCrash {
                    reason: "the VMM worker died before it answered".into(),
                })
            }),
        }
    }

    fn launch_in(
        options: &WorkerOptions,
        console_capacity: usize,
        vsock_path: Option<PathBuf>,
        net_fd: Option<RawFd>,
        request: &dyn Fn(JailConfig) -> Request,
        take_spare: bool,
    ) -> Result<Option<WorkerVm>, WorkerError> {
        let called = Instant::now();
        let called_ns = protocol::instant_ns(called);
        let mut phases = Vec::new();
        let mut clock = called;
        let mut mark = |name: &str| {
            let now = Instant::now();
            phases.push((name.to_string(), (now - clock).as_secs_f64()));
            clock = now;
        };
        let shown = options.program.display().to_string();
        let spawn_err = |msg: String| WorkerError::Spawn {
            program: shown.clone(),
            msg,
        };
        let log_path = options.runtime_dir.as_ref().map(|d| d.join("vmm.log"));
        let log = log_path
            .as_ref()
            .map(|p| {
                File::options()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(p)
            })
            .transpose()
            .map_err(|e| spawn_err(format!("cannot create its log: {}", crate::vmm::os_msg(&e))))?;
        let (ring, ring_file) = ConsoleRing::create(console_capacity)
            .map_err(|e| spawn_err(format!("cannot create the console ring: {e}")))?;
        let wanted = match options.isolation {
            IsolationChoice::Namespaces => Isolation::Namespaces,
            IsolationChoice::UserNamespaces => Isolation::UserNamespaces,
            IsolationChoice::None => Isolation::None,
        };
        let spare = take_spare
            .then(|| spare::take(&options.program, wanted))
            .flatten();
        let (spawned, greeted) = match spare {
            Some(s) => (s, true),
            None => (
                spawn::spawn(&options.program, wanted, None)
                    .map_err(|e| spawn_err(crate::vmm::os_msg(&e)))?,
                false,
            ),
        };
        spare::replenish(&options.program, wanted);
        mark("spawn");
        // The limits hold before the worker allocates anything.
        let cgroup = match options.cgroup_name.as_deref() {
            Some(name) => match VmCgroup::create(name, &options.limits) {
                Ok(Some(cg)) => match cg.add_process(spawned.pid) {
                    Ok(()) => Some(cg),
                    Err(e) => {
                        spawn::kill_and_reap(spawned.pid);
                        return Err(WorkerError::Limits(e.to_string()));
                    }
                },
                Ok(None) => None,
                Err(e) => {
                    spawn::kill_and_reap(spawned.pid);
                    return Err(WorkerError::Limits(e.to_string()));
                }
            },
            None => None,
        };
        mark("limits");
        let mut vm = WorkerVm {
            channel: Mutex::new(spawned.channel),
            pid: spawned.pid,
            process: Mutex::new(Process {
                status: None,
                killed_for: None,
                outcome: None,
            }),
            ring,
            info: VmInfo {
                cmdline: String::new(),
                cpu_template: String::new(),
                memory_size: 0,
                console_capacity: console_capacity as u64,
                vsock_path: None,
                devices: Vec::new(),
                protections: Vec::new(),
            },
            cgroup: Mutex::new(cgroup),
            log: log_path,
            memory_limit: options.limits.memory_max,
            isolation: spawned.isolation,
            called_ns,
            owner_phases: Vec::new(),
        };
        if !greeted {
            match vm
                .call(
                    &Request::Hello {
                        version: PROTOCOL_VERSION,
                    },
                    &[],
                    &[],
                    HELLO_TIMEOUT,
                )?
                .message
            {
                Reply::Hello {
                    version: PROTOCOL_VERSION,
                    ..
                } => {}
                Reply::Hello { version, .. } => {
                    return Err(vm.broken(&format!(
                        "it speaks protocol version {version}, not {PROTOCOL_VERSION}"
                    )))
                }
                _ => return Err(vm.broken("a start-up reply of the wrong kind")),
            }
        }
        mark("hello");
        let jail = JailConfig {
            root_parent: options.runtime_dir.clone(),
            uid: options.uid,
            gid: options.gid,
            seccomp: options.seccomp,
            namespaces: spawned.isolation.names(),
            shared_dir: vsock_path.as_deref().and_then(socket_dir),
        };
        let request = request(jail);
        // In this order: the console ring, the network backend (if the VM has a card), the log.
        let mut fds = vec![ring_file.as_raw_fd()];
        fds.extend(net_fd);
        fds.extend(log.as_ref().map(|l| l.as_raw_fd()));
        let frame = match vm.call(&request, &[], &fds, LAUNCH_TIMEOUT) {
            Err(WorkerError::Crashed(_)) if greeted => return Ok(None),
            other => other?,
        };
        drop(ring_file);
        drop(log);
        match frame.message {
            // The caller connects to the socket named here, and it is removed when the worker
            // ends: it must be the one asked for, never one a worker picks.
            Reply::Info(info) if info.vsock_path == vsock_path => vm.info = *info,
            Reply::Info(_) => {
                return Err(vm.broken("a start reply naming another vsock socket"));
            }
            _ => return Err(vm.broken("a start reply of the wrong kind")),
        }
        mark("build");
        vm.owner_phases = phases;
        Ok(Some(vm))
    }

    fn channel(&self) -> MutexGuard<'_, std::os::unix::net::UnixStream> {
        self.channel.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn process(&self) -> MutexGuard<'_, Process> {
        self.process.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One request and its reply, within `timeout`. A VMM error comes back as
    /// [`WorkerError::Vmm`]; any channel failure ends the worker ([`WorkerError::Crashed`]).
    fn call(
        &self,
        request: &Request,
        payload: &[u8],
        fds: &[RawFd],
        timeout: Duration,
    ) -> Result<Frame<Reply>, WorkerError> {
        match self.dead_outcome() {
            None => {}
            Some(o @ (Outcome::VmmCrash { .. } | Outcome::OutOfMemory { .. })) => {
                return Err(WorkerError::Crashed(o))
            }
            Some(o) => {
                return Err(WorkerError::Vmm(WireError {
                    kind: ErrorKind::State,
                    message: format!("the VM has ended ({})", o.reason()),
                }))
            }
        }
        let result = {
            let channel = self.channel();
            // One deadline for the whole call: the request written and the reply read.
            let deadline = Instant::now() + timeout;
            protocol::send_until(&channel, request, payload, fds, deadline)
                .and_then(|()| protocol::recv_until::<Reply>(&channel, deadline))
                .and_then(|f| f.ok_or(ChannelError::Closed))
        };
        match result {
            Ok(Frame {
                message: Reply::Error(e),
                ..
            }) => Err(WorkerError::Vmm(e)),
            Ok(frame) => Ok(frame),
            Err(ChannelError::Closed) => Err(WorkerError::Crashed(self.reap(None))),
            Err(ChannelError::Timeout(_)) => Err(WorkerError::Crashed(self.reap(Some(format!(
                "the VMM did not answer within {} s and was killed",
                timeout.as_secs()
            ))))),
            Err(e) => Err(WorkerError::Crashed(self.reap(Some(format!(
                "the VMM broke its protocol ({e}) and was killed"
            ))))),
        }
    }

    /// Kills a worker that sent something it should not have.
    fn broken(&self, what: &str) -> WorkerError {
        WorkerError::Crashed(self.reap(Some(format!(
            "the VMM broke its protocol ({what}) and was killed"
        ))))
    }

    /// The outcome of a worker already known to be gone.
    /// The common case of [`WorkerVm::outcome`], in microseconds and without a round trip: no
    /// end recorded or flagged by the worker, and its process alive (warm pools ask this on every
    /// acquire).
    pub fn plainly_running(&self) -> bool {
        self.dead_outcome().is_none() && !self.ring.ended() && self.alive()
    }

    fn dead_outcome(&self) -> Option<Outcome> {
        self.process().outcome.clone()
    }

    /// Collects the worker (killing it first if `kill_for` says why) and works out why it ended.
    fn reap(&self, kill_for: Option<String>) -> Outcome {
        let mut p = self.process();
        if let Some(o) = &p.outcome {
            return o.clone();
        }
        if kill_for.is_some() {
            p.killed_for = kill_for;
            // SAFETY: our unreaped child; its pid cannot have been reused.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        }
        let status = p.status.unwrap_or_else(|| wait_exit(self.pid, EXIT_GRACE));
        p.status = Some(status);
        let outcome = self.explain(status, p.killed_for.as_deref());
        p.outcome = Some(outcome.clone());
        drop(p);
        self.remove_vsock_socket();
        outcome
    }

    fn explain(&self, status: i32, killed_for: Option<&str>) -> Outcome {
        if let Some(why) = killed_for {
            return Outcome::VmmCrash {
                reason: format!("VMM crashed: {why}"),
            };
        }
        let oom = self
            .cgroup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|c| c.oom_killed());
        if oom {
            let limit = self
                .memory_limit
                .map(|m| format!(" of {} MiB", m >> 20))
                .unwrap_or_default();
            return Outcome::OutOfMemory {
                reason: format!(
                    "the VM ran out of memory: it exceeded its memory limit{limit} and the \
                     kernel's OOM killer ended its VMM"
                ),
            };
        }
        let log = self.log_tail();
        let last = |prefix: &str| {
            log.lines()
                .rev()
                .find(|l| l.starts_with(prefix))
                .map(|l| l.trim().to_string())
        };
        let reason = if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            format!("VMM crashed: {}", signal_name(sig))
        } else {
            match libc::WEXITSTATUS(status) {
                EXIT_SECCOMP_DENIED => format!(
                    "VMM crashed: its seccomp filter stopped a forbidden system call ({})",
                    last("seccomp:").unwrap_or_else(|| "no detail".into())
                ),
                EXIT_PANIC => format!(
                    "VMM crashed: {}",
                    last("panic:").unwrap_or_else(|| "a thread panicked".into())
                ),
                0 => "VMM exited".to_string(),
                code => format!("VMM crashed: it exited with status {code}"),
            }
        };
        Outcome::VmmCrash { reason }
    }

    /// The end of the worker's log (bounded; its content is only shown, never parsed for paths).
    fn log_tail(&self) -> String {
        let Some(path) = &self.log else {
            return String::new();
        };
        let Ok(mut f) = crate::snapshot::open_regular(path) else {
            return String::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)));
        let mut buf = Vec::new();
        let _ = f.take(LOG_TAIL).read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Whether the worker process still runs (a dead one is collected and explained).
    fn alive(&self) -> bool {
        let mut p = self.process();
        if p.status.is_some() {
            return false;
        }
        let mut status = 0;
        // SAFETY: our unreaped child (the status above is unset); WNOHANG never blocks.
        let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
        if r == self.pid {
            p.status = Some(status);
            return false;
        }
        r == 0
    }

    /// The worker's pid (in the owner's PID namespace).
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    pub fn info(&self) -> &VmInfo {
        &self.info
    }

    /// Protections in force in the worker, by name.
    pub fn protections(&self) -> Vec<String> {
        self.info.protections.clone()
    }

    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// The outcome, or `None` while the VM runs.
    pub fn outcome(&self) -> Option<Outcome> {
        if let Some(o) = self.dead_outcome() {
            return Some(o);
        }
        if self.plainly_running() {
            return None;
        }
        match self.call(&Request::Status, &[], &[], CALL_TIMEOUT) {
            Ok(Frame {
                message: Reply::Status { outcome, .. },
                ..
            }) => outcome,
            Ok(_) => Some(match self.broken("a status reply of the wrong kind") {
                WorkerError::Crashed(o) => o,
                _ => unreachable!("broken() always crashes"),
            }),
            Err(WorkerError::Crashed(o)) => Some(o),
            Err(_) => None,
        }
    }

    /// Waits up to `timeout` (forever with `None`) for the VM to end.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<Outcome> {
        if let Some(o) = self.dead_outcome() {
            return Some(o);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let slice = deadline
                .map(|d| d.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_millis(500))
                .min(Duration::from_millis(500));
            let request = Request::Wait {
                timeout_ms: slice.as_millis() as u64,
            };
            match self.call(&request, &[], &[], CALL_TIMEOUT) {
                Ok(Frame {
                    message:
                        Reply::Status {
                            outcome: Some(o), ..
                        },
                    ..
                }) => return Some(o),
                Ok(Frame {
                    message: Reply::Status { .. },
                    ..
                }) => {}
                Ok(_) => {
                    return match self.broken("a wait reply of the wrong kind") {
                        WorkerError::Crashed(o) => Some(o),
                        _ => None,
                    }
                }
                Err(WorkerError::Crashed(o)) => return Some(o),
                Err(_) => return None,
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return None;
            }
        }
    }

    fn simple(&self, request: Request) -> Result<(), WorkerError> {
        match self.call(&request, &[], &[], CALL_TIMEOUT)?.message {
            Reply::Ok => Ok(()),
            _ => Err(self.broken("a reply of the wrong kind")),
        }
    }

    pub fn pause(&self) -> Result<(), WorkerError> {
        self.simple(Request::Pause)
    }

    pub fn resume(&self) -> Result<(), WorkerError> {
        self.simple(Request::Resume)
    }

    /// Stops the VM and collects the worker; idempotent.
    pub fn stop(&self) {
        if self.dead_outcome().is_some() {
            return;
        }
        let ended = match self.call(&Request::Stop, &[], &[], CALL_TIMEOUT) {
            Ok(Frame {
                message: Reply::Status { outcome, .. },
                ..
            }) => outcome.unwrap_or(Outcome::Stopped),
            Ok(_) => Outcome::Stopped,
            // Already reaped and explained.
            Err(_) => return,
        };
        let mut p = self.process();
        if p.outcome.is_none() {
            p.outcome = Some(ended);
        }
        drop(p);
        self.remove_vsock_socket();
        // The worker exits on its own now that its VM is stopped; collecting it (and removing its
        // cgroup, which must be empty first) happens beside the caller, as an in-process VM's
        // memory is freed when it is dropped. A worker that does not exit is killed.
        let pid = self.pid;
        let cgroup = self.cgroup.lock().unwrap_or_else(|e| e.into_inner()).take();
        let collect = move || {
            wait_exit(pid, EXIT_GRACE);
            if let Some(cg) = cgroup {
                cg.remove();
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("sm-reap".into())
            .spawn(collect)
        {
            // No thread to spare: collect it here (its cgroup, dropped with the closure, is removed
            // on a best-effort basis).
            let _ = e;
            wait_exit(self.pid, EXIT_GRACE);
        }
    }

    /// Removes the VM's vsock socket file once its worker is gone (the jailed worker cannot: the
    /// path is outside its root). Only a socket is removed, never what replaced it.
    fn remove_vsock_socket(&self) {
        use std::os::unix::fs::FileTypeExt;
        if let Some(path) = &self.info.vsock_path {
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Guest serial output kept in the shared ring (available after a crash too).
    pub fn console(&self) -> Vec<u8> {
        self.ring.contents()
    }

    fn bytes(&self, request: Request, payload: &[u8]) -> Result<Vec<u8>, WorkerError> {
        let frame = self.call(&request, payload, &[], CALL_TIMEOUT)?;
        match frame.message {
            Reply::Bytes => Ok(frame.payload),
            _ => Err(self.broken("a reply of the wrong kind")),
        }
    }

    pub fn read_memory(&self, gpa: u64, len: usize) -> Result<Vec<u8>, WorkerError> {
        let data = self.bytes(
            Request::ReadMemory {
                gpa,
                len: len as u64,
            },
            &[],
        )?;
        if data.len() != len {
            return Err(self.broken("a memory read of the wrong length"));
        }
        Ok(data)
    }

    pub fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<(), WorkerError> {
        match self
            .call(&Request::WriteMemory { gpa }, data, &[], CALL_TIMEOUT)?
            .message
        {
            Reply::Ok => Ok(()),
            _ => Err(self.broken("a reply of the wrong kind")),
        }
    }

    pub fn dirty_pages(&self) -> Result<Vec<u8>, WorkerError> {
        let bits = self.bytes(Request::DirtyPages, &[])?;
        if bits.len() != crate::snapshot::memory::bitmap_len(self.info.memory_size) {
            return Err(self.broken("a dirty-page bitmap of the wrong size"));
        }
        Ok(bits)
    }

    pub fn device_status(&self, index: usize) -> Result<Option<u32>, WorkerError> {
        match self
            .call(
                &Request::DeviceStatus {
                    index: index as u32,
                },
                &[],
                &[],
                CALL_TIMEOUT,
            )?
            .message
        {
            Reply::DeviceStatus { status } => Ok(status),
            _ => Err(self.broken("a reply of the wrong kind")),
        }
    }

    pub fn net_counters(
        &self,
    ) -> Result<Option<crate::devices::virtio::net::NetCounters>, WorkerError> {
        match self
            .call(&Request::NetCounters, &[], &[], CALL_TIMEOUT)?
            .message
        {
            Reply::NetCounters { counters } => Ok(counters),
            _ => Err(self.broken("a reply of the wrong kind")),
        }
    }

    pub fn unhandled_exits(&self) -> Result<(u64, u64), WorkerError> {
        match self.call(&Request::Status, &[], &[], CALL_TIMEOUT)?.message {
            Reply::Status {
                unhandled_exits, ..
            } => Ok(unhandled_exits),
            _ => Err(self.broken("a reply of the wrong kind")),
        }
    }

    /// Start-up timings measured from the owner's start/restore call: the owner's own phases
    /// (spawn, limits, hello) followed by the worker's.
    pub fn timings(&self) -> Result<(WireTimings, Vec<(String, f64)>), WorkerError> {
        match self
            .call(&Request::Timings, &[], &[], CALL_TIMEOUT)?
            .message
        {
            Reply::Timings(t) => {
                let mut phases = self.owner_phases.clone();
                phases.retain(|(n, _)| n != "build");
                phases.extend(t.phases.iter().cloned());
                Ok((t, phases))
            }
            _ => Err(self.broken("a reply of the wrong kind")),
        }
    }

    /// When the owner's call began (CLOCK_MONOTONIC ns).
    pub fn called_ns(&self) -> u64 {
        self.called_ns
    }

    /// Writes a snapshot of the VM to `dir` (atomically: the worker fills files this process
    /// created, which it then syncs and renames into place). With `base`, a diff against it.
    pub fn snapshot(
        &self,
        dir: &Path,
        base: Option<&Path>,
    ) -> Result<SnapshotSummary, WorkerError> {
        let clock = Instant::now();
        let snap_err = |e: crate::snapshot::SnapshotError| WorkerError::Snapshot(e.to_string());
        let opened = base
            .map(|b| open_base(self.info.memory_size, dir, b))
            .transpose()
            .map_err(|e| {
                WorkerError::Vmm(super::server::wire_error(crate::vmm::VmmError::Snapshot(e)))
            })?;
        let mut out = AtomicDir::new(dir).map_err(snap_err)?;
        let (memory, memory_tmp) = out.create(MEMORY_FILE).map_err(snap_err)?;
        let (state, state_tmp) = out.create(VMSTATE_FILE).map_err(snap_err)?;
        let mut fds = vec![memory.as_raw_fd(), state.as_raw_fd()];
        let wire_base = opened.as_ref().map(|b| {
            for layer in &b.layers {
                if let Some(f) = &layer.file {
                    fds.push(f.0.as_raw_fd());
                }
            }
            WireBase {
                path: b.reference.path.clone(),
                id: b.reference.id,
                memory_len: b.reference.memory_len,
                memory_mtime_ns: b.reference.memory_mtime_ns,
                layers: b
                    .layers
                    .iter()
                    .map(|l| WireLayer {
                        id: l.id,
                        pages: l.pages.clone(),
                    })
                    .collect(),
            }
        });
        if let Some(b) = &opened {
            if b.layers.iter().any(|l| l.file.is_none()) {
                return Err(WorkerError::Snapshot(
                    "the base chain has a file that is not open".into(),
                ));
            }
        }
        let frame = self.call(
            &Request::Snapshot { base: wire_base },
            &[],
            &fds,
            SNAPSHOT_TIMEOUT,
        )?;
        let Reply::Snapshot(mut summary) = frame.message else {
            return Err(self.broken("a snapshot reply of the wrong kind"));
        };
        let commit = Instant::now();
        out.finish(memory, &memory_tmp).map_err(snap_err)?;
        out.finish(state, &state_tmp).map_err(snap_err)?;
        out.commit().map_err(snap_err)?;
        summary
            .phases
            .push(("commit".into(), commit.elapsed().as_secs_f64()));
        let _ = clock;
        Ok(summary)
    }
}

impl Drop for WorkerVm {
    fn drop(&mut self) {
        self.stop();
        // A crashed worker was collected already; its group is empty.
        if let Some(cg) = self.cgroup.lock().unwrap_or_else(|e| e.into_inner()).take() {
            cg.remove();
        }
    }
}

/// The directory of the VM's vsock socket, which the jail keeps (at the same path) so the guest
/// can reach host listeners beside it (`<socket>_<port>`).
fn socket_dir(socket: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(socket).ok()?;
    abs.parent().map(Path::to_path_buf)
}

/// Waits for `pid` to exit, killing it after `grace`; returns the raw wait status.
fn wait_exit(pid: libc::pid_t, grace: Duration) -> i32 {
    let deadline = Instant::now() + grace;
    let mut status = 0;
    loop {
        // SAFETY: our child; WNOHANG never blocks.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid || r < 0 {
            return status;
        }
        if Instant::now() >= deadline {
            // SAFETY: our unreaped child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return status;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// "SIGBUS" and friends.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGBUS => "SIGBUS",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGKILL => "SIGKILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGSYS => "SIGSYS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGPIPE => "SIGPIPE",
        other => return format!("signal {other}"),
    };
    name.to_string()
}

impl From<WorkerError> for WireError {
    fn from(e: WorkerError) -> Self {
        match e {
            WorkerError::Vmm(w) => w,
            other => WireError {
                kind: ErrorKind::Runtime,
                message: other.to_string(),
            },
        }
    }
}

/// One worker per kind started ahead of need, so a start or restore does not wait for a process
/// to be created, exec'd and greeted. It holds no VM and no file of one: it waits on its control
/// channel, and ends when this process does (the channel closes). `SUPERMACHINE_SPARE_WORKERS=0`
/// turns it off.
mod spare {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    use super::super::protocol::{self, Reply, Request, PROTOCOL_VERSION};
    use super::super::spawn::{self, Isolation, Spawned};
    use super::HELLO_TIMEOUT;

    struct Spare {
        program: PathBuf,
        wanted: Isolation,
        /// `None` while it is being started.
        ready: Option<Spawned>,
    }

    static SPARES: Mutex<Vec<Spare>> = Mutex::new(Vec::new());

    fn enabled() -> bool {
        std::env::var("SUPERMACHINE_SPARE_WORKERS").as_deref() != Ok("0")
    }

    /// A greeted, still running spare for `program` and `wanted`, if one is ready.
    pub(super) fn take(program: &Path, wanted: Isolation) -> Option<Spawned> {
        let mut spares = SPARES.lock().unwrap_or_else(|e| e.into_inner());
        let i = spares
            .iter()
            .position(|s| s.program == program && s.wanted == wanted && s.ready.is_some())?;
        let spawned = spares.swap_remove(i).ready?;
        drop(spares);
        let mut status = 0;
        // SAFETY: our child; WNOHANG never blocks. A spare that died idle is collected here.
        match unsafe { libc::waitpid(spawned.pid, &mut status, libc::WNOHANG) } {
            0 => Some(spawned),
            _ => None,
        }
    }

    /// Starts a spare for `program` and `wanted` beside the caller, unless one exists or is
    /// being started.
    pub(super) fn replenish(program: &Path, wanted: Isolation) {
        if !enabled() {
            return;
        }
        {
            let mut spares = SPARES.lock().unwrap_or_else(|e| e.into_inner());
            if spares
                .iter()
                .any(|s| s.program == program && s.wanted == wanted)
            {
                return;
            }
            spares.push(Spare {
                program: program.to_path_buf(),
                wanted,
                ready: None,
            });
        }
        let owned = program.to_path_buf();
        let started = std::thread::Builder::new()
            .name("sm-spare".into())
            .spawn(move || {
                let program = owned;
                let ready = start(&program, wanted);
                let mut spares = SPARES.lock().unwrap_or_else(|e| e.into_inner());
                let slot = spares
                    .iter()
                    .position(|s| s.program == program && s.wanted == wanted && s.ready.is_none());
                match (slot, ready) {
                    (Some(i), Some(s)) => spares[i].ready = Some(s),
                    (Some(i), None) => {
                        spares.swap_remove(i);
                    }
                    (None, Some(s)) => spawn::kill_and_reap(s.pid),
                    (None, None) => {}
                }
            });
        if started.is_err() {
            let mut spares = SPARES.lock().unwrap_or_else(|e| e.into_inner());
            spares.retain(|s| !(s.program == program && s.wanted == wanted && s.ready.is_none()));
        }
    }

    /// A new worker that answered its greeting in time, or `None` (it is then killed).
    fn start(program: &Path, wanted: Isolation) -> Option<Spawned> {
        let spawned = spawn::spawn(program, wanted, None).ok()?;
        let greeted = protocol::send(
            &spawned.channel,
            &Request::Hello {
                version: PROTOCOL_VERSION,
            },
            &[],
            &[],
        )
        .and_then(|()| protocol::recv_within::<Reply>(&spawned.channel, HELLO_TIMEOUT));
        match greeted {
            Ok(Some(f))
                if matches!(
                    f.message,
                    Reply::Hello {
                        version: PROTOCOL_VERSION,
                        ..
                    }
                ) =>
            {
                Some(spawned)
            }
            _ => {
                spawn::kill_and_reap(spawned.pid);
                None
            }
        }
    }
}
