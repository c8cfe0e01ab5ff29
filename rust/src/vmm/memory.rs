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
    /// A snapshot's `memory.bin`, opened read-only and mapped private (copy-on-write): VMs
    /// restored from one file share every page none of them wrote, and the file never changes.
    Snapshot(PathBuf),
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
    #[error("snapshot memory {path} has {found} bytes, but the VM had {expected}")]
    SnapshotSize {
        path: String,
        expected: u64,
        found: u64,
    },
}

/// Guest RAM and the file behind it.
pub struct GuestRam {
    pub mem: GuestMemoryMmap,
    pub file: File,
    pub size: u64,
    /// Mapped private (copy-on-write over `file`).
    pub private: bool,
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
            MemoryBacking::Snapshot(path) => {
                let shown = path.display().to_string();
                let file = File::open(path).map_err(|e| MemoryError::File {
                    path: shown.clone(),
                    msg: os_msg(&e),
                })?;
                let found = file
                    .metadata()
                    .map_err(|e| MemoryError::File {
                        path: shown.clone(),
                        msg: os_msg(&e),
                    })?
                    .len();
                if found != size {
                    return Err(MemoryError::SnapshotSize {
                        path: shown,
                        expected: size,
                        found,
                    });
                }
                file
            }
        };
        let private = matches!(backing, MemoryBacking::Snapshot(_));
        if !private {
            file.set_len(size).map_err(|e| MemoryError::Truncate {
                size,
                msg: os_msg(&e),
            })?;
        }
        let share = if private {
            libc::MAP_PRIVATE
        } else {
            libc::MAP_SHARED
        };
        let mut regions = Vec::new();
        for (gpa, len, offset) in layout(size) {
            let fd = file
                .try_clone()
                .map_err(|e| MemoryError::Mmap(os_msg(&e)))?;
            let region = MmapRegionBuilder::new(len as usize)
                .with_file_offset(FileOffset::new(fd, offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(share | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| MemoryError::Mmap(e.to_string()))?;
            let region = GuestRegionMmap::new(region, GuestAddress(gpa))
                .ok_or_else(|| MemoryError::Mmap("region wraps the address space".into()))?;
            regions.push(region);
        }
        let mem =
            GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Mmap(e.to_string()))?;
        Ok(GuestRam {
            mem,
            file,
            size,
            private,
        })
    }

    /// Writes RAM to `out` (already sized to the RAM size) at the same offsets as the RAM file,
    /// leaving every all-zero page a hole. Only pages that can hold data are read: the backing
    /// file's data extents, plus (for a private mapping) the pages resident in this process.
    /// Returns the number of bytes written.
    pub fn write_to(&self, out: &File) -> std::io::Result<u64> {
        use std::os::unix::fs::FileExt;
        use vm_memory::GuestMemoryRegion;
        const PAGE: usize = 4096;
        let mut written = 0u64;
        for (region, (_, len, file_off)) in self.mem.iter().zip(layout(self.size)) {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let pages = len as usize / PAGE;
            let mut wanted = vec![false; pages];
            for (start, end) in data_extents(&self.file, file_off, len)? {
                for w in &mut wanted[((start - file_off) as usize / PAGE)
                    ..((end - file_off) as usize).div_ceil(PAGE).min(pages)]
                {
                    *w = true;
                }
            }
            if self.private {
                let mut resident = vec![0u8; pages];
                // SAFETY: `host` is the start of a live, page-aligned mapping of `len` bytes and
                // `resident` has one byte per page of it.
                let rc = unsafe {
                    libc::mincore(host.cast(), len as usize, resident.as_mut_ptr().cast())
                };
                if rc != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for (w, r) in wanted.iter_mut().zip(&resident) {
                    *w |= r & 1 != 0;
                }
            }
            // SAFETY: the mapping is live for `len` bytes while `self` is borrowed; the vCPUs
            // are paused, and devices only write through the same mapping, so reading it as
            // bytes here cannot tear anything we rely on.
            let ram = unsafe { std::slice::from_raw_parts(host as *const u8, len as usize) };
            let mut page = 0;
            while page < pages {
                let nonzero =
                    |p: usize| wanted[p] && ram[p * PAGE..(p + 1) * PAGE].iter().any(|&b| b != 0);
                if !nonzero(page) {
                    page += 1;
                    continue;
                }
                let start = page;
                while page < pages && nonzero(page) {
                    page += 1;
                }
                let bytes = &ram[start * PAGE..page * PAGE];
                out.write_all_at(bytes, file_off + (start * PAGE) as u64)?;
                written += bytes.len() as u64;
            }
        }
        Ok(written)
    }

    /// Whether `[gpa, gpa + len)` lies entirely in guest RAM.
    pub fn contains(&self, gpa: u64, len: usize) -> bool {
        range_in_ram(&self.mem, gpa, len as u64)
    }
}

/// `[start, end)` file ranges holding data within `[off, off + len)` (SEEK_DATA/SEEK_HOLE; the
/// whole range when the file system cannot tell).
fn data_extents(file: &File, off: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let end = off + len;
    let mut out = Vec::new();
    let mut pos = off;
    while pos < end {
        // SAFETY: lseek on a descriptor we own has no memory-safety preconditions.
        let data = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(out),
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(vec![(off, end)]),
                _ => Err(e),
            };
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        out.push((data, hole));
        pos = hole;
    }
    Ok(out)
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
