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
    /// Every kernel, fastest first.
    const ALL: [Kernel; 3] = [Kernel::Avx512, Kernel::Avx2, Kernel::Portable];

    /// The fastest kernel this CPU can run.
    pub fn detect() -> Self {
        Self::ALL
            .into_iter()
            .find(|k| k.is_supported())
            .unwrap_or(Kernel::Portable)
    }

    /// The kernels this CPU can run, fastest first (the tests compare them all).
    pub fn available() -> Vec<Self> {
        Self::ALL.into_iter().filter(|k| k.is_supported()).collect()
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
        let kernel = Self::ALL
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use super::{Candidate, Lanes, Masks, TURN, WINDOW};
    use crate::cdc::window::{BYTE_KEY, MULTIPLIER};

    /// Turns that only warm a lane's digest up, over the 32 bytes before its segment.
    const WARM_UP_TURNS: usize = WINDOW / TURN;

    /// The operations on vectors of 32-bit lanes that [`scan`] is written in, for one instruction
    /// set. Every function is `#[inline(always)]` and carries no target feature of its own: it is
    /// inlined into [`scan`], itself inlined into an entry point compiled with the features, where
    /// the intrinsics inline in turn.
    trait Ops {
        const LANES: usize;
        type V: Copy;
        /// Register `r` of a turn before the transpose: 16 bytes from each of `LANES / 4`
        /// segments, segment `r * LANES / 4 + L` in 128-bit lane `L`.
        unsafe fn row(base: *const u8, segment: usize, turn: usize, r: usize) -> Self::V;
        unsafe fn splat(x: u32) -> Self::V;
        unsafe fn xor(a: Self::V, b: Self::V) -> Self::V;
        unsafe fn and(a: Self::V, b: Self::V) -> Self::V;
        unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
        unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
        unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
        unsafe fn shl1(a: Self::V) -> Self::V;
        /// Every lane shifted right by `bits` (a constant once inlined).
        unsafe fn shr(a: Self::V, bits: i32) -> Self::V;
        /// Per 128-bit lane, as `punpck{l,h}{dq,qdq}`.
        unsafe fn unpack_lo32(a: Self::V, b: Self::V) -> Self::V;
        unsafe fn unpack_hi32(a: Self::V, b: Self::V) -> Self::V;
        unsafe fn unpack_lo64(a: Self::V, b: Self::V) -> Self::V;
        unsafe fn unpack_hi64(a: Self::V, b: Self::V) -> Self::V;
        /// Whether some lane of `a & mask` is zero.
        unsafe fn any_zero(a: Self::V, mask: Self::V) -> bool;
        unsafe fn store(a: Self::V, out: &mut [u32; 16]);
    }

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
        // SAFETY: the caller's contract is `scan`'s, for 16 lanes; the features are enabled here.
        unsafe { scan::<Avx512>(data, from, segment, masks, lanes) }
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
        // SAFETY: the caller's contract is `scan`'s, for 8 lanes; the features are enabled here.
        unsafe { scan::<Avx2>(data, from, segment, masks, lanes) }
    }

    /// The kernel: `O::LANES` lanes, lane `j` rolling along `data[from + j * segment ..][..segment]`.
    ///
    /// # Safety
    /// The CPU must run `O`'s instructions; `data[from - WINDOW .. from + O::LANES * segment]`
    /// must exist and `segment` must be a multiple of 16.
    #[inline(always)]
    unsafe fn scan<O: Ops>(
        data: &[u8],
        from: usize,
        segment: usize,
        masks: Masks,
        lanes: &mut Lanes,
    ) {
        // SAFETY: turn `turn` of lane `j` loads 16 bytes at `from - 32 + j * segment + 16 * turn`
        // for `turn < segment / 16 + 2`: the last ends at `from + LANES * segment`, the first
        // starts at `from - 32`; both within `data` by the contract. The stores write a local
        // array of 16 lanes, at least a vector.
        unsafe {
            let base = data.as_ptr().add(from - WINDOW);
            let key = O::splat(u32::from_ne_bytes([BYTE_KEY; 4]));
            let low_byte = O::splat(0xff);
            let multiplier = O::splat(MULTIPLIER);
            let loose = O::splat(masks.loose);
            let mut digest = O::splat(0);
            for turn in 0..segment / TURN + WARM_UP_TURNS {
                // The transpose gives, per step, every lane's next 4 bytes; the lane of segment
                // r * LANES / 4 + L sits at position 4L + r.
                let [r0, r1, r2, r3] = [0, 1, 2, 3].map(|r| O::row(base, segment, turn, r));
                let (t0, t1) = (O::unpack_lo32(r0, r1), O::unpack_hi32(r0, r1));
                let (t2, t3) = (O::unpack_lo32(r2, r3), O::unpack_hi32(r2, r3));
                let words = [
                    O::unpack_lo64(t0, t2),
                    O::unpack_hi64(t0, t2),
                    O::unpack_lo64(t1, t3),
                    O::unpack_hi64(t1, t3),
                ];
                for (step, word) in words.into_iter().enumerate() {
                    let w = O::xor(word, key);
                    let roll = |d: O::V, byte: O::V| O::add(O::shl1(d), byte);
                    let d0 = roll(digest, O::and(w, low_byte));
                    let d1 = roll(d0, O::and(O::shr(w, 8), low_byte));
                    let d2 = roll(d1, O::and(O::shr(w, 16), low_byte));
                    let d3 = roll(d2, O::shr(w, 24));
                    digest = d3;
                    if turn < WARM_UP_TURNS {
                        continue;
                    }
                    let hashes = [d0, d1, d2, d3].map(|d| O::mul(d, multiplier));
                    // The loose mask is the top bits, so some hash passes exactly when the
                    // smallest one does.
                    let smallest =
                        O::min(O::min(hashes[0], hashes[1]), O::min(hashes[2], hashes[3]));
                    if O::any_zero(smallest, loose) {
                        let mut rows = [[0u32; 16]; 4];
                        for (row, hash) in rows.iter_mut().zip(hashes) {
                            O::store(hash, row);
                        }
                        let first = from + (turn - WARM_UP_TURNS) * TURN + 4 * step;
                        record(&rows, O::LANES, first, segment, masks, lanes);
                    }
                }
            }
        }
    }

    /// Records the candidates among one turn's four rows of hashes (row `step` holds, in its
    /// first `lane_count` entries, each lane's hash of the byte `step` places after `first`,
    /// counted within the lane's segment). Position `p` holds the lane of segment
    /// `(p % 4) * (lane_count / 4) + p / 4`, as the transpose left them.
    #[cold]
    #[inline(never)]
    fn record(
        rows: &[[u32; 16]; 4],
        lane_count: usize,
        first: usize,
        segment: usize,
        masks: Masks,
        lanes: &mut Lanes,
    ) {
        for (step, row) in rows.iter().enumerate() {
            for (position, &hash) in row[..lane_count].iter().enumerate() {
                let lane = (position % 4) * (lane_count / 4) + position / 4;
                let index = first + lane * segment + step;
                if let Some(candidate) = Candidate::of(index, hash, masks) {
                    lanes.lists[lane].push(candidate);
                }
            }
        }
    }

    struct Avx512;

    // SAFETY (all functions): value intrinsics of AVX-512F, only ever inlined into
    // `scan_16_lanes`, which enables it; `row` reads 4 x 16 bytes the caller keeps in bounds;
    // `store` writes 64 bytes into a 64-byte array.
    impl Ops for Avx512 {
        const LANES: usize = 16;
        type V = __m512i;
        #[inline(always)]
        unsafe fn row(base: *const u8, segment: usize, turn: usize, r: usize) -> __m512i {
            let load = |lane: usize| {
                // SAFETY: see the impl.
                unsafe { _mm_loadu_si128(base.add(lane * segment + turn * TURN).cast()) }
            };
            // SAFETY: see the impl.
            unsafe {
                let v = _mm512_castsi128_si512(load(4 * r));
                let v = _mm512_inserti32x4::<1>(v, load(4 * r + 1));
                let v = _mm512_inserti32x4::<2>(v, load(4 * r + 2));
                _mm512_inserti32x4::<3>(v, load(4 * r + 3))
            }
        }
        #[inline(always)]
        unsafe fn splat(x: u32) -> __m512i {
            // SAFETY: see the impl.
            unsafe { _mm512_set1_epi32(x as i32) }
        }
        #[inline(always)]
        unsafe fn xor(a: __m512i, b: __m512i) -> __m512i {
            // SAFETY: see the impl.
            unsafe { _mm512_xor_si512(a, b) }
        }
        #[inline(always)]
        unsafe fn and(a: __m512i, b: __m512i) -> __m512i {
            // SAFETY: see the impl.
            unsafe { _mm512_and_si512(a, b) }
        }
        #[inline(always)]
        unsafe fn add(a: __m512i, b: __m512i) -> __m512i {
            // SAFETY: see the impl.
            unsafe { _mm512_add_epi32(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m512i, b: __m512i) -> __m512i {
            // SAFETY: see the impl.
            unsafe { _mm512_mullo_epi32(a, b) }
        }
        #[inline(always)]
        unsafe fn min(a: __m512i, b: __m512i) -> __m512i {
            // SAFETY: see the impl.
            unsafe { _mm512_min_epu32(a, b) }
        }
        #[inline(always)]
        unsafe fn shl1(a: __m512i) -> __m512i {
            // SAFETY: see the impl.
            unsafe { _mm512_slli_epi32::<1>(a) }
        }
        #[inline(always)]
        unsafe fn shr(a: __m512i, bits: i32) -> __m512i {
            // SAFETY: see the impl.
            unsafe { _mm512_srl_epi32(a, _mm_cvtsi32_si128(bits)) }
        }
        #[inline(always)]
        unsafe fn unpack_lo32(a: __m512i, b: __m512i) -> __m512i {
            // SAFETY: see the impl.
            unsafe { _mm512_unpacklo_epi32(a, b) }
        }
        #[inline(always)]
        unsafe fn unpack_hi32(a: __m512i, b: __m512i) -> __m512i {
            // SAFETY: see the impl.
            unsafe { _mm512_unpackhi_epi32(a, b) }
        }
        #[inline(always)]
        unsafe fn unpack_lo64(a: __m512i, b: __m512i) -> __m512i {
            // SAFETY: see the impl.
            unsafe { _mm512_unpacklo_epi64(a, b) }
        }
        #[inline(always)]
        unsafe fn unpack_hi64(a: __m512i, b: __m512i) -> __m512i {
            // SAFETY: see the impl.
            unsafe { _mm512_unpackhi_epi64(a, b) }
        }
        #[inline(always)]
        unsafe fn any_zero(a: __m512i, mask: __m512i) -> bool {
            // SAFETY: see the impl.
            unsafe { _mm512_testn_epi32_mask(a, mask) != 0 }
        }
        #[inline(always)]
        unsafe fn store(a: __m512i, out: &mut [u32; 16]) {
            // SAFETY: see the impl.
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), a) }
        }
    }

    struct Avx2;

    // SAFETY (all functions): value intrinsics of AVX2, only ever inlined into `scan_8_lanes`,
    // which enables it; `row` reads 2 x 16 bytes the caller keeps in bounds; `store` writes 32
    // bytes into a 64-byte array.
    impl Ops for Avx2 {
        const LANES: usize = 8;
        type V = __m256i;
        #[inline(always)]
        unsafe fn row(base: *const u8, segment: usize, turn: usize, r: usize) -> __m256i {
            let load = |lane: usize| {
                // SAFETY: see the impl.
                unsafe { _mm_loadu_si128(base.add(lane * segment + turn * TURN).cast()) }
            };
            // SAFETY: see the impl.
            unsafe {
                _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(load(2 * r)), load(2 * r + 1))
            }
        }
        #[inline(always)]
        unsafe fn splat(x: u32) -> __m256i {
            // SAFETY: see the impl.
            unsafe { _mm256_set1_epi32(x as i32) }
        }
        #[inline(always)]
        unsafe fn xor(a: __m256i, b: __m256i) -> __m256i {
            // SAFETY: see the impl.
            unsafe { _mm256_xor_si256(a, b) }
        }
        #[inline(always)]
        unsafe fn and(a: __m256i, b: __m256i) -> __m256i {
            // SAFETY: see the impl.
            unsafe { _mm256_and_si256(a, b) }
        }
        #[inline(always)]
        unsafe fn add(a: __m256i, b: __m256i) -> __m256i {
            // SAFETY: see the impl.
            unsafe { _mm256_add_epi32(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: __m256i, b: __m256i) -> __m256i {
            // SAFETY: see the impl.
            unsafe { _mm256_mullo_epi32(a, b) }
        }
        #[inline(always)]
        unsafe fn min(a: __m256i, b: __m256i) -> __m256i {
            // SAFETY: see the impl.
            unsafe { _mm256_min_epu32(a, b) }
        }
        #[inline(always)]
        unsafe fn shl1(a: __m256i) -> __m256i {
            // SAFETY: see the impl.
            unsafe { _mm256_slli_epi32::<1>(a) }
        }
        #[inline(always)]
        unsafe fn shr(a: __m256i, bits: i32) -> __m256i {
            // SAFETY: see the impl.
            unsafe { _mm256_srl_epi32(a, _mm_cvtsi32_si128(bits)) }
        }
        #[inline(always)]
        unsafe fn unpack_lo32(a: __m256i, b: __m256i) -> __m256i {
            // SAFETY: see the impl.
            unsafe { _mm256_unpacklo_epi32(a, b) }
        }
        #[inline(always)]
        unsafe fn unpack_hi32(a: __m256i, b: __m256i) -> __m256i {
            // SAFETY: see the impl.
            unsafe { _mm256_unpackhi_epi32(a, b) }
        }
        #[inline(always)]
        unsafe fn unpack_lo64(a: __m256i, b: __m256i) -> __m256i {
            // SAFETY: see the impl.
            unsafe { _mm256_unpacklo_epi64(a, b) }
        }
        #[inline(always)]
        unsafe fn unpack_hi64(a: __m256i, b: __m256i) -> __m256i {
            // SAFETY: see the impl.
            unsafe { _mm256_unpackhi_epi64(a, b) }
        }
        #[inline(always)]
        unsafe fn any_zero(a: __m256i, mask: __m256i) -> bool {
            // SAFETY: see the impl.
            unsafe {
                let zero = _mm256_cmpeq_epi32(_mm256_and_si256(a, mask), _mm256_setzero_si256());
                _mm256_movemask_ps(_mm256_castsi256_ps(zero)) != 0
            }
        }
        #[inline(always)]
        unsafe fn store(a: __m256i, out: &mut [u32; 16]) {
            // SAFETY: see the impl.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), a) }
        }
    }
}
