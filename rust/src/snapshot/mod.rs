//! VM snapshots: the `vmstate.bin` format and the state it holds.
//!
//! A snapshot is a directory with two files:
//!
//! * `memory.bin`: guest RAM, raw, laid out like the RAM file of a running VM (the part above
//!   the 32-bit MMIO hole follows the part below it), so a restore maps it directly,
//!   copy-on-write. Pages that were never written are holes.
//! * `vmstate.bin`: everything else, in this layout (all integers little-endian):
//!
//! | offset | size | field                                              |
//! | ------ | ---- | -------------------------------------------------- |
//! | 0      | 8    | magic `SMVMSNAP`                                   |
//! | 8      | 4    | format version ([`FORMAT_VERSION`])                |
//! | 12     | 4    | reserved, zero                                     |
//! | 16     | 8    | total file length                                  |
//! | 24     |      | the body: [`Snapshot`] in postcard's encoding      |
//! | end-4  | 4    | CRC32 of every byte before it                      |
//!
//! The body is the serde form of [`Snapshot`] (see [`codec`]): machine, memory (see [`memory`]:
//! a full snapshot, or a diff against a base snapshot), VM, vCPUs and devices, each type's
//! encoding derived next to it (the devices' next to the devices). postcard is compact (varint
//! integers, KVM structures as length-prefixed byte strings) and its wire format is specified
//! and stable across its 1.x releases. A reader refuses another format version before looking
//! further, checks the length and the checksum before decoding anything, bounds every sequence
//! while decoding it, and then checks the parts against each other.

pub mod codec;
pub mod memory;
pub mod state;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

pub use memory::{BaseRef, MemoryId, MemoryLayer, MemoryState};
pub use state::{DeviceState, MachineState, QueueState, TransportState, VcpuState, VmState};

/// The snapshot format this build writes and reads.
/// Version 2 added the memory section (identity, base, page bitmap); version 3 replaced the
/// section table by one serde-encoded body; version 4 made the memory identity a 256-bit BLAKE3
/// digest (it was a 128-bit xxh3, which anyone can collide); version 5 records whether the VM
/// had a network card; version 6 records its shared folders.
pub const FORMAT_VERSION: u32 = 6;
pub const MAGIC: [u8; 8] = *b"SMVMSNAP";
pub const VMSTATE_FILE: &str = "vmstate.bin";
pub const MEMORY_FILE: &str = "memory.bin";

const HEADER_LEN: usize = 24;

/// Largest `vmstate.bin` a restore reads. The biggest real state is the diff page bitmap of the
/// largest RAM (64 GiB: 2 MiB of bitmap) plus 32 vCPUs of a few KiB each, well under 4 MiB; the
/// cap leaves room for growth while keeping a hostile file from making us read gigabytes.
pub const MAX_VMSTATE_LEN: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path} does not exist")]
    Missing { path: String },
    #[error("snapshot {path} cannot be read: {msg}")]
    Read { path: String, msg: String },
    #[error("cannot write snapshot {path}: {msg}")]
    Write { path: String, msg: String },
    #[error("snapshot {path} is not a supermachine VM snapshot (bad magic)")]
    NotASnapshot { path: String },
    #[error("snapshot {path} is truncated")]
    Truncated { path: String },
    #[error("snapshot {path} is corrupt: {why}")]
    Corrupt { path: String, why: String },
    #[error(
        "snapshot {path} has format version {found}, but this build reads only version {expected} \
         (it was made by another version of supermachine): take the snapshot again"
    )]
    Version {
        path: String,
        found: u32,
        expected: u32,
    },
    #[error("snapshot memory {path} does not match the saved state: {why}")]
    Memory { path: String, why: String },
    #[error("cannot capture the VM state: {0}")]
    Capture(String),
    #[error("cannot restore the VM state: {0}")]
    Restore(String),
    #[error("base snapshot {path} does not exist")]
    BaseMissing { path: String },
    #[error("base snapshot {path} cannot be used: {why}")]
    Base { path: String, why: String },
    #[error("snapshot {path} is {size} bytes, more than the {limit} bytes a VM state can have")]
    TooLarge { path: String, size: u64, limit: u64 },
}

/// Opens a snapshot file for reading without following a symlink at its last component, without
/// blocking on a FIFO or device, and refuses anything but a regular file (a FIFO would hang the
/// restore, a device or symlink would read a host file the snapshot does not own).
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                std::io::Error::other("it is a symbolic link, and snapshot files must not be")
            } else {
                e
            }
        })?;
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        return Err(std::io::Error::other(format!(
            "it is {what}, not a regular file"
        )));
    }
    Ok(file)
}

/// Everything in `vmstate.bin`, encoded in this order: the machine and the memory record (what
/// a restore checks first, and tools read) before the KVM and device state.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub machine: MachineState,
    pub memory: MemoryState,
    pub vm: VmState,
    #[serde(deserialize_with = "state::vcpus")]
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceState,
}

impl Snapshot {
    /// The complete `vmstate.bin` contents.
    pub fn encode(&self) -> Vec<u8> {
        let body = codec::encode(self);
        let total = HEADER_LEN + body.len() + 4;
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(total as u64).to_le_bytes());
        out.extend_from_slice(&body);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses `vmstate.bin` contents; `path` only names the file in errors.
    pub fn decode(data: &[u8], path: &str) -> Result<Snapshot, SnapshotError> {
        let p = || path.to_string();
        let corrupt = |why: String| SnapshotError::Corrupt { path: p(), why };
        if data.len() < MAGIC.len() {
            return Err(if MAGIC.starts_with(data) {
                SnapshotError::Truncated { path: p() }
            } else {
                SnapshotError::NotASnapshot { path: p() }
            });
        }
        if data[..8] != MAGIC {
            return Err(SnapshotError::NotASnapshot { path: p() });
        }
        if data.len() < HEADER_LEN + 4 {
            return Err(SnapshotError::Truncated { path: p() });
        }
        let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::Version {
                path: p(),
                found: version,
                expected: FORMAT_VERSION,
            });
        }
        let total = u64_at(16);
        if (data.len() as u64) < total {
            return Err(SnapshotError::Truncated { path: p() });
        }
        if (data.len() as u64) > total {
            return Err(corrupt(format!(
                "{} bytes follow the recorded end of the file",
                data.len() as u64 - total
            )));
        }
        let (body, crc) = data.split_at(data.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(corrupt("checksum mismatch".into()));
        }
        if u32_at(12) != 0 {
            return Err(corrupt("the reserved header field is not zero".into()));
        }
        let snap: Snapshot = codec::decode(&body[HEADER_LEN..]).map_err(&corrupt)?;
        snap.check_consistent().map_err(corrupt)?;
        Ok(snap)
    }

    /// The values are in range and the parts agree with each other: as many vCPU states as
    /// vCPUs, one virtio transport per device the machine names, a page bitmap that fits RAM.
    fn check_consistent(&self) -> Result<(), String> {
        let m = &self.machine;
        m.check()?;
        self.memory.check(m.memory_size)?;
        if usize::from(m.vcpus) != self.vcpus.len() {
            return Err(format!(
                "it names {} vCPUs but holds the state of {}",
                m.vcpus,
                self.vcpus.len()
            ));
        }
        let devices = m.virtio_device_count();
        if self.devices.transports.len() != devices {
            return Err(format!(
                "it names {devices} virtio devices but holds the state of {}",
                self.devices.transports.len()
            ));
        }
        Ok(())
    }

    /// Reads and checks `dir/vmstate.bin`: only a regular file, and only up to
    /// [`MAX_VMSTATE_LEN`] bytes.
    pub fn load(dir: &Path) -> Result<Snapshot, SnapshotError> {
        use std::io::Read;
        let path = dir.join(VMSTATE_FILE);
        let shown = path.display().to_string();
        let read_err = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::NotFound {
                SnapshotError::Missing {
                    path: shown.clone(),
                }
            } else {
                SnapshotError::Read {
                    path: shown.clone(),
                    msg: crate::vmm::os_msg(&e),
                }
            }
        };
        let file = open_regular(&path).map_err(read_err)?;
        let size = file.metadata().map_err(read_err)?.len();
        if size > MAX_VMSTATE_LEN {
            return Err(SnapshotError::TooLarge {
                path: shown,
                size,
                limit: MAX_VMSTATE_LEN,
            });
        }
        let mut data = Vec::with_capacity(size as usize);
        // The file may grow after the size check: read no more than the cap allows.
        file.take(MAX_VMSTATE_LEN + 1)
            .read_to_end(&mut data)
            .map_err(read_err)?;
        if data.len() as u64 > MAX_VMSTATE_LEN {
            return Err(SnapshotError::TooLarge {
                path: shown,
                size: data.len() as u64,
                limit: MAX_VMSTATE_LEN,
            });
        }
        Snapshot::decode(&data, &shown)
    }
}

/// Writes files into a snapshot directory atomically: each goes to a temporary name, is synced,
/// and all are renamed into place together by [`AtomicDir::commit`], followed by a directory
/// sync. Dropping without committing removes the temporary files.
pub struct AtomicDir {
    dir: PathBuf,
    pending: Vec<(PathBuf, PathBuf)>,
}

impl AtomicDir {
    pub fn new(dir: &Path) -> Result<Self, SnapshotError> {
        std::fs::create_dir_all(dir).map_err(|e| SnapshotError::Write {
            path: dir.display().to_string(),
            msg: crate::vmm::os_msg(&e),
        })?;
        Ok(AtomicDir {
            dir: dir.to_path_buf(),
            pending: Vec::new(),
        })
    }

    fn err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
        move |e| SnapshotError::Write {
            path: path.display().to_string(),
            msg: crate::vmm::os_msg(&e),
        }
    }

    /// Creates the temporary file for `name`; the caller fills it and hands it back to
    /// [`AtomicDir::finish`].
    pub fn create(&mut self, name: &str) -> Result<(File, PathBuf), SnapshotError> {
        let final_path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let f = create_fresh(&tmp).map_err(Self::err(&tmp))?;
        self.pending.push((tmp.clone(), final_path));
        Ok((f, tmp))
    }

    /// Syncs a file created by [`AtomicDir::create`].
    pub fn finish(&self, file: File, tmp: &Path) -> Result<(), SnapshotError> {
        file.sync_all().map_err(Self::err(tmp))
    }

    /// Writes `data` as `name`.
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<(), SnapshotError> {
        let (mut f, tmp) = self.create(name)?;
        f.write_all(data).map_err(Self::err(&tmp))?;
        self.finish(f, &tmp)
    }

    /// Renames every file into place and syncs the directory.
    pub fn commit(mut self) -> Result<(), SnapshotError> {
        for (tmp, final_path) in std::mem::take(&mut self.pending) {
            if let Err(e) = std::fs::rename(&tmp, &final_path) {
                let _ = std::fs::remove_file(&tmp);
                return Err(Self::err(&final_path)(e));
            }
        }
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(Self::err(&self.dir))
    }
}

/// Creates `path` as a new file: a leftover of that name (a crashed writer's, or a symlink someone
/// planted to make us write elsewhere) is removed first, never followed.
fn create_fresh(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
    };
    match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(path)?;
            open()
        }
        r => r,
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        for (tmp, _) in &self.pending {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            machine: MachineState {
                memory_size: 16 << 20,
                vcpus: 1,
                template: 0,
                cmdline: "console=ttyS0".into(),
                console_capacity: 4096,
                disks: vec![true],
                vsock: true,
                net: false,
                shares: Vec::new(),
            },
            vm: VmState::default(),
            vcpus: vec![VcpuState::default()],
            devices: DeviceState {
                transports: vec![TransportState::default(); 2],
                ..Default::default()
            },
            memory: MemoryState::default(),
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        let bytes = s.encode();
        let back = Snapshot::decode(&bytes, "x").unwrap();
        assert_eq!(back.machine, s.machine);
        assert_eq!(back.vcpus.len(), 1);
        assert_eq!(back.encode(), bytes);
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sm-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let d = temp_dir("files");
        let state = d.join(VMSTATE_FILE);
        let c = std::ffi::CString::new(state.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = Snapshot::load(&d).unwrap_err().to_string();
        assert!(e.contains("it is a FIFO, not a regular file"), "{e}");
        std::fs::remove_file(&state).unwrap();
        std::fs::write(d.join("real"), sample().encode()).unwrap();
        std::os::unix::fs::symlink(d.join("real"), &state).unwrap();
        let e = Snapshot::load(&d).unwrap_err().to_string();
        assert!(e.contains("is a symbolic link"), "{e}");
        std::fs::remove_file(&state).unwrap();
        let big = File::create(&state).unwrap();
        big.set_len(1 << 40).unwrap(); // sparse: refused by its size, never read
        let e = Snapshot::load(&d).unwrap_err().to_string();
        assert!(e.contains("more than the 16777216 bytes"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_planted_temporary_name_is_replaced_not_followed() {
        let d = temp_dir("planted");
        let victim = d.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let tmp = d.join(format!(".{VMSTATE_FILE}.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let mut out = AtomicDir::new(&d).unwrap();
        out.write(VMSTATE_FILE, &sample().encode()).unwrap();
        out.commit().unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(Snapshot::load(&d).is_ok());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn decoded_counts_are_bounded_and_consistent() {
        let mut s = sample();
        s.machine.vcpus = 2;
        let e = Snapshot::decode(&s.encode(), "s").unwrap_err().to_string();
        assert!(e.contains("names 2 vCPUs but holds the state of 1"), "{e}");
        let mut s = sample();
        s.devices.transports.pop();
        let e = Snapshot::decode(&s.encode(), "s").unwrap_err().to_string();
        assert!(
            e.contains("names 2 virtio devices but holds the state of 1"),
            "{e}"
        );
        // A network card counts as a device of its own.
        let mut s = sample();
        s.machine.net = true;
        s.devices.transports.push(TransportState::default());
        assert!(Snapshot::decode(&s.encode(), "s").is_ok());
        s.devices.transports.pop();
        let e = Snapshot::decode(&s.encode(), "s").unwrap_err().to_string();
        assert!(
            e.contains("names 3 virtio devices but holds the state of 2"),
            "{e}"
        );
        let mut s = sample();
        s.vcpus[0].msrs = vec![(1, 1); state::MAX_MSRS + 1];
        let e = Snapshot::decode(&s.encode(), "s").unwrap_err().to_string();
        assert!(e.contains("MSRs in one vCPU"), "{e}");
        let mut s = sample();
        s.machine.memory_size = 128 << 30;
        let e = Snapshot::decode(&s.encode(), "s").unwrap_err().to_string();
        assert!(e.contains("not a whole number of MiB up to 64 GiB"), "{e}");
        let mut s = sample();
        s.devices.serial.in_buffer = vec![0; 65];
        let e = Snapshot::decode(&s.encode(), "s").unwrap_err().to_string();
        assert!(
            e.ends_with("65 bytes in the serial port's receive FIFO (at most 64)"),
            "{e}"
        );
        let mut s = sample();
        s.vcpus = (0..33).map(|_| VcpuState::default()).collect();
        let e = Snapshot::decode(&s.encode(), "s").unwrap_err().to_string();
        assert!(e.ends_with("33 vCPUs (at most 32)"), "{e}");
        let mut s = sample();
        s.devices.transports[0].queues = vec![QueueState::default(); 9];
        let e = Snapshot::decode(&s.encode(), "s").unwrap_err().to_string();
        assert!(
            e.ends_with("9 queues in one virtio device (at most 8)"),
            "{e}"
        );
        let mut s = sample();
        s.machine.cmdline = "x".repeat(state::MAX_CMDLINE_LEN + 1);
        let e = Snapshot::decode(&s.encode(), "s").unwrap_err().to_string();
        assert!(
            e.ends_with("a kernel command line of 4097 bytes (at most 4096)"),
            "{e}"
        );
    }

    /// The body of `s` with the length prefix of its (empty) disk list replaced by `prefix`,
    /// framed with a valid length and checksum.
    fn with_disk_count(s: &Snapshot, prefix: u64) -> Vec<u8> {
        let m = &s.machine;
        assert!(m.disks.is_empty());
        let at = codec::encode(&(
            m.memory_size,
            m.vcpus,
            m.template,
            &m.cmdline,
            m.console_capacity,
        ))
        .len();
        let mut body = codec::encode(s);
        assert_eq!(body[at], 0);
        body.splice(at..=at, codec::encode(&prefix));
        let mut out = s.encode()[..HEADER_LEN].to_vec();
        out.extend_from_slice(&body);
        let total = (out.len() + 4) as u64;
        out[16..24].copy_from_slice(&total.to_le_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    #[test]
    fn a_huge_length_prefix_is_refused() {
        let mut s = sample();
        s.machine.disks.clear();
        s.devices.transports.pop();
        assert!(Snapshot::decode(&with_disk_count(&s, 0), "s").is_ok());
        for prefix in [1 << 60, u64::MAX, 12] {
            let e = Snapshot::decode(&with_disk_count(&s, prefix), "s")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("snapshot s is corrupt: "), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn files_of_another_format_version_are_refused_as_such() {
        // Real files of a 2-vCPU guest, kept in the corpus: version 2 (the section-table format)
        // and version 3 (a 128-bit xxh3 memory identity).
        for (found, old) in [
            (
                2,
                &include_bytes!("../../fuzz/corpus/vmstate/v2-real-counter-2vcpus-full.bin")[..],
            ),
            (
                3,
                &include_bytes!("../../fuzz/corpus/vmstate/v3-real-counter-2vcpus-full.bin")[..],
            ),
        ] {
            let e = Snapshot::decode(old, "s").unwrap_err().to_string();
            assert_eq!(
                e,
                format!(
                    "snapshot s has format version {found}, but this build reads only version \
                     {FORMAT_VERSION} (it was made by another version of supermachine): take the \
                     snapshot again"
                )
            );
        }
    }

    #[test]
    fn damage_gives_one_clear_error() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            let e = Snapshot::decode(&bytes[..cut], "s")
                .unwrap_err()
                .to_string();
            assert_eq!(e, "snapshot s is truncated", "cut at {cut}");
        }
        for i in 24..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            let e = Snapshot::decode(&b, "s").unwrap_err().to_string();
            assert_eq!(e, "snapshot s is corrupt: checksum mismatch", "flip at {i}");
        }
        let mut b = bytes.clone();
        b[8] = 1;
        assert!(Snapshot::decode(&b, "s")
            .unwrap_err()
            .to_string()
            .contains("format version 1"));
        let mut b = bytes.clone();
        b[0] = b'X';
        assert!(Snapshot::decode(&b, "s")
            .unwrap_err()
            .to_string()
            .contains("bad magic"));
        let mut b = bytes;
        b.push(0);
        assert!(Snapshot::decode(&b, "s")
            .unwrap_err()
            .to_string()
            .contains("is corrupt"));
    }
}
