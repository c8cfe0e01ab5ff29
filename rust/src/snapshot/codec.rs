//! Little-endian encoding of snapshot sections: a growable writer and a bounds-checked reader.
//! KVM state structures are stored as their raw kernel ABI bytes (see [`Pod`]).

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

/// Plain kernel ABI structures: only integer fields, arrays and unions of them, so every byte
/// pattern is a valid value, and instances handed to or filled by KVM are fully initialised
/// (bindgen spells out padding as named fields).
///
/// # Safety
/// Implement only for `#[repr(C)]` types with the properties above.
pub unsafe trait Pod: Default {}

// SAFETY: all of these are bindgen-generated `#[repr(C)]` KVM ABI structures made only of
// integers, integer arrays and unions of those, with explicit padding fields.
unsafe impl Pod for kvm_regs {}
// SAFETY: as above.
unsafe impl Pod for kvm_sregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_fpu {}
// SAFETY: as above.
unsafe impl Pod for kvm_xsave {}
// SAFETY: as above.
unsafe impl Pod for kvm_xcrs {}
// SAFETY: as above.
unsafe impl Pod for kvm_lapic_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_vcpu_events {}
// SAFETY: as above.
unsafe impl Pod for kvm_debugregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_mp_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_irqchip {}
// SAFETY: as above.
unsafe impl Pod for kvm_pit_state2 {}
// SAFETY: as above.
unsafe impl Pod for kvm_clock_data {}

/// Why a section could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("a section ends early")]
    Short,
    #[error("{0}")]
    Bad(String),
}

#[derive(Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn bool(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.buf.extend_from_slice(b);
    }
    pub fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    /// A structure as its size followed by its raw bytes.
    pub fn pod<T: Pod>(&mut self, v: &T) {
        let size = std::mem::size_of::<T>();
        // SAFETY: `T: Pod` is a fully initialised plain structure of `size` bytes, so viewing it
        // as bytes for the duration of this borrow is sound.
        let raw = unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size) };
        self.bytes(raw);
    }
}

pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Short)?;
        let s = self.buf.get(self.pos..end).ok_or(DecodeError::Short)?;
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.arr::<1>()?[0])
    }
    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::Bad(format!("{v} is not a boolean"))),
        }
    }
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.arr()?))
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = usize::try_from(self.u64()?).map_err(|_| DecodeError::Short)?;
        self.take(n)
    }
    pub fn str(&mut self) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| DecodeError::Bad("a string is not UTF-8".into()))
    }
    /// A count of items that each take at least `min_item` bytes, checked against what is left
    /// so a corrupt count cannot make the reader allocate without bound.
    pub fn count(&mut self, min_item: usize) -> Result<usize, DecodeError> {
        let n = usize::try_from(self.u64()?).map_err(|_| DecodeError::Short)?;
        if n.saturating_mul(min_item.max(1)) > self.buf.len() - self.pos {
            return Err(DecodeError::Short);
        }
        Ok(n)
    }
    pub fn pod<T: Pod>(&mut self) -> Result<T, DecodeError> {
        let size = std::mem::size_of::<T>();
        let raw = self.bytes()?;
        if raw.len() != size {
            return Err(DecodeError::Bad(format!(
                "a KVM structure has {} bytes, this build expects {size}",
                raw.len()
            )));
        }
        let mut v = T::default();
        // SAFETY: `raw` holds exactly `size_of::<T>()` bytes and every byte pattern is a valid
        // `T` (`T: Pod`); the destination is a properly aligned, owned `T`.
        unsafe {
            std::ptr::copy_nonoverlapping(raw.as_ptr(), (&mut v as *mut T).cast::<u8>(), size)
        };
        Ok(v)
    }
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(DecodeError::Bad(format!(
                "{} unexpected bytes at the end of a section",
                self.buf.len() - self.pos
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_short_input_is_an_error() {
        let mut w = Writer::default();
        w.u8(1);
        w.u16(0x1234);
        w.u32(7);
        w.u64(u64::MAX);
        w.str("hé");
        let regs = kvm_regs {
            rip: 0xdead_beef,
            ..Default::default()
        };
        w.pod(&regs);
        let mut r = Reader::new(&w.buf);
        assert_eq!(r.u8().unwrap(), 1);
        assert_eq!(r.u16().unwrap(), 0x1234);
        assert_eq!(r.u32().unwrap(), 7);
        assert_eq!(r.u64().unwrap(), u64::MAX);
        assert_eq!(r.str().unwrap(), "hé");
        assert_eq!(r.pod::<kvm_regs>().unwrap().rip, 0xdead_beef);
        r.finish().unwrap();
        for cut in 0..w.buf.len() {
            let mut r = Reader::new(&w.buf[..cut]);
            let res = (|| -> Result<(), DecodeError> {
                r.u8()?;
                r.u16()?;
                r.u32()?;
                r.u64()?;
                r.str()?;
                r.pod::<kvm_regs>()?;
                Ok(())
            })();
            assert!(res.is_err());
        }
        let mut r = Reader::new(&[0xff; 8]);
        assert_eq!(r.count(1), Err(DecodeError::Short));
    }
}
