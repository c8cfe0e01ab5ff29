//! A hostile length prefix cannot make the `vmstate.bin` decoder allocate: every zero byte of a
//! real state's body (the prefix of an empty list or string, among others) is replaced in turn by
//! a prefix claiming 2^60 items, and the peak heap use while decoding stays within what a valid
//! state takes plus a small multiple of the input's size: items are only stored as they are
//! decoded from input bytes, never reserved from the prefix (the largest ratio is an MSR: 16
//! bytes decoded from as few as 2, and a growing list briefly holds its old and new buffers).
//! Its own test binary because it counts every allocation of the process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use supermachine_core::snapshot::{
    DeviceState, MachineState, MemoryState, QueueState, Snapshot, TransportState, VcpuState,
    VmState,
};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// 2^60 as a postcard varint.
const HUGE: [u8; 9] = [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10];

fn reframed(file: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = file[..24].to_vec();
    out.extend_from_slice(body);
    let total = (out.len() + 4) as u64;
    out[16..24].copy_from_slice(&total.to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

#[test]
fn length_prefixes_of_2_pow_60_fail_without_allocating() {
    let snap = Snapshot {
        machine: MachineState {
            memory_size: 16 << 20,
            vcpus: 1,
            console_capacity: 4096,
            disks: vec![false],
            ..Default::default()
        },
        vm: VmState::default(),
        vcpus: vec![VcpuState::default()],
        devices: DeviceState {
            transports: vec![TransportState {
                queues: vec![QueueState::default()],
                ..Default::default()
            }],
            ..Default::default()
        },
        memory: MemoryState::default(),
    };
    let file = snap.encode();
    let body = &file[24..file.len() - 4];
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    Snapshot::decode(&file, "s").unwrap();
    // What a valid state of this size takes to decode (its boxed KVM structures, its lists).
    let honest = PEAK.load(Ordering::Relaxed) - before;
    let mut refused = 0;
    for at in (0..body.len()).filter(|&i| body[i] == 0) {
        let mut hostile = body.to_vec();
        hostile.splice(at..=at, HUGE);
        let hostile = reframed(&file, &hostile);
        let before = LIVE.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let result = Snapshot::decode(&hostile, "s");
        let used = PEAK.load(Ordering::Relaxed) - before;
        assert!(
            used <= honest + 16 * hostile.len(),
            "a prefix of 2^60 at {at}: {used} bytes allocated (a valid state takes {honest})"
        );
        // Where the zero was a plain integer (a queue address, a feature word), 2^60 is a value.
        refused += usize::from(result.is_err());
    }
    assert!(refused > 100, "only {refused} hostile prefixes refused");
}
