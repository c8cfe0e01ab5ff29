//! `reset_connections` of the `net` request: a clone restored from a snapshot holds the TCP state
//! of the VM that was snapshotted, whose peers never heard of the clone (or talk to its siblings).
//! NETLINK_SOCK_DIAG lists every IPv4 TCP socket that is not listening, and one SOCK_DESTROY per
//! socket aborts it: its owner sees ECONNABORTED, its peer a reset. Listening sockets stay.
//!
//! Messages are built and read as bytes at the offsets of the kernel's structs
//! (`<linux/netlink.h>`, `<linux/inet_diag.h>`), so no struct is reinterpreted.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::net::Failure;
use crate::sys;

/// Most sockets destroyed by one request; a guest with more is refused before any is.
pub const MAX_SOCKETS: usize = 65536;
/// A dump datagram is at most a few pages; 64 KiB holds any.
const RECV_BUF: usize = 64 * 1024;
/// Most datagrams read for one dump: every one but the last carries a socket.
const MAX_DUMP_RECVS: usize = MAX_SOCKETS + 16;
/// Most datagrams read while waiting for one acknowledgement.
const MAX_ACK_RECVS: usize = 16;
/// The kernel answers at once; a receive that waits longer than this fails instead of hanging.
const RECV_TIMEOUT: Duration = Duration::from_secs(10);

// <linux/sock_diag.h>, <linux/netlink.h>, <net/tcp_states.h>; not all are in the libc crate.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const TCP_LISTEN: u8 = 10;
/// TCPF_ALL: every TCP state, as a bit mask of `1 << state`.
const ALL_STATES: u32 = 0xfff;
const NOT_LISTENING: u32 = ALL_STATES & !(1 << TCP_LISTEN);

/// `struct nlmsghdr`: u32 len, u16 type, u16 flags, u32 seq, u32 pid.
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_sockid`: ports, addresses, interface and cookie, copied as they came.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`: u8 family, u8 protocol, u8 ext, u8 pad, u32 states, the id.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg`: u8 family, u8 state, u8 timer, u8 retrans, the id, five u32.
const MSG_ID_AT: usize = 4;
const MSG_LEN: usize = MSG_ID_AT + SOCKID_LEN + 20;
const DUMP_SEQ: u32 = 1;

type SockId = [u8; SOCKID_LEN];

/// One request: a netlink header and an `inet_diag_req_v2` for IPv4 TCP.
fn request(kind: u16, flags: u16, seq: u32, states: u32, id: &SockId) -> Vec<u8> {
    let mut out = Vec::with_capacity(NLMSG_HDR + REQ_LEN);
    out.extend_from_slice(&((NLMSG_HDR + REQ_LEN) as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&[libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0]);
    out.extend_from_slice(&states.to_ne_bytes());
    out.extend_from_slice(id);
    out
}

/// A netlink message of a datagram: its type, sequence number and payload.
struct Message<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

fn ne_u32(b: &[u8]) -> u32 {
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

fn malformed() -> io::Error {
    io::Error::from_raw_os_error(libc::EPROTO)
}

/// Splits a datagram into its messages; a length that does not fit is EPROTO.
fn messages(mut data: &[u8]) -> io::Result<Vec<Message<'_>>> {
    let mut out = Vec::new();
    while data.len() >= NLMSG_HDR {
        let len = ne_u32(data) as usize;
        if len < NLMSG_HDR || len > data.len() {
            return Err(malformed());
        }
        out.push(Message {
            kind: u16::from_ne_bytes([data[4], data[5]]),
            seq: ne_u32(&data[8..]),
            payload: &data[NLMSG_HDR..len],
        });
        // Messages are 4-byte aligned (NLMSG_ALIGN); the last one may end the datagram unpadded.
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
    Ok(out)
}

/// The errno of an NLMSG_ERROR (or NLMSG_DONE) payload: an `int`, 0 or a negative errno.
fn errno_of(payload: &[u8]) -> io::Result<i32> {
    if payload.len() < 4 {
        return Err(malformed());
    }
    Ok((ne_u32(payload) as i32).wrapping_neg())
}

/// The id of a dumped socket that is not listening.
fn socket_id(payload: &[u8]) -> Option<SockId> {
    if payload.len() < MSG_LEN || payload[1] == TCP_LISTEN {
        return None;
    }
    payload[MSG_ID_AT..MSG_ID_AT + SOCKID_LEN].try_into().ok()
}

fn open() -> io::Result<OwnedFd> {
    // SAFETY: socket takes only integers; its result is checked before it is wrapped, so the
    // descriptor is new and owned by nothing else.
    let sock = unsafe {
        let fd = sys::cvt(libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        ))?;
        OwnedFd::from_raw_fd(fd)
    };
    sys::set_recv_timeout(sock.as_raw_fd(), Some(RECV_TIMEOUT))?;
    Ok(sock)
}

fn send(sock: &OwnedFd, message: &[u8]) -> io::Result<()> {
    // A datagram goes whole or not at all; to the kernel (port 0), as the socket is unbound.
    match sys::write(sock.as_raw_fd(), message)? {
        n if n == message.len() => Ok(()),
        _ => Err(io::Error::from_raw_os_error(libc::EMSGSIZE)),
    }
}

/// One datagram into `buf`; one that did not fit (MSG_TRUNC tells its real size) is EMSGSIZE.
fn recv(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, exclusively borrowed;
        // with MSG_TRUNC it returns the datagram's full length but still writes no more.
        let ret = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if ret as usize > buf.len() {
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        return Ok(ret as usize);
    }
}

enum DumpError {
    TooMany,
    Io(io::Error),
}

impl From<io::Error> for DumpError {
    fn from(e: io::Error) -> Self {
        DumpError::Io(e)
    }
}

/// The ids of every IPv4 TCP socket that is not listening.
fn dump(sock: &OwnedFd, buf: &mut [u8]) -> Result<Vec<SockId>, DumpError> {
    let flags = NLM_F_REQUEST | NLM_F_DUMP;
    send(
        sock,
        &request(
            SOCK_DIAG_BY_FAMILY,
            flags,
            DUMP_SEQ,
            NOT_LISTENING,
            &[0; SOCKID_LEN],
        ),
    )?;
    let mut ids = Vec::new();
    for _ in 0..MAX_DUMP_RECVS {
        let n = recv(sock, buf)?;
        for message in messages(&buf[..n])? {
            match message.kind {
                NLMSG_DONE | NLMSG_ERROR => {
                    return match errno_of(message.payload)? {
                        0 if message.kind == NLMSG_DONE => Ok(ids),
                        0 => Err(malformed().into()),
                        errno => Err(io::Error::from_raw_os_error(errno).into()),
                    };
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(id) = socket_id(message.payload) {
                        if ids.len() == MAX_SOCKETS {
                            return Err(DumpError::TooMany);
                        }
                        ids.push(id);
                    }
                }
                _ => {}
            }
        }
    }
    Err(malformed().into())
}

/// Destroys one socket. `Ok(false)`: it was gone already (closed meanwhile, or reset by the
/// destruction of its peer on this machine).
fn destroy(sock: &OwnedFd, buf: &mut [u8], seq: u32, id: &SockId) -> io::Result<bool> {
    let flags = NLM_F_REQUEST | NLM_F_ACK;
    send(sock, &request(SOCK_DESTROY, flags, seq, ALL_STATES, id))?;
    for _ in 0..MAX_ACK_RECVS {
        let n = recv(sock, buf)?;
        for message in messages(&buf[..n])? {
            if message.kind != NLMSG_ERROR || message.seq != seq {
                continue;
            }
            return match errno_of(message.payload)? {
                0 => Ok(true),
                libc::ENOENT => Ok(false),
                errno => Err(io::Error::from_raw_os_error(errno)),
            };
        }
    }
    Err(malformed())
}

/// Destroys every IPv4 TCP socket that is not listening; returns how many it destroyed.
pub fn destroy_tcp_connections() -> Result<u64, Failure> {
    let sock = open().map_err(|e| Failure::os("open a sock_diag socket", e))?;
    let mut buf = vec![0u8; RECV_BUF];
    let ids = match dump(&sock, &mut buf) {
        Ok(ids) => ids,
        Err(DumpError::TooMany) => {
            return Err(Failure::Request(format!(
                "net: more than {MAX_SOCKETS} TCP sockets to reset; none was"
            )))
        }
        Err(DumpError::Io(e)) => return Err(Failure::os("list the TCP sockets", e)),
    };
    let mut destroyed = 0;
    for (seq, id) in (DUMP_SEQ + 1..).zip(&ids) {
        if destroy(&sock, &mut buf, seq, id).map_err(|e| Failure::os("destroy a TCP socket", e))? {
            destroyed += 1;
        }
    }
    Ok(destroyed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = ((NLMSG_HDR + payload.len()) as u32).to_ne_bytes().to_vec();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(payload);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out
    }

    #[test]
    fn request_layout() {
        let id: SockId = std::array::from_fn(|i| i as u8);
        let req = request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 7, ALL_STATES, &id);
        assert_eq!(req.len(), 72);
        assert_eq!(ne_u32(&req), 72);
        assert_eq!(u16::from_ne_bytes([req[4], req[5]]), SOCK_DESTROY);
        assert_eq!(u16::from_ne_bytes([req[6], req[7]]), 5);
        assert_eq!(ne_u32(&req[8..]), 7);
        assert_eq!(
            &req[16..20],
            &[libc::AF_INET as u8, libc::IPPROTO_TCP as u8, 0, 0]
        );
        assert_eq!(ne_u32(&req[20..]), 0xfff);
        assert_eq!(&req[24..], &id);
        assert_eq!(NOT_LISTENING, 0xfff & !0x400);
    }

    #[test]
    fn messages_split_and_check_lengths() {
        let mut diag = vec![0u8; MSG_LEN + 3];
        diag[1] = 1; // ESTABLISHED
        diag[MSG_ID_AT] = 0xab;
        let data = [
            message(SOCK_DIAG_BY_FAMILY, 1, &diag),
            message(NLMSG_DONE, 1, &[0; 4]),
        ]
        .concat();
        let split = messages(&data).unwrap();
        assert_eq!(split.len(), 2);
        assert_eq!(split[0].payload.len(), MSG_LEN + 3);
        assert_eq!(socket_id(split[0].payload).unwrap()[0], 0xab);
        assert_eq!(
            (split[1].kind, errno_of(split[1].payload).unwrap()),
            (NLMSG_DONE, 0)
        );

        let mut listening = diag.clone();
        listening[1] = TCP_LISTEN;
        assert!(socket_id(&listening).is_none());
        assert!(socket_id(&diag[..MSG_LEN - 1]).is_none());

        let mut bad = message(NLMSG_DONE, 1, &[0; 4]);
        bad[0] = 200;
        assert!(messages(&bad).is_err());
        bad[..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(messages(&bad).is_err());
        // A trailing fragment shorter than a header is ignored, not read past.
        assert_eq!(messages(&[1, 2, 3]).unwrap().len(), 0);
    }

    #[test]
    fn error_payloads() {
        assert_eq!(
            errno_of(&(-libc::ENOENT).to_ne_bytes()).unwrap(),
            libc::ENOENT
        );
        assert!(errno_of(&[0, 0]).is_err());
    }
}
