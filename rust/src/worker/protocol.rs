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
pub const PROTOCOL_VERSION: u32 = 3;
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
    /// What the network card counted.
    NetCounters,
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
    pub id: crate::snapshot::MemoryId,
    pub memory_len: u64,
    pub memory_mtime_ns: i64,
    /// The base chain, base first: each layer's identity and (for a diff layer) page bitmap.
    /// The files come as descriptors.
    pub layers: Vec<WireLayer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireLayer {
    pub id: crate::snapshot::MemoryId,
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
    NetCounters {
        counters: Option<crate::devices::virtio::net::NetCounters>,
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

impl VmInfo {
    /// What does not change while `vmm` runs, with the `protections` it runs under.
    pub fn describe(vmm: &crate::vmm::Vmm, protections: Vec<String>) -> Self {
        VmInfo {
            cmdline: vmm.cmdline().to_string(),
            cpu_template: vmm.cpu_template().name().to_string(),
            memory_size: vmm.memory_size(),
            console_capacity: vmm.console_capacity() as u64,
            vsock_path: vmm.vsock_path().cloned(),
            devices: vmm.devices().iter().map(WireDevice::from).collect(),
            protections,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireDevice {
    pub kind: String,
    pub mmio_base: u64,
    pub gsi: u32,
    pub path: PathBuf,
    pub read_only: bool,
}

impl From<&crate::vmm::builder::DeviceInfo> for WireDevice {
    fn from(d: &crate::vmm::builder::DeviceInfo) -> Self {
        WireDevice {
            kind: d.kind.to_string(),
            mmio_base: d.mmio_base,
            gsi: d.gsi,
            path: d.path.clone(),
            read_only: d.read_only,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotSummary {
    pub memory_bytes: u64,
    pub state_bytes: u64,
    pub memory_id: crate::snapshot::MemoryId,
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

impl From<&crate::vmm::Vmm> for WireTimings {
    fn from(vmm: &crate::vmm::Vmm) -> Self {
        let t = vmm.times();
        WireTimings {
            started_ns: instant_ns(t.started),
            running_ns: instant_ns(t.running),
            first_run_ns: t.first_run.map(instant_ns),
            first_console_byte_ns: t.first_console_byte.map(instant_ns),
            phases: vmm
                .phases()
                .iter()
                .map(|(n, s)| (n.to_string(), *s))
                .collect(),
            refused_msrs: vmm.refused_msrs() as u64,
        }
    }
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

/// Writes one frame. Each write waits as long as the socket's own timeout allows.
pub fn send<T: Serialize>(
    sock: &UnixStream,
    message: &T,
    payload: &[u8],
    fds: &[RawFd],
) -> Result<(), ChannelError> {
    send_by(sock, message, payload, fds, None)
}

/// [`send`], with the whole frame written by `deadline`: a peer that drains its socket a byte
/// at a time cannot hold the writer past it (a socket timeout alone bounds only each write).
pub fn send_until<T: Serialize>(
    sock: &UnixStream,
    message: &T,
    payload: &[u8],
    fds: &[RawFd],
    deadline: Instant,
) -> Result<(), ChannelError> {
    send_by(sock, message, payload, fds, Some(deadline))
}

fn send_by<T: Serialize>(
    sock: &UnixStream,
    message: &T,
    payload: &[u8],
    fds: &[RawFd],
    deadline: Option<Instant>,
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
    arm_write(sock, deadline)?;
    // The descriptors ride on the first bytes; the rest is a plain stream.
    let sent = if fds.is_empty() {
        (&*sock).write(&head)?
    } else {
        sock.send_with_fds(&[&head[..]], fds)
            .map_err(|e| ChannelError::from(io::Error::from_raw_os_error(e.errno())))?
    };
    write_all(sock, &head[sent..], deadline)?;
    write_all(sock, payload, deadline)
}

/// Sets the socket's write timeout to what is left before `deadline`.
fn arm_write(sock: &UnixStream, deadline: Option<Instant>) -> Result<(), ChannelError> {
    match left(deadline)? {
        Some(t) => Ok(sock.set_write_timeout(Some(t))?),
        None => Ok(()),
    }
}

/// What is left before `deadline` (`None`: no deadline); a deadline passed is a timeout.
fn left(deadline: Option<Instant>) -> Result<Option<Duration>, ChannelError> {
    match deadline.map(|d| d.saturating_duration_since(Instant::now())) {
        Some(t) if t.is_zero() => Err(ChannelError::Timeout(0)),
        t => Ok(t),
    }
}

/// `write_all` whose every write ends by `deadline`.
fn write_all(
    sock: &UnixStream,
    mut buf: &[u8],
    deadline: Option<Instant>,
) -> Result<(), ChannelError> {
    while !buf.is_empty() {
        arm_write(sock, deadline)?;
        match (&*sock).write(buf) {
            Ok(0) => return Err(ChannelError::Closed),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
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
    recv_until(sock, Instant::now() + timeout)
}

/// [`recv`], with the whole frame due by `deadline`.
pub fn recv_until<T: for<'de> Deserialize<'de>>(
    sock: &UnixStream,
    deadline: Instant,
) -> Result<Option<Frame<T>>, ChannelError> {
    recv_by(sock, Some(deadline))
}

/// Sets the socket's read timeout to what is left before `deadline`.
fn arm(sock: &UnixStream, deadline: Option<Instant>) -> Result<(), ChannelError> {
    match left(deadline)? {
        Some(t) => Ok(sock.set_read_timeout(Some(t))?),
        None => Ok(()),
    }
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
    arm(sock, deadline)?;
    let (got, files) = recv_head(sock, &mut head)?;
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

/// Space for the control message of [`MAX_FDS`] descriptors, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct FdSpace([u8; fd_space_len()]);

const fn fd_space_len() -> usize {
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// The first bytes of a frame into `head` and the descriptors that ride on them: received
/// close-on-exec atomically (no other thread's `fork`+`exec` can inherit one in between), and
/// retried when a signal interrupts the wait. A peer that sent more descriptors than fit is
/// refused (the kernel closed the surplus), after the ones that arrived are closed.
fn recv_head(sock: &UnixStream, head: &mut [u8]) -> Result<(usize, Vec<File>), ChannelError> {
    let mut space = FdSpace([0; fd_space_len()]);
    let (got, flags, files) = loop {
        let mut iov = libc::iovec {
            iov_base: head.as_mut_ptr().cast(),
            iov_len: head.len(),
        };
        // SAFETY: an all-zero msghdr is valid (no name, no buffers).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = space.0.as_mut_ptr().cast();
        msg.msg_controllen = space.0.len();
        // SAFETY: `msg` points at `iov` (over `head`) and `space`, both live and writable for
        // their stated lengths through the call.
        let got = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if got < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        break (got as usize, msg.msg_flags, received_fds(&msg));
    };
    if flags & libc::MSG_CTRUNC != 0 {
        return Err(ChannelError::Malformed(format!(
            "more than {MAX_FDS} descriptors with one frame"
        )));
    }
    Ok((got, files))
}

/// The descriptors of every `SCM_RIGHTS` control message of `msg`, each now owned.
fn received_fds(msg: &libc::msghdr) -> Vec<File> {
    let mut files = Vec::new();
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR walk only within its control
    // buffer, and each header's length was set by the kernel.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is a non-null header inside the control buffer (see above).
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is the header size; the kernel wrote cmsg_len >= it.
            let data_len = header.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            // SAFETY: the data of an SCM_RIGHTS message is `data_len` bytes of descriptors,
            // possibly unaligned for `RawFd`, so they are read one by one unaligned.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..data_len / std::mem::size_of::<RawFd>() {
                // SAFETY: `i` is within the message's data (see above).
                let fd = unsafe { data.add(i).read_unaligned() };
                if fd >= 0 {
                    // SAFETY: each descriptor was just received and belongs to nobody else.
                    files.push(unsafe { File::from_raw_fd(fd) });
                }
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    files
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

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    #[test]
    fn received_descriptors_are_close_on_exec() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = File::open("/dev/null").unwrap();
        send(&a, &Request::Info, b"", &[file.as_raw_fd()]).unwrap();
        let frame: Frame<Request> = recv(&b).unwrap().unwrap();
        let fd = frame.files[0].as_raw_fd();
        // SAFETY: F_GETFD on a descriptor this test owns reads its flags only.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }

    #[test]
    fn more_descriptors_than_allowed_are_refused_and_none_kept() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = File::open("/dev/null").unwrap();
        // Sent raw, past `send`'s own limit, as a hostile peer would: the kernel delivers what
        // fits the receiver's control buffer and flags the truncation.
        let fds = vec![file.as_raw_fd(); MAX_FDS + 8];
        let head = [2u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
        a.send_with_fds(&[&head[..]], &fds).unwrap();
        (&a).write_all(b"{}").unwrap();
        let before = open_fds();
        let Err(err) = recv::<Reply>(&b) else {
            panic!("a frame with too many descriptors was accepted");
        };
        assert!(
            matches!(&err, ChannelError::Malformed(m) if m.contains("descriptors")),
            "{err}"
        );
        assert_eq!(open_fds(), before, "a refused frame's descriptors leaked");
    }

    #[test]
    fn a_signal_during_the_wait_does_not_end_the_receive() {
        use std::sync::atomic::{AtomicBool, Ordering};
        extern "C" fn on_signal(_: libc::c_int) {}
        // SAFETY: installs a no-op handler without SA_RESTART for a real-time signal this test
        // alone uses, so a blocked recvmsg returns EINTR.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            libc::sigaction(libc::SIGRTMAX() - 1, &action, std::ptr::null_mut());
        }
        let (a, b) = UnixStream::pair().unwrap();
        // SAFETY: pthread_self has no preconditions.
        let receiver = unsafe { libc::pthread_self() };
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let sender = {
            let done = done.clone();
            std::thread::spawn(move || {
                for _ in 0..5 {
                    std::thread::sleep(Duration::from_millis(20));
                    // SAFETY: the receiving thread is alive until `done` is set below it.
                    unsafe { libc::pthread_kill(receiver, libc::SIGRTMAX() - 1) };
                }
                send(&a, &Request::Info, b"", &[]).unwrap();
                while !done.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let frame: Frame<Request> = recv(&b).unwrap().unwrap();
        done.store(true, Ordering::Release);
        sender.join().unwrap();
        assert!(matches!(frame.message, Request::Info));
    }

    #[test]
    fn a_peer_that_drains_slowly_cannot_hold_a_send_past_its_deadline() {
        let (a, b) = UnixStream::pair().unwrap();
        // Reads a byte every 20 ms, so every single write makes progress within any socket
        // timeout; gives up (closing its end) after 3 s.
        let reader = std::thread::spawn(move || {
            let started = Instant::now();
            let mut byte = [0u8; 1];
            while started.elapsed() < Duration::from_secs(3) {
                if (&b).read(&mut byte).unwrap_or(0) == 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let payload = vec![7u8; 8 << 20];
        let deadline = Instant::now() + Duration::from_millis(300);
        let result = send_until(&a, &Request::Info, &payload, &[], deadline);
        assert!(
            matches!(result, Err(ChannelError::Timeout(_))),
            "{result:?}"
        );
        drop(a);
        reader.join().unwrap();
    }
}
