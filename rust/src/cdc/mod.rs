//! Content-defined chunking: a FastCDC-style gear-hash chunker with normalized chunking
//! (Xia et al., "The Design of Fast Content-Defined Chunking for Data Deduplication Based
//! Storage Systems", 2020).
//!
//! A cut point is placed after byte `i` when the rolling gear hash over the bytes since
//! `min_size` satisfies `hash & mask == 0`. A stricter mask (more one-bits) is used before the
//! average size and a looser one after it, which narrows the chunk-size distribution around the
//! average ("normalized chunking"). Bytes before `min_size` are never hashed (the sub-minimum
//! skip that makes FastCDC fast), and no chunk is longer than `max_size`.
//!
//! The cut decision only ever looks at `max_size` bytes from the chunk start, which is what lets
//! [`stream::chunk_reader`] produce exactly the same cut points as [`Chunker::chunks`] on the
//! whole buffer.

mod gear;
pub mod stream;

pub use gear::{GEAR, GEAR_LS, GEAR_SEED};

/// Smallest `min_size` accepted: below it the gear hash has too little context.
pub const MIN_SIZE_FLOOR: usize = 64;
/// Largest `max_size` accepted (chunks are held in memory whole).
pub const MAX_SIZE_CEILING: usize = 256 << 20;
/// Default sizes: 2 KiB / 16 KiB / 64 KiB.
pub const DEFAULT_MIN: usize = 2 << 10;
pub const DEFAULT_AVG: usize = 16 << 10;
pub const DEFAULT_MAX: usize = 64 << 10;
/// Default normalization level (FastCDC's "NC level"): masks of avg bits +/- 1.
pub const DEFAULT_NORMALIZATION: u32 = 1;

/// Mask one-bits are spread over this window of the 64-bit hash. High bits depend on more input
/// bytes (bit `k` of a gear hash depends on the last `k + 1` bytes), so low bits are avoided; bit
/// 63 is avoided so the two-bytes-per-step loop, which checks `hash << 1`, loses no mask bit.
const MASK_HIGHEST_BIT: u32 = 62;
const MASK_WINDOW: u32 = 48;

/// Why a set of chunker parameters was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    #[error("min_size must be at least {floor} bytes, got {got}")]
    MinTooSmall { floor: usize, got: usize },
    #[error("chunk sizes must satisfy min_size < avg_size < max_size, got {min} / {avg} / {max}")]
    NotOrdered { min: usize, avg: usize, max: usize },
    #[error("max_size must be at most {ceiling} bytes, got {got}")]
    MaxTooLarge { ceiling: usize, got: usize },
    #[error("normalization level must be 0 to 3, got {0}")]
    BadNormalization(u32),
}

/// A configured chunker. Cheap to copy; holds only sizes and masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunker {
    min_size: usize,
    avg_size: usize,
    max_size: usize,
    /// Stricter mask, used while the chunk is shorter than `avg_size`.
    mask_small: u64,
    /// Looser mask, used from `avg_size` up to `max_size`.
    mask_large: u64,
}

impl Default for Chunker {
    fn default() -> Self {
        Self::new(DEFAULT_MIN, DEFAULT_AVG, DEFAULT_MAX, DEFAULT_NORMALIZATION)
            .expect("default chunk sizes are valid")
    }
}

/// A mask with `ones` one-bits spread evenly over the mask window.
pub fn spread_mask(ones: u32) -> u64 {
    let ones = ones.clamp(1, MASK_WINDOW);
    (0..ones).fold(0u64, |mask, i| {
        mask | 1u64 << (MASK_HIGHEST_BIT - i * MASK_WINDOW / ones)
    })
}

impl Chunker {
    /// A chunker for the given sizes. `avg_size` need not be a power of two: the masks use
    /// `round(log2(avg_size))` bits, +/- `normalization`.
    pub fn new(
        min_size: usize,
        avg_size: usize,
        max_size: usize,
        normalization: u32,
    ) -> Result<Self, ParamsError> {
        if min_size < MIN_SIZE_FLOOR {
            return Err(ParamsError::MinTooSmall {
                floor: MIN_SIZE_FLOOR,
                got: min_size,
            });
        }
        if !(min_size < avg_size && avg_size < max_size) {
            return Err(ParamsError::NotOrdered {
                min: min_size,
                avg: avg_size,
                max: max_size,
            });
        }
        if max_size > MAX_SIZE_CEILING {
            return Err(ParamsError::MaxTooLarge {
                ceiling: MAX_SIZE_CEILING,
                got: max_size,
            });
        }
        if normalization > 3 {
            return Err(ParamsError::BadNormalization(normalization));
        }
        let bits = (avg_size as f64).log2().round() as u32;
        Ok(Self {
            min_size,
            avg_size,
            max_size,
            mask_small: spread_mask(bits + normalization),
            mask_large: spread_mask(bits.saturating_sub(normalization)),
        })
    }

    pub fn min_size(&self) -> usize {
        self.min_size
    }
    pub fn avg_size(&self) -> usize {
        self.avg_size
    }
    pub fn max_size(&self) -> usize {
        self.max_size
    }
    /// The (strict, loose) masks, for independent implementations to check against.
    pub fn masks(&self) -> (u64, u64) {
        (self.mask_small, self.mask_large)
    }

    /// Length of the chunk that starts at `data[0]`.
    ///
    /// `data` must hold at least `max_size` bytes unless it is the end of the input; the result
    /// never depends on bytes past `max_size`.
    #[inline]
    pub fn cut(&self, data: &[u8]) -> usize {
        let len = data.len();
        if len <= self.min_size {
            return len;
        }
        let end = len.min(self.max_size);
        let normal = self.avg_size.min(end);
        let mut hash = 0u64;
        if let Some(cut) = scan(&mut hash, data, self.min_size, normal, self.mask_small) {
            return cut;
        }
        if let Some(cut) = scan(&mut hash, data, normal, end, self.mask_large) {
            return cut;
        }
        end
    }

    /// Iterates over `(offset, length)` of the chunks of a whole buffer.
    pub fn chunks<'a>(&self, data: &'a [u8]) -> Chunks<'a> {
        Chunks {
            chunker: *self,
            data,
            offset: 0,
        }
    }
}

/// Rolls the gear hash over `data[from..to]`, returning the chunk length at the first byte whose
/// hash matches `mask`. On x86-64 eight bytes are taken per loop turn by [`scan_x86_64`]; the
/// portable [`scan_portable`] does the rest (and all of it elsewhere). Both give the same cuts.
#[inline(always)]
fn scan(hash: &mut u64, data: &[u8], from: usize, to: usize, mask: u64) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        scan_x86_64(hash, data, from, to, mask)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        scan_portable(hash, data, from, to, mask)
    }
}

/// The hot loop of [`scan`] in assembly, eight bytes per turn, for whole 8-byte blocks of
/// `data[from..to]`; the tail goes to [`scan_portable`].
///
/// Same algebra as [`scan_portable`], scheduled so that the loop-carried chain is one shift and
/// two adds per four bytes while every intermediate hash is formed by an `lea` off that chain
/// (`lea x, [G'[a] + h*4]` is the hash after `a`, shifted). Compilers reassociate the portable
/// version's adds back into the chain and spend more instructions; this version measured about
/// 9% faster on one core.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
fn scan_x86_64(hash: &mut u64, data: &[u8], from: usize, to: usize, mask: u64) -> Option<usize> {
    if from >= to {
        return None;
    }
    let blocks = &data[from..to][..(to - from) / 8 * 8];
    if blocks.is_empty() {
        return scan_portable(hash, data, from, to, mask);
    }
    let start = blocks.as_ptr();
    let end = start.wrapping_add(blocks.len());
    let mut p = start;
    let mut h = *hash;
    let hit: u64;
    // SAFETY: the loop reads the bytes `[p, p + 8)` for `p` from `start` up to `end` in steps of
    // 8, all inside `blocks`, and 8-byte table entries at byte indexes (< 256) of the two static
    // 256-entry gear tables. It writes no memory and touches no stack; every register it changes
    // is declared as an output.
    unsafe {
        std::arch::asm!(
            "2:",
            "movzx {a:e}, byte ptr [{p}]",
            "movzx {b:e}, byte ptr [{p} + 1]",
            "mov {ga}, qword ptr [{gls} + {a}*8]",
            "lea {x}, [{ga} + {h}*4]",
            "test {x}, {ms}",
            "jz 31f",
            "add {ga}, qword ptr [{g} + {b}*8]",
            "lea {x}, [{ga} + {h}*4]",
            "test {x}, {m}",
            "jz 32f",
            "movzx {a:e}, byte ptr [{p} + 2]",
            "movzx {b:e}, byte ptr [{p} + 3]",
            "mov {x}, qword ptr [{gls} + {a}*8]",
            "lea {x}, [{x} + {ga}*4]",
            "shl {h}, 4",
            "add {h}, {x}",
            "test {h}, {ms}",
            "jz 33f",
            "add {h}, qword ptr [{g} + {b}*8]",
            "test {h}, {m}",
            "jz 34f",
            "movzx {a:e}, byte ptr [{p} + 4]",
            "movzx {b:e}, byte ptr [{p} + 5]",
            "mov {ga}, qword ptr [{gls} + {a}*8]",
            "lea {x}, [{ga} + {h}*4]",
            "test {x}, {ms}",
            "jz 35f",
            "add {ga}, qword ptr [{g} + {b}*8]",
            "lea {x}, [{ga} + {h}*4]",
            "test {x}, {m}",
            "jz 36f",
            "movzx {a:e}, byte ptr [{p} + 6]",
            "movzx {b:e}, byte ptr [{p} + 7]",
            "mov {x}, qword ptr [{gls} + {a}*8]",
            "lea {x}, [{x} + {ga}*4]",
            "shl {h}, 4",
            "add {h}, {x}",
            "test {h}, {ms}",
            "jz 37f",
            "add {h}, qword ptr [{g} + {b}*8]",
            "test {h}, {m}",
            "jz 38f",
            "add {p}, 8",
            "cmp {p}, {end}",
            "jb 2b",
            "xor {hit:e}, {hit:e}",
            "jmp 4f",
            "31:", "mov {hit:e}, 1", "jmp 4f",
            "32:", "mov {hit:e}, 2", "jmp 4f",
            "33:", "mov {hit:e}, 3", "jmp 4f",
            "34:", "mov {hit:e}, 4", "jmp 4f",
            "35:", "mov {hit:e}, 5", "jmp 4f",
            "36:", "mov {hit:e}, 6", "jmp 4f",
            "37:", "mov {hit:e}, 7", "jmp 4f",
            "38:", "mov {hit:e}, 8",
            "4:",
            p = inout(reg) p,
            h = inout(reg) h,
            hit = out(reg) hit,
            a = out(reg) _,
            b = out(reg) _,
            ga = out(reg) _,
            x = out(reg) _,
            end = in(reg) end,
            gls = in(reg) GEAR_LS.as_ptr(),
            g = in(reg) GEAR.as_ptr(),
            ms = in(reg) mask << 1,
            m = in(reg) mask,
            options(nostack, readonly, pure),
        );
    }
    let done = p as usize - start as usize;
    if hit != 0 {
        return Some(from + done + hit as usize);
    }
    *hash = h;
    scan_portable(hash, data, from + blocks.len(), to, mask)
}

/// [`scan`] in plain Rust, for any target.
///
/// The speed of a gear hash is bounded by its serial shift-add chain, so four bytes are taken per
/// step and the chain is shortened algebraically. With `G' = G << 1`:
///
/// * `(h << 2) + G'[a]` is the hash after byte `a`, shifted left by one: testing it against
///   `mask << 1` is the same test as on the hash itself, because bit 63 is never in a mask;
/// * `p = G'[a] + G[b]` does not depend on `h`, so the hash after `b` is `(h << 2) + p`, and the
///   hash after `d` is `(h << 4) + (p << 2) + G'[c] + G[d]`.
///
/// The intermediate hashes are then computed off the critical path, which carries only about one
/// operation per byte instead of two. Kept out of line so the loop owns the registers it needs.
#[inline(never)]
fn scan_portable(hash: &mut u64, data: &[u8], from: usize, to: usize, mask: u64) -> Option<usize> {
    if from >= to {
        return None;
    }
    let mask_shifted = mask << 1;
    let mut h = *hash;
    let mut pos = from;
    let mut quads = data[from..to].chunks_exact(4);
    for q in &mut quads {
        let ga = GEAR_LS[q[0] as usize];
        let p = ga.wrapping_add(GEAR[q[1] as usize]);
        let s = h << 2;
        if s.wrapping_add(ga) & mask_shifted == 0 {
            return Some(pos + 1);
        }
        if s.wrapping_add(p) & mask == 0 {
            return Some(pos + 2);
        }
        let t = (h << 4)
            .wrapping_add(p << 2)
            .wrapping_add(GEAR_LS[q[2] as usize]);
        if t & mask_shifted == 0 {
            return Some(pos + 3);
        }
        h = t.wrapping_add(GEAR[q[3] as usize]);
        if h & mask == 0 {
            return Some(pos + 4);
        }
        pos += 4;
    }
    for &byte in quads.remainder() {
        h = (h << 1).wrapping_add(GEAR[byte as usize]);
        pos += 1;
        if h & mask == 0 {
            return Some(pos);
        }
    }
    *hash = h;
    None
}

/// Iterator over the chunks of a whole buffer, as `(offset, length)`.
#[derive(Debug, Clone)]
pub struct Chunks<'a> {
    chunker: Chunker,
    data: &'a [u8],
    offset: usize,
}

impl Iterator for Chunks<'_> {
    type Item = (usize, usize);

    fn next(&mut self) -> Option<Self::Item> {
        if self.offset >= self.data.len() {
            return None;
        }
        let len = self.chunker.cut(&self.data[self.offset..]);
        let item = (self.offset, len);
        self.offset += len;
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_assembly_loop_cuts_where_the_portable_one_does() {
        // Masks from strict to loose, so hits fall at every position of the 8-byte blocks, and
        // ranges of every length modulo 8.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let mut positions = [0usize; 8];
        for ones in 1..14 {
            let mask = spread_mask(ones);
            let mut from = 0;
            for step in 0..2000 {
                let to = (from + 1 + step % 300).min(data.len());
                let (mut h1, mut h2) = (step as u64 * 0x1234_5678, step as u64 * 0x1234_5678);
                let fast = scan(&mut h1, &data, from, to, mask);
                let slow = scan_portable(&mut h2, &data, from, to, mask);
                assert_eq!(fast, slow, "mask bits {ones}, range {from}..{to}");
                match fast {
                    Some(cut) => positions[(cut - from - 1) % 8] += 1,
                    None => assert_eq!(h1, h2),
                }
                from = fast.unwrap_or(to) % (data.len() - 400);
            }
        }
        assert!(
            positions.iter().all(|&n| n > 0),
            "hits at every block offset: {positions:?}"
        );
    }

    /// A deliberately plain one-byte-at-a-time version of the cut rule, to check the unrolled one.
    fn reference_cut(c: &Chunker, data: &[u8]) -> usize {
        if data.len() <= c.min_size {
            return data.len();
        }
        let end = data.len().min(c.max_size);
        let mut h = 0u64;
        for (i, &b) in data.iter().enumerate().take(end).skip(c.min_size) {
            h = (h << 1).wrapping_add(GEAR[b as usize]);
            let mask = if i < c.avg_size {
                c.mask_small
            } else {
                c.mask_large
            };
            if h & mask == 0 {
                return i + 1;
            }
        }
        end
    }

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn unrolled_cut_matches_the_byte_at_a_time_rule() {
        for (min, avg, max) in [(64, 256, 1024), (2048, 16384, 65536), (1000, 3000, 9001)] {
            let c = Chunker::new(min, avg, max, 1).unwrap();
            let data = pseudo_random(1 << 20, min as u64);
            let mut off = 0;
            while off < data.len() {
                let want = reference_cut(&c, &data[off..]);
                assert_eq!(
                    c.cut(&data[off..]),
                    want,
                    "at offset {off} for {min}/{avg}/{max}"
                );
                off += want;
            }
        }
    }

    #[test]
    fn chunks_respect_bounds_and_cover_input() {
        let c = Chunker::default();
        let data = pseudo_random(4 << 20, 7);
        let chunks: Vec<_> = c.chunks(&data).collect();
        let mut expect_offset = 0;
        for (i, &(off, len)) in chunks.iter().enumerate() {
            assert_eq!(off, expect_offset);
            assert!(len <= DEFAULT_MAX);
            if i + 1 < chunks.len() {
                assert!(len > DEFAULT_MIN);
            }
            expect_offset += len;
        }
        assert_eq!(expect_offset, data.len());
        let avg = data.len() / chunks.len();
        assert!(
            (8 << 10..32 << 10).contains(&avg),
            "average chunk {avg} far from 16 KiB"
        );
    }

    #[test]
    fn zero_bytes_cut_at_max_size() {
        let c = Chunker::default();
        let data = vec![0u8; 300_000];
        let lens: Vec<_> = c.chunks(&data).map(|(_, l)| l).collect();
        assert_eq!(lens, vec![65536, 65536, 65536, 65536, 37856]);
    }

    #[test]
    fn masks_have_expected_weight_and_avoid_bit_63() {
        let (s, l) = Chunker::default().masks();
        assert_eq!(s.count_ones(), 15);
        assert_eq!(l.count_ones(), 13);
        assert_eq!(s >> 63, 0);
        assert_eq!(l >> 63, 0);
    }

    #[test]
    fn bad_params_are_refused() {
        assert!(matches!(
            Chunker::new(16, 256, 1024, 1),
            Err(ParamsError::MinTooSmall { .. })
        ));
        assert!(matches!(
            Chunker::new(4096, 2048, 65536, 1),
            Err(ParamsError::NotOrdered { .. })
        ));
        assert!(matches!(
            Chunker::new(2048, 4096, 1 << 30, 1),
            Err(ParamsError::MaxTooLarge { .. })
        ));
        assert_eq!(
            Chunker::new(2048, 4096, 8192, 9),
            Err(ParamsError::BadNormalization(9))
        );
    }

    #[test]
    fn empty_and_tiny_inputs() {
        let c = Chunker::default();
        assert_eq!(c.chunks(&[]).count(), 0);
        assert_eq!(c.chunks(&[1, 2, 3]).collect::<Vec<_>>(), vec![(0, 3)]);
    }
}
