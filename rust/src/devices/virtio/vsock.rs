//! virtio-vsock with a user-space backend: guest stream sockets are relayed to Unix sockets on
//! the host (the Firecracker convention).
//!
//! * Host to guest: connect to the Unix socket at `path`, write `CONNECT <port>\n`; when the guest
//!   accepts on vsock port `<port>` the VMM answers `OK <host_port>\n` and from then on relays
//!   bytes both ways. If nothing listens in the guest, or the guest does not answer within
//!   [`CONNECT_TIMEOUT`], the Unix connection is closed without an answer.
//! * Guest to host: a guest connection to CID 2 port `P` is relayed to the Unix socket
//!   `<path>_<P>`; if nothing listens there (or its backlog is full) the guest gets a reset.
//!
//! The guest CID is 3. One worker thread polls the host sockets and serves the queues; the
//! vCPU only kicks it. The connection state machine ([`VsockBackend`]) is separate from that
//! thread, so it can be driven step by step (tests, fuzzing).
//!
//! Everything the guest sends is hostile input and everything it can make the device hold is
//! bounded: header fields and payload lengths are checked; credit is enforced both ways (a
//! guest that sends beyond the buffer space it was given loses the connection, and the device
//! never sends beyond the guest's); connections ([`MAX_CONNECTIONS`]), queued replies and bytes
//! buffered per connection ([`BUF_ALLOC`]) are capped; connections the guest leaves half-open
//! time out; each pass over a queue handles at most a queue's worth of buffers; the worker never
//! blocks on a host socket (connects, reads and writes are non-blocking) and never spins on one (hang-ups
//! and errors are handled on every polled socket, and sockets with nothing to do are not polled).
//! Once the device has flagged DEVICE_NEEDS_RESET it leaves guest memory alone until the driver
//! resets it.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::device_thread::{self, ActiveQueues, DeviceThread, Shared};
use super::queue::{gather, scatter, Descriptor, DescriptorChain, Queue};
use super::{pop_chain, Interrupt, Popped, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vmm::os_msg;

const VIRTIO_ID_VSOCK: u32 = 19;
pub const GUEST_CID: u64 = 3;
pub const HOST_CID: u64 = 2;
const QUEUE_SIZE: u16 = 256;
pub const RX: usize = 0;
pub const TX: usize = 1;
pub const EVT: usize = 2;
/// virtio_vsock_event id: the transport was reset; the driver drops its connections.
const EVENT_TRANSPORT_RESET: u32 = 0;

pub const HDR_LEN: usize = 44;
pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_SEND: u32 = 2;
const SHUTDOWN_BOTH: u32 = 3;

/// Largest payload the guest may put in one packet.
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// Receive buffer space advertised to the guest per connection: the most guest-to-host bytes
/// the device holds for one connection while the host side is slow.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Most connections one device holds, counting host sockets that have not sent their CONNECT
/// line yet. Each holds a host file descriptor (and up to [`BUF_ALLOC`] bytes), so this also
/// bounds what a guest can take from the process running the VM.
pub const MAX_CONNECTIONS: usize = 128;
/// Most control packets (replies, resets) waiting for room in the guest's receive queue; while
/// the queue is full the device stops taking the guest's packets.
const MAX_PENDING_REPLIES: usize = 1024;
const MAX_CONNECT_LINE: usize = 64;
/// How long a host connection may take to send its `CONNECT <port>` line.
pub const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest may take to accept (RESPONSE) or refuse (RST) a host connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guest may take to answer our SHUTDOWN with an RST before the connection is
/// dropped anyway.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The worker wakes at least this often to expire connections.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// After `accept` failed (no file descriptors left), the listener is not polled for this long:
/// the connection stays in the backlog and would wake every poll at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cannot listen on vsock socket {path}: {msg}")]
    Listen { path: String, msg: String },
    #[error("cannot start the vsock worker: {0}")]
    Worker(String),
    #[error("vsock socket {path} is in use (by another VM?); choose another path")]
    InUse { path: String },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().expect("2 bytes"));
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// What the device shares with its worker besides the queues.
#[derive(Default)]
struct VsockShared {
    /// Bumped on every reset, so the worker drops connections of the old driver.
    resets: u64,
    /// After a restore: the event queue's available index when the transport-reset event was
    /// sent, and when. Nothing goes to the guest until the index moves or a grace time passes.
    reset_wait: Option<(u16, Instant)>,
}

/// Longest wait for the driver to handle a transport-reset event.
const RESET_GRACE: Duration = Duration::from_secs(2);

/// The virtio-vsock device (the transport side); the worker thread does the relaying.
pub struct Vsock {
    path: PathBuf,
    thread: DeviceThread<VsockShared>,
}

impl Vsock {
    /// Listens on `path` (replacing a stale socket file, but never one something still listens
    /// on, such as another VM) and starts the worker.
    pub fn new(path: &Path) -> Result<Box<Self>, VsockError> {
        let backend = VsockBackend::bind(path)?;
        let thread = DeviceThread::spawn("vsock", VsockShared::default(), move |kick, shared| {
            Worker {
                backend,
                kick,
                shared,
                resets_seen: 0,
            }
            .run()
        })
        .map_err(|e| VsockError::Worker(os_msg(&e)))?;
        Ok(Box::new(Vsock {
            path: path.to_path_buf(),
            thread,
        }))
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let cfg = GUEST_CID.to_le_bytes();
        data.copy_from_slice(&cfg[offset..offset + data.len()]);
    }

    fn config_len(&self) -> usize {
        8
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), String> {
        self.thread
            .activate(mem, queues, interrupt, 3, "virtio-vsock")
    }

    fn notify(&mut self, _index: u16) {
        self.thread.kick();
    }

    fn reset(&mut self) {
        let mut g = self.thread.lock();
        if g.active.take().is_some() {
            g.extra.resets += 1;
        }
        drop(g);
        self.thread.kick();
    }

    fn live_queues(&self) -> Option<Vec<Queue>> {
        self.thread.live_queues()
    }

    fn set_quiesced(&mut self, quiesced: bool) {
        self.thread.set_quiesced(quiesced);
    }

    /// Connections do not survive a snapshot: tell the driver with a transport-reset event so
    /// it drops the stale ones (listening sockets stay).
    fn restored(&mut self) {
        let mut g = self.thread.lock();
        let Some(active) = g.active.as_mut() else {
            return;
        };
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        match pop(active, EVT) {
            Popped::Chain(chain) => {
                let ActiveQueues {
                    mem,
                    queues,
                    interrupt,
                } = active;
                let written = scatter(mem, &chain.descs, &[&event]).unwrap_or(0);
                if queues[EVT].add_used(mem, chain.head, written).is_ok() {
                    interrupt.signal_used();
                    // Hold host connections back until the driver has handled the event (it
                    // then refills the event queue), or it would reset them as well.
                    if let Ok(idx) = queues[EVT].avail_idx(mem) {
                        g.extra.reset_wait = Some((idx, Instant::now()));
                    }
                }
            }
            Popped::Empty => {}
            Popped::Broken => active.interrupt.signal_used(),
        }
        drop(g);
        self.thread.kick();
    }

    fn shutdown(&mut self) {
        if self.thread.stop() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The worker thread: serves the queues under the shared lock, then polls the host sockets
/// (and the kick eventfd) without it.
struct Worker {
    backend: VsockBackend,
    kick: Arc<EventFd>,
    shared: Arc<Mutex<Shared<VsockShared>>>,
    resets_seen: u64,
}

impl Worker {
    fn run(mut self) {
        loop {
            let Some(served) = self.service(Instant::now()) else {
                return;
            };
            let timeout = if served.more {
                Duration::ZERO
            } else {
                POLL_INTERVAL
            };
            self.backend
                .poll(Some(&self.kick), served.rx_ready, timeout, Instant::now());
        }
    }

    /// One pass over the queues; `None` when the worker must stop.
    fn service(&mut self, now: Instant) -> Option<Served> {
        let shared = self.shared.clone();
        let mut g = device_thread::lock(&shared);
        if g.stop {
            return None;
        }
        if g.extra.resets != self.resets_seen {
            self.resets_seen = g.extra.resets;
            self.backend.drop_connections();
        }
        self.backend.expire(now);
        if g.quiesced {
            return Some(Served::default());
        }
        let Shared { active, extra, .. } = &mut *g;
        let reset_wait = &mut extra.reset_wait;
        let Some(active) = active.as_mut() else {
            return Some(Served::default());
        };
        if let Some((idx, since)) = *reset_wait {
            let current = active.queues[EVT].avail_idx(&active.mem).unwrap_or(idx);
            if current == idx && since.elapsed() < RESET_GRACE {
                return Some(Served::default());
            }
            *reset_wait = None;
        }
        Some(self.backend.serve(active, now))
    }
}

/// What one pass over the queues left behind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    /// The receive queue has buffers: host sockets with data for the guest are worth polling.
    pub rx_ready: bool,
    /// A pass stopped at its budget with work left: serve again without waiting.
    pub more: bool,
}

/// What one [`VsockBackend::poll`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Polled {
    /// The kick eventfd fired (its counter was cleared).
    pub kicked: bool,
    /// Host sockets (listener, connections) that had something to report. With no new host
    /// activity this reaches zero: nothing can make poll report the same event over and over.
    pub ready: usize,
}

fn pop(q: &mut ActiveQueues, which: usize) -> Popped {
    pop_chain(&mut q.queues[which], &q.mem, &q.interrupt)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated, REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
    /// We sent SHUTDOWN (host side closed); waiting for the guest's RST.
    Closing,
}

struct Conn {
    stream: UnixStream,
    state: ConnState,
    /// When `state` was entered (the connecting and closing timeouts count from here).
    since: Instant,
    /// The host closed its socket (POLLHUP): what it sent before is still relayed, but the
    /// socket is not polled for reading any more.
    host_hup: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    tx_cnt: u32,
    /// Payload bytes from the guest delivered to the host socket.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Guest-to-host bytes not yet written to the host socket.
    host_out: VecDeque<u8>,
    /// Bytes at the front of `host_out` that are not guest payload (the "OK" line).
    non_payload: usize,
    shut_host_write: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: ConnState, now: Instant) -> Self {
        Conn {
            stream,
            state,
            since: now,
            host_hup: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            host_out: VecDeque::new(),
            non_payload: 0,
            shut_host_write: false,
        }
    }

    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Guest payload received but not yet written to the host: what counts against the
    /// credit the device gave.
    fn guest_bytes_held(&self) -> usize {
        self.host_out.len() - self.non_payload
    }

    /// Whether the connection has been in its state longer than that state may last.
    fn timed_out(&self, now: Instant) -> bool {
        let limit = match self.state {
            ConnState::Connecting => CONNECT_TIMEOUT,
            ConnState::Closing => CLOSE_TIMEOUT,
            ConnState::Established => return false,
        };
        now.saturating_duration_since(self.since) >= limit
    }
}

/// A host connection that has not sent its CONNECT line yet.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

/// (host port, guest port)
type Key = (u32, u32);

fn reply(op: u16, key: Key, flags: u32) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: GUEST_CID,
        src_port: key.0,
        dst_port: key.1,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags,
        buf_alloc: BUF_ALLOC,
        fwd_cnt: 0,
    }
}

/// Reads a guest packet (header and payload) from the readable buffers of a chain.
fn read_packet(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Option<(Header, Vec<u8>)> {
    if descs.iter().any(|d| !d.in_ram(mem)) {
        return None;
    }
    let mut hb = [0u8; HDR_LEN];
    gather(mem, descs, 0, &mut hb).ok()?;
    let h = Header::from_bytes(&hb);
    if h.len > MAX_PAYLOAD {
        return None;
    }
    let mut payload = vec![0u8; h.len as usize];
    gather(mem, descs, HDR_LEN as u64, &mut payload).ok()?;
    Some((h, payload))
}

/// Connects to a host Unix socket without ever blocking: a listener whose backlog is full
/// refuses at once (EAGAIN) instead of stalling the device thread. Unix stream sockets never
/// answer a non-blocking connect with EINPROGRESS.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::from(ErrorKind::InvalidInput));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just created here and owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call, and `len` does not exceed
    // its size (the path length was checked above).
    let r = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

/// The connection state machine: the listening socket, the host connections, and the packets
/// waiting for the guest. It runs on whatever thread calls it: the device's worker, or a test
/// that steps it with [`VsockBackend::serve`], [`VsockBackend::poll`] (timeout zero) and
/// [`VsockBackend::expire`].
pub struct VsockBackend {
    path: PathBuf,
    listener: UnixListener,
    /// The listener is not polled before this (see [`ACCEPT_BACKOFF`]).
    listener_paused_until: Option<Instant>,
    conns: HashMap<Key, Conn>,
    pending_hosts: Vec<PendingHost>,
    /// Packets (header only) waiting for room in the rx queue.
    replies: VecDeque<Header>,
    next_port: u32,
}

impl VsockBackend {
    /// Listens on `path`, replacing a stale socket file but never one something still listens
    /// on (such as another VM).
    pub fn bind(path: &Path) -> Result<Self, VsockError> {
        let listen_err = |e: std::io::Error| VsockError::Listen {
            path: path.display().to_string(),
            msg: os_msg(&e),
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                let in_use = || VsockError::InUse {
                    path: path.display().to_string(),
                };
                match connect_nonblocking(path) {
                    // A full backlog (WouldBlock) is a listener too, only a busy one.
                    Ok(_) => return Err(in_use()),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Err(in_use()),
                    // Nobody listens: a stale file left by a VM that is gone.
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                        let _ = std::fs::remove_file(path);
                    }
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(listen_err(e)),
                }
            }
        }
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        Ok(VsockBackend {
            path: path.to_path_buf(),
            listener,
            listener_paused_until: None,
            conns: HashMap::new(),
            pending_hosts: Vec::new(),
            replies: VecDeque::new(),
            next_port: 1 << 30,
        })
    }

    /// Connections held, including host sockets that have not sent their CONNECT line.
    pub fn connection_count(&self) -> usize {
        self.conns.len() + self.pending_hosts.len()
    }

    /// Guest-to-host bytes held for all connections.
    pub fn buffered_bytes(&self) -> usize {
        self.conns.values().map(|c| c.host_out.len()).sum()
    }

    /// Control packets waiting for room in the guest's receive queue.
    pub fn pending_replies(&self) -> usize {
        self.replies.len()
    }

    /// The driver was reset: its connections are gone (their host sockets are closed).
    pub fn drop_connections(&mut self) {
        self.conns.clear();
        self.replies.clear();
    }

    /// Drops connections stuck too long: host sockets that never sent a CONNECT line, host
    /// connections the guest never answered, and shut-down connections the guest never reset.
    pub fn expire(&mut self, now: Instant) {
        self.pending_hosts
            .retain(|p| now.saturating_duration_since(p.since) < CONNECT_LINE_TIMEOUT);
        let stuck: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.timed_out(now))
            .map(|(k, _)| *k)
            .collect();
        for key in stuck {
            self.close(key, true);
        }
    }

    /// One pass over the queues: the guest's packets, queued replies, then host data. Each
    /// queue gives at most its size in buffers per pass. Does nothing once the device needs a
    /// reset.
    pub fn serve(&mut self, q: &mut ActiveQueues, now: Instant) -> Served {
        if q.interrupt.needs_reset() {
            return Served::default();
        }
        let (mut used, tx_more, tx_blocked) = self.process_tx(q, now);
        used |= self.send_replies(q);
        let (relayed, rx_more) = self.relay_host_data(q, now);
        used |= relayed;
        if used {
            q.interrupt.signal_used();
        }
        if q.interrupt.needs_reset() {
            return Served::default();
        }
        // The tx queue waited for replies to drain: if they did, come back for it.
        let unblocked = tx_blocked && self.replies.len() < MAX_PENDING_REPLIES;
        Served {
            rx_ready: q.queues[RX].has_available(&q.mem).unwrap_or(false),
            more: tx_more || rx_more || unblocked,
        }
    }

    /// Waits up to `timeout` for the host sockets (and `kick`, when given), then handles what
    /// happened: new host connections, CONNECT lines, hang-ups and errors, and sockets that
    /// can take queued guest data. Reading host data is left to [`VsockBackend::serve`]:
    /// sockets with data are only polled for reading while `rx_ready`.
    pub fn poll(
        &mut self,
        kick: Option<&EventFd>,
        rx_ready: bool,
        timeout: Duration,
        now: Instant,
    ) -> Polled {
        let mut fds = Vec::new();
        let pollfd = |fd: RawFd, events: libc::c_short| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        if let Some(kick) = kick {
            fds.push(pollfd(kick.as_raw_fd(), libc::POLLIN));
        }
        if self.listener_paused_until.is_some_and(|t| now >= t) {
            self.listener_paused_until = None;
        }
        let listener_at = self.listener_paused_until.is_none().then(|| {
            fds.push(pollfd(self.listener.as_raw_fd(), libc::POLLIN));
            fds.len() - 1
        });
        let first_pending = fds.len();
        for p in &self.pending_hosts {
            fds.push(pollfd(p.stream.as_raw_fd(), libc::POLLIN));
        }
        let first_conn = fds.len();
        let mut polled = Vec::new();
        for (key, c) in &self.conns {
            if let Some(events) = Self::events_of(c, rx_ready) {
                fds.push(pollfd(c.stream.as_raw_fd(), events));
                polled.push(*key);
            }
        }
        let mut timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        if let Some(t) = self.listener_paused_until {
            let wait = t.saturating_duration_since(now).as_millis();
            timeout_ms = timeout_ms.min(i32::try_from(wait).unwrap_or(i32::MAX));
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n <= 0 {
            return Polled::default();
        }
        let kicked = kick.is_some_and(|kick| fds[0].revents != 0 && kick.read().is_ok());
        let reported = n as usize - usize::from(kick.is_some() && fds[0].revents != 0);
        let ready: Vec<usize> = (0..first_conn - first_pending)
            .filter(|i| fds[first_pending + i].revents != 0)
            .collect();
        self.read_connect_lines(&ready, now);
        if listener_at.is_some_and(|i| fds[i].revents != 0) {
            self.accept(now);
        }
        for (i, key) in polled.iter().enumerate() {
            let revents = fds[first_conn + i].revents;
            if revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                self.close(*key, true);
            } else if revents & libc::POLLHUP != 0 {
                self.host_hung_up(*key);
            } else if revents & libc::POLLOUT != 0 {
                self.flush_host(*key);
            }
        }
        Polled {
            kicked,
            ready: reported,
        }
    }

    /// What to poll a connection's socket for; `None`: not at all. Every polled socket reports
    /// hang-ups and errors whatever is asked for, and each is handled, so none can make poll
    /// return at once over and over.
    fn events_of(c: &Conn, rx_ready: bool) -> Option<libc::c_short> {
        match c.state {
            // Only a hang-up matters (the host gave up waiting).
            ConnState::Connecting => Some(0),
            // Waiting for the guest's RST (or the timeout); the host side is done.
            ConnState::Closing => None,
            ConnState::Established if c.host_hup => {
                // What the host sent before it closed is read by `serve`; only queued guest
                // data still wants the socket (writing it fails, which ends the connection).
                (!c.host_out.is_empty()).then_some(libc::POLLOUT)
            }
            ConnState::Established => {
                let mut events = 0;
                if rx_ready && c.peer_credit() > 0 {
                    events |= libc::POLLIN;
                }
                if !c.host_out.is_empty() {
                    events |= libc::POLLOUT;
                }
                Some(events)
            }
        }
    }

    /// The host closed a connection's socket.
    fn host_hung_up(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        match c.state {
            // The host gave up before the guest answered.
            ConnState::Connecting => self.close(key, true),
            ConnState::Closing => {}
            ConnState::Established => {
                let again = c.host_hup;
                c.host_hup = true;
                self.flush_host(key);
                // A second hang-up with data still queued: the data cannot go anywhere.
                if again && self.conns.get(&key).is_some_and(|c| !c.host_out.is_empty()) {
                    self.close(key, true);
                }
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if self.connection_count() >= MAX_CONNECTIONS
                        || s.set_nonblocking(true).is_err()
                    {
                        continue; // dropped: closed
                    }
                    self.pending_hosts.push(PendingHost {
                        stream: s,
                        line: Vec::new(),
                        since: now,
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    // Out of descriptors (or memory): leave the connection in the backlog.
                    self.listener_paused_until = Some(now + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    fn read_connect_lines(&mut self, ready: &[usize], now: Instant) {
        let mut done = Vec::new();
        for &i in ready {
            let PendingHost { stream, line, .. } = &mut self.pending_hosts[i];
            let mut byte = [0u8; 1];
            let complete = loop {
                match stream.read(&mut byte) {
                    Ok(1) if byte[0] == b'\n' => break Some(true),
                    Ok(1) if line.len() < MAX_CONNECT_LINE => line.push(byte[0]),
                    Ok(_) => break Some(false), // EOF or an overlong line
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break Some(false),
                }
            };
            if let Some(ok) = complete {
                done.push((i, ok));
            }
        }
        // Remove from the back so indices stay valid.
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        for (i, ok) in done {
            let PendingHost { stream, line, .. } = self.pending_hosts.swap_remove(i);
            let port = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| l.trim().strip_prefix("CONNECT "))
                .and_then(|p| p.trim().parse::<u32>().ok());
            match (ok, port) {
                (true, Some(port)) => {
                    let host_port = self.alloc_port(port);
                    let key = (host_port, port);
                    // No room for the request: the host connection is closed at once.
                    if self.queue_reply(reply(OP_REQUEST, key, 0)) {
                        self.conns
                            .insert(key, Conn::new(stream, ConnState::Connecting, now));
                    }
                }
                _ => {
                    let _ = (&stream).write(b"ERR expected CONNECT <port>\n");
                }
            }
        }
    }

    fn alloc_port(&mut self, guest_port: u32) -> u32 {
        // Terminates: at most MAX_CONNECTIONS ports are taken.
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.wrapping_add(1).max(1 << 30);
            if !self.conns.contains_key(&(p, guest_port)) {
                return p;
            }
        }
    }

    /// Queues a packet for the guest; `false` (and dropped) when the queue is full.
    fn queue_reply(&mut self, h: Header) -> bool {
        if self.replies.len() >= MAX_PENDING_REPLIES {
            return false;
        }
        self.replies.push_back(h);
        true
    }

    /// Guest-to-host packets, at most a queue's worth. Returns whether used buffers were added,
    /// whether the budget ran out, and whether a full reply queue stopped the pass.
    fn process_tx(&mut self, q: &mut ActiveQueues, now: Instant) -> (bool, bool, bool) {
        let mut used = false;
        for _ in 0..q.queues[TX].size {
            if self.replies.len() >= MAX_PENDING_REPLIES {
                return (used, false, true);
            }
            let chain = match pop(q, TX) {
                Popped::Chain(chain) => chain,
                Popped::Empty => return (used, false, false),
                Popped::Broken => return (true, false, false),
            };
            let packet = read_packet(&q.mem, &chain.descs);
            if q.queues[TX].add_used(&q.mem, chain.head, 0).is_err() {
                q.interrupt.set_needs_reset();
                return (used, false, false);
            }
            used = true;
            match packet {
                Some((h, payload)) => self.handle_packet(h, payload, now),
                None => {
                    q.interrupt.set_needs_reset();
                    return (used, false, false);
                }
            }
        }
        (used, true, false)
    }

    /// Handles one packet from the guest (already checked to be well-formed).
    pub fn handle_packet(&mut self, h: Header, payload: Vec<u8>, now: Instant) {
        if h.src_cid != GUEST_CID || h.dst_cid != HOST_CID {
            return; // not for us; nothing sensible to answer
        }
        let key = (h.dst_port, h.src_port);
        if h.type_ != TYPE_STREAM {
            if h.op != OP_RST {
                self.queue_reply(reply(OP_RST, key, 0));
            }
            return;
        }
        if h.op == OP_REQUEST {
            self.guest_connect(key, &h, now);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                self.queue_reply(reply(OP_RST, key, 0));
            }
            return;
        };
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            OP_RESPONSE if conn.state == ConnState::Connecting => {
                conn.state = ConnState::Established;
                conn.since = now;
                let line = format!("OK {}\n", key.0);
                conn.host_out.extend(line.as_bytes());
                conn.non_payload += line.len();
                self.flush_host(key);
            }
            OP_RW if conn.state == ConnState::Established => {
                if conn.shut_host_write
                    || conn.guest_bytes_held() + payload.len() > BUF_ALLOC as usize
                {
                    // Data after the guest said it would send no more, or beyond the credit
                    // it was given.
                    self.close(key, true);
                    return;
                }
                conn.host_out.extend(payload);
                self.flush_host(key);
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                let fwd = conn.fwd_cnt;
                conn.last_fwd_cnt_sent = fwd;
                let mut r = reply(OP_CREDIT_UPDATE, key, 0);
                r.fwd_cnt = fwd;
                self.queue_reply(r);
            }
            OP_SHUTDOWN => {
                if h.flags & SHUTDOWN_BOTH == SHUTDOWN_BOTH {
                    self.flush_host(key);
                    self.close(key, true);
                } else if h.flags & SHUTDOWN_SEND != 0 {
                    conn.shut_host_write = true;
                    self.flush_host(key);
                }
            }
            OP_RST => {
                self.close(key, false);
            }
            _ => self.close(key, true),
        }
    }

    fn guest_connect(&mut self, key: Key, h: &Header, now: Instant) {
        if self.conns.contains_key(&key) || self.connection_count() >= MAX_CONNECTIONS {
            self.queue_reply(reply(OP_RST, key, 0));
            return;
        }
        let target = PathBuf::from(format!("{}_{}", self.path.display(), key.0));
        match connect_nonblocking(&target) {
            Ok(stream) => {
                if !self.queue_reply(reply(OP_RESPONSE, key, 0)) {
                    return; // the guest's request times out on its side
                }
                let mut c = Conn::new(stream, ConnState::Established, now);
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
                self.conns.insert(key, c);
            }
            Err(_) => {
                self.queue_reply(reply(OP_RST, key, 0));
            }
        }
    }

    /// Drops a connection (closing the host socket), optionally telling the guest.
    fn close(&mut self, key: Key, rst: bool) {
        if self.conns.remove(&key).is_some() && rst {
            self.queue_reply(reply(OP_RST, key, 0));
        }
    }

    /// Writes buffered guest data to the host socket.
    fn flush_host(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let mut failed = false;
        while !c.host_out.is_empty() {
            let (a, _) = c.host_out.as_slices();
            // std's socket writes pass MSG_NOSIGNAL: a closed peer gives EPIPE, not SIGPIPE.
            match (&c.stream).write(a) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(n) => {
                    c.host_out.drain(..n);
                    let header = n.min(c.non_payload);
                    c.non_payload -= header;
                    c.fwd_cnt = c.fwd_cnt.wrapping_add((n - header) as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.close(key, true);
            return;
        }
        if c.host_out.is_empty() && c.shut_host_write {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= BUF_ALLOC / 4 {
            let fwd = c.fwd_cnt;
            c.last_fwd_cnt_sent = fwd;
            let mut r = reply(OP_CREDIT_UPDATE, key, 0);
            r.fwd_cnt = fwd;
            self.queue_reply(r);
        }
    }

    /// Queued control packets to the guest. Returns whether used buffers were added.
    fn send_replies(&mut self, q: &mut ActiveQueues) -> bool {
        let mut used = false;
        while let Some(mut h) = self.replies.pop_front() {
            if let Some(c) = self.conns.get_mut(&(h.src_port, h.dst_port)) {
                h.fwd_cnt = c.fwd_cnt;
                c.last_fwd_cnt_sent = c.fwd_cnt;
            }
            let chain = match pop(q, RX) {
                Popped::Chain(chain) => chain,
                Popped::Empty => {
                    self.replies.push_front(h);
                    return used;
                }
                Popped::Broken => return true,
            };
            if !put_rx(q, &chain, h, &[]) {
                return true;
            }
            used = true;
        }
        used
    }

    /// Host-to-guest data of every connection with credit, at most a queue's worth of buffers.
    /// Returns whether buffers were used and whether the budget ran out.
    fn relay_host_data(&mut self, q: &mut ActiveQueues, now: Instant) -> (bool, bool) {
        let mut used = false;
        let mut budget = q.queues[RX].size;
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            while let Some(c) = self.conns.get_mut(&key) {
                if c.state != ConnState::Established || !self.replies.is_empty() {
                    break;
                }
                let credit = c.peer_credit().min(MAX_PAYLOAD);
                if credit == 0 {
                    break;
                }
                if budget == 0 {
                    return (used, true);
                }
                let chain = match pop(q, RX) {
                    Popped::Chain(chain) => chain,
                    Popped::Empty => return (used, false),
                    Popped::Broken => return (true, false),
                };
                let room: u64 = chain
                    .descs
                    .iter()
                    .filter(|d| d.is_write_only())
                    .map(|d| u64::from(d.len))
                    .sum();
                if room <= HDR_LEN as u64 {
                    let _ = q.queues[RX].add_used(&q.mem, chain.head, 0);
                    q.interrupt.set_needs_reset();
                    return (true, false);
                }
                let n = (room - HDR_LEN as u64).min(u64::from(credit)) as usize;
                let mut buf = vec![0u8; n];
                let got = match c.stream.read(&mut buf) {
                    Ok(0) => {
                        // Host closed its side: tell the guest, wait for its RST.
                        q.queues[RX].undo_pop();
                        c.state = ConnState::Closing;
                        c.since = now;
                        self.queue_reply(reply(OP_SHUTDOWN, key, SHUTDOWN_BOTH));
                        break;
                    }
                    Ok(got) => got,
                    Err(e)
                        if e.kind() == ErrorKind::WouldBlock
                            || e.kind() == ErrorKind::Interrupted =>
                    {
                        q.queues[RX].undo_pop();
                        break;
                    }
                    Err(_) => {
                        q.queues[RX].undo_pop();
                        self.close(key, true);
                        break;
                    }
                };
                let mut h = reply(OP_RW, key, 0);
                h.len = got as u32;
                h.fwd_cnt = c.fwd_cnt;
                c.last_fwd_cnt_sent = c.fwd_cnt;
                c.tx_cnt = c.tx_cnt.wrapping_add(got as u32);
                budget -= 1;
                if !put_rx(q, &chain, h, &buf[..got]) {
                    return (true, false);
                }
                used = true;
            }
        }
        (used, false)
    }
}

/// Writes a packet into a popped rx chain and returns the chain; `false` when that failed
/// (the device is then marked broken).
fn put_rx(q: &mut ActiveQueues, chain: &DescriptorChain, h: Header, payload: &[u8]) -> bool {
    let bytes = h.to_bytes();
    match scatter(&q.mem, &chain.descs, &[&bytes, payload]) {
        Some(len) if q.queues[RX].add_used(&q.mem, chain.head, len).is_ok() => true,
        _ => {
            let _ = q.queues[RX].add_used(&q.mem, chain.head, 0);
            q.interrupt.set_needs_reset();
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::tests::ram;
    use crate::devices::virtio::queue::VIRTQ_DESC_F_WRITE;
    use std::io::Write;
    use std::sync::mpsc;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn header_round_trips() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 52,
            len: 9,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 77,
        };
        assert_eq!(Header::from_bytes(&h.to_bytes()), h);
    }

    #[test]
    fn credit_never_goes_negative() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Conn::new(a, ConnState::Established, Instant::now());
        c.peer_buf_alloc = 100;
        c.tx_cnt = 150;
        c.peer_fwd_cnt = 20;
        assert_eq!(c.peer_credit(), 0);
        c.peer_fwd_cnt = 120;
        assert_eq!(c.peer_credit(), 70);
        c.tx_cnt = 5; // wrapped
        c.peer_fwd_cnt = u32::MAX - 4;
        assert_eq!(c.peer_credit(), 90);
    }

    /// A backend listening in a fresh temporary directory.
    fn backend(name: &str) -> (VsockBackend, PathBuf) {
        let dir = std::env::temp_dir().join(format!("sm-vsock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        (VsockBackend::bind(&path).unwrap(), path)
    }

    /// One non-blocking poll.
    fn step(b: &mut VsockBackend, now: Instant) {
        b.poll(None, true, Duration::ZERO, now);
    }

    fn guest(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 65536,
            ..Header::default()
        }
    }

    /// A host connection through the listener whose CONNECT line was read: `(host end, key)`.
    fn host_connect(b: &mut VsockBackend, path: &Path, now: Instant) -> (UnixStream, Key) {
        let mut host = UnixStream::connect(path).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        let before: Vec<Key> = b.conns.keys().copied().collect();
        for _ in 0..3 {
            step(b, now);
        }
        let key = *b
            .conns
            .keys()
            .find(|k| !before.contains(k))
            .expect("a new connection");
        assert_eq!(b.conns[&key].state, ConnState::Connecting);
        (host, key)
    }

    fn last_reply(b: &VsockBackend) -> Header {
        *b.replies.back().expect("a reply")
    }

    #[test]
    fn host_hangup_while_the_guest_has_not_answered_ends_the_connection() {
        let (mut b, path) = backend("hup");
        let now = Instant::now();
        let (host, key) = host_connect(&mut b, &path, now);
        assert_eq!(last_reply(&b).op, OP_REQUEST);
        drop(host);
        step(&mut b, now);
        assert_eq!(b.connection_count(), 0, "the hung-up connection is dropped");
        assert_eq!(
            (last_reply(&b).op, last_reply(&b).src_port),
            (OP_RST, key.0)
        );
    }

    #[test]
    fn a_hung_up_established_connection_is_not_polled_again() {
        let (mut b, path) = backend("hup-est");
        let now = Instant::now();
        let (mut host, key) = host_connect(&mut b, &path, now);
        b.handle_packet(guest(OP_RESPONSE, key.1, key.0), vec![], now);
        let mut ok = [0u8; 64];
        assert!(host.read(&mut ok).unwrap() > 0);
        drop(host);
        step(&mut b, now);
        let c = &b.conns[&key];
        assert!(c.host_hup);
        // With no rx buffers the guest cannot be told yet: the socket is left alone.
        assert_eq!(VsockBackend::events_of(c, false), None);
        assert_eq!(VsockBackend::events_of(c, true), None);
    }

    #[test]
    fn connections_the_guest_never_answers_or_resets_time_out() {
        let (mut b, path) = backend("timeout");
        let now = Instant::now();
        let (mut host, key) = host_connect(&mut b, &path, now);
        b.expire(now + CONNECT_TIMEOUT - Duration::from_millis(1));
        assert_eq!(b.connection_count(), 1);
        b.expire(now + CONNECT_TIMEOUT);
        assert_eq!(b.connection_count(), 0);
        assert_eq!(last_reply(&b).op, OP_RST);
        let mut buf = [0u8; 8];
        assert_eq!(host.read(&mut buf).unwrap(), 0, "the host sees the close");

        let (_host, key2) = host_connect(&mut b, &path, now);
        assert_ne!(key, key2);
        b.conns.get_mut(&key2).unwrap().state = ConnState::Closing;
        b.expire(now + CLOSE_TIMEOUT);
        assert_eq!(b.connection_count(), 0);

        // A host that never sends its line.
        let _silent = UnixStream::connect(&path).unwrap();
        step(&mut b, now);
        assert_eq!(b.connection_count(), 1);
        b.expire(now + CONNECT_LINE_TIMEOUT);
        assert_eq!(b.connection_count(), 0);
    }

    #[test]
    fn a_socket_whose_listener_is_busy_is_in_use_not_stale() {
        let (b, path) = backend("busy");
        drop(b);
        std::fs::remove_file(&path).unwrap();
        let other_vm = UnixListener::bind(&path).unwrap();
        // SAFETY: listen(2) on a socket `other_vm` owns.
        assert_eq!(unsafe { libc::listen(other_vm.as_raw_fd(), 0) }, 0);
        let _queued = UnixStream::connect(&path).unwrap(); // the backlog is now full
        let err = VsockBackend::bind(&path)
            .err()
            .expect("the socket is taken");
        assert!(matches!(err, VsockError::InUse { .. }), "{err}");
        assert!(path.exists());
        drop(other_vm);
        // Once nobody listens the stale file is replaced.
        assert!(VsockBackend::bind(&path).is_ok());
    }

    /// Runs in a child process (it lowers the descriptor limit, which is process-wide).
    #[test]
    fn a_failing_accept_does_not_wake_poll_over_and_over() {
        const NAME: &str =
            "devices::virtio::vsock::tests::a_failing_accept_does_not_wake_poll_over_and_over";
        if std::env::var_os("SM_VSOCK_EMFILE_CHILD").is_none() {
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--test-threads=1"])
                .env("SM_VSOCK_EMFILE_CHILD", "1")
                .status()
                .unwrap();
            assert!(status.success(), "the child test failed");
            return;
        }
        let (mut b, path) = backend("emfile");
        let _host = UnixStream::connect(&path).unwrap();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit with a valid rlimit struct; this process is the child.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            limit.rlim_cur = limit.rlim_cur.min(256);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
        let mut hold = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            hold.push(f);
        }
        let now = Instant::now();
        assert_eq!(b.poll(None, false, Duration::ZERO, now).ready, 1);
        assert_eq!(
            b.poll(None, false, Duration::ZERO, now).ready,
            0,
            "the listener whose accept failed is polled again at once"
        );
        drop(hold);
        b.poll(None, false, Duration::ZERO, now + ACCEPT_BACKOFF);
        assert_eq!(
            b.connection_count(),
            1,
            "accepted once descriptors are free"
        );
    }

    /// Listens on the host socket for guest port `port`, with room for `backlog` connections.
    fn host_listener(path: &Path, port: u32, backlog: i32) -> UnixListener {
        let l = UnixListener::bind(format!("{}_{port}", path.display())).unwrap();
        // SAFETY: listen(2) on a socket `l` owns.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), backlog) }, 0);
        l
    }

    #[test]
    fn the_guest_cannot_open_more_than_max_connections() {
        let (mut b, path) = backend("limit");
        let _l = host_listener(&path, 80, 4096);
        let now = Instant::now();
        for port in 0..MAX_CONNECTIONS as u32 {
            b.handle_packet(guest(OP_REQUEST, 1000 + port, 80), vec![], now);
            assert_eq!(last_reply(&b).op, OP_RESPONSE);
        }
        b.handle_packet(guest(OP_REQUEST, 5000, 80), vec![], now);
        assert_eq!(last_reply(&b).op, OP_RST);
        assert_eq!(b.connection_count(), MAX_CONNECTIONS);
        // Host connections beyond the limit are closed at once.
        let mut host = UnixStream::connect(&path).unwrap();
        step(&mut b, now);
        assert_eq!(b.connection_count(), MAX_CONNECTIONS);
        let mut buf = [0u8; 8];
        assert_eq!(host.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn a_guest_connect_to_a_full_backlog_does_not_block() {
        let (mut b, path) = backend("backlog");
        let _l = host_listener(&path, 81, 0);
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            let now = Instant::now();
            let mut ops = Vec::new();
            for port in 0..4 {
                b.handle_packet(guest(OP_REQUEST, 2000 + port, 81), vec![], now);
                ops.push(last_reply(&b).op);
            }
            let _ = done.send(ops);
        });
        let ops = finished
            .recv_timeout(Duration::from_secs(10))
            .expect("connecting to a full backlog blocked the device");
        assert_eq!(ops.last(), Some(&OP_RST));
    }

    #[test]
    fn guest_data_beyond_its_credit_ends_the_connection() {
        let (mut b, path) = backend("credit");
        let l = host_listener(&path, 82, 8);
        let now = Instant::now();
        b.handle_packet(guest(OP_REQUEST, 3000, 82), vec![], now);
        let (_slow_host, _) = l.accept().unwrap(); // never reads
        let key = (82, 3000);
        let chunk = vec![7u8; MAX_PAYLOAD as usize];
        let mut sent = 0usize;
        while b.conns.contains_key(&key) {
            b.handle_packet(guest(OP_RW, 3000, 82), chunk.clone(), now);
            sent += chunk.len();
            assert!(b.buffered_bytes() <= BUF_ALLOC as usize);
            assert!(sent < 64 << 20, "the device kept taking data");
        }
        assert_eq!(last_reply(&b).op, OP_RST);
    }

    const DESC: [u64; 3] = [0x10000, 0x20000, 0x30000];

    /// Three queues of 8 in fresh guest RAM; the rx queue gets `rx_buffers` buffers.
    fn queues(rx_buffers: u16) -> (crate::vmm::memory::GuestRam, ActiveQueues) {
        let r = ram();
        let qs = DESC
            .iter()
            .map(|&d| {
                let mut q = Queue::new(QUEUE_SIZE);
                q.size = 8;
                q.desc_table = d;
                q.avail_ring = d + 0x1000;
                q.used_ring = d + 0x2000;
                q.ready = true;
                q
            })
            .collect();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        let q = ActiveQueues {
            mem: r.mem.clone(),
            queues: qs,
            interrupt,
        };
        for i in 0..rx_buffers {
            put(
                &q,
                RX,
                i,
                0x40000 + 0x1000 * u64::from(i),
                0x1000,
                VIRTQ_DESC_F_WRITE,
            );
            publish(&q, RX, i, i + 1);
        }
        (r, q)
    }

    fn put(q: &ActiveQueues, which: usize, i: u16, addr: u64, len: u32, flags: u16) {
        let at = GuestAddress(DESC[which] + 16 * u64::from(i));
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        q.mem.write_slice(&d, at).unwrap();
    }

    fn publish(q: &ActiveQueues, which: usize, head: u16, idx: u16) {
        let avail = DESC[which] + 0x1000;
        let slot = u64::from((idx - 1) % 8);
        q.mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        q.mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
    }

    fn used_idx(q: &ActiveQueues, which: usize) -> u16 {
        q.mem
            .read_obj(GuestAddress(DESC[which] + 0x2000 + 2))
            .unwrap()
    }

    /// Puts a guest packet in tx slot `i` (published as the `idx`-th buffer).
    fn send(q: &ActiveQueues, i: u16, idx: u16, h: Header) {
        let at = 0x80000 + 0x1000 * u64::from(i);
        q.mem.write_slice(&h.to_bytes(), GuestAddress(at)).unwrap();
        put(q, TX, i, at, HDR_LEN as u32, 0);
        publish(q, TX, i, idx);
    }

    #[test]
    fn after_needs_reset_the_device_leaves_the_queues_alone() {
        let (mut b, _path) = backend("needs-reset");
        let (_ram, mut q) = queues(4);
        let now = Instant::now();
        // The avail index jumps far beyond the queue: the device gives up.
        q.mem
            .write_obj(200u16, GuestAddress(DESC[TX] + 0x1000 + 2))
            .unwrap();
        b.serve(&mut q, now);
        assert!(q.interrupt.needs_reset());
        // A well-formed packet is not taken any more.
        q.mem
            .write_obj(0u16, GuestAddress(DESC[TX] + 0x1000 + 2))
            .unwrap();
        send(&q, 0, 1, guest(OP_RW, 5, 6));
        assert_eq!(b.serve(&mut q, now), Served::default());
        assert_eq!(used_idx(&q, TX), 0);
        assert_eq!(used_idx(&q, RX), 0);
    }

    #[test]
    fn one_pass_takes_at_most_a_queue_of_packets() {
        let (mut b, _path) = backend("budget");
        let (_ram, mut q) = queues(0);
        let now = Instant::now();
        for i in 0..8 {
            send(&q, i, i + 1, guest(OP_RW, 5, 6));
        }
        let served = b.serve(&mut q, now);
        assert_eq!(used_idx(&q, TX), 8);
        assert!(served.more, "a full batch asks to be served again");
        // Packets for unknown connections are answered with resets, held for rx buffers.
        assert_eq!(b.pending_replies(), 8);
        assert!(!q.interrupt.needs_reset());
    }
}
