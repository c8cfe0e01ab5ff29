//! The FUSE passthrough server: answers the guest's requests on one host directory.
//!
//! # Confinement
//!
//! The shared directory is opened once (an `O_PATH` descriptor); everything else is reached
//! from it one checked name at a time ([`protocol::check_name`]: no `/`, `.`, `..` or empty
//! name) with openat2(2) and `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
//! RESOLVE_NO_XDEV` ([`sys::open_beneath`]). So:
//!
//! * the guest can only name objects beneath the share: a node id is an `O_PATH` descriptor
//!   the server opened that way, and every new name is one component in such a directory;
//! * symbolic links are never followed on the host: a lookup returns the link itself, which
//!   the guest may read (its target is stored and returned as-is) and resolves on its own,
//!   one name at a time, through the server again; opening a link is refused (`ELOOP`);
//! * mount points inside the share are not crossed (`EXDEV`);
//! * hard links, renames and creations take a directory node and a name, so they stay in the
//!   share; a hard link's source is a node the guest already reached beneath the root;
//! * no device node, FIFO or socket is created (`MKNOD` is refused) or opened (only regular
//!   files and directories are); set-user-ID and set-group-ID bits are stripped from the modes
//!   of `CREATE`, `MKDIR` and `SETATTR` and hidden in the attributes the guest sees;
//! * a read-only share refuses every operation that would change it with `EROFS`.
//!
//! Opening a file for I/O needs a real descriptor, and without `/proc` (the worker has none)
//! an `O_PATH` descriptor cannot be reopened: each node remembers the directory and name it
//! was last reached by, opens that name again beneath the directory, and checks that the
//! device and inode numbers are still the node's (`ESTALE` when the host moved it meanwhile).
//!
//! # Bounds
//!
//! Requests are at most [`MAX_REQUEST`] bytes (the device refuses larger ones), reads and
//! writes at most [`MAX_IO`] bytes, directory listings [`MAX_READDIR`] bytes per request, and
//! the server holds at most [`MAX_INODES`] nodes and [`MAX_HANDLES`] open files (`ENFILE`
//! beyond). Every reply fits in the room the guest gave, or is an error.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::protocol::{self as p, fattr, op, InHeader, Reader, Writer};
use super::sys::{self, Errno, SysResult};

/// Most node ids the server keeps for the guest (each holds a host descriptor). The guest's
/// kernel forgets nodes only when it evicts them, so a walk of a large tree keeps many: this
/// is sized for such trees while bounding what a guest can pin on the host (a few hundred
/// bytes of host memory per node).
pub const MAX_INODES: usize = 1 << 18;
/// Most files and directories the guest may have open at once.
pub const MAX_HANDLES: usize = 4096;
/// Largest read or write of one request (the guest is told so in `INIT`).
pub const MAX_IO: usize = 1 << 20;
/// Largest directory listing of one request.
pub const MAX_READDIR: usize = 64 << 10;
/// Largest request: a write of [`MAX_IO`] bytes behind its headers.
pub const MAX_REQUEST: usize = p::IN_HEADER_LEN + 40 + MAX_IO;
/// Oldest protocol minor version served (Linux's virtio-fs driver speaks 7.27 or later).
pub const MIN_MINOR: u32 = 27;
/// How long the guest may cache names and attributes: short, since the host may change the
/// folder under it.
const TTL_SECS: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("the shared folder {0} does not exist")]
    NotFound(String),
    #[error("the shared folder {0} is not a directory")]
    NotADirectory(String),
    #[error("cannot open the shared folder {path}: {msg}")]
    Open { path: String, msg: String },
    #[error(
        "the tag {0:?} of a shared folder must be 1 to 36 ASCII letters, digits, '.', '_' or '-'"
    )]
    BadTag(String),
    #[error("cannot start the thread of the shared folder {path}: {msg}")]
    Thread { path: String, msg: String },
}

/// One node the guest holds: an `O_PATH` descriptor (never following a final symlink) and
/// where it was last reached, to reopen it.
struct Inode {
    fd: Arc<OwnedFd>,
    /// The directory it was reached in (none for the root).
    parent: Option<Arc<OwnedFd>>,
    name: CString,
    /// (st_dev, st_ino): the same object reached twice is one node.
    key: (u64, u64),
    /// `S_IFMT` bits.
    kind: u32,
    /// The guest's lookup count (`FORGET` takes it down).
    lookups: u64,
}

struct Handle {
    fd: OwnedFd,
    dir: bool,
}

/// The passthrough server of one shared folder.
pub struct Server {
    read_only: bool,
    inodes: HashMap<u64, Inode>,
    by_key: HashMap<(u64, u64), u64>,
    handles: HashMap<u64, Handle>,
    next_node: u64,
    next_handle: u64,
    initialized: bool,
    /// Whether a FUSE session is open (the guest has the folder mounted), for the VMM thread
    /// that asks before a snapshot (see [`Server::session_flag`]).
    session: Arc<AtomicBool>,
}

type OpResult = Result<Vec<u8>, Errno>;

fn key_of(st: &libc::stat64) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

fn kind_of(st: &libc::stat64) -> u32 {
    st.st_mode & libc::S_IFMT
}

fn erofs() -> Errno {
    Errno(libc::EROFS)
}

fn einval() -> Errno {
    Errno(libc::EINVAL)
}

/// The guest's open flags we pass on: access mode, append, non-blocking and the sync flags.
/// Not `O_DIRECT` (our buffers are not aligned), `O_NOATIME`, `O_CREAT` (only through
/// `CREATE`) or anything that changes what is opened.
fn open_flags(flags: u32) -> i32 {
    let f = flags as i32;
    f & (libc::O_ACCMODE | libc::O_APPEND | libc::O_NONBLOCK | libc::O_SYNC | libc::O_DSYNC)
}

impl Server {
    /// Opens the shared folder at `path` (a path the host chose: it may go through symlinks).
    pub fn open(path: &Path, read_only: bool) -> Result<Server, FsError> {
        use std::os::unix::ffi::OsStrExt;
        let shown = path.display().to_string();
        let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| FsError::Open {
            path: shown.clone(),
            msg: "the path has a NUL byte".into(),
        })?;
        // SAFETY: a valid NUL-terminated path; the descriptor is owned below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ENOENT) => FsError::NotFound(shown),
                Some(libc::ENOTDIR) => FsError::NotADirectory(shown),
                _ => FsError::Open {
                    path: shown,
                    msg: crate::vmm::os_msg(&e),
                },
            });
        }
        // SAFETY: open returned a new descriptor nobody else owns.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        Server::new(root, read_only).map_err(|e| FsError::Open {
            path: path.display().to_string(),
            msg: crate::vmm::os_msg(&std::io::Error::from_raw_os_error(e.0)),
        })
    }

    /// A server on `root`, a directory descriptor (`O_PATH` is enough).
    pub fn new(root: OwnedFd, read_only: bool) -> SysResult<Server> {
        let st = sys::stat(root.as_fd())?;
        if kind_of(&st) != libc::S_IFDIR {
            return Err(Errno(libc::ENOTDIR));
        }
        let mut s = Server {
            read_only,
            inodes: HashMap::new(),
            by_key: HashMap::new(),
            handles: HashMap::new(),
            next_node: p::FUSE_ROOT_ID + 1,
            next_handle: 1,
            initialized: false,
            session: Arc::new(AtomicBool::new(false)),
        };
        s.by_key.insert(key_of(&st), p::FUSE_ROOT_ID);
        s.inodes.insert(
            p::FUSE_ROOT_ID,
            Inode {
                fd: Arc::new(root),
                parent: None,
                name: CString::default(),
                key: key_of(&st),
                kind: libc::S_IFDIR,
                lookups: 1,
            },
        );
        Ok(s)
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Nodes and open handles held (for tests and limits).
    pub fn counts(&self) -> (usize, usize) {
        (self.inodes.len(), self.handles.len())
    }

    /// Answers one request of at most [`MAX_REQUEST`] bytes; `room` is how many bytes the
    /// guest can take back. `None`: nothing to send (a `FORGET`, or no room even for an error).
    pub fn handle(&mut self, req: &[u8], room: usize) -> Option<Vec<u8>> {
        let Some(h) = InHeader::parse(req) else {
            // No header, no request id: the reply can only say the request was malformed.
            return (room >= p::OUT_HEADER_LEN).then(|| p::error_reply(0, einval()));
        };
        let reply = if h.len as usize != req.len() || req.len() > MAX_REQUEST {
            Err(einval())
        } else if matches!(h.opcode, op::FORGET | op::BATCH_FORGET) {
            self.forget(&h, &req[p::IN_HEADER_LEN..]);
            return None;
        } else if !self.initialized && h.opcode != op::INIT {
            Err(Errno(libc::EIO))
        } else {
            let room = room.saturating_sub(p::OUT_HEADER_LEN);
            self.dispatch(&h, &req[p::IN_HEADER_LEN..], room)
        };
        let bytes = match reply {
            Ok(bytes) if bytes.len() <= room => bytes,
            Ok(_) => p::error_reply(h.unique, Errno(libc::ERANGE)),
            Err(e) => p::error_reply(h.unique, e),
        };
        (bytes.len() <= room).then_some(bytes)
    }

    /// The reply to a request too large to serve (only its header was read).
    pub fn refuse(&self, header: &[u8], errno: Errno, room: usize) -> Option<Vec<u8>> {
        let unique = InHeader::parse(header).map_or(0, |h| h.unique);
        (room >= p::OUT_HEADER_LEN).then(|| p::error_reply(unique, errno))
    }

    fn dispatch(&mut self, h: &InHeader, body: &[u8], room: usize) -> OpResult {
        let mut r = Reader::new(body);
        let w = || Writer::new(h.unique, 0);
        match h.opcode {
            op::INIT => self.init(h, &mut r),
            op::DESTROY => {
                self.destroy();
                Ok(w().finish())
            }
            op::LOOKUP => {
                let name = p::name(&mut r)?;
                let (node, st) = self.lookup(h.nodeid, name)?;
                Ok(self.entry(h.unique, node, &st))
            }
            op::GETATTR => {
                let ino = self.inode(h.nodeid)?;
                let st = sys::stat(ino.fd.as_fd())?;
                Ok(attr_reply(h.unique, &st))
            }
            op::SETATTR => self.setattr(h, &mut r),
            op::READLINK => {
                let ino = self.inode(h.nodeid)?;
                if ino.kind != libc::S_IFLNK {
                    return Err(einval());
                }
                let target = sys::read_link(ino.fd.as_fd(), p::PATH_MAX + 1)?;
                if target.len() > p::PATH_MAX {
                    return Err(Errno(libc::ENAMETOOLONG));
                }
                let mut out = Writer::new(h.unique, target.len());
                out.bytes(&target);
                Ok(out.finish())
            }
            op::SYMLINK => {
                let name = p::name(&mut r)?;
                let target = r.cstr(p::PATH_MAX)?;
                self.writable()?;
                if target.is_empty() {
                    return Err(Errno(libc::ENOENT));
                }
                let dir = self.dir(h.nodeid)?;
                sys::symlink_at(target, dir.as_fd(), name)?;
                let (node, st) = self.lookup(h.nodeid, name)?;
                Ok(self.entry(h.unique, node, &st))
            }
            op::MKNOD => {
                self.writable()?;
                // No device nodes, FIFOs or sockets in a shared folder.
                Err(Errno(libc::EPERM))
            }
            op::MKDIR => {
                let mode = r.u32()?;
                let _umask = r.u32()?;
                let name = p::name(&mut r)?;
                self.writable()?;
                let dir = self.dir(h.nodeid)?;
                sys::mkdir_at(dir.as_fd(), name, mode & 0o1777)?;
                let (node, _) = self.lookup(h.nodeid, name)?;
                // Exactly the guest's mode (the host's umask may differ).
                self.chmod(node, mode & 0o1777)?;
                let st = sys::stat(self.inode(node)?.fd.as_fd())?;
                Ok(self.entry(h.unique, node, &st))
            }
            op::UNLINK | op::RMDIR => {
                let name = p::name(&mut r)?;
                self.writable()?;
                let dir = self.dir(h.nodeid)?;
                sys::unlink_at(dir.as_fd(), name, h.opcode == op::RMDIR)?;
                Ok(w().finish())
            }
            op::RENAME | op::RENAME2 => {
                let newdir = r.u64()?;
                if h.opcode == op::RENAME2 {
                    let flags = r.u32()?;
                    r.skip(4)?;
                    if flags != 0 {
                        // RENAME_NOREPLACE, EXCHANGE and WHITEOUT are not offered.
                        return Err(einval());
                    }
                }
                let old = p::name(&mut r)?;
                let new = p::name(&mut r)?;
                self.writable()?;
                self.rename(h.nodeid, old, newdir, new)?;
                Ok(w().finish())
            }
            op::LINK => {
                let old = r.u64()?;
                let name = p::name(&mut r)?;
                self.writable()?;
                self.link(old, h.nodeid, name)?;
                let (node, st) = self.lookup(h.nodeid, name)?;
                Ok(self.entry(h.unique, node, &st))
            }
            op::OPEN => {
                let flags = r.u32()?;
                let fh = self.open_file(h.nodeid, flags)?;
                Ok(open_reply(h.unique, fh))
            }
            op::OPENDIR => {
                let ino = self.inode(h.nodeid)?;
                if ino.kind != libc::S_IFDIR {
                    return Err(Errno(libc::ENOTDIR));
                }
                let fd = self.reopen(h.nodeid, libc::O_RDONLY)?;
                let fh = self.add_handle(fd, true)?;
                Ok(open_reply(h.unique, fh))
            }
            op::CREATE => self.create(h, &mut r),
            op::READ => {
                let (fh, offset, size) = (r.u64()?, r.u64()?, r.u32()?);
                let fd = self.handle_fd(fh, false)?;
                let n = (size as usize).min(MAX_IO).min(room);
                let mut out = vec![0u8; p::OUT_HEADER_LEN + n];
                let got = sys::pread(fd, &mut out[p::OUT_HEADER_LEN..], offset)?;
                out.truncate(p::OUT_HEADER_LEN + got);
                let len = out.len() as u32;
                out[..4].copy_from_slice(&len.to_le_bytes());
                out[8..16].copy_from_slice(&h.unique.to_le_bytes());
                Ok(out)
            }
            op::WRITE => {
                let (fh, offset, size) = (r.u64()?, r.u64()?, r.u32()?);
                r.skip(4 + 8 + 4 + 4)?;
                let data = r.remaining();
                if size as usize != data.len() || data.len() > MAX_IO {
                    return Err(einval());
                }
                self.writable()?;
                let fd = self.handle_fd(fh, false)?;
                let n = sys::pwrite(fd, data, offset)?;
                let mut out = Writer::new(h.unique, 8);
                out.u32(n as u32).u32(0);
                Ok(out.finish())
            }
            op::READDIR => {
                let (fh, offset, size) = (r.u64()?, r.u64()?, r.u32()?);
                let fd = self.handle_fd(fh, true)?;
                let cap = (size as usize).min(MAX_READDIR).min(room);
                readdir(h.unique, fd, offset, cap)
            }
            op::RELEASE | op::RELEASEDIR => {
                let fh = r.u64()?;
                self.handles.remove(&fh).ok_or(Errno(libc::EBADF))?;
                Ok(w().finish())
            }
            op::FLUSH => {
                let fh = r.u64()?;
                self.handle_fd(fh, false)?;
                Ok(w().finish())
            }
            op::FSYNC | op::FSYNCDIR => {
                let fh = r.u64()?;
                let flags = r.u32()?;
                let fd = self.handle_fd(fh, h.opcode == op::FSYNCDIR)?;
                sys::fsync(fd, flags & 1 != 0)?;
                Ok(w().finish())
            }
            op::STATFS => {
                let ino = self.inode(p::FUSE_ROOT_ID)?;
                let s = sys::statfs(ino.fd.as_fd())?;
                let mut out = Writer::new(h.unique, p::STATFS_OUT_LEN);
                out.u64(s.f_blocks)
                    .u64(s.f_bfree)
                    .u64(s.f_bavail)
                    .u64(s.f_files)
                    .u64(s.f_ffree)
                    .u32(s.f_bsize as u32)
                    .u32(s.f_namemax as u32)
                    .u32(s.f_frsize as u32)
                    .zeros(4 + 24);
                Ok(out.finish())
            }
            op::ACCESS => {
                let mask = r.u32()? as i32;
                self.access(h, mask)?;
                Ok(w().finish())
            }
            _ => Err(Errno(libc::ENOSYS)),
        }
    }

    fn init(&mut self, h: &InHeader, r: &mut Reader<'_>) -> OpResult {
        let (major, minor, max_readahead, flags) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
        if major != p::FUSE_KERNEL_VERSION || minor < MIN_MINOR {
            return Err(Errno(libc::EPROTO));
        }
        let minor = minor.min(p::FUSE_KERNEL_MINOR_VERSION);
        let offered = p::init_flags::ASYNC_READ
            | p::init_flags::ATOMIC_O_TRUNC
            | p::init_flags::BIG_WRITES
            | p::init_flags::MAX_PAGES;
        let mut out = Writer::new(h.unique, p::INIT_OUT_LEN);
        out.u32(p::FUSE_KERNEL_VERSION)
            .u32(minor)
            .u32(max_readahead)
            .u32(flags & offered)
            .u16(16) // max_background
            .u16(12) // congestion_threshold
            .u32(MAX_IO as u32) // max_write
            .u32(1) // time_gran: nanoseconds
            .u16((MAX_IO / 4096) as u16) // max_pages
            .u16(0) // map_alignment
            .zeros(p::INIT_OUT_LEN - 32);
        self.initialized = true;
        self.session.store(true, Ordering::Release);
        Ok(out.finish())
    }

    /// A flag that is set while a FUSE session is open: from the guest's `INIT` to its
    /// `DESTROY` (sent when it unmounts the folder) or a driver reset. Set before the reply
    /// that ends the guest's mount or unmount is written, so it is current once the guest
    /// returns from either.
    pub fn session_flag(&self) -> Arc<AtomicBool> {
        self.session.clone()
    }

    /// The driver was reset: the FUSE session is over, as after `DESTROY`.
    pub fn reset_session(&mut self) {
        self.destroy();
    }

    /// The guest unmounted: every node but the root and every handle goes.
    fn destroy(&mut self) {
        self.handles.clear();
        self.inodes.retain(|&id, _| id == p::FUSE_ROOT_ID);
        self.by_key.retain(|_, id| *id == p::FUSE_ROOT_ID);
        self.initialized = false;
        self.session.store(false, Ordering::Release);
    }

    fn forget(&mut self, h: &InHeader, body: &[u8]) {
        let mut r = Reader::new(body);
        if h.opcode == op::FORGET {
            if let Ok(n) = r.u64() {
                self.forget_one(h.nodeid, n);
            }
            return;
        }
        let Ok(count) = r.u32() else { return };
        if r.skip(4).is_err() {
            return;
        }
        // As many as the request really holds, whatever `count` claims.
        for _ in 0..count.min((r.remaining().len() / 16) as u32) {
            let (Ok(node), Ok(n)) = (r.u64(), r.u64()) else {
                return;
            };
            self.forget_one(node, n);
        }
    }

    fn forget_one(&mut self, node: u64, n: u64) {
        if node == p::FUSE_ROOT_ID {
            return;
        }
        let Some(ino) = self.inodes.get_mut(&node) else {
            return;
        };
        ino.lookups = ino.lookups.saturating_sub(n);
        if ino.lookups == 0 {
            let key = ino.key;
            self.inodes.remove(&node);
            if self.by_key.get(&key) == Some(&node) {
                self.by_key.remove(&key);
            }
        }
    }

    fn writable(&self) -> Result<(), Errno> {
        if self.read_only {
            Err(erofs())
        } else {
            Ok(())
        }
    }

    fn inode(&self, node: u64) -> Result<&Inode, Errno> {
        self.inodes.get(&node).ok_or(Errno(libc::ESTALE))
    }

    /// The descriptor of directory node `node`.
    fn dir(&self, node: u64) -> Result<Arc<OwnedFd>, Errno> {
        let ino = self.inode(node)?;
        if ino.kind != libc::S_IFDIR {
            return Err(Errno(libc::ENOTDIR));
        }
        Ok(ino.fd.clone())
    }

    /// Reaches `name` in directory `parent` and counts one more lookup of its node.
    fn lookup(&mut self, parent: u64, name: &CStr) -> Result<(u64, libc::stat64), Errno> {
        let dir = self.dir(parent)?;
        let fd = sys::open_beneath(dir.as_fd(), name, libc::O_PATH, 0)?;
        let st = sys::stat(fd.as_fd())?;
        let key = key_of(&st);
        if let Some(&node) = self.by_key.get(&key) {
            if let Some(ino) = self.inodes.get_mut(&node) {
                ino.lookups = ino.lookups.saturating_add(1);
                if node != p::FUSE_ROOT_ID {
                    // The newest way there is the one most likely to still work.
                    ino.parent = Some(dir);
                    ino.name = p::owned(name);
                }
                return Ok((node, st));
            }
        }
        if self.inodes.len() >= MAX_INODES {
            return Err(Errno(libc::ENFILE));
        }
        let node = self.next_node;
        self.next_node += 1;
        self.by_key.insert(key, node);
        self.inodes.insert(
            node,
            Inode {
                fd: Arc::new(fd),
                parent: Some(dir),
                name: p::owned(name),
                key,
                kind: kind_of(&st),
                lookups: 1,
            },
        );
        Ok((node, st))
    }

    fn entry(&self, unique: u64, node: u64, st: &libc::stat64) -> Vec<u8> {
        let mut out = Writer::new(unique, p::ENTRY_OUT_LEN);
        out.u64(node)
            .u64(0)
            .u64(TTL_SECS)
            .u64(TTL_SECS)
            .u32(0)
            .u32(0);
        p::put_attr(&mut out, st);
        out.finish()
    }

    /// Opens node `node` again for I/O with `flags` (see the module comment): directories
    /// through `.`, regular files through their name, checked to be the same object.
    /// Anything else (links, devices, FIFOs, sockets) is refused.
    fn reopen(&self, node: u64, flags: i32) -> Result<OwnedFd, Errno> {
        let ino = self.inode(node)?;
        match ino.kind {
            libc::S_IFDIR => sys::open_beneath(ino.fd.as_fd(), c".", flags | libc::O_DIRECTORY, 0),
            libc::S_IFREG => {
                let parent = ino.parent.as_ref().ok_or(Errno(libc::ESTALE))?;
                // Checked before the open too: opening a device node or FIFO has effects.
                let st = sys::stat_at(parent.as_fd(), &ino.name)?;
                if key_of(&st) != ino.key || kind_of(&st) != libc::S_IFREG {
                    return Err(Errno(libc::ESTALE));
                }
                let fd = sys::open_beneath(parent.as_fd(), &ino.name, flags | libc::O_NONBLOCK, 0)?;
                let st = sys::stat(fd.as_fd())?;
                if key_of(&st) != ino.key || kind_of(&st) != libc::S_IFREG {
                    return Err(Errno(libc::ESTALE));
                }
                if flags & libc::O_NONBLOCK == 0 {
                    sys::set_blocking(fd.as_fd())?;
                }
                Ok(fd)
            }
            libc::S_IFLNK => Err(Errno(libc::ELOOP)),
            _ => Err(Errno(libc::EACCES)),
        }
    }

    /// Sets the mode of node `node` (never through a symbolic link): on its `O_PATH`
    /// descriptor where the kernel can (fchmodat2), else on the node opened again.
    fn chmod(&self, node: u64, mode: u32) -> Result<(), Errno> {
        let ino = self.inode(node)?;
        if ino.kind == libc::S_IFLNK {
            return Err(Errno(libc::EOPNOTSUPP));
        }
        match sys::chmod_path(ino.fd.as_fd(), mode) {
            Err(Errno(libc::ENOSYS)) => {
                let io = self.reopen(node, libc::O_RDONLY)?;
                sys::chmod(io.as_fd(), mode)
            }
            other => other,
        }
    }

    fn add_handle(&mut self, fd: OwnedFd, dir: bool) -> Result<u64, Errno> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(Errno(libc::ENFILE));
        }
        let fh = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(fh, Handle { fd, dir });
        Ok(fh)
    }

    fn handle_fd(&self, fh: u64, dir: bool) -> Result<BorrowedFd<'_>, Errno> {
        match self.handles.get(&fh) {
            Some(h) if h.dir == dir => Ok(h.fd.as_fd()),
            Some(_) if dir => Err(Errno(libc::ENOTDIR)),
            Some(_) => Err(Errno(libc::EISDIR)),
            None => Err(Errno(libc::EBADF)),
        }
    }

    fn open_file(&mut self, node: u64, flags: u32) -> Result<u64, Errno> {
        let acc = flags as i32 & libc::O_ACCMODE;
        if acc == libc::O_ACCMODE {
            return Err(einval());
        }
        let truncate = flags as i32 & libc::O_TRUNC != 0;
        if self.read_only && (acc != libc::O_RDONLY || truncate) {
            return Err(erofs());
        }
        if self.inode(node)?.kind == libc::S_IFDIR {
            return Err(Errno(libc::EISDIR));
        }
        let fd = self.reopen(node, open_flags(flags))?;
        // Truncated only once it is known to be the node's file.
        if truncate {
            sys::truncate(fd.as_fd(), 0)?;
        }
        self.add_handle(fd, false)
    }

    fn create(&mut self, h: &InHeader, r: &mut Reader<'_>) -> OpResult {
        let (flags, mode, _umask, _open_flags) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
        let name = p::name(r)?;
        self.writable()?;
        let acc = flags as i32 & libc::O_ACCMODE;
        if acc == libc::O_ACCMODE {
            return Err(einval());
        }
        let dir = self.dir(h.nodeid)?;
        if self.handles.len() >= MAX_HANDLES {
            return Err(Errno(libc::ENFILE));
        }
        // No set-user-ID, set-group-ID or sticky bit on a new file. Exclusive first, so a
        // file we made gets exactly the guest's mode (the host's umask may differ).
        let mode = mode & 0o777;
        let exclusive = flags as i32 & libc::O_EXCL != 0;
        let made = sys::open_beneath(
            dir.as_fd(),
            name,
            open_flags(flags) | libc::O_CREAT | libc::O_EXCL,
            mode,
        );
        let (node, st, fd) = match made {
            Ok(fd) => {
                sys::chmod(fd.as_fd(), mode)?;
                let (node, st) = self.lookup(h.nodeid, name)?;
                (node, st, fd)
            }
            Err(Errno(libc::EEXIST)) if !exclusive => {
                let (node, st) = self.lookup(h.nodeid, name)?;
                let opened = if kind_of(&st) == libc::S_IFDIR {
                    Err(Errno(libc::EISDIR))
                } else {
                    self.reopen(node, open_flags(flags))
                };
                let opened = opened.and_then(|fd| {
                    if flags as i32 & libc::O_TRUNC != 0 {
                        sys::truncate(fd.as_fd(), 0)?;
                    }
                    Ok(fd)
                });
                match opened {
                    Ok(fd) => (node, st, fd),
                    Err(e) => {
                        self.forget_one(node, 1);
                        return Err(e);
                    }
                }
            }
            Err(e) => return Err(e),
        };
        let fh = match self.add_handle(fd, false) {
            Ok(fh) => fh,
            Err(e) => {
                self.forget_one(node, 1);
                return Err(e);
            }
        };
        let mut out = Writer::new(h.unique, p::ENTRY_OUT_LEN + p::OPEN_OUT_LEN);
        out.bytes(&self.entry(h.unique, node, &st)[p::OUT_HEADER_LEN..]);
        out.u64(fh).u32(0).u32(0);
        Ok(out.finish())
    }

    fn setattr(&mut self, h: &InHeader, r: &mut Reader<'_>) -> OpResult {
        let valid = r.u32()?;
        r.skip(4)?;
        let fh = r.u64()?;
        let size = r.u64()?;
        let _lock_owner = r.u64()?;
        let (atime, mtime, _ctime) = (r.u64()?, r.u64()?, r.u64()?);
        let (atimensec, mtimensec, _ctimensec) = (r.u32()?, r.u32()?, r.u32()?);
        let mode = r.u32()?;
        r.skip(4)?;
        let (uid, gid) = (r.u32()?, r.u32()?);
        let changes = fattr::MODE
            | fattr::UID
            | fattr::GID
            | fattr::SIZE
            | fattr::ATIME
            | fattr::MTIME
            | fattr::ATIME_NOW
            | fattr::MTIME_NOW;
        if valid & changes != 0 {
            self.writable()?;
        }
        let ino = self.inode(h.nodeid)?;
        let (fd, kind) = (ino.fd.clone(), ino.kind);
        if valid & (fattr::UID | fattr::GID) != 0 {
            sys::chown(
                fd.as_fd(),
                (valid & fattr::UID != 0).then_some(uid),
                (valid & fattr::GID != 0).then_some(gid),
            )?;
        }
        if valid & fattr::MODE != 0 {
            self.chmod(h.nodeid, mode & 0o1777)?;
        }
        if valid & fattr::SIZE != 0 {
            if kind == libc::S_IFDIR {
                return Err(Errno(libc::EISDIR));
            }
            match self.handles.get(&fh).filter(|_| valid & fattr::FH != 0) {
                Some(hd) if !hd.dir => sys::truncate(hd.fd.as_fd(), size)?,
                _ => {
                    let io = self.reopen(h.nodeid, libc::O_WRONLY)?;
                    sys::truncate(io.as_fd(), size)?;
                }
            }
        }
        let time = |set: u32, now: u32, sec: u64, nsec: u32| -> libc::timespec {
            if valid & now != 0 {
                libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                }
            } else if valid & set != 0 {
                libc::timespec {
                    tv_sec: sec as libc::time_t,
                    tv_nsec: i64::from(nsec.min(999_999_999)),
                }
            } else {
                libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                }
            }
        };
        if valid & (fattr::ATIME | fattr::MTIME | fattr::ATIME_NOW | fattr::MTIME_NOW) != 0 {
            let times = [
                time(fattr::ATIME, fattr::ATIME_NOW, atime, atimensec),
                time(fattr::MTIME, fattr::MTIME_NOW, mtime, mtimensec),
            ];
            sys::set_times(fd.as_fd(), c"", &times)?;
        }
        let st = sys::stat(fd.as_fd())?;
        Ok(attr_reply(h.unique, &st))
    }

    fn rename(&mut self, olddir: u64, old: &CStr, newdir: u64, new: &CStr) -> Result<(), Errno> {
        let from = self.dir(olddir)?;
        let to = self.dir(newdir)?;
        sys::rename_at(from.as_fd(), old, to.as_fd(), new)?;
        // The moved node is now reached by its new name.
        if let Ok(st) = sys::stat_at(to.as_fd(), new) {
            if let Some(ino) = self
                .by_key
                .get(&key_of(&st))
                .and_then(|n| self.inodes.get_mut(n))
            {
                if ino.parent.is_some() {
                    ino.parent = Some(to);
                    ino.name = p::owned(new);
                }
            }
        }
        Ok(())
    }

    /// Hard-links node `old` as `name` in directory `newdir`: both are beneath the root, so the
    /// link is too. Only the name `old` was reached by is linked, after checking it still is
    /// `old`.
    fn link(&mut self, old: u64, newdir: u64, name: &CStr) -> Result<(), Errno> {
        let to = self.dir(newdir)?;
        let ino = self.inode(old)?;
        if ino.kind == libc::S_IFDIR {
            return Err(Errno(libc::EPERM));
        }
        let parent = ino.parent.as_ref().ok_or(Errno(libc::EPERM))?;
        let st = sys::stat_at(parent.as_fd(), &ino.name)?;
        if key_of(&st) != ino.key {
            return Err(Errno(libc::ESTALE));
        }
        sys::link_at(parent.as_fd(), &ino.name, to.as_fd(), name)
    }

    /// `access(2)` as the caller: a read-only share refuses `W_OK`; otherwise the mode bits
    /// decide, for the caller's uid and gid (root passes, but needs an execute bit for `X_OK`).
    fn access(&self, h: &InHeader, mask: i32) -> Result<(), Errno> {
        let st = sys::stat(self.inode(h.nodeid)?.fd.as_fd())?;
        if mask & libc::W_OK != 0 && self.read_only {
            return Err(erofs());
        }
        let mode = st.st_mode;
        let bits = if h.uid == 0 {
            let x = if mode & 0o111 != 0 || kind_of(&st) == libc::S_IFDIR {
                1
            } else {
                0
            };
            6 | x
        } else if h.uid == st.st_uid {
            (mode >> 6) & 7
        } else if h.gid == st.st_gid {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        let want = (mask & 7) as u32;
        if want & !bits != 0 {
            return Err(Errno(libc::EACCES));
        }
        Ok(())
    }
}

fn attr_reply(unique: u64, st: &libc::stat64) -> Vec<u8> {
    let mut out = Writer::new(unique, p::ATTR_OUT_LEN);
    out.u64(TTL_SECS).u32(0).u32(0);
    p::put_attr(&mut out, st);
    out.finish()
}

fn open_reply(unique: u64, fh: u64) -> Vec<u8> {
    let mut out = Writer::new(unique, p::OPEN_OUT_LEN);
    out.u64(fh).u32(0).u32(0);
    out.finish()
}

/// Up to `cap` bytes of `fuse_dirent` records of directory `fd` from `offset` on.
fn readdir(unique: u64, fd: BorrowedFd<'_>, offset: u64, cap: usize) -> OpResult {
    let mut out = Writer::new(unique, cap);
    if cap < p::DIRENT_LEN + 8 {
        return Ok(out.finish());
    }
    sys::seek_dir(fd, offset)?;
    let mut raw = vec![0u8; cap];
    let n = sys::getdents(fd, &mut raw)?;
    let raw = &raw[..n];
    let mut at = 0;
    // linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name (NUL-terminated).
    while at + 19 < raw.len() {
        let rec = &raw[at..];
        let reclen = usize::from(u16::from_le_bytes([rec[16], rec[17]]));
        if reclen < 20 || reclen > rec.len() {
            break;
        }
        let ino = u64::from_le_bytes(rec[0..8].try_into().expect("8 bytes"));
        let off = u64::from_le_bytes(rec[8..16].try_into().expect("8 bytes"));
        let kind = rec[18];
        let name_bytes = &rec[19..reclen];
        let name_len = name_bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_bytes.len());
        let size = (p::DIRENT_LEN + name_len).next_multiple_of(8);
        if out.len() - p::OUT_HEADER_LEN + size > cap {
            break;
        }
        out.u64(ino)
            .u64(off)
            .u32(name_len as u32)
            .u32(u32::from(kind))
            .bytes(&name_bytes[..name_len])
            .zeros(size - p::DIRENT_LEN - name_len);
        at += reclen;
    }
    Ok(out.finish())
}
