//! virtio-net with a user-mode backend: Ethernet frames are relayed over a connected Unix stream
//! socket with QEMU's stream framing (a 4-byte big-endian length, then the frame), the interface
//! `passt` serves. No TAP device and no privilege is needed; the backend runs outside the VMM's
//! jail, in the host's network namespace, and the VMM only holds its end of a socket pair (no
//! socket path exists that another process could connect to first).
//!
//! Every frame the guest transmits goes through the VM's [`EgressFilter`] before it reaches the
//! backend, and every frame for the guest through it too (DNS answers teach it the addresses of
//! named hosts). A denied frame is counted and dropped; the guest cannot change the policy,
//! whatever it does to its own addresses, routes or MAC.
//!
//! Everything the guest sends is hostile input, and so is everything the backend sends (it talks
//! to the outside world): transmit chains must be device-readable only, hold a virtio-net header
//! without offloads (none are offered) and a frame of at most [`MAX_FRAME_LEN`] bytes; a frame
//! from the backend longer than that is dropped, a length beyond [`MAX_BACKEND_FRAME`] ends the
//! backend (the stream cannot be trusted to be in step any more). Bytes held in each direction
//! are bounded ([`MAX_PENDING_OUT`], [`MAX_PENDING_IN`]): when the backend is slow the device stops
//! taking transmit buffers, when the guest gives no receive buffers it stops reading the socket,
//! so back-pressure reaches the sender instead of host memory. Each pass handles at most a
//! queue's worth of buffers in each direction, and the worker never blocks on the socket.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::device_thread::{self, ActiveQueues, DeviceThread, Shared};
use super::queue::{gather, scatter, Descriptor, Queue};
use super::{pop_chain, Interrupt, Popped, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::rate_limiter::{Decision, RateLimit, RateLimitError, RateLimiter};
use crate::net::{EgressFilter, EgressPolicy, FilterCounters, Verdict};
use crate::vmm::os_msg;

const VIRTIO_ID_NET: u32 = 1;
/// The device has a MAC address in its configuration space.
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The device states the largest MTU the driver may use.
const VIRTIO_NET_F_MTU: u64 = 1 << 3;
const QUEUE_SIZE: u16 = 256;
pub const RX: usize = 0;
pub const TX: usize = 1;

/// The MTU the guest is given (and held to: it is the driver's maximum).
pub const MTU: u16 = 1500;
/// The virtio-net header in front of every frame (virtio 1.x: always the 12-byte form).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame either side may pass through: an MTU-sized packet behind an Ethernet header
/// with one VLAN tag.
pub const MAX_FRAME_LEN: usize = 14 + 4 + MTU as usize;
/// Smallest frame: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;
/// Longest frame length the backend may announce. Longer is not a frame but a stream out of
/// step (or a hostile backend), and ends the connection.
pub const MAX_BACKEND_FRAME: usize = 65_550;
/// Most bytes (framed) held for the backend while it does not read; beyond it the device
/// leaves the guest's transmit buffers where they are.
pub const MAX_PENDING_OUT: usize = 256 * 1024;
/// Most bytes read from the backend and not yet given to the guest; beyond it the socket is not
/// read until the guest offers receive buffers.
pub const MAX_PENDING_IN: usize = 2 * (4 + MAX_BACKEND_FRAME);
/// The worker wakes at least this often, to notice a stop even if a kick were lost.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the network backend's socket is unusable: {0}")]
    Backend(String),
    #[error("cannot start the network device's worker: {0}")]
    Worker(String),
    #[error("the network rate limit is invalid: {0}")]
    RateLimit(#[from] RateLimitError),
}

/// Rate limits of one network card, per direction (none: unlimited). Each frame is one
/// operation and its length in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRateLimit {
    /// Frames the guest sends.
    #[serde(default)]
    pub tx: Option<RateLimit>,
    /// Frames the guest receives.
    #[serde(default)]
    pub rx: Option<RateLimit>,
}

/// What the device counted since it was built: the filter's verdicts and what the relay itself
/// had to drop.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    pub filter: FilterCounters,
    /// Transmit chains that were not a well-formed frame (wrong descriptor kinds, a header
    /// with offloads, a frame too short or too long).
    pub tx_malformed: u64,
    /// Frames the guest sent after the backend had gone.
    pub tx_backend_gone: u64,
    /// Frames from the backend longer than [`MAX_FRAME_LEN`].
    pub rx_oversized: u64,
    /// Frames from the backend the guest's receive buffer could not hold.
    pub rx_no_room: u64,
    /// Whether the backend connection is still up.
    pub backend_connected: bool,
}

/// The virtio-net device (the transport side); the worker thread relays the frames. What it
/// shares with the worker besides the queues: the counters, as of the worker's last pass.
pub struct Net {
    mac: [u8; 6],
    thread: DeviceThread<NetCounters>,
}

/// Takes a copy of the backend socket `fd` (a connected Unix stream socket the caller keeps
/// owning), refusing anything else: a file or a listening socket in its place would be read as
/// frames or block the device.
pub fn adopt_backend(fd: RawFd) -> Result<UnixStream, NetError> {
    let unusable = |msg: String| NetError::Backend(msg);
    // SAFETY: F_DUPFD_CLOEXEC takes no pointers; the result is checked before use.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(unusable(os_msg(&std::io::Error::last_os_error())));
    }
    // SAFETY: `dup` is a descriptor just made here and owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(dup) };
    let int_opt = |opt: libc::c_int| -> std::io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are valid for writes of the sizes given, for the whole call.
        let r = unsafe {
            libc::getsockopt(
                owned.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(v)
        }
    };
    let domain =
        int_opt(libc::SO_DOMAIN).map_err(|e| unusable(format!("not a socket ({})", os_msg(&e))))?;
    let kind = int_opt(libc::SO_TYPE).map_err(|e| unusable(os_msg(&e)))?;
    let listening = int_opt(libc::SO_ACCEPTCONN).map_err(|e| unusable(os_msg(&e)))?;
    if domain != libc::AF_UNIX || kind != libc::SOCK_STREAM || listening != 0 {
        return Err(unusable("it is not a connected Unix stream socket".into()));
    }
    Ok(UnixStream::from(owned))
}

impl Net {
    /// Relays to the backend connected at `backend_fd` (a copy is taken) and starts the worker.
    pub fn new(
        backend_fd: RawFd,
        mac: [u8; 6],
        policy: EgressPolicy,
        limits: NetRateLimit,
    ) -> Result<Box<Self>, NetError> {
        let stream = adopt_backend(backend_fd)?;
        let mut backend = NetBackend::new(stream, policy, limits, Instant::now())?;
        backend.announce(mac);
        let counters = backend.counters();
        let thread = DeviceThread::spawn("net", counters, move |kick, shared| {
            Worker {
                backend,
                kick,
                shared,
            }
            .run()
        })
        .map_err(|e| NetError::Worker(os_msg(&e)))?;
        Ok(Box::new(Net { mac, thread }))
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU
    }

    /// `mac[6]`, `status` (unused: no VIRTIO_NET_F_STATUS), `max_virtqueue_pairs`, `mtu`.
    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[10..12].copy_from_slice(&MTU.to_le_bytes());
        data.copy_from_slice(&cfg[offset..offset + data.len()]);
    }

    fn config_len(&self) -> usize {
        12
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), String> {
        self.thread
            .activate(mem, queues, interrupt, 2, "virtio-net")
    }

    fn notify(&mut self, _index: u16) {
        self.thread.kick();
    }

    fn reset(&mut self) {
        self.thread.deactivate();
    }

    fn live_queues(&self) -> Option<Vec<Queue>> {
        self.thread.live_queues()
    }

    fn set_quiesced(&mut self, quiesced: bool) {
        self.thread.set_quiesced(quiesced);
    }

    fn net_counters(&self) -> Option<NetCounters> {
        Some(self.thread.lock().extra.clone())
    }

    fn shutdown(&mut self) {
        self.thread.stop();
    }
}

/// The worker thread: serves the queues under the shared lock, then waits for the socket (and
/// the kick eventfd) without it.
struct Worker {
    backend: NetBackend,
    kick: Arc<EventFd>,
    shared: Arc<Mutex<Shared<NetCounters>>>,
}

impl Worker {
    fn run(mut self) {
        loop {
            let Some(served) = self.service(Instant::now()) else {
                return;
            };
            let timeout = match served.wake_at {
                _ if served.more => Duration::ZERO,
                Some(t) => t
                    .saturating_duration_since(Instant::now())
                    .min(POLL_INTERVAL),
                None => POLL_INTERVAL,
            };
            self.backend.poll(Some(&self.kick), timeout);
        }
    }

    /// One pass over the queues; `None` when the worker must stop.
    fn service(&mut self, now: Instant) -> Option<Served> {
        let shared = self.shared.clone();
        let mut g = device_thread::lock(&shared);
        if g.stop {
            return None;
        }
        let served = match (g.quiesced, g.active.as_mut()) {
            (false, Some(active)) => self.backend.serve(active, now),
            _ => Served::default(),
        };
        if self.backend.counters_changed {
            g.extra = self.backend.counters();
            self.backend.counters_changed = false;
        }
        Some(served)
    }
}

/// What one pass over the queues left behind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    /// A pass stopped at its budget with work left: serve again without waiting.
    pub more: bool,
    /// A rate limit holds frames back until then.
    pub wake_at: Option<Instant>,
}

/// A transmit chain read from the guest, or why it is not a frame.
enum TxFrame {
    Frame(Vec<u8>),
    Malformed,
}

/// The relay between the queues and the backend socket, with the VM's filter and rate limits.
/// It runs on whatever thread calls it: the device's worker, or a test or fuzzer that steps it
/// with [`NetBackend::serve`] and [`NetBackend::poll`] (timeout zero).
pub struct NetBackend {
    stream: Option<UnixStream>,
    filter: EgressFilter,
    tx_limit: Option<RateLimiter>,
    rx_limit: Option<RateLimiter>,
    /// Framed bytes for the backend; `out_sent` of them are already written.
    out: Vec<u8>,
    out_sent: usize,
    /// Bytes read from the backend; `in_taken` of them are consumed frames.
    inbuf: Vec<u8>,
    in_taken: usize,
    counters: NetCounters,
    counters_changed: bool,
}

impl NetBackend {
    /// A relay over `stream` (made non-blocking here) with full rate-limit buckets at `now`.
    pub fn new(
        stream: UnixStream,
        policy: EgressPolicy,
        limits: NetRateLimit,
        now: Instant,
    ) -> Result<Self, NetError> {
        stream
            .set_nonblocking(true)
            .map_err(|e| NetError::Worker(os_msg(&e)))?;
        let limiter = |l: Option<RateLimit>| l.map(|l| RateLimiter::new(&l, now)).transpose();
        Ok(NetBackend {
            stream: Some(stream),
            filter: EgressFilter::new(policy),
            tx_limit: limiter(limits.tx)?,
            rx_limit: limiter(limits.rx)?,
            out: Vec::new(),
            out_sent: 0,
            inbuf: Vec::new(),
            in_taken: 0,
            counters: NetCounters {
                backend_connected: true,
                ..NetCounters::default()
            },
            counters_changed: true,
        })
    }

    /// Tells the backend the guest's MAC address before the guest says anything: an ARP probe
    /// (sender address 0.0.0.0) from `mac`. passt learns the guest's address from the frames
    /// it sends, and until then cannot deliver a connection made to a published port to a
    /// guest that has not spoken yet (or to a clone whose MAC is new).
    pub fn announce(&mut self, mac: [u8; 6]) {
        let mut frame = Vec::with_capacity(42);
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&[0x08, 0x06]); // ARP
        frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&[0; 4]); // probe: no sender address yet
        frame.extend_from_slice(&[0; 6]);
        frame.extend_from_slice(&[0; 4]);
        self.out
            .extend_from_slice(&(frame.len() as u32).to_be_bytes());
        self.out.extend_from_slice(&frame);
        self.flush_out();
    }

    pub fn counters(&self) -> NetCounters {
        NetCounters {
            filter: self.filter.counters(),
            ..self.counters.clone()
        }
    }

    /// Bytes held for the backend and from it (both bounded).
    pub fn pending(&self) -> (usize, usize) {
        (
            self.out.len() - self.out_sent,
            self.inbuf.len() - self.in_taken,
        )
    }

    /// One pass: frames from the backend to the guest's receive buffers, the guest's frames to
    /// the backend, each direction at most a queue's worth.
    pub fn serve(&mut self, q: &mut ActiveQueues, now: Instant) -> Served {
        let mut served = Served::default();
        self.fill_in();
        let (rx_used, rx_more, rx_wait) = self.deliver_rx(q, now);
        let (tx_used, tx_more, tx_wait) = self.take_tx(q, now);
        self.flush_out();
        if rx_used || tx_used {
            q.interrupt.signal_used();
            self.counters_changed = true;
        }
        served.more = rx_more || tx_more;
        served.wake_at = match (rx_wait, tx_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        served
    }

    /// Waits up to `timeout` for the socket (readable while there is room to read into,
    /// writable while bytes wait for it) or `kick`. Returns whether the kick fired. Hang-ups and
    /// errors end the backend, so a dead socket never makes poll return at once over and over.
    pub fn poll(&mut self, kick: Option<&EventFd>, timeout: Duration) -> bool {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(2);
        let pollfd = |fd: RawFd, events: libc::c_short| libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        if let Some(kick) = kick {
            fds.push(pollfd(kick.as_raw_fd(), libc::POLLIN));
        }
        let stream_at = self.stream.as_ref().map(|s| {
            let mut events = 0;
            if self.inbuf.len() - self.in_taken < MAX_PENDING_IN {
                events |= libc::POLLIN;
            }
            if self.out_sent < self.out.len() {
                events |= libc::POLLOUT;
            }
            fds.push(pollfd(s.as_raw_fd(), events));
            fds.len() - 1
        });
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n <= 0 {
            return false;
        }
        let kicked = kick.is_some_and(|k| fds[0].revents != 0 && k.read().is_ok());
        if let Some(i) = stream_at {
            let revents = fds[i].revents;
            if revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                self.backend_gone();
            } else if revents & libc::POLLHUP != 0 {
                // What it sent before hanging up is still delivered.
                self.fill_in();
                self.backend_gone();
            } else if revents & libc::POLLOUT != 0 {
                self.flush_out();
            }
        }
        kicked
    }

    fn backend_gone(&mut self) {
        if self.stream.take().is_some() {
            self.counters.backend_connected = false;
            self.counters_changed = true;
            self.out.clear();
            self.out_sent = 0;
        }
    }

    /// Reads what the backend has, up to [`MAX_PENDING_IN`] held bytes.
    fn fill_in(&mut self) {
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        if self.in_taken > 0 && self.in_taken * 2 >= self.inbuf.len() {
            self.inbuf.drain(..self.in_taken);
            self.in_taken = 0;
        }
        let mut chunk = [0u8; 16 * 1024];
        let mut gone = false;
        while self.inbuf.len() - self.in_taken < MAX_PENDING_IN {
            let room = (MAX_PENDING_IN - (self.inbuf.len() - self.in_taken)).min(chunk.len());
            match stream.read(&mut chunk[..room]) {
                Ok(0) => {
                    gone = true;
                    break;
                }
                Ok(n) => self.inbuf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    gone = true;
                    break;
                }
            }
        }
        if gone {
            self.backend_gone();
        }
    }

    /// Writes what is held for the backend, as far as it takes it.
    fn flush_out(&mut self) {
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        let mut gone = false;
        while self.out_sent < self.out.len() {
            match stream.write(&self.out[self.out_sent..]) {
                Ok(0) => {
                    gone = true;
                    break;
                }
                Ok(n) => self.out_sent += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    gone = true;
                    break;
                }
            }
        }
        if self.out_sent == self.out.len() {
            self.out.clear();
            self.out_sent = 0;
        } else if self.out_sent >= self.out.len() - self.out_sent {
            // A backend that reads just behind the guest never empties the buffer: drop what
            // it took, or the buffer would grow with all the traffic, not with what is held.
            self.out.drain(..self.out_sent);
            self.out_sent = 0;
        }
        if gone {
            self.backend_gone();
        }
    }

    /// Frames from the backend into the guest's receive buffers. Returns (chains used, budget
    /// reached with work left, rate-limit wake time). The rate limit counts every frame offered
    /// to the guest, before the filter looks at it.
    fn deliver_rx(&mut self, q: &mut ActiveQueues, now: Instant) -> (bool, bool, Option<Instant>) {
        let mut used = false;
        for _ in 0..QUEUE_SIZE {
            let (consumed, range) = match next_frame(&self.inbuf[self.in_taken..]) {
                Ok(Some(f)) => f,
                Ok(None) => return (used, false, None),
                Err(()) => {
                    // Out of step: nothing after this can be trusted to be a frame.
                    self.inbuf.clear();
                    self.in_taken = 0;
                    self.backend_gone();
                    return (used, false, None);
                }
            };
            let frame_len = range.len();
            if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&frame_len) {
                self.counters.rx_oversized += 1;
                self.in_taken += consumed;
                self.counters_changed = true;
                continue;
            }
            let chain = match pop(q, RX) {
                Popped::Chain(c) => c,
                Popped::Empty => return (used, false, None),
                Popped::Broken => return (true, false, None),
            };
            if let Some(l) = self.rx_limit.as_mut() {
                if let Decision::Wait(d) = l.consume(frame_len as u64, now) {
                    q.queues[RX].undo_pop();
                    return (used, false, Some(now + d));
                }
            }
            let start = self.in_taken + range.start;
            let frame = &self.inbuf[start..start + frame_len];
            self.in_taken += consumed;
            self.counters_changed = true;
            if let Verdict::Drop(_) = self.filter.inbound(frame, now) {
                q.queues[RX].undo_pop();
                continue;
            }
            let mut hdr = [0u8; VNET_HDR_LEN];
            // num_buffers: always 1 without VIRTIO_NET_F_MRG_RXBUF.
            hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
            let written = scatter(&q.mem, &chain.descs, &[&hdr, frame]).unwrap_or_else(|| {
                self.counters.rx_no_room += 1;
                0
            });
            if q.queues[RX].add_used(&q.mem, chain.head, written).is_err() {
                q.interrupt.set_needs_reset();
                return (true, false, None);
            }
            used = true;
        }
        let more = matches!(next_frame(&self.inbuf[self.in_taken..]), Ok(Some(_)));
        (used, more, None)
    }

    /// The guest's frames through the filter to the backend. Returns (chains used, budget
    /// reached with work left, rate-limit wake time).
    fn take_tx(&mut self, q: &mut ActiveQueues, now: Instant) -> (bool, bool, Option<Instant>) {
        let mut used = false;
        for _ in 0..QUEUE_SIZE {
            if self.out.len() - self.out_sent >= MAX_PENDING_OUT {
                // The backend is behind: the guest's buffers wait in its queue.
                return (used, false, None);
            }
            let chain = match pop(q, TX) {
                Popped::Chain(c) => c,
                Popped::Empty => return (used, false, None),
                Popped::Broken => return (true, false, None),
            };
            match read_tx(&q.mem, &chain.descs) {
                TxFrame::Malformed => self.counters.tx_malformed += 1,
                TxFrame::Frame(frame) => {
                    if let Some(l) = self.tx_limit.as_mut() {
                        if let Decision::Wait(d) = l.consume(frame.len() as u64, now) {
                            q.queues[TX].undo_pop();
                            return (used, false, Some(now + d));
                        }
                    }
                    if let Verdict::Pass = self.filter.outbound(&frame, now) {
                        if self.stream.is_some() {
                            self.out
                                .extend_from_slice(&(frame.len() as u32).to_be_bytes());
                            self.out.extend_from_slice(&frame);
                        } else {
                            self.counters.tx_backend_gone += 1;
                        }
                    }
                }
            }
            if q.queues[TX].add_used(&q.mem, chain.head, 0).is_err() {
                q.interrupt.set_needs_reset();
                return (true, false, None);
            }
            used = true;
        }
        let more = q.queues[TX].has_available(&q.mem).unwrap_or(false);
        (used, more, None)
    }
}

/// The next complete frame at the front of `held`: the bytes it takes (length prefix
/// included) and where the frame lies. `Ok(None)` when more bytes are needed, `Err(())` when the
/// stream announces a length no frame can have.
fn next_frame(held: &[u8]) -> Result<Option<(usize, std::ops::Range<usize>)>, ()> {
    let Some(len_bytes) = held.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
    if len == 0 || len > MAX_BACKEND_FRAME {
        return Err(());
    }
    Ok((held.len() >= 4 + len).then_some((4 + len, 4..4 + len)))
}

/// Reads a transmit chain: device-readable buffers only, a virtio-net header without
/// offloads, then a frame of [`MIN_FRAME_LEN`] to [`MAX_FRAME_LEN`] bytes.
fn read_tx(mem: &GuestMemoryMmap, descs: &[Descriptor]) -> TxFrame {
    if descs.iter().any(|d| d.is_write_only() || !d.in_ram(mem)) {
        return TxFrame::Malformed;
    }
    let total: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
    let Some(frame_len) = total.checked_sub(VNET_HDR_LEN as u64) else {
        return TxFrame::Malformed;
    };
    if !(MIN_FRAME_LEN as u64..=MAX_FRAME_LEN as u64).contains(&frame_len) {
        return TxFrame::Malformed;
    }
    let mut hdr = [0u8; VNET_HDR_LEN];
    if gather(mem, descs, 0, &mut hdr).is_err() {
        return TxFrame::Malformed;
    }
    // flags (checksum needed/valid) and gso_type: no offload was offered, so none may be asked.
    if hdr[0] != 0 || hdr[1] != 0 {
        return TxFrame::Malformed;
    }
    let mut frame = vec![0u8; frame_len as usize];
    if gather(mem, descs, VNET_HDR_LEN as u64, &mut frame).is_err() {
        return TxFrame::Malformed;
    }
    TxFrame::Frame(frame)
}

fn pop(q: &mut ActiveQueues, which: usize) -> Popped {
    pop_chain(&mut q.queues[which], &q.mem, &q.interrupt)
}
