//! Guest RAM: one shared file mapping (a memfd by default, or a named file), split around the
//! 32-bit MMIO hole, so it can later be snapshotted or mapped copy-on-write elsewhere.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::FromRawFd;
use std::path::PathBuf;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

use super::os_msg;

/// Start of the 32-bit MMIO hole; RAM that would fall in it continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;

/// What backs guest RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryBacking {
    /// An anonymous memfd (sealed from nobody; shareable by passing its descriptor).
    Memfd,
    /// A file at this path, created or truncated to the RAM size, mapped shared.
    File(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory size must be at least 1 MiB and at most 64 GiB, got {0} MiB")]
    BadSize(u64),
    #[error("cannot create the guest RAM memfd: {0}")]
    Memfd(String),
    #[error("cannot open guest RAM file {path}: {msg}")]
    File { path: String, msg: String },
    #[error("cannot size guest RAM backing to {size} bytes: {msg}")]
    Truncate { size: u64, msg: String },
    #[error("cannot map guest RAM: {0}")]
    Mmap(String),
}

/// Guest RAM and the file behind it.
pub struct GuestRam {
    pub mem: GuestMemoryMmap,
    pub file: File,
    pub size: u64,
}

/// `(guest address, length, file offset)` of each RAM region for `size` bytes of RAM.
pub fn layout(size: u64) -> Vec<(u64, u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size, 0)]
    } else {
        vec![
            (0, MMIO_HOLE_START, 0),
            (MMIO_HOLE_END, size - MMIO_HOLE_START, MMIO_HOLE_START),
        ]
    }
}

impl GuestRam {
    pub fn new(memory_mib: u64, backing: &MemoryBacking) -> Result<Self, MemoryError> {
        if !(1..=64 << 10).contains(&memory_mib) {
            return Err(MemoryError::BadSize(memory_mib));
        }
        let size = memory_mib << 20;
        let file = match backing {
            MemoryBacking::Memfd => {
                let name = CString::new("supermachine-guest-ram").expect("no NUL in literal");
                // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
                let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
                if fd < 0 {
                    return Err(MemoryError::Memfd(os_msg(&std::io::Error::last_os_error())));
                }
                // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
                unsafe { File::from_raw_fd(fd) }
            }
            MemoryBacking::File(path) => OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(|e| MemoryError::File {
                    path: path.display().to_string(),
                    msg: os_msg(&e),
                })?,
        };
        file.set_len(size).map_err(|e| MemoryError::Truncate {
            size,
            msg: os_msg(&e),
        })?;
        let mut regions = Vec::new();
        for (gpa, len, offset) in layout(size) {
            let fd = file
                .try_clone()
                .map_err(|e| MemoryError::Mmap(os_msg(&e)))?;
            let region = MmapRegionBuilder::new(len as usize)
                .with_file_offset(FileOffset::new(fd, offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| MemoryError::Mmap(e.to_string()))?;
            let region = GuestRegionMmap::new(region, GuestAddress(gpa))
                .ok_or_else(|| MemoryError::Mmap("region wraps the address space".into()))?;
            regions.push(region);
        }
        let mem =
            GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Mmap(e.to_string()))?;
        Ok(GuestRam { mem, file, size })
    }

    /// Whether `[gpa, gpa + len)` lies entirely in guest RAM.
    pub fn contains(&self, gpa: u64, len: usize) -> bool {
        range_in_ram(&self.mem, gpa, len as u64)
    }
}

/// Whether `[gpa, gpa + len)` lies entirely in `mem` (a zero-length range must still start in RAM
/// or right at its end).
pub fn range_in_ram(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> bool {
    if gpa.checked_add(len).is_none() {
        return false;
    }
    if len == 0 {
        return mem.address_in_range(GuestAddress(gpa))
            || (gpa > 0 && mem.address_in_range(GuestAddress(gpa - 1)));
    }
    usize::try_from(len).is_ok_and(|l| mem.check_range(GuestAddress(gpa), l))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn layout_splits_around_the_hole() {
        assert_eq!(layout(1 << 30), vec![(0, 1 << 30, 0)]);
        assert_eq!(
            layout(4 << 30),
            vec![
                (0, MMIO_HOLE_START, 0),
                (MMIO_HOLE_END, 1 << 30, MMIO_HOLE_START)
            ]
        );
    }

    #[test]
    fn memfd_ram_reads_back_and_bounds_are_checked() {
        let ram = GuestRam::new(2, &MemoryBacking::Memfd).unwrap();
        ram.mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
        let mut b = [0u8; 5];
        ram.mem.read_slice(&mut b, GuestAddress(0x1000)).unwrap();
        assert_eq!(&b, b"hello");
        assert!(ram.contains(0, 2 << 20));
        assert!(!ram.contains(1, 2 << 20));
        assert!(!ram.contains(u64::MAX, 2));
        assert!(ram.contains(2 << 20, 0));
        assert!(!ram.contains((2 << 20) + 1, 0));
        assert!(GuestRam::new(0, &MemoryBacking::Memfd).is_err());
    }
}
