//! Fuzz targets for hostile snapshot files: `vmstate.bin` decoding, and the resolution of a diff's
//! chain of bases through a store laid out from the input (sibling names, symlinks, cycles, FIFOs,
//! paths that leave the store).
//!
//! `SUPERMACHINE_FUZZ_SECONDS=60 cargo test -p supermachine-core --test fuzz_vmstate -- --nocapture`

mod fuzz_support;

use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

use supermachine_core::snapshot::memory::{bitmap_len, resolve_chain, MemoryLayer};
use supermachine_core::snapshot::{
    BaseRef, DeviceState, MachineState, MemoryState, Snapshot, VcpuState, VmState, MEMORY_FILE,
    VMSTATE_FILE,
};

/// Rewrites the recorded length and the checksum so a mutated file reaches the body decoder
/// (a random mutation almost always breaks the CRC, which would hide everything behind it).
fn resealed(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < 28 {
        return None;
    }
    let mut out = data.to_vec();
    let len = out.len();
    out[16..24].copy_from_slice(&(len as u64).to_le_bytes());
    let crc = crc32fast::hash(&out[..len - 4]);
    out[len - 4..].copy_from_slice(&crc.to_le_bytes());
    Some(out)
}

fn decode_checked(data: &[u8]) {
    if let Ok(snap) = Snapshot::decode(data, "fuzz") {
        // Whatever decodes is within the limits a restore relies on.
        let m = &snap.machine;
        assert!(m.memory_size > 0 && m.memory_size <= 64 << 30);
        assert_eq!(usize::from(m.vcpus), snap.vcpus.len());
        assert!(snap.vcpus.len() <= 32);
        assert!(snap.vcpus.iter().all(|v| v.msrs.len() <= 4096));
        assert!(snap.devices.transports.len() <= 11);
        assert!(snap.devices.transports.iter().all(|t| t.queues.len() <= 8));
        if let Some(p) = &snap.memory.pages {
            assert_eq!(p.len(), bitmap_len(m.memory_size));
        }
        // And encodes back to something that decodes the same way.
        let again = Snapshot::decode(&snap.encode(), "fuzz").expect("a re-encoded state decodes");
        assert_eq!(again.machine, snap.machine);
        assert_eq!(again.memory, snap.memory);
    }
}

#[test]
fn fuzz_vmstate_decode() {
    fuzz_support::run("vmstate", |data| {
        decode_checked(data);
        if let Some(sealed) = resealed(data) {
            decode_checked(&sealed);
        }
    });
}

const RAM: u64 = 1 << 20;
/// The modification time every memory.bin of a generated store gets (and every diff records), so
/// the identity check passes without hashing and a chain goes as far as its layout lets it.
const MTIME_NS: i64 = 1_600_000_000_000_000_000;
const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
const RECORDED: [&str; 10] = [
    "../a", "../b", "../c", "../d", "../e", "/tmp", "../../a", "a/b", "..", "../.",
];

fn snapshot_with(base: Option<BaseRef>, id: u8) -> Snapshot {
    let pages = base.as_ref().map(|_| vec![0u8; bitmap_len(RAM)]);
    Snapshot {
        machine: MachineState {
            memory_size: RAM,
            vcpus: 1,
            console_capacity: 4096,
            ..Default::default()
        },
        vm: VmState::default(),
        vcpus: vec![VcpuState::default()],
        devices: DeviceState::default(),
        memory: MemoryState {
            id: [id; 32],
            base,
            pages,
        },
    }
}

/// Lays out a store from `data` (each of the names a to e: a full snapshot, a diff with a
/// recorded base path, a symlink to another entry, a snapshot whose files are a FIFO or a
/// symlink, or nothing) and resolves the chain of `a`.
fn chain_target(data: &[u8], root: &Path) {
    let store = root.join("store");
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(&store).unwrap();
    std::fs::create_dir_all(root.join("outside")).unwrap();
    let byte = |i: usize| data.get(i).copied().unwrap_or(0) as usize;
    for (i, name) in NAMES.iter().enumerate() {
        let dir = store.join(name);
        let kind = byte(2 * i) % 7;
        let arg = byte(2 * i + 1);
        match kind {
            0 => continue,
            1 => {
                symlink(NAMES[arg % NAMES.len()], &dir).unwrap();
                continue;
            }
            2 => {
                symlink(root.join("outside"), &dir).unwrap();
                continue;
            }
            _ => {}
        }
        std::fs::create_dir(&dir).unwrap();
        let memory = dir.join(MEMORY_FILE);
        let file = std::fs::File::create(&memory).unwrap();
        file.set_len(RAM).unwrap();
        let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(MTIME_NS as u64);
        file.set_modified(mtime).unwrap();
        // Every snapshot has the same memory identity, so a chain only ends where the layout
        // (or a refusal) ends it.
        let base = (kind >= 4).then(|| BaseRef {
            path: RECORDED[arg % RECORDED.len()].to_string(),
            id: [7; 32],
            memory_len: RAM,
            memory_mtime_ns: MTIME_NS,
        });
        let snap = snapshot_with(base, 7);
        std::fs::write(dir.join(VMSTATE_FILE), snap.encode()).unwrap();
        match kind {
            5 => {
                std::fs::remove_file(&memory).unwrap();
                mkfifo(&memory);
            }
            6 => {
                std::fs::remove_file(&memory).unwrap();
                std::fs::write(root.join("outside").join("ram"), vec![0u8; RAM as usize]).unwrap();
                symlink(root.join("outside").join("ram"), &memory).unwrap();
            }
            _ => {}
        }
    }
    let top = store.join("a");
    let Ok(snap) = Snapshot::load(&top) else {
        return;
    };
    let top_is_link = std::fs::symlink_metadata(&top).is_ok_and(|m| m.file_type().is_symlink());
    // The top directory is the caller's (a symlink there is followed, and moves the store).
    if let (Ok(layers), false) = (resolve_chain(&top, &snap, None), top_is_link) {
        let canonical_store = store.canonicalize().unwrap();
        for layer in &layers[..layers.len() - 1] {
            assert_confined(layer, &canonical_store);
        }
    }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// A base layer lies directly in the store, and neither its directory nor its file is a symlink.
fn assert_confined(layer: &MemoryLayer, store: &Path) {
    let dir = layer.path.parent().unwrap();
    assert_eq!(dir.parent().unwrap(), store, "{}", layer.path.display());
    assert!(!layer.path.components().any(|c| c == Component::ParentDir));
    for p in [dir, layer.path.as_path()] {
        let m = std::fs::symlink_metadata(p).unwrap();
        assert!(!m.file_type().is_symlink(), "{} is a symlink", p.display());
        assert!(m.is_dir() || m.is_file(), "{} is not regular", p.display());
    }
}

#[test]
fn fuzz_diff_chain_resolution() {
    let root: PathBuf = std::env::temp_dir().join(format!("sm-fuzz-chain-{}", std::process::id()));
    fuzz_support::run("vmstate_chain", |data| chain_target(data, &root));
    let _ = std::fs::remove_dir_all(&root);
}

/// Writes the hand-encoded seeds of the `vmstate` corpus: valid states (full, diff, with devices)
/// and hostile ones with a valid checksum. `cargo test --test fuzz_vmstate -- --ignored`
#[test]
#[ignore]
fn write_seed_corpus() {
    use supermachine_core::snapshot::{codec, QueueState, TransportState};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/vmstate");
    std::fs::create_dir_all(&dir).unwrap();
    let full = snapshot_with(None, 1);
    let diff = snapshot_with(
        Some(BaseRef {
            path: "../golden".into(),
            id: [2; 32],
            memory_len: RAM,
            memory_mtime_ns: 1,
        }),
        3,
    );
    let mut devices = snapshot_with(None, 4);
    devices.machine.disks = vec![true, false];
    devices.machine.vsock = true;
    devices.machine.shares = vec![true];
    devices.machine.cmdline = "console=ttyS0 quiet".into();
    devices.devices.transports = vec![
        TransportState {
            device_type: 2,
            queues: vec![QueueState {
                max_size: 256,
                size: 256,
                ready: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        4
    ];
    devices.vcpus[0].msrs = vec![(0x10, 1), (0xc000_0080, 0xd01)];
    let mut seeds: Vec<(&str, Vec<u8>)> = vec![
        ("seed-full.bin", full.encode()),
        ("seed-diff.bin", diff.encode()),
        ("seed-devices.bin", devices.encode()),
    ];
    let mut absolute = snapshot_with(None, 5);
    absolute.memory = diff.memory.clone();
    absolute.memory.base.as_mut().unwrap().path = "/etc".into();
    seeds.push(("hostile-absolute-base.bin", absolute.encode()));
    let mut console = snapshot_with(None, 6);
    console.machine.console_capacity = u64::MAX;
    seeds.push(("hostile-console-capacity.bin", console.encode()));
    // A list length prefix of 2^60 (the disk count, the first list of the body) with a valid
    // length and checksum, so only the decoder can refuse it.
    let m = &full.machine;
    let at = 24
        + codec::encode(&(
            m.memory_size,
            m.vcpus,
            m.template,
            &m.cmdline,
            m.console_capacity,
        ))
        .len();
    let mut counts = full.encode();
    assert_eq!(counts[at], 0, "an empty disk list");
    counts.splice(at..=at, codec::encode(&(1u64 << 60)));
    seeds.push(("hostile-count.bin", resealed(&counts).unwrap()));
    for (name, data) in seeds {
        std::fs::write(dir.join(name), data).unwrap();
    }
}

/// The corpus's states of a real 2-vCPU guest decode (they are regenerated when the format
/// version changes; older ones stay as `v2-*` to `v5-*` and are refused by their version).
#[test]
fn the_real_states_in_the_corpus_decode() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/vmstate");
    for name in [
        "real-counter-2vcpus-full.bin",
        "real-counter-2vcpus-diff.bin",
    ] {
        let data = std::fs::read(dir.join(name)).unwrap();
        let snap = Snapshot::decode(&data, name).unwrap();
        assert_eq!(snap.vcpus.len(), 2, "{name}");
        assert_eq!(snap.encode(), data, "{name}");
    }
    for old in [
        "v2-real-counter-2vcpus-diff.bin",
        "v3-real-counter-2vcpus-diff.bin",
        "v4-real-counter-2vcpus-diff.bin",
        "v5-real-counter-2vcpus-diff.bin",
    ] {
        let data = std::fs::read(dir.join(old)).unwrap();
        let e = Snapshot::decode(&data, old).unwrap_err().to_string();
        assert!(e.ends_with("take the snapshot again"), "{e}");
    }
}
