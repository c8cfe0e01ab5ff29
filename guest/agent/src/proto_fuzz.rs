//! Fuzzing of the request decoder: whatever bytes a host sends after the hello, the frame reader
//! and the per-request field decoding and checks return an error or a value, never panic, and
//! never allocate beyond the frame limit.
//!
//! Runs under `cargo test` with the shared mutation driver: the corpus in
//! `fuzz/corpus/agent_proto/` is replayed, then mutated for `SUPERMACHINE_FUZZ_SECONDS` (default 1).

// The driver is shared with the host crates, which compile it under their own lint settings.
#[allow(unused_mut, clippy::all)]
#[path = "../../../rust/tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::proto::{self, kind, Fields, Frame, Reader};
use crate::{archive, changes, conn, exec, files, mounts, net, sync, tcp, tree};

/// An in-memory file holding `data`, positioned at its start: what the reader sees is exactly
/// the bytes a peer sent, then end of file.
fn memfd_with(data: &[u8]) -> OwnedFd {
    let name = c"agent-proto-fuzz";
    // SAFETY: `name` is a NUL-terminated literal; memfd_create's result is checked before it is
    // wrapped, so `fd` is a new descriptor that nothing else owns.
    let fd = unsafe {
        let raw = libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC);
        assert!(
            raw >= 0,
            "memfd_create: {}",
            std::io::Error::last_os_error()
        );
        OwnedFd::from_raw_fd(raw)
    };
    crate::sys::write_all(fd.as_raw_fd(), data).expect("write to memfd");
    // SAFETY: lseek takes integers only; `fd` stays open for the call.
    let at = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_SET) };
    assert_eq!(at, 0);
    fd
}

/// What the agent does with a request frame before acting on it: decode its fields against the
/// request's schema and run the request's own checks.
fn decode_request(frame: &Frame) {
    let schema: &[(u8, u8)] = match frame.kind {
        kind::EXEC => exec::SCHEMA,
        kind::SIGNAL => exec::SIGNAL_SCHEMA,
        kind::RESIZE => exec::RESIZE_SCHEMA,
        kind::WRITE_FILE => files::WRITE_SCHEMA,
        kind::READ_FILE => files::READ_SCHEMA,
        kind::SHUTDOWN => conn::SHUTDOWN_SCHEMA,
        kind::SYNC => sync::SCHEMA,
        kind::NET => net::SCHEMA,
        kind::TCP_CONNECT => tcp::SCHEMA,
        kind::CHANGES => changes::SCHEMA,
        kind::PUT_ARCHIVE => archive::SCHEMA,
        kind::STAT => files::STAT_SCHEMA,
        kind::REMOVE => files::REMOVE_SCHEMA,
        kind::LIST_DIR | kind::GET_ARCHIVE => tree::SCHEMA,
        kind::MOUNT => mounts::SCHEMA,
        kind::UNMOUNT => mounts::UNMOUNT_SCHEMA,
        kind::PING | kind::STDIN_CLOSE | kind::FILE_END => &[],
        // Data frames carry raw bytes.
        _ => return,
    };
    let Ok(fields) = Fields::decode(&frame.payload, schema) else {
        return;
    };
    for &(tag, _) in schema {
        let _ = (fields.uint(tag), fields.bytes(tag), fields.list(tag));
    }
    match frame.kind {
        kind::EXEC => {
            if let Ok(request) = exec::prepare(&fields) {
                assert!(!request.spec.argv.is_empty());
                assert!(!request.spec.candidates.is_empty());
                if let Some((rows, cols)) = request.tty {
                    assert!(rows > 0 && cols > 0);
                }
            }
        }
        kind::MOUNT => {
            let _ = mounts::check(
                fields.bytes(mounts::SOURCE).unwrap_or(b""),
                fields.bytes(mounts::TARGET).unwrap_or(b""),
                fields.bytes(mounts::FSTYPE).unwrap_or(b"ext4"),
            );
        }
        kind::RESIZE => {
            if let Ok(Some((rows, cols))) = exec::window_size(
                fields.uint(exec::RESIZE_ROWS),
                fields.uint(exec::RESIZE_COLS),
            ) {
                assert!(rows > 0 && cols > 0);
            }
        }
        kind::WRITE_FILE
        | kind::READ_FILE
        | kind::STAT
        | kind::REMOVE
        | kind::LIST_DIR
        | kind::GET_ARCHIVE => {
            let _ = files::check_path(fields.bytes(files::PATH).unwrap_or(b""));
        }
        kind::NET => {
            if let Ok(config) = net::prepare(&fields) {
                assert!(config.mac[0] & 1 == 0 && (1..=30).contains(&config.prefix));
                assert!(config.dns.len() <= net::MAX_DNS && config.hosts.len() <= net::MAX_HOSTS);
            }
        }
        kind::TCP_CONNECT => {
            if let Ok(target) = tcp::target(&fields) {
                assert!(target.port() != 0 && !target.ip().is_unspecified());
            }
        }
        _ => {}
    }
}

/// Reads frames from `data` as the agent reads them from its socket, decoding each.
fn decode_stream(data: &[u8]) {
    let fd = memfd_with(data);
    let mut reader = Reader::new(fd.as_raw_fd());
    let mut consumed = 0;
    while let Ok(frame) = reader.read_frame() {
        assert!(kind::is_client(frame.kind));
        assert!(frame.payload.len() < proto::MAX_FRAME);
        consumed += proto::HEADER + frame.payload.len();
        assert!(consumed <= data.len());
        decode_request(&frame);
    }
}

#[test]
fn fuzz_agent_proto() {
    fuzz_support::run("agent_proto", decode_stream);
}

#[test]
fn corpus_frames_decode() {
    // The seeds are meant to reach the decoders: a valid exec, sync and net are among them.
    let ping = [1u8, 0, 0, 0, kind::PING];
    decode_stream(&ping);
    let exec = proto::Encoder::new()
        .uint(exec::TIMEOUT_MS, 5)
        .uint(exec::PIDS_MAX, 7)
        .finish();
    let mut argv = vec![exec::ARGV, proto::LIST, 1, 0, 0, 0, 4, 0, 0, 0];
    argv.extend_from_slice(b"true");
    argv.extend_from_slice(&exec);
    let fields = Fields::decode(&argv, exec::SCHEMA).expect("valid exec fields");
    let request = exec::prepare(&fields).expect("valid exec request");
    assert_eq!(request.pids_max, 7);
    assert!(!request.keep_background);

    // The net seed is a complete valid request, so mutations of it reach every field check.
    let seed = include_bytes!("../fuzz/corpus/agent_proto/net.bin");
    decode_stream(seed);
    let fields = Fields::decode(&seed[proto::HEADER..], net::SCHEMA).expect("valid net fields");
    let config = net::prepare(&fields).expect("valid net request");
    assert_eq!(
        (config.prefix, config.mtu, config.hosts.len()),
        (24, 1500, 2)
    );
    assert!(config.reset_connections);
}
