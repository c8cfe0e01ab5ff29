//! The candidate scan in SIMD lanes, chosen at run time: AVX-512 (16 lanes) or AVX2 (8 lanes).
//!
//! Because a position's hash depends only on the 32 bytes that end there (see
//! [`super::window`]), a block can be cut into one contiguous segment per lane and every lane can
//! roll its own digest along its segment, starting 32 bytes before it. Each turn a lane takes 16
//! bytes: the kernels load 16 bytes from every segment and transpose them in registers, so that
//! each of four vectors holds, per lane, the next 4 bytes of that lane's segment (gathers would do
//! the same in one instruction, and measured four times slower). Each byte then costs a lane a
//! shift, an add and a multiply; one test per four bytes finds out whether any lane's hash passed
//! the loose mask, and only then are the positions written out (about one turn in 500 at 8 KiB).
//!
//! Lanes find their candidates out of order across segments; each lane keeps its own list, and
//! the lists are appended in segment order, which is position order.

use super::window::{scan_portable, Candidate, Masks, WINDOW};

/// The most lanes a kernel uses.
const MAX_LANES: usize = 16;
/// Bytes a lane takes per turn.
const TURN: usize = 16;

/// Per-lane candidate lists, kept between calls so the scan allocates only while they grow.
#[derive(Debug, Clone, Default)]
pub struct Lanes {
    lists: [Vec<Candidate>; MAX_LANES],
}

/// Why a kernel asked for by name cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    #[error("no chunking kernel is called '{0}' (avx512, avx2 or portable)")]
    Unknown(String),
    #[error("this CPU cannot run the {0} chunking kernel")]
    Unsupported(&'static str),
}

/// The scan the CPU supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Avx512,
    Avx2,
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU can run.
    pub fn detect() -> Self {
        Self::available()[0]
    }

    /// The kernels this CPU can run, fastest first (the tests compare them all).
    pub fn available() -> Vec<Self> {
        [Kernel::Avx512, Kernel::Avx2, Kernel::Portable]
            .into_iter()
            .filter(|k| k.is_supported())
            .collect()
    }

    /// Whether this CPU can run the kernel (`is_x86_feature_detected` caches its answer).
    pub fn is_supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            Kernel::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The kernel's name, as [`Kernel::from_name`] takes it.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512 => "avx512",
            Kernel::Avx2 => "avx2",
            Kernel::Portable => "portable",
        }
    }

    /// The kernel called `name` (see [`Kernel::name`]), if the CPU can run it.
    pub fn from_name(name: &str) -> Result<Self, KernelError> {
        let kernel = [Kernel::Avx512, Kernel::Avx2, Kernel::Portable]
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| KernelError::Unknown(name.to_owned()))?;
        if kernel.is_supported() {
            Ok(kernel)
        } else {
            Err(KernelError::Unsupported(kernel.name()))
        }
    }

    fn lanes(self) -> usize {
        match self {
            Kernel::Avx512 => 16,
            Kernel::Avx2 => 8,
            Kernel::Portable => 1,
        }
    }

    /// Appends the candidates at byte indexes `from..to` of `data`, in order (`from >= WINDOW`,
    /// `to <= data.len()`). The lanes take the largest part of the range that splits into whole
    /// turns per lane; the rest is scanned one byte at a time.
    pub fn scan(
        self,
        data: &[u8],
        from: usize,
        to: usize,
        masks: Masks,
        lanes: &mut Lanes,
        out: &mut Vec<Candidate>,
    ) {
        assert!(from >= WINDOW && from <= to && to <= data.len());
        assert!(
            self.is_supported(),
            "the CPU cannot run the {self:?} chunking kernel"
        );
        let segment = (to - from) / self.lanes() / TURN * TURN;
        if self == Kernel::Portable || segment == 0 {
            return scan_portable(data, from, to, masks, out);
        }
        for list in &mut lanes.lists {
            list.clear();
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the features the kernel is compiled for (asserted above); the lanes read
        // `data[from - WINDOW .. from + lanes * segment]`, inside `data` by the assertion above.
        unsafe {
            match self {
                Kernel::Avx512 => x86::scan_16_lanes(data, from, segment, masks, lanes),
                Kernel::Avx2 => x86::scan_8_lanes(data, from, segment, masks, lanes),
                Kernel::Portable => unreachable!(),
            }
        }
        for list in &lanes.lists[..self.lanes()] {
            out.extend_from_slice(list);
        }
        scan_portable(data, from + self.lanes() * segment, to, masks, out);
    }
}

/// Records the candidates among one turn's four rows of hashes (row `step` holds each lane's hash
/// of the byte `step` places after `first`, counted within the lane's segment).
///
/// The transpose leaves lanes in register order: vector position `p` holds segment
/// `(p % 4) * (LANES / 4) + p / 4`.
#[cold]
#[inline(never)]
fn record<const LANES: usize>(
    rows: &[[u32; LANES]; 4],
    first: usize,
    segment: usize,
    masks: Masks,
    lanes: &mut Lanes,
) {
    for (step, row) in rows.iter().enumerate() {
        for (position, &hash) in row.iter().enumerate() {
            let lane = (position % 4) * (LANES / 4) + position / 4;
            let index = first + lane * segment + step;
            if let Some(candidate) = Candidate::of(index, hash, masks) {
                lanes.lists[lane].push(candidate);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use super::{record, Lanes, Masks, TURN, WINDOW};
    use crate::cdc::window::{BYTE_KEY, MULTIPLIER};

    /// Turns that only warm a lane's digest up, over the 32 bytes before its segment.
    const WARM_UP_TURNS: usize = WINDOW / TURN;

    /// # Safety
    /// The CPU must support AVX-512F; `data[from - WINDOW .. from + 16 * segment]` must exist and
    /// `segment` must be a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scan_16_lanes(
        data: &[u8],
        from: usize,
        segment: usize,
        masks: Masks,
        lanes: &mut Lanes,
    ) {
        // SAFETY: turn `turn` of lane `j` loads 16 bytes at `from - 32 + j * segment + 16 * turn`
        // for `turn < segment / 16 + 2`: the last ends at `from + 16 * segment`, the first starts
        // at `from - 32`; both within `data` by the caller's contract. The stores write local
        // arrays of the vectors' size.
        unsafe {
            let base = data.as_ptr().add(from - WINDOW);
            let load = |lane: usize, turn: usize| {
                _mm_loadu_si128(base.add(lane * segment + turn * TURN).cast::<__m128i>())
            };
            let key = _mm512_set1_epi8(BYTE_KEY as i8);
            let low_byte = _mm512_set1_epi32(0xff);
            let multiplier = _mm512_set1_epi32(MULTIPLIER as i32);
            let loose = _mm512_set1_epi32(masks.loose as i32);
            let mut digest = _mm512_setzero_si512();
            for turn in 0..segment / TURN + WARM_UP_TURNS {
                // Register r holds segments 4r..4r+3, one per 128-bit lane; the transpose below
                // gives, per step, 16 lanes of 4 bytes with segment 4r+L at position 4L+r.
                let row = |r: usize| {
                    let v = _mm512_castsi128_si512(load(4 * r, turn));
                    let v = _mm512_inserti32x4::<1>(v, load(4 * r + 1, turn));
                    let v = _mm512_inserti32x4::<2>(v, load(4 * r + 2, turn));
                    _mm512_inserti32x4::<3>(v, load(4 * r + 3, turn))
                };
                let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
                let (t0, t1) = (_mm512_unpacklo_epi32(r0, r1), _mm512_unpackhi_epi32(r0, r1));
                let (t2, t3) = (_mm512_unpacklo_epi32(r2, r3), _mm512_unpackhi_epi32(r2, r3));
                let words = [
                    _mm512_unpacklo_epi64(t0, t2),
                    _mm512_unpackhi_epi64(t0, t2),
                    _mm512_unpacklo_epi64(t1, t3),
                    _mm512_unpackhi_epi64(t1, t3),
                ];
                for (step, word) in words.into_iter().enumerate() {
                    let w = _mm512_xor_si512(word, key);
                    let roll = |d: __m512i, byte: __m512i| {
                        _mm512_add_epi32(_mm512_slli_epi32::<1>(d), byte)
                    };
                    let d0 = roll(digest, _mm512_and_si512(w, low_byte));
                    let d1 = roll(d0, _mm512_and_si512(_mm512_srli_epi32::<8>(w), low_byte));
                    let d2 = roll(d1, _mm512_and_si512(_mm512_srli_epi32::<16>(w), low_byte));
                    let d3 = roll(d2, _mm512_srli_epi32::<24>(w));
                    digest = d3;
                    if turn < WARM_UP_TURNS {
                        continue;
                    }
                    let hashes = [d0, d1, d2, d3].map(|d| _mm512_mullo_epi32(d, multiplier));
                    // The loose mask is the top bits, so some hash passes exactly when the
                    // smallest one does.
                    let smallest = _mm512_min_epu32(
                        _mm512_min_epu32(hashes[0], hashes[1]),
                        _mm512_min_epu32(hashes[2], hashes[3]),
                    );
                    if _mm512_testn_epi32_mask(smallest, loose) != 0 {
                        let mut rows = [[0u32; 16]; 4];
                        for (row, hash) in rows.iter_mut().zip(hashes) {
                            _mm512_storeu_si512(row.as_mut_ptr().cast(), hash);
                        }
                        let first = from + (turn - WARM_UP_TURNS) * TURN + 4 * step;
                        record(&rows, first, segment, masks, lanes);
                    }
                }
            }
        }
    }

    /// # Safety
    /// The CPU must support AVX2; `data[from - WINDOW .. from + 8 * segment]` must exist and
    /// `segment` must be a multiple of 16.
    #[target_feature(enable = "avx2")]
    pub unsafe fn scan_8_lanes(
        data: &[u8],
        from: usize,
        segment: usize,
        masks: Masks,
        lanes: &mut Lanes,
    ) {
        // SAFETY: as in `scan_16_lanes`, with 8 segments: loads span
        // `from - 32 .. from + 8 * segment`; the stores write local arrays of the vectors' size.
        unsafe {
            let base = data.as_ptr().add(from - WINDOW);
            let load = |lane: usize, turn: usize| {
                _mm_loadu_si128(base.add(lane * segment + turn * TURN).cast::<__m128i>())
            };
            let key = _mm256_set1_epi8(BYTE_KEY as i8);
            let low_byte = _mm256_set1_epi32(0xff);
            let multiplier = _mm256_set1_epi32(MULTIPLIER as i32);
            let loose = _mm256_set1_epi32(masks.loose as i32);
            let zero = _mm256_setzero_si256();
            let mut digest = _mm256_setzero_si256();
            for turn in 0..segment / TURN + WARM_UP_TURNS {
                // Register r holds segments 2r and 2r+1; after the transpose, segment 2r+L sits
                // at position 4L+r.
                let row = |r: usize| {
                    let v = _mm256_castsi128_si256(load(2 * r, turn));
                    _mm256_inserti128_si256::<1>(v, load(2 * r + 1, turn))
                };
                let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
                let (t0, t1) = (_mm256_unpacklo_epi32(r0, r1), _mm256_unpackhi_epi32(r0, r1));
                let (t2, t3) = (_mm256_unpacklo_epi32(r2, r3), _mm256_unpackhi_epi32(r2, r3));
                let words = [
                    _mm256_unpacklo_epi64(t0, t2),
                    _mm256_unpackhi_epi64(t0, t2),
                    _mm256_unpacklo_epi64(t1, t3),
                    _mm256_unpackhi_epi64(t1, t3),
                ];
                for (step, word) in words.into_iter().enumerate() {
                    let w = _mm256_xor_si256(word, key);
                    let roll = |d: __m256i, byte: __m256i| {
                        _mm256_add_epi32(_mm256_slli_epi32::<1>(d), byte)
                    };
                    let d0 = roll(digest, _mm256_and_si256(w, low_byte));
                    let d1 = roll(d0, _mm256_and_si256(_mm256_srli_epi32::<8>(w), low_byte));
                    let d2 = roll(d1, _mm256_and_si256(_mm256_srli_epi32::<16>(w), low_byte));
                    let d3 = roll(d2, _mm256_srli_epi32::<24>(w));
                    digest = d3;
                    if turn < WARM_UP_TURNS {
                        continue;
                    }
                    let hashes = [d0, d1, d2, d3].map(|d| _mm256_mullo_epi32(d, multiplier));
                    let smallest = _mm256_min_epu32(
                        _mm256_min_epu32(hashes[0], hashes[1]),
                        _mm256_min_epu32(hashes[2], hashes[3]),
                    );
                    let passed = _mm256_cmpeq_epi32(_mm256_and_si256(smallest, loose), zero);
                    if _mm256_movemask_ps(_mm256_castsi256_ps(passed)) != 0 {
                        let mut rows = [[0u32; 8]; 4];
                        for (row, hash) in rows.iter_mut().zip(hashes) {
                            _mm256_storeu_si256(row.as_mut_ptr().cast(), hash);
                        }
                        let first = from + (turn - WARM_UP_TURNS) * TURN + 4 * step;
                        record(&rows, first, segment, masks, lanes);
                    }
                }
            }
        }
    }
}
