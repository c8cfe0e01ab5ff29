//! The `put_archive` request: unpack a tar stream from the client into a directory.
//!
//! A build applies the layers it makes on the host (COPY, ADD, WORKDIR) to its running VM this way,
//! so the VM's file system stays the image's without a reboot. Modes, owners, times and extended
//! attributes are kept; entries may not leave the directory (`..` components are refused).

use std::io::{self, Read};

use crate::conn::{Conn, End};
use crate::files::check_path;
use crate::proto::{self, kind, Encoder, Frame, BYTES};

pub const PATH: u8 = 1;
pub const SCHEMA: &[(u8, u8)] = &[(PATH, BYTES)];
/// `ok` fields: tar bytes received, entries unpacked.
pub const OK_SIZE: u8 = 1;
pub const OK_ENTRIES: u8 = 2;

/// The client's `file_data` frames as one byte stream, ending at its `file_end`.
struct Frames<'a> {
    conn: &'a mut Conn,
    chunk: Vec<u8>,
    at: usize,
    ended: bool,
    size: u64,
    /// A protocol violation seen while reading: the connection must end with it.
    violation: Option<End>,
}

impl Frames<'_> {
    /// Reads and drops whatever the client still sends up to its `file_end`, so the reply follows it.
    fn drain(&mut self) {
        let mut sink = [0u8; 64 * 1024];
        while matches!(self.read(&mut sink), Ok(n) if n > 0) {}
    }
}

impl Read for Frames<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.at < self.chunk.len() {
                let n = out.len().min(self.chunk.len() - self.at);
                out[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
                self.at += n;
                return Ok(n);
            }
            if self.ended || self.violation.is_some() {
                return Ok(0);
            }
            let frame = match self.conn.reader.read_frame() {
                Ok(frame) => frame,
                Err(e) => {
                    self.violation = Some(End::from(e));
                    return Err(io::Error::other("the connection ended inside put_archive"));
                }
            };
            match frame.kind {
                kind::FILE_DATA => {
                    self.size += frame.payload.len() as u64;
                    self.chunk = frame.payload;
                    self.at = 0;
                }
                kind::FILE_END => self.ended = true,
                kind::STDIN | kind::STDIN_CLOSE | kind::SIGNAL | kind::RESIZE => {}
                other => {
                    self.violation = Some(End::Fatal(format!(
                        "unexpected {} frame inside put_archive",
                        kind::name(other)
                    )));
                    return Err(io::Error::other("protocol violation"));
                }
            }
        }
    }
}

fn unpack(frames: &mut Frames<'_>, dir: &str) -> io::Result<u64> {
    let mut archive = tar::Archive::new(frames);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    let mut count = 0;
    for entry in archive.entries()? {
        let mut entry = entry?;
        if !entry.unpack_in(dir)? {
            let path = entry.path()?.display().to_string();
            return Err(io::Error::other(format!(
                "entry {path:?} leaves the directory"
            )));
        }
        count += 1;
    }
    Ok(count)
}

pub fn run(conn: &mut Conn, frame: &Frame) -> Result<(), End> {
    let fields = Conn::decode(frame, SCHEMA)?;
    let path = fields.bytes(PATH).unwrap_or(b"").to_vec();
    drop(fields);
    let checked = check_path(&path).and_then(|()| {
        String::from_utf8(path.clone()).map_err(|_| "path is not UTF-8".to_string())
    });
    let mut frames = Frames {
        conn,
        chunk: Vec::new(),
        at: 0,
        ended: false,
        size: 0,
        violation: None,
    };
    let result = match &checked {
        Err(message) => Err((None, message.clone())),
        Ok(dir) => match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => unpack(&mut frames, dir).map_err(|e| {
                (
                    e.raw_os_error(),
                    format!("put_archive {dir}: {}", crate::sys::errno_text(&e)),
                )
            }),
            Ok(_) => Err((
                Some(libc::ENOTDIR),
                format!("put_archive {dir}: not a directory"),
            )),
            Err(e) => Err((
                e.raw_os_error(),
                format!("put_archive {dir}: {}", crate::sys::errno_text(&e)),
            )),
        },
    };
    frames.drain();
    if let Some(end) = frames.violation.take() {
        return Err(end);
    }
    let size = frames.size;
    match result {
        Ok(entries) => {
            let reply = Encoder::new()
                .uint(OK_SIZE, size)
                .uint(OK_ENTRIES, entries)
                .finish();
            proto::send(conn.fd(), kind::OK, &reply)?;
            Ok(())
        }
        Err((errno, message)) => conn.reply_error(
            if errno.is_some() { "os" } else { "request" },
            errno,
            &message,
        ),
    }
}
