//! The `tcp_connect` request: the agent connects to a TCP port inside the guest and relays the
//! byte stream over the request's connection (PROTOCOL.md). This is how the host publishes a
//! guest port while the VM runs (`Vm.expose_tcp`): it needs no network card, and the guest
//! learns nothing about the host side of the connection.
//!
//! The connection carries one stream until both halves are closed, then the agent closes it.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::conn::{Conn, End};
use crate::proto::{self, kind, Encoder, Frame, BYTES, CHUNK, HEADER, UINT};
use crate::sys;

pub const PORT: u8 = 1;
pub const ADDRESS: u8 = 2;
pub const END_SIZE: u8 = 1;
pub const SCHEMA: &[(u8, u8)] = &[(PORT, UINT), (ADDRESS, BYTES)];

/// How long the guest side may take to accept: a listener that never answers (a full backlog, a
/// firewall dropping SYNs) must not hold the request forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Stop reading the client while this much is waiting for the guest socket (back-pressure).
const BACKLOG: usize = 1 << 20;

/// The guest address the request names (default: the guest's loopback). `Err` is a one-line
/// request error.
pub fn target(fields: &proto::Fields<'_>) -> Result<SocketAddr, String> {
    let port = match fields.uint(PORT) {
        Some(p @ 1..=65535) => p as u16,
        Some(p) => return Err(format!("tcp_connect: port {p} is not 1 to 65535")),
        None => return Err("tcp_connect needs a port".into()),
    };
    let address = match fields.bytes(ADDRESS) {
        None => Ipv4Addr::LOCALHOST,
        Some(&[a, b, c, d]) => Ipv4Addr::new(a, b, c, d),
        Some(other) => {
            return Err(format!(
                "tcp_connect: an address is 4 bytes, not {}",
                other.len()
            ))
        }
    };
    if address.is_unspecified() || address.is_broadcast() || address.is_multicast() {
        return Err(format!("tcp_connect: {address} is not a host address"));
    }
    Ok(SocketAddr::V4(SocketAddrV4::new(address, port)))
}

pub fn run(conn: &mut Conn, frame: &Frame) -> Result<(), End> {
    let fields = Conn::decode(frame, SCHEMA)?;
    let target = match target(&fields) {
        Ok(target) => target,
        Err(message) => return conn.reply_error("request", None, &message),
    };
    let stream = match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
        Ok(stream) => stream,
        Err(e) => {
            let message = format!("tcp_connect {target}: {}", sys::errno_text(&e));
            return conn.reply_error("os", e.raw_os_error(), &message);
        }
    };
    if let Err(e) = stream.set_nonblocking(true) {
        let message = format!("tcp_connect {target}: {}", sys::errno_text(&e));
        return conn.reply_error("os", e.raw_os_error(), &message);
    }
    // Relayed bytes are already batched by the client; Nagle would only add latency.
    let _ = stream.set_nodelay(true);
    proto::send(conn.fd(), kind::OK, &[])?;
    let mut relay = Relay {
        stream,
        pending: Vec::new(),
        pending_at: 0,
        client_closed: false,
        write_shut: false,
        guest_eof: false,
        forwarded: 0,
    };
    relay.run(conn)?;
    // Both halves are closed: the stream is over, and so is the connection (PROTOCOL.md).
    Err(End::Closed)
}

struct Relay {
    stream: TcpStream,
    /// From the client, not yet written to the guest socket.
    pending: Vec<u8>,
    pending_at: usize,
    /// The client sent `stdin_close`: once `pending` is written, the guest socket's sending half
    /// is shut down.
    client_closed: bool,
    write_shut: bool,
    /// The guest socket reached end of stream; `end` was sent.
    guest_eof: bool,
    forwarded: u64,
}

impl Relay {
    fn backlog(&self) -> usize {
        self.pending.len() - self.pending_at
    }

    /// Handles the frames the client sent; a frame other than data or its close is a violation.
    fn take_frames(&mut self, conn: &mut Conn) -> Result<(), End> {
        while let Some(frame) = conn.reader.next_buffered()? {
            match frame.kind {
                kind::STDIN if !self.client_closed => {
                    if self.pending_at == self.pending.len() {
                        self.pending.clear();
                        self.pending_at = 0;
                    }
                    self.pending.extend_from_slice(&frame.payload);
                }
                kind::STDIN_CLOSE if !self.client_closed => self.client_closed = true,
                other => {
                    return Err(End::Fatal(format!(
                        "unexpected {} frame during a tcp_connect stream{}",
                        kind::name(other),
                        if self.client_closed {
                            " after stdin_close"
                        } else {
                            ""
                        }
                    )))
                }
            }
        }
        Ok(())
    }

    /// A failure of the guest socket: reported to the client (not fatal to the protocol, but the
    /// stream is over).
    fn failed(&self, conn: &Conn, what: &str, e: &io::Error) -> End {
        let message = format!("tcp_connect: {what}: {}", sys::errno_text(e));
        match conn.reply_error("os", e.raw_os_error(), &message) {
            Ok(()) => End::Closed,
            Err(end) => end,
        }
    }

    /// Forwards one chunk the guest socket has (or its end of stream) to the client.
    fn forward(&mut self, conn: &mut Conn) -> Result<(), End> {
        let mut chunk = std::mem::take(&mut conn.buf);
        chunk.clear();
        chunk.resize(HEADER + CHUNK, 0);
        let got = self.stream.read(&mut chunk[HEADER..]);
        let result = match got {
            Ok(0) => {
                self.guest_eof = true;
                let payload = Encoder::new().uint(END_SIZE, self.forwarded).finish();
                proto::send(conn.fd(), kind::END, &payload).map_err(End::from)
            }
            Ok(n) => {
                chunk.truncate(HEADER + n);
                self.forwarded += n as u64;
                proto::send_prefixed(conn.fd(), kind::STDOUT, &mut chunk).map_err(End::from)
            }
            Err(e) if retry(&e) => Ok(()),
            Err(e) => Err(self.failed(conn, "reading the guest socket", &e)),
        };
        conn.buf = chunk;
        result
    }

    fn write_pending(&mut self, conn: &Conn) -> Result<(), End> {
        match self.stream.write(&self.pending[self.pending_at..]) {
            Ok(n) => {
                self.pending_at += n;
                Ok(())
            }
            Err(e) if retry(&e) => Ok(()),
            Err(e) => Err(self.failed(conn, "writing the guest socket", &e)),
        }
    }

    fn run(&mut self, conn: &mut Conn) -> Result<(), End> {
        loop {
            self.take_frames(conn)?;
            if self.client_closed && self.backlog() == 0 && !self.write_shut {
                self.write_shut = true;
                if let Err(e) = self.stream.shutdown(Shutdown::Write) {
                    return Err(self.failed(conn, "closing the guest socket", &e));
                }
            }
            if self.write_shut && self.guest_eof {
                return Ok(());
            }
            const SOCK: usize = 0;
            const GUEST: usize = 1;
            let mut fds = [libc::pollfd {
                fd: -1,
                events: 0,
                revents: 0,
            }; 2];
            // The client is read even after stdin_close: its going away ends the stream.
            if self.backlog() < BACKLOG {
                fds[SOCK] = libc::pollfd {
                    fd: conn.fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
            }
            let mut guest_events = 0;
            if !self.guest_eof {
                guest_events |= libc::POLLIN;
            }
            if self.backlog() > 0 {
                guest_events |= libc::POLLOUT;
            }
            if guest_events != 0 {
                fds[GUEST] = libc::pollfd {
                    fd: self.stream.as_raw_fd(),
                    events: guest_events,
                    revents: 0,
                };
            }
            if let Err(e) = sys::poll(&mut fds, -1) {
                return Err(End::Fatal(format!("poll: {}", sys::errno_text(&e))));
            }
            let guest = fds[GUEST].revents;
            if guest & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0 && self.backlog() > 0 {
                self.write_pending(conn)?;
            }
            if guest & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && !self.guest_eof {
                self.forward(conn)?;
            }
            if fds[SOCK].revents != 0 && !conn.reader.fill_once()? {
                // The client went away mid-stream: dropping the socket ends the guest's side.
                return Err(End::Closed);
            }
        }
    }
}

fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Fields;

    fn fields(port: Option<u64>, address: Option<&[u8]>) -> Vec<u8> {
        let mut enc = Encoder::new();
        if let Some(p) = port {
            enc = enc.uint(PORT, p);
        }
        if let Some(a) = address {
            enc = enc.bytes(ADDRESS, a);
        }
        enc.finish()
    }

    fn target_of(port: Option<u64>, address: Option<&[u8]>) -> Result<SocketAddr, String> {
        let payload = fields(port, address);
        target(&Fields::decode(&payload, SCHEMA).expect("well formed"))
    }

    #[test]
    fn target_defaults_to_the_guest_loopback() {
        assert_eq!(
            target_of(Some(8080), None).unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            target_of(Some(1), Some(&[10, 0, 2, 15])).unwrap(),
            "10.0.2.15:1".parse().unwrap()
        );
    }

    #[test]
    fn target_refuses_what_is_no_tcp_endpoint() {
        for (port, address, expected) in [
            (None, None, "needs a port"),
            (Some(0), None, "port 0 is not 1 to 65535"),
            (Some(65536), None, "port 65536"),
            (Some(u64::MAX), None, "is not 1 to 65535"),
            (Some(80), Some(&[1u8, 2, 3][..]), "4 bytes, not 3"),
            (
                Some(80),
                Some(&[0, 0, 0, 0][..]),
                "0.0.0.0 is not a host address",
            ),
            (Some(80), Some(&[255; 4][..]), "255.255.255.255"),
            (Some(80), Some(&[224, 0, 0, 1][..]), "224.0.0.1"),
        ] {
            let err = target_of(port, address).unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
    }
}
