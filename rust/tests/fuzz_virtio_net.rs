//! Fuzz target `virtio_net`: the virtio-net relay between the guest's queues and the backend
//! socket, driven without threads, under an egress policy taken from the input.
//!
//! The input starts with a policy (up to four network rules, allow or deny, from a table of
//! interesting networks or raw; a resolver or none; a default action) and rate limits for
//! each direction, then a sequence of events (see [`Event`]): frames the guest transmits
//! (UDP, TCP, ARP, IPv6, VLAN-tagged or raw, to any destination, behind a clean or hostile
//! virtio-net header, laid out over up to four descriptors that may be device-writable or lie
//! outside guest RAM), receive buffers of hostile sizes and flags, writes by the backend (good
//! frames, impossible and oversized lengths, partial frames, raw bytes, floods, frames cut in
//! pieces), the backend reading or not, hanging up, the clock jumping forward, the guest
//! scribbling on its rings, and driver resets.
//!
//! After every event the relay polls without waiting and serves until a pass leaves nothing
//! for the next one. It must never panic; each such settling must end within a bound; the
//! bytes it holds stay within `MAX_PENDING_OUT` (plus one framed frame) and `MAX_PENDING_IN`;
//! a rate-limit wake-up is in the future; every chain it took is returned (or the device
//! asked for a reset), with the interrupt raised; it ends the backend only after a hang-up or
//! an impossible length. Every frame the backend receives is framed,
//! 14 to `MAX_FRAME_LEN` bytes long, and allowed by a small independent reference of the
//! policy (built-in ranges, then network rules with the most specific deciding and deny
//! winning ties, the resolver on port 53, the default). While the guest keeps to the ring
//! protocol, the backend receives exactly the allowed well-formed frames the guest sent, in
//! order (a prefix of them while the device holds some or after a hang-up, all of them in the
//! end when it stays connected), and each receive buffer comes back holding a zero header
//! with `num_buffers` 1 and the next frame of the backend's stream that fits the guest, or
//! empty exactly when that frame does not fit it; the device asks for no reset, and its
//! counters (malformed chains, frames passed and denied each way, buffers too small) are
//! exactly what the guest and the reference make of the run. The backend writes like passt:
//! what the socket does not take now is written later, so its stream is out of step only
//! when the input says so.
//!
//! The seed corpus in `rust/fuzz/corpus/virtio_net/` is written by
//! `SUPERMACHINE_FUZZ_WRITE_SEEDS=1 cargo test --test fuzz_virtio_net seed_corpus`.

// The shared driver has an unneeded `mut` (reported upstream); keep -D warnings clean here.
#[allow(unused_mut)]
mod fuzz_support;

use fuzz_support::Input;

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use supermachine_core::devices::rate_limiter::RateLimit;
use supermachine_core::devices::virtio::device_thread::ActiveQueues;
use supermachine_core::devices::virtio::net::{
    NetBackend, NetRateLimit, MAX_BACKEND_FRAME, MAX_FRAME_LEN, MAX_PENDING_IN, MAX_PENDING_OUT,
    MIN_FRAME_LEN, RX, TX, VNET_HDR_LEN,
};
use supermachine_core::devices::virtio::queue::{
    Queue, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use supermachine_core::devices::virtio::Interrupt;
use supermachine_core::net::{Action, Cidr, EgressPolicy, Rule, Target};
use supermachine_core::vmm::memory::{GuestRam, MemoryBacking};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const QSIZE: u16 = 32;
/// Each chain the guest offers has up to this many descriptors, at `CHAIN_DESCS * slot`.
const CHAIN_DESCS: u16 = 4;
const SLOTS: u16 = QSIZE / CHAIN_DESCS;
const RAM_END: u64 = 1 << 20;
const DESC: [u64; 2] = [0x10000, 0x20000];
const AVAIL_OFF: u64 = 0x1000;
const USED_OFF: u64 = 0x2000;
/// Buffers of chain slot `s`: `BUFS[queue] + SLOT_SPACING[queue] * s`.
const BUFS: [u64; 2] = [0x40000, 0x80000];
const SLOT_SPACING: [u64; 2] = [0x4000, 0x1000];
/// An rx descriptor's buffer is at most this long (four fit a slot).
const RX_DESC_SPACING: u64 = 0x1000;
/// Where "outside guest RAM" buffers go: across its end, and far beyond it.
const OUTSIDE: [u64; 2] = [RAM_END - 8, 1 << 40];
const MAX_EVENTS: usize = 200;
/// Passes after one event before the relay must have settled (a pass serves up to 256
/// chains per queue; the queues hold 32).
const MAX_ROUNDS: usize = 8;
/// Rounds of [`World::finish`]: enough for every frame the socket and the relay can hold to
/// pass one by one (under a rate limit), several times over.
const MAX_FINISH_ROUNDS: usize = 100_000;
const POISON: u8 = 0xa5;
/// Most bytes the backend keeps to write while the socket does not take them.
const MAX_BACKLOG: usize = 1 << 20;
const RESOLVER: [u8; 4] = [10, 0, 2, 3];

/// Event kinds, the first byte of each event.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
enum Event {
    /// `sel`, then what `sel` asks for: a frame to transmit (see [`Guest::transmit`]).
    GuestTx = 0,
    /// `count`, then per chain `descs` and per descriptor `size`, `kind`: receive buffers.
    RxBuffers = 1,
    /// `kind`, then its arguments: the backend writes (see [`Backend::write`]).
    BackendWrite = 2,
    /// The backend reads everything the device sent; it reads nothing otherwise.
    BackendRead = 3,
    /// `how`: the backend hangs up (closes, or shuts down writing or both ways).
    BackendClose = 4,
    /// `amount`: the clock moves on (tens of milliseconds, or seconds with the top bit).
    Time = 5,
    /// `what`, then bytes: the guest scribbles on a ring.
    Hostile = 6,
    /// The driver resets the device: new queue state, rings zeroed.
    Reset = 7,
    /// As `GuestTx`, the frame offered in every free chain of the queue.
    GuestTxBurst = 8,
}

const EVENTS: u8 = 9;

// ---- The policy and its reference ----------------------------------------------------------

/// Networks rules are drawn from: the builtin ranges' edges, the guest's own network, an
/// ordinary range and single addresses.
const NETS: [&str; 12] = [
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.0.2.0/24",
    "10.0.2.3",
    "169.254.0.0/16",
    "169.254.169.254",
    "203.0.113.0/24",
    "203.0.113.7",
    "93.184.216.0/24",
    "127.0.0.0/8",
    "224.0.0.0/4",
    "1.0.0.0/8",
];

/// Destinations of guest frames: inside and outside the networks above and the builtin
/// ranges.
const ADDRS: [[u8; 4]; 16] = [
    [10, 0, 2, 2],
    [10, 0, 2, 3],
    [10, 0, 2, 15],
    [10, 9, 9, 9],
    [169, 254, 169, 254],
    [127, 0, 0, 1],
    [192, 168, 1, 1],
    [172, 16, 0, 1],
    [100, 64, 0, 1],
    [224, 0, 0, 251],
    [255, 255, 255, 255],
    [0, 0, 0, 0],
    [203, 0, 113, 7],
    [203, 0, 113, 200],
    [93, 184, 216, 34],
    [1, 1, 1, 1],
];

/// The ranges denied unless a rule covers the destination, written out independently of the
/// filter's own table.
const BUILTIN: [([u8; 4], u8); 11] = [
    ([0, 0, 0, 0], 8),
    ([10, 0, 0, 0], 8),
    ([100, 64, 0, 0], 10),
    ([127, 0, 0, 0], 8),
    ([169, 254, 0, 0], 16),
    ([172, 16, 0, 0], 12),
    ([192, 0, 0, 0], 24),
    ([192, 168, 0, 0], 16),
    ([198, 18, 0, 0], 15),
    ([224, 0, 0, 0], 4),
    ([240, 0, 0, 0], 4),
];

fn covers(net: [u8; 4], prefix: u8, ip: [u8; 4]) -> bool {
    let (net, ip) = (u32::from_be_bytes(net), u32::from_be_bytes(ip));
    prefix == 0 || (net ^ ip) >> (32 - u32::from(prefix.min(32))) == 0
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The policy as the reference reads it.
struct Reference {
    /// (network, prefix, deny)
    rules: Vec<([u8; 4], u8, bool)>,
    dns: Option<[u8; 4]>,
    default_deny: bool,
}

impl Reference {
    /// Whether a frame the guest sends may leave.
    fn allows(&self, f: &[u8]) -> bool {
        if f.len() < 14 {
            return false;
        }
        match be16(f, 12) {
            0x0806 => return true, // ARP: answered by the backend itself
            0x0800 => {}
            _ => return false,
        }
        let p = &f[14..];
        if p.len() < 20 || p[0] >> 4 != 4 {
            return false;
        }
        let ihl = usize::from(p[0] & 0x0f) * 4;
        let total = usize::from(be16(p, 2));
        if ihl < 20 || total < ihl || total > p.len() {
            return false;
        }
        let dst = [p[16], p[17], p[18], p[19]];
        let payload = &p[ihl..total];
        let fragment = be16(p, 6) & 0x3fff != 0;
        let to_port_53 = match p[9] {
            17 => payload.len() >= 8 && be16(payload, 2) == 53,
            6 => {
                payload.len() >= 20
                    && (20..=payload.len()).contains(&(usize::from(payload[12] >> 4) * 4))
                    && be16(payload, 2) == 53
            }
            _ => false,
        };
        if self.dns == Some(dst) && !fragment && to_port_53 {
            return true;
        }
        let decider = self
            .rules
            .iter()
            .filter(|(net, prefix, _)| covers(*net, *prefix, dst))
            .max_by_key(|(_, prefix, deny)| (*prefix, *deny));
        match decider {
            Some((_, _, deny)) => !deny,
            None => !BUILTIN.iter().any(|(net, p)| covers(*net, *p, dst)) && !self.default_deny,
        }
    }
}

fn rate_limit(b: u8) -> Option<RateLimit> {
    (b & 3 != 0).then(|| RateLimit {
        ops_per_sec: Some(u64::from(b & 3)),
        bytes_per_sec: (b & 4 != 0).then_some(1 << 20),
        ops_burst: (b & 8 != 0).then_some(2),
        ..RateLimit::default()
    })
}

/// The policy, the reference of it and the rate limits, from the front of the input.
fn policy(input: &mut Input) -> (EgressPolicy, Reference, NetRateLimit) {
    let flags = input.u8();
    let mut rules = Vec::new();
    let mut reference = Reference {
        rules: Vec::new(),
        dns: (flags & 0x40 != 0).then_some(RESOLVER),
        default_deny: flags & 0x80 != 0,
    };
    for _ in 0..(flags & 7) % 5 {
        let action = input.u8();
        let which = input.u8();
        let cidr: Cidr = if which & 0x80 == 0 {
            NETS[usize::from(which) % NETS.len()].parse().unwrap()
        } else {
            let addr = Ipv4Addr::from(input.u32().to_be_bytes());
            Cidr::new(addr, input.u8() % 33).unwrap()
        };
        let deny = action & 1 != 0;
        rules.push(Rule {
            action: if deny { Action::Deny } else { Action::Allow },
            target: Target::Net(cidr),
        });
        reference
            .rules
            .push((cidr.addr.octets(), cidr.prefix, deny));
    }
    let policy = EgressPolicy {
        rules,
        dns: reference.dns.map(Ipv4Addr::from),
        default_action: if reference.default_deny {
            Action::Deny
        } else {
            Action::Allow
        },
        ..EgressPolicy::default()
    };
    policy.check().expect("the fuzz policy is valid");
    let limits = NetRateLimit {
        tx: rate_limit(input.u8()),
        rx: rate_limit(input.u8()),
    };
    (policy, reference, limits)
}

// ---- The guest -----------------------------------------------------------------------------

fn queue(which: usize) -> Queue {
    let mut q = Queue::new(256);
    q.size = QSIZE;
    q.desc_table = DESC[which];
    q.avail_ring = DESC[which] + AVAIL_OFF;
    q.used_ring = DESC[which] + USED_OFF;
    q.ready = true;
    q
}

fn in_ram(addr: u64, len: u32) -> bool {
    addr.checked_add(u64::from(len))
        .is_some_and(|end| end <= RAM_END)
}

#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
}

/// A chain the guest offered and the device has not returned yet.
struct Offered {
    head: u16,
    descs: Vec<Desc>,
    /// Transmit: what the device must make of it (unused for receive chains).
    verdict: TxVerdict,
}

#[derive(Debug, Clone, PartialEq)]
enum TxVerdict {
    /// Not a frame: counted in tx_malformed.
    Malformed,
    /// A frame the policy denies: counted by the filter.
    Denied,
    /// A frame the backend must get.
    Passes(Vec<u8>),
}

/// What the device must have counted, while the guest keeps to the ring protocol.
#[derive(Debug, Default, PartialEq)]
struct Counted {
    tx_malformed: u64,
    tx_denied: u64,
    tx_passed: u64,
    rx_given: u64,
    rx_no_room: u64,
}

struct Guest {
    _ram: GuestRam,
    q: ActiveQueues,
    avail: [u16; 2],
    seen: [u16; 2],
    offered: [VecDeque<Offered>; 2],
    /// The guest wrote to a ring behind the device's back: the model of what went where is off.
    hostile: bool,
    counted: Counted,
}

impl Guest {
    fn new() -> Self {
        let ram = GuestRam::new(1, &MemoryBacking::Memfd).expect("guest RAM");
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
            offered: [VecDeque::new(), VecDeque::new()],
            hostile: false,
            counted: Counted::default(),
        }
    }

    fn mem(&self) -> &GuestMemoryMmap {
        &self.q.mem
    }

    fn put_desc(&self, which: usize, i: u16, d: Desc, next: u16) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem()
            .write_slice(&b, GuestAddress(DESC[which] + 16 * u64::from(i)))
            .unwrap();
    }

    fn used_idx(&self, which: usize) -> u16 {
        self.mem()
            .read_obj(GuestAddress(DESC[which] + USED_OFF + 2))
            .unwrap()
    }

    /// The next free chain slot, if the device returned enough (a driver waits otherwise).
    fn free_slot(&self, which: usize) -> Option<u16> {
        (self.avail[which].wrapping_sub(self.used_idx(which)) < SLOTS)
            .then_some(self.avail[which] % SLOTS)
    }

    /// Writes the chain's descriptors (linked in order) and makes it available.
    fn offer(&mut self, which: usize, slot: u16, descs: Vec<Desc>, verdict: TxVerdict) {
        let head = slot * CHAIN_DESCS;
        for (k, d) in descs.iter().enumerate() {
            let i = head + k as u16;
            let more = k + 1 < descs.len();
            let flags = d.flags | if more { VIRTQ_DESC_F_NEXT } else { 0 };
            self.put_desc(which, i, Desc { flags, ..*d }, i + 1);
        }
        let avail = DESC[which] + AVAIL_OFF;
        let ring_slot = u64::from(self.avail[which] % QSIZE);
        self.mem()
            .write_obj(head, GuestAddress(avail + 4 + 2 * ring_slot))
            .unwrap();
        self.avail[which] = self.avail[which].wrapping_add(1);
        self.mem()
            .write_obj(self.avail[which], GuestAddress(avail + 2))
            .unwrap();
        self.offered[which].push_back(Offered {
            head,
            descs,
            verdict,
        });
    }

    /// What the device reads from a transmit chain when it is one: device-readable buffers
    /// in guest RAM, a header without offloads, then 14 to MAX_FRAME_LEN bytes.
    fn tx_frame(&self, descs: &[Desc]) -> Option<Vec<u8>> {
        let mut bytes = Vec::new();
        for d in descs {
            if d.flags & VIRTQ_DESC_F_WRITE != 0 || !in_ram(d.addr, d.len) {
                return None;
            }
            let mut b = vec![0u8; d.len as usize];
            self.mem().read_slice(&mut b, GuestAddress(d.addr)).ok()?;
            bytes.extend(b);
        }
        let frame = bytes.get(VNET_HDR_LEN..)?;
        ((MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&frame.len()) && bytes[0] == 0 && bytes[1] == 0)
            .then(|| frame.to_vec())
    }

    /// A frame to transmit, built from `sel` and the input (all of which is read first, so
    /// the rest of the input means the same whether or not the queue has room), offered in
    /// `copies` chains as far as the queue has room.
    fn transmit(&mut self, input: &mut Input, reference: &Reference, copies: u16) {
        let sel = input.u8();
        let frame = guest_frame(sel, input);
        let mut hdr = [0u8; VNET_HDR_LEN];
        if sel & 0x40 != 0 {
            hdr[0] = input.u8() & 3; // NEEDS_CSUM, DATA_VALID
            hdr[1] = input.pick(&[0, 1, 3, 4, 0x80]); // GSO types, ECN
            hdr[2..].copy_from_slice(&input.bytes(10));
        }
        // Up to four pieces in order, each (kind, length): a piece may be device-writable,
        // outside RAM, or claim a few bytes past its end (stale bytes of the slot).
        let pieces: Vec<(u8, u16)> = if sel & 0x80 == 0 {
            vec![(0, u16::MAX)]
        } else {
            let n = 1 + input.u8() % CHAIN_DESCS as u8;
            (0..n)
                .map(|k| {
                    let kind = input.u8();
                    (kind, if k + 1 == n { u16::MAX } else { input.u16() })
                })
                .collect()
        };
        let mut bytes = hdr.to_vec();
        bytes.extend_from_slice(&frame);
        let total = bytes.len() as u32;
        assert!(u64::from(total) + 3 <= SLOT_SPACING[TX]);
        for _ in 0..copies {
            let Some(slot) = self.free_slot(TX) else {
                return;
            };
            let base = BUFS[TX] + SLOT_SPACING[TX] * u64::from(slot);
            self.mem().write_slice(&bytes, GuestAddress(base)).unwrap();
            let mut at = 0u32;
            let descs = pieces
                .iter()
                .map(|&(kind, len)| {
                    let len = if len == u16::MAX {
                        total - at
                    } else {
                        u32::from(len) % (total - at + 1)
                    };
                    let addr = match kind & 0x0c {
                        0x0c => OUTSIDE[usize::from(kind & 0x10 != 0)],
                        _ => base + u64::from(at),
                    };
                    let extra = if kind & 0x20 != 0 {
                        u32::from(kind >> 6)
                    } else {
                        0
                    };
                    let flags = if kind & 3 == 3 { VIRTQ_DESC_F_WRITE } else { 0 };
                    at += len;
                    Desc {
                        addr,
                        len: len + extra,
                        flags,
                    }
                })
                .collect::<Vec<_>>();
            let verdict = match self.tx_frame(&descs) {
                None => TxVerdict::Malformed,
                Some(f) if reference.allows(&f) => TxVerdict::Passes(f),
                Some(_) => TxVerdict::Denied,
            };
            self.offer(TX, slot, descs, verdict);
        }
    }

    fn rx_buffers(&mut self, input: &mut Input) {
        const SIZES: [u32; 15] = [
            0, 1, 11, 12, 13, 26, 64, 100, 512, 1000, 1529, 1530, 1531, 2048, 4096,
        ];
        for _ in 0..1 + input.u8() % 4 {
            let n = 1 + input.u8() % CHAIN_DESCS as u8;
            let kinds: Vec<(u32, u8)> = (0..n).map(|_| (input.pick(&SIZES), input.u8())).collect();
            let Some(slot) = self.free_slot(RX) else {
                continue;
            };
            let base = BUFS[RX] + SLOT_SPACING[RX] * u64::from(slot);
            let descs = kinds
                .iter()
                .enumerate()
                .map(|(k, &(len, kind))| {
                    let addr = base + RX_DESC_SPACING * k as u64;
                    self.mem()
                        .write_slice(&[POISON; RX_DESC_SPACING as usize], GuestAddress(addr))
                        .unwrap();
                    match kind & 0x0f {
                        0x0f => Desc {
                            addr,
                            len,
                            flags: 0,
                        },
                        0x0e => Desc {
                            addr: OUTSIDE[usize::from(kind & 0x10 != 0)],
                            len,
                            flags: VIRTQ_DESC_F_WRITE,
                        },
                        _ => Desc {
                            addr,
                            len,
                            flags: VIRTQ_DESC_F_WRITE,
                        },
                    }
                })
                .collect();
            self.offer(RX, slot, descs, TxVerdict::Malformed);
        }
    }

    fn hostile(&mut self, input: &mut Input) {
        self.hostile = true;
        let which = usize::from(input.u8() & 1);
        let i = u16::from(input.u8()) % QSIZE;
        let at = DESC[which] + 16 * u64::from(i);
        match input.u8() % 6 {
            0 => {
                let idx = input.u16();
                self.mem()
                    .write_obj(idx, GuestAddress(DESC[which] + AVAIL_OFF + 2))
                    .unwrap();
            }
            1 => {
                let d = input.bytes(16);
                self.mem().write_slice(&d, GuestAddress(at)).unwrap();
            }
            2 => {
                let head = input.u16();
                let slot = u64::from(input.u8()) % u64::from(QSIZE);
                self.mem()
                    .write_obj(head, GuestAddress(DESC[which] + AVAIL_OFF + 4 + 2 * slot))
                    .unwrap();
            }
            3 => {
                // A loop back to the chain's head.
                let flags = VIRTQ_DESC_F_NEXT | (input.u8() as u16 & VIRTQ_DESC_F_WRITE);
                self.mem().write_obj(flags, GuestAddress(at + 12)).unwrap();
                self.mem()
                    .write_obj(i - i % CHAIN_DESCS, GuestAddress(at + 14))
                    .unwrap();
            }
            4 => {
                self.mem()
                    .write_obj(VIRTQ_DESC_F_INDIRECT, GuestAddress(at + 12))
                    .unwrap();
            }
            _ => {
                // The used ring is the device's; the guest may still scribble there.
                let v = input.u32();
                let off = 4 * (u64::from(input.u8()) % (2 + 2 * u64::from(QSIZE)));
                self.mem()
                    .write_obj(v, GuestAddress(DESC[which] + USED_OFF + off))
                    .unwrap();
            }
        }
    }

    fn reset(&mut self) {
        for ring in DESC {
            self.mem()
                .write_slice(&[0u8; 0x3000], GuestAddress(ring))
                .unwrap();
        }
        self.q.queues = vec![queue(RX), queue(TX)];
        self.q.interrupt.clear();
        self.avail = [0; 2];
        self.seen = [0; 2];
        // Chains not taken are gone with the rings (a reset loses what the device had not
        // read); the backend connection and what it holds stay.
        self.offered = [VecDeque::new(), VecDeque::new()];
    }

    /// The used elements returned since the last call.
    fn take_used(&mut self, which: usize) -> Vec<(u32, u32)> {
        let used = self.used_idx(which);
        let new = used.wrapping_sub(self.seen[which]);
        if !self.hostile {
            assert!(new <= QSIZE, "queue {which}: {new} chains returned at once");
        }
        let mut out = Vec::new();
        for _ in 0..new.min(QSIZE) {
            let at = DESC[which] + USED_OFF + 4 + 8 * u64::from(self.seen[which] % QSIZE);
            let id: u32 = self.mem().read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem().read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.seen[which] = self.seen[which].wrapping_add(1);
        }
        self.seen[which] = used;
        out
    }

    /// The transmit chains the device returned: their frames are now the backend's due.
    fn reap_tx(&mut self, due: &mut VecDeque<Vec<u8>>) {
        for (id, len) in self.take_used(TX) {
            if self.hostile {
                continue;
            }
            let chain = self.offered[TX]
                .pop_front()
                .expect("a transmit chain returned that was never offered");
            assert_eq!(id, u32::from(chain.head), "transmit chains out of order");
            assert_eq!(len, 0, "a transmit chain returned as written");
            match chain.verdict {
                TxVerdict::Malformed => self.counted.tx_malformed += 1,
                TxVerdict::Denied => self.counted.tx_denied += 1,
                TxVerdict::Passes(f) => {
                    self.counted.tx_passed += 1;
                    due.push_back(f);
                }
            }
        }
    }

    /// The receive chains the device returned, each checked against the next frame of the
    /// backend's stream.
    fn reap_rx(&mut self, stream: &mut Stream) {
        for (id, len) in self.take_used(RX) {
            if self.hostile {
                continue;
            }
            let chain = self.offered[RX]
                .pop_front()
                .expect("a receive chain returned that was never offered");
            assert_eq!(id, u32::from(chain.head), "receive chains out of order");
            let frame = stream
                .frames
                .pop_front()
                .expect("a receive chain returned without a frame for it");
            self.counted.rx_given += 1;
            let need = VNET_HDR_LEN + frame.len();
            let writable: Vec<&Desc> = chain
                .descs
                .iter()
                .filter(|d| d.flags & VIRTQ_DESC_F_WRITE != 0)
                .collect();
            let room: u64 = writable.iter().map(|d| u64::from(d.len)).sum();
            let fits = room >= need as u64 && chain.descs.iter().all(|d| in_ram(d.addr, d.len));
            if len == 0 {
                assert!(
                    !fits,
                    "a frame of {} bytes fit but was not given",
                    frame.len()
                );
                self.counted.rx_no_room += 1;
                continue;
            }
            assert!(
                fits,
                "{len} bytes written into a chain that cannot hold them"
            );
            assert_eq!(len as usize, need, "used length");
            let mut got = Vec::with_capacity(need);
            for d in writable {
                let take = (d.len as usize).min(need - got.len());
                let mut b = vec![0u8; take];
                self.mem().read_slice(&mut b, GuestAddress(d.addr)).unwrap();
                got.extend(b);
            }
            let mut want = vec![0u8; VNET_HDR_LEN];
            want[10] = 1; // num_buffers
            want.extend_from_slice(&frame);
            assert!(
                got == want,
                "the receive buffer does not hold header and frame"
            );
        }
    }

    fn irq_fired(&self) -> bool {
        self.q.interrupt.eventfd().read().is_ok()
    }
}

/// Builds the frame of a guest transmit event.
fn guest_frame(sel: u8, input: &mut Input) -> Vec<u8> {
    let mut f = vec![0x52, 0x56, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 0x0f];
    match sel & 3 {
        0 | 1 => {
            let udp = sel & 3 == 0;
            let dst = input.pick(&ADDRS);
            let port = input.pick(&[53u16, 80, 443, 9999]);
            let payload = usize::from(input.u16() % 1700);
            let fragment = sel & 0x20 != 0;
            let l4_len = if udp { 8 } else { 20 };
            let total = 20 + l4_len + payload;
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&(total as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0, if fragment { 0x20 } else { 0x40 }, 0, 64]);
            f.push(if udp { 17 } else { 6 });
            f.extend_from_slice(&[0, 0, 10, 0, 2, 15]);
            f.extend_from_slice(&dst);
            f.extend_from_slice(&40000u16.to_be_bytes());
            f.extend_from_slice(&port.to_be_bytes());
            if udp {
                f.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
                f.extend_from_slice(&[0, 0]);
            } else {
                f.extend_from_slice(&[0; 8]);
                f.push(input.pick(&[0x50, 0x40, 0xf0, 0x80]));
                f.extend_from_slice(&[0x02, 0xff, 0xff, 0, 0, 0, 0]);
            }
            let seed = input.u8();
            f.extend((0..payload).map(|i| seed.wrapping_add(i as u8)));
            if sel & 0x10 != 0 {
                // One byte of the IPv4 header made up.
                let at = 14 + usize::from(input.u8() % 20);
                f[at] = input.u8();
            }
        }
        2 => {
            let (ethertype, len) = input.pick(&[
                (0x0806u16, 28usize),
                (0x86dd, 48),
                (0x8100, 46),
                (0x0800, 0),
                (0x0800, 19),
                (0x0060, 46),
            ]);
            f.extend_from_slice(&ethertype.to_be_bytes());
            f.extend(std::iter::repeat_n(0x45, len));
        }
        _ => {
            let len = input.pick(&[0usize, 1, 13, 14, 15, 64, 1517, 1518, 1519, 2000]);
            f = input.bytes(len);
        }
    }
    f
}

// ---- The backend ---------------------------------------------------------------------------

/// What the backend wrote, read as the device must read it.
#[derive(Default)]
struct Stream {
    bytes: Vec<u8>,
    parsed: usize,
    /// An impossible length came: nothing after it is a frame.
    broken: bool,
    /// Frames the guest can be given (14 to MAX_FRAME_LEN bytes), in order, not given yet.
    frames: VecDeque<Vec<u8>>,
}

impl Stream {
    fn wrote(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
        while !self.broken {
            let Some(len) = self.bytes.get(self.parsed..self.parsed + 4) else {
                break;
            };
            let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
            if len == 0 || len > MAX_BACKEND_FRAME {
                self.broken = true;
                break;
            }
            let Some(frame) = self.bytes.get(self.parsed + 4..self.parsed + 4 + len) else {
                break;
            };
            if (MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len) {
                self.frames.push_back(frame.to_vec());
            }
            self.parsed += 4 + len;
        }
        // Only the unparsed tail is needed again.
        self.bytes.drain(..self.parsed);
        self.parsed = 0;
    }
}

struct Backend {
    s: Option<UnixStream>,
    /// Closed or shut down, one way or both.
    hung_up: bool,
    /// May still write (not shut down for writing).
    writable: bool,
    /// Bytes written but not yet taken by the socket: written later, as a backend would.
    backlog: Vec<u8>,
    stream: Stream,
    /// Bytes read and not yet a whole frame.
    partial: Vec<u8>,
    /// Frames received.
    received: usize,
    /// Frames made up for the guest so far (each one differs).
    made: u32,
}

fn inbound(seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x0f, 0x52, 0x56, 0, 0, 0, 2, 0x08, 0x00];
    let tag = seq.to_be_bytes();
    f.extend((0..len.saturating_sub(14)).map(|i| tag[i % 4] ^ (i as u8)));
    f.truncate(len);
    f
}

impl Backend {
    fn framed(frame: &[u8]) -> Vec<u8> {
        let mut v = (frame.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(frame);
        v
    }

    fn next_frame(&mut self, len: usize) -> Vec<u8> {
        self.made += 1;
        Self::framed(&inbound(self.made, len))
    }

    /// Writes `bytes` after what the socket has not taken yet (a write that would make that
    /// more than MAX_BACKLOG is not made at all, so the stream stays in step).
    fn put(&mut self, bytes: &[u8]) {
        if self.s.is_none() || !self.writable || self.backlog.len() + bytes.len() > MAX_BACKLOG {
            return;
        }
        self.backlog.extend_from_slice(bytes);
        self.flush();
    }

    /// Writes what the socket takes of the backlog, and notes it.
    fn flush(&mut self) {
        let Some(s) = self.s.as_mut().filter(|_| self.writable) else {
            self.backlog.clear();
            return;
        };
        let mut at = 0;
        while at < self.backlog.len() {
            match s.write(&self.backlog[at..]) {
                Ok(0) => break,
                Ok(n) => at += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    // The device hung up: nothing more will be taken.
                    self.stream.wrote(&self.backlog[..at]);
                    self.backlog.clear();
                    return;
                }
            }
        }
        self.stream.wrote(&self.backlog[..at]);
        self.backlog.drain(..at);
    }

    /// Returns pieces to write with the relay served in between, for frames cut up.
    fn write(&mut self, input: &mut Input) -> Vec<Vec<u8>> {
        match input.u8() % 7 {
            0 => {
                let n = 1 + input.u8() % 4;
                let mut bytes = Vec::new();
                for _ in 0..n {
                    let len = input.pick(&[14usize, 15, 60, 200, 1000, 1500, 1518]);
                    bytes.extend(self.next_frame(len));
                }
                self.put(&bytes);
            }
            1 => {
                let len = input.pick(&[0u32, MAX_BACKEND_FRAME as u32 + 1, u32::MAX, 1 << 31]);
                let mut bytes = len.to_be_bytes().to_vec();
                bytes.extend(self.next_frame(60));
                self.put(&bytes);
            }
            2 => {
                let len = input.pick(&[1usize, 13, MAX_FRAME_LEN + 1, 9000, MAX_BACKEND_FRAME]);
                let bytes = self.next_frame(len);
                self.put(&bytes);
            }
            3 => {
                let n = usize::from(input.u8());
                let bytes = input.bytes(n);
                self.put(&bytes);
            }
            4 => {
                let len = input.pick(&[14usize, 100, 1518, 9000]);
                let mut bytes = self.next_frame(len);
                bytes.truncate(usize::from(input.u16()) % bytes.len());
                self.put(&bytes);
            }
            5 => {
                let n = 1 + usize::from(input.u8() % 128);
                let bytes: Vec<u8> = (0..n).flat_map(|_| self.next_frame(1000)).collect();
                self.put(&bytes);
            }
            _ => {
                let len = input.pick(&[14usize, 100, 1518, 3000]);
                let bytes = self.next_frame(len);
                let pieces = 1 + usize::from(input.u8() % 8);
                let size = bytes.len().div_ceil(pieces);
                return bytes.chunks(size).map(<[u8]>::to_vec).collect();
            }
        }
        Vec::new()
    }

    /// Reads everything the device sent and checks each frame: framed, of a frame's length,
    /// allowed, and (while the guest keeps to the protocol) the next one due.
    fn read(&mut self, reference: &Reference, due: Option<&VecDeque<Vec<u8>>>) {
        let Some(s) = self.s.as_mut() else {
            return;
        };
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => self.partial.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let mut at = 0;
        while let Some(len) = self.partial.get(at..at + 4) {
            let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
            assert!(
                (MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len),
                "the device framed {len} bytes"
            );
            let Some(frame) = self.partial.get(at + 4..at + 4 + len) else {
                break;
            };
            assert!(
                reference.allows(frame),
                "a denied frame reached the backend"
            );
            if let Some(due) = due {
                assert!(
                    due.get(self.received).is_some_and(|want| want == frame),
                    "frame {} at the backend is not the one the guest sent",
                    self.received
                );
            }
            self.received += 1;
            at += 4 + len;
        }
        self.partial.drain(..at);
    }

    fn close(&mut self, how: u8) {
        self.hung_up |= self.s.is_some();
        match (how % 3, self.s.as_ref()) {
            (_, None) => {}
            (0, Some(_)) => self.s = None,
            (1, Some(s)) => {
                let _ = s.shutdown(Shutdown::Write);
                self.writable = false;
            }
            (_, Some(s)) => {
                let _ = s.shutdown(Shutdown::Both);
                self.writable = false;
            }
        }
    }
}

// ---- The run -------------------------------------------------------------------------------

/// Everything one input drives.
struct World {
    backend: NetBackend,
    guest: Guest,
    peer: Backend,
    reference: Reference,
    now: Instant,
    /// Frames the backend must receive, in order: the allowed well-formed frames of the
    /// transmit chains the device returned.
    due: VecDeque<Vec<u8>>,
}

impl World {
    /// Polls and serves until a pass leaves nothing for the next, checking the bounds after
    /// each pass.
    fn settle(&mut self) {
        let _ = self.guest.irq_fired(); // only this settling's interrupts count below
        let used_before = [self.guest.used_idx(RX), self.guest.used_idx(TX)];
        for round in 0.. {
            assert!(round < MAX_ROUNDS, "the relay does not settle");
            self.peer.flush();
            self.backend.poll(None, Duration::ZERO);
            let served = self.backend.serve(&mut self.guest.q, self.now);
            let (out, held_in) = self.backend.pending();
            assert!(
                out <= MAX_PENDING_OUT + 4 + MAX_FRAME_LEN,
                "{out} bytes held for the backend"
            );
            assert!(
                held_in <= MAX_PENDING_IN,
                "{held_in} bytes held for the guest"
            );
            if let Some(at) = served.wake_at {
                assert!(
                    at > self.now,
                    "a rate-limit wake-up that is not in the future"
                );
            }
            if !served.more {
                break;
            }
        }
        let q = &self.guest.q;
        for (which, queue) in q.queues.iter().enumerate() {
            let s = queue.state();
            assert!(
                s.next_used == s.next_avail || q.interrupt.needs_reset(),
                "queue {which}: {} chains taken, {} returned",
                s.next_avail,
                s.next_used
            );
        }
        let used_after = [self.guest.used_idx(RX), self.guest.used_idx(TX)];
        if used_after != used_before && !self.guest.hostile {
            assert!(
                self.guest.irq_fired(),
                "chains returned without an interrupt"
            );
        }
        self.guest.reap_tx(&mut self.due);
        self.guest.reap_rx(&mut self.peer.stream);
        let c = self.backend.counters();
        assert!(
            c.backend_connected || self.peer.stream.broken || self.peer.hung_up,
            "the device ended a backend that neither hung up nor broke the framing"
        );
        if !self.guest.hostile {
            assert!(
                !self.guest.q.interrupt.needs_reset(),
                "a reset asked of a guest that kept to the protocol"
            );
            let f = &c.filter;
            let seen = Counted {
                tx_malformed: c.tx_malformed,
                tx_denied: f.frames() - f.passed_out_frames - f.passed_in_frames,
                tx_passed: f.passed_out_frames,
                rx_given: f.passed_in_frames,
                rx_no_room: c.rx_no_room,
            };
            assert_eq!(seen, self.guest.counted, "the device's counters");
        }
    }

    /// Everything that shows the relay moving frames.
    fn progress(&self) -> ([u16; 2], usize, (usize, usize), usize) {
        (
            [self.guest.used_idx(RX), self.guest.used_idx(TX)],
            self.peer.received,
            self.backend.pending(),
            self.peer.backlog.len(),
        )
    }

    fn backend_read(&mut self) {
        let due = (!self.guest.hostile).then_some(&self.due);
        self.peer.read(&self.reference, due);
    }

    /// The end of a run: time passes, the backend reads and the guest offers big buffers until
    /// nothing moves. A backend still connected then has every frame the guest sent, and the
    /// guest every frame the backend sent.
    fn finish(&mut self) {
        let mut still = 0;
        // A rate limit lets one frame through per round: at most every frame held.
        for _ in 0..MAX_FINISH_ROUNDS {
            let before = self.progress();
            self.now += Duration::from_secs(2);
            while let Some(slot) = self.guest.free_slot(RX) {
                let addr = BUFS[RX] + SLOT_SPACING[RX] * u64::from(slot);
                let len = 4 * RX_DESC_SPACING as u32;
                let desc = Desc {
                    addr,
                    len,
                    flags: VIRTQ_DESC_F_WRITE,
                };
                self.guest.offer(RX, slot, vec![desc], TxVerdict::Malformed);
                if self.guest.hostile {
                    break;
                }
            }
            self.settle();
            self.backend_read();
            still = if self.progress() == before {
                still + 1
            } else {
                0
            };
            if still == 3 {
                break;
            }
        }
        assert_eq!(still, 3, "the relay is still moving frames");
        let connected = self.backend.counters().backend_connected;
        if connected && !self.guest.hostile && !self.guest.q.interrupt.needs_reset() {
            assert!(
                self.guest.offered[TX].is_empty(),
                "transmit chains never taken"
            );
            assert_eq!(
                self.peer.received,
                self.due.len(),
                "frames the guest sent that never reached the backend"
            );
            assert!(
                self.peer.stream.frames.is_empty(),
                "frames the backend sent that never reached the guest"
            );
        }
    }
}

/// Gives a socket a small fixed send buffer: the bounds are reached sooner, and the same
/// input does the same on any host.
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

fn target(data: &[u8]) {
    let mut input = Input(data);
    let (policy, reference, limits) = policy(&mut input);
    let (device_end, peer_end) = UnixStream::pair().unwrap();
    fixed_send_buffer(&device_end);
    fixed_send_buffer(&peer_end);
    peer_end.set_nonblocking(true).unwrap();
    let now = Instant::now();
    let mut w = World {
        backend: NetBackend::new(device_end, policy, limits, now).expect("the relay"),
        guest: Guest::new(),
        peer: Backend {
            s: Some(peer_end),
            hung_up: false,
            writable: true,
            backlog: Vec::new(),
            stream: Stream::default(),
            partial: Vec::new(),
            received: 0,
            made: 0,
        },
        reference,
        now,
        due: VecDeque::new(),
    };
    for _ in 0..MAX_EVENTS {
        if input.is_empty() {
            break;
        }
        match input.u8() % EVENTS {
            e if e == Event::GuestTx as u8 => w.guest.transmit(&mut input, &w.reference, 1),
            e if e == Event::GuestTxBurst as u8 => {
                w.guest.transmit(&mut input, &w.reference, SLOTS);
            }
            e if e == Event::RxBuffers as u8 => w.guest.rx_buffers(&mut input),
            e if e == Event::BackendWrite as u8 => {
                for piece in w.peer.write(&mut input) {
                    w.peer.put(&piece);
                    w.settle();
                }
            }
            e if e == Event::BackendRead as u8 => w.backend_read(),
            e if e == Event::BackendClose as u8 => w.peer.close(input.u8()),
            e if e == Event::Time as u8 => {
                let n = input.u8();
                w.now += if n & 0x80 != 0 {
                    Duration::from_secs(u64::from(n & 0x7f))
                } else {
                    Duration::from_millis(10 * u64::from(n))
                };
            }
            e if e == Event::Hostile as u8 => w.guest.hostile(&mut input),
            e if e == Event::Reset as u8 => w.guest.reset(),
            _ => unreachable!(),
        }
        w.settle();
    }
    w.finish();
}

#[test]
fn virtio_net() {
    fuzz_support::run("virtio_net", target);
}

// ---- Seeds ---------------------------------------------------------------------------------

/// Builds seed inputs: the policy, then event by event.
struct Seed(Vec<u8>);

/// A guest frame as [`Guest::transmit`] reads it.
#[derive(Clone, Default)]
struct Tx {
    tcp: bool,
    dst: u8,
    port: u8,
    payload: u16,
    fragment: bool,
    /// (byte of the IPv4 header, value)
    corrupt: Option<(u8, u8)>,
    /// (flags, index of gso_type, the other ten bytes)
    hdr: Option<(u8, u8, [u8; 10])>,
    /// (kind, length) per descriptor; empty: one descriptor.
    layout: Vec<(u8, u16)>,
}

impl Seed {
    /// `flags` (rule count in the low three bits, 0x40 a resolver, 0x80 deny by default), the
    /// rules as (action, index into NETS), and the tx and rx rate-limit bytes.
    fn policy(flags: u8, rules: &[(u8, u8)], tx: u8, rx: u8) -> Self {
        assert_eq!(usize::from(flags & 7), rules.len());
        let mut v = vec![flags];
        for (action, net) in rules {
            v.extend([*action, *net]);
        }
        v.extend([tx, rx]);
        Seed(v)
    }

    fn open() -> Self {
        Self::policy(0, &[], 0, 0)
    }

    fn ev(mut self, e: Event, args: &[u8]) -> Self {
        self.0.push(e as u8);
        self.0.extend(args);
        self
    }

    fn tx(self, t: Tx) -> Self {
        let sel = u8::from(t.tcp)
            | if t.corrupt.is_some() { 0x10 } else { 0 }
            | if t.fragment { 0x20 } else { 0 }
            | if t.hdr.is_some() { 0x40 } else { 0 }
            | if t.layout.is_empty() { 0 } else { 0x80 };
        let mut a = vec![sel, t.dst, t.port];
        a.extend(t.payload.to_le_bytes());
        if t.tcp {
            a.push(0);
        }
        a.push(7);
        if let Some((at, v)) = t.corrupt {
            a.extend([at, v]);
        }
        if let Some((flags, gso, rest)) = t.hdr {
            a.extend([flags, gso]);
            a.extend(rest);
        }
        if !t.layout.is_empty() {
            a.push(t.layout.len() as u8 - 1);
            for (k, (kind, len)) in t.layout.iter().enumerate() {
                a.push(*kind);
                if k + 1 < t.layout.len() {
                    a.extend(len.to_le_bytes());
                }
            }
        }
        self.ev(Event::GuestTx, &a)
    }

    /// A UDP frame in one descriptor to `ADDRS[dst]`, port index, payload length.
    fn udp(self, dst: u8, port: u8, payload: u16) -> Self {
        self.tx(Tx {
            dst,
            port,
            payload,
            ..Tx::default()
        })
    }

    /// A raw guest frame of `RAW_LENS[len]` bytes.
    fn raw_tx(self, len: u8, bytes: &[u8]) -> Self {
        let mut a = vec![3, len];
        a.extend(bytes);
        self.ev(Event::GuestTx, &a)
    }

    /// Receive chains, each a list of (index into the size table, kind).
    fn rx_chains(self, chains: &[&[(u8, u8)]]) -> Self {
        assert!((1..=4).contains(&chains.len()));
        assert!(chains.iter().all(|c| (1..=4).contains(&c.len())));
        let mut a = vec![chains.len() as u8 - 1];
        for c in chains {
            a.push(c.len() as u8 - 1);
            for (size, kind) in c.iter() {
                a.extend([*size, *kind]);
            }
        }
        self.ev(Event::RxBuffers, &a)
    }

    /// `n` (up to four) receive buffers of one descriptor of size index `size`.
    fn rx(self, n: usize, size: u8) -> Self {
        let one: &[(u8, u8)] = &[(size, 0)];
        self.rx_chains(&vec![one; n])
    }

    /// Backend frames (up to four) of the given length indices.
    fn frames(self, lens: &[u8]) -> Self {
        assert!((1..=4).contains(&lens.len()));
        let mut a = vec![0, lens.len() as u8 - 1];
        a.extend(lens);
        self.ev(Event::BackendWrite, &a)
    }
}

/// Indices into ADDRS, NETS and the other tables used by the seeds.
const PUBLIC: u8 = 14;
const METADATA: u8 = 4;
const GATEWAY: u8 = 0;
const DNS: u8 = 1;
const LOOPBACK: u8 = 5;
const TEST_NET: u8 = 12;
const NET_ALL: u8 = 0;
const NET_TEST: u8 = 6;
const PORT_53: u8 = 0;
const PORT_80: u8 = 1;
/// Receive buffer sizes: 0, 11, 13, 64, 1530 and 2048 bytes.
const RX_0: u8 = 0;
const RX_11: u8 = 2;
const RX_13: u8 = 4;
const RX_64: u8 = 6;
const RX_1530: u8 = 11;
const RX_2048: u8 = 13;
/// Backend frame lengths (kind 0): 14, 15, 60, 200, 1518 bytes.
const IN_14: u8 = 0;
const IN_15: u8 = 1;
const IN_60: u8 = 2;
const IN_200: u8 = 3;
const IN_1518: u8 = 6;

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let both_ways = Seed::open()
        .rx(4, RX_2048)
        .udp(PUBLIC, PORT_80, 100)
        .frames(&[IN_14, IN_60, IN_200, IN_1518])
        .ev(Event::BackendRead, &[]);
    let policy = Seed::policy(0x40 | 2, &[(1, NET_ALL), (0, NET_TEST)], 0, 0)
        .udp(PUBLIC, PORT_80, 10)
        .udp(TEST_NET, PORT_80, 10)
        .udp(METADATA, PORT_80, 10)
        .udp(DNS, PORT_53, 10)
        .udp(DNS, PORT_80, 10)
        .tx(Tx {
            tcp: true,
            dst: DNS,
            port: PORT_53,
            payload: 10,
            ..Tx::default()
        })
        .tx(Tx {
            dst: DNS,
            port: PORT_53,
            fragment: true,
            ..Tx::default()
        })
        .ev(Event::BackendRead, &[]);
    let builtin = Seed::policy(0x80, &[], 0, 0)
        .udp(METADATA, PORT_80, 10)
        .udp(GATEWAY, PORT_80, 10)
        .udp(LOOPBACK, PORT_80, 10)
        .ev(Event::GuestTx, &[2, 1]) // IPv6
        .ev(Event::GuestTx, &[2, 0]) // ARP
        .ev(Event::GuestTx, &[2, 2]) // VLAN-tagged
        .ev(Event::BackendRead, &[]);
    let offload = |flags, gso| Tx {
        dst: PUBLIC,
        port: PORT_80,
        payload: 10,
        hdr: Some((flags, gso, [0; 10])),
        ..Tx::default()
    };
    let hostile_headers = Seed::open()
        .tx(offload(1, 0))
        .tx(offload(0, 1))
        .tx(offload(0, 0))
        .raw_tx(2, &[0x11; 13])
        .raw_tx(8, &[0x22; 1519])
        .raw_tx(7, &[0x33; 1518])
        .tx(Tx {
            dst: PUBLIC,
            port: PORT_80,
            payload: 10,
            corrupt: Some((0, 0x56)),
            ..Tx::default()
        })
        .tx(Tx {
            dst: PUBLIC,
            port: PORT_80,
            payload: 1700 - 1,
            ..Tx::default()
        })
        .ev(Event::BackendRead, &[]);
    let split = |layout: Vec<(u8, u16)>| Tx {
        dst: PUBLIC,
        port: PORT_80,
        payload: 100,
        layout,
        ..Tx::default()
    };
    let layouts = Seed::open()
        .tx(split(vec![(0, 5), (0, 7), (0, 0), (0, 0)]))
        .tx(split(vec![(0, 12), (3, 0)]))
        .tx(split(vec![(0, 12), (0x0c, 0)]))
        .tx(split(vec![(0x1c, 12), (0, 0)]))
        .tx(split(vec![(0, 20), (0xe0, 0)]))
        .ev(Event::BackendRead, &[]);
    let rx_odd = Seed::open()
        .rx_chains(&[
            &[(RX_0, 0), (RX_11, 0), (RX_0, 0), (RX_2048, 0)],
            &[(RX_2048, 0x0f)],
            &[(RX_2048, 0x0e)],
            &[(RX_64, 0x1e), (RX_2048, 0)],
        ])
        .rx_chains(&[&[(RX_13, 0)], &[(RX_1530, 0)], &[(RX_1530, 0)]])
        .frames(&[IN_60, IN_60, IN_60, IN_60])
        .frames(&[IN_15, IN_1518, IN_200]);
    let bad_lengths = Seed::open()
        .rx(2, RX_2048)
        .frames(&[IN_15])
        .ev(Event::BackendWrite, &[1, 1])
        .udp(PUBLIC, PORT_80, 10)
        .ev(Event::BackendRead, &[]);
    let oversized = Seed::open()
        .rx(2, RX_2048)
        .ev(Event::BackendWrite, &[2, 3])
        .ev(Event::BackendWrite, &[2, 4])
        .ev(Event::BackendWrite, &[2, 1])
        .ev(Event::BackendWrite, &[2, 2])
        .frames(&[IN_60]);
    let split_and_hangup = Seed::open()
        .rx(2, RX_2048)
        .ev(Event::BackendWrite, &[6, 2, 7])
        .ev(Event::BackendWrite, &[4, 1, 50, 0])
        .ev(Event::BackendClose, &[0])
        .udp(PUBLIC, PORT_80, 10);
    let half_close = Seed::open()
        .rx(1, RX_2048)
        .frames(&[IN_200])
        .ev(Event::BackendClose, &[1])
        .udp(PUBLIC, PORT_80, 10)
        .ev(Event::BackendRead, &[]);
    let mut flood = Seed::open();
    for _ in 0..4 {
        flood = flood.ev(Event::BackendWrite, &[5, 127]);
    }
    let flood = flood.rx(4, RX_2048).ev(Event::Time, &[1]).rx(4, RX_2048);
    let mut no_reader = Seed::open();
    for _ in 0..48 {
        no_reader = no_reader.ev(Event::GuestTxBurst, &[0, PUBLIC, PORT_80, 0x78, 0x05, 7]);
    }
    let no_reader = no_reader.ev(Event::BackendRead, &[]);
    let rate = Seed::policy(0, &[], 0x01, 0x09)
        .udp(PUBLIC, PORT_80, 10)
        .udp(PUBLIC, PORT_80, 10)
        .udp(PUBLIC, PORT_80, 10)
        .rx(3, RX_2048)
        .frames(&[IN_14, IN_14, IN_14, IN_14])
        .ev(Event::Time, &[50])
        .ev(Event::BackendRead, &[])
        .ev(Event::Time, &[0x81])
        .ev(Event::BackendRead, &[]);
    let hostile = Seed::open()
        .rx(2, RX_2048)
        .udp(PUBLIC, PORT_80, 10)
        .ev(Event::Hostile, &[1, 0, 0, 0x40, 0])
        .udp(PUBLIC, PORT_80, 10)
        .ev(Event::Reset, &[])
        .ev(Event::Hostile, &[1, 0, 3, 0])
        .udp(PUBLIC, PORT_80, 10)
        .ev(Event::Reset, &[])
        .ev(Event::Hostile, &[1, 0, 4])
        .udp(PUBLIC, PORT_80, 10)
        .ev(Event::Hostile, &[0, 4, 5, 0xff, 0xff, 0xff, 0xff, 1])
        .frames(&[IN_60]);
    let reset_mid_stream = Seed::open()
        .rx(1, RX_2048)
        .frames(&[IN_60, IN_60, IN_60, IN_60])
        .ev(Event::Reset, &[])
        .rx(4, RX_2048)
        .udp(PUBLIC, PORT_80, 10)
        .ev(Event::Reset, &[])
        .ev(Event::BackendRead, &[]);
    vec![
        ("both-ways", both_ways.0),
        ("policy-rules-and-resolver", policy.0),
        ("builtin-ranges-default-deny", builtin.0),
        ("hostile-headers", hostile_headers.0),
        ("descriptor-layouts", layouts.0),
        ("rx-odd-buffers", rx_odd.0),
        ("bad-lengths", bad_lengths.0),
        ("oversized-frames", oversized.0),
        ("split-and-hangup", split_and_hangup.0),
        ("half-close", half_close.0),
        ("flood-without-buffers", flood.0),
        ("backend-not-reading", no_reader.0),
        ("rate-limits", rate.0),
        ("hostile-rings-and-reset", hostile.0),
        ("reset-mid-stream", reset_mid_stream.0),
    ]
}

/// The committed seeds are exactly what [`seeds`] builds; with
/// `SUPERMACHINE_FUZZ_WRITE_SEEDS=1` they are (re)written instead.
#[test]
fn seed_corpus() {
    fuzz_support::check_seeds("virtio_net", &seeds());
}
