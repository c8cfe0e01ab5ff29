//! Fuzz target for the worker control channel's framing, read by both sides: the owner reads
//! replies from a worker that runs guest-facing code (and may be compromised), the worker reads
//! requests. Whatever arrives, `recv` must not panic, must not allocate beyond the protocol's
//! limits (a header claims up to 4 GiB twice), must not leak a passed descriptor and must return
//! once the peer has closed.
//!
//! An input is one control byte and the bytes of the stream. The control byte's low six bits are
//! how many descriptors ride on the first write (past [`MAX_FDS`] too); its bit 6 splits the
//! stream into two writes, the first of one byte.
//!
//! `SUPERMACHINE_FUZZ_SECONDS=60 cargo test -p supermachine-core --release --test fuzz_worker_protocol -- --nocapture`

mod fuzz_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use supermachine_core::worker::protocol::{
    self, ChannelError, ErrorKind, Reply, Request, SnapshotSummary, VmInfo, WireDevice, WireError,
    WireTimings, MAX_FDS, MAX_MESSAGE, MAX_PAYLOAD,
};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Records the largest single allocation, so a frame that makes `recv` reserve more than the
/// limits is caught whether or not the memory is ever touched.
struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// How long a read may wait: the writer has closed its end by then, so a `recv` still waiting
/// would be waiting for bytes that cannot come.
const HANG: Duration = Duration::from_secs(10);

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Writes `stream` (with `nfds` descriptors on the first bytes) into one end of a new socket
/// pair from another thread, then closes it; returns the other end.
fn feed(stream: &[u8], nfds: usize, split: bool) -> UnixStream {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let stream = stream.to_vec();
    std::thread::spawn(move || {
        let null = File::open("/dev/null").unwrap();
        let fds = vec![null.as_raw_fd(); nfds];
        let first = if split {
            1.min(stream.len())
        } else {
            stream.len()
        };
        if first > 0 {
            // Refused (e.g. past the kernel's descriptor limit per message): send without.
            if theirs.send_with_fds(&[&stream[..first]], &fds).is_err() {
                let _ = (&theirs).write_all(&stream[..first]);
            }
        }
        // The reader stops at the first frame, so the rest may not all be taken: that is fine.
        let _ = (&theirs).write_all(&stream[first..]);
    });
    ours.set_read_timeout(Some(HANG)).unwrap();
    ours
}

fn check<T>(
    data: &[u8],
    reencode: impl Fn(&T) -> serde_json::Value,
    send: impl Fn(&UnixStream, &T, &[u8]),
) where
    T: for<'de> serde::Deserialize<'de>,
{
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let nfds = usize::from(control & 0x3f);
    let split = control & 0x40 != 0;
    let sock = feed(stream, nfds, split);
    LARGEST.store(0, Ordering::Relaxed);
    let got = protocol::recv::<T>(&sock);
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= MAX_PAYLOAD,
        "recv allocated {largest} bytes at once, past the limits"
    );
    match got {
        Err(ChannelError::Timeout(_)) => panic!("recv waited for bytes after the peer closed"),
        Err(_) | Ok(None) => {}
        Ok(Some(frame)) => {
            assert!(frame.payload.len() <= MAX_PAYLOAD);
            assert!(frame.files.len() <= MAX_FDS);
            // What was accepted goes back over the wire unchanged.
            let (a, b) = UnixStream::pair().unwrap();
            send(&a, &frame.message, &frame.payload);
            let again = protocol::recv::<T>(&b).unwrap().unwrap();
            assert_eq!(reencode(&again.message), reencode(&frame.message));
            assert_eq!(again.payload, frame.payload);
        }
    }
}

#[test]
fn fuzz_worker_protocol_frames() {
    // A descriptor kept past one input would show here: received ones are closed on drop,
    // refused ones by the receiving code.
    let baseline = open_fds();
    fuzz_support::run("worker_protocol", |data| {
        check::<Reply>(
            data,
            |m| serde_json::to_value(m).unwrap(),
            |s, m, p| protocol::send(s, m, p, &[]).unwrap(),
        );
        check::<Request>(
            data,
            |m| serde_json::to_value(m).unwrap(),
            |s, m, p| protocol::send(s, m, p, &[]).unwrap(),
        );
        // The writer threads may still hold their ends for a moment; wait for them to go.
        let mut open = open_fds();
        for _ in 0..1000 {
            if open <= baseline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
            open = open_fds();
        }
        assert!(open <= baseline, "{} descriptors leaked", open - baseline);
    });
}

/// The bytes `send` writes for one frame.
fn encoded<T: serde::Serialize>(message: &T, payload: &[u8]) -> Vec<u8> {
    let (a, b) = UnixStream::pair().unwrap();
    let writer = {
        let payload = payload.to_vec();
        let json = serde_json::to_value(message).unwrap();
        std::thread::spawn(move || protocol::send(&a, &json, &payload, &[]).unwrap())
    };
    let mut out = Vec::new();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        (&b).read_to_end(&mut out).unwrap();
        out
    });
    writer.join().unwrap();
    reader.join().unwrap()
}

fn seed(dir: &Path, name: &str, control: u8, stream: &[u8]) {
    let mut data = vec![control];
    data.extend_from_slice(stream);
    std::fs::write(dir.join(name), data).unwrap();
}

/// Writes the seeds of the `worker_protocol` corpus: valid frames of both directions (with a
/// payload, with descriptors) and hostile headers. `cargo test --test fuzz_worker_protocol -- --ignored`
#[test]
#[ignore]
fn write_seed_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/worker_protocol");
    std::fs::create_dir_all(&dir).unwrap();
    let info = Reply::Info(Box::new(VmInfo {
        cmdline: "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5".into(),
        cpu_template: "none".into(),
        memory_size: 16 << 20,
        console_capacity: 65536,
        vsock_path: Some("/run/vm/v.sock".into()),
        devices: vec![WireDevice {
            kind: "blk".into(),
            mmio_base: 0xd000_0000,
            gsi: 5,
            path: "/disk.img".into(),
            read_only: true,
        }],
        protections: vec!["pid namespace".into(), "seccomp".into()],
    }));
    let status = Reply::Status {
        outcome: Some(supermachine_core::vmm::Outcome::PowerOff { code: 7 }),
        unhandled_exits: (1, 2),
    };
    let snapshot = Reply::Snapshot(SnapshotSummary {
        memory_bytes: 4096,
        state_bytes: 900,
        memory_id: [3; 32],
        diff_pages: Some(1),
        compared_pages: None,
        phases: vec![("pause".into(), 0.001)],
    });
    let error = Reply::Error(WireError {
        kind: ErrorKind::Snapshot,
        message: "the snapshot is damaged".into(),
    });
    let timings = Reply::Timings(WireTimings {
        started_ns: 1,
        running_ns: 2,
        first_run_ns: None,
        first_console_byte_ns: Some(3),
        phases: vec![],
        refused_msrs: 0,
    });
    let seeds: Vec<(&str, u8, Vec<u8>)> = vec![
        (
            "reply-hello.bin",
            0,
            encoded(&Reply::Hello { version: 1, pid: 1 }, b""),
        ),
        ("reply-info.bin", 0, encoded(&info, b"")),
        ("reply-status.bin", 0, encoded(&status, b"")),
        ("reply-snapshot.bin", 0, encoded(&snapshot, b"")),
        ("reply-error.bin", 0, encoded(&error, b"")),
        ("reply-timings.bin", 0x40, encoded(&timings, b"")),
        (
            "reply-bytes-payload.bin",
            0,
            encoded(&Reply::Bytes, b"\x7fELF console bytes"),
        ),
        ("reply-ok-with-fds.bin", 3, encoded(&Reply::Ok, b"")),
        (
            "reply-ok-too-many-fds.bin",
            MAX_FDS as u8 + 1,
            encoded(&Reply::Ok, b""),
        ),
        (
            "request-hello.bin",
            0,
            encoded(&Request::Hello { version: 1 }, b""),
        ),
        (
            "request-read.bin",
            0,
            encoded(
                &Request::ReadMemory {
                    gpa: 0x1000,
                    len: 8,
                },
                b"",
            ),
        ),
        (
            "request-write.bin",
            1,
            encoded(&Request::WriteMemory { gpa: 0x1000 }, b"12345678"),
        ),
        (
            "request-snapshot.bin",
            2,
            encoded(&Request::Snapshot { base: None }, b""),
        ),
    ];
    for (name, control, stream) in seeds {
        seed(&dir, name, control, &stream);
    }
    let header = |json: u32, payload: u32| {
        let mut h = json.to_le_bytes().to_vec();
        h.extend_from_slice(&payload.to_le_bytes());
        h
    };
    seed(&dir, "hostile-4gib-json.bin", 0, &header(u32::MAX, 0));
    seed(&dir, "hostile-4gib-payload.bin", 0, &header(2, u32::MAX));
    let mut at_limits = header(MAX_MESSAGE as u32, MAX_PAYLOAD as u32);
    at_limits.extend_from_slice(b"{\"reply\":\"ok\"}");
    seed(&dir, "hostile-at-limits-short.bin", 0, &at_limits);
    seed(&dir, "hostile-fds-short-header.bin", 2, b"\x05");
    let mut nested = header(0, 0);
    let json = format!("{}{}", "[".repeat(4000), "]".repeat(4000));
    nested[..4].copy_from_slice(&(json.len() as u32).to_le_bytes());
    nested.extend_from_slice(json.as_bytes());
    seed(&dir, "hostile-deep-nesting.bin", 0, &nested);
}
