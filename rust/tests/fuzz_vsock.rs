//! Fuzz target `vsock`: the virtio-vsock connection state machine, driven without threads.
//!
//! The input is a sequence of events (see [`Event`]): guest packets on the tx queue (headers
//! with arbitrary op, ports, lengths, credit fields and buffer layouts), receive buffers the
//! guest offers, host connections through the Unix socket (CONNECT lines good and bad), host
//! writes and closes on either kind of connection, the clock jumping forward, hostile writes to
//! the rings, and driver resets. After each event the device takes one non-blocking poll and
//! serves its queues until it has nothing left to do. It must never panic, stay within its
//! limits (connections, buffered bytes, queued replies), finish each pass in a bounded number
//! of rounds, return every chain it took, and only ever put well-formed packets in the guest's
//! receive buffers, within the credit the guest gave.
//!
//! The seed corpus in `rust/fuzz/corpus/vsock/` is written by
//! `SUPERMACHINE_FUZZ_WRITE_SEEDS=1 cargo test --test fuzz_vsock seed_corpus`.

// The shared driver has an unneeded `mut` (reported upstream); keep -D warnings clean here.
#[allow(unused_mut)]
mod fuzz_support;

use fuzz_support::Input;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use supermachine_core::devices::virtio::device_thread::ActiveQueues;
use supermachine_core::devices::virtio::queue::{Queue, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use supermachine_core::devices::virtio::vsock::{
    Header, Served, VsockBackend, BUF_ALLOC, GUEST_CID, HDR_LEN, HOST_CID, MAX_CONNECTIONS,
    MAX_PAYLOAD, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, RX, TX,
    TYPE_STREAM,
};
use supermachine_core::devices::virtio::Interrupt;
use supermachine_core::vmm::memory::{GuestRam, MemoryBacking};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 16;
/// Descriptor tables of the rx, tx and event queues; each ring follows its table.
const DESC: [u64; 3] = [0x10000, 0x20000, 0x30000];
const AVAIL_OFF: u64 = 0x1000;
const USED_OFF: u64 = 0x2000;
const RX_BUFS: u64 = 0x40000;
const RX_BUF_SPACING: u64 = 0x2000;
const TX_BUFS: u64 = 0x80000;
const TX_BUF_SPACING: u64 = 0x2000;
/// Guest ports the host asks for, and host ports that have a listener.
const GUEST_PORTS: u32 = 4;
const LISTENED_PORTS: [u32; 2] = [1, 2];
const MAX_EVENTS: usize = 200;
const MAX_HOST_STREAMS: usize = 8;
/// Serving stops at a budget per pass; this many passes after one event is plenty.
const MAX_ROUNDS: usize = 64;
/// Most control packets held for the guest (the device's MAX_PENDING_REPLIES).
const MAX_PENDING_REPLIES: usize = 1024;

/// Event kinds, the first byte of each event.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
enum Event {
    /// `sel`, then a structured header (or 44 raw bytes when `sel & 0x80`), then the payload.
    GuestPacket = 0,
    /// `count`, `size class`: rx buffers for the device.
    RxBuffers = 1,
    /// `line kind`, `port`: a host connection through the device's socket.
    HostConnect = 2,
    /// `stream`, `length`: the host writes on one of its connections.
    HostWrite = 3,
    /// `stream`, `how`: the host closes (or half-closes) one of its connections.
    HostClose = 4,
    /// Host listeners accept what the guest connected, and every host stream is read.
    HostAcceptAndRead = 5,
    /// `tenths of a second`: the clock moves on.
    Time = 6,
    /// `queue`, `what`, then bytes: the guest scribbles on a ring.
    Hostile = 7,
    /// The guest looks at its rx buffers (it also does after every event).
    GuestReceive = 8,
    /// The driver resets the device.
    Reset = 9,
}

const EVENTS: u8 = 10;

/// The credit a guest gave on a connection and the payload it received since it began.
/// `known` is false when the guest sent something whose effect on the device's connection is
/// ambiguous (a second REQUEST for a live connection, say); the credit is not checked then.
#[derive(Debug, Clone, Copy)]
struct Credit {
    buf_alloc: u32,
    fwd_cnt: u32,
    received: u32,
    known: bool,
}

struct Guest {
    _ram: GuestRam,
    q: ActiveQueues,
    tx_avail: u16,
    rx_avail: u16,
    rx_seen: u16,
    /// rx buffer length per descriptor index.
    rx_len: [u32; QSIZE as usize],
    /// The guest wrote to a ring behind the device's back: ring-level checks are off.
    hostile: bool,
    /// What the guest knows of each connection, keyed (host port, guest port).
    credit: HashMap<(u32, u32), Credit>,
}

fn queue(which: usize) -> Queue {
    let mut q = Queue::new(256);
    q.size = QSIZE;
    q.desc_table = DESC[which];
    q.avail_ring = DESC[which] + AVAIL_OFF;
    q.used_ring = DESC[which] + USED_OFF;
    q.ready = true;
    q
}

impl Guest {
    fn new() -> Self {
        let ram = GuestRam::new(1, &MemoryBacking::Memfd).expect("guest RAM");
        let q = ActiveQueues {
            mem: ram.mem.clone(),
            queues: (0..3).map(queue).collect(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
        };
        Guest {
            _ram: ram,
            q,
            tx_avail: 0,
            rx_avail: 0,
            rx_seen: 0,
            rx_len: [0; QSIZE as usize],
            hostile: false,
            credit: HashMap::new(),
        }
    }

    fn mem(&self) -> &GuestMemoryMmap {
        &self.q.mem
    }

    fn put_desc(&self, which: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let at = DESC[which] + 16 * u64::from(i);
        self.mem().write_slice(&d, GuestAddress(at)).unwrap();
    }

    fn publish(&self, which: usize, head: u16, idx: u16) {
        let avail = DESC[which] + AVAIL_OFF;
        let slot = u64::from(idx.wrapping_sub(1) % QSIZE);
        self.mem()
            .write_obj(head, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
        self.mem().write_obj(idx, GuestAddress(avail + 2)).unwrap();
    }

    fn used_idx(&self, which: usize) -> u16 {
        self.mem()
            .read_obj(GuestAddress(DESC[which] + USED_OFF + 2))
            .unwrap()
    }

    /// Sends one packet; the tx queue holds at most `QSIZE / 2` two-descriptor packets.
    fn packet(&mut self, input: &mut Input) {
        if self.tx_avail.wrapping_sub(self.used_idx(TX)) >= QSIZE / 2 {
            return; // a real driver waits for the device
        }
        let sel = input.u8();
        let (header, payload) = if sel & 0x80 != 0 {
            let raw = input.bytes(HDR_LEN);
            let n = usize::from(input.u8());
            (raw, input.bytes(n))
        } else {
            let op = 1 + input.u8() % 7;
            let guest_port = 52 + u32::from(input.u8()) % GUEST_PORTS;
            let p = input.u8();
            let host_port = if p & 1 != 0 {
                (1 << 30) + u32::from(p >> 1) % 8
            } else {
                1 + u32::from(p >> 1) % 3
            };
            let flags = u32::from(input.u8() % 4);
            let buf_alloc = [0, 100, 4096, 65536, BUF_ALLOC, u32::MAX][usize::from(input.u8() % 6)];
            let fwd_cnt = input.u32();
            let n = usize::from(input.u8()) * 16;
            let mut payload = input.bytes(n);
            if op != OP_RW as u8 {
                payload.clear();
            }
            let h = Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port: guest_port,
                dst_port: host_port,
                len: payload.len() as u32,
                type_: TYPE_STREAM,
                op: u16::from(op),
                flags,
                buf_alloc,
                fwd_cnt,
            };
            (h.to_bytes().to_vec(), payload)
        };
        let mut hb = [0u8; HDR_LEN];
        hb.copy_from_slice(&header);
        self.note_sent(&Header::from_bytes(&hb));
        let slot = self.tx_avail % (QSIZE / 2);
        let addr = TX_BUFS + TX_BUF_SPACING * u64::from(slot);
        let mut bytes = header;
        bytes.extend(&payload);
        self.mem().write_slice(&bytes, GuestAddress(addr)).unwrap();
        let total = bytes.len() as u32;
        let wrong_way = if sel & 0x08 != 0 {
            VIRTQ_DESC_F_WRITE
        } else {
            0
        };
        let (d0, d1) = (2 * slot, 2 * slot + 1);
        if sel & 0x10 != 0 && sel & 0x80 == 0 {
            // Split at an arbitrary point, maybe inside the header.
            let at = u32::from(input.u8()) % total.max(1);
            self.put_desc(TX, d0, addr, at, VIRTQ_DESC_F_NEXT, d1);
            self.put_desc(TX, d1, addr + u64::from(at), total - at, wrong_way, 0);
        } else {
            let claimed = if sel & 0x20 != 0 { total / 2 } else { total };
            self.put_desc(TX, d0, addr, claimed, wrong_way, 0);
        }
        self.tx_avail = self.tx_avail.wrapping_add(1);
        self.publish(TX, d0, self.tx_avail);
    }

    /// Follows a packet's effect on the credit the device must respect.
    fn note_sent(&mut self, h: &Header) {
        if h.src_cid != GUEST_CID || h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            return; // the device ignores it
        }
        let key = (h.dst_port, h.src_port);
        if h.op == OP_RST {
            self.credit.remove(&key);
            return;
        }
        let fresh = Credit {
            buf_alloc: h.buf_alloc,
            fwd_cnt: h.fwd_cnt,
            received: 0,
            known: true,
        };
        match self.credit.get_mut(&key) {
            // No live connection on this key (the guest saw or sent its end): any data the
            // device sends from now on belongs to a new one.
            None => {
                self.credit.insert(key, fresh);
            }
            Some(c) if h.op == OP_REQUEST || h.op == OP_RESPONSE => c.known = false,
            Some(c) => {
                c.buf_alloc = h.buf_alloc;
                c.fwd_cnt = h.fwd_cnt;
            }
        }
    }

    fn rx_buffers(&mut self, input: &mut Input) {
        let count = 1 + input.u8() % 4;
        let len = [0, 10, 44, 45, 100, 4096, 0x2000][usize::from(input.u8() % 7)];
        for _ in 0..count {
            if self.rx_avail.wrapping_sub(self.rx_seen) >= QSIZE {
                return;
            }
            let i = self.rx_avail % QSIZE;
            self.put_desc(
                RX,
                i,
                RX_BUFS + RX_BUF_SPACING * u64::from(i),
                len,
                VIRTQ_DESC_F_WRITE,
                0,
            );
            self.rx_len[usize::from(i)] = len;
            self.rx_avail = self.rx_avail.wrapping_add(1);
            self.publish(RX, i, self.rx_avail);
        }
    }

    fn hostile(&mut self, input: &mut Input) {
        self.hostile = true;
        let which = usize::from(input.u8() % 3);
        match input.u8() % 3 {
            0 => {
                let idx = input.u16();
                self.mem()
                    .write_obj(idx, GuestAddress(DESC[which] + AVAIL_OFF + 2))
                    .unwrap();
            }
            1 => {
                let i = u64::from(input.u8() % QSIZE as u8);
                let d = input.bytes(16);
                self.mem()
                    .write_slice(&d, GuestAddress(DESC[which] + 16 * i))
                    .unwrap();
            }
            _ => {
                let slot = u64::from(input.u8() % QSIZE as u8);
                let head = input.u16();
                self.mem()
                    .write_obj(head, GuestAddress(DESC[which] + AVAIL_OFF + 4 + 2 * slot))
                    .unwrap();
            }
        }
    }

    /// Takes what the device returned on the rx queue and checks every packet.
    fn receive(&mut self) {
        let used = self.used_idx(RX);
        let new = used.wrapping_sub(self.rx_seen);
        if self.hostile {
            self.rx_seen = used;
            return;
        }
        assert!(
            new <= QSIZE,
            "{new} rx buffers returned, the queue holds {QSIZE}"
        );
        for _ in 0..new {
            let slot = u64::from(self.rx_seen % QSIZE);
            let at = DESC[RX] + USED_OFF + 4 + 8 * slot;
            let id: u32 = self.mem().read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem().read_obj(GuestAddress(at + 4)).unwrap();
            assert!(id < u32::from(QSIZE), "used id {id}");
            assert!(
                len <= self.rx_len[id as usize],
                "{len} bytes in a smaller buffer"
            );
            self.rx_seen = self.rx_seen.wrapping_add(1);
            if len == 0 {
                continue;
            }
            let mut hb = [0u8; HDR_LEN];
            self.mem()
                .read_slice(
                    &mut hb,
                    GuestAddress(RX_BUFS + RX_BUF_SPACING * u64::from(id)),
                )
                .unwrap();
            let h = Header::from_bytes(&hb);
            assert_eq!(
                (h.src_cid, h.dst_cid, h.type_),
                (HOST_CID, GUEST_CID, TYPE_STREAM)
            );
            assert_eq!(h.len as usize + HDR_LEN, len as usize, "length field");
            assert!(h.len <= MAX_PAYLOAD);
            assert!(
                (OP_REQUEST..=OP_CREDIT_UPDATE).contains(&h.op),
                "op {}",
                h.op
            );
            let key = (h.src_port, h.dst_port);
            if h.op == OP_RW {
                if let Some(c) = self.credit.get_mut(&key).filter(|c| c.known) {
                    c.received = c.received.wrapping_add(h.len);
                    assert!(
                        c.received.wrapping_sub(c.fwd_cnt) <= c.buf_alloc,
                        "{} bytes sent, the guest allowed {} past {}",
                        c.received,
                        c.buf_alloc,
                        c.fwd_cnt
                    );
                }
            }
            if matches!(h.op, OP_REQUEST | OP_RST | OP_SHUTDOWN) {
                // A new connection, or the end of one.
                self.credit.remove(&key);
            }
        }
    }

    fn reset(&mut self, backend: &mut VsockBackend) {
        backend.drop_connections();
        for (which, ring) in DESC.iter().enumerate() {
            self.mem()
                .write_slice(&[0u8; 0x3000], GuestAddress(*ring))
                .unwrap();
            self.q.queues[which] = queue(which);
        }
        self.q.interrupt.clear();
        self.tx_avail = 0;
        self.rx_avail = 0;
        self.rx_seen = 0;
        self.hostile = false;
        self.credit.clear();
    }
}

struct Host {
    dir: PathBuf,
    path: PathBuf,
    listeners: Vec<UnixListener>,
    streams: Vec<UnixStream>,
}

impl Host {
    fn new(dir: &Path) -> Self {
        let path = dir.join("v.sock");
        let listeners = LISTENED_PORTS
            .iter()
            .map(|p| {
                let at = dir.join(format!("v.sock_{p}"));
                let _ = std::fs::remove_file(&at);
                let l = UnixListener::bind(&at).unwrap();
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect();
        Host {
            dir: dir.to_path_buf(),
            path,
            listeners,
            streams: Vec::new(),
        }
    }

    fn connect(&mut self, input: &mut Input) {
        let kind = input.u8();
        let port = 52 + u32::from(input.u8()) % GUEST_PORTS;
        if self.streams.len() >= MAX_HOST_STREAMS {
            return;
        }
        let Ok(mut s) = UnixStream::connect(&self.path) else {
            return;
        };
        s.set_nonblocking(true).unwrap();
        let line = match kind % 5 {
            0 | 1 => format!("CONNECT {port}\n").into_bytes(),
            2 => b"CONNECT".to_vec(), // the rest never comes
            3 => vec![b'x'; 100],
            _ => format!("CONNECT {port}\nearly data").into_bytes(),
        };
        let _ = s.write(&line);
        self.streams.push(s);
    }

    fn write(&mut self, input: &mut Input) {
        let i = usize::from(input.u8());
        let n = usize::from(input.u8()) * 64;
        if let Some(s) = self.pick(i) {
            let _ = s.write(&vec![b'h'; n]);
        }
    }

    fn close(&mut self, input: &mut Input) {
        let i = usize::from(input.u8());
        let how = input.u8();
        if self.streams.is_empty() {
            return;
        }
        let i = i % self.streams.len();
        if how & 1 == 0 {
            self.streams.swap_remove(i);
        } else {
            let _ = self.streams[i].shutdown(std::net::Shutdown::Write);
        }
    }

    fn pick(&mut self, i: usize) -> Option<&mut UnixStream> {
        let n = self.streams.len();
        (n > 0).then(|| &mut self.streams[i % n])
    }

    fn accept_and_read(&mut self) {
        for l in &self.listeners {
            while self.streams.len() < MAX_HOST_STREAMS {
                match l.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(true).unwrap();
                        self.streams.push(s);
                    }
                    Err(_) => break,
                }
            }
        }
        let mut buf = vec![0u8; 1 << 16];
        for s in &mut self.streams {
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for p in LISTENED_PORTS {
            let _ = std::fs::remove_file(self.dir.join(format!("v.sock_{p}")));
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn work_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sm-fuzz-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Polls without waiting and serves until the device has nothing left to do: no socket
/// reports anything and no pass stopped at its budget. A socket that keeps reporting the
/// same event (a hang-up nobody handles, say) would spin the worker; here it fails.
fn settle(backend: &mut VsockBackend, guest: &mut Guest, now: Instant, served: &mut Served) {
    for round in 0.. {
        let polled = backend.poll(None, served.rx_ready, Duration::ZERO, now);
        *served = backend.serve(&mut guest.q, now);
        if polled.ready == 0 && !served.more {
            break;
        }
        assert!(
            round < MAX_ROUNDS,
            "the device does not settle: {polled:?}, {served:?}"
        );
    }
}

fn check_invariants(backend: &VsockBackend, guest: &Guest) {
    assert!(backend.connection_count() <= MAX_CONNECTIONS);
    assert!(backend.buffered_bytes() <= backend.connection_count() * (BUF_ALLOC as usize + 64));
    assert!(backend.pending_replies() <= MAX_PENDING_REPLIES);
    for (which, q) in guest.q.queues.iter().enumerate() {
        let s = q.state();
        assert!(
            s.next_used == s.next_avail || guest.q.interrupt.needs_reset(),
            "queue {which}: {} chains taken, {} returned",
            s.next_avail,
            s.next_used
        );
    }
}

fn target(data: &[u8]) {
    let dir = work_dir();
    let mut host = Host::new(&dir);
    let mut backend = VsockBackend::bind(&host.path).expect("binding the device socket");
    let mut guest = Guest::new();
    let mut input = Input(data);
    let mut now = Instant::now();
    let mut served = Served::default();
    for _ in 0..MAX_EVENTS {
        if input.is_empty() {
            break;
        }
        match input.u8() % EVENTS {
            e if e == Event::GuestPacket as u8 => guest.packet(&mut input),
            e if e == Event::RxBuffers as u8 => guest.rx_buffers(&mut input),
            e if e == Event::HostConnect as u8 => host.connect(&mut input),
            e if e == Event::HostWrite as u8 => host.write(&mut input),
            e if e == Event::HostClose as u8 => host.close(&mut input),
            e if e == Event::HostAcceptAndRead as u8 => host.accept_and_read(),
            e if e == Event::Time as u8 => {
                now += Duration::from_millis(100 * u64::from(input.u8()));
                backend.expire(now);
            }
            e if e == Event::Hostile as u8 => guest.hostile(&mut input),
            e if e == Event::GuestReceive as u8 => guest.receive(),
            _ => guest.reset(&mut backend),
        }
        settle(&mut backend, &mut guest, now, &mut served);
        check_invariants(&backend, &guest);
        // At once, so each packet is checked against the credit it was sent under.
        guest.receive();
    }
    guest.receive();
    drop(backend);
    drop(host);
}

#[test]
fn vsock() {
    fuzz_support::run("vsock", target);
    let _ = std::fs::remove_dir_all(work_dir());
}

/// Builds seed inputs event by event.
#[derive(Default)]
struct Seed(Vec<u8>);

impl Seed {
    fn ev(mut self, e: Event, args: &[u8]) -> Self {
        self.0.push(e as u8);
        self.0.extend(args);
        self
    }

    /// A structured guest packet: op, guest port index, host port selector, flags, buf_alloc
    /// class, fwd_cnt, payload length in 16-byte units.
    fn packet(self, op: u16, guest_port: u8, host_port: u8, flags: u8, payload16: u8) -> Self {
        let mut args = vec![0, (op - 1) as u8, guest_port, host_port, flags, 3];
        args.extend(0u32.to_le_bytes());
        args.push(payload16);
        args.extend(vec![b'g'; usize::from(payload16) * 16]);
        self.ev(Event::GuestPacket, &args)
    }
}

/// Host port selector for the first host-initiated connection (1 << 30).
const FIRST_HOST_PORT: u8 = 1;
/// Host port selector for listener port 1.
const LISTENER_1: u8 = 0;

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let rx = |s: Seed| s.ev(Event::RxBuffers, &[3, 5]);
    let host_to_guest = rx(Seed::default())
        .ev(Event::HostConnect, &[0, 0])
        .ev(Event::GuestReceive, &[])
        .packet(OP_RESPONSE, 0, FIRST_HOST_PORT, 0, 0)
        .ev(Event::HostAcceptAndRead, &[])
        .ev(Event::HostWrite, &[0, 4])
        .ev(Event::GuestReceive, &[])
        .packet(OP_RW, 0, FIRST_HOST_PORT, 0, 8)
        .ev(Event::HostAcceptAndRead, &[])
        .packet(OP_SHUTDOWN, 0, FIRST_HOST_PORT, 3, 0)
        .ev(Event::GuestReceive, &[]);
    let hangup_while_connecting = rx(Seed::default())
        .ev(Event::HostConnect, &[0, 1])
        .ev(Event::HostClose, &[0, 0])
        .ev(Event::Time, &[1])
        .ev(Event::GuestReceive, &[]);
    let host_close_then_timeout = rx(Seed::default())
        .ev(Event::HostConnect, &[0, 2])
        .packet(OP_RESPONSE, 2, FIRST_HOST_PORT, 0, 0)
        .ev(Event::HostAcceptAndRead, &[])
        .ev(Event::HostClose, &[0, 0])
        .ev(Event::GuestReceive, &[])
        .ev(Event::Time, &[60])
        .ev(Event::GuestReceive, &[]);
    let connect_timeout = Seed::default()
        .ev(Event::HostConnect, &[0, 0])
        .ev(Event::HostConnect, &[2, 0])
        .ev(Event::Time, &[60])
        .ev(Event::Time, &[60]);
    let guest_to_host = rx(Seed::default())
        .packet(OP_REQUEST, 1, LISTENER_1, 0, 0)
        .ev(Event::HostAcceptAndRead, &[])
        .packet(OP_RW, 1, LISTENER_1, 0, 255)
        .packet(OP_RW, 1, LISTENER_1, 0, 255)
        .packet(OP_CREDIT_REQUEST_SEL, 1, LISTENER_1, 0, 0)
        .ev(Event::HostWrite, &[0, 255])
        .ev(Event::GuestReceive, &[])
        .packet(OP_SHUTDOWN, 1, LISTENER_1, 2, 0)
        .packet(OP_RST, 1, LISTENER_1, 0, 0);
    let unknown_and_no_listener = rx(Seed::default())
        .packet(OP_RW, 0, 2, 0, 1)
        .packet(OP_REQUEST, 0, 4, 0, 0)
        .ev(Event::GuestReceive, &[]);
    let mut over_credit = rx(Seed::default()).packet(OP_REQUEST, 3, LISTENER_1, 0, 0);
    for _ in 0..8 {
        over_credit = over_credit.packet(OP_RW, 3, LISTENER_1, 0, 255);
    }
    let hostile = rx(Seed::default())
        .ev(Event::Hostile, &[1, 0, 0xff, 0x7f])
        .packet(OP_RW, 0, 2, 0, 1)
        .ev(Event::Reset, &[])
        .ev(Event::Hostile, &[0, 1, 3])
        .ev(Event::Hostile, &[0, 2, 0, 0x40, 0])
        .ev(Event::RxBuffers, &[1, 0])
        .ev(Event::HostConnect, &[0, 0]);
    let mut raw = Seed::default().ev(Event::GuestPacket, &[0x80]);
    raw.0.extend(
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: 9,
            dst_port: 1,
            len: 0xffff_fff0,
            type_: 2,
            op: 99,
            ..Header::default()
        }
        .to_bytes(),
    );
    raw.0.push(0);
    let split_header = rx(Seed::default()).ev(
        Event::GuestPacket,
        &[0x10, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 20],
    );
    let bad_lines = Seed::default()
        .ev(Event::HostConnect, &[3, 0])
        .ev(Event::HostConnect, &[4, 1])
        .ev(Event::HostAcceptAndRead, &[]);
    vec![
        ("host-to-guest", host_to_guest.0),
        ("hangup-while-connecting", hangup_while_connecting.0),
        ("host-close-then-close-timeout", host_close_then_timeout.0),
        ("connect-timeout", connect_timeout.0),
        ("guest-to-host", guest_to_host.0),
        (
            "unknown-connection-and-no-listener",
            unknown_and_no_listener.0,
        ),
        ("over-credit", over_credit.0),
        ("hostile-rings-and-reset", hostile.0),
        ("raw-oversized-header", raw.0),
        ("split-header", split_header.0),
        ("bad-connect-lines", bad_lines.0),
    ]
}

/// OP_CREDIT_REQUEST as the seed builder's op (7).
const OP_CREDIT_REQUEST_SEL: u16 = 7;

/// The committed seeds are exactly what [`seeds`] builds; with
/// `SUPERMACHINE_FUZZ_WRITE_SEEDS=1` they are (re)written instead.
#[test]
fn seed_corpus() {
    fuzz_support::check_seeds("vsock", &seeds());
}
