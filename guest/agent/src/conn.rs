//! One client connection: hello, then one request at a time until the client closes.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::proto::{self, kind, Encoder, Fields, Frame, ReadError};
use crate::{archive, changes, exec, files, mounts, net, power, sync, tcp, tree, Context};

/// Why a connection ends early.
pub enum End {
    /// The peer went away (or writing to it failed): nothing more can be said.
    Closed,
    /// The peer broke the protocol: say so in a fatal error frame, then close.
    Fatal(String),
}

impl From<ReadError> for End {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Eof | ReadError::Io | ReadError::TimedOut => End::Closed,
            ReadError::Protocol(msg) => End::Fatal(msg),
        }
    }
}

impl From<std::io::Error> for End {
    fn from(_: std::io::Error) -> Self {
        End::Closed
    }
}

pub struct Conn {
    pub sock: OwnedFd,
    pub reader: proto::Reader,
    /// Reused stack for the spawn child and output buffer, so repeated requests fault no new pages.
    pub stack: Vec<u8>,
    pub buf: Vec<u8>,
}

impl Conn {
    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Sends a non-fatal error reply; the connection stays usable.
    pub fn reply_error(&self, what: &str, errno: Option<i32>, message: &str) -> Result<(), End> {
        proto::send_error(self.fd(), what, errno, message, false)?;
        Ok(())
    }

    /// Decodes a request's fields; a malformed request is a protocol violation.
    pub fn decode<'a>(frame: &'a Frame, schema: &[(u8, u8)]) -> Result<Fields<'a>, End> {
        Fields::decode(&frame.payload, schema)
            .map_err(|e| End::Fatal(format!("malformed {} request: {e}", kind::name(frame.kind))))
    }
}

pub const PONG_VERSION: u8 = 1;
pub const PONG_PROTOCOL: u8 = 2;
pub const PONG_PID: u8 = 3;
pub const SHUTDOWN_ACTION: u8 = 1;
pub const SHUTDOWN_SCHEMA: &[(u8, u8)] = &[(SHUTDOWN_ACTION, proto::BYTES)];

/// How long a new connection may take to send its hello before the agent closes it, so that clients
/// which connect and never speak do not hold a thread each forever.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub fn serve(sock: OwnedFd, ctx: &'static Context) {
    let fd = sock.as_raw_fd();
    let mut conn = Conn {
        sock,
        reader: proto::Reader::new(fd),
        stack: Vec::new(),
        buf: Vec::new(),
    };
    if let Err(End::Fatal(message)) = run(&mut conn, ctx) {
        let _ = proto::send_error(conn.fd(), "protocol", None, &message, true);
        // Let the error frame reach the peer before the socket is torn down.
        // SAFETY: shutdown takes only integers and touches no memory of ours; `conn.sock` owns the
        // descriptor and stays open until `conn` is dropped after this call.
        unsafe { libc::shutdown(conn.fd(), libc::SHUT_WR) };
    }
}

fn run(conn: &mut Conn, ctx: &'static Context) -> Result<(), End> {
    proto::send_hello(conn.fd())?;
    let hello = match conn.reader.read_hello(HELLO_TIMEOUT) {
        Err(ReadError::TimedOut) => {
            return Err(End::Fatal(format!(
                "no hello within {} s",
                HELLO_TIMEOUT.as_secs()
            )))
        }
        other => other?,
    };
    if &hello[..4] != proto::MAGIC {
        return Err(End::Fatal(
            "bad hello: this is a supermachine agent (protocol magic SMAG)".into(),
        ));
    }
    let version = u16::from_le_bytes([hello[4], hello[5]]);
    if version != proto::VERSION {
        return Err(End::Fatal(format!(
            "unsupported protocol version {version}; this agent speaks version {}",
            proto::VERSION
        )));
    }
    loop {
        let frame = match conn.reader.read_frame() {
            Ok(frame) => frame,
            Err(ReadError::Eof) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match frame.kind {
            kind::EXEC => exec::run(conn, &frame, ctx)?,
            kind::WRITE_FILE => files::write(conn, &frame)?,
            kind::READ_FILE => files::read(conn, &frame)?,
            kind::PING => {
                Conn::decode(&frame, &[])?;
                let payload = Encoder::new()
                    .bytes(PONG_VERSION, env!("CARGO_PKG_VERSION").as_bytes())
                    .uint(PONG_PROTOCOL, proto::VERSION as u64)
                    .uint(PONG_PID, std::process::id() as u64)
                    .finish();
                proto::send(conn.fd(), kind::PONG, &payload)?;
            }
            kind::SHUTDOWN => {
                let fields = Conn::decode(&frame, SHUTDOWN_SCHEMA)?;
                let action = match fields.bytes(SHUTDOWN_ACTION).unwrap_or(b"poweroff") {
                    b"poweroff" => power::Action::PowerOff,
                    b"reboot" => power::Action::Reboot,
                    other => {
                        let shown = String::from_utf8_lossy(other);
                        conn.reply_error(
                            "request",
                            None,
                            &format!("unknown shutdown action {shown:?}"),
                        )?;
                        continue;
                    }
                };
                proto::send(conn.fd(), kind::OK, &[])?;
                power::shutdown(action, ctx);
            }
            kind::SYNC => sync::run(conn, &frame, ctx)?,
            kind::NET => net::run(conn, &frame, ctx)?,
            kind::TCP_CONNECT => tcp::run(conn, &frame)?,
            kind::CHANGES => changes::run(conn, &frame, ctx.layers.as_ref())?,
            kind::PUT_ARCHIVE => archive::run(conn, &frame)?,
            kind::STAT => files::stat(conn, &frame)?,
            kind::REMOVE => files::remove(conn, &frame)?,
            kind::LIST_DIR => tree::list_dir(conn, &frame)?,
            kind::GET_ARCHIVE => tree::get_archive(conn, &frame)?,
            kind::MOUNT => mounts::run(conn, &frame)?,
            kind::UNMOUNT => mounts::unmount(conn, &frame)?,
            // Input for a process that has already finished may race with its exit report.
            kind::STDIN | kind::STDIN_CLOSE | kind::SIGNAL | kind::RESIZE => {}
            other => {
                return Err(End::Fatal(format!(
                    "unexpected {} frame outside a request",
                    kind::name(other)
                )));
            }
        }
    }
}
