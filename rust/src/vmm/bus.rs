//! Port-I/O and MMIO buses: address ranges mapped to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus. `offset` is relative to the start of its range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device already there")]
    Overlap { base: u64, len: u64 },
}

/// Non-overlapping ranges, looked up by address.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), BusError> {
        let end = match base.checked_add(len) {
            Some(e) if len > 0 => e,
            _ => return Err(BusError::BadRange { base, len }),
        };
        if let Some((&b, &(l, _))) = self.ranges.range(..end).next_back() {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, (len, dev));
        Ok(())
    }

    /// The device covering `[addr, addr + size)` entirely, and the offset of `addr` in it.
    pub fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= *len).then_some((offset, dev))
    }

    /// Reads from the device at `addr`; returns false (and fills `data` with 0xff, like an
    /// open bus) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<u8>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    #[test]
    fn ranges_do_not_overlap_and_lookups_stay_inside() {
        let mut bus = Bus::new();
        let d: SharedDevice = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x3f8, 8, d.clone()).unwrap();
        assert_eq!(
            bus.insert(0x3f0, 9, d.clone()),
            Err(BusError::Overlap {
                base: 0x3f0,
                len: 9
            })
        );
        assert_eq!(
            bus.insert(0x3ff, 1, d.clone()),
            Err(BusError::Overlap {
                base: 0x3ff,
                len: 1
            })
        );
        assert!(bus.insert(u64::MAX, 2, d.clone()).is_err());
        bus.insert(0x400, 1, d.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [5]);
        let mut w = [0u8; 4];
        assert!(
            !bus.read(0x3fe, &mut w),
            "access crossing the end of a range"
        );
        assert_eq!(w, [0xff; 4]);
        assert!(!bus.write(0x3f7, &[1]));
    }
}
