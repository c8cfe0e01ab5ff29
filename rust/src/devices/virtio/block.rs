//! virtio-blk backed by a raw image file, read-only or read-write. Requests are served
//! synchronously when the driver notifies the queue, on the vCPU thread that notified it.
//!
//! Request layout: a 16-byte header (type, reserved, sector) in the readable part, data
//! buffers, and a final writable status byte. Malformed requests (buffers outside RAM, wrong
//! directions, lengths that are not whole sectors, ranges past the end of the disk, writes to a
//! read-only disk, transfers over [`MAX_REQUEST_BYTES`]) complete with `VIRTIO_BLK_S_IOERR`;
//! chains without a usable status byte or that cannot be walked mark the device
//! `DEVICE_NEEDS_RESET`, after which nothing more is served until the driver resets it.
//!
//! # Rate limits
//!
//! A disk may have a [`RateLimit`] (bytes and operations per second, token buckets). Every
//! request costs one operation, and reads and writes also the bytes they move. A request the
//! buckets cannot grant yet is put back on the available ring (not popped), nothing behind it
//! is served, and a small timer thread owned by the disk serves the queue again when the
//! limiter says the wait is over. We chose that over waiting on the vCPU thread because:
//!
//! * the vCPU never sleeps for tokens, so `pause`/`stop` of the VM are exactly as prompt as
//!   without a limit, and the guest keeps running (timers, other devices, its agent) while its
//!   disk is throttled, as on real hardware (and as Firecracker does with its timerfd);
//! * the guest stays correct: requests complete in the order the driver made them available,
//!   and a request that was waiting when a snapshot was taken is still on the available ring
//!   in the snapshot, so the restored device serves it ([`VirtioDevice::restored`]);
//! * every wait is bounded: a [`RateLimit`] is validated, so the longest wait (the largest
//!   request at the lowest rate) is about a minute; a request larger than the bucket is granted
//!   once the bucket is full, never held forever; and the timer thread wakes at once for a
//!   quiesce, a resume or shutdown.
//!
//! A disk without a limit has no timer thread and serves exactly as before.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::queue::{gather, Descriptor, Queue};
use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::rate_limiter::{Decision, RateLimit, RateLimitError, RateLimiter};
use crate::vmm::os_msg;

pub const SECTOR_SIZE: u64 = 512;
const VIRTIO_ID_BLOCK: u32 = 2;
const QUEUE_SIZE: u16 = 256;
/// Bytes moved per host read/write call (bounce buffer size).
const CHUNK: usize = 1 << 20;
/// Largest data transfer of one request. Linux sends at most a few MiB (one segment, since
/// no segment limit is offered); anything larger is refused rather than tying the vCPU up.
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;
/// Longest single sleep of the rate-limit timer thread; it re-reads the clock after each
/// (a safety net only: it is woken explicitly for everything it must react to).
const MAX_TIMER_SLEEP: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk image {0} not found")]
    NotFound(String),
    #[error("cannot open disk image {path}: {msg}")]
    Open { path: String, msg: String },
    #[error("invalid rate limit for disk image {path}: {source}")]
    RateLimit {
        path: String,
        source: RateLimitError,
    },
    #[error("cannot start the rate-limit thread of disk image {path}: {msg}")]
    Thread { path: String, msg: String },
}

/// Result of one request (the status byte, and bytes written into guest buffers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    pub written: u32,
}

pub struct Block {
    read_only: bool,
    capacity_sectors: u64,
    engine: Arc<Engine>,
    /// The rate-limit timer thread (only with a rate limit).
    timer: Option<JoinHandle<()>>,
}

/// What the vCPU (on notify) and the timer thread (when a wait is over) share.
struct Engine {
    state: Mutex<State>,
    /// Wakes the timer thread: a new wait, a quiesce change, shutdown.
    wake: Condvar,
}

impl Engine {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a thread panicked while holding it; the state is plain
        // data and the queue indices stay consistent (they move one request at a time).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct State {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    active: Option<Active>,
    limiter: Option<RateLimiter>,
    /// Set while a request waits for tokens: when the timer thread serves the queue again.
    resume_at: Option<Instant>,
    /// A snapshot is being taken: the timer thread leaves guest memory alone.
    quiesced: bool,
    /// The VM is going away: the timer thread ends.
    stop: bool,
    clock: Clock,
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// Where the rate limiter reads the time.
#[derive(Clone)]
enum Clock {
    Monotonic,
    /// Tests: a clock that moves only when the test moves it.
    #[cfg(test)]
    Manual(Arc<Mutex<Instant>>),
}

impl Clock {
    fn now(&self) -> Instant {
        match self {
            Clock::Monotonic => Instant::now(),
            #[cfg(test)]
            Clock::Manual(t) => *t.lock().unwrap(),
        }
    }
}

impl Block {
    /// Opens the disk image at `path`; with `rate_limit`, also validates it and starts the
    /// disk's rate-limit timer thread.
    pub fn open(
        path: &Path,
        read_only: bool,
        rate_limit: Option<RateLimit>,
    ) -> Result<Self, BlockError> {
        Self::open_with_clock(path, read_only, rate_limit, Clock::Monotonic)
    }

    fn open_with_clock(
        path: &Path,
        read_only: bool,
        rate_limit: Option<RateLimit>,
        clock: Clock,
    ) -> Result<Self, BlockError> {
        let p = path.display().to_string();
        let limiter = rate_limit
            .map(|l| RateLimiter::new(&l, clock.now()))
            .transpose()
            .map_err(|source| BlockError::RateLimit {
                path: p.clone(),
                source,
            })?;
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    BlockError::NotFound(p.clone())
                } else {
                    BlockError::Open {
                        path: p.clone(),
                        msg: os_msg(&e),
                    }
                }
            })?;
        let len = file
            .metadata()
            .map_err(|e| BlockError::Open {
                path: p.clone(),
                msg: os_msg(&e),
            })?
            .len();
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        let throttled = limiter.is_some();
        let engine = Arc::new(Engine {
            state: Mutex::new(State {
                file,
                read_only,
                capacity_sectors: len / SECTOR_SIZE,
                id,
                active: None,
                limiter,
                resume_at: None,
                quiesced: false,
                stop: false,
                clock,
            }),
            wake: Condvar::new(),
        });
        // Started here, with the device, so that it exists before any sandboxing of the
        // process's threads (never spawned later, from a vCPU).
        let timer = if throttled {
            let engine = engine.clone();
            let handle = std::thread::Builder::new()
                .name("blk-ratelimit".into())
                .spawn(move || {
                    // In a worker: this thread's filter before it touches anything. A disk
                    // thread that cannot be filtered must not run unfiltered, nor leave the
                    // guest's I/O hanging: the worker ends (its panic hook reports it).
                    if let Err(e) =
                        crate::worker::seccomp::apply(crate::worker::seccomp::ThreadKind::Device)
                    {
                        panic!("the disk's rate-limit thread cannot install its filter: {e}");
                    }
                    run_timer(&engine)
                })
                .map_err(|e| BlockError::Thread {
                    path: p.clone(),
                    msg: os_msg(&e),
                })?;
            Some(handle)
        } else {
            None
        };
        Ok(Block {
            read_only,
            capacity_sectors: len / SECTOR_SIZE,
            engine,
            timer,
        })
    }

    /// Serves available requests now and, if one has to wait for tokens, hands the queue to
    /// the timer thread.
    fn serve_queue(&self) {
        let mut g = self.engine.lock();
        let now = g.clock.now();
        g.process(now);
        if g.resume_at.is_some() {
            self.engine.wake.notify_all();
        }
    }
}

/// The rate-limit timer thread of one disk: serves the queue when a throttled request's wait
/// is over. It holds the device lock only while serving, never while sleeping.
fn run_timer(engine: &Engine) {
    let mut g = engine.lock();
    while !g.stop {
        let now = g.clock.now();
        let sleep = match g.resume_at {
            Some(at) if !g.quiesced && now >= at => {
                g.process(now);
                continue;
            }
            Some(at) if !g.quiesced => Some((at - now).min(MAX_TIMER_SLEEP)),
            _ => None,
        };
        g = match sleep {
            Some(d) => {
                engine
                    .wake
                    .wait_timeout(g, d)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
            None => engine.wake.wait(g).unwrap_or_else(|e| e.into_inner()),
        };
    }
}

impl State {
    /// Serves the available requests: at most a queue's worth per call (the driver notifies
    /// after publishing each batch, so nothing is left behind, and a driver that keeps
    /// publishing on another vCPU cannot keep this one here forever). Stops at the first
    /// request the rate limiter cannot grant yet, leaving it on the ring and `resume_at` set.
    /// Nothing is served once the device needs a reset.
    fn process(&mut self, now: Instant) {
        // Still waiting for tokens: the buckets cannot have enough before `resume_at` (nothing
        // was taken since they said so), and the timer thread serves the queue then.
        if self.resume_at.is_some_and(|at| now < at) {
            return;
        }
        self.resume_at = None;
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut used_any = false;
        for _ in 0..active.queue.size {
            if active.interrupt.needs_reset() {
                break;
            }
            match active.queue.pop(&mem) {
                Ok(None) => break,
                Ok(Some(chain)) => {
                    let descs = chain.descs;
                    let Some(status_desc) = descs
                        .last()
                        .copied()
                        .filter(|d| d.is_write_only() && d.len >= 1 && d.in_ram(&mem))
                    else {
                        // No place to report the status: the driver broke the protocol.
                        let _ = active.queue.add_used(&mem, chain.head, 0);
                        active.interrupt.set_needs_reset();
                        used_any = true;
                        break;
                    };
                    let request = parse(self.read_only, self.capacity_sectors, &mem, &descs);
                    if let Some(limiter) = self.limiter.as_mut() {
                        // Refused requests cost an operation too (they cost the host an exit).
                        let bytes = match &request {
                            Ok(Request::Io { len, .. }) => *len,
                            _ => 0,
                        };
                        if let Decision::Wait(wait) = limiter.consume(bytes, now) {
                            // Back on the ring: served first once the wait is over, so the
                            // completions keep the driver's order.
                            active.queue.undo_pop();
                            // Validated limits keep waits to minutes; the fallback is unreachable.
                            self.resume_at =
                                Some(now.checked_add(wait).unwrap_or(now + MAX_TIMER_SLEEP));
                            break;
                        }
                    }
                    used_any = true;
                    let c = match request {
                        Ok(r) => execute(&self.file, &self.id, &mem, &r),
                        Err(c) => c,
                    };
                    let status_addr = status_desc.addr + u64::from(status_desc.len) - 1;
                    let _ = mem.write_obj(c.status, GuestAddress(status_addr));
                    if active
                        .queue
                        .add_used(&mem, chain.head, c.written + 1)
                        .is_err()
                    {
                        active.interrupt.set_needs_reset();
                        break;
                    }
                }
                Err(Ok(bad)) => {
                    let _ = active.queue.add_used(&mem, bad.head, 0);
                    active.interrupt.set_needs_reset();
                    used_any = true;
                }
                Err(Err(_)) => {
                    active.interrupt.set_needs_reset();
                    break;
                }
            }
        }
        if used_any {
            active.interrupt.signal_used();
        }
    }
}

fn ioerr() -> Completion {
    Completion {
        status: VIRTIO_BLK_S_IOERR as u8,
        written: 0,
    }
}

/// A request that passed every check, ready to run.
enum Request {
    /// Read (`write == false`) or write `len` bytes at byte `offset` of the disk.
    Io {
        write: bool,
        offset: u64,
        len: u64,
        segments: Vec<Descriptor>,
    },
    /// Flush; `sync` is false on a read-only disk (nothing to write back).
    Flush {
        sync: bool,
    },
    /// Write the disk's id into this buffer.
    GetId(Descriptor),
    Unsupported,
}

/// Serves one request whose last descriptor (the status byte) has already been checked.
pub fn serve(
    file: &File,
    read_only: bool,
    capacity_sectors: u64,
    id: &[u8],
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
) -> Completion {
    match parse(read_only, capacity_sectors, mem, descs) {
        Ok(request) => execute(file, id, mem, &request),
        Err(refused) => refused,
    }
}

/// Checks a request whose last descriptor (the status byte) has already been checked;
/// `Err` is the completion of a refused one.
fn parse(
    read_only: bool,
    capacity_sectors: u64,
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
) -> Result<Request, Completion> {
    // Every buffer must lie in guest RAM.
    if descs.iter().any(|d| !d.in_ram(mem)) {
        return Err(ioerr());
    }
    let mut header = [0u8; 16];
    if gather(mem, descs, 0, &mut header).is_err() {
        return Err(ioerr());
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));

    // Data segments: everything after the 16 header bytes, up to the status byte.
    let mut segments: Vec<Descriptor> = Vec::new();
    let mut skip = 16u64;
    let last = descs.len() - 1;
    for (i, d) in descs.iter().enumerate() {
        let mut d = *d;
        if i == last {
            d.len -= 1;
        }
        let dlen = u64::from(d.len);
        if !d.is_write_only() && skip > 0 {
            let s = skip.min(dlen);
            skip -= s;
            d.addr += s;
            d.len -= s as u32;
        }
        if d.len > 0 {
            segments.push(d);
        }
    }
    if skip > 0 {
        return Err(ioerr()); // header shorter than 16 bytes
    }
    let data_len: u64 = segments.iter().map(|d| u64::from(d.len)).sum();

    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = kind == VIRTIO_BLK_T_OUT;
            if write && read_only {
                return Err(ioerr());
            }
            // Data buffers must go the right way: device-writable for reads, readable for writes.
            if segments.iter().any(|d| d.is_write_only() == write) {
                return Err(ioerr());
            }
            if !data_len.is_multiple_of(SECTOR_SIZE) || data_len > MAX_REQUEST_BYTES {
                return Err(ioerr());
            }
            let end = sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|start| start.checked_add(data_len));
            let Some(end) = end.filter(|e| *e <= capacity_sectors * SECTOR_SIZE) else {
                return Err(ioerr());
            };
            Ok(Request::Io {
                write,
                offset: end - data_len,
                len: data_len,
                segments,
            })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Request::Flush { sync: !read_only }),
        VIRTIO_BLK_T_GET_ID => match segments.first().filter(|d| d.is_write_only()) {
            Some(d) => Ok(Request::GetId(*d)),
            None => Err(ioerr()),
        },
        _ => Ok(Request::Unsupported),
    }
}

/// Runs a request [`parse`] accepted.
fn execute(file: &File, id: &[u8], mem: &GuestMemoryMmap, request: &Request) -> Completion {
    match request {
        Request::Io {
            write,
            offset,
            len,
            segments,
        } => {
            let write = *write;
            let mut offset = *offset;
            let mut buf = Vec::new();
            for d in segments {
                let mut done = 0u64;
                while done < u64::from(d.len) {
                    let n = ((u64::from(d.len) - done) as usize).min(CHUNK);
                    buf.resize(n, 0);
                    let gpa = GuestAddress(d.addr + done);
                    let ok = if write {
                        mem.read_slice(&mut buf, gpa).is_ok()
                            && file.write_all_at(&buf, offset).is_ok()
                    } else {
                        file.read_exact_at(&mut buf, offset).is_ok()
                            && mem.write_slice(&buf, gpa).is_ok()
                    };
                    if !ok {
                        return ioerr();
                    }
                    done += n as u64;
                    offset += n as u64;
                }
            }
            Completion {
                status: VIRTIO_BLK_S_OK as u8,
                written: if write { 0 } else { *len as u32 },
            }
        }
        Request::Flush { sync } => {
            if *sync && file.sync_data().is_err() {
                return ioerr();
            }
            Completion {
                status: VIRTIO_BLK_S_OK as u8,
                written: 0,
            }
        }
        Request::GetId(d) => {
            let n = (d.len as usize).min(id.len());
            if mem.write_slice(&id[..n], GuestAddress(d.addr)).is_err() {
                return ioerr();
            }
            Completion {
                status: VIRTIO_BLK_S_OK as u8,
                written: n as u32,
            }
        }
        Request::Unsupported => Completion {
            status: VIRTIO_BLK_S_UNSUPP as u8,
            written: 0,
        },
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | (1 << VIRTIO_BLK_F_FLUSH);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        // Only `capacity` (le64 sectors) is offered.
        let cfg = self.capacity_sectors.to_le_bytes();
        data.copy_from_slice(&cfg[offset..offset + data.len()]);
    }

    fn config_len(&self) -> usize {
        8
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), String> {
        let queue = queues.pop().ok_or("virtio-blk has one queue")?;
        self.engine.lock().active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn notify(&mut self, index: u16) {
        if index == 0 {
            self.serve_queue();
        }
    }

    fn reset(&mut self) {
        // The buckets are kept: a reset is no way to get fresh tokens.
        let mut g = self.engine.lock();
        g.active = None;
        g.resume_at = None;
    }

    fn shutdown(&mut self) {
        {
            let mut g = self.engine.lock();
            g.active = None;
            g.resume_at = None;
            g.stop = true;
        }
        self.engine.wake.notify_all();
        if let Some(t) = self.timer.take() {
            let _ = t.join();
        }
    }

    fn live_queues(&self) -> Option<Vec<Queue>> {
        self.engine
            .lock()
            .active
            .as_ref()
            .map(|a| vec![a.queue.clone()])
    }

    fn set_quiesced(&mut self, quiesced: bool) {
        // Taking the lock also waits for a pass of the timer thread in progress to finish.
        self.engine.lock().quiesced = quiesced;
        self.engine.wake.notify_all();
    }

    fn restored(&mut self) {
        // Requests that were waiting for tokens when the snapshot was taken are still on the
        // available ring, and the driver will not notify for them again.
        self.serve_queue();
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        if self.timer.is_some() {
            self.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::tests::{publish, put_desc, queue, ram, AVAIL, USED};
    use crate::devices::virtio::queue::{VIRTQ_DESC_F_NEXT as N, VIRTQ_DESC_F_WRITE as W};
    use std::path::PathBuf;
    use vmm_sys_util::eventfd::EventFd;

    fn disk(read_only: bool) -> (Block, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!(
            "sm-blk-{}-{}.img",
            std::process::id(),
            read_only as u8
        ));
        let mut data = vec![0u8; 8 * 512];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 512) as u8 + b'A';
        }
        std::fs::write(&path, data).unwrap();
        (Block::open(&path, read_only, None).unwrap(), path)
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn status(mem: &GuestMemoryMmap, at: u64) -> u8 {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    #[test]
    fn reads_writes_and_refusals() {
        let r = ram();
        let m = r.mem.clone();
        let (mut blk, path) = disk(false);
        let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        blk.activate(m.clone(), vec![queue(8)], irq.clone())
            .unwrap();
        assert_eq!(blk.capacity_sectors, 8);

        // Read sector 2.
        header(&m, 0x8000, VIRTIO_BLK_T_IN, 2);
        put_desc(&m, 0, 0x8000, 16, N, 1);
        put_desc(&m, 1, 0x9000, 512, N | W, 2);
        put_desc(&m, 2, 0xa000, 1, W, 0);
        publish(&m, 0, 0, 1);
        blk.notify(0);
        assert_eq!(status(&m, 0xa000), VIRTIO_BLK_S_OK as u8);
        let mut b = [0u8; 512];
        m.read_slice(&mut b, GuestAddress(0x9000)).unwrap();
        assert!(b.iter().all(|&c| c == b'C'));
        assert_eq!(m.read_obj::<u32>(GuestAddress(USED + 8)).unwrap(), 513);
        assert_ne!(irq.status() & 1, 0);

        // Write sector 7, then past the end.
        header(&m, 0x8000, VIRTIO_BLK_T_OUT, 7);
        m.write_slice(&[b'z'; 512], GuestAddress(0x9000)).unwrap();
        put_desc(&m, 1, 0x9000, 512, N, 2);
        publish(&m, 1, 0, 2);
        blk.notify(0);
        assert_eq!(status(&m, 0xa000), VIRTIO_BLK_S_OK as u8);
        assert_eq!(
            &std::fs::read(&path).unwrap()[7 * 512..7 * 512 + 4],
            b"zzzz"
        );
        header(&m, 0x8000, VIRTIO_BLK_T_OUT, 8);
        publish(&m, 2, 0, 3);
        blk.notify(0);
        assert_eq!(status(&m, 0xa000), VIRTIO_BLK_S_IOERR as u8);

        // Data buffer outside RAM; huge length; partial sector.
        header(&m, 0x8000, VIRTIO_BLK_T_IN, 0);
        put_desc(&m, 1, 0xdead_0000, 512, N | W, 2);
        publish(&m, 3, 0, 4);
        blk.notify(0);
        assert_eq!(status(&m, 0xa000), VIRTIO_BLK_S_IOERR as u8);
        put_desc(&m, 1, 0x9000, 0xffff_0000, N | W, 2);
        publish(&m, 4, 0, 5);
        blk.notify(0);
        assert_eq!(status(&m, 0xa000), VIRTIO_BLK_S_IOERR as u8);
        put_desc(&m, 1, 0x9000, 100, N | W, 2);
        publish(&m, 5, 0, 6);
        blk.notify(0);
        assert_eq!(status(&m, 0xa000), VIRTIO_BLK_S_IOERR as u8);

        // GET_ID and an unsupported type.
        header(&m, 0x8000, VIRTIO_BLK_T_GET_ID, 0);
        put_desc(&m, 1, 0x9000, 20, N | W, 2);
        publish(&m, 6, 0, 7);
        blk.notify(0);
        assert_eq!(status(&m, 0xa000), VIRTIO_BLK_S_OK as u8);
        header(&m, 0x8000, 99, 0);
        publish(&m, 7, 0, 8);
        blk.notify(0);
        assert_eq!(status(&m, 0xa000), VIRTIO_BLK_S_UNSUPP as u8);
        assert!(!irq.needs_reset());

        // A loop marks the device broken.
        put_desc(&m, 2, 0xa000, 1, N | W, 0);
        publish(&m, 0, 0, 9);
        blk.notify(0);
        assert!(irq.needs_reset());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let r = ram();
        let m = r.mem.clone();
        let (mut blk, path) = disk(true);
        assert_ne!(blk.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        blk.activate(m.clone(), vec![queue(8)], irq).unwrap();
        header(&m, 0x8000, VIRTIO_BLK_T_OUT, 0);
        put_desc(&m, 0, 0x8000, 16, N, 1);
        put_desc(&m, 1, 0x9000, 512, N, 2);
        put_desc(&m, 2, 0xa000, 1, W, 0);
        publish(&m, 0, 0, 1);
        blk.notify(0);
        assert_eq!(status(&m, 0xa000), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(std::fs::read(&path).unwrap()[0], b'A');
        std::fs::remove_file(path).unwrap();
    }

    /// A read-write disk of `sectors` sectors, each filled by `fill(sector, bytes)`.
    fn disk_with(name: &str, sectors: u64, fill: impl Fn(u64, &mut [u8])) -> (Block, PathBuf) {
        let path = std::env::temp_dir().join(format!("sm-blk-{}-{name}.img", std::process::id()));
        let mut data = vec![0u8; (sectors * SECTOR_SIZE) as usize];
        for (i, chunk) in data.chunks_mut(SECTOR_SIZE as usize).enumerate() {
            fill(i as u64, chunk);
        }
        std::fs::write(&path, data).unwrap();
        (Block::open(&path, false, None).unwrap(), path)
    }

    fn used_idx(mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    #[test]
    fn a_read_that_keeps_publishing_requests_ends_with_the_notification() {
        // Each read lands on the available ring and its own request header: sector k makes
        // request k + 1 available and points it at sector k + 1, so without a bound the
        // device would serve this one notification until the disk ends (or forever).
        const HEADER: u64 = AVAIL + 0x100;
        let (mut blk, path) = disk_with("self-publishing", 64, |k, b| {
            b[2..4].copy_from_slice(&(k as u16 + 2).to_le_bytes());
            b[0x108..0x110].copy_from_slice(&(k + 1).to_le_bytes());
        });
        let r = ram();
        let m = r.mem.clone();
        let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        blk.activate(m.clone(), vec![queue(8)], irq.clone())
            .unwrap();
        header(&m, HEADER, VIRTIO_BLK_T_IN, 0);
        put_desc(&m, 0, HEADER, 16, N, 1);
        put_desc(&m, 1, AVAIL, 512, N | W, 2);
        put_desc(&m, 2, 0xa000, 1, W, 0);
        publish(&m, 0, 0, 1);
        blk.notify(0);
        assert_eq!(
            used_idx(&m),
            8,
            "one notification serves at most a queue's worth"
        );
        assert_eq!(status(&m, 0xa000), VIRTIO_BLK_S_OK as u8);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn nothing_is_served_after_the_device_needs_a_reset() {
        let (mut blk, path) = disk_with("needs-reset", 8, |_, _| {});
        let r = ram();
        let m = r.mem.clone();
        let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        blk.activate(m.clone(), vec![queue(8)], irq.clone())
            .unwrap();
        // A chain without a status byte, then a good request.
        put_desc(&m, 3, 0x8000, 16, 0, 0);
        header(&m, 0x8000, VIRTIO_BLK_T_IN, 0);
        put_desc(&m, 0, 0x8000, 16, N, 1);
        put_desc(&m, 1, 0x9000, 512, N | W, 2);
        put_desc(&m, 2, 0xa000, 1, W, 0);
        m.write_obj(0xffu8, GuestAddress(0xa000)).unwrap();
        publish(&m, 0, 3, 1);
        publish(&m, 1, 0, 2);
        blk.notify(0);
        assert!(irq.needs_reset());
        assert_eq!(used_idx(&m), 1, "only the broken chain is returned");
        assert_eq!(status(&m, 0xa000), 0xff);
        blk.notify(0);
        assert_eq!(used_idx(&m), 1);
        // The avail index jumping far beyond the queue is no reason to loop either.
        let (mut blk, path2) = disk_with("index-jump", 8, |_, _| {});
        let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        let r = ram();
        let m = r.mem.clone();
        blk.activate(m.clone(), vec![queue(8)], irq.clone())
            .unwrap();
        m.write_obj(40000u16, GuestAddress(AVAIL + 2)).unwrap();
        blk.notify(0);
        assert!(irq.needs_reset());
        assert_eq!(used_idx(&m), 0);
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(path2).unwrap();
    }

    #[test]
    fn oversized_requests_are_refused() {
        // 130 overlapping 512 KiB buffers: 65 MiB in one request, in 1 MiB of guest RAM.
        let path = std::env::temp_dir().join(format!("sm-blk-{}-big.img", std::process::id()));
        let f = File::create(&path).unwrap();
        f.set_len(MAX_REQUEST_BYTES * 2).unwrap();
        let mut blk = Block::open(&path, false, None).unwrap();
        let r = ram();
        let m = r.mem.clone();
        let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        let mut q = queue(256);
        q.desc_table = 0x4000;
        q.avail_ring = 0x6000;
        q.used_ring = 0x7000;
        blk.activate(m.clone(), vec![q], irq.clone()).unwrap();
        let put = |i: u16, addr: u64, len: u32, flags: u16| {
            let at = 0x4000 + 16 * u64::from(i);
            m.write_obj(addr, GuestAddress(at)).unwrap();
            m.write_obj(len, GuestAddress(at + 8)).unwrap();
            m.write_obj(flags, GuestAddress(at + 12)).unwrap();
            m.write_obj(i + 1, GuestAddress(at + 14)).unwrap();
        };
        header(&m, 0x8000, VIRTIO_BLK_T_IN, 0);
        put(0, 0x8000, 16, N);
        for i in 1..=130 {
            put(i, 0x10000, 512 << 10, N | W);
        }
        put(131, 0xa000, 1, W);
        m.write_obj(0u16, GuestAddress(0x6000 + 4)).unwrap();
        m.write_obj(1u16, GuestAddress(0x6000 + 2)).unwrap();
        blk.notify(0);
        assert_eq!(status(&m, 0xa000), VIRTIO_BLK_S_IOERR as u8);
        assert!(!irq.needs_reset());
        std::fs::remove_file(path).unwrap();
    }

    // ---- rate limits ----

    use crate::devices::rate_limiter::MIN_BYTES_PER_SEC;
    use std::sync::Mutex;

    const MIB: u64 = 1 << 20;
    /// Data buffer every test read lands in (they may overlap: only the accounting matters).
    const BUF: u64 = 0x10000;
    const PIECE: u64 = 256 << 10;

    /// A sparse disk of `bytes`, opened on a clock only the test moves.
    fn limited_disk(
        name: &str,
        bytes: u64,
        limit: Option<RateLimit>,
    ) -> (Block, PathBuf, Arc<Mutex<Instant>>) {
        let path = std::env::temp_dir().join(format!("sm-blk-{}-{name}.img", std::process::id()));
        File::create(&path).unwrap().set_len(bytes).unwrap();
        let clock = Arc::new(Mutex::new(Instant::now()));
        let blk =
            Block::open_with_clock(&path, false, limit, Clock::Manual(clock.clone())).unwrap();
        (blk, path, clock)
    }

    fn bytes_limit(bytes_per_sec: u64) -> Option<RateLimit> {
        Some(RateLimit {
            bytes_per_sec: Some(bytes_per_sec),
            ..RateLimit::default()
        })
    }

    /// Lays out a read of `len` bytes at sector 0 as the chain starting at descriptor `first`:
    /// header, data in 256 KiB pieces over [`BUF`], status byte at `0xa000 + first`.
    fn read_chain(m: &GuestMemoryMmap, first: u16, len: u64) {
        let hdr = 0x8000 + 0x20 * u64::from(first);
        header(m, hdr, VIRTIO_BLK_T_IN, 0);
        put_desc(m, first, hdr, 16, N, first + 1);
        let mut i = first + 1;
        let mut left = len;
        while left > 0 {
            let n = left.min(PIECE);
            put_desc(m, i, BUF, n as u32, N | W, i + 1);
            left -= n;
            i += 1;
        }
        m.write_obj(0xffu8, GuestAddress(0xa000 + u64::from(first)))
            .unwrap();
        put_desc(m, i, 0xa000 + u64::from(first), 1, W, 0);
    }

    fn used_head(m: &GuestMemoryMmap, n: u16) -> u16 {
        let slot = u64::from(n % 16);
        m.read_obj::<u32>(GuestAddress(USED + 4 + 8 * slot))
            .unwrap() as u16
    }

    fn set_clock(clock: &Mutex<Instant>, t: Instant) {
        *clock.lock().unwrap() = t;
    }

    /// Polls (bounded) until `used_idx` reaches `want`; returns the last value seen.
    fn wait_used(m: &GuestMemoryMmap, want: u16) -> u16 {
        for _ in 0..2000 {
            if used_idx(m) >= want {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        used_idx(m)
    }

    /// A driver that keeps four 64 KiB reads outstanding (re-publishing each as it completes)
    /// for `steps` clock steps of `step`, serving the queue at each. Returns, per step, the
    /// simulated time and the bytes completed so far; checks every completion is OK and in the
    /// order the requests were made available.
    fn drive(
        blk: &mut Block,
        clock: &Mutex<Instant>,
        step: Duration,
        steps: u32,
    ) -> Vec<(Duration, u64)> {
        const REQ: u64 = 64 << 10;
        let r = ram();
        let m = r.mem.clone();
        let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        blk.activate(m.clone(), vec![queue(16)], irq).unwrap();
        let heads = [0u16, 3, 6, 9];
        for (i, &h) in heads.iter().enumerate() {
            read_chain(&m, h, REQ);
            publish(&m, i as u16, h, i as u16 + 1);
        }
        let t0 = *clock.lock().unwrap();
        let mut published = 4u16;
        let mut seen = 0u16;
        let mut out = Vec::new();
        for s in 0..=steps {
            set_clock(clock, t0 + step * s);
            blk.notify(0);
            let used = used_idx(&m);
            for n in seen..used {
                let head = heads[usize::from(n % 4)];
                assert_eq!(used_head(&m, n), head, "completion {n} out of order");
                assert_eq!(status(&m, 0xa000 + u64::from(head)), VIRTIO_BLK_S_OK as u8);
                // The driver reuses the chain for a new request.
                m.write_obj(0xffu8, GuestAddress(0xa000 + u64::from(head)))
                    .unwrap();
                publish(&m, published % 16, head, published + 1);
                published += 1;
            }
            seen = used;
            out.push((step * s, u64::from(used) * REQ));
        }
        out
    }

    #[test]
    fn throttled_disk_is_held_to_its_rate_and_serves_in_order() {
        let rate = 2 * MIN_BYTES_PER_SEC;
        let (mut blk, path, clock) = limited_disk("rate", 4 * MIB, bytes_limit(rate));
        let step = Duration::from_millis(7);
        let trace = drive(&mut blk, &clock, step, 430); // about 3 s of simulated time
        for &(t, served) in &trace {
            let allowed = rate + (rate as u128 * t.as_nanos() / 1_000_000_000) as u64;
            assert!(
                served <= allowed,
                "{served} bytes served by {t:?}, allowed {allowed}"
            );
        }
        // Not starved either: at most one request and one step behind the rate.
        let (t, served) = *trace.last().unwrap();
        let due = rate + (rate as u128 * t.as_nanos() / 1_000_000_000) as u64;
        let slack = (64 << 10) + (rate as u128 * step.as_nanos() / 1_000_000_000) as u64;
        assert!(
            served + slack >= due,
            "{served} bytes served by {t:?}, due {due}"
        );
        // The first bucket-full went at once, the rest at the rate: more than 7 MiB in total.
        assert!(served > 7 * MIB);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn operations_are_limited_too() {
        let limit = RateLimit {
            ops_per_sec: Some(10),
            ..RateLimit::default()
        };
        let (mut blk, path, clock) = limited_disk("ops", MIB, Some(limit));
        let trace = drive(&mut blk, &clock, Duration::from_millis(50), 40); // 2 s
        for &(t, served) in &trace {
            let ops = served / (64 << 10);
            let allowed = 10 + (10 * t.as_millis() / 1000) as u64;
            assert!(
                ops <= allowed,
                "{ops} operations by {t:?}, allowed {allowed}"
            );
        }
        assert_eq!(trace.last().unwrap().1 / (64 << 10), 30);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_disk_without_a_limit_is_not_throttled() {
        let (mut blk, path, clock) = limited_disk("unlimited", MIB, None);
        assert!(blk.timer.is_none(), "no thread for a disk without a limit");
        // Time never moves, yet every request is served at once: 4 per step, 41 steps.
        let trace = drive(&mut blk, &clock, Duration::ZERO, 40);
        assert_eq!(trace.last().unwrap().1, 41 * 4 * (64 << 10));
        // A limit no disk reaches behaves the same.
        let (mut blk, path2, clock) = limited_disk(
            "generous",
            MIB,
            bytes_limit(crate::devices::rate_limiter::MAX_BYTES),
        );
        let trace = drive(&mut blk, &clock, Duration::ZERO, 40);
        assert_eq!(trace.last().unwrap().1, 41 * 4 * (64 << 10));
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(path2).unwrap();
    }

    #[test]
    fn a_request_larger_than_the_bucket_completes_and_is_paid_for() {
        let (mut blk, path, clock) = limited_disk("oversized", 4 * MIB, bytes_limit(MIB));
        let t0 = *clock.lock().unwrap();
        let r = ram();
        let m = r.mem.clone();
        let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        blk.activate(m.clone(), vec![queue(16)], irq).unwrap();
        // A: 2 MiB, twice what the bucket holds (descriptors 0..=9); B: 64 KiB (10..=12).
        read_chain(&m, 0, 2 * MIB);
        read_chain(&m, 10, 64 << 10);
        publish(&m, 0, 0, 1);
        publish(&m, 1, 10, 2);
        blk.notify(0);
        assert_eq!(
            used_idx(&m),
            1,
            "the full bucket lets the oversized read through"
        );
        assert_eq!(status(&m, 0xa000), VIRTIO_BLK_S_OK as u8);
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(USED + 8)).unwrap(),
            2 * MIB as u32 + 1
        );
        // It left a debt of 1 MiB: B waits for that plus its own 64 KiB.
        let wait = Duration::from_micros(1_062_500);
        assert_eq!(blk.engine.lock().resume_at, Some(t0 + wait));
        set_clock(&clock, t0 + wait - Duration::from_nanos(1));
        blk.notify(0);
        assert_eq!(used_idx(&m), 1);
        set_clock(&clock, t0 + wait);
        blk.notify(0);
        assert_eq!(used_idx(&m), 2);
        assert_eq!(status(&m, 0xa00a), VIRTIO_BLK_S_OK as u8);
        // The oversized read again, on an empty bucket: it waits for a full bucket (1 s), not
        // forever.
        m.write_obj(0xffu8, GuestAddress(0xa000)).unwrap();
        publish(&m, 2, 0, 3);
        blk.notify(0);
        assert_eq!(used_idx(&m), 2);
        assert_eq!(
            blk.engine.lock().resume_at,
            Some(t0 + wait + Duration::from_secs(1))
        );
        set_clock(&clock, t0 + wait + Duration::from_secs(1));
        blk.notify(0);
        assert_eq!(used_idx(&m), 3);
        assert_eq!(status(&m, 0xa000), VIRTIO_BLK_S_OK as u8);
        std::fs::remove_file(path).unwrap();
    }

    /// A disk whose second request waits for tokens: A (1 MiB) empties the bucket, B (64 KiB)
    /// must wait 62.5 ms of the test's clock.
    fn one_waiting(name: &str) -> (Block, PathBuf, Arc<Mutex<Instant>>, GuestRam) {
        let (mut blk, path, clock) = limited_disk(name, 2 * MIB, bytes_limit(MIB));
        let r = ram();
        let m = r.mem.clone();
        let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        blk.activate(m.clone(), vec![queue(16)], irq).unwrap();
        read_chain(&m, 0, MIB);
        read_chain(&m, 10, 64 << 10);
        publish(&m, 0, 0, 1);
        publish(&m, 1, 10, 2);
        blk.notify(0);
        // notify returned without serving B: the vCPU is never held for tokens.
        assert_eq!(used_idx(&m), 1);
        assert_eq!(status(&m, 0xa00a), 0xff);
        (blk, path, clock, r)
    }

    use crate::vmm::memory::GuestRam;

    #[test]
    fn the_timer_thread_serves_a_waiting_request_without_another_notification() {
        let (blk, path, clock, r) = one_waiting("timer");
        let m = r.mem.clone();
        let t0 = *clock.lock().unwrap();
        set_clock(&clock, t0 + Duration::from_secs(1));
        blk.engine.wake.notify_all();
        assert_eq!(wait_used(&m, 2), 2);
        assert_eq!(status(&m, 0xa00a), VIRTIO_BLK_S_OK as u8);
        drop(blk);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_quiesced_disk_serves_nothing_until_it_is_resumed() {
        let (mut blk, path, clock, r) = one_waiting("quiesce");
        let m = r.mem.clone();
        blk.set_quiesced(true);
        let t0 = *clock.lock().unwrap();
        set_clock(&clock, t0 + Duration::from_secs(1));
        blk.engine.wake.notify_all();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(used_idx(&m), 1, "a quiesced disk touched guest memory");
        blk.set_quiesced(false);
        assert_eq!(wait_used(&m, 2), 2);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn shutdown_does_not_wait_for_tokens() {
        let (mut blk, path, _clock, r) = one_waiting("shutdown");
        // The test's clock never moves, so the wait is never over: only the stop request can
        // end the timer thread (otherwise this join hangs).
        blk.shutdown();
        assert!(blk.timer.is_none());
        assert_eq!(used_idx(&r.mem), 1);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_request_waiting_at_snapshot_time_is_served_after_restore() {
        let (mut blk, path, _clock, r) = one_waiting("snapshot");
        let m = r.mem.clone();
        blk.set_quiesced(true);
        let saved = blk.live_queues().unwrap()[0].state();
        blk.shutdown();
        // The restored disk (here without a limit) serves B although nobody notifies again.
        let mut restored = Block::open(&path, false, None).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        restored
            .activate(m.clone(), vec![Queue::from_state(&saved)], irq.clone())
            .unwrap();
        restored.restored();
        assert_eq!(used_idx(&m), 2);
        assert_eq!(used_head(&m, 1), 10);
        assert_eq!(status(&m, 0xa00a), VIRTIO_BLK_S_OK as u8);
        assert_ne!(irq.status() & 1, 0);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn an_invalid_limit_is_refused_with_a_sentence() {
        let path =
            std::env::temp_dir().join(format!("sm-blk-{}-bad-limit.img", std::process::id()));
        File::create(&path).unwrap().set_len(4096).unwrap();
        let err = Block::open(&path, false, bytes_limit(0)).err().unwrap();
        assert_eq!(
            err.to_string(),
            format!(
                "invalid rate limit for disk image {}: bytes_per_sec is 0, but it must be \
                 between {MIN_BYTES_PER_SEC} and {}",
                path.display(),
                crate::devices::rate_limiter::MAX_BYTES
            )
        );
        std::fs::remove_file(path).unwrap();
    }
}
