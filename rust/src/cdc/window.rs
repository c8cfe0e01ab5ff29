//! The window hash that decides where chunks may end, and its portable scan.
//!
//! For the byte at index `i`, the *digest* is the sum of the last [`WINDOW`] bytes, each XORed
//! with [`BYTE_KEY`] and shifted left by its distance from `i`, modulo 2^32:
//!
//! ```text
//! digest(i) = sum over k in 0..32 of (data[i - k] ^ BYTE_KEY) << k     (mod 2^32)
//! hash(i)   = digest(i) * MULTIPLIER                                    (mod 2^32)
//! ```
//!
//! A chunk may end after byte `i` when the top bits of `hash(i)` are zero (see
//! [`top_bits_mask`]). The digest rolls in one shift and one add per byte, and a byte 32 places
//! back has been shifted out of the 32-bit word, so the window needs no explicit removal. Because
//! the multiplication carries every digest bit into the top bits, each tested bit depends on the
//! whole window (in a plain gear hash a low bit depends only on the last few bytes).
//!
//! The value of `hash(i)` depends on nothing but those 32 bytes, so positions can be hashed in
//! any order, by independent SIMD lanes as well as one byte after another: that is what makes the
//! vectorised scan in [`super::simd`] possible. The key keeps long runs of `0x00`, `0xff` and
//! spaces from being cut points at every position (their hash has its top bit set, a test checks).

/// Bytes that contribute to a position's hash: the byte itself and the 31 before it.
pub const WINDOW: usize = 32;
/// The multiplier that spreads the digest into the tested top bits: Knuth's multiplicative
/// hashing constant, the prime closest to 2^32 divided by the golden ratio.
pub const MULTIPLIER: u32 = 0x9e37_79b1;
/// XORed into every byte before it is added to the digest.
pub const BYTE_KEY: u8 = 0x5d;

/// The digest after `byte` is appended.
#[inline(always)]
pub fn roll(digest: u32, byte: u8) -> u32 {
    (digest << 1).wrapping_add(u32::from(byte ^ BYTE_KEY))
}

/// The hash that is tested, from a digest.
#[inline(always)]
pub fn mix(digest: u32) -> u32 {
    digest.wrapping_mul(MULTIPLIER)
}

/// A mask of the top `bits` bits (clamped to 1..=32): a hash passes when these are all zero,
/// which happens with probability `2^-bits`. A mask with more bits contains every mask with fewer,
/// so a position that passes the strict mask passes the loose one too.
pub fn top_bits_mask(bits: u32) -> u32 {
    !0u32 << (32 - bits.clamp(1, 32))
}

/// The two masks of normalized chunking, both made by [`top_bits_mask`] (the scans rely on it:
/// a hash passes a top-bits mask exactly when it is below a threshold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Masks {
    /// Used while the chunk is shorter than the average size.
    pub strict: u32,
    /// Used from the average size on; contains fewer bits than `strict`.
    pub loose: u32,
}

/// A position whose hash passes the loose mask: a chunk may end after byte `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub index: usize,
    /// Whether the hash passes the strict mask too.
    pub strict: bool,
}

impl Candidate {
    #[inline(always)]
    pub fn of(index: usize, hash: u32, masks: Masks) -> Option<Self> {
        (hash & masks.loose == 0).then_some(Candidate {
            index,
            strict: hash & masks.strict == 0,
        })
    }
}

/// The digest of the [`WINDOW`] bytes ending just before `data[from]` (`from >= WINDOW`).
#[inline]
pub fn digest_before(data: &[u8], from: usize) -> u32 {
    data[from - WINDOW..from]
        .iter()
        .fold(0, |digest, &byte| roll(digest, byte))
}

/// Appends the candidates at byte indexes `from..to` of `data`, in order. `from` must be at
/// least [`WINDOW`].
///
/// Four bytes are taken per step, and the digest's serial chain is shortened algebraically: with
/// `x` the keyed bytes, the digest after the fourth is `(d << 4) + (((2*x0 + x1)*2 + x2)*2 + x3)`,
/// whose second term does not depend on `d`, and the digests after the first three are formed off
/// the chain the same way (rolled one byte at a time, the chain is two cycles per byte). Eight
/// positions are then tested at once: the loose mask is the top bits, so some hash of the eight
/// passes exactly when the smallest does, and only then are they looked at one by one.
pub fn scan_portable(data: &[u8], from: usize, to: usize, masks: Masks, out: &mut Vec<Candidate>) {
    if from >= to {
        return;
    }
    let mut digest = digest_before(data, from);
    let mut octets = data[from..to].chunks_exact(8);
    let mut index = from;
    for octet in &mut octets {
        let mut hashes = [0u32; 8];
        for (quad, hashes) in octet.chunks_exact(4).zip(hashes.chunks_exact_mut(4)) {
            let x = |k: usize| u32::from(quad[k] ^ BYTE_KEY);
            let two = (x(0) << 1).wrapping_add(x(1));
            let three = (two << 1).wrapping_add(x(2));
            let four = (three << 1).wrapping_add(x(3));
            hashes[0] = mix((digest << 1).wrapping_add(x(0)));
            hashes[1] = mix((digest << 2).wrapping_add(two));
            hashes[2] = mix((digest << 3).wrapping_add(three));
            digest = (digest << 4).wrapping_add(four);
            hashes[3] = mix(digest);
        }
        let smallest = hashes.iter().fold(u32::MAX, |low, &hash| low.min(hash));
        if smallest & masks.loose == 0 {
            for (k, &hash) in hashes.iter().enumerate() {
                out.extend(Candidate::of(index + k, hash, masks));
            }
        }
        index += 8;
    }
    for &byte in octets.remainder() {
        digest = roll(digest, byte);
        out.extend(Candidate::of(index, mix(digest), masks));
        index += 1;
    }
}
