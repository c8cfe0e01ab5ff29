//! The control channel between a worker and its owner: typed, versioned messages over a Unix
//! stream socket pair, with descriptors passed alongside (SCM_RIGHTS).
//!
//! A frame is an 8-byte header (`json_len: u32`, `payload_len: u32`, little endian), a JSON
//! message and a raw payload (console bytes, guest memory, bitmaps), so bulk data is not
//! escaped. Descriptors travel with the frame's first bytes. Both sides bound every length: the
//! owner trusts nothing a worker says, since the worker runs guest-facing code.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::vmm::persist::RestoreOverrides;
use crate::vmm::{MachineConfig, Outcome};

/// Bumped whenever a message changes shape; owner and worker must agree exactly.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest JSON part of a frame.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Largest payload: a full console ring, a guest memory read, a dirty-page bitmap.
pub const MAX_PAYLOAD: usize = 64 << 20;
/// Most descriptors one frame may carry (two snapshot outputs and a base chain).
pub const MAX_FDS: usize = 40;

/// Why the channel failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the VMM worker closed its control channel")]
    Closed,
    #[error("the VMM worker did not answer within {0} s")]
    Timeout(u64),
    #[error("control channel I/O failed: {0}")]
    Io(String),
    #[error("the VMM worker sent a malformed message: {0}")]
    Malformed(String),
}

impl From<io::Error> for ChannelError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset => ChannelError::Closed,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ChannelError::Timeout(0),
            _ => ChannelError::Io(crate::vmm::os_msg(&e)),
        }
    }
}

/// How the worker confines itself once the VM is built, before any guest instruction runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JailConfig {
    /// `pivot_root` into an empty read-only root under this (existing, owner-made) directory.
    /// `None`: keep the caller's file system view.
    pub root_parent: Option<PathBuf>,
    /// Drop to this uid/gid after the build (only when the worker runs as root).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Install the per-thread seccomp filters.
    pub seccomp: bool,
    /// The namespaces the owner started the worker in ("mount", "pid", ...).
    pub namespaces: Vec<String>,
    /// A directory kept visible in the jail, at the same path: the one holding the vsock
    /// socket, where host listeners for guest-initiated connections live.
    pub shared_dir: Option<PathBuf>,
}

/// A request from the owner. Descriptors that go with a request are listed where it is defined.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// First message: the versions must match.
    Hello {
        version: u32,
    },
    /// Boot a VM. Descriptor: the console ring (a memfd, see [`super::console_ring`]).
    Start {
        config: Box<MachineConfig>,
        jail: JailConfig,
    },
    /// Restore a VM from a snapshot directory. Descriptor: the console ring.
    Restore {
        dir: PathBuf,
        overrides: Box<RestoreOverrides>,
        jail: JailConfig,
    },
    /// Static facts of the running VM.
    Info,
    /// The outcome (if the VM ended) and counters.
    Status,
    /// Wait up to `timeout_ms` for the VM to end.
    Wait {
        timeout_ms: u64,
    },
    Pause,
    Resume,
    /// Pause and capture a snapshot into the descriptors passed with it: `memory.bin`, then
    /// `vmstate.bin` (both empty, writable), then for a diff each `memory.bin` of the base's
    /// chain, base first (read-only).
    Snapshot {
        base: Option<WireBase>,
    },
    DirtyPages,
    ReadMemory {
        gpa: u64,
        len: u64,
    },
    /// The payload holds the bytes.
    WriteMemory {
        gpa: u64,
    },
    DeviceStatus {
        index: u32,
    },
    Timings,
    /// Stop the VM and exit.
    Stop,
}

/// The base of a diff snapshot as the owner resolved it (the worker cannot open paths).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireBase {
    /// What the diff records: the base's path relative to the new snapshot, its identity and
    /// its `memory.bin` stamp.
    pub path: String,
    pub id: [u8; 16],
    pub memory_len: u64,
    pub memory_mtime_ns: i64,
    /// The base chain, base first: each layer's identity and (for a diff layer) page bitmap.
    /// The files come as descriptors.
    pub layers: Vec<WireLayer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireLayer {
    pub id: [u8; 16],
    pub pages: Option<Vec<u8>>,
}

/// A reply. `Error` can answer any request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Hello {
        version: u32,
        pid: u32,
    },
    Ok,
    Info(Box<VmInfo>),
    Status {
        outcome: Option<Outcome>,
        unhandled_exits: (u64, u64),
    },
    /// The payload holds the bytes.
    Bytes,
    DeviceStatus {
        status: Option<u32>,
    },
    Snapshot(SnapshotSummary),
    Timings(WireTimings),
    Error(WireError),
}

/// An error the worker reports: its kind (one `supermachine.errors` class each) and message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireError {
    pub kind: ErrorKind,
    pub message: String,
}

/// What went wrong, as precise as the owner's exception classes are.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A file the VM needs does not exist.
    NotFound,
    /// An OS-level failure: permissions, I/O, a device.
    Os,
    /// /dev/kvm is missing or unusable.
    Kvm,
    /// A bad value in the configuration.
    Config,
    /// The snapshot is damaged, of another version, or inconsistent.
    Snapshot,
    /// The snapshot could not be written.
    SnapshotWrite,
    /// The worker could not confine itself (namespaces, pivot_root, privileges, seccomp).
    Jail,
    /// The request does not fit the worker's state (e.g. a second start).
    State,
    /// KVM or the VMM failed.
    Runtime,
}

/// Facts of a running VM that do not change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    pub cmdline: String,
    pub cpu_template: String,
    pub memory_size: u64,
    pub console_capacity: u64,
    pub vsock_path: Option<PathBuf>,
    pub devices: Vec<WireDevice>,
    /// Protections in force, by name ("pid namespace", "seccomp", "uid 65534", ...).
    pub protections: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireDevice {
    pub kind: String,
    pub mmio_base: u64,
    pub gsi: u32,
    pub path: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotSummary {
    pub memory_bytes: u64,
    pub state_bytes: u64,
    pub memory_id: [u8; 16],
    pub diff_pages: Option<u64>,
    pub compared_pages: Option<u64>,
    pub phases: Vec<(String, f64)>,
}

/// Start-up times as CLOCK_MONOTONIC nanoseconds (the same clock in every process), so the
/// owner can measure from its own call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireTimings {
    pub started_ns: u64,
    pub running_ns: u64,
    pub first_run_ns: Option<u64>,
    pub first_console_byte_ns: Option<u64>,
    pub phases: Vec<(String, f64)>,
    pub refused_msrs: u64,
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// `instant` as CLOCK_MONOTONIC nanoseconds (`Instant` is CLOCK_MONOTONIC on Linux).
pub fn instant_ns(instant: std::time::Instant) -> u64 {
    let now = std::time::Instant::now();
    let now_ns = monotonic_ns();
    if instant <= now {
        now_ns.saturating_sub((now - instant).as_nanos() as u64)
    } else {
        now_ns + (instant - now).as_nanos() as u64
    }
}

/// A received frame.
pub struct Frame<T> {
    pub message: T,
    pub payload: Vec<u8>,
    pub files: Vec<File>,
}

/// Writes one frame.
pub fn send<T: Serialize>(
    sock: &UnixStream,
    message: &T,
    payload: &[u8],
    fds: &[RawFd],
) -> Result<(), ChannelError> {
    let json = serde_json::to_vec(message).map_err(|e| ChannelError::Malformed(e.to_string()))?;
    if json.len() > MAX_MESSAGE || payload.len() > MAX_PAYLOAD || fds.len() > MAX_FDS {
        return Err(ChannelError::Malformed(
            "a frame over the size limits".into(),
        ));
    }
    let mut head = Vec::with_capacity(8 + json.len());
    head.extend_from_slice(&(json.len() as u32).to_le_bytes());
    head.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    head.extend_from_slice(&json);
    // The descriptors ride on the first bytes; the rest is a plain stream.
    let sent = if fds.is_empty() {
        (&*sock).write(&head)?
    } else {
        sock.send_with_fds(&[&head[..]], fds)
            .map_err(|e| ChannelError::from(io::Error::from_raw_os_error(e.errno())))?
    };
    (&*sock).write_all(&head[sent..])?;
    (&*sock).write_all(payload)?;
    Ok(())
}

/// Reads one frame; `None` at a clean end of stream before a frame starts. Each read waits as
/// long as the socket's own timeout allows.
pub fn recv<T: for<'de> Deserialize<'de>>(
    sock: &UnixStream,
) -> Result<Option<Frame<T>>, ChannelError> {
    recv_by(sock, None)
}

/// [`recv`], with the whole frame due within `timeout`: a peer that trickles its bytes cannot
/// stretch a call past it (a socket timeout alone bounds only each read).
pub fn recv_within<T: for<'de> Deserialize<'de>>(
    sock: &UnixStream,
    timeout: Duration,
) -> Result<Option<Frame<T>>, ChannelError> {
    recv_by(sock, Some(Instant::now() + timeout))
}

/// Sets the socket's read timeout to what is left before `deadline`.
fn arm(sock: &UnixStream, deadline: Option<Instant>) -> Result<(), ChannelError> {
    if let Some(d) = deadline {
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ChannelError::Timeout(0));
        }
        sock.set_read_timeout(Some(left))?;
    }
    Ok(())
}

/// `read_exact` whose every read ends by `deadline`.
fn read_all(
    sock: &UnixStream,
    mut buf: &mut [u8],
    deadline: Option<Instant>,
) -> Result<(), ChannelError> {
    while !buf.is_empty() {
        arm(sock, deadline)?;
        match (&*sock).read(buf) {
            Ok(0) => return Err(ChannelError::Closed),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn recv_by<T: for<'de> Deserialize<'de>>(
    sock: &UnixStream,
    deadline: Option<Instant>,
) -> Result<Option<Frame<T>>, ChannelError> {
    let mut head = [0u8; 8];
    let mut raw_fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: head.as_mut_ptr().cast(),
        iov_len: head.len(),
    }];
    arm(sock, deadline)?;
    // SAFETY: the iovec points at `head`, which lives through the call and may take any bytes.
    let (got, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw_fds) }
        .map_err(|e| ChannelError::from(io::Error::from_raw_os_error(e.errno())))?;
    let files: Vec<File> = raw_fds[..nfds.min(MAX_FDS)]
        .iter()
        .filter(|&&fd| fd >= 0)
        // SAFETY: each descriptor was just received and belongs to nobody else.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    for f in &files {
        set_cloexec(f.as_raw_fd());
    }
    if got == 0 {
        return if files.is_empty() {
            Ok(None)
        } else {
            Err(ChannelError::Malformed(
                "descriptors without a frame".into(),
            ))
        };
    }
    read_all(sock, &mut head[got..], deadline)?;
    let json_len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let payload_len = u32::from_le_bytes(head[4..].try_into().expect("4 bytes")) as usize;
    // Checked before anything is allocated: a header may claim up to 4 GiB twice.
    if json_len > MAX_MESSAGE || payload_len > MAX_PAYLOAD {
        return Err(ChannelError::Malformed(format!(
            "a frame of {json_len} + {payload_len} bytes is over the limits"
        )));
    }
    let mut json = vec![0u8; json_len];
    read_all(sock, &mut json, deadline)?;
    let mut payload = vec![0u8; payload_len];
    read_all(sock, &mut payload, deadline)?;
    let message =
        serde_json::from_slice(&json).map_err(|e| ChannelError::Malformed(e.to_string()))?;
    Ok(Some(Frame {
        message,
        payload,
        files,
    }))
}

fn set_cloexec(fd: RawFd) {
    // SAFETY: F_SETFD on a descriptor we own only changes its close-on-exec flag.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = File::open("/dev/null").unwrap();
        send(
            &a,
            &Request::Wait { timeout_ms: 5 },
            b"xyz",
            &[file.as_raw_fd()],
        )
        .unwrap();
        let frame: Frame<Request> = recv(&b).unwrap().unwrap();
        assert!(matches!(frame.message, Request::Wait { timeout_ms: 5 }));
        assert_eq!(frame.payload, b"xyz");
        assert_eq!(frame.files.len(), 1);
        drop(a);
        assert!(recv::<Request>(&b).unwrap().is_none());
    }

    #[test]
    fn oversized_and_malformed_frames_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&(u32::MAX).to_le_bytes()).unwrap();
        (&a).write_all(&0u32.to_le_bytes()).unwrap();
        assert!(matches!(recv::<Reply>(&b), Err(ChannelError::Malformed(_))));
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&3u32.to_le_bytes()).unwrap();
        (&a).write_all(&0u32.to_le_bytes()).unwrap();
        (&a).write_all(b"{{{").unwrap();
        assert!(matches!(recv::<Reply>(&b), Err(ChannelError::Malformed(_))));
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&100u32.to_le_bytes()).unwrap();
        drop(a);
        assert!(matches!(recv::<Reply>(&b), Err(ChannelError::Closed)));
    }
}
