//! virtio-net through its public interface, with everything on the guest's and the backend's
//! side hostile.
//!
//! Most tests step the relay ([`NetBackend`]) on the test's thread: the guest is guest memory
//! with rings written by hand, the backend is the other end of a real `UnixStream::pair()`
//! speaking passt's stream framing (a 4-byte big-endian length, then the Ethernet frame). The
//! last ones run the device with its worker thread, and [`adopt_backend`] on real descriptors.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use supermachine_core::devices::rate_limiter::RateLimit;
use supermachine_core::devices::virtio::device_thread::ActiveQueues;
use supermachine_core::devices::virtio::net::{
    adopt_backend, Net, NetBackend, NetRateLimit, Served, MAX_BACKEND_FRAME, MAX_FRAME_LEN,
    MAX_PENDING_IN, MAX_PENDING_OUT, MIN_FRAME_LEN, RX, TX, VNET_HDR_LEN,
};
use supermachine_core::devices::virtio::queue::{
    Queue, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use supermachine_core::devices::virtio::{Interrupt, VirtioDevice};
use supermachine_core::net::{Action, EgressPolicy, Rule, BUILTIN_DENY};
use supermachine_core::vmm::memory::{GuestRam, MemoryBacking};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// ---- Heap use per thread -------------------------------------------------------------------

thread_local! {
    /// Bytes this thread has allocated and not freed (frees of other threads' blocks make it
    /// drift down, which only makes a bound on it stricter), and the most it reached.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    // `try_with`: the allocator also runs while thread-locals are torn down.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

/// Counts each thread's heap use, so a test can bound what the relay holds on to (what it
/// reports as pending says nothing about the buffers behind it) while other tests run.
struct PerThread;

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping only
// touches const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for PerThread {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is the system allocator's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(new_size as isize - layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize));
    }
}

#[global_allocator]
static ALLOCATOR: PerThread = PerThread;

/// Runs `f` and returns its result with the most heap this thread held above where it started.
fn peak_heap<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, usize::try_from(peak - start).unwrap_or(0))
}

// ---- The guest -----------------------------------------------------------------------------

const QSIZE: u16 = 256;
const RAM_MIB: u64 = 4;
const RAM_END: u64 = RAM_MIB << 20;
/// Descriptor tables of the rx and tx queues; each queue's rings follow its table.
const DESC: [u64; 2] = [0x10000, 0x20000];
const AVAIL_OFF: u64 = 0x1000;
const USED_OFF: u64 = 0x2000;
/// Descriptor `i` of a queue points at `BUFS[queue] + BUF_SPACING * i` by default.
const BUFS: [u64; 2] = [0x100000, 0x200000];
const BUF_SPACING: u64 = 0x800;
/// What the guest writes into receive buffers before offering them: anything the device did
/// not write shows.
const POISON: u8 = 0xa5;

fn queue(which: usize) -> Queue {
    let mut q = Queue::new(QSIZE);
    q.size = QSIZE;
    q.desc_table = DESC[which];
    q.avail_ring = DESC[which] + AVAIL_OFF;
    q.used_ring = DESC[which] + USED_OFF;
    q.ready = true;
    q
}

/// A driver written by hand: it lays out descriptors, publishes chains and reads the used
/// rings, like the guest kernel would (or would not).
struct Guest {
    _ram: GuestRam,
    q: ActiveQueues,
    /// Chains published per queue (the available index).
    avail: [u16; 2],
    /// Used elements already taken per queue.
    seen: [u16; 2],
}

impl Guest {
    fn new() -> Self {
        let ram = GuestRam::new(RAM_MIB, &MemoryBacking::Memfd).expect("guest RAM");
        let q = ActiveQueues {
            mem: ram.mem.clone(),
            queues: vec![queue(RX), queue(TX)],
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        };
        Guest {
            _ram: ram,
            q,
            avail: [0; 2],
            seen: [0; 2],
        }
    }

    fn mem(&self) -> &GuestMemoryMmap {
        &self.q.mem
    }

    fn buf(which: usize, i: u16) -> u64 {
        BUFS[which] + BUF_SPACING * u64::from(i)
    }

    fn desc(&self, which: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem()
            .write_slice(&d, GuestAddress(DESC[which] + 16 * u64::from(i)))
            .unwrap();
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem().write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem().read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn set_avail_idx(&self, which: usize, idx: u16) {
        self.mem()
            .write_obj(idx, GuestAddress(DESC[which] + AVAIL_OFF + 2))
            .unwrap();
    }

    /// Makes the chain starting at descriptor `head` available.
    fn publish(&mut self, which: usize, head: u16) {
        let slot = u64::from(self.avail[which] % QSIZE);
        self.mem()
            .write_obj(head, GuestAddress(DESC[which] + AVAIL_OFF + 4 + 2 * slot))
            .unwrap();
        self.avail[which] = self.avail[which].wrapping_add(1);
        self.set_avail_idx(which, self.avail[which]);
    }

    fn used_idx(&self, which: usize) -> u16 {
        self.mem()
            .read_obj(GuestAddress(DESC[which] + USED_OFF + 2))
            .unwrap()
    }

    /// Chains published and not yet returned.
    fn in_flight(&self, which: usize) -> u16 {
        self.avail[which].wrapping_sub(self.used_idx(which))
    }

    /// The used elements (id, length) returned since the last call.
    fn take_used(&mut self, which: usize) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        while self.seen[which] != self.used_idx(which) {
            let at = DESC[which] + USED_OFF + 4 + 8 * u64::from(self.seen[which] % QSIZE);
            let id: u32 = self.mem().read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem().read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.seen[which] = self.seen[which].wrapping_add(1);
        }
        out
    }

    /// Sends `hdr` and `frame` in one descriptor, the next in line; returns its index.
    fn send(&mut self, hdr: &[u8; VNET_HDR_LEN], frame: &[u8]) -> u16 {
        let i = self.avail[TX] % QSIZE;
        let addr = Self::buf(TX, i);
        let mut bytes = hdr.to_vec();
        bytes.extend_from_slice(frame);
        assert!(bytes.len() as u64 <= BUF_SPACING);
        self.write(addr, &bytes);
        self.desc(TX, i, addr, bytes.len() as u32, 0, 0);
        self.publish(TX, i);
        i
    }

    fn send_frame(&mut self, frame: &[u8]) -> u16 {
        self.send(&[0; VNET_HDR_LEN], frame)
    }

    /// Offers a receive buffer of `len` bytes (poisoned), the next in line; returns its index.
    fn rx_buffer(&mut self, len: u32) -> u16 {
        let i = self.avail[RX] % QSIZE;
        let addr = Self::buf(RX, i);
        self.write(addr, &vec![POISON; BUF_SPACING as usize]);
        self.desc(RX, i, addr, len, VIRTQ_DESC_F_WRITE, 0);
        self.publish(RX, i);
        i
    }

    /// The `len` bytes the device wrote into the one-descriptor receive buffer `i`.
    fn rx_bytes(&self, i: u32, len: u32) -> Vec<u8> {
        self.read(Self::buf(RX, i as u16), len as usize)
    }

    /// Whether the interrupt was raised since the last call.
    fn irq_fired(&self) -> bool {
        self.q.interrupt.eventfd().read().is_ok()
    }

    fn needs_reset(&self) -> bool {
        self.q.interrupt.needs_reset()
    }

    /// Every chain the device took from a queue went back to the driver.
    fn assert_all_returned(&self) {
        for (which, q) in self.q.queues.iter().enumerate() {
            let s = q.state();
            assert_eq!(
                s.next_used, s.next_avail,
                "queue {which}: chains taken and not returned"
            );
        }
    }
}

// ---- The backend (passt's end) -------------------------------------------------------------

/// The backend's end of the socket pair. Reads never wait.
struct Passt {
    s: UnixStream,
    /// Bytes read and not yet a whole frame.
    partial: Vec<u8>,
}

impl Passt {
    fn framed(frame: &[u8]) -> Vec<u8> {
        let mut v = (frame.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(frame);
        v
    }

    /// Writes bytes the socket has room for (the tests keep them small).
    fn raw(&mut self, bytes: &[u8]) {
        self.s
            .write_all(bytes)
            .expect("the socket takes a small write");
    }

    fn send(&mut self, frame: &[u8]) {
        self.raw(&Self::framed(frame));
    }

    /// Everything the device wrote so far.
    fn read_raw(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match self.s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading the backend socket: {e}"),
            }
        }
        out
    }

    /// At most `max` bytes of what the device wrote, as whole frames (the rest is kept).
    fn frames_upto(&mut self, max: usize) -> Vec<Vec<u8>> {
        let mut chunk = vec![0u8; max.min(1 << 20)];
        let mut got = 0;
        while got < max {
            let room = (max - got).min(chunk.len());
            match self.s.read(&mut chunk[..room]) {
                Ok(0) => break,
                Ok(n) => {
                    self.partial.extend_from_slice(&chunk[..n]);
                    got += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("reading the backend socket: {e}"),
            }
        }
        let mut frames = Vec::new();
        let mut at = 0;
        while let Some(len) = self.partial.get(at..at + 4) {
            let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
            assert!(
                (MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len),
                "the device framed {len} bytes"
            );
            if self.partial.len() < at + 4 + len {
                break;
            }
            frames.push(self.partial[at + 4..at + 4 + len].to_vec());
            at += 4 + len;
        }
        self.partial.drain(..at);
        frames
    }

    fn frames(&mut self) -> Vec<Vec<u8>> {
        self.frames_upto(usize::MAX)
    }

    /// Whether the device closed its end (end of file, nothing left unread).
    fn device_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0))
    }
}

/// Gives a socket a fixed send buffer, so that when writes stop being taken does not depend on
/// the host's defaults.
fn fixed_send_buffer(s: &UnixStream) {
    let size: libc::c_int = 32 * 1024;
    // SAFETY: `size` is a valid c_int for the whole call and its length is passed with it.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
}

fn relay_at(policy: EgressPolicy, limits: NetRateLimit, now: Instant) -> (NetBackend, Passt) {
    let (device_end, passt_end) = UnixStream::pair().unwrap();
    fixed_send_buffer(&device_end);
    fixed_send_buffer(&passt_end);
    passt_end.set_nonblocking(true).unwrap();
    let backend = NetBackend::new(device_end, policy, limits, now).unwrap();
    (
        backend,
        Passt {
            s: passt_end,
            partial: Vec::new(),
        },
    )
}

fn relay() -> (NetBackend, Passt) {
    relay_at(
        EgressPolicy::default(),
        NetRateLimit::default(),
        Instant::now(),
    )
}

/// What the worker does once: a poll that does not wait, then a pass over the queues.
fn step(b: &mut NetBackend, g: &mut Guest, now: Instant) -> Served {
    b.poll(None, Duration::ZERO);
    b.serve(&mut g.q, now)
}

fn steps(b: &mut NetBackend, g: &mut Guest, n: usize) {
    let now = Instant::now();
    for _ in 0..n {
        step(b, g, now);
    }
}

// ---- Frames --------------------------------------------------------------------------------

const GUEST_IP: [u8; 4] = [10, 0, 2, 15];
const PUBLIC: [u8; 4] = [93, 184, 216, 34];

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x52, 0x56, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 0x0f];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4/UDP frame from the guest to `dst`, whose payload starts with `seq` (so frames can be
/// told apart) and is `len` bytes long (at least 4).
fn udp(dst: [u8; 4], seq: u32, len: usize) -> Vec<u8> {
    udp_from(GUEST_IP, dst, seq, len)
}

fn udp_from(src: [u8; 4], dst: [u8; 4], seq: u32, len: usize) -> Vec<u8> {
    let len = len.max(4);
    let total = 20 + 8 + len;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    ip.extend_from_slice(&40000u16.to_be_bytes());
    ip.extend_from_slice(&9999u16.to_be_bytes());
    ip.extend_from_slice(&((8 + len) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0]);
    ip.extend_from_slice(&seq.to_be_bytes());
    ip.extend((4..len).map(|i| i as u8));
    eth(0x0800, &ip)
}

/// A frame for the guest (from the outside world).
fn inbound(seq: u32, len: usize) -> Vec<u8> {
    udp_from(PUBLIC, GUEST_IP, seq, len)
}

/// A UDP frame of exactly `frame_len` bytes (Ethernet padding after the IP packet).
fn udp_of_len(dst: [u8; 4], frame_len: usize) -> Vec<u8> {
    let mut f = udp(dst, 7, 4);
    f.resize(frame_len, 0);
    f
}

fn ipv6_frame() -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0, 0, 8, 17, 64];
    ip.extend_from_slice(&[0xfe, 0x80]);
    ip.extend_from_slice(&[0; 14]);
    ip.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
    ip.extend_from_slice(&[0; 11]);
    ip.push(1);
    ip.extend_from_slice(&[0x9c, 0x40, 0x27, 0x0f, 0, 8, 0, 0]);
    eth(0x86dd, &ip)
}

fn builtin(addr: [u8; 4]) -> usize {
    BUILTIN_DENY
        .iter()
        .position(|(_, c)| c.contains(Ipv4Addr::from(addr)))
        .expect("a builtin range")
}

fn rule(action: Action, target: &str) -> Rule {
    Rule {
        action,
        target: target.parse().unwrap(),
    }
}

// ---- The two ways through ------------------------------------------------------------------

#[test]
fn a_guest_frame_reaches_the_backend_framed_exactly() {
    let (mut b, mut p) = relay();
    let mut g = Guest::new();
    step(&mut b, &mut g, Instant::now());
    assert!(!g.irq_fired(), "nothing happened yet");

    let frame = udp(PUBLIC, 1, 100);
    let head = g.send_frame(&frame);
    step(&mut b, &mut g, Instant::now());
    let mut want = (frame.len() as u32).to_be_bytes().to_vec();
    want.extend_from_slice(&frame);
    assert_eq!(p.read_raw(), want);
    assert_eq!(g.take_used(TX), vec![(u32::from(head), 0)]);
    assert!(g.irq_fired());
    let c = b.counters();
    assert_eq!(
        (c.filter.passed_out_frames, c.filter.passed_out_bytes),
        (1, frame.len() as u64)
    );
    assert_eq!(c.tx_malformed, 0);
    assert_eq!(b.pending(), (0, 0));
    g.assert_all_returned();
}

#[test]
fn a_backend_frame_lands_in_a_receive_buffer_behind_a_header() {
    let (mut b, mut p) = relay();
    let mut g = Guest::new();
    let head = g.rx_buffer(2048);
    step(&mut b, &mut g, Instant::now());
    assert!(g.take_used(RX).is_empty(), "no frame, no buffer used");
    assert!(!g.irq_fired());

    let frame = inbound(1, 200);
    p.send(&frame);
    step(&mut b, &mut g, Instant::now());
    let used = g.take_used(RX);
    let len = (VNET_HDR_LEN + frame.len()) as u32;
    assert_eq!(used, vec![(u32::from(head), len)]);
    let bytes = g.rx_bytes(used[0].0, len);
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
    assert_eq!(bytes[..VNET_HDR_LEN], hdr);
    assert_eq!(bytes[VNET_HDR_LEN..], frame[..]);
    assert_eq!(
        g.read(Guest::buf(RX, head) + u64::from(len), 1),
        [POISON],
        "nothing written past the frame"
    );
    assert!(g.irq_fired());
    assert_eq!(b.counters().filter.passed_in_frames, 1);
    g.assert_all_returned();
}

// ---- Transmit chains that are not frames ---------------------------------------------------

/// How the device must treat one hostile transmit chain.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// Counted in tx_malformed and returned.
    Malformed,
    /// The ring is broken: the chain returned with length 0, the device needs a reset.
    BrokenChain,
    /// The ring is broken before a chain could be taken: nothing returned, needs a reset.
    BrokenRing,
}

/// Descriptors of the hostile chains: clear of those [`Guest::send`] uses first.
const D: u16 = 100;

/// Writes `hdr` + `frame` into the buffer of descriptor `D` and returns its address and length.
fn stage(g: &Guest, hdr: [u8; VNET_HDR_LEN], frame: &[u8]) -> (u64, u32) {
    let addr = Guest::buf(TX, D);
    let mut bytes = hdr.to_vec();
    bytes.extend_from_slice(frame);
    g.write(addr, &bytes);
    (addr, bytes.len() as u32)
}

/// Lays out and publishes one hostile chain.
type LayOut = fn(&mut Guest);

fn hostile_tx_chains() -> Vec<(&'static str, LayOut, Outcome)> {
    vec![
        (
            "a device-writable descriptor",
            |g| {
                let (addr, len) = stage(g, [0; 12], &udp(PUBLIC, 9, 64));
                g.desc(TX, D, addr, 12, VIRTQ_DESC_F_NEXT, D + 1);
                g.desc(TX, D + 1, addr + 12, len - 12, VIRTQ_DESC_F_WRITE, 0);
                g.publish(TX, D);
            },
            Outcome::Malformed,
        ),
        (
            // Nothing is read from it: only the check on descriptor kinds stops it.
            "an empty device-writable descriptor",
            |g| {
                let (addr, len) = stage(g, [0; 12], &udp(PUBLIC, 9, 64));
                g.desc(TX, D, addr, len, VIRTQ_DESC_F_NEXT, D + 1);
                g.desc(TX, D + 1, addr + u64::from(len), 0, VIRTQ_DESC_F_WRITE, 0);
                g.publish(TX, D);
            },
            Outcome::Malformed,
        ),
        (
            "a chain shorter than the header",
            |g| {
                let (addr, _) = stage(g, [0; 12], &[]);
                g.desc(TX, D, addr, 8, 0, 0);
                g.publish(TX, D);
            },
            Outcome::Malformed,
        ),
        (
            "a frame shorter than an Ethernet header",
            |g| {
                let (addr, len) = stage(g, [0; 12], &eth(0x0806, &[])[..MIN_FRAME_LEN - 1]);
                g.desc(TX, D, addr, len, 0, 0);
                g.publish(TX, D);
            },
            Outcome::Malformed,
        ),
        (
            "a frame one byte over the limit",
            |g| {
                let (addr, len) = stage(g, [0; 12], &udp_of_len(PUBLIC, MAX_FRAME_LEN + 1));
                g.desc(TX, D, addr, len, 0, 0);
                g.publish(TX, D);
            },
            Outcome::Malformed,
        ),
        (
            "a header asking for checksum offload",
            |g| {
                let mut hdr = [0u8; 12];
                hdr[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
                let (addr, len) = stage(g, hdr, &udp(PUBLIC, 9, 64));
                g.desc(TX, D, addr, len, 0, 0);
                g.publish(TX, D);
            },
            Outcome::Malformed,
        ),
        (
            "a header asking for segmentation",
            |g| {
                let mut hdr = [0u8; 12];
                hdr[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
                hdr[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
                let (addr, len) = stage(g, hdr, &udp(PUBLIC, 9, 64));
                g.desc(TX, D, addr, len, 0, 0);
                g.publish(TX, D);
            },
            Outcome::Malformed,
        ),
        (
            "a buffer running past the end of guest RAM",
            |g| {
                let frame = udp(PUBLIC, 9, 64);
                let len = (12 + frame.len()) as u32;
                let addr = RAM_END - 32;
                g.write(addr, &[0; 32]);
                g.desc(TX, D, addr, len, 0, 0);
                g.publish(TX, D);
            },
            Outcome::Malformed,
        ),
        (
            "a buffer far outside guest RAM",
            |g| {
                let (addr, len) = stage(g, [0; 12], &udp(PUBLIC, 9, 64));
                g.desc(TX, D, addr, 12, VIRTQ_DESC_F_NEXT, D + 1);
                g.desc(TX, D + 1, 1 << 40, len - 12, 0, 0);
                g.publish(TX, D);
            },
            Outcome::Malformed,
        ),
        (
            "an indirect descriptor (never offered)",
            |g| {
                // Its buffer holds a good frame: read as a direct buffer, it would pass.
                let (addr, len) = stage(g, [0; 12], &udp(PUBLIC, 9, 64));
                g.desc(TX, D, addr, len, VIRTQ_DESC_F_INDIRECT, 0);
                g.publish(TX, D);
            },
            Outcome::BrokenChain,
        ),
        (
            "a descriptor loop",
            |g| {
                let (addr, len) = stage(g, [0; 12], &udp(PUBLIC, 9, 64));
                g.desc(TX, D, addr, 12, VIRTQ_DESC_F_NEXT, D + 1);
                g.desc(TX, D + 1, addr + 12, len - 12, VIRTQ_DESC_F_NEXT, D);
                g.publish(TX, D);
            },
            Outcome::BrokenChain,
        ),
        (
            "a next index past the table",
            |g| {
                let (addr, len) = stage(g, [0; 12], &udp(PUBLIC, 9, 64));
                g.desc(TX, D, addr, len, VIRTQ_DESC_F_NEXT, QSIZE);
                g.publish(TX, D);
            },
            Outcome::BrokenChain,
        ),
        (
            "an available index more than a queue ahead",
            |g| {
                let (addr, len) = stage(g, [0; 12], &udp(PUBLIC, 9, 64));
                g.desc(TX, D, addr, len, 0, 0);
                g.publish(TX, D);
                g.avail[TX] = QSIZE + 1;
                g.set_avail_idx(TX, QSIZE + 1);
            },
            Outcome::BrokenRing,
        ),
    ]
}

#[test]
fn hostile_transmit_chains_never_reach_the_backend() {
    for (what, lay_out, outcome) in hostile_tx_chains() {
        let (mut b, mut p) = relay();
        let mut g = Guest::new();
        lay_out(&mut g);
        steps(&mut b, &mut g, 3);
        assert_eq!(p.read_raw(), b"", "{what}: something reached the backend");
        let c = b.counters();
        assert_eq!(c.filter.frames(), 0, "{what}: the filter saw a frame");
        let used = g.take_used(TX);
        match outcome {
            Outcome::Malformed => {
                assert_eq!(c.tx_malformed, 1, "{what}");
                assert_eq!(used, vec![(u32::from(D), 0)], "{what}");
                assert!(!g.needs_reset(), "{what}");
            }
            Outcome::BrokenChain => {
                assert_eq!(c.tx_malformed, 0, "{what}");
                assert_eq!(used, vec![(u32::from(D), 0)], "{what}");
                assert!(g.needs_reset(), "{what}");
            }
            Outcome::BrokenRing => {
                assert_eq!(c.tx_malformed, 0, "{what}");
                assert!(used.is_empty(), "{what}: {used:?}");
                assert!(g.needs_reset(), "{what}");
            }
        }
        g.assert_all_returned();
        if outcome == Outcome::BrokenRing {
            continue;
        }
        // The device goes on with the next chain (a driver that reset it would start over).
        let frame = udp(PUBLIC, 10, 64);
        g.send_frame(&frame);
        steps(&mut b, &mut g, 1);
        assert_eq!(p.frames(), vec![frame], "{what}: the next frame");
        g.assert_all_returned();
    }
}

#[test]
fn transmit_frames_at_the_limits_and_across_descriptors_pass() {
    let (mut b, mut p) = relay();
    let mut g = Guest::new();
    // The shortest frame: an Ethernet header (ARP, which the filter lets through).
    let shortest = eth(0x0806, &[]);
    assert_eq!(shortest.len(), MIN_FRAME_LEN);
    g.send_frame(&shortest);
    let longest = udp_of_len(PUBLIC, MAX_FRAME_LEN);
    g.send_frame(&longest);
    // Header split 5 + 7, the frame over three more buffers of odd sizes.
    let split = udp(PUBLIC, 3, 300);
    let addr = Guest::buf(TX, D);
    let mut bytes = vec![0u8; VNET_HDR_LEN];
    bytes.extend_from_slice(&split);
    g.write(addr, &bytes);
    let cuts = [0, 5, 12, 13, 100, bytes.len()];
    for (k, w) in cuts.windows(2).enumerate() {
        let last = k + 2 == cuts.len();
        g.desc(
            TX,
            D + k as u16,
            addr + w[0] as u64,
            (w[1] - w[0]) as u32,
            if last { 0 } else { VIRTQ_DESC_F_NEXT },
            D + k as u16 + 1,
        );
    }
    g.publish(TX, D);
    steps(&mut b, &mut g, 1);
    assert_eq!(p.frames(), vec![shortest, longest, split]);
    assert_eq!(b.counters().tx_malformed, 0);
    assert_eq!(g.take_used(TX).len(), 3);
}

// ---- The egress policy ---------------------------------------------------------------------

#[test]
fn the_default_policy_keeps_frames_off_private_and_special_ranges() {
    let (mut b, mut p) = relay();
    let mut g = Guest::new();
    let metadata = [169, 254, 169, 254];
    let private = [10, 0, 0, 1];
    let loopback = [127, 0, 0, 1];
    for dst in [metadata, private, loopback] {
        g.send_frame(&udp(dst, 1, 40));
    }
    g.send_frame(&ipv6_frame());
    let public = udp(PUBLIC, 2, 40);
    g.send_frame(&public);
    steps(&mut b, &mut g, 2);
    assert_eq!(p.frames(), vec![public]);
    let f = b.counters().filter;
    for dst in [metadata, private, loopback] {
        assert_eq!(f.dropped_builtin[builtin(dst)], 1, "{dst:?}");
    }
    assert_eq!(f.dropped_builtin.iter().sum::<u64>(), 3);
    assert_eq!(f.dropped_not_ipv4, 1);
    assert_eq!(f.passed_out_frames, 1);
    assert_eq!(g.take_used(TX).len(), 5);
    g.assert_all_returned();
}

#[test]
fn with_deny_all_only_the_allowed_range_passes() {
    let policy = EgressPolicy {
        rules: vec![
            rule(Action::Deny, "0.0.0.0/0"),
            rule(Action::Allow, "203.0.113.0/24"),
        ],
        dns: None,
        default_action: Action::Allow,
        ..EgressPolicy::default()
    };
    policy.check().unwrap();
    let (mut b, mut p) = relay_at(policy, NetRateLimit::default(), Instant::now());
    let mut g = Guest::new();
    let inside = [udp([203, 0, 113, 7], 1, 40), udp([203, 0, 113, 255], 2, 40)];
    g.send_frame(&udp(PUBLIC, 3, 40));
    g.send_frame(&inside[0]);
    g.send_frame(&udp([203, 0, 114, 1], 4, 40));
    g.send_frame(&udp([10, 0, 0, 1], 5, 40));
    g.send_frame(&inside[1]);
    g.send_frame(&udp([203, 0, 112, 255], 6, 40));
    steps(&mut b, &mut g, 2);
    assert_eq!(p.frames(), inside.to_vec());
    let f = b.counters().filter;
    assert_eq!(f.dropped_by_rule, vec![4, 0]);
    assert_eq!(f.passed_out_frames, 2);
    g.assert_all_returned();
}

// ---- A hostile or broken backend -----------------------------------------------------------

#[test]
fn an_impossible_length_ends_the_backend_and_later_frames_are_counted() {
    for prefix in [0, MAX_BACKEND_FRAME as u32 + 1, u32::MAX] {
        let (mut b, mut p) = relay();
        let mut g = Guest::new();
        g.rx_buffer(2048);
        g.rx_buffer(2048);
        p.raw(&prefix.to_be_bytes());
        // A good frame after it: the stream is out of step, so not even this one is read.
        p.send(&inbound(1, 64));
        steps(&mut b, &mut g, 2);
        let c = b.counters();
        assert!(!c.backend_connected, "length {prefix}");
        assert_eq!(g.take_used(RX), vec![], "length {prefix}");
        assert!(
            p.device_closed(),
            "length {prefix}: the device keeps its end"
        );
        assert_eq!(b.pending(), (0, 0), "length {prefix}");

        g.send_frame(&udp(PUBLIC, 1, 64));
        g.send_frame(&udp(PUBLIC, 2, 64));
        steps(&mut b, &mut g, 2);
        assert_eq!(b.counters().tx_backend_gone, 2, "length {prefix}");
        assert_eq!(g.take_used(TX).len(), 2, "length {prefix}");
        g.assert_all_returned();
    }
}

/// Writes `bytes` to the device as fast as it reads them, stepping it in between.
fn feed(b: &mut NetBackend, g: &mut Guest, p: &mut Passt, bytes: &[u8]) {
    let mut at = 0;
    for _ in 0..10_000 {
        match p.s.write(&bytes[at..]) {
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("writing to the device: {e}"),
        }
        if at == bytes.len() {
            return;
        }
        steps(b, g, 1);
    }
    panic!("the device stopped reading after {at} bytes");
}

#[test]
fn oversized_frames_are_dropped_and_the_stream_stays_in_step() {
    let (mut b, mut p) = relay();
    let mut g = Guest::new();
    let heads: Vec<u16> = (0..4).map(|_| g.rx_buffer(2048)).collect();
    let jumbo = inbound(1, 9000);
    let good = inbound(2, 100);
    let runt = inbound(3, 100)[..MIN_FRAME_LEN - 1].to_vec();
    let longest = {
        let mut f = inbound(4, 100);
        f.resize(MAX_FRAME_LEN, 0);
        f
    };
    let too_long = {
        let mut f = inbound(5, 100);
        f.resize(MAX_FRAME_LEN + 1, 0);
        f
    };
    // The longest length the backend may announce is a frame too long for the guest, not a
    // stream out of step.
    let largest = inbound(6, MAX_BACKEND_FRAME - 42);
    assert_eq!(largest.len(), MAX_BACKEND_FRAME);
    let last = inbound(7, 60);
    for f in [&jumbo, &good, &runt, &longest, &too_long] {
        p.send(f);
    }
    feed(&mut b, &mut g, &mut p, &Passt::framed(&largest));
    p.send(&last);
    steps(&mut b, &mut g, 2);
    let c = b.counters();
    assert!(c.backend_connected);
    assert_eq!(
        c.rx_oversized, 4,
        "9000 bytes, 13, MAX_FRAME_LEN + 1, the largest"
    );
    let used = g.take_used(RX);
    assert_eq!(used.len(), 3, "{used:?}");
    for ((id, len), (head, want)) in used.iter().zip(heads.iter().zip([&good, &longest, &last])) {
        assert_eq!(*id, u32::from(*head));
        assert_eq!(*len as usize, VNET_HDR_LEN + want.len());
        assert_eq!(g.rx_bytes(*id, *len)[VNET_HDR_LEN..], want[..]);
    }
    assert_eq!(b.pending(), (0, 0));
}

#[test]
fn a_frame_in_one_byte_writes_arrives_whole_and_once() {
    let (mut b, mut p) = relay();
    let mut g = Guest::new();
    let heads = [g.rx_buffer(2048), g.rx_buffer(2048), g.rx_buffer(2048)];
    let frame = inbound(1, 150);
    let framed = Passt::framed(&frame);
    for (k, byte) in framed.iter().enumerate() {
        p.raw(&[*byte]);
        steps(&mut b, &mut g, 1);
        if k + 1 < framed.len() {
            assert_eq!(g.take_used(RX), vec![], "after {} bytes", k + 1);
        }
    }
    let len = (VNET_HDR_LEN + frame.len()) as u32;
    assert_eq!(g.take_used(RX), vec![(u32::from(heads[0]), len)]);
    assert_eq!(
        g.rx_bytes(u32::from(heads[0]), len)[VNET_HDR_LEN..],
        frame[..]
    );
    // Two frames in one write are two frames.
    let (a, c) = (inbound(2, 40), inbound(3, 41));
    let mut both = Passt::framed(&a);
    both.extend(Passt::framed(&c));
    p.raw(&both);
    steps(&mut b, &mut g, 1);
    let used = g.take_used(RX);
    assert_eq!(used.len(), 2);
    assert_eq!(g.rx_bytes(used[0].0, used[0].1)[VNET_HDR_LEN..], a[..]);
    assert_eq!(g.rx_bytes(used[1].0, used[1].1)[VNET_HDR_LEN..], c[..]);
    assert_eq!(b.counters().rx_oversized, 0);
}

#[test]
fn a_backend_that_hangs_up_mid_frame_ends_cleanly() {
    let (mut b, mut p) = relay();
    let mut g = Guest::new();
    let head = g.rx_buffer(2048);
    g.rx_buffer(2048);
    let whole = inbound(1, 100);
    p.send(&whole);
    let cut = Passt::framed(&inbound(2, 100));
    p.raw(&cut[..cut.len() / 2]);
    drop(p);
    steps(&mut b, &mut g, 3);
    let c = b.counters();
    assert!(!c.backend_connected);
    // What it sent whole before hanging up still arrives; the half frame does not.
    let len = (VNET_HDR_LEN + whole.len()) as u32;
    assert_eq!(g.take_used(RX), vec![(u32::from(head), len)]);
    assert_eq!(c.rx_oversized, 0);
    g.send_frame(&udp(PUBLIC, 1, 64));
    steps(&mut b, &mut g, 2);
    assert_eq!(b.counters().tx_backend_gone, 1);
    assert_eq!(g.take_used(RX), vec![], "the half frame never shows");
    g.assert_all_returned();
}

/// Posts frames `next..` until `QSIZE` chains are in flight; returns the next sequence number.
fn fill_tx(g: &mut Guest, mut next: u32, len: usize) -> u32 {
    while g.in_flight(TX) < QSIZE {
        g.send_frame(&udp(PUBLIC, next, len));
        next += 1;
    }
    next
}

#[test]
fn a_backend_that_does_not_read_stops_the_transmit_queue() {
    let (mut b, mut p) = relay();
    let mut g = Guest::new();
    let len = 1400;
    let mut posted = 0;
    let mut stalled = None;
    // The socket takes some, the device holds up to its bound, then takes no more chains.
    for _ in 0..64 {
        posted = fill_tx(&mut g, posted, len);
        let before = g.used_idx(TX);
        steps(&mut b, &mut g, 1);
        let (out, _) = b.pending();
        assert!(
            out <= MAX_PENDING_OUT + 4 + MAX_FRAME_LEN,
            "{out} bytes held"
        );
        if g.used_idx(TX) == before {
            stalled = Some(before);
            break;
        }
    }
    let stalled = stalled.expect("the device kept taking chains");
    assert!(b.pending().0 >= MAX_PENDING_OUT, "{:?}", b.pending());
    steps(&mut b, &mut g, 3);
    assert_eq!(
        g.used_idx(TX),
        stalled,
        "chains taken while held bytes are at the bound"
    );
    assert_eq!(
        g.in_flight(TX),
        QSIZE,
        "the guest's chains stay in its queue"
    );
    g.assert_all_returned();
    // Once the backend reads, everything arrives, in order.
    let mut next = 0;
    for _ in 0..10_000 {
        for f in p.frames() {
            assert_eq!(f, udp(PUBLIC, next, len), "frame {next}");
            next += 1;
        }
        if next == posted {
            break;
        }
        steps(&mut b, &mut g, 1);
    }
    assert_eq!(next, posted);
    assert_eq!(g.in_flight(TX), 0);
    assert_eq!(b.pending(), (0, 0));
}

#[test]
fn a_backend_that_reads_just_behind_does_not_grow_the_device_memory() {
    let (mut b, mut p) = relay();
    let mut g = Guest::new();
    let len = 1400;
    let total = 16 << 20;
    // The backend takes 64 KiB per round while the guest keeps its queue full: the bytes held
    // for it never drain to nothing, for 16 MiB.
    let ((), peak) = peak_heap(|| {
        let (mut posted, mut received, mut bytes) = (0, 0, 0);
        while bytes < total {
            posted = fill_tx(&mut g, posted, len);
            steps(&mut b, &mut g, 1);
            assert!(b.pending().0 <= MAX_PENDING_OUT + 4 + MAX_FRAME_LEN);
            for f in p.frames_upto(64 * 1024) {
                assert_eq!(f, udp(PUBLIC, received, len), "frame {received}");
                received += 1;
                bytes += f.len();
            }
            assert!(b.pending().0 > 0, "the backend caught up: no test");
        }
    });
    assert!(
        peak < 4 << 20,
        "the relay grew to {peak} bytes of heap while it held at most {} for the backend",
        MAX_PENDING_OUT + 4 + MAX_FRAME_LEN
    );
}

#[test]
fn a_backend_flooding_a_guest_without_buffers_is_not_read_past_the_bound() {
    let (mut b, mut p) = relay();
    let mut g = Guest::new();
    let len = 1000;
    let stream: Vec<u8> = (0..1500)
        .flat_map(|seq| Passt::framed(&inbound(seq, len)))
        .collect();
    let mut written = 0;
    let mut blocked = 0;
    let ((), peak) = peak_heap(|| {
        // Until the backend's writes have been refused for three passes in a row.
        for _ in 0..1000 {
            match p.s.write(&stream[written..]) {
                Ok(n) => {
                    written += n;
                    blocked = 0;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => blocked += 1,
                Err(e) => panic!("{e}"),
            }
            steps(&mut b, &mut g, 1);
            assert!(b.pending().1 <= MAX_PENDING_IN, "{:?}", b.pending());
            if blocked == 3 {
                break;
            }
        }
    });
    assert_eq!(blocked, 3, "the socket took all {written} bytes");
    assert!(written < stream.len());
    assert_eq!(b.pending().1, MAX_PENDING_IN);
    assert!(
        peak < 2 * MAX_PENDING_IN + (1 << 20),
        "{peak} bytes of heap"
    );
    // Buffers come: every frame arrives, in order, and the rest of the stream follows.
    let mut next = 0;
    for _ in 0..10_000 {
        while g.in_flight(RX) < QSIZE {
            g.rx_buffer(2048);
        }
        if written < stream.len() {
            if let Ok(n) = p.s.write(&stream[written..]) {
                written += n;
            }
        }
        steps(&mut b, &mut g, 1);
        assert!(b.pending().1 <= MAX_PENDING_IN);
        for (id, used) in g.take_used(RX) {
            let want = inbound(next, len);
            assert_eq!(used as usize, VNET_HDR_LEN + want.len());
            assert_eq!(g.rx_bytes(id, used)[VNET_HDR_LEN..], want[..], "{next}");
            next += 1;
        }
        if next == 1500 {
            break;
        }
    }
    assert_eq!(next, 1500);
    assert_eq!(b.counters().rx_no_room, 0);
}

#[test]
fn a_receive_buffer_too_small_is_returned_empty_and_counted() {
    let (mut b, mut p) = relay();
    let mut g = Guest::new();
    let frame = inbound(1, 300);
    let need = (VNET_HDR_LEN + frame.len()) as u32;
    let small = g.rx_buffer(need - 1);
    p.send(&frame);
    steps(&mut b, &mut g, 1);
    assert_eq!(g.take_used(RX), vec![(u32::from(small), 0)]);
    assert_eq!(
        g.rx_bytes(u32::from(small), need - 1),
        vec![POISON; need as usize - 1],
        "nothing written"
    );
    assert_eq!(b.counters().rx_no_room, 1);
    assert!(g.irq_fired());
    // A buffer of exactly the size holds the next one.
    let exact = g.rx_buffer(need);
    let next = inbound(2, 300);
    p.send(&next);
    steps(&mut b, &mut g, 1);
    assert_eq!(g.take_used(RX), vec![(u32::from(exact), need)]);
    assert_eq!(g.rx_bytes(u32::from(exact), need)[VNET_HDR_LEN..], next[..]);
    // A device-readable buffer (the wrong way round) and one outside guest RAM hold nothing.
    g.desc(RX, D, Guest::buf(RX, D), 2048, 0, 0);
    g.publish(RX, D);
    g.desc(RX, D + 1, RAM_END - 100, 2048, VIRTQ_DESC_F_WRITE, 0);
    g.publish(RX, D + 1);
    p.send(&inbound(3, 300));
    p.send(&inbound(4, 300));
    steps(&mut b, &mut g, 1);
    assert_eq!(
        g.take_used(RX),
        vec![(u32::from(D), 0), (u32::from(D + 1), 0)]
    );
    assert_eq!(b.counters().rx_no_room, 3);
    g.assert_all_returned();
}

#[test]
fn a_receive_chain_of_odd_buffers_gets_header_and_frame_in_order() {
    let (mut b, mut p) = relay();
    let mut g = Guest::new();
    let frame = inbound(1, 200);
    let need = VNET_HDR_LEN + frame.len();
    // Empty buffers first and in between, the header split 3 + 9, the frame over the rest.
    let sizes = [0u32, 3, 0, 9, 50, 0, 2048];
    let mut addrs = Vec::new();
    for (k, size) in sizes.iter().enumerate() {
        let i = D + k as u16;
        let addr = Guest::buf(RX, i);
        g.write(addr, &vec![POISON; BUF_SPACING as usize]);
        let last = k + 1 == sizes.len();
        let flags = VIRTQ_DESC_F_WRITE | if last { 0 } else { VIRTQ_DESC_F_NEXT };
        g.desc(RX, i, addr, *size, flags, i + 1);
        addrs.push(addr);
    }
    g.publish(RX, D);
    p.send(&frame);
    steps(&mut b, &mut g, 1);
    assert_eq!(g.take_used(RX), vec![(u32::from(D), need as u32)]);
    let mut got = Vec::new();
    for (addr, size) in addrs.iter().zip(sizes) {
        let take = (size as usize).min(need - got.len());
        got.extend(g.read(*addr, take));
    }
    let mut want = vec![0u8; VNET_HDR_LEN];
    want[10] = 1;
    want.extend_from_slice(&frame);
    assert_eq!(got, want, "the bytes across the chain's buffers");
    assert_eq!(b.counters().rx_no_room, 0);
}

// ---- Rate limits ---------------------------------------------------------------------------

fn one_frame_per_second() -> Option<RateLimit> {
    Some(RateLimit {
        ops_per_sec: Some(1),
        bytes_per_sec: Some(1 << 20),
        ..RateLimit::default()
    })
}

#[test]
fn the_transmit_rate_limit_leaves_frames_in_the_queue_until_it_allows_them() {
    let t0 = Instant::now();
    let limits = NetRateLimit {
        tx: one_frame_per_second(),
        rx: None,
    };
    let (mut b, mut p) = relay_at(EgressPolicy::default(), limits, t0);
    let mut g = Guest::new();
    let (first, second) = (udp(PUBLIC, 1, 100), udp(PUBLIC, 2, 100));
    g.send_frame(&first);
    g.send_frame(&second);
    let served = step(&mut b, &mut g, t0);
    assert_eq!(p.frames(), vec![first]);
    assert_eq!(g.take_used(TX).len(), 1);
    assert_eq!(g.in_flight(TX), 1, "the second stays available");
    g.assert_all_returned();
    let wake = served.wake_at.expect("a wake-up time");
    assert!(
        wake > t0 && wake <= t0 + Duration::from_secs(1),
        "{served:?}"
    );
    let halfway = t0 + (wake - t0) / 2;
    assert_eq!(step(&mut b, &mut g, halfway).wake_at, Some(wake));
    assert_eq!(p.frames(), Vec::<Vec<u8>>::new());
    let served = step(&mut b, &mut g, wake);
    assert_eq!(p.frames(), vec![second]);
    assert_eq!(g.in_flight(TX), 0);
    assert_eq!(served.wake_at, None);
}

#[test]
fn the_receive_rate_limit_holds_frames_until_it_allows_them() {
    let t0 = Instant::now();
    let limits = NetRateLimit {
        tx: None,
        rx: one_frame_per_second(),
    };
    let (mut b, mut p) = relay_at(EgressPolicy::default(), limits, t0);
    let mut g = Guest::new();
    g.rx_buffer(2048);
    g.rx_buffer(2048);
    let (first, second) = (inbound(1, 100), inbound(2, 100));
    p.send(&first);
    p.send(&second);
    let served = step(&mut b, &mut g, t0);
    let used = g.take_used(RX);
    assert_eq!(used.len(), 1);
    assert_eq!(g.rx_bytes(used[0].0, used[0].1)[VNET_HDR_LEN..], first[..]);
    g.assert_all_returned();
    let wake = served.wake_at.expect("a wake-up time");
    assert!(
        wake > t0 && wake <= t0 + Duration::from_secs(1),
        "{served:?}"
    );
    step(&mut b, &mut g, wake);
    let used = g.take_used(RX);
    assert_eq!(used.len(), 1);
    assert_eq!(g.rx_bytes(used[0].0, used[0].1)[VNET_HDR_LEN..], second[..]);
}

// ---- The backend socket ---------------------------------------------------------------------

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sm-virtio-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

fn refused(fd: i32, what: &str) {
    let err = adopt_backend(fd).expect_err(what).to_string();
    assert!(
        err.starts_with("the network backend's socket is unusable: "),
        "{what}: {err}"
    );
    assert!(!err.contains('\n'), "{what}: {err}");
}

#[test]
fn only_a_connected_unix_stream_socket_is_adopted() {
    let file_path = scratch("not-a-socket");
    let file = std::fs::File::create(&file_path).unwrap();
    refused(file.as_raw_fd(), "a regular file");

    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 just made both descriptors and nothing else owns them.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    refused(r.as_raw_fd(), "a pipe's read end");
    refused(w.as_raw_fd(), "a pipe's write end");

    let sock_path = scratch("listening.sock");
    let listener = UnixListener::bind(&sock_path).unwrap();
    refused(listener.as_raw_fd(), "a listening Unix socket");

    let (d1, _d2) = UnixDatagram::pair().unwrap();
    refused(d1.as_raw_fd(), "a Unix datagram socket");

    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp_conn = std::net::TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
    refused(tcp_conn.as_raw_fd(), "a TCP connection");
    refused(-1, "no descriptor");

    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let mut adopted = adopt_backend(ours.as_raw_fd()).expect("a connected stream socket");
    assert_ne!(adopted.as_raw_fd(), ours.as_raw_fd(), "a copy is taken");
    adopted.write_all(b"frame").unwrap();
    let mut got = [0u8; 5];
    theirs.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"frame");
    drop(adopted);
    // The caller's descriptor is still its own and still connected.
    (&ours).write_all(b"again").unwrap();
    theirs.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"again");
    let _ = std::fs::remove_dir_all(file_path.parent().unwrap());
}

// ---- The device with its worker ------------------------------------------------------------

/// Waits (bounded) until the device has returned `n` chains on `which`.
fn wait_used(g: &Guest, which: usize, n: u16) {
    for _ in 0..1000 {
        if g.used_idx(which) == n {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!(
        "queue {which}: {} chains returned, not {n}",
        g.used_idx(which)
    );
}

#[test]
fn the_device_worker_relays_both_ways() {
    let (device_end, mut passt) = UnixStream::pair().unwrap();
    passt
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    let mut net = Net::new(
        device_end.as_raw_fd(),
        mac,
        EgressPolicy::default(),
        NetRateLimit::default(),
    )
    .unwrap();
    drop(device_end);
    let mut cfg = [0u8; 12];
    net.read_config(0, &mut cfg);
    assert_eq!(cfg[..6], mac);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1500, "MTU");

    let mut g = Guest::new();
    net.activate(g.q.mem.clone(), g.q.queues.clone(), g.q.interrupt.clone())
        .unwrap();
    let head = g.rx_buffer(2048);
    let out = udp(PUBLIC, 1, 500);
    g.send_frame(&udp([169, 254, 169, 254], 0, 40));
    g.send_frame(&out);
    net.notify(TX as u16);
    // First the card announces the guest's MAC (an ARP probe), so passt can reach a guest that
    // has not spoken yet.
    let mut probe = vec![0u8; 4 + 42];
    passt.read_exact(&mut probe).expect("the probe within 10 s");
    assert_eq!(probe[..4], 42u32.to_be_bytes());
    assert_eq!(probe[4..10], [0xff; 6]);
    assert_eq!(probe[10..16], mac);
    assert_eq!(probe[16..18], [0x08, 0x06]);
    assert_eq!(probe[26..32], mac, "the sender hardware address");
    let mut got = vec![0u8; 4 + out.len()];
    passt.read_exact(&mut got).expect("the frame within 10 s");
    assert_eq!(got, Passt::framed(&out));
    wait_used(&g, TX, 2);

    let back = inbound(2, 500);
    passt.write_all(&Passt::framed(&back)).unwrap();
    wait_used(&g, RX, 1);
    let used = g.take_used(RX);
    assert_eq!(used[0].0, u32::from(head));
    assert_eq!(g.rx_bytes(used[0].0, used[0].1)[VNET_HDR_LEN..], back[..]);

    let c = net.net_counters().expect("counters");
    assert_eq!(c.filter.passed_out_frames, 1);
    assert_eq!(c.filter.dropped_builtin[builtin([169, 254, 169, 254])], 1);
    assert!(c.backend_connected);
    let live = net.live_queues().expect("active");
    assert_eq!(live[TX].state().next_used, 2);
    net.shutdown();
    // The device's end is closed with it.
    let mut b = [0u8; 1];
    assert_eq!(passt.read(&mut b).unwrap(), 0);
}
