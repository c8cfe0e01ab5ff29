//! The virtio-fs device (virtio 1.x, device type 26): a high-priority queue (FORGET requests)
//! and one request queue, served by the [`Server`] on the device's own thread, which is the
//! only thread of a worker allowed the file system calls the server makes (see
//! `worker::seccomp`) and is confined by Landlock to the shared folders.
//!
//! Each chain holds one request in its readable part and the room for the reply in its
//! writable part. A request larger than [`MAX_REQUEST`] is answered `E2BIG` from its header
//! alone (nothing more is read); a chain with a buffer outside guest RAM, or a queue the driver
//! broke, marks the device `DEVICE_NEEDS_RESET`. A driver reset ends the FUSE session: every
//! node and open file is dropped.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::server::{FsError, Server, MAX_HANDLES, MAX_INODES, MAX_REQUEST};
use super::sys::Errno;
use crate::devices::virtio::device_thread::{self, ActiveQueues, DeviceThread, Shared};
use crate::devices::virtio::queue::{gather, scatter, Descriptor, Queue};
use crate::devices::virtio::{pop_chain, Interrupt, Popped, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vmm::os_msg;
use crate::worker::seccomp::ThreadKind;

pub const VIRTIO_ID_FS: u32 = 26;
/// Bytes of the tag in the configuration space (NUL-padded, not necessarily terminated).
pub const TAG_LEN: usize = 36;
/// Queue 0 carries FORGET requests, queue 1 everything else.
pub const HIPRIO: usize = 0;
pub const REQUESTS: usize = 1;
/// Large enough for a chain of a [`super::server::MAX_IO`] write (256 pages and headers).
pub const QUEUE_SIZE: u16 = 1024;
/// The worker wakes at least this often, to notice a stop even if a kick were lost.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

pub struct Fs {
    tag: [u8; TAG_LEN],
    /// The shared part's own flag: the driver reset the device, so the FUSE session is over.
    thread: DeviceThread<bool>,
    /// Set while the guest has the folder mounted (see [`Server::session_flag`]).
    session: Arc<AtomicBool>,
}

/// Whether `tag` is a tag the guest agent will mount: 1 to [`TAG_LEN`] bytes of ASCII
/// letters, digits, `.`, `_` and `-`.
pub fn valid_tag(tag: &str) -> bool {
    (1..=TAG_LEN).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks a tag ([`valid_tag`]) and pads it for the configuration space.
pub fn check_tag(tag: &str) -> Result<[u8; TAG_LEN], FsError> {
    if !valid_tag(tag) {
        return Err(FsError::BadTag(tag.to_string()));
    }
    let mut out = [0u8; TAG_LEN];
    out[..tag.len()].copy_from_slice(tag.as_bytes());
    Ok(out)
}

impl Fs {
    /// Shares `host_dir` under `tag` and starts the device's thread.
    pub fn new(host_dir: &Path, tag: &str, read_only: bool) -> Result<Box<Self>, FsError> {
        let tag_bytes = check_tag(tag)?;
        raise_fd_limit();
        let server = Server::open(host_dir, read_only)?;
        Self::with_server(server, tag_bytes).map_err(|e| FsError::Thread {
            path: host_dir.display().to_string(),
            msg: os_msg(&e),
        })
    }

    /// The device around an opened server.
    pub fn with_server(server: Server, tag: [u8; TAG_LEN]) -> std::io::Result<Box<Self>> {
        let session = server.session_flag();
        let thread =
            DeviceThread::spawn_as(ThreadKind::Fs, "virtio-fs", false, move |kick, shared| {
                Worker {
                    server,
                    kick,
                    shared,
                }
                .run()
            })?;
        Ok(Box::new(Fs {
            tag,
            thread,
            session,
        }))
    }
}

/// Descriptors a shared folder's server may hold: one per node and per open handle.
pub const FDS_WANTED: u64 = (MAX_INODES + MAX_HANDLES) as u64;

/// Raises the process's soft limit on open files toward [`FDS_WANTED`] more than it has
/// (never above the hard limit, never lowering it): the usual soft limit of 1024 would fail a
/// guest's walk of a folder after a thousand names. Best effort: a lower limit only means
/// `EMFILE` answers sooner.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let want = lim.rlim_cur.saturating_add(FDS_WANTED).min(lim.rlim_max);
    if want > lim.rlim_cur {
        lim.rlim_cur = want;
        // SAFETY: setrlimit reads one valid rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    /// `tag[36]`, `num_request_queues` (le32, 1).
    fn read_config(&self, offset: usize, data: &mut [u8]) {
        let mut cfg = [0u8; TAG_LEN + 4];
        cfg[..TAG_LEN].copy_from_slice(&self.tag);
        cfg[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        data.copy_from_slice(&cfg[offset..offset + data.len()]);
    }

    fn config_len(&self) -> usize {
        TAG_LEN + 4
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), String> {
        self.thread.activate(mem, queues, interrupt, 2, "virtio-fs")
    }

    fn notify(&mut self, _index: u16) {
        self.thread.kick();
    }

    fn reset(&mut self) {
        // Flagged rather than inferred from the queues going away: a driver that resets and
        // activates again before the worker looks must still start a new session.
        self.thread.lock().extra = true;
        self.thread.deactivate();
    }

    fn live_queues(&self) -> Option<Vec<Queue>> {
        self.thread.live_queues()
    }

    fn set_quiesced(&mut self, quiesced: bool) {
        self.thread.set_quiesced(quiesced);
    }

    /// A snapshot cannot carry an open FUSE session: the guest kernel's node ids would name
    /// host descriptors the restored server does not have. Unmounted, the server holds nothing
    /// but its root, and a restored one starts the next session afresh.
    fn snapshot_refusal(&self) -> Option<String> {
        self.session.load(Ordering::Acquire).then(|| {
            let end = self.tag.iter().position(|&b| b == 0).unwrap_or(TAG_LEN);
            format!(
                "the guest has the shared folder tagged {:?} mounted",
                String::from_utf8_lossy(&self.tag[..end])
            )
        })
    }

    fn shutdown(&mut self) {
        self.thread.stop();
    }
}

struct Worker {
    server: Server,
    kick: Arc<EventFd>,
    shared: Arc<Mutex<Shared<bool>>>,
}

impl Worker {
    fn run(mut self) {
        loop {
            let more = {
                let shared = self.shared.clone();
                let mut g = device_thread::lock(&shared);
                if g.stop {
                    return;
                }
                if std::mem::take(&mut g.extra) {
                    // The driver reset the device: its FUSE session is over.
                    self.server.reset_session();
                }
                match (g.quiesced, g.active.as_mut()) {
                    (false, Some(q)) => serve(&mut self.server, q),
                    _ => false,
                }
            };
            if !more {
                wait(&self.kick, POLL_INTERVAL);
            }
        }
    }
}

/// Waits for `kick` (or `timeout`) and consumes it.
fn wait(kick: &EventFd, timeout: Duration) {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd {
        fd: kick.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the whole call.
    let n = unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as libc::c_int) };
    if n > 0 {
        let _ = kick.read();
    }
}

/// One pass over both queues, at most a queue's worth of chains each (a driver that keeps
/// publishing cannot hold the thread here). Returns whether chains may be left.
pub fn serve(server: &mut Server, q: &mut ActiveQueues) -> bool {
    let mut used_any = false;
    let mut more = false;
    for index in [HIPRIO, REQUESTS] {
        let Some(queue) = q.queues.get_mut(index) else {
            continue;
        };
        let budget = queue.size;
        let mut served = 0u16;
        loop {
            if q.interrupt.needs_reset() {
                break;
            }
            if served == budget {
                more = true;
                break;
            }
            let chain = match pop_chain(queue, &q.mem, &q.interrupt) {
                Popped::Chain(c) => c,
                Popped::Empty => break,
                Popped::Broken => {
                    used_any = true;
                    break;
                }
            };
            served += 1;
            used_any = true;
            let Some(written) = serve_chain(server, &q.mem, &chain.descs) else {
                let _ = queue.add_used(&q.mem, chain.head, 0);
                q.interrupt.set_needs_reset();
                break;
            };
            if queue.add_used(&q.mem, chain.head, written).is_err() {
                q.interrupt.set_needs_reset();
                break;
            }
        }
    }
    if used_any {
        q.interrupt.signal_used();
    }
    more
}

/// Serves one chain; returns the bytes written into its writable part, or `None` when a
/// buffer lies outside guest RAM (the driver broke the protocol).
pub fn serve_chain(
    server: &mut Server,
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
) -> Option<u32> {
    if descs.iter().any(|d| !d.in_ram(mem)) {
        return None;
    }
    let sum = |write: bool| -> u64 {
        descs
            .iter()
            .filter(|d| d.is_write_only() == write)
            .map(|d| u64::from(d.len))
            .sum()
    };
    let (readable, room) = (sum(false), sum(true));
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    let reply = if readable > MAX_REQUEST as u64 {
        let mut header = [0u8; super::protocol::IN_HEADER_LEN];
        gather(mem, descs, 0, &mut header).ok()?;
        server.refuse(&header, Errno(libc::E2BIG), room)
    } else {
        let mut req = vec![0u8; readable as usize];
        gather(mem, descs, 0, &mut req).ok()?;
        server.handle(&req, room)
    };
    match reply {
        Some(bytes) => scatter(mem, descs, &[&bytes]),
        None => Some(0),
    }
}
