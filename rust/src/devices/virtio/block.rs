//! virtio-blk backed by a raw image file, read-only or read-write. Requests are served
//! synchronously when the driver notifies the queue.
//!
//! Request layout: a 16-byte header (type, reserved, sector) in the readable part, data
//! buffers, and a final writable status byte. Malformed requests (buffers outside RAM, wrong
//! directions, lengths that are not whole sectors, ranges past the end of the disk, writes to a
//! read-only disk, transfers over [`MAX_REQUEST_BYTES`]) complete with `VIRTIO_BLK_S_IOERR`;
//! chains without a usable status byte or that cannot be walked mark the device
//! `DEVICE_NEEDS_RESET`, after which nothing more is served until the driver resets it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::queue::{gather, Descriptor, Queue};
use super::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vmm::os_msg;

pub const SECTOR_SIZE: u64 = 512;
const VIRTIO_ID_BLOCK: u32 = 2;
const QUEUE_SIZE: u16 = 256;
/// Bytes moved per host read/write call (bounce buffer size).
const CHUNK: usize = 1 << 20;
/// Largest data transfer of one request. Linux sends at most a few MiB (one segment, since
/// no segment limit is offered); anything larger is refused rather than tying the vCPU up.
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk image {0} not found")]
    NotFound(String),
    #[error("cannot open disk image {path}: {msg}")]
    Open { path: String, msg: String },
}

/// Result of one request (the status byte, and bytes written into guest buffers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    pub written: u32,
}

pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    active: Option<Active>,
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

impl Block {
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let p = path.display().to_string();
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
        Ok(Block {
            file,
            read_only,
            capacity_sectors: len / SECTOR_SIZE,
            id,
            active: None,
        })
    }

    /// Serves the available requests: at most a queue's worth per notification (the driver
    /// notifies after publishing each batch, so nothing is left behind, and a driver that keeps
    /// publishing on another vCPU cannot keep this one here forever). Nothing is served once
    /// the device needs a reset.
    fn process(&mut self) {
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
                    used_any = true;
                    let descs = chain.descs;
                    let Some(status_desc) = descs
                        .last()
                        .copied()
                        .filter(|d| d.is_write_only() && d.len >= 1 && d.in_ram(&mem))
                    else {
                        // No place to report the status: the driver broke the protocol.
                        let _ = active.queue.add_used(&mem, chain.head, 0);
                        active.interrupt.set_needs_reset();
                        break;
                    };
                    let c = serve(
                        &self.file,
                        self.read_only,
                        self.capacity_sectors,
                        &self.id,
                        &mem,
                        &descs,
                    );
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

/// Serves one request whose last descriptor (the status byte) has already been checked.
pub fn serve(
    file: &File,
    read_only: bool,
    capacity_sectors: u64,
    id: &[u8],
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
) -> Completion {
    // Every buffer must lie in guest RAM.
    if descs.iter().any(|d| !d.in_ram(mem)) {
        return ioerr();
    }
    let mut header = [0u8; 16];
    if gather(mem, descs, 0, &mut header).is_err() {
        return ioerr();
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
        return ioerr(); // header shorter than 16 bytes
    }
    let data_len: u64 = segments.iter().map(|d| u64::from(d.len)).sum();

    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = kind == VIRTIO_BLK_T_OUT;
            if write && read_only {
                return ioerr();
            }
            // Data buffers must go the right way: device-writable for reads, readable for writes.
            if segments.iter().any(|d| d.is_write_only() == write) {
                return ioerr();
            }
            if data_len % SECTOR_SIZE != 0 || data_len > MAX_REQUEST_BYTES {
                return ioerr();
            }
            let end = sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|start| start.checked_add(data_len));
            let Some(end) = end.filter(|e| *e <= capacity_sectors * SECTOR_SIZE) else {
                return ioerr();
            };
            let mut offset = end - data_len;
            let mut buf = Vec::new();
            for d in &segments {
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
                written: if write { 0 } else { data_len as u32 },
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            if !read_only && file.sync_data().is_err() {
                return ioerr();
            }
            Completion {
                status: VIRTIO_BLK_S_OK as u8,
                written: 0,
            }
        }
        VIRTIO_BLK_T_GET_ID => {
            let Some(d) = segments.first().filter(|d| d.is_write_only()) else {
                return ioerr();
            };
            let n = (d.len as usize).min(id.len());
            if mem.write_slice(&id[..n], GuestAddress(d.addr)).is_err() {
                return ioerr();
            }
            Completion {
                status: VIRTIO_BLK_S_OK as u8,
                written: n as u32,
            }
        }
        _ => Completion {
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
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn notify(&mut self, index: u16) {
        if index == 0 {
            self.process();
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn live_queues(&self) -> Option<Vec<Queue>> {
        self.active.as_ref().map(|a| vec![a.queue.clone()])
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
        (Block::open(&path, read_only).unwrap(), path)
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
        (Block::open(&path, false).unwrap(), path)
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
        let mut blk = Block::open(&path, false).unwrap();
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
}
