//! The FUSE wire format (`include/uapi/linux/fuse.h`, protocol 7.31) as the guest's virtio-fs
//! driver speaks it: bounded little-endian parsing of requests, and replies built as bytes.
//!
//! Nothing here trusts a length from the guest: every read is checked against the bytes the
//! request really has, names are bounded, and a short or inconsistent request is an error
//! (`EINVAL`) for the server to answer, never a panic.

use std::ffi::{CStr, CString};

use super::sys::Errno;

pub const FUSE_KERNEL_VERSION: u32 = 7;
/// The minor version we speak (the guest may speak an older or newer one; we answer with the
/// lower of the two).
pub const FUSE_KERNEL_MINOR_VERSION: u32 = 31;
/// The node id of the shared directory itself.
pub const FUSE_ROOT_ID: u64 = 1;

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;
/// `fuse_attr`.
pub const ATTR_LEN: usize = 88;
/// `fuse_entry_out`.
pub const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
/// `fuse_attr_out`.
pub const ATTR_OUT_LEN: usize = 16 + ATTR_LEN;
/// `fuse_open_out`.
pub const OPEN_OUT_LEN: usize = 16;
/// `fuse_init_out` for minor versions 23 and later, and before (FUSE_COMPAT_22_INIT_OUT_SIZE).
pub const INIT_OUT_LEN: usize = 64;
pub const INIT_OUT_COMPAT_LEN: usize = 24;
/// `fuse_kstatfs` inside `fuse_statfs_out`.
pub const STATFS_OUT_LEN: usize = 80;
/// The fixed part of `fuse_dirent` (the name follows, padded to 8 bytes).
pub const DIRENT_LEN: usize = 24;

/// Operation codes.
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const RENAME2: u32 = 45;
}

/// `fuse_setattr_in.valid` bits.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
}

/// `fuse_init_in/out.flags` bits we offer.
pub mod init_flags {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const ATOMIC_O_TRUNC: u32 = 1 << 3;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const MAX_PAGES: u32 = 1 << 22;
}

/// `fuse_in_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl InHeader {
    /// The header of `bytes`, or `None` when fewer than [`IN_HEADER_LEN`] bytes came.
    pub fn parse(bytes: &[u8]) -> Option<InHeader> {
        let mut r = Reader::new(bytes.get(..IN_HEADER_LEN)?);
        Some(InHeader {
            len: r.u32().ok()?,
            opcode: r.u32().ok()?,
            unique: r.u64().ok()?,
            nodeid: r.u64().ok()?,
            uid: r.u32().ok()?,
            gid: r.u32().ok()?,
            pid: r.u32().ok()?,
        })
    }
}

/// A cursor over a request's body; every read is bounded by what is left.
pub struct Reader<'a> {
    bytes: &'a [u8],
}

fn einval() -> Errno {
    Errno(libc::EINVAL)
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    pub fn remaining(&self) -> &'a [u8] {
        self.bytes
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Errno> {
        if n > self.bytes.len() {
            return Err(einval());
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    pub fn u32(&mut self) -> Result<u32, Errno> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, Errno> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    pub fn skip(&mut self, n: usize) -> Result<(), Errno> {
        self.bytes(n).map(drop)
    }

    /// A NUL-terminated string of at most `max` bytes (without the NUL).
    pub fn cstr(&mut self, max: usize) -> Result<&'a CStr, Errno> {
        let end = self
            .bytes
            .iter()
            .take(max + 1)
            .position(|&b| b == 0)
            .ok_or_else(|| {
                if self.bytes.len() > max {
                    Errno(libc::ENAMETOOLONG)
                } else {
                    einval()
                }
            })?;
        let s = CStr::from_bytes_with_nul(&self.bytes[..=end]).map_err(|_| einval())?;
        self.bytes = &self.bytes[end + 1..];
        Ok(s)
    }
}

/// Longest name of one directory entry.
pub const NAME_MAX: usize = 255;
/// Longest symbolic link target.
pub const PATH_MAX: usize = 4095;

/// A name from the guest that is safe to use as one path component beneath a directory: not
/// empty, not `.` or `..`, no `/`, at most [`NAME_MAX`] bytes (the NUL ends it, so none inside).
pub fn check_name(name: &CStr) -> Result<&CStr, Errno> {
    let b = name.to_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(einval());
    }
    if b.len() > NAME_MAX {
        return Err(Errno(libc::ENAMETOOLONG));
    }
    Ok(name)
}

/// Reads one name and checks it ([`check_name`]).
pub fn name<'a>(r: &mut Reader<'a>) -> Result<&'a CStr, Errno> {
    check_name(r.cstr(NAME_MAX)?)
}

/// An owned copy of a checked name.
pub fn owned(name: &CStr) -> CString {
    name.to_owned()
}

/// Builds a reply: the out header (its length filled in by [`Writer::finish`]) and the body.
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new(unique: u64, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(OUT_HEADER_LEN + capacity);
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(&0i32.to_le_bytes());
        buf.extend_from_slice(&unique.to_le_bytes());
        Writer { buf }
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.buf.resize(self.buf.len() + n, 0);
        self
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.len() == OUT_HEADER_LEN
    }

    /// The reply's bytes with its length set.
    pub fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_le_bytes());
        self.buf
    }
}

/// An error reply to request `unique`: the out header alone, with `-errno`.
pub fn error_reply(unique: u64, errno: Errno) -> Vec<u8> {
    let mut out = Vec::with_capacity(OUT_HEADER_LEN);
    out.extend_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
    out.extend_from_slice(&(-errno.0).to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
    out
}

/// Appends `fuse_attr` for `st`. Set-user-ID and set-group-ID bits are not shown: the guest
/// must not honour them on files of the share (and device nodes are refused on open).
pub fn put_attr(w: &mut Writer, st: &libc::stat64) {
    let mode = st.st_mode & !(libc::S_ISUID | libc::S_ISGID);
    w.u64(st.st_ino)
        .u64(st.st_size as u64)
        .u64(st.st_blocks as u64)
        .u64(st.st_atime as u64)
        .u64(st.st_mtime as u64)
        .u64(st.st_ctime as u64)
        .u32(st.st_atime_nsec as u32)
        .u32(st.st_mtime_nsec as u32)
        .u32(st.st_ctime_nsec as u32)
        .u32(mode)
        .u32(st.st_nlink as u32)
        .u32(st.st_uid)
        .u32(st.st_gid)
        .u32(st.st_rdev as u32)
        .u32(st.st_blksize as u32)
        .u32(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_a_directory_are_refused() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"/etc", b"../x"] {
            let c = CString::new(bad).unwrap();
            assert!(check_name(&c).is_err(), "{bad:?}");
        }
        let long = CString::new(vec![b'a'; NAME_MAX + 1]).unwrap();
        assert_eq!(check_name(&long), Err(Errno(libc::ENAMETOOLONG)));
        for good in [&b"a"[..], b"...", b".hidden", b"a b"] {
            let c = CString::new(good).unwrap();
            assert!(check_name(&c).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn reads_past_the_end_and_unterminated_strings_are_errors() {
        let mut r = Reader::new(&[1, 0, 0]);
        assert_eq!(r.u32(), Err(Errno(libc::EINVAL)));
        let mut r = Reader::new(b"abc");
        assert_eq!(r.cstr(10), Err(Errno(libc::EINVAL)));
        let mut r = Reader::new(b"abcdef\0");
        assert_eq!(r.cstr(3), Err(Errno(libc::ENAMETOOLONG)));
        let mut r = Reader::new(b"ab\0cd\0");
        assert_eq!(r.cstr(3).unwrap().to_bytes(), b"ab");
        assert_eq!(r.cstr(3).unwrap().to_bytes(), b"cd");
        assert!(InHeader::parse(&[0u8; 39]).is_none());
    }

    #[test]
    fn error_replies_carry_the_negated_errno() {
        let r = error_reply(7, Errno(libc::EROFS));
        assert_eq!(r.len(), OUT_HEADER_LEN);
        assert_eq!(
            i32::from_le_bytes(r[4..8].try_into().unwrap()),
            -libc::EROFS
        );
        assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), 7);
    }
}
