//! Split virtqueues (virtio 1.x), read and written in guest memory with every guest-controlled
//! value checked: queue size, ring addresses and alignment, the available index, descriptor
//! indices, chain length and loops, and (on request) each buffer's range in guest RAM.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::vmm::memory::range_in_ram;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Largest queue size the spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// One virtqueue as the transport and device last saw it, as a snapshot keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct QueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("queue size {0} is not a power of two between 1 and the maximum {1}")]
    BadSize(u16, u16),
    #[error("{what} address {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        what: &'static str,
        addr: u64,
        align: u64,
    },
    #[error("{what} at {addr:#x} ({len} bytes) is outside guest RAM")]
    RingOutsideRam {
        what: &'static str,
        addr: u64,
        len: u64,
    },
    #[error("queue is not ready")]
    NotReady,
    #[error("available index jumped by {0}, more than the queue size")]
    AvailIndexJump(u16),
    #[error("descriptor index {0} is out of range")]
    BadIndex(u16),
    #[error("descriptor chain is longer than the queue (loop?)")]
    ChainTooLong,
    #[error("indirect descriptors were not negotiated")]
    Indirect,
    #[error("descriptor chain totals more than 4 GiB")]
    ChainOverflow,
    #[error("guest memory access failed at {0:#x}")]
    Memory(u64),
}

/// One descriptor of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
}

impl Descriptor {
    pub fn is_write_only(&self) -> bool {
        self.flags & VIRTQ_DESC_F_WRITE != 0
    }

    /// Whether the buffer lies entirely in guest RAM.
    pub fn in_ram(&self, mem: &GuestMemoryMmap) -> bool {
        range_in_ram(mem, self.addr, u64::from(self.len))
    }
}

/// A fully walked, structurally valid descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorChain {
    pub head: u16,
    pub descs: Vec<Descriptor>,
}

/// A popped chain that could not be walked: `head` must still be returned to the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadChain {
    pub head: u16,
    pub error: QueueError,
}

#[derive(Debug, Clone)]
pub struct Queue {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    next_avail: Wrapping<u16>,
    next_used: Wrapping<u16>,
}

impl Queue {
    pub fn new(max_size: u16) -> Self {
        Queue {
            max_size,
            size: max_size,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
            next_avail: Wrapping(0),
            next_used: Wrapping(0),
        }
    }

    pub fn reset(&mut self) {
        *self = Queue::new(self.max_size);
    }

    /// Everything a snapshot needs to rebuild this queue.
    pub fn state(&self) -> QueueState {
        QueueState {
            max_size: self.max_size,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
            next_avail: self.next_avail.0,
            next_used: self.next_used.0,
        }
    }

    /// A queue as saved by [`Queue::state`] (validate it before use).
    pub fn from_state(s: &QueueState) -> Self {
        Queue {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: Wrapping(s.next_avail),
            next_used: Wrapping(s.next_used),
        }
    }

    /// Checks the size and the three ring areas against guest RAM.
    pub fn validate(&self, mem: &GuestMemoryMmap) -> Result<(), QueueError> {
        let size = self.size;
        if size == 0 || size > self.max_size || !size.is_power_of_two() {
            return Err(QueueError::BadSize(size, self.max_size));
        }
        let n = u64::from(size);
        for (what, addr, align, len) in [
            ("descriptor table", self.desc_table, 16, 16 * n),
            ("available ring", self.avail_ring, 2, 6 + 2 * n),
            ("used ring", self.used_ring, 4, 6 + 8 * n),
        ] {
            if addr % align != 0 {
                return Err(QueueError::Misaligned { what, addr, align });
            }
            if !range_in_ram(mem, addr, len) {
                return Err(QueueError::RingOutsideRam { what, addr, len });
            }
        }
        Ok(())
    }

    fn read_u16(mem: &GuestMemoryMmap, addr: u64) -> Result<u16, QueueError> {
        mem.read_obj::<u16>(GuestAddress(addr))
            .map(u16::from_le)
            .map_err(|_| QueueError::Memory(addr))
    }

    /// Whether the driver has made chains available that were not popped yet.
    /// The driver's available index (how many buffers it has ever offered, modulo 2^16).
    pub fn avail_idx(&self, mem: &GuestMemoryMmap) -> Result<u16, QueueError> {
        Self::read_u16(mem, self.avail_ring + 2)
    }

    pub fn has_available(&self, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        if !self.ready {
            return Ok(false);
        }
        let idx = Self::read_u16(mem, self.avail_ring + 2)?;
        Ok(Wrapping(idx) != self.next_avail)
    }

    /// Pops the next available chain. `Ok(None)`: nothing available. `Err(Ok(bad))`: a chain
    /// whose head must be returned with length 0. `Err(Err(e))`: the ring itself is broken.
    #[allow(clippy::type_complexity)]
    pub fn pop(
        &mut self,
        mem: &GuestMemoryMmap,
    ) -> Result<Option<DescriptorChain>, Result<BadChain, QueueError>> {
        if !self.ready {
            return Err(Err(QueueError::NotReady));
        }
        let avail_idx = Wrapping(Self::read_u16(mem, self.avail_ring + 2).map_err(Err)?);
        let pending = (avail_idx - self.next_avail).0;
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(Err(QueueError::AvailIndexJump(pending)));
        }
        // Read the ring entry only after seeing the index that published it.
        fence(Ordering::Acquire);
        let slot = u64::from(self.next_avail.0 % self.size);
        let head = Self::read_u16(mem, self.avail_ring + 4 + 2 * slot).map_err(Err)?;
        self.next_avail += Wrapping(1);
        match self.walk(mem, head) {
            Ok(descs) => Ok(Some(DescriptorChain { head, descs })),
            Err(error) => Err(Ok(BadChain { head, error })),
        }
    }

    /// Puts back the last popped chain (it will be popped again).
    pub fn undo_pop(&mut self) {
        self.next_avail -= Wrapping(1);
    }

    fn walk(&self, mem: &GuestMemoryMmap, head: u16) -> Result<Vec<Descriptor>, QueueError> {
        let mut descs = Vec::new();
        let mut index = head;
        let mut total: u32 = 0;
        loop {
            if index >= self.size {
                return Err(QueueError::BadIndex(index));
            }
            if descs.len() >= usize::from(self.size) {
                return Err(QueueError::ChainTooLong);
            }
            let at = self.desc_table + 16 * u64::from(index);
            let addr = mem
                .read_obj::<u64>(GuestAddress(at))
                .map_err(|_| QueueError::Memory(at))?;
            let len = mem
                .read_obj::<u32>(GuestAddress(at + 8))
                .map_err(|_| QueueError::Memory(at))?;
            let flags = Self::read_u16(mem, at + 12)?;
            let next = Self::read_u16(mem, at + 14)?;
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(QueueError::Indirect);
            }
            total = total.checked_add(len).ok_or(QueueError::ChainOverflow)?;
            descs.push(Descriptor {
                addr: u64::from_le(addr),
                len: u32::from_le(len),
                flags,
            });
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(descs);
            }
            index = next;
        }
    }

    /// Returns chain `head` to the driver with `len` bytes written.
    pub fn add_used(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        let slot = u64::from(self.next_used.0 % self.size);
        let at = self.used_ring + 4 + 8 * slot;
        mem.write_obj(u32::from(head).to_le(), GuestAddress(at))
            .map_err(|_| QueueError::Memory(at))?;
        mem.write_obj(len.to_le(), GuestAddress(at + 4))
            .map_err(|_| QueueError::Memory(at))?;
        self.next_used += Wrapping(1);
        // The element must be visible before the index that publishes it.
        fence(Ordering::Release);
        let idx_at = self.used_ring + 2;
        mem.write_obj(self.next_used.0.to_le(), GuestAddress(idx_at))
            .map_err(|_| QueueError::Memory(idx_at))?;
        Ok(())
    }
}

/// Reads `len` bytes gathered from the readable buffers of `descs`, starting `skip` bytes in.
pub fn gather(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    mut skip: u64,
    out: &mut [u8],
) -> Result<(), QueueError> {
    let mut done = 0usize;
    for d in descs.iter().filter(|d| !d.is_write_only()) {
        if done == out.len() {
            break;
        }
        let dlen = u64::from(d.len);
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let n = ((dlen - skip) as usize).min(out.len() - done);
        // Callers check buffers against guest RAM first; stay safe for those that do not.
        let addr = d.addr.checked_add(skip).ok_or(QueueError::Memory(d.addr))?;
        mem.read_slice(&mut out[done..done + n], GuestAddress(addr))
            .map_err(|_| QueueError::Memory(addr))?;
        done += n;
        skip = 0;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(QueueError::Memory(0))
    }
}

/// Writes `parts`, in order, across the device-writable buffers of a chain; returns the bytes
/// written, or `None` when they do not fit or a buffer lies outside guest RAM (nothing is
/// written then). Empty buffers are skipped: only running out of bytes ends the copy.
pub fn scatter(mem: &GuestMemoryMmap, descs: &[Descriptor], parts: &[&[u8]]) -> Option<u32> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let room: u64 = descs
        .iter()
        .filter(|d| d.is_write_only())
        .map(|d| u64::from(d.len))
        .sum();
    if (total as u64) > room || descs.iter().any(|d| !d.in_ram(mem)) {
        return None;
    }
    let mut bytes = parts.iter().flat_map(|p| p.iter().copied());
    let mut buf = Vec::with_capacity(total);
    for d in descs.iter().filter(|d| d.is_write_only() && d.len > 0) {
        buf.clear();
        buf.extend(bytes.by_ref().take(d.len as usize));
        if buf.is_empty() {
            break;
        }
        mem.write_slice(&buf, GuestAddress(d.addr)).ok()?;
    }
    u32::try_from(total).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::vmm::memory::{GuestRam, MemoryBacking};

    pub(crate) const DESC: u64 = 0x1000;
    pub(crate) const AVAIL: u64 = 0x2000;
    pub(crate) const USED: u64 = 0x3000;

    pub(crate) fn ram() -> GuestRam {
        GuestRam::new(1, &MemoryBacking::Memfd).unwrap()
    }

    pub(crate) fn queue(size: u16) -> Queue {
        let mut q = Queue::new(256);
        q.size = size;
        q.desc_table = DESC;
        q.avail_ring = AVAIL;
        q.used_ring = USED;
        q.ready = true;
        q
    }

    pub(crate) fn put_desc(
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = DESC + 16 * u64::from(i);
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    pub(crate) fn publish(mem: &GuestMemoryMmap, slot: u16, head: u16, idx: u16) {
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(slot)))
            .unwrap();
        mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
    }

    #[test]
    fn scatter_skips_empty_buffers_and_reports_only_what_it_wrote() {
        let r = ram();
        let w = VIRTQ_DESC_F_WRITE;
        let descs = [
            Descriptor {
                addr: 0x8000,
                len: 0,
                flags: w,
            },
            Descriptor {
                addr: 0x9000,
                len: 3,
                flags: 0,
            },
            Descriptor {
                addr: 0xa000,
                len: 2,
                flags: w,
            },
            Descriptor {
                addr: 0xb000,
                len: 8,
                flags: w,
            },
        ];
        assert_eq!(scatter(&r.mem, &descs, &[b"ab", b"cde"]), Some(5));
        let mut got = [0u8; 5];
        r.mem
            .read_slice(&mut got[..2], GuestAddress(0xa000))
            .unwrap();
        r.mem
            .read_slice(&mut got[2..], GuestAddress(0xb000))
            .unwrap();
        assert_eq!(&got, b"abcde");
        // More than the writable room, or a buffer outside RAM: nothing.
        assert_eq!(scatter(&r.mem, &descs, &[&[1u8; 11]]), None);
        let outside = [Descriptor {
            addr: 1 << 40,
            len: 4,
            flags: w,
        }];
        assert_eq!(scatter(&r.mem, &outside, &[b"x"]), None);
    }

    #[test]
    fn sizes_and_rings_are_validated() {
        let r = ram();
        assert!(queue(8).validate(&r.mem).is_ok());
        assert_eq!(queue(6).validate(&r.mem), Err(QueueError::BadSize(6, 256)));
        assert_eq!(queue(0).validate(&r.mem), Err(QueueError::BadSize(0, 256)));
        assert_eq!(
            queue(512).validate(&r.mem),
            Err(QueueError::BadSize(512, 256))
        );
        let mut q = queue(8);
        q.desc_table = 0x1008;
        assert!(matches!(
            q.validate(&r.mem),
            Err(QueueError::Misaligned { .. })
        ));
        let mut q = queue(8);
        q.used_ring = (1 << 20) - 8;
        assert!(matches!(
            q.validate(&r.mem),
            Err(QueueError::RingOutsideRam { .. })
        ));
        let mut q = queue(8);
        q.avail_ring = u64::MAX - 1;
        assert!(matches!(
            q.validate(&r.mem),
            Err(QueueError::RingOutsideRam { .. })
        ));
    }

    #[test]
    fn chains_are_walked_and_returned() {
        let r = ram();
        let m = &r.mem;
        let mut q = queue(8);
        assert_eq!(q.pop(m), Ok(None));
        put_desc(m, 0, 0x8000, 16, VIRTQ_DESC_F_NEXT, 3);
        put_desc(m, 3, 0x9000, 512, VIRTQ_DESC_F_WRITE, 0);
        publish(m, 0, 0, 1);
        let c = q.pop(m).unwrap().unwrap();
        assert_eq!(c.head, 0);
        assert_eq!(c.descs.len(), 2);
        assert!(c.descs[1].is_write_only());
        q.add_used(m, c.head, 512).unwrap();
        assert_eq!(m.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 1);
        assert_eq!(m.read_obj::<u32>(GuestAddress(USED + 8)).unwrap(), 512);
    }

    #[test]
    fn loops_bad_indices_indirect_and_index_jumps_are_errors() {
        let r = ram();
        let m = &r.mem;
        let mut q = queue(4);
        // 0 -> 1 -> 0 -> ...
        put_desc(m, 0, 0x8000, 1, VIRTQ_DESC_F_NEXT, 1);
        put_desc(m, 1, 0x8000, 1, VIRTQ_DESC_F_NEXT, 0);
        publish(m, 0, 0, 1);
        assert_eq!(
            q.pop(m),
            Err(Ok(BadChain {
                head: 0,
                error: QueueError::ChainTooLong
            }))
        );
        // next index out of range
        put_desc(m, 2, 0x8000, 1, VIRTQ_DESC_F_NEXT, 9);
        publish(m, 1, 2, 2);
        assert_eq!(
            q.pop(m).unwrap_err().unwrap().error,
            QueueError::BadIndex(9)
        );
        // head out of range
        publish(m, 2, 77, 3);
        assert_eq!(
            q.pop(m).unwrap_err().unwrap().error,
            QueueError::BadIndex(77)
        );
        // indirect
        put_desc(m, 3, 0x8000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        publish(m, 3, 3, 4);
        assert_eq!(q.pop(m).unwrap_err().unwrap().error, QueueError::Indirect);
        // huge total length
        put_desc(m, 0, 0x8000, u32::MAX, VIRTQ_DESC_F_NEXT, 1);
        put_desc(m, 1, 0x8000, 2, 0, 0);
        publish(m, 0, 0, 5);
        assert_eq!(
            q.pop(m).unwrap_err().unwrap().error,
            QueueError::ChainOverflow
        );
        // the driver claims more chains than the queue holds
        m.write_obj(200u16, GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(q.pop(m), Err(Err(QueueError::AvailIndexJump(195))));
    }

    #[test]
    fn buffers_outside_ram_are_detected_and_gather_reads_across_descriptors() {
        let r = ram();
        let m = &r.mem;
        let outside = Descriptor {
            addr: 0xffff_0000,
            len: 16,
            flags: 0,
        };
        assert!(!outside.in_ram(m));
        let wrap = Descriptor {
            addr: u64::MAX - 4,
            len: 16,
            flags: 0,
        };
        assert!(!wrap.in_ram(m));
        m.write_slice(b"abcd", GuestAddress(0x8000)).unwrap();
        m.write_slice(b"efgh", GuestAddress(0x9000)).unwrap();
        let descs = [
            Descriptor {
                addr: 0x8000,
                len: 4,
                flags: 0,
            },
            Descriptor {
                addr: 0xa000,
                len: 4,
                flags: VIRTQ_DESC_F_WRITE,
            },
            Descriptor {
                addr: 0x9000,
                len: 4,
                flags: 0,
            },
        ];
        let mut out = [0u8; 5];
        gather(m, &descs, 2, &mut out).unwrap();
        assert_eq!(&out, b"cdefg");
        let mut too_much = [0u8; 9];
        assert!(gather(m, &descs, 0, &mut too_much).is_err());
        // A buffer at the very top of the address space: an error, not an overflow.
        let top = [Descriptor {
            addr: u64::MAX - 2,
            len: 16,
            flags: 0,
        }];
        assert!(gather(m, &top, 4, &mut [0u8; 4]).is_err());
    }
}
