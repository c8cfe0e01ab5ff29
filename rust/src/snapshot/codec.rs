//! The body encoding of `vmstate.bin`: postcard over the serde derives of the state types,
//! with every sequence bounded while it is decoded.
//!
//! postcard keeps no message for an error a `Deserialize` impl raises (it is `no_std` first), so
//! a refused count is also noted in a per-thread slot that [`decode`] reads back.

use std::cell::RefCell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

thread_local! {
    static REFUSAL: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The encoded form of `value`.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("snapshot state types always serialize")
}

/// Decodes all of `body` as a `T`, or says in one line why it cannot.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    REFUSAL.with(|r| r.borrow_mut().take());
    match postcard::take_from_bytes::<T>(body) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(format!("{} unexpected bytes follow the state", rest.len())),
        Err(e) => Err(REFUSAL
            .with(|r| r.borrow_mut().take())
            .unwrap_or_else(|| match e {
                postcard::Error::DeserializeUnexpectedEnd => "the state ends early".into(),
                e => format!("the state does not decode ({e})"),
            })),
    }
}

fn refuse<E: serde::de::Error>(why: String) -> E {
    let err = E::custom(&why);
    REFUSAL.with(|r| *r.borrow_mut() = Some(why));
    err
}

/// Deserializes a sequence of at most `max` items (`what` names them in the error). A longer
/// one is refused as soon as its length prefix is read; a prefix claiming more items than the
/// input holds reserves nothing and fails where the input ends.
pub fn bounded<'de, D, T>(d: D, max: usize, what: &'static str) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Bounded<T> {
        max: usize,
        what: &'static str,
        item: PhantomData<T>,
    }
    impl<'de, T: Deserialize<'de>> Visitor<'de> for Bounded<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "at most {} {}", self.max, self.what)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let too_many = |n: usize| refuse(format!("{n} {} (at most {})", self.what, self.max));
            // postcard gives no hint when the prefix claims more items than bytes are left.
            let hint = seq.size_hint().unwrap_or(0);
            if hint > self.max {
                return Err(too_many(hint));
            }
            // Grown as items arrive rather than reserved from the prefix: a prefix may claim up
            // to `max` items that the input does not hold.
            let mut out = Vec::new();
            while let Some(item) = seq.next_element()? {
                if out.len() == self.max {
                    return Err(too_many(self.max + 1));
                }
                out.push(item);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded {
        max,
        what,
        item: PhantomData,
    })
}

/// A string of at most `max` bytes (postcard borrows it from the input before it is copied).
pub fn bounded_string<'de, D: Deserializer<'de>>(
    d: D,
    max: usize,
    what: &'static str,
) -> Result<String, D::Error> {
    let s = <&str>::deserialize(d)?;
    if s.len() > max {
        return Err(refuse(format!(
            "{what} of {} bytes (at most {max})",
            s.len()
        )));
    }
    Ok(s.to_owned())
}

/// Fails decoding with `why` as the one-line reason.
pub fn invalid<E: serde::de::Error>(why: String) -> E {
    refuse(why)
}

/// A KVM structure through kvm-bindings' serde impl (its raw ABI bytes), refused unless the
/// input holds exactly its size: that impl zero-pads or cuts a byte string of another length,
/// which would let a few bytes of input stand for kilobytes of state.
pub fn kvm<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let bytes = <&'de [u8]>::deserialize(d)?;
    let size = std::mem::size_of::<T>();
    if bytes.len() != size {
        return Err(refuse(format!(
            "a KVM structure has {} bytes, this build expects {size}",
            bytes.len()
        )));
    }
    T::deserialize(serde::de::value::BorrowedBytesDeserializer::new(bytes))
}

/// [`kvm`] for a boxed structure.
pub fn kvm_box<'de, D, T>(d: D) -> Result<Box<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    kvm(d).map(Box::new)
}

/// [`kvm`] for an optional structure.
pub fn kvm_option<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Strict<T>(T);
    impl<'de, T: Deserialize<'de>> Deserialize<'de> for Strict<T> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            kvm(d).map(Strict)
        }
    }
    Ok(Option::<Strict<T>>::deserialize(d)?.map(|s| s.0))
}

/// `kvm_fpu` is the one saved KVM structure kvm-bindings has no serde impl for; its fields are
/// all plain integers, so it is encoded field by field.
#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_bindings::kvm_fpu")]
pub struct KvmFpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub pad1: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
    pub pad2: u32,
}

/// `Box<kvm_fpu>` through [`KvmFpu`].
pub mod boxed_fpu {
    use kvm_bindings::kvm_fpu;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Wrap(#[serde(with = "super::KvmFpu")] kvm_fpu);

    pub fn serialize<S: Serializer>(v: &kvm_fpu, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Ref<'a>(#[serde(with = "super::KvmFpu")] &'a kvm_fpu);
        Ref(v).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Box<kvm_fpu>, D::Error> {
        Ok(Box::new(Wrap::deserialize(d)?.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct List {
        #[serde(deserialize_with = "three")]
        items: Vec<u64>,
    }

    fn three<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        bounded(d, 3, "items")
    }

    #[test]
    fn sequences_are_bounded_while_decoding() {
        let ok = List {
            items: vec![1, 2, 3],
        };
        assert_eq!(decode::<List>(&encode(&ok)).unwrap(), ok);
        let long = encode(&List {
            items: vec![1, 2, 3, 4],
        });
        assert_eq!(decode::<List>(&long).unwrap_err(), "4 items (at most 3)");
        // A length prefix of 2^60 with nothing behind it: no hint, nothing reserved, and the
        // input ends before a fourth item could be read.
        let mut huge = Vec::new();
        let mut n = 1u64 << 60;
        while n >= 0x80 {
            huge.push((n as u8) | 0x80);
            n >>= 7;
        }
        huge.push(n as u8);
        assert_eq!(decode::<List>(&huge).unwrap_err(), "the state ends early");
        huge.extend_from_slice(&[1; 64]);
        assert_eq!(decode::<List>(&huge).unwrap_err(), "4 items (at most 3)");
        let mut trailing = encode(&ok);
        trailing.push(0);
        assert_eq!(
            decode::<List>(&trailing).unwrap_err(),
            "1 unexpected bytes follow the state"
        );
    }

    #[test]
    fn kvm_structures_round_trip() {
        let fpu = kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            xmm: [[7; 16]; 16],
            ..Default::default()
        };
        #[derive(Serialize, Deserialize)]
        struct S {
            #[serde(serialize_with = "boxed_fpu::serialize")]
            #[serde(deserialize_with = "boxed_fpu::deserialize")]
            fpu: Box<kvm_bindings::kvm_fpu>,
            regs: kvm_bindings::kvm_regs,
        }
        let s = S {
            fpu: Box::new(fpu),
            regs: kvm_bindings::kvm_regs {
                rip: 0xdead_beef,
                ..Default::default()
            },
        };
        let back: S = decode(&encode(&s)).unwrap();
        assert_eq!((back.fpu.fcw, back.fpu.mxcsr), (0x37f, 0x1f80));
        assert_eq!(back.fpu.xmm, [[7; 16]; 16]);
        assert_eq!(back.regs.rip, 0xdead_beef);
    }

    #[test]
    fn a_kvm_structure_of_another_size_is_refused() {
        #[derive(Debug, Serialize, Deserialize)]
        struct Regs(#[serde(deserialize_with = "kvm")] kvm_bindings::kvm_regs);
        assert!(decode::<Regs>(&encode(&Regs(Default::default()))).is_ok());
        for len in [0, 143, 145] {
            let e = decode::<Regs>(&encode(&serde_bytes(len))).unwrap_err();
            assert_eq!(
                e,
                format!("a KVM structure has {len} bytes, this build expects 144")
            );
        }
    }

    /// `len` zero bytes encoded as a byte string (what a KVM structure is).
    fn serde_bytes(len: usize) -> impl Serialize {
        struct B(Vec<u8>);
        impl Serialize for B {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&self.0)
            }
        }
        B(vec![0; len])
    }
}
