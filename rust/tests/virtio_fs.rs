//! virtio-fs through its queues, with guest memory and rings written by hand and a real host
//! directory behind it, the guest's side hostile.
//!
//! Most tests step the device's serving pass ([`serve`]) on the test's thread, so every reply
//! can be checked right after its request; the last ones run the device with its own thread
//! through the [`VirtioDevice`] interface.

mod kvm_support;

use kvm_support::kvm_usable;
use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use supermachine_core::devices::virtio::device_thread::ActiveQueues;
use supermachine_core::devices::virtio::fs::device::{
    serve, FDS_WANTED, HIPRIO, QUEUE_SIZE, REQUESTS,
};
use supermachine_core::devices::virtio::fs::protocol::{op, FUSE_ROOT_ID};
use supermachine_core::devices::virtio::fs::server::{MAX_HANDLES, MAX_IO, MAX_REQUEST};
use supermachine_core::devices::virtio::fs::{Fs, Server, VIRTIO_ID_FS};
use supermachine_core::devices::virtio::queue::{Queue, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use supermachine_core::devices::virtio::{Interrupt, VirtioDevice};
use supermachine_core::snapshot::Snapshot;
use supermachine_core::vmm::builder::ErrorClass;
use supermachine_core::vmm::memory::{GuestRam, MemoryBacking};
use supermachine_core::vmm::persist::RestoreOverrides;
use supermachine_core::vmm::{BootSource, DiskConfig, MachineConfig, MountConfig, RawMode, Vmm};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

// Guest memory layout: the request queue's rings, the high-priority queue's rings, then the
// request and reply buffers.
const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x2_0000;
const USED: u64 = 0x3_0000;
const HP_DESC: u64 = 0x4_0000;
const HP_AVAIL: u64 = 0x5_0000;
const HP_USED: u64 = 0x6_0000;
const REQ: u64 = 0x10_0000;
const REPLY: u64 = 0x40_0000;
const RAM_MIB: u64 = 8;

const EINVAL: i32 = libc::EINVAL;

/// A folder to share (`share`) next to one the guest must never reach (`outside`).
struct Dirs {
    base: PathBuf,
    share: PathBuf,
    outside: PathBuf,
}

impl Dirs {
    fn new(name: &str) -> Dirs {
        let base = std::env::temp_dir().join(format!("sm-vfs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let share = base.join("share");
        let outside = base.join("outside");
        std::fs::create_dir_all(&share).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"host secret").unwrap();
        Dirs {
            base,
            share,
            outside,
        }
    }

    /// Everything in `outside`, with contents and modes: it must never change.
    fn outside_listing(&self) -> Vec<(String, Vec<u8>, u32)> {
        let mut out: Vec<_> = std::fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let md = std::fs::symlink_metadata(e.path()).unwrap();
                let data = std::fs::read(e.path()).unwrap_or_default();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    data,
                    md.mode(),
                )
            })
            .collect();
        out.sort();
        out
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// One parsed reply.
#[derive(Debug)]
struct Reply {
    error: i32,
    unique: u64,
    body: Vec<u8>,
}

impl Reply {
    fn ok(&self) -> &[u8] {
        assert_eq!(self.error, 0, "unexpected error {}", -self.error);
        &self.body
    }

    fn errno(&self) -> i32 {
        -self.error
    }

    fn u64_at(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.ok()[at..at + 8].try_into().unwrap())
    }

    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.ok()[at..at + 4].try_into().unwrap())
    }

    /// `fuse_entry_out`: the node id; the attributes' mode and size.
    fn node(&self) -> u64 {
        self.u64_at(0)
    }

    fn entry_mode(&self) -> u32 {
        self.u32_at(40 + 60)
    }

    fn entry_size(&self) -> u64 {
        self.u64_at(40 + 8)
    }
}

/// A guest driver: guest RAM, the two queues as the device sees them, and the rings the test
/// writes by hand.
struct Guest {
    _ram: GuestRam,
    mem: GuestMemoryMmap,
    active: ActiveQueues,
    server: Server,
    /// How many chains this driver has published on the request queue.
    published: u16,
    unique: u64,
}

fn queue(desc: u64, avail: u64, used: u64) -> Queue {
    let mut q = Queue::new(QUEUE_SIZE);
    q.desc_table = desc;
    q.avail_ring = avail;
    q.used_ring = used;
    q.ready = true;
    q
}

fn put_desc(mem: &GuestMemoryMmap, table: u64, i: u16, addr: u64, len: u32, flags: u16) {
    let at = table + 16 * u64::from(i);
    mem.write_obj(addr, GuestAddress(at)).unwrap();
    mem.write_obj(len, GuestAddress(at + 8)).unwrap();
    mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
    mem.write_obj(i + 1, GuestAddress(at + 14)).unwrap();
}

impl Guest {
    fn new(share: &Path, read_only: bool) -> Guest {
        let ram = GuestRam::new(RAM_MIB, &MemoryBacking::Memfd).unwrap();
        let mem = ram.mem.clone();
        let active = ActiveQueues {
            mem: mem.clone(),
            queues: vec![queue(HP_DESC, HP_AVAIL, HP_USED), queue(DESC, AVAIL, USED)],
            interrupt: Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
        };
        for q in &active.queues {
            q.validate(&mem).unwrap();
        }
        Guest {
            _ram: ram,
            mem,
            active,
            server: Server::open(share, read_only).unwrap(),
            published: 0,
            unique: 0,
        }
    }

    /// A mounted share: INIT done.
    fn mounted(share: &Path, read_only: bool) -> Guest {
        let mut g = Guest::new(share, read_only);
        let r = g.call(op::INIT, 0, &init_body(7, 31));
        assert_eq!(r.u32_at(0), 7);
        assert_eq!(r.u32_at(4), 31);
        g
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Publishes the chain `readable` (request buffers as `(addr, len)`) then `writable`
    /// (reply buffers), serves the queues, and returns the used length (`None`: not used).
    fn chain(&mut self, readable: &[(u64, u32)], writable: &[(u64, u32)]) -> Option<u32> {
        let mut i = 0u16;
        for &(addr, len) in readable {
            put_desc(&self.mem, DESC, i, addr, len, VIRTQ_DESC_F_NEXT);
            i += 1;
        }
        for &(addr, len) in writable {
            put_desc(
                &self.mem,
                DESC,
                i,
                addr,
                len,
                VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            );
            i += 1;
        }
        // Clear NEXT on the last descriptor.
        let last = DESC + 16 * u64::from(i - 1) + 12;
        let flags: u16 = self.mem.read_obj(GuestAddress(last)).unwrap();
        self.mem
            .write_obj(flags & !VIRTQ_DESC_F_NEXT, GuestAddress(last))
            .unwrap();
        let slot = u64::from(self.published % QUEUE_SIZE);
        self.mem
            .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        self.published = self.published.wrapping_add(1);
        self.mem
            .write_obj(self.published, GuestAddress(AVAIL + 2))
            .unwrap();
        let before = self.used_idx();
        serve(&mut self.server, &mut self.active);
        if self.used_idx() == before {
            return None;
        }
        let slot = u64::from(before % QUEUE_SIZE);
        Some(
            self.mem
                .read_obj::<u32>(GuestAddress(USED + 4 + 8 * slot + 4))
                .unwrap(),
        )
    }

    /// Sends raw request bytes with `room` bytes for the reply; returns the raw reply.
    fn raw(&mut self, request: &[u8], room: u32) -> Vec<u8> {
        self.mem.write_slice(request, GuestAddress(REQ)).unwrap();
        let readable = if request.is_empty() {
            vec![]
        } else {
            vec![(REQ, request.len() as u32)]
        };
        let writable = if room == 0 {
            vec![]
        } else {
            vec![(REPLY, room)]
        };
        // Poison the reply area so stale bytes cannot pass for a reply.
        self.mem
            .write_slice(&vec![0xa5; room as usize], GuestAddress(REPLY))
            .unwrap();
        let used = self
            .chain(&readable, &writable)
            .expect("the chain was used");
        let mut out = vec![0u8; used as usize];
        self.mem.read_slice(&mut out, GuestAddress(REPLY)).unwrap();
        out
    }

    fn request(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
        self.unique += 1;
        request(opcode, self.unique, nodeid, body)
    }

    /// One request with generous room for the reply, parsed.
    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Reply {
        self.call_room(opcode, nodeid, body, (MAX_IO + 4096) as u32)
    }

    fn call_room(&mut self, opcode: u32, nodeid: u64, body: &[u8], room: u32) -> Reply {
        let req = self.request(opcode, nodeid, body);
        let unique = self.unique;
        let out = self.raw(&req, room);
        let reply = parse_reply(&out);
        assert_eq!(reply.unique, unique, "the reply answers another request");
        reply
    }

    // ---- operations ----

    fn lookup(&mut self, parent: u64, name: &str) -> Reply {
        self.call(op::LOOKUP, parent, &cstr(name))
    }

    fn open(&mut self, node: u64, flags: i32) -> Reply {
        self.call(
            op::OPEN,
            node,
            &[(flags as u32).to_le_bytes(), [0; 4]].concat(),
        )
    }

    fn create(&mut self, parent: u64, name: &str, flags: i32, mode: u32) -> Reply {
        let mut body = Vec::new();
        for v in [flags as u32, mode, 0o022, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.extend_from_slice(&cstr(name));
        self.call(op::CREATE, parent, &body)
    }

    fn read(&mut self, fh: u64, offset: u64, size: u32) -> Reply {
        self.call(op::READ, 0, &io_in(fh, offset, size))
    }

    fn write(&mut self, fh: u64, offset: u64, data: &[u8]) -> Reply {
        let mut body = io_in(fh, offset, data.len() as u32);
        body.extend_from_slice(data);
        self.call(op::WRITE, 0, &body)
    }

    fn release(&mut self, fh: u64) -> Reply {
        self.call(op::RELEASE, 0, &[fh.to_le_bytes(), [0; 8], [0; 8]].concat())
    }

    fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Reply {
        let mut body = [mode.to_le_bytes(), 0o022u32.to_le_bytes()].concat();
        body.extend_from_slice(&cstr(name));
        self.call(op::MKDIR, parent, &body)
    }

    fn setattr(&mut self, node: u64, valid: u32, size: u64, mode: u32) -> Reply {
        let mut body = vec![0u8; 88];
        body[0..4].copy_from_slice(&valid.to_le_bytes());
        body[16..24].copy_from_slice(&size.to_le_bytes());
        body[68..72].copy_from_slice(&mode.to_le_bytes());
        self.call(op::SETATTR, node, &body)
    }

    fn rename(&mut self, olddir: u64, old: &str, newdir: u64, new: &str) -> Reply {
        let mut body = newdir.to_le_bytes().to_vec();
        body.extend_from_slice(&cstr(old));
        body.extend_from_slice(&cstr(new));
        self.call(op::RENAME, olddir, &body)
    }

    fn link(&mut self, old: u64, newdir: u64, name: &str) -> Reply {
        let mut body = old.to_le_bytes().to_vec();
        body.extend_from_slice(&cstr(name));
        self.call(op::LINK, newdir, &body)
    }

    fn symlink(&mut self, parent: u64, name: &str, target: &str) -> Reply {
        let mut body = cstr(name);
        body.extend_from_slice(&cstr(target));
        self.call(op::SYMLINK, parent, &body)
    }

    fn opendir(&mut self, node: u64) -> u64 {
        self.call(op::OPENDIR, node, &[0u8; 8]).u64_at(0)
    }

    /// Every name of directory `node`, reading `size` bytes per request.
    fn list(&mut self, node: u64, size: u32) -> Vec<String> {
        let fh = self.opendir(node);
        let mut names = Vec::new();
        let mut offset = 0;
        for _ in 0..10_000 {
            let r = self.call(op::READDIR, 0, &io_in(fh, offset, size));
            let body = r.ok();
            if body.is_empty() {
                break;
            }
            let mut at = 0;
            while at < body.len() {
                let off = u64::from_le_bytes(body[at + 8..at + 16].try_into().unwrap());
                let len = u32::from_le_bytes(body[at + 16..at + 20].try_into().unwrap()) as usize;
                names.push(String::from_utf8(body[at + 24..at + 24 + len].to_vec()).unwrap());
                offset = off;
                at += (24 + len).next_multiple_of(8);
            }
        }
        self.call(
            op::RELEASEDIR,
            0,
            &[fh.to_le_bytes(), [0; 8], [0; 8]].concat(),
        )
        .ok();
        names.sort();
        names
    }
}

fn cstr(s: &str) -> Vec<u8> {
    CString::new(s).unwrap().into_bytes_with_nul()
}

fn request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(40 + body.len());
    r.extend_from_slice(&((40 + body.len()) as u32).to_le_bytes());
    r.extend_from_slice(&opcode.to_le_bytes());
    r.extend_from_slice(&unique.to_le_bytes());
    r.extend_from_slice(&nodeid.to_le_bytes());
    // SAFETY: getuid and getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    r.extend_from_slice(&uid.to_le_bytes());
    r.extend_from_slice(&gid.to_le_bytes());
    r.extend_from_slice(&1u32.to_le_bytes());
    r.extend_from_slice(&0u32.to_le_bytes());
    r.extend_from_slice(body);
    r
}

fn init_body(major: u32, minor: u32) -> Vec<u8> {
    [major, minor, 128 << 10, 0xffff_ffff]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// `fuse_read_in` / `fuse_write_in`.
fn io_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(40);
    b.extend_from_slice(&fh.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&[0u8; 20]);
    b
}

fn parse_reply(out: &[u8]) -> Reply {
    assert!(out.len() >= 16, "a reply of {} bytes", out.len());
    let len = u32::from_le_bytes(out[0..4].try_into().unwrap()) as usize;
    assert_eq!(len, out.len(), "the reply's length field");
    Reply {
        error: i32::from_le_bytes(out[4..8].try_into().unwrap()),
        unique: u64::from_le_bytes(out[8..16].try_into().unwrap()),
        body: out[16..].to_vec(),
    }
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

// ---- round trips ----------------------------------------------------------------------------

#[test]
fn the_guest_creates_writes_reads_lists_and_removes_files() {
    let d = Dirs::new("roundtrip");
    std::fs::write(d.share.join("hello.txt"), b"hello from the host").unwrap();
    std::fs::create_dir(d.share.join("sub")).unwrap();
    let mut g = Guest::mounted(&d.share, false);

    // Read a host file.
    let e = g.lookup(FUSE_ROOT_ID, "hello.txt");
    let node = e.node();
    assert_eq!(e.entry_size(), 19);
    assert_eq!(e.entry_mode() & libc::S_IFMT, libc::S_IFREG);
    let fh = g.open(node, libc::O_RDONLY).u64_at(0);
    assert_eq!(g.read(fh, 0, 4096).ok(), b"hello from the host");
    assert_eq!(g.read(fh, 6, 4).ok(), b"from");
    assert_eq!(g.read(fh, 100, 4).ok(), b"");
    g.release(fh).ok();
    // The same file looked up twice is one node.
    assert_eq!(g.lookup(FUSE_ROOT_ID, "hello.txt").node(), node);

    // Create and write a file in a subdirectory; the host sees it.
    let sub = g.lookup(FUSE_ROOT_ID, "sub").node();
    let c = g.create(sub, "new.bin", libc::O_RDWR, 0o640);
    let fh = c.u64_at(128);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(g.write(fh, 0, &data).u32_at(0), data.len() as u32);
    assert_eq!(std::fs::read(d.share.join("sub/new.bin")).unwrap(), data);
    assert_eq!(mode_of(&d.share.join("sub/new.bin")), 0o640);
    assert_eq!(g.read(fh, 1000, 16).ok(), &data[1000..1016]);
    let fsync = [fh.to_le_bytes().to_vec(), vec![0u8; 8]].concat();
    g.call(op::FSYNC, c.node(), &fsync).ok();
    g.call(
        op::FLUSH,
        c.node(),
        &[fh.to_le_bytes(), [0; 8], [0; 8]].concat(),
    )
    .ok();
    g.release(fh).ok();

    // Truncate through SETATTR, then GETATTR sees it.
    g.setattr(c.node(), 1 << 3, 10, 0).ok();
    let attr = g.call(op::GETATTR, c.node(), &[0u8; 16]);
    assert_eq!(attr.u64_at(16 + 8), 10);
    assert_eq!(
        std::fs::metadata(d.share.join("sub/new.bin"))
            .unwrap()
            .len(),
        10
    );

    // A directory, a symlink and a hard link inside the share, then a listing.
    let dir = g.mkdir(FUSE_ROOT_ID, "made", 0o755);
    assert_eq!(dir.entry_mode() & libc::S_IFMT, libc::S_IFDIR);
    let link = g.symlink(FUSE_ROOT_ID, "ln", "sub/new.bin");
    assert_eq!(link.entry_mode() & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(
        g.call(op::READLINK, link.node(), &[]).ok(),
        b"sub/new.bin",
        "the target is stored and returned as-is"
    );
    let hard = g.link(c.node(), FUSE_ROOT_ID, "hard.bin");
    assert_eq!(hard.node(), c.node(), "a hard link is the same node");
    assert_eq!(std::fs::read(d.share.join("hard.bin")).unwrap().len(), 10);
    assert_eq!(
        g.list(FUSE_ROOT_ID, 4096),
        [".", "..", "hard.bin", "hello.txt", "ln", "made", "sub"]
    );

    // A listing in small pieces: every name once.
    for i in 0..100 {
        std::fs::write(d.share.join(format!("made/f{i:03}")), b"").unwrap();
    }
    let names = g.list(dir.node(), 200);
    assert_eq!(names.len(), 102);
    assert_eq!(names[2], "f000");

    // Rename inside the share; the node keeps working under its new name.
    g.rename(FUSE_ROOT_ID, "hard.bin", dir.node(), "moved.bin")
        .ok();
    assert!(d.share.join("made/moved.bin").exists());
    let fh = g.open(c.node(), libc::O_RDONLY).u64_at(0);
    assert_eq!(g.read(fh, 0, 100).ok().len(), 10);
    g.release(fh).ok();

    // Unlink and rmdir.
    g.call(op::UNLINK, FUSE_ROOT_ID, &cstr("ln")).ok();
    g.call(op::UNLINK, dir.node(), &cstr("moved.bin")).ok();
    for i in 0..100 {
        g.call(op::UNLINK, dir.node(), &cstr(&format!("f{i:03}")))
            .ok();
    }
    g.call(op::RMDIR, FUSE_ROOT_ID, &cstr("made")).ok();
    assert!(!d.share.join("made").exists());
    assert_eq!(
        g.call(op::RMDIR, FUSE_ROOT_ID, &cstr("sub")).errno(),
        libc::ENOTEMPTY
    );

    // STATFS and ACCESS answer; an unknown operation is ENOSYS.
    assert_eq!(g.call(op::STATFS, FUSE_ROOT_ID, &[]).ok().len(), 80);
    g.call(
        op::ACCESS,
        FUSE_ROOT_ID,
        &[libc::R_OK as u8, 0, 0, 0, 0, 0, 0, 0],
    )
    .ok();
    assert_eq!(g.call(9999, FUSE_ROOT_ID, &[]).errno(), libc::ENOSYS);
    assert_eq!(
        g.call(22 /* GETXATTR */, node, &[0; 8]).errno(),
        libc::ENOSYS
    );
    assert_eq!(d.outside_listing().len(), 1);
}

#[test]
fn forgotten_nodes_are_dropped_and_destroy_ends_the_session() {
    let d = Dirs::new("forget");
    std::fs::write(d.share.join("a"), b"a").unwrap();
    std::fs::write(d.share.join("b"), b"b").unwrap();
    let mut g = Guest::mounted(&d.share, false);
    let session = g.server.session_flag();
    assert!(session.load(Ordering::Acquire), "INIT opened a session");
    let a = g.lookup(FUSE_ROOT_ID, "a").node();
    g.lookup(FUSE_ROOT_ID, "a");
    let b = g.lookup(FUSE_ROOT_ID, "b").node();
    assert_eq!(g.server.counts().0, 3);
    // FORGET has no reply: the chain comes back with nothing written.
    let req = g.request(op::FORGET, a, &1u64.to_le_bytes());
    g.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    assert_eq!(g.chain(&[(REQ, req.len() as u32)], &[]), Some(0));
    assert_eq!(g.server.counts().0, 3, "a was looked up twice");
    // BATCH_FORGET claiming far more entries than it holds: only the real ones count.
    let mut body = [u32::MAX.to_le_bytes(), [0; 4]].concat();
    for (node, n) in [(a, 1u64), (b, 5)] {
        body.extend_from_slice(&node.to_le_bytes());
        body.extend_from_slice(&n.to_le_bytes());
    }
    let req = g.request(op::BATCH_FORGET, 0, &body);
    g.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    assert_eq!(g.chain(&[(REQ, req.len() as u32)], &[]), Some(0));
    assert_eq!(g.server.counts().0, 1, "only the root is left");
    assert_eq!(
        g.call(op::GETATTR, a, &[0u8; 16]).errno(),
        libc::ESTALE,
        "a forgotten node id is stale"
    );
    // The root cannot be forgotten.
    let req = g.request(op::FORGET, FUSE_ROOT_ID, &100u64.to_le_bytes());
    g.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    assert_eq!(g.chain(&[(REQ, req.len() as u32)], &[(REPLY, 64)]), Some(0));
    g.call(op::GETATTR, FUSE_ROOT_ID, &[0u8; 16]).ok();
    // DESTROY drops every handle; the server wants INIT again.
    let e = g.lookup(FUSE_ROOT_ID, "a");
    let fh = g.open(e.node(), libc::O_RDONLY).u64_at(0);
    g.call(op::DESTROY, 0, &[]).ok();
    assert_eq!(g.server.counts(), (1, 0));
    assert!(
        !session.load(Ordering::Acquire),
        "DESTROY ended the session"
    );
    assert_eq!(g.read(fh, 0, 1).errno(), libc::EIO);
    g.call(op::INIT, 0, &init_body(7, 38)).ok();
    assert!(session.load(Ordering::Acquire));
    assert_eq!(g.read(fh, 0, 1).errno(), libc::EBADF);
}

// ---- read-only ------------------------------------------------------------------------------

#[test]
fn a_read_only_share_refuses_every_write_with_erofs() {
    let d = Dirs::new("ro");
    std::fs::write(d.share.join("f"), b"data").unwrap();
    std::fs::create_dir(d.share.join("dir")).unwrap();
    let before = std::fs::read_dir(&d.share).unwrap().count();
    let mut g = Guest::mounted(&d.share, true);
    let f = g.lookup(FUSE_ROOT_ID, "f").node();
    let erofs = libc::EROFS;
    assert_eq!(g.open(f, libc::O_WRONLY).errno(), erofs);
    assert_eq!(g.open(f, libc::O_RDWR).errno(), erofs);
    assert_eq!(g.open(f, libc::O_RDONLY | libc::O_TRUNC).errno(), erofs);
    assert_eq!(
        g.create(FUSE_ROOT_ID, "new", libc::O_WRONLY, 0o644).errno(),
        erofs
    );
    assert_eq!(g.mkdir(FUSE_ROOT_ID, "d2", 0o755).errno(), erofs);
    assert_eq!(g.symlink(FUSE_ROOT_ID, "l", "f").errno(), erofs);
    assert_eq!(g.link(f, FUSE_ROOT_ID, "f2").errno(), erofs);
    assert_eq!(
        g.rename(FUSE_ROOT_ID, "f", FUSE_ROOT_ID, "g").errno(),
        erofs
    );
    assert_eq!(g.call(op::UNLINK, FUSE_ROOT_ID, &cstr("f")).errno(), erofs);
    assert_eq!(g.call(op::RMDIR, FUSE_ROOT_ID, &cstr("dir")).errno(), erofs);
    let mknod = [
        [0o10644u32.to_le_bytes(), [0; 4], [0; 4], [0; 4]].concat(),
        cstr("p"),
    ]
    .concat();
    assert_eq!(g.call(op::MKNOD, FUSE_ROOT_ID, &mknod).errno(), erofs);
    for valid in [1u32, 2, 4, 8, 16, 32, 128, 256] {
        assert_eq!(
            g.setattr(f, valid, 0, 0o777).errno(),
            erofs,
            "setattr {valid:#x}"
        );
    }
    let w_ok = [libc::W_OK as u8, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(g.call(op::ACCESS, f, &w_ok).errno(), erofs);
    // Reads still work, and a write on a read handle is refused too.
    let fh = g.open(f, libc::O_RDONLY).u64_at(0);
    assert_eq!(g.read(fh, 0, 10).ok(), b"data");
    assert_eq!(g.write(fh, 0, b"x").errno(), erofs);
    assert_eq!(std::fs::read(d.share.join("f")).unwrap(), b"data");
    assert_eq!(std::fs::read_dir(&d.share).unwrap().count(), before);
    assert_eq!(mode_of(&d.share.join("f")), 0o644);
}

// ---- escapes --------------------------------------------------------------------------------

#[test]
fn names_that_leave_the_share_are_refused() {
    let d = Dirs::new("names");
    std::fs::create_dir(d.share.join("sub")).unwrap();
    let mut g = Guest::mounted(&d.share, false);
    let sub = g.lookup(FUSE_ROOT_ID, "sub").node();
    for bad in ["..", ".", "", "../outside", "sub/..", "/etc", "a/b"] {
        assert_eq!(
            g.lookup(FUSE_ROOT_ID, bad).errno(),
            EINVAL,
            "lookup {bad:?}"
        );
        assert_eq!(g.lookup(sub, bad).errno(), EINVAL, "lookup {bad:?} in sub");
        assert_eq!(
            g.create(sub, bad, libc::O_WRONLY, 0o644).errno(),
            EINVAL,
            "create {bad:?}"
        );
        assert_eq!(g.mkdir(sub, bad, 0o755).errno(), EINVAL, "mkdir {bad:?}");
        assert_eq!(g.symlink(sub, bad, "x").errno(), EINVAL, "symlink {bad:?}");
    }
    let long = "x".repeat(256);
    assert_eq!(g.lookup(FUSE_ROOT_ID, &long).errno(), libc::ENAMETOOLONG);
    // Rename out of the share: every name is one component in a directory node.
    std::fs::write(d.share.join("sub/f"), b"f").unwrap();
    for bad in ["../f", "..", "../outside/f", "/tmp/f"] {
        assert_eq!(
            g.rename(sub, "f", FUSE_ROOT_ID, bad).errno(),
            EINVAL,
            "{bad:?}"
        );
    }
    assert_eq!(
        g.rename(sub, "f", 0xdead, "f").errno(),
        libc::ESTALE,
        "an unknown directory node"
    );
    // A node that is not a directory is no parent.
    let f = g.lookup(sub, "f").node();
    assert_eq!(g.lookup(f, "x").errno(), libc::ENOTDIR);
    assert_eq!(
        g.create(f, "x", libc::O_WRONLY, 0o644).errno(),
        libc::ENOTDIR
    );
    assert!(d.share.join("sub/f").exists());
    assert_eq!(d.outside_listing().len(), 1);
}

#[test]
fn symlinks_are_never_followed_on_the_host() {
    let d = Dirs::new("symlinks");
    let secret = d.outside.join("secret");
    std::os::unix::fs::symlink(&secret, d.share.join("abs")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", d.share.join("rel")).unwrap();
    std::os::unix::fs::symlink("../outside", d.share.join("dirlink")).unwrap();
    std::os::unix::fs::symlink("/", d.share.join("slash")).unwrap();
    let before = d.outside_listing();
    let mut g = Guest::mounted(&d.share, false);
    for name in ["abs", "rel", "dirlink", "slash"] {
        // The link itself is visible (the guest resolves it, inside its own mount)...
        let e = g.lookup(FUSE_ROOT_ID, name);
        assert_eq!(e.entry_mode() & libc::S_IFMT, libc::S_IFLNK, "{name}");
        let target = g.call(op::READLINK, e.node(), &[]);
        assert!(!target.ok().is_empty());
        // ...but nothing is reached through it on the host.
        for flags in [libc::O_RDONLY, libc::O_WRONLY | libc::O_TRUNC, libc::O_RDWR] {
            assert_eq!(g.open(e.node(), flags).errno(), libc::ELOOP, "open {name}");
        }
        assert_eq!(g.lookup(e.node(), "secret").errno(), libc::ENOTDIR);
        assert_eq!(
            g.call(op::OPENDIR, e.node(), &[0u8; 8]).errno(),
            libc::ENOTDIR
        );
        assert_eq!(
            g.setattr(e.node(), 1, 0, 0o777).errno(),
            libc::EOPNOTSUPP,
            "chmod {name}"
        );
        assert_eq!(
            g.setattr(e.node(), 8, 0, 0).errno(),
            libc::ELOOP,
            "truncate {name}"
        );
        // Creating over the link does not write through it.
        assert_eq!(
            g.create(FUSE_ROOT_ID, name, libc::O_WRONLY | libc::O_TRUNC, 0o644)
                .errno(),
            libc::ELOOP,
            "create over {name}"
        );
    }
    assert_eq!(
        g.create(FUSE_ROOT_ID, "abs", libc::O_WRONLY | libc::O_EXCL, 0o644)
            .errno(),
        libc::EEXIST
    );
    // A hard link of the link is a link to the link, inside the share.
    let abs = g.lookup(FUSE_ROOT_ID, "abs").node();
    g.link(abs, FUSE_ROOT_ID, "abs2").ok();
    assert!(std::fs::symlink_metadata(d.share.join("abs2"))
        .unwrap()
        .file_type()
        .is_symlink());
    // A symlink made by the guest is stored as-is, never resolved by the host.
    let made = g.symlink(FUSE_ROOT_ID, "escape", "/etc/passwd");
    assert_eq!(
        std::fs::read_link(d.share.join("escape")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(g.open(made.node(), libc::O_RDONLY).errno(), libc::ELOOP);
    assert_eq!(d.outside_listing(), before);
}

#[test]
fn hard_links_and_renames_cannot_reach_outside() {
    let d = Dirs::new("links");
    std::fs::write(d.share.join("inside"), b"in").unwrap();
    let before = d.outside_listing();
    let mut g = Guest::mounted(&d.share, false);
    // The guest can only name nodes it reached beneath the root: an id it made up is stale.
    for bogus in [0u64, 2, 3, 0xffff, u64::MAX] {
        assert_eq!(
            g.link(bogus, FUSE_ROOT_ID, "x").errno(),
            libc::ESTALE,
            "{bogus}"
        );
        assert_eq!(g.open(bogus, libc::O_RDONLY).errno(), libc::ESTALE);
        assert_eq!(g.call(op::GETATTR, bogus, &[0u8; 16]).errno(), libc::ESTALE);
    }
    // The root cannot be linked, renamed or removed through a name.
    assert_eq!(
        g.link(FUSE_ROOT_ID, FUSE_ROOT_ID, "root2").errno(),
        libc::EPERM
    );
    // Directories cannot be hard-linked.
    g.mkdir(FUSE_ROOT_ID, "d", 0o755).ok();
    let dnode = g.lookup(FUSE_ROOT_ID, "d").node();
    assert_eq!(g.link(dnode, FUSE_ROOT_ID, "d2").errno(), libc::EPERM);
    // A file the host moved out of the share meanwhile is not linked back in or opened.
    let inside = g.lookup(FUSE_ROOT_ID, "inside").node();
    std::fs::rename(d.share.join("inside"), d.outside.join("moved")).unwrap();
    assert_eq!(g.link(inside, FUSE_ROOT_ID, "back").errno(), libc::ENOENT);
    assert_eq!(g.open(inside, libc::O_RDONLY).errno(), libc::ENOENT);
    assert!(!d.share.join("back").exists());
    // And a different file put in its place is not taken for it.
    std::fs::write(d.share.join("inside"), b"other").unwrap();
    assert_eq!(g.open(inside, libc::O_RDONLY).errno(), libc::ESTALE);
    assert_eq!(g.link(inside, FUSE_ROOT_ID, "back").errno(), libc::ESTALE);
    std::fs::rename(d.outside.join("moved"), d.share.join("x")).unwrap();
    std::fs::remove_file(d.share.join("x")).unwrap();
    assert_eq!(d.outside_listing(), before);
}

#[test]
fn device_nodes_are_not_made_and_setuid_bits_are_stripped() {
    let d = Dirs::new("modes");
    let mut g = Guest::mounted(&d.share, false);
    // MKNOD of any kind: refused, nothing created.
    for mode in [
        libc::S_IFCHR | 0o666,
        libc::S_IFBLK | 0o666,
        libc::S_IFIFO | 0o644,
        libc::S_IFSOCK | 0o644,
        libc::S_IFREG | 0o644,
    ] {
        let body = [
            [mode.to_le_bytes(), 0x0103u32.to_le_bytes(), [0; 4], [0; 4]].concat(),
            cstr("node"),
        ]
        .concat();
        assert_eq!(
            g.call(op::MKNOD, FUSE_ROOT_ID, &body).errno(),
            libc::EPERM,
            "{mode:o}"
        );
        assert!(std::fs::symlink_metadata(d.share.join("node")).is_err());
    }
    // Set-user-ID, set-group-ID (and sticky on files) are dropped on create, mkdir, chmod.
    let c = g.create(FUSE_ROOT_ID, "suid", libc::O_WRONLY, 0o6755);
    assert_eq!(mode_of(&d.share.join("suid")), 0o755);
    assert_eq!(c.entry_mode() & 0o7777, 0o755);
    g.release(c.u64_at(128)).ok();
    let r = g.setattr(c.node(), 1, 0, 0o4777);
    assert_eq!(mode_of(&d.share.join("suid")), 0o777);
    assert_eq!(r.u32_at(16 + 60) & 0o7777, 0o777);
    g.setattr(c.node(), 1, 0, 0o2750).ok();
    assert_eq!(mode_of(&d.share.join("suid")), 0o750);
    g.mkdir(FUSE_ROOT_ID, "sgid", 0o3775).ok();
    assert_eq!(mode_of(&d.share.join("sgid")), 0o1775);
    // A set-user-ID file the host put there is shown without the bit.
    std::fs::write(d.share.join("host-suid"), b"").unwrap();
    std::fs::set_permissions(
        d.share.join("host-suid"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    assert_eq!(
        g.lookup(FUSE_ROOT_ID, "host-suid").entry_mode() & 0o7777,
        0o755
    );
    // A FIFO the host put there is visible but not opened (it could block the server).
    let fifo = CString::new(d.share.join("fifo").to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
    let f = g.lookup(FUSE_ROOT_ID, "fifo").node();
    assert_eq!(g.open(f, libc::O_RDONLY).errno(), libc::EACCES);
    assert_eq!(g.open(f, libc::O_WRONLY).errno(), libc::EACCES);
}

// ---- malformed requests ---------------------------------------------------------------------

#[test]
fn malformed_requests_are_answered_with_errors() {
    let d = Dirs::new("malformed");
    std::fs::write(d.share.join("f"), b"0123456789").unwrap();
    let mut g = Guest::new(&d.share, false);
    // Before INIT everything but INIT is refused.
    assert_eq!(g.lookup(FUSE_ROOT_ID, "f").errno(), libc::EIO);
    // A protocol we do not speak.
    assert_eq!(g.call(op::INIT, 0, &init_body(8, 31)).errno(), libc::EPROTO);
    assert_eq!(g.call(op::INIT, 0, &init_body(7, 5)).errno(), libc::EPROTO);
    assert_eq!(g.call(op::INIT, 0, &[7, 0, 0, 0]).errno(), EINVAL);
    g.call(op::INIT, 0, &init_body(7, 36)).ok();

    // Shorter than a header: an error reply, with no request id to give.
    for n in [0usize, 1, 16, 39] {
        let req = vec![0x41u8; n];
        let out = if n == 0 {
            // No readable buffer at all.
            g.mem.write_slice(&[0u8; 16], GuestAddress(REPLY)).unwrap();
            let used = g.chain(&[], &[(REPLY, 64)]).unwrap();
            let mut out = vec![0u8; used as usize];
            g.mem.read_slice(&mut out, GuestAddress(REPLY)).unwrap();
            out
        } else {
            g.raw(&req, 64)
        };
        let r = parse_reply(&out);
        assert_eq!((r.errno(), r.unique), (EINVAL, 0), "{n} bytes");
    }
    // The header's length lies (longer, shorter, zero, huge).
    for len in [0u32, 39, 40, 41, 1 << 20, u32::MAX] {
        let mut req = g.request(op::LOOKUP, FUSE_ROOT_ID, &cstr("f"));
        req[..4].copy_from_slice(&len.to_le_bytes());
        let r = parse_reply(&g.raw(&req, 256));
        assert_eq!(r.errno(), EINVAL, "length {len}");
    }
    // Bodies too short for their operation.
    for opcode in [
        op::LOOKUP,
        op::SETATTR,
        op::OPEN,
        op::READ,
        op::WRITE,
        op::CREATE,
        op::MKDIR,
        op::RENAME,
        op::RENAME2,
        op::LINK,
        op::READDIR,
        op::RELEASE,
        op::FSYNC,
        op::ACCESS,
        op::SYMLINK,
    ] {
        assert_eq!(
            g.call(opcode, FUSE_ROOT_ID, &[1, 2, 3]).errno(),
            EINVAL,
            "op {opcode}"
        );
    }
    // A name without its NUL, or running past the body.
    assert_eq!(g.call(op::LOOKUP, FUSE_ROOT_ID, b"f").errno(), EINVAL);
    assert_eq!(
        g.call(op::LOOKUP, FUSE_ROOT_ID, &[b'a'; 300]).errno(),
        libc::ENAMETOOLONG
    );
    // A write whose size field lies about its data.
    let f = g.lookup(FUSE_ROOT_ID, "f").node();
    let fh = g.open(f, libc::O_RDWR).u64_at(0);
    for claimed in [0u32, 3, 5, u32::MAX] {
        let mut body = io_in(fh, 0, claimed);
        body.extend_from_slice(b"abcd");
        assert_eq!(
            g.call(op::WRITE, 0, &body).errno(),
            EINVAL,
            "size {claimed}"
        );
    }
    assert_eq!(std::fs::read(d.share.join("f")).unwrap(), b"0123456789");
    // Huge reads are bounded by the room the guest gave and by MAX_IO.
    let r = g.call_room(op::READ, 0, &io_in(fh, 0, u32::MAX), 16 + 4);
    assert_eq!(r.ok(), b"0123");
    let r = g.call_room(op::READ, 0, &io_in(fh, 2, u32::MAX), 64);
    assert_eq!(r.ok(), b"23456789");
    // Unknown, closed and wrong-kind handles.
    for bad in [0u64, fh + 1, u64::MAX] {
        assert_eq!(g.read(bad, 0, 1).errno(), libc::EBADF);
        assert_eq!(g.write(bad, 0, b"x").errno(), libc::EBADF);
    }
    let dfh = g.opendir(FUSE_ROOT_ID);
    assert_eq!(g.read(dfh, 0, 1).errno(), libc::EISDIR);
    assert_eq!(
        g.call(op::READDIR, 0, &io_in(fh, 0, 4096)).errno(),
        libc::ENOTDIR
    );
    // RENAME2 with flags.
    let mut body = FUSE_ROOT_ID.to_le_bytes().to_vec();
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&[0; 4]);
    body.extend_from_slice(&cstr("f"));
    body.extend_from_slice(&cstr("g"));
    assert_eq!(g.call(op::RENAME2, FUSE_ROOT_ID, &body).errno(), EINVAL);
    // A reply that does not fit the guest's room is an error; no room at all, nothing.
    let r = g.call_room(op::LOOKUP, FUSE_ROOT_ID, &cstr("f"), 64);
    assert_eq!(r.errno(), libc::ERANGE);
    let req = g.request(op::GETATTR, FUSE_ROOT_ID, &[0u8; 16]);
    g.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    assert_eq!(g.chain(&[(REQ, req.len() as u32)], &[(REPLY, 8)]), Some(0));
    // More request than MAX_REQUEST: refused from the header alone, with its id.
    let req = g.request(op::WRITE, 0, &io_in(fh, 0, 0));
    let unique = g.unique;
    g.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    let big = (MAX_REQUEST + 1 - req.len()) as u32;
    let used = g
        .chain(&[(REQ, req.len() as u32), (REQ, big)], &[(REPLY, 64)])
        .unwrap();
    let mut out = vec![0u8; used as usize];
    g.mem.read_slice(&mut out, GuestAddress(REPLY)).unwrap();
    let r = parse_reply(&out);
    assert_eq!((r.errno(), r.unique), (libc::E2BIG, unique));
    assert!(!g.active.interrupt.needs_reset());
    // A buffer outside guest RAM breaks the protocol: the device needs a reset.
    let req = g.request(op::GETATTR, FUSE_ROOT_ID, &[0u8; 16]);
    g.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    g.chain(&[(REQ, req.len() as u32)], &[(RAM_MIB << 20, 64)]);
    assert!(g.active.interrupt.needs_reset());
}

#[test]
fn open_handles_and_nodes_are_bounded() {
    let d = Dirs::new("limits");
    std::fs::write(d.share.join("f"), b"f").unwrap();
    let mut g = Guest::mounted(&d.share, false);
    let f = g.lookup(FUSE_ROOT_ID, "f").node();
    let mut handles = Vec::new();
    for _ in 0..MAX_HANDLES {
        handles.push(g.open(f, libc::O_RDONLY).u64_at(0));
    }
    assert_eq!(g.open(f, libc::O_RDONLY).errno(), libc::ENFILE);
    assert_eq!(
        g.call(op::OPENDIR, FUSE_ROOT_ID, &[0u8; 8]).errno(),
        libc::ENFILE
    );
    assert_eq!(
        g.create(FUSE_ROOT_ID, "n", libc::O_WRONLY, 0o644).errno(),
        libc::ENFILE
    );
    g.release(handles[0]).ok();
    g.open(f, libc::O_RDONLY).ok();
    assert_eq!(g.server.counts().1, MAX_HANDLES);
}

// ---- the device with its thread -------------------------------------------------------------

#[test]
fn the_device_serves_its_queues_on_its_own_thread() {
    let d = Dirs::new("thread");
    std::fs::write(d.share.join("f"), b"via the thread").unwrap();
    let mut before = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut before) },
        0
    );
    let mut dev = Fs::new(&d.share, "hostshare", false).unwrap();
    let mut after = before;
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut after) },
        0
    );
    assert!(
        after.rlim_cur >= before.rlim_max.min(before.rlim_cur + FDS_WANTED),
        "the soft limit of open files was not raised: {} -> {}",
        before.rlim_cur,
        after.rlim_cur
    );
    assert_eq!(dev.device_type(), VIRTIO_ID_FS);
    assert_eq!(dev.queue_max_sizes(), vec![QUEUE_SIZE; 2]);
    assert_eq!(dev.config_len(), 40);
    let mut cfg = [0u8; 40];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..10], b"hostshare\0");
    assert_eq!(u32::from_le_bytes(cfg[36..].try_into().unwrap()), 1);
    let mut one = [0u8; 1];
    dev.read_config(36, &mut one);
    assert_eq!(one, [1]);

    // A guest whose queues the device thread owns; the test only writes rings and waits.
    let ram = GuestRam::new(RAM_MIB, &MemoryBacking::Memfd).unwrap();
    let mem = ram.mem.clone();
    let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
    dev.activate(
        mem.clone(),
        vec![queue(HP_DESC, HP_AVAIL, HP_USED), queue(DESC, AVAIL, USED)],
        irq.clone(),
    )
    .unwrap();
    let call = |dev: &mut Box<Fs>, opcode: u32, nodeid: u64, body: &[u8], n: u16| -> Reply {
        let req = request(opcode, u64::from(n) + 100, nodeid, body);
        mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        put_desc(&mem, DESC, 0, REQ, req.len() as u32, VIRTQ_DESC_F_NEXT);
        put_desc(&mem, DESC, 1, REPLY, 4096, VIRTQ_DESC_F_WRITE);
        mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(n)))
            .unwrap();
        mem.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
        dev.notify(REQUESTS as u16);
        let deadline = Instant::now() + Duration::from_secs(10);
        while mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != n + 1 {
            assert!(
                Instant::now() < deadline,
                "the device thread did not answer"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let len: u32 = mem
            .read_obj(GuestAddress(USED + 4 + 8 * u64::from(n) + 4))
            .unwrap();
        let mut out = vec![0u8; len as usize];
        mem.read_slice(&mut out, GuestAddress(REPLY)).unwrap();
        parse_reply(&out)
    };
    assert_eq!(dev.snapshot_refusal(), None, "nothing is mounted yet");
    call(&mut dev, op::INIT, 0, &init_body(7, 31), 0).ok();
    assert_eq!(
        dev.snapshot_refusal().as_deref(),
        Some("the guest has the shared folder tagged \"hostshare\" mounted")
    );
    let node = call(&mut dev, op::LOOKUP, FUSE_ROOT_ID, &cstr("f"), 1).node();
    let fh = call(&mut dev, op::OPEN, node, &[0u8; 8], 2).u64_at(0);
    assert_eq!(
        call(&mut dev, op::READ, 0, &io_in(fh, 4, 6), 3).ok(),
        b"the th"
    );
    assert_ne!(irq.status() & 1, 0, "the used ring was signalled");
    // A reset ends the session, even when the driver activates again at once: the new
    // session starts uninitialised, with no handle of the old one.
    dev.reset();
    for ring in [AVAIL + 2, USED + 2] {
        mem.write_obj(0u16, GuestAddress(ring)).unwrap();
    }
    dev.activate(
        mem.clone(),
        vec![queue(HP_DESC, HP_AVAIL, HP_USED), queue(DESC, AVAIL, USED)],
        irq.clone(),
    )
    .unwrap();
    let r = call(&mut dev, op::READ, 0, &io_in(fh, 0, 1), 0);
    assert_eq!(
        r.errno(),
        libc::EIO,
        "the old session goes on after a reset"
    );
    assert_eq!(dev.snapshot_refusal(), None, "a reset ended the session");
    call(&mut dev, op::INIT, 0, &init_body(7, 31), 1).ok();
    let r = call(&mut dev, op::READ, 0, &io_in(fh, 0, 1), 2);
    assert_eq!(r.errno(), libc::EBADF, "a handle of the old session");
    dev.shutdown();
    let _ = HIPRIO;
}

#[test]
fn a_shared_folder_that_is_missing_or_not_a_folder_is_refused_with_a_sentence() {
    let d = Dirs::new("missing");
    let missing = d.base.join("nope");
    let err = Fs::new(&missing, "t", false).err().unwrap();
    assert_eq!(
        err.to_string(),
        format!("the shared folder {} does not exist", missing.display())
    );
    std::fs::write(d.base.join("file"), b"").unwrap();
    let err = Fs::new(&d.base.join("file"), "t", false).err().unwrap();
    assert!(err.to_string().contains("is not a directory"), "{err}");
    for tag in ["", "a\0b", &"t".repeat(37), "a/b", "a b", "é"] {
        let err = Fs::new(&d.share, tag, false).err().unwrap();
        assert!(
            err.to_string().contains("must be 1 to 36 ASCII letters"),
            "{err}"
        );
    }
    Fs::new(&d.share, &"Az09._-".repeat(5), true).unwrap();
}

// ---- in a VM --------------------------------------------------------------------------------

/// A raw real-mode guest that spins, with `mounts`.
fn vm_config(d: &Dirs, mounts: Vec<MountConfig>) -> MachineConfig {
    // jmp $
    std::fs::write(d.base.join("guest.bin"), [0xeb, 0xfe]).unwrap();
    let mut cfg = MachineConfig::new(BootSource::Raw {
        path: d.base.join("guest.bin"),
        load_addr: 0x7c00,
        mode: RawMode::Real,
    });
    cfg.memory_mib = 16;
    cfg.mounts = mounts;
    cfg
}

fn mount(dir: &Path, tag: &str, read_only: bool) -> MountConfig {
    MountConfig {
        host_dir: dir.to_path_buf(),
        tag: tag.into(),
        read_only,
    }
}

#[test]
fn a_vm_places_its_shared_folders_last_and_a_restore_shares_the_folders_its_caller_names() {
    if !kvm_usable() {
        return;
    }
    let d = Dirs::new("vm");
    let disk = d.base.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut cfg = vm_config(
        &d,
        vec![
            mount(&d.share, "work", false),
            mount(&d.outside, "ro", true),
        ],
    );
    let blk = DiskConfig {
        path: disk,
        read_only: false,
        rate_limit: None,
    };
    cfg.disks.push(blk.clone());
    let vmm = Vmm::start(&cfg).unwrap();
    let kinds: Vec<_> = vmm
        .devices()
        .iter()
        .map(|i| (i.kind, i.read_only))
        .collect();
    assert_eq!(kinds, [("blk", false), ("fs", false), ("fs", true)]);
    assert_eq!(vmm.devices()[1].path, d.share);
    // Nothing has the folders mounted (the guest never mounted them): a snapshot may be taken,
    // and records the folders' read-only flags, never their paths.
    let snap = d.base.join("snap");
    vmm.snapshot(&snap, None).unwrap();
    vmm.stop();
    assert_eq!(Snapshot::load(&snap).unwrap().machine.shares, [false, true]);
    let state = std::fs::read(snap.join("vmstate.bin")).unwrap();
    let share_path = d.share.as_os_str().as_encoded_bytes();
    assert!(!state.windows(share_path.len()).any(|w| w == share_path));
    let (other, other_ro) = (d.base.join("other"), d.base.join("other-ro"));
    std::fs::create_dir(&other).unwrap();
    std::fs::create_dir(&other_ro).unwrap();
    let restore = |mounts: Vec<MountConfig>| {
        let overrides = RestoreOverrides {
            disks: vec![blk.clone()],
            mounts,
            ..Default::default()
        };
        Vmm::restore(&snap, &overrides)
    };
    let e = restore(vec![mount(&other, "work", false)]).err().unwrap();
    assert_eq!(
        e.to_string(),
        "invalid configuration: the snapshot has 2 shared folders but 1 were given (a restore \
         shares only the folders its caller names)"
    );
    // The caller's folders are shared; one the snapshot had read-only stays read-only.
    let clone = restore(vec![
        mount(&other, "work", false),
        mount(&other_ro, "ro", false),
    ])
    .unwrap();
    let shared: Vec<_> = clone
        .devices()
        .iter()
        .map(|i| (i.kind, i.path.clone(), i.read_only))
        .collect();
    assert_eq!(shared[1..], [("fs", other, false), ("fs", other_ro, true)]);
    assert!(clone.outcome().is_none(), "the clone runs");
    clone.stop();
}

#[test]
fn shared_folder_configurations_are_checked_before_anything_starts() {
    if !kvm_usable() {
        return;
    }
    let d = Dirs::new("vmcfg");
    let start = |mounts: Vec<MountConfig>| Vmm::start(&vm_config(&d, mounts)).err().unwrap();
    let e = start(vec![
        mount(&d.share, "t", false),
        mount(&d.outside, "t", true),
    ]);
    assert_eq!(
        e.to_string(),
        "invalid configuration: two shared folders have the tag \"t\""
    );
    for tag in ["x".repeat(37), "a/b".into(), String::new()] {
        let e = start(vec![mount(&d.share, &tag, false)]);
        assert!(
            e.to_string().contains("must be 1 to 36 ASCII letters"),
            "{e}"
        );
    }
    let e = start(vec![mount(&d.base.join("missing"), "m", false)]);
    assert_eq!(e.class(), ErrorClass::NotFound, "{e}");
    // Shared folders count against the virtio device slots.
    let many = (0..20)
        .map(|i| mount(&d.share, &format!("t{i}"), true))
        .collect();
    let e = start(many);
    assert!(e.to_string().contains("at most 19 virtio devices"), "{e}");
}
