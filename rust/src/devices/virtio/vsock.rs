//! virtio-vsock with a user-space backend: guest stream sockets are relayed to Unix sockets on
//! the host (the Firecracker convention).
//!
//! * Host to guest: connect to the Unix socket at `path`, write `CONNECT <port>\n`; when the guest
//!   accepts on vsock port `<port>` the VMM answers `OK <host_port>\n` and from then on relays
//!   bytes both ways. If nothing listens in the guest, the Unix connection is closed without an
//!   answer.
//! * Guest to host: a guest connection to CID 2 port `P` is relayed to the Unix socket
//!   `<path>_<P>`; if nothing listens there the guest gets a reset.
//!
//! The guest CID is 3. One worker thread polls the host sockets and serves the queues; the
//! vCPU only kicks it. Everything the guest sends is checked: header fields, payload lengths,
//! credit (a guest that sends beyond the buffer space it was given loses the connection),
//! and the number of connections and queued replies is bounded.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::queue::{gather, Descriptor, Queue};
use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vmm::os_msg;

const VIRTIO_ID_VSOCK: u32 = 19;
pub const GUEST_CID: u64 = 3;
pub const HOST_CID: u64 = 2;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;
/// virtio_vsock_event id: the transport was reset; the driver drops its connections.
const EVENT_TRANSPORT_RESET: u32 = 0;

const HDR_LEN: usize = 44;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_SEND: u32 = 2;
const SHUTDOWN_BOTH: u32 = 3;

/// Largest payload the guest may put in one packet.
const MAX_PAYLOAD: u32 = 64 * 1024;
/// Receive buffer space advertised to the guest per connection.
const BUF_ALLOC: u32 = 256 * 1024;
const MAX_CONNECTIONS: usize = 1024;
const MAX_PENDING_REPLIES: usize = 1024;
const MAX_CONNECT_LINE: usize = 64;

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

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

#[derive(Default)]
struct SharedState {
    active: Option<Active>,
    /// Bumped on every reset, so the worker drops connections of the old driver.
    resets: u64,
    stop: bool,
    /// While set the worker leaves guest memory and the queues alone (snapshots).
    quiesced: bool,
    /// After a restore: the event queue's available index when the transport-reset event was
    /// sent, and when. Nothing goes to the guest until the index moves or a grace time passes.
    reset_wait: Option<(u16, std::time::Instant)>,
}

/// Longest wait for the driver to handle a transport-reset event.
const RESET_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The virtio-vsock device (the transport side); the worker thread does the relaying.
pub struct Vsock {
    path: PathBuf,
    shared: Arc<Mutex<SharedState>>,
    kick: Arc<EventFd>,
    worker: Option<JoinHandle<()>>,
}

impl Vsock {
    /// Listens on `path` (replacing a stale socket file, but never one something still listens
    /// on, such as another VM) and starts the worker.
    pub fn new(path: &Path) -> Result<Box<Self>, VsockError> {
        let listen_err = |e: std::io::Error| VsockError::Listen {
            path: path.display().to_string(),
            msg: os_msg(&e),
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(VsockError::InUse {
                        path: path.display().to_string(),
                    });
                }
                let _ = std::fs::remove_file(path);
            }
        }
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let kick =
            Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VsockError::Worker(os_msg(&e)))?);
        let shared = Arc::new(Mutex::new(SharedState::default()));
        let worker = Worker {
            path: path.to_path_buf(),
            listener,
            kick: kick.clone(),
            shared: shared.clone(),
            conns: HashMap::new(),
            pending_hosts: Vec::new(),
            replies: VecDeque::new(),
            next_port: 1 << 30,
            resets_seen: 0,
        };
        let handle = std::thread::Builder::new()
            .name("vsock".into())
            .spawn(move || worker.run())
            .map_err(|e| VsockError::Worker(os_msg(&e)))?;
        Ok(Box::new(Vsock {
            path: path.to_path_buf(),
            shared,
            kick,
            worker: Some(handle),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SharedState> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
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
        if queues.len() != 3 {
            return Err("virtio-vsock has three queues".into());
        }
        self.lock().active = Some(Active {
            mem,
            queues,
            interrupt,
        });
        let _ = self.kick.write(1);
        Ok(())
    }

    fn notify(&mut self, _index: u16) {
        let _ = self.kick.write(1);
    }

    fn reset(&mut self) {
        let mut g = self.lock();
        if g.active.take().is_some() {
            g.resets += 1;
        }
        drop(g);
        let _ = self.kick.write(1);
    }

    fn live_queues(&self) -> Option<Vec<Queue>> {
        self.lock().active.as_ref().map(|a| a.queues.clone())
    }

    fn set_quiesced(&mut self, quiesced: bool) {
        self.lock().quiesced = quiesced;
        let _ = self.kick.write(1);
    }

    /// Connections do not survive a snapshot: tell the driver with a transport-reset event so
    /// it drops the stale ones (listening sockets stay).
    fn restored(&mut self) {
        let mut g = self.lock();
        let Some(active) = g.active.as_mut() else {
            return;
        };
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let Active {
            mem,
            queues,
            interrupt,
        } = active;
        match queues[EVT].pop(mem) {
            Ok(Some(chain)) => {
                let written = scatter(mem, &chain.descs, &[&event]).unwrap_or(0);
                if queues[EVT].add_used(mem, chain.head, written).is_ok() {
                    interrupt.signal_used();
                    // Hold host connections back until the driver has handled the event (it
                    // then refills the event queue), or it would reset them as well.
                    if let Ok(idx) = queues[EVT].avail_idx(mem) {
                        g.reset_wait = Some((idx, std::time::Instant::now()));
                    }
                }
            }
            Ok(None) => {}
            Err(Ok(bad)) => {
                let _ = queues[EVT].add_used(mem, bad.head, 0);
                interrupt.signal_used();
            }
            Err(Err(_)) => interrupt.set_needs_reset(),
        }
        drop(g);
        let _ = self.kick.write(1);
    }

    fn shutdown(&mut self) {
        self.lock().stop = true;
        let _ = self.kick.write(1);
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        if self.worker.is_some() {
            self.shutdown();
        }
    }
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
    fn new(stream: UnixStream, state: ConnState) -> Self {
        Conn {
            stream,
            state,
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
}

/// (host port, guest port)
type Key = (u32, u32);

struct Worker {
    path: PathBuf,
    listener: UnixListener,
    kick: Arc<EventFd>,
    shared: Arc<Mutex<SharedState>>,
    conns: HashMap<Key, Conn>,
    /// Host connections that have not sent their CONNECT line yet.
    pending_hosts: Vec<(UnixStream, Vec<u8>)>,
    /// Packets (header only) waiting for room in the rx queue.
    replies: VecDeque<Header>,
    next_port: u32,
    resets_seen: u64,
}

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

/// Writes `parts` across the device-writable buffers of a chain; returns bytes written.
fn scatter(mem: &GuestMemoryMmap, descs: &[Descriptor], parts: &[&[u8]]) -> Option<u32> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let room: u64 = descs
        .iter()
        .filter(|d| d.is_write_only())
        .map(|d| u64::from(d.len))
        .sum();
    if (total as u64) > room || descs.iter().any(|d| !d.in_ram(mem)) {
        return None;
    }
    let mut bytes = parts.iter().flat_map(|p| p.iter().copied());
    let mut buf = Vec::new();
    for d in descs.iter().filter(|d| d.is_write_only()) {
        buf.clear();
        buf.extend(bytes.by_ref().take(d.len as usize));
        if buf.is_empty() {
            break;
        }
        mem.write_slice(&buf, GuestAddress(d.addr)).ok()?;
    }
    Some(total as u32)
}

impl Worker {
    fn run(mut self) {
        loop {
            let (stop, want_read) = self.service();
            if stop {
                return;
            }
            self.poll(&want_read);
        }
    }

    /// Serves the queues; returns whether to stop and which connections may be read from.
    fn service(&mut self) -> (bool, Vec<Key>) {
        let shared = self.shared.clone();
        let mut g = shared.lock().unwrap_or_else(|e| e.into_inner());
        if g.stop {
            return (true, Vec::new());
        }
        if g.resets != self.resets_seen {
            self.resets_seen = g.resets;
            self.conns.clear();
            self.replies.clear();
        }
        if g.quiesced {
            return (false, Vec::new());
        }
        let SharedState {
            active, reset_wait, ..
        } = &mut *g;
        let Some(active) = active.as_mut() else {
            return (false, Vec::new());
        };
        if let Some((idx, since)) = *reset_wait {
            let now = active.queues[EVT].avail_idx(&active.mem).unwrap_or(idx);
            if now == idx && since.elapsed() < RESET_GRACE {
                return (false, Vec::new());
            }
            *reset_wait = None;
        }
        let mut used = false;
        used |= self.process_tx(active);
        used |= self.send_replies(active);
        used |= self.relay_host_data(active);
        if used {
            active.interrupt.signal_used();
        }
        let rx_ready = active.queues[RX]
            .has_available(&active.mem)
            .unwrap_or(false);
        let want_read = if rx_ready {
            self.conns
                .iter()
                .filter(|(_, c)| c.state == ConnState::Established && c.peer_credit() > 0)
                .map(|(k, _)| *k)
                .collect()
        } else {
            Vec::new()
        };
        (false, want_read)
    }

    fn poll(&mut self, want_read: &[Key]) {
        let mut fds = vec![
            libc::pollfd {
                fd: self.kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        for (s, _) in &self.pending_hosts {
            fds.push(libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let first_conn = fds.len();
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in &keys {
            let c = &self.conns[k];
            let mut events = 0;
            if want_read.contains(k) {
                events |= libc::POLLIN;
            }
            if !c.host_out.is_empty() {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events,
                revents: 0,
            });
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 500) };
        if n <= 0 {
            return;
        }
        if fds[0].revents != 0 {
            let _ = self.kick.read();
        }
        // Only the hosts that were polled (accept below adds more).
        let ready: Vec<usize> = (0..first_conn - 2)
            .filter(|i| fds[2 + i].revents != 0)
            .collect();
        self.read_connect_lines(&ready);
        if fds[1].revents != 0 {
            self.accept();
        }
        for (i, k) in keys.iter().enumerate() {
            if fds[first_conn + i].revents & (libc::POLLOUT | libc::POLLERR) != 0 {
                self.flush_host(*k);
            }
        }
    }

    fn accept(&mut self) {
        while let Ok((s, _)) = self.listener.accept() {
            if self.pending_hosts.len() + self.conns.len() >= MAX_CONNECTIONS
                || s.set_nonblocking(true).is_err()
            {
                continue; // dropped: closed
            }
            self.pending_hosts.push((s, Vec::new()));
        }
    }

    fn read_connect_lines(&mut self, ready: &[usize]) {
        let mut done = Vec::new();
        for &i in ready {
            let (s, line) = &mut self.pending_hosts[i];
            let mut byte = [0u8; 1];
            let complete = loop {
                match s.read(&mut byte) {
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
            let (stream, line) = self.pending_hosts.swap_remove(i);
            let port = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| l.trim().strip_prefix("CONNECT "))
                .and_then(|p| p.trim().parse::<u32>().ok());
            match (ok, port) {
                (true, Some(port)) => {
                    let host_port = self.alloc_port(port);
                    let key = (host_port, port);
                    self.conns
                        .insert(key, Conn::new(stream, ConnState::Connecting));
                    self.queue_reply(reply(OP_REQUEST, key, 0));
                }
                _ => {
                    let mut stream = stream;
                    let _ = stream.write_all(b"ERR expected CONNECT <port>\n");
                }
            }
        }
    }

    fn alloc_port(&mut self, guest_port: u32) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.wrapping_add(1).max(1 << 30);
            if !self.conns.contains_key(&(p, guest_port)) {
                return p;
            }
        }
    }

    fn queue_reply(&mut self, h: Header) {
        if self.replies.len() < MAX_PENDING_REPLIES {
            self.replies.push_back(h);
        }
    }

    /// Guest-to-host packets. Returns whether used buffers were added.
    fn process_tx(&mut self, active: &mut Active) -> bool {
        let mem = active.mem.clone();
        let mut used = false;
        while self.replies.len() < MAX_PENDING_REPLIES {
            let chain = match active.queues[TX].pop(&mem) {
                Ok(None) => break,
                Ok(Some(c)) => c,
                Err(Ok(bad)) => {
                    let _ = active.queues[TX].add_used(&mem, bad.head, 0);
                    active.interrupt.set_needs_reset();
                    used = true;
                    continue;
                }
                Err(Err(_)) => {
                    active.interrupt.set_needs_reset();
                    break;
                }
            };
            let packet = Self::read_packet(&mem, &chain.descs);
            if active.queues[TX].add_used(&mem, chain.head, 0).is_err() {
                active.interrupt.set_needs_reset();
                break;
            }
            used = true;
            match packet {
                Some((h, payload)) => self.handle_packet(h, payload),
                None => active.interrupt.set_needs_reset(),
            }
        }
        used
    }

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

    fn handle_packet(&mut self, h: Header, payload: Vec<u8>) {
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
            self.guest_connect(key, &h);
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
                let line = format!("OK {}\n", key.0);
                conn.host_out.extend(line.as_bytes());
                conn.non_payload += line.len();
                self.flush_host(key);
            }
            OP_RW if conn.state == ConnState::Established => {
                if conn.host_out.len() + payload.len() > BUF_ALLOC as usize {
                    // The guest ignored the credit it was given.
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

    fn guest_connect(&mut self, key: Key, h: &Header) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            self.queue_reply(reply(OP_RST, key, 0));
            return;
        }
        let target = format!("{}_{}", self.path.display(), key.0);
        match UnixStream::connect(&target).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
            Ok(stream) => {
                let mut c = Conn::new(stream, ConnState::Established);
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = h.fwd_cnt;
                self.conns.insert(key, c);
                self.queue_reply(reply(OP_RESPONSE, key, 0));
            }
            Err(_) => self.queue_reply(reply(OP_RST, key, 0)),
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
            match c.stream.write(a) {
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
    fn send_replies(&mut self, active: &mut Active) -> bool {
        let mem = active.mem.clone();
        let mut used = false;
        while let Some(mut h) = self.replies.pop_front() {
            if let Some(c) = self.conns.get_mut(&(h.src_port, h.dst_port)) {
                h.fwd_cnt = c.fwd_cnt;
                c.last_fwd_cnt_sent = c.fwd_cnt;
            }
            match self.put_rx(active, &mem, h, &[]) {
                RxResult::Sent => used = true,
                RxResult::NoBuffer => {
                    self.replies.push_front(h);
                    break;
                }
                RxResult::Broken => {
                    used = true;
                    break;
                }
            }
        }
        used
    }

    /// Host-to-guest data of every connection with credit. Returns whether buffers were used.
    fn relay_host_data(&mut self, active: &mut Active) -> bool {
        let mem = active.mem.clone();
        let mut used = false;
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
                let chain = match active.queues[RX].pop(&mem) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => return used,
                    Err(Ok(bad)) => {
                        let _ = active.queues[RX].add_used(&mem, bad.head, 0);
                        active.interrupt.set_needs_reset();
                        return true;
                    }
                    Err(Err(_)) => {
                        active.interrupt.set_needs_reset();
                        return used;
                    }
                };
                let room: u64 = chain
                    .descs
                    .iter()
                    .filter(|d| d.is_write_only())
                    .map(|d| u64::from(d.len))
                    .sum();
                if room <= HDR_LEN as u64 {
                    let _ = active.queues[RX].add_used(&mem, chain.head, 0);
                    active.interrupt.set_needs_reset();
                    return true;
                }
                let n = (room - HDR_LEN as u64).min(u64::from(credit)) as usize;
                let mut buf = vec![0u8; n];
                let got = match c.stream.read(&mut buf) {
                    Ok(0) => {
                        // Host closed its side: tell the guest, wait for its RST.
                        active.queues[RX].undo_pop();
                        c.state = ConnState::Closing;
                        self.queue_reply(reply(OP_SHUTDOWN, key, SHUTDOWN_BOTH));
                        break;
                    }
                    Ok(got) => got,
                    Err(e)
                        if e.kind() == ErrorKind::WouldBlock
                            || e.kind() == ErrorKind::Interrupted =>
                    {
                        active.queues[RX].undo_pop();
                        break;
                    }
                    Err(_) => {
                        active.queues[RX].undo_pop();
                        self.close(key, true);
                        break;
                    }
                };
                let mut h = reply(OP_RW, key, 0);
                h.len = got as u32;
                h.fwd_cnt = c.fwd_cnt;
                c.last_fwd_cnt_sent = c.fwd_cnt;
                c.tx_cnt = c.tx_cnt.wrapping_add(got as u32);
                let bytes = h.to_bytes();
                match scatter(&mem, &chain.descs, &[&bytes, &buf[..got]]) {
                    Some(len) => {
                        if active.queues[RX].add_used(&mem, chain.head, len).is_err() {
                            active.interrupt.set_needs_reset();
                            return true;
                        }
                        used = true;
                    }
                    None => {
                        let _ = active.queues[RX].add_used(&mem, chain.head, 0);
                        active.interrupt.set_needs_reset();
                        return true;
                    }
                }
            }
        }
        used
    }

    fn put_rx(
        &mut self,
        active: &mut Active,
        mem: &GuestMemoryMmap,
        h: Header,
        payload: &[u8],
    ) -> RxResult {
        let chain = match active.queues[RX].pop(mem) {
            Ok(Some(c)) => c,
            Ok(None) => return RxResult::NoBuffer,
            Err(Ok(bad)) => {
                let _ = active.queues[RX].add_used(mem, bad.head, 0);
                active.interrupt.set_needs_reset();
                return RxResult::Broken;
            }
            Err(Err(_)) => {
                active.interrupt.set_needs_reset();
                return RxResult::Broken;
            }
        };
        let bytes = h.to_bytes();
        match scatter(mem, &chain.descs, &[&bytes, payload]) {
            Some(len) if active.queues[RX].add_used(mem, chain.head, len).is_ok() => RxResult::Sent,
            _ => {
                let _ = active.queues[RX].add_used(mem, chain.head, 0);
                active.interrupt.set_needs_reset();
                RxResult::Broken
            }
        }
    }
}

enum RxResult {
    Sent,
    NoBuffer,
    Broken,
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut c = Conn::new(a, ConnState::Established);
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
}
