//! Thin wrappers over the system calls the agent uses, returning `io::Result`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Turns a `-1` return into the current `errno`.
pub fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// The errno text without Rust's " (os error N)" suffix.
pub fn errno_text(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

pub fn cstring(bytes: &[u8], what: &str) -> Result<CString, String> {
    CString::new(bytes).map_err(|_| format!("{what} contains a NUL byte"))
}

/// Reads into the spare capacity of `buf` (never zero-fills it: untouched pages stay unfaulted).
pub fn read_spare(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<usize> {
    let len = buf.len();
    let spare = buf.capacity() - len;
    loop {
        // SAFETY: `buf.as_mut_ptr().add(len)` stays inside (or one past the end of) `buf`'s
        // allocation, and the `spare` bytes from there are allocated and unused, so the kernel may
        // write up to `spare` bytes into them. `buf` is exclusively borrowed for the call.
        let ret = unsafe { libc::read(fd, buf.as_mut_ptr().add(len).cast(), spare) };
        match cvt_size(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(n) => {
                // SAFETY: read returned n <= spare, so `len + n` is within the capacity and the
                // kernel has initialised the n bytes after the old length.
                unsafe { buf.set_len(len + n) };
                return Ok(n);
            }
        }
    }
}

pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`, a live borrowed slice.
        let ret = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        match cvt_size(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

pub fn write_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = write(fd, buf)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// Writes two buffers with as few system calls as possible (one, normally).
pub fn write_all2(fd: RawFd, mut first: &[u8], mut second: &[u8]) -> io::Result<()> {
    while !first.is_empty() {
        let iov = [
            libc::iovec {
                iov_base: first.as_ptr() as *mut _,
                iov_len: first.len(),
            },
            libc::iovec {
                iov_base: second.as_ptr() as *mut _,
                iov_len: second.len(),
            },
        ];
        // SAFETY: `iov` holds exactly 2 entries, each describing a live borrowed slice by its own
        // pointer and length; writev only reads them (the `*mut` casts are for the C type).
        let ret = unsafe { libc::writev(fd, iov.as_ptr(), 2) };
        let n = match cvt_size(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
        };
        if n >= first.len() {
            second = &second[n - first.len()..];
            first = &[];
        } else {
            first = &first[n..];
        }
    }
    write_all(fd, second)
}

/// A pipe with both ends close-on-exec: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two ints into `fds`, which has room for exactly two.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both are new open descriptors that nothing else owns; each is
    // wrapped once and closed by its OwnedFd.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A new pseudo-terminal: its master and the peer (slave) end, neither one our controlling
/// terminal, both close-on-exec (the child gets the peer through dup2).
pub fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    let flags = libc::O_RDWR | libc::O_NOCTTY;
    let master = open(&CString::from(c"/dev/ptmx"), flags, 0)
        .or_else(|_| open(&CString::from(c"/dev/pts/ptmx"), flags, 0))?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the live `unlock`; `master` stays open for the call.
    cvt(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })?;
    // SAFETY: TIOCGPTPEER takes open flags as an integer and returns a new descriptor.
    let peer = cvt(unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: the ioctl succeeded, so `peer` is a new open descriptor nothing else owns.
    Ok((master, unsafe { OwnedFd::from_raw_fd(peer) }))
}

/// Sets a terminal's window size (the kernel tells its foreground process group with SIGWINCH).
pub fn set_window_size(fd: &OwnedFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the live `size`; `fd` stays open for the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) }).map(|_| ())
}

pub fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // Our pipe ends carry no other status flags, so one F_SETFL suffices.
    // SAFETY: fcntl(F_SETFL) takes an integer argument and touches no memory of ours; `fd` is
    // borrowed, so the descriptor stays open for the call.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) }).map(|_| ())
}

pub fn open(path: &CString, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: `path` is a NUL-terminated CString borrowed for the call; the mode is passed as
        // the `unsigned int` the variadic open expects.
        let ret =
            unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
        match cvt(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            // SAFETY: open succeeded, so `fd` is a new open descriptor that nothing else owns.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        }
    }
}

pub fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: poll reads and writes back exactly `fds.len()` pollfd entries of the exclusively
        // borrowed slice.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        match cvt(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(n) => return Ok(n as usize),
        }
    }
}

/// Sends `sig` to the process group led by `pgid` (and to `pgid` itself, should it have left it).
pub fn kill_group(pgid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill takes only integers and has no memory-safety preconditions.
    unsafe {
        if libc::kill(-pgid, sig) != 0 {
            libc::kill(pgid, sig);
        }
    }
}

/// Sends `sig` to the process group `pgid` only. Unlike `kill_group` it may be used once the leader
/// has been reaped: the group's id stays allocated while any member lives, and an empty group's id
/// could only name another group after the kernel had cycled through every pid since the reap.
pub fn kill_group_only(pgid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill takes only integers and has no memory-safety preconditions.
    unsafe { libc::kill(-pgid, sig) };
}

/// Sets (`Some`) or clears (`None`) the socket's receive timeout (SO_RCVTIMEO): a blocking read
/// that waits longer fails with EAGAIN. A `Some` timeout is at least 1 µs, since 0 means none.
pub fn set_recv_timeout(fd: RawFd, timeout: Option<Duration>) -> io::Result<()> {
    let tv = match timeout {
        None => libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        Some(t) => {
            let t = t.max(Duration::from_micros(1));
            libc::timeval {
                tv_sec: t.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
                tv_usec: t.subsec_micros() as libc::suseconds_t,
            }
        }
    };
    // SAFETY: the option value is `tv`, a live timeval, and the length passed is exactly its size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}
