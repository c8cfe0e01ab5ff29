//! The `write_file` and `read_file` requests.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::conn::{Conn, End};
use crate::proto::{self, kind, Encoder, Frame, BYTES, CHUNK, HEADER, UINT};
use crate::sys;

pub const PATH: u8 = 1;
pub const MODE: u8 = 2;
pub const UID: u8 = 3;
pub const GID: u8 = 4;
pub const END_SIZE: u8 = 1;

pub const WRITE_SCHEMA: &[(u8, u8)] = &[(PATH, BYTES), (MODE, UINT), (UID, UINT), (GID, UINT)];
pub const READ_SCHEMA: &[(u8, u8)] = &[(PATH, BYTES)];

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn shown(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

pub fn os_error(conn: &Conn, op: &str, path: &[u8], e: &io::Error) -> Result<(), End> {
    conn.reply_error(
        "os",
        e.raw_os_error(),
        &format!("{op} {}: {}", shown(path), sys::errno_text(e)),
    )
}

pub fn check_path(path: &[u8]) -> Result<(), String> {
    if path.first() != Some(&b'/') {
        return Err(format!("path {:?} is not absolute", shown(path)));
    }
    if path.contains(&0) {
        return Err("path contains a NUL byte".into());
    }
    Ok(())
}

/// A temporary file next to the target, renamed over it when complete.
struct Temp {
    path: std::ffi::CString,
    file: Option<OwnedFd>,
}

impl Temp {
    fn create(target: &[u8]) -> io::Result<Temp> {
        let slash = target.iter().rposition(|&b| b == b'/').unwrap_or(0);
        let (dir, base) = (&target[..slash], &target[slash + 1..]);
        if base.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let mut name = dir.to_vec();
        name.extend_from_slice(b"/.");
        name.extend_from_slice(&base[..base.len().min(200)]);
        name.extend_from_slice(format!(".sm-tmp.{}.{n}", std::process::id()).as_bytes());
        let path =
            std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let file = sys::open(&path, flags, 0o600)?;
        Ok(Temp {
            path,
            file: Some(file),
        })
    }

    fn finish(
        &mut self,
        target: &[u8],
        mode: u32,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> io::Result<()> {
        let file = self.file.take().expect("open temp file");
        let fd = file.as_raw_fd();
        if uid.is_some() || gid.is_some() {
            let (u, g) = (uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX));
            // SAFETY: fchown takes only integers; `fd` belongs to `file`, which stays open until
            // the `drop(file)` below.
            sys::cvt(unsafe { libc::fchown(fd, u, g) })?;
        }
        // After chown, which may clear set-id bits; explicit, so the umask does not apply.
        // SAFETY: fchmod takes only integers; `fd` still belongs to the open `file`.
        sys::cvt(unsafe { libc::fchmod(fd, mode & 0o7777) })?;
        drop(file);
        let target = std::ffi::CString::new(target)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: both arguments are NUL-terminated CStrings that outlive the call.
        sys::cvt(unsafe { libc::rename(self.path.as_ptr(), target.as_ptr()) })?;
        self.path = std::ffi::CString::default();
        Ok(())
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.path.as_bytes().is_empty() {
            // SAFETY: `self.path` is a NUL-terminated CString that outlives the call.
            unsafe { libc::unlink(self.path.as_ptr()) };
        }
    }
}

pub fn write(conn: &mut Conn, frame: &Frame) -> Result<(), End> {
    let fields = Conn::decode(frame, WRITE_SCHEMA)?;
    let path = fields.bytes(PATH).unwrap_or(b"").to_vec();
    let mode = fields.uint(MODE).unwrap_or(0o644) as u32;
    let id = |tag| fields.uint(tag).map(|v| v as u32);
    let (uid, gid) = (id(UID), id(GID));
    drop(fields);

    // Either a request error, or the open temp file. Data frames are consumed in both cases, so the
    // reply always follows the client's file_end.
    let mut problem: Option<(Option<i32>, String)> = None;
    let mut temp = None;
    match check_path(&path) {
        Err(message) => problem = Some((None, message)),
        Ok(()) => match Temp::create(&path) {
            Ok(t) => temp = Some(t),
            Err(e) => {
                problem = Some((
                    e.raw_os_error(),
                    format!("write_file {}: {}", shown(&path), sys::errno_text(&e)),
                ))
            }
        },
    }
    let mut size: u64 = 0;
    loop {
        let frame = conn.reader.read_frame().map_err(End::from)?;
        match frame.kind {
            kind::FILE_DATA => {
                if let Some(t) = &temp {
                    let fd = t.file.as_ref().expect("open").as_raw_fd();
                    if let Err(e) = sys::write_all(fd, &frame.payload) {
                        let message =
                            format!("write_file {}: {}", shown(&path), sys::errno_text(&e));
                        problem = Some((e.raw_os_error(), message));
                        temp = None;
                    }
                }
                size += frame.payload.len() as u64;
            }
            kind::FILE_END => break,
            kind::STDIN | kind::STDIN_CLOSE | kind::SIGNAL | kind::RESIZE => {}
            other => {
                return Err(End::Fatal(format!(
                    "unexpected {} frame inside write_file",
                    kind::name(other)
                )));
            }
        }
    }
    if let Some(mut t) = temp {
        if let Err(e) = t.finish(&path, mode, uid, gid) {
            return os_error(conn, "write_file", &path, &e);
        }
    }
    match problem {
        Some((errno, message)) => conn.reply_error(
            if errno.is_some() { "os" } else { "request" },
            errno,
            &message,
        ),
        None => {
            proto::send(
                conn.fd(),
                kind::OK,
                &Encoder::new().uint(END_SIZE, size).finish(),
            )?;
            Ok(())
        }
    }
}

pub fn read(conn: &mut Conn, frame: &Frame) -> Result<(), End> {
    let fields = Conn::decode(frame, READ_SCHEMA)?;
    let path = fields.bytes(PATH).unwrap_or(b"").to_vec();
    drop(fields);
    if let Err(message) = check_path(&path) {
        return conn.reply_error("request", None, &message);
    }
    let cpath = std::ffi::CString::new(path.clone()).expect("checked");
    let file = match sys::open(&cpath, libc::O_RDONLY, 0) {
        Ok(f) => f,
        Err(e) => return os_error(conn, "read_file", &path, &e),
    };
    let mut chunk = std::mem::take(&mut conn.buf);
    let mut size: u64 = 0;
    let result = loop {
        chunk.clear();
        chunk.reserve(HEADER + CHUNK);
        chunk.extend_from_slice(&[0u8; HEADER]);
        // SAFETY: after `clear`, `reserve(HEADER + CHUNK)` and the HEADER-byte extend, the vector
        // has length HEADER and at least CHUNK bytes of spare capacity from `as_mut_ptr() + HEADER`,
        // so the kernel may write up to CHUNK bytes there.
        let ret = unsafe {
            libc::read(
                file.as_raw_fd(),
                chunk.as_mut_ptr().add(HEADER).cast(),
                CHUNK,
            )
        };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break Err(e);
        }
        if ret == 0 {
            break Ok(());
        }
        // SAFETY: 0 < ret <= CHUNK, so `HEADER + ret` is within the capacity reserved above, and
        // read initialised exactly those `ret` bytes after the header.
        unsafe { chunk.set_len(HEADER + ret as usize) };
        size += ret as u64;
        if proto::send_prefixed(conn.fd(), kind::DATA, &mut chunk).is_err() {
            conn.buf = chunk;
            return Err(End::Closed);
        }
    };
    conn.buf = chunk;
    match result {
        Ok(()) => {
            proto::send(
                conn.fd(),
                kind::END,
                &Encoder::new().uint(END_SIZE, size).finish(),
            )?;
            Ok(())
        }
        Err(e) => os_error(conn, "read_file", &path, &e),
    }
}

pub const STAT_SCHEMA: &[(u8, u8)] = &[(PATH, BYTES), (STAT_FOLLOW, proto::UINT)];
/// `stat` request field: follow a final symbolic link (as `stat`, not `lstat`).
pub const STAT_FOLLOW: u8 = 2;
/// `stat` reply fields.
pub const STAT_TYPE: u8 = 1;
pub const STAT_MODE: u8 = 2;
pub const STAT_UID: u8 = 3;
pub const STAT_GID: u8 = 4;
pub const STAT_SIZE: u8 = 5;
pub const STAT_MTIME_NS: u8 = 6;
pub const STAT_LINK: u8 = 7;

/// The `stat` reply fields of `st`, but a link's target (`list_dir` entries carry the same).
pub fn stat_fields(enc: Encoder, st: &libc::stat) -> Encoder {
    let mtime_ns = (st.st_mtime.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(st.st_mtime_nsec.clamp(0, 999_999_999) as u64);
    enc.uint(STAT_TYPE, type_code(st.st_mode))
        .uint(STAT_MODE, u64::from(st.st_mode & 0o7777))
        .uint(STAT_UID, u64::from(st.st_uid))
        .uint(STAT_GID, u64::from(st.st_gid))
        .uint(STAT_SIZE, st.st_size.max(0) as u64)
        .uint(STAT_MTIME_NS, mtime_ns)
}

/// File types in `stat` replies (the same numbers as `changes` entries; 8 is a socket).
fn type_code(mode: libc::mode_t) -> u64 {
    match mode & libc::S_IFMT {
        libc::S_IFREG => 0,
        libc::S_IFDIR => 1,
        libc::S_IFLNK => 2,
        libc::S_IFCHR => 5,
        libc::S_IFBLK => 6,
        libc::S_IFIFO => 7,
        _ => 8,
    }
}

pub fn stat(conn: &mut Conn, frame: &Frame) -> Result<(), End> {
    let fields = Conn::decode(frame, STAT_SCHEMA)?;
    let path = fields.bytes(PATH).unwrap_or(b"").to_vec();
    let follow = fields.uint(STAT_FOLLOW).unwrap_or(0) != 0;
    drop(fields);
    if let Err(message) = check_path(&path) {
        return conn.reply_error("request", None, &message);
    }
    let cpath = std::ffi::CString::new(path.clone()).expect("checked");
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `cpath` is NUL-terminated and borrowed for the call; stat/lstat write one `stat`
    // into the live `st`.
    let ret = unsafe {
        if follow {
            libc::stat(cpath.as_ptr(), st.as_mut_ptr())
        } else {
            libc::lstat(cpath.as_ptr(), st.as_mut_ptr())
        }
    };
    if let Err(e) = sys::cvt(ret) {
        return os_error(conn, "stat", &path, &e);
    }
    // SAFETY: the call succeeded, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    let mut reply = stat_fields(Encoder::new(), &st);
    if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
        match std::fs::read_link(std::ffi::OsStr::from_bytes(&path)) {
            Ok(target) => reply = reply.bytes(STAT_LINK, target.as_os_str().as_bytes()),
            Err(e) => return os_error(conn, "readlink", &path, &e),
        }
    }
    proto::send(conn.fd(), kind::OK, &reply.finish())?;
    Ok(())
}

pub const REMOVE_RECURSIVE: u8 = 2;
pub const REMOVE_SCHEMA: &[(u8, u8)] = &[(PATH, BYTES), (REMOVE_RECURSIVE, proto::UINT)];

/// The `remove` request: a file, symbolic link or empty directory, or with `recursive` a whole
/// tree (symbolic links inside are removed, never followed).
pub fn remove(conn: &mut Conn, frame: &Frame) -> Result<(), End> {
    let fields = Conn::decode(frame, REMOVE_SCHEMA)?;
    let path = fields.bytes(PATH).unwrap_or(b"").to_vec();
    let recursive = fields.uint(REMOVE_RECURSIVE).unwrap_or(0) != 0;
    drop(fields);
    if let Err(message) = check_path(&path) {
        return conn.reply_error("request", None, &message);
    }
    if path == b"/" {
        return conn.reply_error("request", None, "refusing to remove /");
    }
    let target = std::path::Path::new(std::ffi::OsStr::from_bytes(&path));
    let result = match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() && recursive => std::fs::remove_dir_all(target),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir(target),
        Ok(_) => std::fs::remove_file(target),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => {
            proto::send(conn.fd(), kind::OK, &[])?;
            Ok(())
        }
        Err(e) => os_error(conn, "remove", &path, &e),
    }
}
