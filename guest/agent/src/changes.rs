//! The `changes` request: what the VM changed in its root file system.
//!
//! The root is a read-only image under a tmpfs overlay, so the overlay's upper directory holds
//! exactly the change set: new and modified files (copied up whole), whiteouts (character devices
//! 0/0) for deleted paths, and directories marked opaque (`trusted.overlay.opaque=y`) that replaced
//! an image directory. The upper and lower directories are not reachable by path once the overlay
//! is the root, so PID 1 opens both before the switch and every walk goes through those
//! descriptors with `openat`/`fstatat` and `O_NOFOLLOW`.
//!
//! Entries come in walk order, a directory before its contents and names in byte order, so the
//! same change set always gives the same stream (and the host the same layer digest).

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{CStr, CString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use crate::conn::{Conn, End};
use crate::proto::{self, kind, Encoder, Frame, CHUNK, HEADER, UINT};
use crate::sys;

/// Request fields: send the content of regular files (an export) instead of only listing them;
/// only what changed since a mark an earlier walk kept; keep this walk as a new mark; freeze every
/// exec's processes for the walk, so that none changes a file while it is read (`docker commit`
/// pauses the container the same way).
pub const WITH_DATA: u8 = 1;
pub const SINCE: u8 = 2;
pub const KEEP_MARK: u8 = 3;
pub const PAUSE: u8 = 4;
pub const SCHEMA: &[(u8, u8)] = &[
    (WITH_DATA, UINT),
    (SINCE, UINT),
    (KEEP_MARK, UINT),
    (PAUSE, UINT),
];

/// `entry` fields.
pub const PATH: u8 = 1;
pub const TYPE: u8 = 2;
pub const MODE: u8 = 3;
pub const UID: u8 = 4;
pub const GID: u8 = 5;
pub const SIZE: u8 = 6;
pub const MTIME_NS: u8 = 7;
pub const LINK: u8 = 8;
pub const MAJOR: u8 = 9;
pub const MINOR: u8 = 10;
pub const XATTRS: u8 = 11;
pub const OPAQUE: u8 = 12;
pub const IN_IMAGE: u8 = 13;
pub const HIDDEN: u8 = 14;
/// `end` fields: the number of entries sent, and the mark kept.
pub const END_COUNT: u8 = 1;
pub const END_MARK: u8 = 2;

/// `entry` types.
pub mod entry_type {
    pub const FILE: u64 = 0;
    pub const DIR: u64 = 1;
    pub const SYMLINK: u64 = 2;
    pub const HARDLINK: u64 = 3;
    pub const WHITEOUT: u64 = 4;
    pub const CHAR: u64 = 5;
    pub const BLOCK: u64 = 6;
    pub const FIFO: u64 = 7;
}

/// Directory levels below the root that a walk descends (deeper trees are refused, not cut).
pub const MAX_DEPTH: usize = 256;
/// Longest path sent (PATH_MAX).
pub const MAX_PATH: usize = 4096;
const OPAQUE_XATTR: &CStr = c"trusted.overlay.opaque";
/// The overlay's own bookkeeping, never part of a change.
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
/// The extended attribute namespaces a layer carries (as container image tools do); others, such
/// as `system.posix_acl_*`, describe the file system rather than the file.
const LAYER_XATTR_PREFIXES: [&[u8]; 3] = [b"user.", b"security.", b"trusted."];
const MAX_XATTR_NAMES: usize = 64 * 1024;
const MAX_XATTR_VALUE: usize = 64 * 1024;

/// The overlay's two halves, opened by PID 1 before the root switch.
pub struct Layers {
    pub upper: OwnedFd,
    pub lower: Option<OwnedFd>,
}

impl Layers {
    pub fn open(upper: &str, lower: Option<&str>) -> io::Result<Layers> {
        let flags = libc::O_RDONLY | libc::O_DIRECTORY;
        let open = |p: &str| sys::open(&CString::new(p).expect("no NUL in a path"), flags, 0);
        Ok(Layers {
            upper: open(upper)?,
            lower: lower.map(open).transpose()?,
        })
    }
}

/// Why a walk stopped early.
enum Stop {
    /// The connection is gone or broken.
    End(End),
    /// Something in the guest failed: reported as a non-fatal error, the connection stays usable.
    Failed(Option<i32>, String),
}

impl From<End> for Stop {
    fn from(e: End) -> Self {
        Stop::End(e)
    }
}

impl From<io::Error> for Stop {
    fn from(_: io::Error) -> Self {
        Stop::End(End::Closed)
    }
}

fn shown(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

fn failed(what: &str, path: &[u8], e: &io::Error) -> Stop {
    Stop::Failed(
        e.raw_os_error(),
        format!("changes: {what} /{}: {}", shown(path), sys::errno_text(e)),
    )
}

fn lstat_at(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `name` is NUL-terminated and borrowed for the call; fstatat writes one `stat` into
    // `st`, which is live and large enough, and on success it is fully initialised.
    sys::cvt(unsafe {
        libc::fstatat(
            dir,
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so it initialised `st`.
    Ok(unsafe { st.assume_init() })
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes one `stat` into the live `st`; `fd` is borrowed by the caller.
    sys::cvt(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it initialised `st`.
    Ok(unsafe { st.assume_init() })
}

fn open_at(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: `name` is NUL-terminated and borrowed for the call; no O_CREAT, so no mode.
        let ret = unsafe {
            libc::openat(
                dir,
                name.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        match sys::cvt(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            // SAFETY: openat succeeded, so `fd` is a new descriptor that nothing else owns.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        }
    }
}

fn open_dir_at(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    open_at(dir, name, libc::O_RDONLY | libc::O_DIRECTORY)
}

/// The names in `dir` (without `.` and `..`), sorted bytewise.
fn read_names(dir: &OwnedFd) -> io::Result<Vec<CString>> {
    // fdopendir takes over the descriptor it is given, and reading moves its file offset: a new
    // open of "." gives this walk a position of its own (a dup would share the offset with every
    // other walk of the same directory, such as two `changes` requests at once).
    let fd = open_dir_at(dir.as_raw_fd(), c".")?.into_raw_fd();
    // SAFETY: `fd` is a new descriptor that only this function owns (taken out of its OwnedFd);
    // fdopendir takes it over on success, and on failure it is closed here.
    let stream = unsafe { libc::fdopendir(fd) };
    if stream.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `fd` is still ours to close.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: errno is a thread-local integer; zeroing it tells the end of the stream (NULL,
        // errno 0) from a failure (NULL, errno set).
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is the live DIR* from fdopendir, used by this thread only.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error() == Some(0) {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: readdir returned a valid dirent whose d_name is NUL-terminated; it stays valid
        // until the next readdir on this stream, and the name is copied before that.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    };
    // SAFETY: `stream` is live and closed exactly once; it closes `fd` with it.
    unsafe { libc::closedir(stream) };
    result?;
    names.sort();
    Ok(names)
}

/// A directory replaced as a whole (its image contents hidden) is marked opaque by the overlay.
fn is_opaque(dir: RawFd) -> bool {
    let mut value = [0u8; 2];
    // SAFETY: fgetxattr writes at most `value.len()` bytes into the live local array; the name is
    // a NUL-terminated constant.
    let n = unsafe {
        libc::fgetxattr(
            dir,
            OPAQUE_XATTR.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

/// The extended attributes of an open file or directory as `name NUL value` items, without the
/// overlay's own. A file system without xattr support has none.
fn xattrs(fd: RawFd, path: &[u8]) -> Result<Vec<Vec<u8>>, Stop> {
    let mut names = vec![0u8; 4096];
    let len = loop {
        // SAFETY: flistxattr writes at most `names.len()` bytes into the live, exclusively
        // borrowed buffer.
        let n = unsafe { libc::flistxattr(fd, names.as_mut_ptr().cast(), names.len()) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            Some(libc::ERANGE) if names.len() < MAX_XATTR_NAMES => names.resize(MAX_XATTR_NAMES, 0),
            _ => return Err(failed("list the extended attributes of", path, &e)),
        }
    };
    let mut out = Vec::new();
    let mut value = vec![0u8; MAX_XATTR_VALUE];
    for name in names[..len].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if name.starts_with(OVERLAY_XATTR_PREFIX)
            || !LAYER_XATTR_PREFIXES.iter().any(|p| name.starts_with(p))
        {
            continue;
        }
        let cname = CString::new(name).expect("split at NUL");
        // SAFETY: fgetxattr writes at most `value.len()` bytes into the live buffer; `cname` is
        // NUL-terminated and borrowed for the call.
        let n =
            unsafe { libc::fgetxattr(fd, cname.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENODATA) {
                continue; // removed since it was listed
            }
            return Err(failed("read an extended attribute of", path, &e));
        }
        let mut item = name.to_vec();
        item.push(0);
        item.extend_from_slice(&value[..n as usize]);
        out.push(item);
    }
    Ok(out)
}

fn read_link_at(dir: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut target = vec![0u8; MAX_PATH + 1];
    // SAFETY: readlinkat writes at most `target.len()` bytes into the live buffer; `name` is
    // NUL-terminated and borrowed for the call.
    let n =
        unsafe { libc::readlinkat(dir, name.as_ptr(), target.as_mut_ptr().cast(), target.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize > MAX_PATH {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    target.truncate(n as usize);
    Ok(target)
}

/// `prefix/name`, or `name` at the root (whose prefix is empty).
fn child_path(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut path = Vec::with_capacity(prefix.len() + 1 + name.len());
    if !prefix.is_empty() {
        path.extend_from_slice(prefix);
        path.push(b'/');
    }
    path.extend_from_slice(name);
    path
}

fn mtime_ns(st: &libc::stat) -> u64 {
    // Times before 1970 are sent as 1970: the field is unsigned.
    (st.st_mtime.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(st.st_mtime_nsec.clamp(0, 999_999_999) as u64)
}

/// What a walk saw of one upper entry, to tell later walks what changed since.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Seen {
    ino: u64,
    ctime_ns: u64,
    is_dir: bool,
}

impl Seen {
    fn of(st: &libc::stat) -> Seen {
        Seen {
            ino: st.st_ino,
            ctime_ns: (st.st_ctime.max(0) as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(st.st_ctime_nsec.clamp(0, 999_999_999) as u64),
            is_dir: st.st_mode & libc::S_IFMT == libc::S_IFDIR,
        }
    }
}

/// A recorded walk: for each directory (by path), what each of its entries was.
type State = HashMap<Vec<u8>, HashMap<Vec<u8>, Seen>>;

/// Inodes of the files the agent itself wrote into the root (`/etc/hosts`, `/etc/resolv.conf`):
/// like the bind mounts docker uses for them, they are the VM's, not part of its changes. A file
/// the VM replaced later has another inode and is a change again.
static AGENT_FILES: Mutex<Vec<u64>> = Mutex::new(Vec::new());
const MAX_AGENT_FILES: usize = 64;

pub fn agent_wrote(ino: u64) {
    let mut files = AGENT_FILES.lock().unwrap_or_else(|p| p.into_inner());
    if files.len() == MAX_AGENT_FILES {
        files.remove(0);
    }
    files.push(ino);
}

fn written_by_agent(ino: u64) -> bool {
    AGENT_FILES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&ino)
}

/// Marks the agent keeps (oldest dropped first): a build keeps one per step.
pub const MAX_MARKS: usize = 8;

struct Marks {
    next: u64,
    kept: VecDeque<(u64, Arc<State>)>,
}

static MARKS: Mutex<Marks> = Mutex::new(Marks {
    next: 1,
    kept: VecDeque::new(),
});

fn marks() -> std::sync::MutexGuard<'static, Marks> {
    MARKS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Walk<'a> {
    conn: &'a mut Conn,
    with_data: bool,
    count: u64,
    /// First path of each multiply-linked regular file, by inode: later links are sent as such.
    links: HashMap<u64, Vec<u8>>,
    /// The mark this walk reports changes since (`None`: everything in the upper directory).
    since: Option<Arc<State>>,
    /// This walk's own state, when it is to be kept as a new mark.
    record: Option<State>,
    /// Unchanged directories above the current entry, sent only if something beneath them is:
    /// a layer names the directories of the files it holds.
    pending: Vec<Vec<u8>>,
}

impl Walk<'_> {
    fn send(&mut self, payload: Encoder) -> Result<(), Stop> {
        for ancestor in std::mem::take(&mut self.pending) {
            proto::send(self.conn.fd(), kind::ENTRY, &ancestor)?;
            self.count += 1;
        }
        proto::send(self.conn.fd(), kind::ENTRY, &payload.finish())?;
        self.count += 1;
        Ok(())
    }

    fn common(path: &[u8], entry_type: u64, st: &libc::stat, in_image: bool) -> Encoder {
        let e = Encoder::new()
            .bytes(PATH, path)
            .uint(TYPE, entry_type)
            .uint(MODE, u64::from(st.st_mode & 0o7777))
            .uint(UID, u64::from(st.st_uid))
            .uint(GID, u64::from(st.st_gid))
            .uint(MTIME_NS, mtime_ns(st));
        if in_image {
            e.uint(IN_IMAGE, 1)
        } else {
            e
        }
    }

    /// What the mark saw at `name` in directory `prefix`, when this part of the walk is compared
    /// with one (`everything` is false).
    fn before(&self, prefix: &[u8], name: &CStr, everything: bool) -> Option<Option<Seen>> {
        if everything {
            return None;
        }
        let since = self.since.as_ref()?;
        Some(
            since
                .get(prefix)
                .and_then(|d| d.get(name.to_bytes()))
                .copied(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn dir(
        &mut self,
        upper: &OwnedFd,
        lower: Option<&OwnedFd>,
        prefix: &[u8],
        depth: usize,
        opaque: bool,
        everything: bool,
    ) -> Result<(), Stop> {
        if depth > MAX_DEPTH {
            return Err(Stop::Failed(
                None,
                format!(
                    "changes: /{} is more than {MAX_DEPTH} directories deep",
                    shown(prefix)
                ),
            ));
        }
        let names = read_names(upper).map_err(|e| failed("read the directory", prefix, &e))?;
        let mut seen_here = HashMap::new();
        for name in &names {
            let path = child_path(prefix, name.to_bytes());
            if path.len() > MAX_PATH {
                return Err(Stop::Failed(
                    None,
                    format!(
                        "changes: a path under /{} is longer than {MAX_PATH} bytes",
                        shown(prefix)
                    ),
                ));
            }
            if let Some(seen) = self.one(upper, lower, name, &path, depth, everything)? {
                seen_here.insert(name.to_bytes().to_vec(), seen);
            }
        }
        // Since a mark: what the mark saw here and is gone now was deleted in between.
        // (The mark is shared, not copied: an Arc clone lets `send` borrow `self` meanwhile.)
        let since = if everything { None } else { self.since.clone() };
        if let Some(before) = since.as_ref().and_then(|s| s.get(prefix)) {
            let mut gone: Vec<&Vec<u8>> = before
                .keys()
                .filter(|n| !seen_here.contains_key(*n))
                .collect();
            gone.sort();
            for name in gone {
                let path = child_path(prefix, name);
                let e = Encoder::new()
                    .bytes(PATH, &path)
                    .uint(TYPE, entry_type::WHITEOUT);
                self.send(e)?;
            }
        }
        if let Some(record) = self.record.as_mut() {
            record.insert(prefix.to_vec(), seen_here);
        }
        // An opaque directory hides everything the image had in it: a listing names those paths
        // as deleted (an export needs no entry for them, the opaque mark says it).
        if let (true, false, Some(lower)) = (opaque, self.with_data, lower) {
            let present: HashSet<&CString> = names.iter().collect();
            let hidden =
                read_names(lower).map_err(|e| failed("read the image directory", prefix, &e))?;
            for name in hidden.iter().filter(|n| !present.contains(n)) {
                let path = child_path(prefix, name.to_bytes());
                if path.len() <= MAX_PATH {
                    let e = Encoder::new()
                        .bytes(PATH, &path)
                        .uint(TYPE, entry_type::WHITEOUT)
                        .uint(IN_IMAGE, 1)
                        .uint(HIDDEN, 1);
                    self.send(e)?;
                }
            }
        }
        Ok(())
    }

    /// Sends one upper entry (and what is beneath it) unless a mark saw it unchanged; returns what
    /// it is, for the next mark.
    fn one(
        &mut self,
        upper: &OwnedFd,
        lower: Option<&OwnedFd>,
        name: &CStr,
        path: &[u8],
        depth: usize,
        everything: bool,
    ) -> Result<Option<Seen>, Stop> {
        let st = match lstat_at(upper.as_raw_fd(), name) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None), // removed meanwhile
            Err(e) => return Err(failed("stat", path, &e)),
        };
        if st.st_mode & libc::S_IFMT == libc::S_IFREG && written_by_agent(st.st_ino) {
            return Ok(None);
        }
        let seen = Seen::of(&st);
        let prefix = &path[..path.len() - name.to_bytes().len()]
            .strip_suffix(b"/")
            .unwrap_or(&[]);
        // None: no mark to compare with; Some(None): new since the mark; Some(Some(s)): seen then.
        let before = self.before(prefix, name, everything);
        let image = lower.and_then(|l| lstat_at(l.as_raw_fd(), name).ok());
        let in_image = image.is_some();
        // Without a mark, a directory the overlay only copied up (to hold a change beneath it)
        // counts as changed only if something beneath it is, as `docker diff` shows it.
        let copied_up = before.is_none()
            && image.is_some_and(|i| {
                i.st_mode == st.st_mode && i.st_uid == st.st_uid && i.st_gid == st.st_gid
            });
        let unchanged = before == Some(Some(seen));
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                let fd = match open_dir_at(upper.as_raw_fd(), name) {
                    Ok(fd) => fd,
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                    Err(e) => return Err(failed("open the directory", path, &e)),
                };
                // A directory made again since the mark (or that was something else then) replaces
                // the one the earlier layers have, as a whole.
                let replaced = matches!(before, Some(Some(b)) if b.ino != seen.ino || !b.is_dir);
                // The overlay's opaque mark says what the directory hides of the image; a directory
                // the mark saw already did its hiding in an earlier layer, and marking it again
                // would hide that layer's contents too.
                let opaque = match before {
                    Some(Some(_)) => replaced,
                    _ => is_opaque(fd.as_raw_fd()),
                };
                let mut e = Self::common(path, entry_type::DIR, &st, in_image);
                if opaque {
                    e = e.uint(OPAQUE, 1);
                }
                if self.with_data {
                    let x = xattrs(fd.as_raw_fd(), path)?;
                    if !x.is_empty() {
                        e = e.list(XATTRS, x.iter());
                    }
                }
                let waiting = self.pending.len();
                if unchanged || (copied_up && !opaque) {
                    self.pending.push(e.finish());
                } else {
                    self.send(e)?;
                }
                let lower_dir = lower.and_then(|l| open_dir_at(l.as_raw_fd(), name).ok());
                let everything = everything || replaced || matches!(before, Some(None));
                self.dir(&fd, lower_dir.as_ref(), path, depth + 1, opaque, everything)?;
                self.pending.truncate(waiting);
            }
            _ if unchanged => {}
            libc::S_IFREG => self.file(upper, name, path, &st, in_image)?,
            libc::S_IFLNK => {
                let target = read_link_at(upper.as_raw_fd(), name)
                    .map_err(|e| failed("read the symbolic link", path, &e))?;
                let e = Self::common(path, entry_type::SYMLINK, &st, in_image).bytes(LINK, &target);
                self.send(e)?;
            }
            libc::S_IFCHR if st.st_rdev == 0 => {
                let mut e = Encoder::new()
                    .bytes(PATH, path)
                    .uint(TYPE, entry_type::WHITEOUT);
                if in_image {
                    e = e.uint(IN_IMAGE, 1);
                }
                self.send(e)?;
            }
            fmt @ (libc::S_IFCHR | libc::S_IFBLK) => {
                let t = if fmt == libc::S_IFCHR {
                    entry_type::CHAR
                } else {
                    entry_type::BLOCK
                };
                let e = Self::common(path, t, &st, in_image)
                    .uint(MAJOR, u64::from(libc::major(st.st_rdev)))
                    .uint(MINOR, u64::from(libc::minor(st.st_rdev)));
                self.send(e)?;
            }
            libc::S_IFIFO => self.send(Self::common(path, entry_type::FIFO, &st, in_image))?,
            // Sockets live only as long as the process that bound them: a layer cannot hold one.
            _ => return Ok(None),
        }
        Ok(Some(seen))
    }

    fn file(
        &mut self,
        dir: &OwnedFd,
        name: &CStr,
        path: &[u8],
        st: &libc::stat,
        in_image: bool,
    ) -> Result<(), Stop> {
        if st.st_nlink > 1 {
            if let Some(first) = self.links.get(&st.st_ino) {
                let e = Self::common(path, entry_type::HARDLINK, st, in_image).bytes(LINK, first);
                return self.send(e);
            }
            self.links.insert(st.st_ino, path.to_vec());
        }
        if !self.with_data {
            let e =
                Self::common(path, entry_type::FILE, st, in_image).uint(SIZE, st.st_size as u64);
            return self.send(e);
        }
        // O_NONBLOCK: should the file have been replaced by a FIFO since the stat, opening it must
        // not wait for a writer. The inode is checked again on the open descriptor.
        let fd = open_at(dir.as_raw_fd(), name, libc::O_RDONLY | libc::O_NONBLOCK)
            .map_err(|e| failed("open", path, &e))?;
        let now = fstat(fd.as_raw_fd()).map_err(|e| failed("stat", path, &e))?;
        if now.st_ino != st.st_ino || now.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(Stop::Failed(
                None,
                format!(
                    "changes: /{} was replaced while being exported",
                    shown(path)
                ),
            ));
        }
        let size = now.st_size.max(0) as u64;
        let mut e = Self::common(path, entry_type::FILE, &now, in_image).uint(SIZE, size);
        let x = xattrs(fd.as_raw_fd(), path)?;
        if !x.is_empty() {
            e = e.list(XATTRS, x.iter());
        }
        self.send(e)?;
        self.data(fd.as_raw_fd(), size, path)
    }

    /// Sends exactly `size` bytes of the file (its size when the entry was sent); a file that
    /// shrank meanwhile ends the export with an error, one that grew is cut at `size`.
    fn data(&mut self, fd: RawFd, size: u64, path: &[u8]) -> Result<(), Stop> {
        let mut chunk = std::mem::take(&mut self.conn.buf);
        let mut left = size;
        let result = loop {
            if left == 0 {
                break Ok(());
            }
            let want = CHUNK.min(left as usize);
            chunk.clear();
            chunk.reserve(HEADER + want);
            chunk.extend_from_slice(&[0u8; HEADER]);
            // SAFETY: after `clear`, `reserve(HEADER + want)` and the HEADER-byte extend, the
            // vector has length HEADER and at least `want` bytes of spare capacity from
            // `as_mut_ptr() + HEADER`, so the kernel may write up to `want` bytes there.
            let ret = unsafe { libc::read(fd, chunk.as_mut_ptr().add(HEADER).cast(), want) };
            if ret < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break Err(failed("read", path, &e));
            }
            if ret == 0 {
                break Err(Stop::Failed(
                    None,
                    format!("changes: /{} shrank while being exported", shown(path)),
                ));
            }
            // SAFETY: 0 < ret <= want, so `HEADER + ret` is within the capacity reserved above,
            // and read initialised exactly those `ret` bytes after the header.
            unsafe { chunk.set_len(HEADER + ret as usize) };
            left -= ret as u64;
            if proto::send_prefixed(self.conn.fd(), kind::DATA, &mut chunk).is_err() {
                break Err(Stop::End(End::Closed));
            }
        };
        self.conn.buf = chunk;
        result
    }
}

pub fn run(conn: &mut Conn, frame: &Frame, layers: Option<&Layers>) -> Result<(), End> {
    let fields = Conn::decode(frame, SCHEMA)?;
    let with_data = fields.uint(WITH_DATA).unwrap_or(0) != 0;
    let since_id = fields.uint(SINCE);
    let keep = fields.uint(KEEP_MARK).unwrap_or(0) != 0;
    let pause = fields.uint(PAUSE).unwrap_or(0) != 0;
    drop(fields);
    let Some(layers) = layers else {
        return conn.reply_error(
            "request",
            None,
            "this VM's root file system is not an overlay (it booted on its initramfs), so it has no change set",
        );
    };
    let since = match since_id {
        None => None,
        Some(id) => match marks().kept.iter().find(|(m, _)| *m == id) {
            Some((_, state)) => Some(Arc::clone(state)),
            None => {
                return conn.reply_error(
                    "request",
                    None,
                    &format!("changes: no mark {id} (the agent keeps the last {MAX_MARKS})"),
                )
            }
        },
    };
    // Thawed when the walk is over, whatever its outcome (the guard is dropped on every return).
    let _frozen = if pause {
        crate::cgroup::freeze_execs()
    } else {
        None
    };
    let mut walk = Walk {
        conn,
        with_data,
        count: 0,
        links: HashMap::new(),
        since,
        record: keep.then(HashMap::new),
        pending: Vec::new(),
    };
    let result = walk.dir(&layers.upper, layers.lower.as_ref(), b"", 0, false, false);
    let (count, record) = (walk.count, walk.record.take());
    match result {
        Ok(()) => {
            let mut end = Encoder::new().uint(END_COUNT, count);
            if let Some(state) = record {
                let mut marks = marks();
                let id = marks.next;
                marks.next += 1;
                if marks.kept.len() == MAX_MARKS {
                    marks.kept.pop_front();
                }
                marks.kept.push_back((id, Arc::new(state)));
                end = end.uint(END_MARK, id);
            }
            proto::send(conn.fd(), kind::END, &end.finish())?;
            Ok(())
        }
        Err(Stop::End(e)) => Err(e),
        Err(Stop::Failed(errno, message)) => conn.reply_error(
            if errno.is_some() { "os" } else { "request" },
            errno,
            &message,
        ),
    }
}
