//! Fuzz target `virtio_blk`: the virtqueue walk and virtio-blk request handling.
//!
//! The input lays out a guest: a queue size and disk size, the descriptor table, the available
//! ring and a buffer area in guest RAM, and the disk contents (see [`Layout`]). The device is
//! then notified a few times. It must never panic, touch memory outside guest RAM (vm-memory
//! refuses), change a read-only disk or the disk's size, serve more than a queue's worth of
//! requests per notification, or return anything but the heads the driver can have offered.
//!
//! The seed corpus in `rust/fuzz/corpus/virtio_blk/` is written by
//! `SUPERMACHINE_FUZZ_WRITE_SEEDS=1 cargo test --test fuzz_virtio_blk seed_corpus`.

// The shared driver has an unneeded `mut` (reported upstream); keep -D warnings clean here.
#[allow(unused_mut)]
mod fuzz_support;

use std::path::PathBuf;
use std::sync::Arc;

use supermachine_core::devices::virtio::block::{Block, SECTOR_SIZE};
use supermachine_core::devices::virtio::queue::{
    Queue, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use supermachine_core::devices::virtio::{Interrupt, VirtioDevice};
use supermachine_core::vmm::memory::{GuestRam, MemoryBacking};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Where the input's buffer area goes: descriptors of the seeds point here.
const BUFFERS: u64 = 0x4000;
const BUFFERS_LEN: usize = 0x2000;
const MAX_DISK_SECTORS: u64 = 64;

/// How the input bytes are read:
/// `[size exponent, flags, disk sectors, notifications]`, the descriptor table (16 bytes per
/// entry), the available ring (4 + 2 per entry), `BUFFERS_LEN` bytes of buffers, then the disk.
/// Missing bytes are zero. Flags: bit 0 read-only disk, bit 1 also fill the used ring from the
/// input (stale garbage there).
struct Layout<'a> {
    size: u16,
    read_only: bool,
    garbage_used: bool,
    sectors: u64,
    notifications: u8,
    rest: &'a [u8],
}

impl<'a> Layout<'a> {
    fn parse(data: &'a [u8]) -> Self {
        let b = |i: usize| data.get(i).copied().unwrap_or(0);
        Layout {
            size: 1 << (b(0) % 5),
            read_only: b(1) & 1 != 0,
            garbage_used: b(1) & 2 != 0,
            sectors: u64::from(b(2)) % (MAX_DISK_SECTORS + 1),
            notifications: 1 + b(3) % 4,
            rest: data.get(4..).unwrap_or(&[]),
        }
    }

    /// Takes the next `n` bytes (zero-padded).
    fn take(&mut self, n: usize) -> Vec<u8> {
        let k = n.min(self.rest.len());
        let mut out = self.rest[..k].to_vec();
        out.resize(n, 0);
        self.rest = &self.rest[k..];
        out
    }
}

/// The disk file, in memory when /dev/shm exists (flush requests sync it on every run).
fn disk_path() -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("sm-fuzz-blk-{}.img", std::process::id()))
}

fn target(data: &[u8]) {
    let mut l = Layout::parse(data);
    let n = usize::from(l.size);
    let ram = GuestRam::new(1, &MemoryBacking::Memfd).expect("guest RAM");
    let mem = ram.mem.clone();
    mem.write_slice(&l.take(16 * n), GuestAddress(DESC))
        .unwrap();
    mem.write_slice(&l.take(4 + 2 * n), GuestAddress(AVAIL))
        .unwrap();
    let used_garbage = l.take(if l.garbage_used { 4 + 8 * n } else { 0 });
    mem.write_slice(&used_garbage, GuestAddress(USED)).unwrap();
    mem.write_slice(&l.take(BUFFERS_LEN), GuestAddress(BUFFERS))
        .unwrap();
    let disk_len = (l.sectors * SECTOR_SIZE) as usize;
    let disk = l.take(disk_len);
    let path = disk_path();
    std::fs::write(&path, &disk).unwrap();

    let mut blk = Block::open(&path, l.read_only, None).unwrap();
    let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
    let mut q = Queue::new(256);
    q.size = l.size;
    q.desc_table = DESC;
    q.avail_ring = AVAIL;
    q.used_ring = USED;
    q.ready = true;
    q.validate(&mem).expect("the harness sets up a valid queue");
    blk.activate(mem.clone(), vec![q], irq.clone()).unwrap();

    // The device's own counts (what the guest sees in the used ring can be overwritten by
    // the guest's buffers, which may lie anywhere in its RAM, rings included).
    let counts = |blk: &Block| {
        let q = blk.live_queues().expect("active")[0].state();
        (q.next_avail, q.next_used)
    };
    let mut used_before = 0u16;
    for _ in 0..l.notifications {
        blk.notify(0);
        let (next_avail, next_used) = counts(&blk);
        let served = next_used.wrapping_sub(used_before);
        assert!(
            served <= l.size,
            "{served} requests completed in one notification of a queue of {}",
            l.size
        );
        assert!(
            next_used == next_avail || irq.needs_reset(),
            "{next_avail} chains taken but {next_used} returned"
        );
        used_before = next_used;
    }
    drop(blk);
    let after = std::fs::read(&path).unwrap();
    assert_eq!(after.len(), disk.len(), "the disk changed size");
    if l.read_only {
        assert!(after == disk, "a read-only disk was written");
    }
}

#[test]
fn virtio_blk() {
    fuzz_support::run("virtio_blk", target);
    let _ = std::fs::remove_file(disk_path());
}

/// Builds one seed input from a queue size exponent, flags, disk sectors, descriptors
/// `(addr, len, flags, next)`, the available ring's heads, buffer bytes at [`BUFFERS`]
/// offsets, and the disk contents.
struct Seed {
    size_exp: u8,
    flags: u8,
    sectors: u8,
    notifications: u8,
    descs: Vec<(u64, u32, u16, u16)>,
    avail_idx: u16,
    heads: Vec<u16>,
    buffers: Vec<(usize, Vec<u8>)>,
    disk: Vec<u8>,
}

impl Seed {
    fn bytes(&self) -> Vec<u8> {
        let n = 1usize << self.size_exp;
        let mut out = vec![self.size_exp, self.flags, self.sectors, self.notifications];
        let mut table = vec![0u8; 16 * n];
        for (i, (addr, len, flags, next)) in self.descs.iter().enumerate() {
            let e = &mut table[16 * i..16 * i + 16];
            e[..8].copy_from_slice(&addr.to_le_bytes());
            e[8..12].copy_from_slice(&len.to_le_bytes());
            e[12..14].copy_from_slice(&flags.to_le_bytes());
            e[14..16].copy_from_slice(&next.to_le_bytes());
        }
        out.extend(table);
        let mut avail = vec![0u8; 4 + 2 * n];
        avail[2..4].copy_from_slice(&self.avail_idx.to_le_bytes());
        for (i, h) in self.heads.iter().enumerate() {
            avail[4 + 2 * i..6 + 2 * i].copy_from_slice(&h.to_le_bytes());
        }
        out.extend(avail);
        if self.flags & 2 != 0 {
            out.extend(vec![0xa5; 4 + 8 * n]);
        }
        let mut buffers = vec![0u8; BUFFERS_LEN];
        for (at, bytes) in &self.buffers {
            buffers[*at..*at + bytes.len()].copy_from_slice(bytes);
        }
        out.extend(buffers);
        out.extend(&self.disk);
        // Missing bytes read as zero: keep the seed files small.
        let len = out.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        out.truncate(len);
        out
    }
}

/// A request header (type, reserved, sector).
fn req(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend([0; 4]);
    h.extend(sector.to_le_bytes());
    h
}

const N: u16 = VIRTQ_DESC_F_NEXT;
const W: u16 = VIRTQ_DESC_F_WRITE;

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let b = BUFFERS;
    let disk = Vec::new(); // zeros
    let base = |descs, heads: Vec<u16>, buffers| Seed {
        size_exp: 3,
        flags: 0,
        sectors: 8,
        notifications: 1,
        descs,
        avail_idx: heads.len() as u16,
        heads,
        buffers,
        disk: disk.clone(),
    };
    let read = base(
        vec![
            (b, 16, N, 1),
            (b + 0x200, 512, N | W, 2),
            (b + 0x1000, 1, W, 0),
        ],
        vec![0],
        vec![(0, req(0, 2))],
    );
    let write = base(
        vec![
            (b, 16, N, 1),
            (b + 0x200, 1024, N, 2),
            (b + 0x1000, 1, W, 0),
        ],
        vec![0],
        vec![(0, req(1, 6)), (0x200, vec![b'z'; 1024])],
    );
    let mut read_only_write = base(
        vec![(b, 16, N, 1), (b + 0x200, 512, N, 2), (b + 0x1000, 1, W, 0)],
        vec![0],
        vec![(0, req(1, 0))],
    );
    read_only_write.flags = 1;
    let several = base(
        vec![
            (b, 16, N, 1),
            (b + 0x200, 512, N | W, 2),
            (b + 0x1000, 1, W, 0),
            (b + 0x20, 16, N, 4),
            (b + 0x1001, 1, W, 0),
            (b + 0x40, 16, N, 6),
            (b + 0x400, 20, N | W, 7),
            (b + 0x1002, 1, W, 0),
        ],
        vec![0, 3, 5],
        vec![(0, req(0, 7)), (0x20, req(4, 0)), (0x40, req(8, 0))],
    );
    let past_the_end = base(
        vec![
            (b, 16, N, 1),
            (b + 0x200, 1024, N | W, 2),
            (b + 0x1000, 1, W, 0),
        ],
        vec![0],
        vec![(0, req(0, 7))],
    );
    let looped = base(
        vec![(b, 16, N, 1), (b + 0x200, 512, N | W, 0)],
        vec![0],
        vec![(0, req(0, 0))],
    );
    let indirect = base(vec![(b, 16, VIRTQ_DESC_F_INDIRECT, 0)], vec![0], vec![]);
    let mut index_jump = read.clone_with_avail(300);
    index_jump.notifications = 2;
    let outside_ram = base(
        vec![
            (b, 16, N, 1),
            (0xdead_0000, 512, N | W, 2),
            (b + 0x1000, 1, W, 0),
        ],
        vec![0],
        vec![(0, req(0, 0))],
    );
    let mut self_publishing = base(
        vec![(b, 16, N, 1), (AVAIL, 512, N | W, 2), (b + 0x1000, 1, W, 0)],
        vec![0],
        vec![(0, req(0, 0))],
    );
    self_publishing.sectors = 32;
    self_publishing.disk = (0..32u16)
        .flat_map(|k| {
            let mut s = vec![0u8; 512];
            s[2..4].copy_from_slice(&(k + 2).to_le_bytes());
            s
        })
        .collect();
    self_publishing.notifications = 3;
    let mut garbage_used = several.clone_with_avail(3);
    garbage_used.flags = 2;
    vec![
        ("read", read.bytes()),
        ("write", write.bytes()),
        ("read-only-write", read_only_write.bytes()),
        ("flush-get-id-unsupported", several.bytes()),
        ("past-the-end", past_the_end.bytes()),
        ("descriptor-loop", looped.bytes()),
        ("indirect", indirect.bytes()),
        ("avail-index-jump", index_jump.bytes()),
        ("buffer-outside-ram", outside_ram.bytes()),
        ("read-into-avail-ring", self_publishing.bytes()),
        ("stale-used-ring", garbage_used.bytes()),
    ]
}

impl Seed {
    fn clone_with_avail(&self, avail_idx: u16) -> Seed {
        Seed {
            size_exp: self.size_exp,
            flags: self.flags,
            sectors: self.sectors,
            notifications: self.notifications,
            descs: self.descs.clone(),
            avail_idx,
            heads: self.heads.clone(),
            buffers: self.buffers.clone(),
            disk: self.disk.clone(),
        }
    }
}

/// The committed seeds are exactly what [`seeds`] builds; with
/// `SUPERMACHINE_FUZZ_WRITE_SEEDS=1` they are (re)written instead.
#[test]
fn seed_corpus() {
    fuzz_support::check_seeds("virtio_blk", &seeds());
}
