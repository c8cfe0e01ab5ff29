//! Fuzz target `virtio_fs`: the FUSE server of a shared folder, fed arbitrary requests.
//!
//! Each input is a run against a fresh share (a file, a directory, a FIFO and symbolic links
//! pointing outside it) next to an `outside` folder the guest must never reach. The requests
//! go to the server directly or, by a flag, through a virtqueue chain in guest memory. Nothing
//! may panic; every reply must be a well-formed FUSE reply that fits the room it was given; the
//! server must stay within its limits; and afterwards `outside` must be exactly as it was, the
//! folder around the share must hold nothing new, and the share must hold no device node and no
//! set-user-ID or set-group-ID file.
//!
//! The seed corpus in `rust/fuzz/corpus/virtio_fs/` is written by
//! `SUPERMACHINE_FUZZ_WRITE_SEEDS=1 cargo test --test fuzz_virtio_fs seed_corpus`.

// The shared driver has an unneeded `mut` (reported upstream); keep -D warnings clean here.
#[allow(unused_mut)]
mod fuzz_support;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use fuzz_support::Input;
use supermachine_core::devices::virtio::fs::device::serve_chain;
use supermachine_core::devices::virtio::fs::protocol::{op, FUSE_ROOT_ID};
use supermachine_core::devices::virtio::fs::server::{MAX_HANDLES, MAX_INODES, MAX_IO};
use supermachine_core::devices::virtio::fs::Server;
use supermachine_core::devices::virtio::queue::{Descriptor, VIRTQ_DESC_F_WRITE};
use supermachine_core::vmm::memory::{GuestRam, MemoryBacking};
use vm_memory::{Bytes, GuestAddress};

/// Most requests of one input.
const MAX_REQUESTS: usize = 64;
/// The room the guest gives for a reply, by the input's choice.
const ROOMS: [usize; 8] = [0, 8, 16, 64, 200, 4096, 70_000, MAX_IO + 4096];
/// Where the queue path puts a request and its reply in guest memory.
const REQ: u64 = 0x1000;
const REPLY: u64 = 0x20_0000;

/// Input flags (first byte).
const READ_ONLY: u8 = 1;
const VIA_QUEUE: u8 = 2;
const NO_INIT: u8 = 4;

fn base() -> PathBuf {
    std::env::temp_dir().join(format!("sm-fuzz-vfs-{}", std::process::id()))
}

/// Makes everything under `dir` removable again (the input may have taken permissions away).
fn loosen(dir: &Path, depth: usize) {
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    if depth == 0 {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                loosen(&e.path(), depth - 1);
            }
        }
    }
}

/// A fresh share and outside folder under [`base`].
fn fresh() -> (PathBuf, PathBuf) {
    let base = base();
    if base.exists() {
        loosen(&base, 16);
        std::fs::remove_dir_all(&base).unwrap();
    }
    let (share, outside) = (base.join("share"), base.join("outside"));
    std::fs::create_dir_all(share.join("d")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"host secret").unwrap();
    std::fs::write(share.join("a"), b"0123456789abcdef").unwrap();
    std::fs::write(share.join("d/b"), b"b").unwrap();
    std::os::unix::fs::symlink("../outside/secret", share.join("up")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), share.join("abs")).unwrap();
    std::os::unix::fs::symlink("../outside", share.join("updir")).unwrap();
    let fifo = std::ffi::CString::new(share.join("p").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    (share, outside)
}

/// What `outside` holds: names, contents, modes, owners.
fn snapshot_of(dir: &Path) -> Vec<(String, Vec<u8>, u32, u32)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap_or_default(),
                md.mode(),
                md.uid(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Checks the share holds no device node and no set-id file (bounded walk).
fn check_share(dir: &Path, depth: usize, budget: &mut usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let md = std::fs::symlink_metadata(e.path()).unwrap();
        let t = md.file_type();
        assert!(
            !t.is_char_device() && !t.is_block_device() && !t.is_socket(),
            "{} is a device node or socket",
            e.path().display()
        );
        if !t.is_symlink() && !t.is_dir() {
            assert_eq!(md.mode() & 0o6000, 0, "{} is set-id", e.path().display());
        }
        if t.is_dir() && depth > 0 {
            check_share(&e.path(), depth - 1, budget);
        }
    }
}

/// Checks one reply against the room it was given.
fn check_reply(reply: &[u8], room: usize) {
    assert!(
        reply.len() <= room,
        "{} bytes for a room of {room}",
        reply.len()
    );
    assert!(reply.len() >= 16, "a reply of {} bytes", reply.len());
    let len = u32::from_le_bytes(reply[..4].try_into().unwrap()) as usize;
    assert_eq!(len, reply.len(), "the length field");
    let error = i32::from_le_bytes(reply[4..8].try_into().unwrap());
    assert!((-4095..=0).contains(&error), "error {error}");
    if error != 0 {
        assert_eq!(reply.len(), 16, "an error reply with a body");
    }
}

fn init() -> Vec<u8> {
    let body: Vec<u8> = [7u32, 31, 1 << 17, u32::MAX]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    request(op::INIT, 0, &body)
}

fn target(data: &[u8]) {
    let mut input = Input(data);
    let flags = input.u8();
    let (share, outside) = fresh();
    let before = snapshot_of(&outside);
    let mut server = Server::open(&share, flags & READ_ONLY != 0).unwrap();
    if flags & NO_INIT == 0 {
        let reply = server.handle(&init(), 4096).unwrap();
        check_reply(&reply, 4096);
    }
    let ram = (flags & VIA_QUEUE != 0).then(|| GuestRam::new(4, &MemoryBacking::Memfd).unwrap());
    for _ in 0..MAX_REQUESTS {
        if input.is_empty() {
            break;
        }
        let room = input.pick(&ROOMS);
        let len = usize::from(input.u16());
        let req = input.bytes(len.min(input.0.len()));
        match &ram {
            None => {
                if let Some(reply) = server.handle(&req, room) {
                    check_reply(&reply, room);
                }
            }
            Some(ram) => {
                // One readable and one writable buffer; the reply is read back from RAM.
                let m = &ram.mem;
                m.write_slice(&req, GuestAddress(REQ)).unwrap();
                let room = room.min(0x20_0000) as u32;
                let descs = [
                    Descriptor {
                        addr: REQ,
                        len: req.len() as u32,
                        flags: 0,
                    },
                    Descriptor {
                        addr: REPLY,
                        len: room,
                        flags: VIRTQ_DESC_F_WRITE,
                    },
                ];
                let written = serve_chain(&mut server, m, &descs).expect("buffers are in RAM");
                if written > 0 {
                    let mut reply = vec![0u8; written as usize];
                    m.read_slice(&mut reply, GuestAddress(REPLY)).unwrap();
                    check_reply(&reply, room as usize);
                }
            }
        }
        let (nodes, handles) = server.counts();
        assert!(nodes <= MAX_INODES && handles <= MAX_HANDLES);
    }
    drop(server);
    assert_eq!(snapshot_of(&outside), before, "outside the share changed");
    let mut around: Vec<_> = std::fs::read_dir(base())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    around.sort();
    assert_eq!(
        around,
        ["outside", "share"],
        "something appeared beside the share"
    );
    check_share(&share, 8, &mut 10_000);
}

#[test]
fn virtio_fs() {
    fuzz_support::run("virtio_fs", target);
    // Kept after a failure, for a look at what the input left behind.
    loosen(&base(), 16);
    let _ = std::fs::remove_dir_all(base());
}

// ---- seeds ----------------------------------------------------------------------------------

fn request(opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(40 + body.len());
    r.extend_from_slice(&((40 + body.len()) as u32).to_le_bytes());
    r.extend_from_slice(&opcode.to_le_bytes());
    r.extend_from_slice(&7u64.to_le_bytes());
    r.extend_from_slice(&nodeid.to_le_bytes());
    r.extend_from_slice(&[0u8; 16]);
    r.extend_from_slice(body);
    r
}

fn names(fixed: &[u8], names: &[&str]) -> Vec<u8> {
    let mut b = fixed.to_vec();
    for n in names {
        b.extend_from_slice(n.as_bytes());
        b.push(0);
    }
    b
}

fn io(fh: u64, offset: u64, size: u32) -> Vec<u8> {
    let mut b = [fh.to_le_bytes(), offset.to_le_bytes()].concat();
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&[0u8; 20]);
    b
}

fn create_in(flags: u32, mode: u32) -> Vec<u8> {
    [flags, mode, 0o022, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn setattr_in(valid: u32, size: u64, mode: u32) -> Vec<u8> {
    let mut b = vec![0u8; 88];
    b[0..4].copy_from_slice(&valid.to_le_bytes());
    b[16..24].copy_from_slice(&size.to_le_bytes());
    b[68..72].copy_from_slice(&mode.to_le_bytes());
    b
}

/// An input: flags, then each request with the room index 7 (the largest).
fn seed(flags: u8, requests: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![flags];
    for r in requests {
        out.push(7);
        out.extend_from_slice(&(r.len() as u16).to_le_bytes());
        out.extend_from_slice(r);
    }
    out
}

/// Node ids and handles are handed out in order from a fresh server: the root is 1, the first
/// new node 2; the first handle 1.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let root = FUSE_ROOT_ID;
    let lookup = |parent: u64, name: &str| request(op::LOOKUP, parent, &names(&[], &[name]));
    let open =
        |node: u64, flags: u32| request(op::OPEN, node, &[flags.to_le_bytes(), [0; 4]].concat());
    let write = |fh: u64, offset: u64, data: &[u8]| {
        let mut b = io(fh, offset, data.len() as u32);
        b.extend_from_slice(data);
        request(op::WRITE, 0, &b)
    };
    let release = |fh: u64| request(op::RELEASE, 0, &[fh.to_le_bytes(), [0; 8], [0; 8]].concat());
    vec![
        (
            "lookup-read",
            seed(
                0,
                &[
                    lookup(root, "a"),
                    open(2, 0),
                    request(op::READ, 0, &io(1, 3, 8)),
                    request(op::GETATTR, 2, &[0u8; 16]),
                    release(1),
                ],
            ),
        ),
        (
            "create-write-readdir",
            seed(
                0,
                &[
                    request(op::CREATE, root, &names(&create_in(2, 0o644), &["n"])),
                    write(1, 0, b"written by the guest"),
                    request(op::FSYNC, 2, &[1u64.to_le_bytes(), [0; 8]].concat()),
                    release(1),
                    request(op::OPENDIR, root, &[0u8; 8]),
                    request(op::READDIR, 0, &io(2, 0, 4096)),
                    request(op::READDIR, 0, &io(2, 3, 64)),
                    request(
                        op::RELEASEDIR,
                        0,
                        &[2u64.to_le_bytes(), [0; 8], [0; 8]].concat(),
                    ),
                    request(op::STATFS, root, &[]),
                ],
            ),
        ),
        (
            "escape-names",
            seed(
                0,
                &[
                    lookup(root, ".."),
                    lookup(root, "../outside/secret"),
                    lookup(root, "d"),
                    request(op::RENAME, 2, &names(&root.to_le_bytes(), &["b", "../b"])),
                    request(op::RENAME, 2, &names(&root.to_le_bytes(), &["b", "moved"])),
                    request(op::SYMLINK, root, &names(&[], &["s", "/etc/passwd"])),
                    request(op::LINK, root, &names(&2u64.to_le_bytes(), &["dlink"])),
                    request(
                        op::MKDIR,
                        2,
                        &names(&[0xff, 0x0f, 0, 0, 0, 0, 0, 0], &["sub"]),
                    ),
                ],
            ),
        ),
        (
            "symlinks-out",
            seed(
                0,
                &[
                    lookup(root, "up"),
                    open(2, 2 | 0o1000),
                    request(op::READLINK, 2, &[]),
                    lookup(root, "updir"),
                    lookup(3, "secret"),
                    request(op::OPENDIR, 3, &[0u8; 8]),
                    lookup(root, "abs"),
                    request(op::SETATTR, 4, &setattr_in(1 | 8, 0, 0o777)),
                    request(op::LINK, root, &names(&4u64.to_le_bytes(), &["abs2"])),
                    request(op::CREATE, root, &names(&create_in(0o1001, 0o644), &["up"])),
                ],
            ),
        ),
        (
            "setid-and-nodes",
            seed(
                0,
                &[
                    request(op::CREATE, root, &names(&create_in(2, 0o6777), &["x"])),
                    request(
                        op::SETATTR,
                        2,
                        &setattr_in(1 | 8 | 16 | 32 | 128, 1 << 20, 0o4755),
                    ),
                    request(
                        op::MKNOD,
                        root,
                        &names(
                            &[0xb6, 0x21, 0, 0, 3, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                            &["tty"],
                        ),
                    ),
                    lookup(root, "p"),
                    open(3, 0),
                ],
            ),
        ),
        (
            "mkdir-rename-unlink",
            seed(
                0,
                &[
                    request(
                        op::MKDIR,
                        root,
                        &names(&[0xed, 1, 0, 0, 0, 0, 0, 0], &["m"]),
                    ),
                    request(op::RENAME, root, &names(&2u64.to_le_bytes(), &["a", "a2"])),
                    request(op::UNLINK, 2, &names(&[], &["a2"])),
                    request(op::RMDIR, root, &names(&[], &["m"])),
                    request(op::RMDIR, root, &names(&[], &["d"])),
                    request(
                        op::RENAME2,
                        root,
                        &names(
                            &[1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
                            &["d", "e"],
                        ),
                    ),
                ],
            ),
        ),
        (
            "forget",
            seed(
                0,
                &[
                    lookup(root, "a"),
                    lookup(root, "a"),
                    request(op::FORGET, 2, &1u64.to_le_bytes()),
                    request(
                        op::BATCH_FORGET,
                        0,
                        &[
                            u32::MAX.to_le_bytes().to_vec(),
                            vec![0; 4],
                            2u64.to_le_bytes().to_vec(),
                            9u64.to_le_bytes().to_vec(),
                        ]
                        .concat(),
                    ),
                    request(op::GETATTR, 2, &[0u8; 16]),
                    request(op::DESTROY, 0, &[]),
                    lookup(root, "a"),
                ],
            ),
        ),
        (
            "malformed",
            seed(
                0,
                &[
                    vec![0x41; 12],
                    {
                        let mut r = lookup(root, "a");
                        r[..4].copy_from_slice(&u32::MAX.to_le_bytes());
                        r
                    },
                    request(op::WRITE, 0, &io(1, 0, u32::MAX)),
                    request(op::READ, 0, &io(u64::MAX, u64::MAX, u32::MAX)),
                    request(9999, root, &[1, 2, 3]),
                    request(op::LOOKUP, root, b"noterminator"),
                ],
            ),
        ),
        (
            "read-only",
            seed(
                READ_ONLY,
                &[
                    lookup(root, "a"),
                    open(2, 2),
                    request(op::CREATE, root, &names(&create_in(2, 0o644), &["n"])),
                    request(op::SETATTR, 2, &setattr_in(8, 0, 0)),
                    request(op::UNLINK, root, &names(&[], &["a"])),
                ],
            ),
        ),
        (
            "via-queue",
            seed(
                VIA_QUEUE,
                &[
                    request(op::CREATE, root, &names(&create_in(2, 0o600), &["q"])),
                    write(1, 4, b"through the queue"),
                    request(op::READ, 0, &io(1, 0, 64)),
                    release(1),
                ],
            ),
        ),
        ("before-init", seed(NO_INIT, &[lookup(root, "a"), init()])),
    ]
}

/// The committed seeds are exactly what [`seeds`] builds; with
/// `SUPERMACHINE_FUZZ_WRITE_SEEDS=1` they are (re)written instead.
#[test]
fn seed_corpus() {
    fuzz_support::check_seeds("virtio_fs", &seeds());
}
