//! Guest RAM: one shared file mapping (a memfd by default, or a named file), split around the
//! 32-bit MMIO hole, so it can later be snapshotted or mapped copy-on-write elsewhere.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::FromRawFd;
use std::path::PathBuf;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

use super::os_msg;
use crate::snapshot::memory::{self as snapmem, IdHasher, MemoryId, MemoryLayer};

/// Start of the 32-bit MMIO hole; RAM that would fall in it continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;

/// What backs guest RAM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MemoryBacking {
    /// An anonymous memfd (sealed from nobody; shareable by passing its descriptor).
    Memfd,
    /// A file at this path, created or truncated to the RAM size, mapped shared.
    File(PathBuf),
    /// A snapshot's memory chain, base first (see [`crate::snapshot::memory`]): every file is
    /// opened read-only and mapped private (copy-on-write), each diff's pages over the base's,
    /// so VMs restored from one chain share every page none of them wrote, and no file changes.
    Snapshot(Vec<MemoryLayer>),
}

/// Most separate mappings one VM's diff overlays may add (each run of diff pages is one VMA;
/// the kernel caps a process at about 65 000). Shorter runs beyond it are copied in instead.
const MAX_OVERLAY_MAPS: usize = 4096;

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
    /// The snapshot chain this RAM was restored from (empty after a boot).
    pub layers: Vec<MemoryLayer>,
}

/// What a memory write produced.
#[derive(Debug, Clone)]
pub struct MemoryWrite {
    /// Bytes of page data written (all-zero pages are holes).
    pub bytes: u64,
    pub id: MemoryId,
    /// For a diff: the pages stored.
    pub pages: Option<Vec<u8>>,
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
        if !(1..=super::config::MAX_MEMORY_MIB).contains(&memory_mib) {
            return Err(MemoryError::BadSize(memory_mib));
        }
        let size = memory_mib << 20;
        let mut overlay_files = Vec::new();
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
            MemoryBacking::Snapshot(layers) => {
                // Every file of the chain is opened (and its size checked) before anything is
                // mapped; the diffs' files are kept for `map_overlays`.
                for layer in layers {
                    overlay_files.push(open_layer(layer, size)?);
                }
                if overlay_files.is_empty() {
                    return Err(MemoryError::Mmap("the snapshot chain is empty".into()));
                }
                overlay_files.remove(0)
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
        let layers = match backing {
            MemoryBacking::Snapshot(layers) => layers.clone(),
            _ => Vec::new(),
        };
        let ram = GuestRam {
            mem,
            file,
            size,
            private,
            layers,
        };
        ram.map_overlays(&overlay_files)?;
        Ok(ram)
    }

    /// Host address of the start of each region, with its `(guest address, length, file
    /// offset)`.
    fn regions(&self) -> Vec<(*mut u8, u64, u64)> {
        use vm_memory::GuestMemoryRegion;
        self.mem
            .iter()
            .zip(layout(self.size))
            .map(|(region, (_, len, off))| {
                let host = region
                    .get_host_address(vm_memory::MemoryRegionAddress(0))
                    .expect("offset 0 lies in every region");
                (host, len, off)
            })
            .collect()
    }

    /// Maps every diff layer's pages over the base, copy-on-write, from `files` (the diff
    /// layers' `memory.bin`, opened, in layer order); past [`MAX_OVERLAY_MAPS`] runs the
    /// shortest runs are copied instead.
    fn map_overlays(&self, files: &[File]) -> Result<(), MemoryError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        let diffs: Vec<&MemoryLayer> = self.layers.iter().skip(1).collect();
        if diffs.is_empty() {
            return Ok(());
        }
        let mut work = Vec::new(); // (run length, layer index, host, file offset)
        for (i, layer) in diffs.iter().enumerate() {
            let Some(bitmap) = &layer.pages else { continue };
            for &(host, len, off) in &self.regions() {
                let first = off as usize / snapmem::PAGE_SIZE;
                let last = first + len as usize / snapmem::PAGE_SIZE;
                for (start, count) in snapmem::runs(bitmap, first, last) {
                    let rel = ((start - first) * snapmem::PAGE_SIZE) as isize;
                    // SAFETY: `rel` lies within this region's mapping (start is in [first, last)).
                    let at = unsafe { host.offset(rel) };
                    work.push((count, i, at, (start * snapmem::PAGE_SIZE) as u64));
                }
            }
        }
        // Later layers must land over earlier ones: map in layer order, but choose which runs
        // are mapped (rather than copied) by length.
        let mut by_len: Vec<usize> = (0..work.len()).collect();
        by_len.sort_by_key(|&k| std::cmp::Reverse(work[k].0));
        let mut mapped = vec![false; work.len()];
        for &k in by_len.iter().take(MAX_OVERLAY_MAPS) {
            mapped[k] = true;
        }
        for (k, &(count, layer, at, file_off)) in work.iter().enumerate() {
            let len = count * snapmem::PAGE_SIZE;
            if mapped[k] {
                // SAFETY: `[at, at + len)` lies inside a guest RAM mapping this GuestRam owns and
                // no vCPU runs yet; MAP_FIXED replaces those pages with the diff file's.
                let p = unsafe {
                    libc::mmap(
                        at.cast(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                        files[layer].as_raw_fd(),
                        file_off as libc::off_t,
                    )
                };
                if p == libc::MAP_FAILED {
                    return Err(MemoryError::Mmap(os_msg(&std::io::Error::last_os_error())));
                }
            } else {
                // SAFETY: as above; the slice covers exactly the run's pages.
                let dst = unsafe { std::slice::from_raw_parts_mut(at, len) };
                files[layer]
                    .read_exact_at(dst, file_off)
                    .map_err(|e| MemoryError::File {
                        path: diffs[layer].path.display().to_string(),
                        msg: os_msg(&e),
                    })?;
            }
        }
        Ok(())
    }

    /// Writes RAM to `out` (already sized to the RAM size) at the same offsets as the RAM file,
    /// leaving every all-zero page a hole, and computes the memory identity. Only pages that can
    /// hold data are read: the backing file's data extents, every page of a diff layer, plus
    /// (for a private mapping) the pages resident in this process.
    pub fn write_to(&self, out: &File) -> std::io::Result<MemoryWrite> {
        let mut hasher = IdHasher::full();
        let mut bytes = 0u64;
        for (host, len, file_off) in self.regions() {
            let pages = len as usize / snapmem::PAGE_SIZE;
            let first = file_off as usize / snapmem::PAGE_SIZE;
            let mut wanted = vec![false; pages];
            for (start, end) in data_extents(&self.file, file_off, len)? {
                for w in &mut wanted[((start - file_off) as usize / snapmem::PAGE_SIZE)
                    ..((end - file_off) as usize)
                        .div_ceil(snapmem::PAGE_SIZE)
                        .min(pages)]
                {
                    *w = true;
                }
            }
            for layer in self.layers.iter().skip(1) {
                if let Some(bm) = &layer.pages {
                    for (p, w) in wanted.iter_mut().enumerate() {
                        *w |= snapmem::bit(bm, first + p);
                    }
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
            let ram = region_bytes(host, len);
            let page = |p: usize| &ram[p * snapmem::PAGE_SIZE..(p + 1) * snapmem::PAGE_SIZE];
            let nonzero = |p: usize| wanted[p] && page(p).iter().any(|&b| b != 0);
            let mut p = 0;
            while p < pages {
                if !nonzero(p) {
                    p += 1;
                    continue;
                }
                let start = p;
                // One page at a time, on this thread: a worker's threads are bounded by its
                // pids limit, so the VMM starts no thread pool to hash.
                while p < pages && nonzero(p) {
                    hasher.page(first + p, page(p));
                    p += 1;
                }
                let run = &ram[start * snapmem::PAGE_SIZE..p * snapmem::PAGE_SIZE];
                write_at(out, run, file_off + (start * snapmem::PAGE_SIZE) as u64)?;
                bytes += run.len() as u64;
            }
        }
        Ok(MemoryWrite {
            bytes,
            id: hasher.finish(),
            pages: None,
        })
    }

    /// Writes to `out` only the pages that differ from `base` (the same-sized RAM of the base
    /// snapshot, mapped), with the diff identity over `base_id`. `candidates`, when known (the
    /// pages written since this RAM was restored from that same base), limits the comparison;
    /// otherwise every page is compared.
    pub fn write_diff(
        &self,
        out: &File,
        base: &GuestRam,
        base_id: &MemoryId,
        candidates: Option<&[bool]>,
    ) -> std::io::Result<MemoryWrite> {
        let mut hasher = IdHasher::diff(base_id);
        let mut bitmap = vec![0u8; snapmem::bitmap_len(self.size)];
        let mut bytes = 0u64;
        for ((host, len, file_off), (base_host, base_len, _)) in
            self.regions().into_iter().zip(base.regions())
        {
            if base_len != len {
                return Err(std::io::Error::other("the base RAM has another layout"));
            }
            let ram = region_bytes(host, len);
            let old = region_bytes(base_host, len);
            let first = file_off as usize / snapmem::PAGE_SIZE;
            for p in 0..len as usize / snapmem::PAGE_SIZE {
                if candidates.is_some_and(|c| !c[first + p]) {
                    continue;
                }
                let range = p * snapmem::PAGE_SIZE..(p + 1) * snapmem::PAGE_SIZE;
                let (now, was) = (&ram[range.clone()], &old[range]);
                if now == was {
                    continue;
                }
                snapmem::set_bit(&mut bitmap, first + p);
                hasher.page(first + p, now);
                if now.iter().any(|&b| b != 0) {
                    write_at(out, now, file_off + (p * snapmem::PAGE_SIZE) as u64)?;
                    bytes += snapmem::PAGE_SIZE as u64;
                }
            }
        }
        Ok(MemoryWrite {
            bytes,
            id: hasher.finish(),
            pages: Some(bitmap),
        })
    }

    /// Pages written since this RAM was mapped copy-on-write from a snapshot, in RAM-file order
    /// (see [`snapmem::written_pages`]); `None` for RAM that is not a private mapping.
    pub fn written_pages(&self) -> std::io::Result<Option<Vec<bool>>> {
        if !self.private {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(self.size as usize / snapmem::PAGE_SIZE);
        for (host, len, _) in self.regions() {
            out.extend(snapmem::written_pages(host, len as usize)?);
        }
        Ok(Some(out))
    }

    /// Whether `[gpa, gpa + len)` lies entirely in guest RAM.
    pub fn contains(&self, gpa: u64, len: usize) -> bool {
        range_in_ram(&self.mem, gpa, len as u64)
    }
}

/// Opens one file of a snapshot's memory chain read-only (a regular file only, never through a
/// symlink: see [`crate::snapshot::open_regular`]) and checks its size.
fn open_layer(layer: &MemoryLayer, size: u64) -> Result<File, MemoryError> {
    let shown = layer.path.display().to_string();
    let opened = match &layer.file {
        Some(f) => f.0.try_clone(),
        None => crate::snapshot::open_regular(&layer.path),
    };
    let file = opened.map_err(|e| MemoryError::File {
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
    Ok(file)
}

/// One RAM region as bytes.
fn region_bytes<'a>(host: *mut u8, len: u64) -> &'a [u8] {
    // SAFETY: `host` is the start of a live guest RAM mapping of `len` bytes owned by a GuestRam
    // that the caller borrows for the slice's use; vCPUs are paused while snapshots read it, and
    // devices only write through the same mapping, so reading it as bytes tears nothing.
    unsafe { std::slice::from_raw_parts(host as *const u8, len as usize) }
}

fn write_at(out: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    out.write_all_at(data, offset)
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
