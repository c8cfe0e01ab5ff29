//! The serial console as a ring in shared memory (a memfd the owner creates and passes to the
//! worker), so the owner reads it without asking the worker, and still has it after the worker
//! crashed. The worker only ever writes; whatever it writes is guest output and treated as such.
//!
//! Layout: bytes `0..8` count every byte ever written (little endian, updated after the data),
//! bytes `8..16` are non-zero once the VM has ended (so the owner can tell a running VM without
//! a round trip to the worker), bytes `16..` are the ring. The reader clamps everything it reads
//! from the header, since a compromised worker may write anything there; a lie about "ended" can
//! only make the owner ask the worker.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use memmap2::{MmapOptions, MmapRaw};

const HEADER: usize = 16;
/// Largest ring: the same bound as the in-VMM console buffer.
pub const MAX_CAPACITY: usize = crate::vmm::persist::MAX_RESTORED_CONSOLE_CAPACITY;

/// A console ring mapped in this process.
pub struct ConsoleRing {
    map: MmapRaw,
    capacity: usize,
}

// SAFETY: the mapping is plain shared memory; writes go through `push` (one writer, serialised
// by the serial device's lock) and reads copy out; torn reads only garble console text.
unsafe impl Send for ConsoleRing {}
// SAFETY: as above.
unsafe impl Sync for ConsoleRing {}

impl ConsoleRing {
    /// A new ring of `capacity` bytes in a fresh memfd (owner side).
    pub fn create(capacity: usize) -> std::io::Result<(ConsoleRing, File)> {
        let capacity = capacity.clamp(1, MAX_CAPACITY);
        let name = CString::new("supermachine-console").expect("no NUL in literal");
        // SAFETY: `name` is a valid C string; the flags are valid.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: memfd_create just returned this descriptor; nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len((HEADER + capacity) as u64)?;
        let ring = Self::map(&file)?;
        Ok((ring, file))
    }

    /// Maps a ring passed in as `file`; its size gives the capacity.
    pub fn map(file: &File) -> std::io::Result<ConsoleRing> {
        let len = file.metadata()?.len();
        if len <= HEADER as u64 || len > (HEADER + MAX_CAPACITY) as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a console ring of {len} bytes is out of bounds"),
            ));
        }
        let map = MmapOptions::new().len(len as usize).map_raw(file)?;
        Ok(ConsoleRing {
            map,
            capacity: len as usize - HEADER,
        })
    }

    fn total(&self) -> &AtomicU64 {
        // SAFETY: the mapping is at least HEADER bytes, page aligned, and lives as long as self.
        unsafe { &*(self.map.as_mut_ptr() as *const AtomicU64) }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: HEADER is within the mapping.
        unsafe { self.map.as_mut_ptr().add(HEADER) }
    }

    fn ended_flag(&self) -> &AtomicU64 {
        // SAFETY: the mapping is at least HEADER (16) bytes and page aligned; offset 8 is aligned.
        unsafe { &*(self.map.as_mut_ptr().add(8) as *const AtomicU64) }
    }

    /// Marks the VM as ended (writer side).
    pub fn set_ended(&self) {
        self.ended_flag().store(1, Ordering::Release);
    }

    /// Whether the worker says the VM has ended (reader side; only a hint).
    pub fn ended(&self) -> bool {
        self.ended_flag().load(Ordering::Acquire) != 0
    }

    /// Appends `bytes`, dropping the oldest when full (writer side).
    pub fn push(&self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(self.capacity)..];
        let total = self.total().load(Ordering::Relaxed);
        let mut pos = (total % self.capacity as u64) as usize;
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = rest.len().min(self.capacity - pos);
            // SAFETY: `pos + n <= capacity`, inside the data area; the source is a live slice.
            unsafe { std::ptr::copy_nonoverlapping(rest.as_ptr(), self.data().add(pos), n) };
            rest = &rest[n..];
            pos = (pos + n) % self.capacity;
        }
        self.total()
            .store(total.wrapping_add(bytes.len() as u64), Ordering::Release);
    }

    /// The kept bytes, oldest first (reader side).
    pub fn contents(&self) -> Vec<u8> {
        let total = self.total().load(Ordering::Acquire);
        let kept = total.min(self.capacity as u64) as usize;
        let end = (total % self.capacity as u64) as usize;
        let start = (end + self.capacity - kept) % self.capacity;
        let mut out = Vec::with_capacity(kept);
        let mut pos = start;
        while out.len() < kept {
            let n = (kept - out.len()).min(self.capacity - pos);
            // SAFETY: `pos + n <= capacity`, inside the data area.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(self.data().add(pos), n) });
            pos = (pos + n) % self.capacity;
        }
        out
    }

    /// Bytes ever written, as the writer says.
    pub fn written(&self) -> u64 {
        self.total().load(Ordering::Acquire)
    }
}

/// The worker's ring; the serial console mirrors into it once set (one VM per worker process,
/// so one ring per process). The in-process VMM never sets it.
static MIRROR: OnceLock<ConsoleRing> = OnceLock::new();

/// Makes `ring` the process's console mirror (worker side, once).
pub fn install_mirror(ring: ConsoleRing) {
    let _ = MIRROR.set(ring);
}

/// Tells the owner, through the mirror, that the VM has ended.
pub fn mark_ended() {
    if let Some(ring) = MIRROR.get() {
        ring.set_ended();
    }
}

/// Copies console output to the mirror, if there is one.
pub fn mirror(bytes: &[u8]) {
    if let Some(ring) = MIRROR.get() {
        ring.push(bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_bytes_across_processes_views() {
        let (writer, file) = ConsoleRing::create(8).unwrap();
        let reader = ConsoleRing::map(&file).unwrap();
        assert_eq!(reader.contents(), b"");
        writer.push(b"hello");
        assert_eq!(reader.contents(), b"hello");
        writer.push(b" world");
        assert_eq!(reader.contents(), b"lo world");
        writer.push(b"0123456789abc");
        assert_eq!(reader.contents(), b"56789abc");
        assert_eq!(reader.written(), 19);
    }

    #[test]
    fn the_end_of_the_vm_is_seen_through_the_ring() {
        let (writer, file) = ConsoleRing::create(16).unwrap();
        let reader = ConsoleRing::map(&file).unwrap();
        assert!(!reader.ended());
        writer.push(b"bye");
        writer.set_ended();
        assert!(reader.ended());
        assert_eq!(reader.contents(), b"bye");
    }

    #[test]
    fn a_hostile_header_cannot_make_the_reader_read_out_of_bounds() {
        let (writer, file) = ConsoleRing::create(16).unwrap();
        writer.total().store(u64::MAX, Ordering::Release);
        assert_eq!(ConsoleRing::map(&file).unwrap().contents().len(), 16);
    }
}
