//! Wire format of the exec protocol (see PROTOCOL.md): hello, frames and field-encoded messages.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::sys;

pub const MAGIC: &[u8; 4] = b"SMAG";
pub const VERSION: u16 = 1;
pub const HELLO_LEN: usize = 8;
/// Largest accepted value of a frame's length field (type byte + payload).
pub const MAX_FRAME: usize = 1 << 20;
/// Largest data chunk the agent puts in one frame.
pub const CHUNK: usize = 64 * 1024;
/// Bytes before a frame's payload: u32 length + u8 type.
pub const HEADER: usize = 5;

/// Frame types. Client to agent below 0x80, agent to client from 0x80.
pub mod kind {
    pub const EXEC: u8 = 0x01;
    pub const STDIN: u8 = 0x02;
    pub const STDIN_CLOSE: u8 = 0x03;
    pub const SIGNAL: u8 = 0x04;
    pub const WRITE_FILE: u8 = 0x05;
    pub const FILE_DATA: u8 = 0x06;
    pub const FILE_END: u8 = 0x07;
    pub const READ_FILE: u8 = 0x08;
    pub const PING: u8 = 0x09;
    pub const SHUTDOWN: u8 = 0x0a;
    pub const SYNC: u8 = 0x0b;
    pub const NET: u8 = 0x0c;
    pub const TCP_CONNECT: u8 = 0x0d;
    pub const CHANGES: u8 = 0x0e;
    pub const PUT_ARCHIVE: u8 = 0x0f;
    pub const STAT: u8 = 0x10;
    pub const REMOVE: u8 = 0x11;
    pub const LIST_DIR: u8 = 0x12;
    pub const GET_ARCHIVE: u8 = 0x13;
    pub const RESIZE: u8 = 0x14;
    pub const MOUNT: u8 = 0x15;
    pub const UNMOUNT: u8 = 0x16;

    pub const STARTED: u8 = 0x81;
    pub const STDOUT: u8 = 0x82;
    pub const STDERR: u8 = 0x83;
    pub const EXIT: u8 = 0x84;
    pub const DATA: u8 = 0x85;
    pub const END: u8 = 0x86;
    pub const PONG: u8 = 0x87;
    pub const OK: u8 = 0x88;
    pub const ENTRY: u8 = 0x89;
    pub const ERROR: u8 = 0x8f;

    pub fn name(kind: u8) -> &'static str {
        match kind {
            EXEC => "exec",
            STDIN => "stdin",
            STDIN_CLOSE => "stdin_close",
            SIGNAL => "signal",
            WRITE_FILE => "write_file",
            FILE_DATA => "file_data",
            FILE_END => "file_end",
            READ_FILE => "read_file",
            PING => "ping",
            SHUTDOWN => "shutdown",
            SYNC => "sync",
            NET => "net",
            TCP_CONNECT => "tcp_connect",
            CHANGES => "changes",
            PUT_ARCHIVE => "put_archive",
            STAT => "stat",
            REMOVE => "remove",
            LIST_DIR => "list_dir",
            GET_ARCHIVE => "get_archive",
            RESIZE => "resize",
            MOUNT => "mount",
            UNMOUNT => "unmount",
            _ => "unknown",
        }
    }

    /// Whether a client may send this type at all.
    pub fn is_client(kind: u8) -> bool {
        (EXEC..=UNMOUNT).contains(&kind)
    }
}

/// Field value kinds.
pub const UINT: u8 = 1;
pub const BYTES: u8 = 2;
pub const LIST: u8 = 3;

pub enum Value<'a> {
    Uint(u64),
    Bytes(&'a [u8]),
    List(Vec<&'a [u8]>),
}

/// A decoded message: `(tag, value)` pairs, each tag at most once.
pub struct Fields<'a> {
    items: Vec<(u8, Value<'a>)>,
}

fn take<'a>(data: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], String> {
    if data.len() < n {
        return Err(format!("truncated {what}"));
    }
    let (head, tail) = data.split_at(n);
    *data = tail;
    Ok(head)
}

fn take_u32(data: &mut &[u8], what: &str) -> Result<usize, String> {
    let b = take(data, 4, what)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

impl<'a> Fields<'a> {
    /// Decodes `payload`; `schema` lists the allowed `(tag, kind)` pairs of this message type.
    pub fn decode(payload: &'a [u8], schema: &[(u8, u8)]) -> Result<Self, String> {
        let mut data = payload;
        let mut items: Vec<(u8, Value<'a>)> = Vec::new();
        while !data.is_empty() {
            let head = take(&mut data, 2, "field header")?;
            let (tag, vkind) = (head[0], head[1]);
            match schema.iter().find(|(t, _)| *t == tag) {
                None => return Err(format!("unknown field {tag}")),
                Some((_, k)) if *k != vkind => {
                    return Err(format!("field {tag} has kind {vkind}, expected {k}"))
                }
                Some(_) => {}
            }
            if items.iter().any(|(t, _)| *t == tag) {
                return Err(format!("field {tag} appears twice"));
            }
            let value = match vkind {
                UINT => {
                    let b = take(&mut data, 8, "integer field")?;
                    let mut raw = [0u8; 8];
                    raw.copy_from_slice(b);
                    Value::Uint(u64::from_le_bytes(raw))
                }
                BYTES => {
                    let n = take_u32(&mut data, "byte string length")?;
                    Value::Bytes(take(&mut data, n, "byte string")?)
                }
                LIST => {
                    let count = take_u32(&mut data, "list count")?;
                    // Every element needs at least its 4-byte length: bound the allocation.
                    if count > data.len() / 4 {
                        return Err("list count exceeds the frame".to_string());
                    }
                    let mut list = Vec::with_capacity(count);
                    for _ in 0..count {
                        let n = take_u32(&mut data, "list element length")?;
                        list.push(take(&mut data, n, "list element")?);
                    }
                    Value::List(list)
                }
                other => return Err(format!("unknown field kind {other}")),
            };
            items.push((tag, value));
        }
        Ok(Fields { items })
    }

    fn get(&self, tag: u8) -> Option<&Value<'a>> {
        self.items.iter().find(|(t, _)| *t == tag).map(|(_, v)| v)
    }

    pub fn uint(&self, tag: u8) -> Option<u64> {
        match self.get(tag) {
            Some(Value::Uint(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn bytes(&self, tag: u8) -> Option<&'a [u8]> {
        match self.get(tag) {
            Some(Value::Bytes(v)) => Some(v),
            _ => None,
        }
    }

    pub fn list(&self, tag: u8) -> Option<&[&'a [u8]]> {
        match self.get(tag) {
            Some(Value::List(v)) => Some(v),
            _ => None,
        }
    }
}

/// Builds a field-encoded payload.
#[derive(Default)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn uint(mut self, tag: u8, value: u64) -> Self {
        self.buf.extend_from_slice(&[tag, UINT]);
        self.buf.extend_from_slice(&value.to_le_bytes());
        self
    }

    pub fn bytes(mut self, tag: u8, value: &[u8]) -> Self {
        self.buf.extend_from_slice(&[tag, BYTES]);
        self.buf
            .extend_from_slice(&(value.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(value);
        self
    }

    pub fn list<I, T>(mut self, tag: u8, items: I) -> Self
    where
        I: ExactSizeIterator<Item = T>,
        T: AsRef<[u8]>,
    {
        self.buf.extend_from_slice(&[tag, LIST]);
        self.buf
            .extend_from_slice(&(items.len() as u32).to_le_bytes());
        for item in items {
            let item = item.as_ref();
            self.buf
                .extend_from_slice(&(item.len() as u32).to_le_bytes());
            self.buf.extend_from_slice(item);
        }
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

pub struct Frame {
    pub kind: u8,
    pub payload: Vec<u8>,
}

pub enum ReadError {
    /// The peer closed the connection (between frames).
    Eof,
    /// Reading failed (connection reset and the like).
    Io,
    /// The hello did not arrive in time.
    TimedOut,
    /// The peer broke the protocol; the message says how.
    Protocol(String),
}

/// Buffered frame reader over a stream socket. Reads as much as is available with one system call
/// and hands out whole frames; the frame header is checked before its body is awaited.
pub struct Reader {
    fd: RawFd,
    buf: Vec<u8>,
    start: usize,
}

impl Reader {
    pub fn new(fd: RawFd) -> Self {
        Reader {
            fd,
            buf: Vec::with_capacity(CHUNK + 2 * HEADER),
            start: 0,
        }
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Makes room for at least `want` unread bytes and reads once. Returns the bytes read (0: EOF).
    fn fill(&mut self, want: usize) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let target = want.max(CHUNK + 2 * HEADER);
        if self.buf.capacity() < target {
            self.buf.reserve(target - self.buf.len());
        } else if self.buf.capacity() == self.buf.len() {
            self.buf.reserve(CHUNK);
        }
        sys::read_spare(self.fd, &mut self.buf)
    }

    /// One read from the socket (call when poll says it is readable). `Ok(false)` on EOF.
    pub fn fill_once(&mut self) -> io::Result<bool> {
        let want = self.available().len() + CHUNK;
        Ok(self.fill(want)? > 0)
    }

    /// Reads the peer's 8-byte hello, waiting at most `timeout` for all of it. The socket's receive
    /// timeout bounds each read meanwhile and is cleared once the hello is complete, so later reads
    /// (requests, stdin) wait as long as they need to.
    pub fn read_hello(&mut self, timeout: Duration) -> Result<[u8; HELLO_LEN], ReadError> {
        let deadline = Instant::now() + timeout;
        while self.available().len() < HELLO_LEN {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadError::TimedOut);
            }
            sys::set_recv_timeout(self.fd, Some(left)).map_err(|_| ReadError::Io)?;
            match self.fill(HELLO_LEN) {
                Ok(0) if self.available().is_empty() => return Err(ReadError::Eof),
                Ok(0) => {
                    return Err(ReadError::Protocol(
                        "connection closed inside the hello".into(),
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(ReadError::TimedOut),
                Err(_) => return Err(ReadError::Io),
            }
        }
        sys::set_recv_timeout(self.fd, None).map_err(|_| ReadError::Io)?;
        let mut hello = [0u8; HELLO_LEN];
        hello.copy_from_slice(&self.available()[..HELLO_LEN]);
        self.start += HELLO_LEN;
        Ok(hello)
    }

    /// The length of the frame at the head of the buffer, once its header has arrived and been
    /// checked; `Ok(None)` while incomplete.
    fn check_header(&self) -> Result<Option<usize>, ReadError> {
        let avail = self.available();
        if avail.len() < 4 {
            return Ok(None);
        }
        let length = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if length == 0 {
            return Err(ReadError::Protocol("frame with length 0".into()));
        }
        if length > MAX_FRAME {
            return Err(ReadError::Protocol(format!(
                "frame of {length} bytes exceeds the limit of {MAX_FRAME} bytes"
            )));
        }
        let Some(&kind_byte) = avail.get(4) else {
            return Ok(None);
        };
        if !kind::is_client(kind_byte) {
            return Err(ReadError::Protocol(format!(
                "unknown frame type 0x{kind_byte:02x}"
            )));
        }
        Ok(Some(length))
    }

    /// A complete frame from the buffer, without reading from the socket.
    pub fn next_buffered(&mut self) -> Result<Option<Frame>, ReadError> {
        let Some(length) = self.check_header()? else {
            return Ok(None);
        };
        let avail = self.available();
        if avail.len() < 4 + length {
            return Ok(None);
        }
        let frame = Frame {
            kind: avail[4],
            payload: avail[HEADER..4 + length].to_vec(),
        };
        self.start += 4 + length;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(frame))
    }

    /// Blocks until a whole frame has arrived.
    pub fn read_frame(&mut self) -> Result<Frame, ReadError> {
        loop {
            if let Some(frame) = self.next_buffered()? {
                return Ok(frame);
            }
            let pending = self.available().len();
            let want = match self.check_header()? {
                Some(length) => 4 + length,
                None => HEADER,
            };
            match self.fill(want) {
                Ok(0) if pending == 0 => return Err(ReadError::Eof),
                Ok(0) => {
                    return Err(ReadError::Protocol(
                        "connection closed inside a frame".into(),
                    ))
                }
                Ok(_) => {}
                Err(_) => return Err(ReadError::Io),
            }
        }
    }
}

pub fn hello() -> [u8; HELLO_LEN] {
    let mut out = [0u8; HELLO_LEN];
    out[..4].copy_from_slice(MAGIC);
    out[4..6].copy_from_slice(&VERSION.to_le_bytes());
    out
}

pub fn send_hello(fd: RawFd) -> io::Result<()> {
    sys::write_all(fd, &hello())
}

pub fn header(kind: u8, payload_len: usize) -> [u8; HEADER] {
    let mut out = [0u8; HEADER];
    out[..4].copy_from_slice(&((payload_len + 1) as u32).to_le_bytes());
    out[4] = kind;
    out
}

/// Sends one frame (one `writev`, normally).
pub fn send(fd: RawFd, kind: u8, payload: &[u8]) -> io::Result<()> {
    sys::write_all2(fd, &header(kind, payload.len()), payload)
}

/// Sends `buf[HEADER..]` as a frame, writing the header into `buf[..HEADER]` (one `write`).
pub fn send_prefixed(fd: RawFd, kind: u8, buf: &mut [u8]) -> io::Result<()> {
    let h = header(kind, buf.len() - HEADER);
    buf[..HEADER].copy_from_slice(&h);
    sys::write_all(fd, buf)
}

/// Error frame fields.
pub mod err {
    pub const KIND: u8 = 1;
    pub const ERRNO: u8 = 2;
    pub const MESSAGE: u8 = 3;
    pub const FATAL: u8 = 4;
}

pub fn send_error(
    fd: RawFd,
    what: &str,
    errno: Option<i32>,
    message: &str,
    fatal: bool,
) -> io::Result<()> {
    let mut enc = Encoder::new().bytes(err::KIND, what.as_bytes());
    if let Some(n) = errno {
        enc = enc.uint(err::ERRNO, n as u64);
    }
    let payload = enc
        .bytes(err::MESSAGE, message.as_bytes())
        .uint(err::FATAL, fatal as u64)
        .finish();
    send(fd, kind::ERROR, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &[(u8, u8)] = &[(1, LIST), (2, BYTES), (3, UINT)];

    fn list(items: &[&[u8]]) -> Vec<u8> {
        let mut out = vec![1, LIST];
        out.extend_from_slice(&(items.len() as u32).to_le_bytes());
        for item in items {
            out.extend_from_slice(&(item.len() as u32).to_le_bytes());
            out.extend_from_slice(item);
        }
        out
    }

    #[test]
    fn round_trip() {
        let mut payload = list(&[b"echo", b"", b"x"]);
        payload.extend(Encoder::new().bytes(2, b"/tmp").uint(3, 7).finish());
        let fields = Fields::decode(&payload, SCHEMA).unwrap();
        assert_eq!(fields.list(1).unwrap(), &[&b"echo"[..], b"", b"x"]);
        assert_eq!(fields.bytes(2), Some(&b"/tmp"[..]));
        assert_eq!(fields.uint(3), Some(7));
        assert_eq!(fields.uint(2), None);
    }

    #[test]
    fn rejects_bad_input() {
        let err = |payload: &[u8]| Fields::decode(payload, SCHEMA).err().unwrap();
        assert_eq!(err(&[9, UINT, 0, 0, 0, 0, 0, 0, 0, 0]), "unknown field 9");
        assert_eq!(
            err(&[3, BYTES, 0, 0, 0, 0]),
            "field 3 has kind 2, expected 1"
        );
        assert_eq!(err(&[3, UINT, 1, 2]), "truncated integer field");
        assert_eq!(err(&[2, BYTES, 5, 0, 0, 0, b'a']), "truncated byte string");
        assert_eq!(
            err(&[1, LIST, 255, 255, 255, 255]),
            "list count exceeds the frame"
        );
        let twice = Encoder::new().uint(3, 1).uint(3, 2).finish();
        assert_eq!(err(&twice), "field 3 appears twice");
    }

    #[test]
    fn random_input_never_panics() {
        // xorshift: deterministic pseudo-random payloads, many of them plausible field headers.
        let mut state: u64 = 0x9e3779b97f4a7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20000 {
            let len = (next() % 64) as usize;
            let mut payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if len > 2 && next() % 2 == 0 {
                payload[0] = (next() % 4) as u8;
                payload[1] = (next() % 4) as u8;
            }
            let _ = Fields::decode(&payload, SCHEMA);
        }
    }
}
