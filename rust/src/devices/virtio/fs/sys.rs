//! The host system calls the file server makes, each a thin wrapper that takes descriptors and
//! C strings and returns the `errno` of a failure (what the guest gets back).
//!
//! Paths are always one checked name relative to a directory descriptor, or empty with
//! `AT_EMPTY_PATH` on the descriptor itself: nothing here resolves a path of several components
//! or follows a symbolic link (see [`open_beneath`]).

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// An `errno` value to answer the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub fn last() -> Errno {
        Errno(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }
}

pub type SysResult<T> = Result<T, Errno>;

fn check(rc: libc::c_int) -> SysResult<libc::c_int> {
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(rc)
    }
}

fn check_size(rc: isize) -> SysResult<usize> {
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(rc as usize)
    }
}

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// How every open resolves: beneath the directory it is relative to, through no symbolic link
/// at all (the guest's own symlinks are resolved by the guest, one name at a time), no magic
/// link and no mount point.
const RESOLVE: u64 = libc::RESOLVE_BENEATH
    | libc::RESOLVE_NO_MAGICLINKS
    | libc::RESOLVE_NO_SYMLINKS
    | libc::RESOLVE_NO_XDEV;

/// Opens `name` (one checked component, or `.`) beneath `dir` with openat2(2) and
/// [`RESOLVE`]; `O_NOFOLLOW` and `O_CLOEXEC` are always added, and `O_NOCTTY` unless
/// `O_PATH` (openat2 refuses other flags with it). A symbolic link named by `name` itself is
/// opened as the link with `O_PATH`, and refused (`ELOOP`) otherwise.
pub fn open_beneath(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> SysResult<OwnedFd> {
    let noctty = if flags & libc::O_PATH == 0 {
        libc::O_NOCTTY
    } else {
        0
    };
    let how = OpenHow {
        flags: (flags | libc::O_NOFOLLOW | noctty | libc::O_CLOEXEC) as u32 as u64,
        mode: if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
            u64::from(mode)
        } else {
            0
        },
        resolve: RESOLVE,
    };
    // SAFETY: `how` is a valid open_how of the size passed, `name` is NUL-terminated; both
    // outlive the call, which only reads them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The attributes of `name` in `dir` (or of `dir` itself when `name` is empty), never
/// following a symbolic link.
pub fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> SysResult<libc::stat64> {
    // SAFETY: a zeroed stat64 is a valid value to be overwritten.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    let flags = libc::AT_SYMLINK_NOFOLLOW
        | if name.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    // SAFETY: `st` is a valid out-buffer and `name` NUL-terminated, both live for the call.
    check(unsafe { libc::fstatat64(dir.as_raw_fd(), name.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

pub fn stat(fd: BorrowedFd<'_>) -> SysResult<libc::stat64> {
    stat_at(fd, c"")
}

pub fn statfs(fd: BorrowedFd<'_>) -> SysResult<libc::statvfs64> {
    // SAFETY: a zeroed statvfs64 is a valid value to be overwritten.
    let mut st: libc::statvfs64 = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-buffer for the call.
    check(unsafe { libc::fstatvfs64(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

pub fn mkdir_at(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> SysResult<()> {
    // SAFETY: `name` is NUL-terminated and lives for the call.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub fn symlink_at(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> SysResult<()> {
    // SAFETY: both strings are NUL-terminated and live for the call.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// The target of the symbolic link `fd` (an `O_PATH` descriptor of the link), at most
/// `max` bytes.
pub fn read_link(fd: BorrowedFd<'_>, max: usize) -> SysResult<Vec<u8>> {
    let mut buf = vec![0u8; max];
    // SAFETY: the buffer is `max` bytes long and outlives the call; the empty path names `fd`.
    let n = check_size(unsafe {
        libc::readlinkat(fd.as_raw_fd(), c"".as_ptr(), buf.as_mut_ptr().cast(), max)
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// Hard-links `old_name` in `old_dir` as `new_name` in `new_dir` (the link itself, never what
/// a symbolic link points to).
pub fn link_at(
    old_dir: BorrowedFd<'_>,
    old_name: &CStr,
    new_dir: BorrowedFd<'_>,
    new_name: &CStr,
) -> SysResult<()> {
    // SAFETY: both names are NUL-terminated and live for the call; flags 0 do not follow.
    check(unsafe {
        libc::linkat(
            old_dir.as_raw_fd(),
            old_name.as_ptr(),
            new_dir.as_raw_fd(),
            new_name.as_ptr(),
            0,
        )
    })
    .map(drop)
}

pub fn unlink_at(dir: BorrowedFd<'_>, name: &CStr, dir_flag: bool) -> SysResult<()> {
    let flags = if dir_flag { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: `name` is NUL-terminated and lives for the call.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub fn rename_at(
    old_dir: BorrowedFd<'_>,
    old_name: &CStr,
    new_dir: BorrowedFd<'_>,
    new_name: &CStr,
) -> SysResult<()> {
    // The system call itself: glibc turns renameat2 with no flags into renameat, which the
    // file server's seccomp list does not have.
    // SAFETY: both names are NUL-terminated and live for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            old_dir.as_raw_fd(),
            old_name.as_ptr(),
            new_dir.as_raw_fd(),
            new_name.as_ptr(),
            0u32,
        )
    };
    check(rc as libc::c_int).map(drop)
}

/// Changes the owner of the object `fd` refers to (an `O_PATH` descriptor is enough); `None`
/// leaves an id as it is.
pub fn chown(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> SysResult<()> {
    let uid = uid.unwrap_or(u32::MAX);
    let gid = gid.unwrap_or(u32::MAX);
    // SAFETY: the empty path with AT_EMPTY_PATH names `fd`; AT_SYMLINK_NOFOLLOW keeps a link
    // itself as the object.
    check(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// Changes the mode of the object an `O_PATH` descriptor refers to, never a link's target
/// (fchmodat2(2), Linux 6.6 and later: `ENOSYS` before).
pub fn chmod_path(fd: BorrowedFd<'_>, mode: u32) -> SysResult<()> {
    // SAFETY: the empty path with AT_EMPTY_PATH names `fd`; integer arguments otherwise.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            fd.as_raw_fd(),
            c"".as_ptr(),
            mode,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(rc as libc::c_int).map(drop)
}

pub fn chmod(fd: BorrowedFd<'_>, mode: u32) -> SysResult<()> {
    // SAFETY: plain integer arguments.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

pub fn truncate(fd: BorrowedFd<'_>, size: u64) -> SysResult<()> {
    let size = i64::try_from(size).map_err(|_| Errno(libc::EFBIG))?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::ftruncate64(fd.as_raw_fd(), size) }).map(drop)
}

/// Sets the access and modification times of `name` in `dir` (the name itself, not what a
/// symbolic link points to).
pub fn set_times(dir: BorrowedFd<'_>, name: &CStr, times: &[libc::timespec; 2]) -> SysResult<()> {
    let flags = libc::AT_SYMLINK_NOFOLLOW
        | if name.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    // SAFETY: `times` points to two timespecs and `name` is NUL-terminated; both live for
    // the call.
    check(unsafe { libc::utimensat(dir.as_raw_fd(), name.as_ptr(), times.as_ptr(), flags) })
        .map(drop)
}

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> SysResult<usize> {
    let offset = i64::try_from(offset).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: the buffer is valid for `buf.len()` bytes for the call.
    check_size(unsafe { libc::pread64(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset) })
}

pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> SysResult<usize> {
    let offset = i64::try_from(offset).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: the buffer is valid for `buf.len()` bytes for the call.
    check_size(unsafe { libc::pwrite64(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset) })
}

pub fn fsync(fd: BorrowedFd<'_>, data_only: bool) -> SysResult<()> {
    // SAFETY: plain integer arguments.
    check(unsafe {
        if data_only {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })
    .map(drop)
}

/// Positions a directory stream at `offset` (a `d_off` it returned, or 0).
pub fn seek_dir(fd: BorrowedFd<'_>, offset: u64) -> SysResult<()> {
    let offset = i64::try_from(offset).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: plain integer arguments.
    if unsafe { libc::lseek64(fd.as_raw_fd(), offset, libc::SEEK_SET) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Reads raw `linux_dirent64` records into `buf`.
pub fn getdents(fd: BorrowedFd<'_>, buf: &mut [u8]) -> SysResult<usize> {
    // SAFETY: the buffer is valid for `buf.len()` bytes; the kernel writes at most that.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    check_size(n as isize)
}

/// Clears `O_NONBLOCK` (opens add it so that a FIFO swapped in cannot block the server).
pub fn set_blocking(fd: BorrowedFd<'_>) -> SysResult<()> {
    // SAFETY: plain integer arguments.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) })
        .map(drop)
}
