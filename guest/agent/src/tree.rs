//! The `list_dir` and `get_archive` requests: what a guest directory holds, and a tar stream of
//! a guest path (a file, or a directory with everything beneath it) for the client to unpack.
//!
//! Both read through `lstat`/`readlink` of each entry and never follow a symbolic link below the
//! requested path (the final component of the path itself is resolved as `ls` and `tar` do: a link
//! to a directory lists or archives the directory). The client bounds what it accepts; the agent
//! stops when the client closes the connection.

use std::ffi::{CString, OsStr};
use std::io::{self, Write};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::conn::{Conn, End};
use crate::files::{check_path, os_error, stat_fields, STAT_LINK};
use crate::proto::{self, kind, Encoder, Frame, BYTES, CHUNK};
use crate::sys;

pub const PATH: u8 = 1;
pub const SCHEMA: &[(u8, u8)] = &[(PATH, BYTES)];
/// `entry` field of `list_dir`: the entry's name (the other fields are `stat`'s).
pub const ENTRY_NAME: u8 = 8;
/// `end` fields: entries listed (`list_dir`), tar bytes sent (`get_archive`).
pub const END_COUNT: u8 = 1;
/// Directory levels `get_archive` descends below the requested path.
pub const MAX_DEPTH: usize = 256;

fn lstat(path: &Path) -> io::Result<libc::stat> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `cpath` is NUL-terminated and outlives the call; lstat writes one `stat` into `st`.
    sys::cvt(unsafe { libc::lstat(cpath.as_ptr(), st.as_mut_ptr()) })?;
    // SAFETY: lstat succeeded, so it initialised `st`.
    Ok(unsafe { st.assume_init() })
}

/// The names in a directory, sorted bytewise (so the same tree gives the same stream).
fn sorted_names(dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        names.push(entry?.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

fn request_path(conn: &mut Conn, frame: &Frame) -> Result<Option<Vec<u8>>, End> {
    let fields = Conn::decode(frame, SCHEMA)?;
    let path = fields.bytes(PATH).unwrap_or(b"").to_vec();
    drop(fields);
    match check_path(&path) {
        Ok(()) => Ok(Some(path)),
        Err(message) => {
            conn.reply_error("request", None, &message)?;
            Ok(None)
        }
    }
}

/// `list_dir`: an `entry` per name in the directory (sorted; `.` and `..` left out), then `end`.
pub fn list_dir(conn: &mut Conn, frame: &Frame) -> Result<(), End> {
    let Some(path) = request_path(conn, frame)? else {
        return Ok(());
    };
    let dir = Path::new(OsStr::from_bytes(&path));
    let names = match sorted_names(dir) {
        Ok(names) => names,
        Err(e) => return os_error(conn, "list_dir", &path, &e),
    };
    let mut count: u64 = 0;
    for name in names {
        let child = dir.join(&name);
        let st = match lstat(&child) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue, // gone meanwhile
            Err(e) => return os_error(conn, "list_dir", child.as_os_str().as_bytes(), &e),
        };
        let mut entry = stat_fields(Encoder::new(), &st).bytes(ENTRY_NAME, name.as_bytes());
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            if let Ok(target) = std::fs::read_link(&child) {
                entry = entry.bytes(STAT_LINK, target.as_os_str().as_bytes());
            }
        }
        proto::send(conn.fd(), kind::ENTRY, &entry.finish()).map_err(|_| End::Closed)?;
        count += 1;
    }
    let end = Encoder::new().uint(END_COUNT, count).finish();
    proto::send(conn.fd(), kind::END, &end)?;
    Ok(())
}

/// The tar stream as `data` frames of at most [`CHUNK`] bytes.
struct DataFrames {
    fd: RawFd,
    buf: Vec<u8>,
    sent: u64,
    /// The connection failed: the client went away.
    closed: bool,
}

impl DataFrames {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Err(e) = proto::send(self.fd, kind::DATA, &self.buf) {
            self.closed = true;
            return Err(e);
        }
        self.sent += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

impl Write for DataFrames {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// The name the archive gives the requested path: its last component (`.` for `/`).
fn top_name(path: &[u8]) -> PathBuf {
    let trimmed = path.strip_suffix(b"/").unwrap_or(path);
    let name = trimmed.rsplit(|&b| b == b'/').next().unwrap_or(b"");
    PathBuf::from(OsStr::from_bytes(if name.is_empty() { b"." } else { name }))
}

/// Appends `source` as `name`, and below a directory everything in it, depth first in name order.
/// Sockets are left out (a tar stream cannot hold one); links are stored, never followed.
fn append_tree(
    builder: &mut tar::Builder<&mut DataFrames>,
    source: &Path,
    name: &Path,
) -> io::Result<u64> {
    let mut count = 0;
    let mut todo = vec![(source.to_path_buf(), name.to_path_buf(), 0usize)];
    while let Some((source, name, depth)) = todo.pop() {
        let st = match lstat(&source) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && depth > 0 => continue,
            Err(e) => return Err(e),
        };
        let kind = st.st_mode & libc::S_IFMT;
        match kind {
            libc::S_IFSOCK => continue,
            // The tar crate names a device or FIFO by its source path: the header is made here.
            libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO => {
                append_special(builder, &source, &name, &st)?
            }
            _ => builder.append_path_with_name(&source, &name)?,
        }
        count += 1;
        if kind == libc::S_IFDIR {
            if depth >= MAX_DEPTH {
                return Err(io::Error::other(format!(
                    "{} is more than {MAX_DEPTH} levels deep",
                    source.display()
                )));
            }
            // Pushed in reverse, so popped in name order.
            for child in sorted_names(&source)?.into_iter().rev() {
                todo.push((source.join(&child), name.join(&child), depth + 1));
            }
        }
    }
    Ok(count)
}

/// A device node or FIFO as a header of its own (no data).
fn append_special(
    builder: &mut tar::Builder<&mut DataFrames>,
    source: &Path,
    name: &Path,
    st: &libc::stat,
) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(source)?;
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
    header.set_entry_type(match st.st_mode & libc::S_IFMT {
        libc::S_IFCHR => tar::EntryType::Char,
        libc::S_IFBLK => tar::EntryType::Block,
        _ => tar::EntryType::Fifo,
    });
    header.set_device_major(libc::major(st.st_rdev))?;
    header.set_device_minor(libc::minor(st.st_rdev))?;
    header.set_size(0);
    builder.append_data(&mut header, name, io::empty())
}

/// `get_archive`: `data` frames holding a tar stream of the path, then `end` with its size. An
/// error midway ends the reply with `error` (the client discards what it unpacked).
pub fn get_archive(conn: &mut Conn, frame: &Frame) -> Result<(), End> {
    let Some(path) = request_path(conn, frame)? else {
        return Ok(());
    };
    let mut source = PathBuf::from(OsStr::from_bytes(&path));
    // The requested path itself is resolved, as `tar -C` would: a link to a directory gives
    // the directory.
    if let Ok(resolved) = std::fs::canonicalize(&source) {
        source = resolved;
    }
    let mut sink = DataFrames {
        fd: conn.fd(),
        buf: Vec::with_capacity(CHUNK),
        sent: 0,
        closed: false,
    };
    let result = {
        let mut builder = tar::Builder::new(&mut sink);
        builder.follow_symlinks(false);
        builder.mode(tar::HeaderMode::Complete);
        let appended = append_tree(&mut builder, &source, &top_name(&path));
        appended.and_then(|_| builder.into_inner().map(|_| ()))
    };
    let result = result.and_then(|()| sink.flush());
    if sink.closed {
        return Err(End::Closed);
    }
    match result {
        Ok(()) => {
            let end = Encoder::new().uint(END_COUNT, sink.sent).finish();
            proto::send(conn.fd(), kind::END, &end)?;
            Ok(())
        }
        Err(e) => os_error(conn, "get_archive", &path, &e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_is_named_after_the_last_component() {
        assert_eq!(top_name(b"/srv/data"), PathBuf::from("data"));
        assert_eq!(top_name(b"/srv/data/"), PathBuf::from("data"));
        assert_eq!(top_name(b"/"), PathBuf::from("."));
        assert_eq!(top_name(b"/etc/passwd"), PathBuf::from("passwd"));
    }
}
