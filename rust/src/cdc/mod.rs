//! Content-defined chunking: normalized chunking in the manner of FastCDC (Xia et al., "The
//! Design of Fast Content-Defined Chunking for Data Deduplication Based Storage Systems", 2020),
//! on a window hash that SIMD lanes can compute independently.
//!
//! A chunk may end after byte `i` when the hash of the 32 bytes ending there has its top bits
//! zero (see [`window`]). A stricter mask (more bits) is used while the chunk is shorter than the
//! average size and a looser one after, which narrows the chunk-size distribution around the
//! average ("normalized chunking"). No chunk ends within its first `min_size` bytes, and none is
//! longer than `max_size`.
//!
//! Each position's hash depends on its 32-byte window alone, not on where the chunk started, so
//! the scan for candidate positions runs ahead of the cut decisions, in 8 or 16 SIMD lanes (see
//! [`simd`]), and [`cutter::Cutter`] resolves the cuts from the candidates. The cut decision only
//! ever looks at `max_size` bytes from the chunk start, which is what lets
//! [`stream::chunk_reader`] produce exactly the same cut points as [`Chunker::chunks`] on the
//! whole buffer. [`Chunker::cut`] is the same rule one chunk at a time, one byte at a time.

pub mod cutter;
pub mod simd;
pub mod stream;
pub mod window;

use cutter::Cutter;
use window::{mix, roll, top_bits_mask, Masks};

/// Smallest `min_size` accepted: below it the window hash has too little context.
pub const MIN_SIZE_FLOOR: usize = 64;
// A chunk's first cut candidate is then a whole window past its start, and past the input's
// start: the cutter never hashes the input's first WINDOW bytes.
const _: () = assert!(MIN_SIZE_FLOOR > window::WINDOW);
/// Largest `max_size` accepted (chunks are held in memory whole).
pub const MAX_SIZE_CEILING: usize = 256 << 20;
/// Default sizes: 2 KiB / 16 KiB / 64 KiB.
pub const DEFAULT_MIN: usize = 2 << 10;
pub const DEFAULT_AVG: usize = 16 << 10;
pub const DEFAULT_MAX: usize = 64 << 10;
/// Default normalization level (FastCDC's "NC level"): masks of avg bits +/- 1.
pub const DEFAULT_NORMALIZATION: u32 = 1;

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
    masks: Masks,
}

impl Default for Chunker {
    fn default() -> Self {
        Self::new(DEFAULT_MIN, DEFAULT_AVG, DEFAULT_MAX, DEFAULT_NORMALIZATION)
            .expect("default chunk sizes are valid")
    }
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
            masks: Masks {
                strict: top_bits_mask(bits + normalization),
                loose: top_bits_mask(bits.saturating_sub(normalization)),
            },
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
    pub fn masks(&self) -> (u32, u32) {
        (self.masks.strict, self.masks.loose)
    }

    /// Length of the chunk that starts at `data[0]`, one byte at a time: the plain statement of
    /// the rule that [`Chunker::chunks`] and [`stream::chunk_reader`] compute faster.
    ///
    /// `data` must hold at least `max_size` bytes unless it is the end of the input; the result
    /// never depends on bytes past `max_size`.
    pub fn cut(&self, data: &[u8]) -> usize {
        let len = data.len();
        if len <= self.min_size {
            return len;
        }
        let end = len.min(self.max_size);
        let mut digest = window::digest_before(data, self.min_size);
        for (index, &byte) in data.iter().enumerate().take(end).skip(self.min_size) {
            digest = roll(digest, byte);
            let mask = if index < self.avg_size {
                self.masks.strict
            } else {
                self.masks.loose
            };
            if mix(digest) & mask == 0 {
                return index + 1;
            }
        }
        end
    }

    /// Iterates over `(offset, length)` of the chunks of a whole buffer.
    pub fn chunks<'a>(&self, data: &'a [u8]) -> Chunks<'a> {
        self.chunks_with(data, simd::Kernel::detect())
    }

    /// [`Chunker::chunks`], scanning with `kernel` (the same cuts, at that kernel's speed).
    pub fn chunks_with<'a>(&self, data: &'a [u8], kernel: simd::Kernel) -> Chunks<'a> {
        Chunks {
            cutter: Cutter::with_kernel(*self, kernel),
            data,
            cuts: Vec::new(),
            next_cut: 0,
            offset: 0,
        }
    }
}

/// Iterator over the chunks of a whole buffer, as `(offset, length)`; scans a block at a time.
#[derive(Debug, Clone)]
pub struct Chunks<'a> {
    cutter: Cutter,
    data: &'a [u8],
    /// End offsets of chunks found and not yet returned, from `next_cut` on.
    cuts: Vec<u64>,
    next_cut: usize,
    offset: usize,
}

impl Iterator for Chunks<'_> {
    type Item = (usize, usize);

    fn next(&mut self) -> Option<Self::Item> {
        while self.next_cut == self.cuts.len() {
            let len = self.data.len() as u64;
            if self.cutter.start() == len {
                return None;
            }
            self.cuts.clear();
            self.next_cut = 0;
            let scanned = self.cutter.scanned();
            if scanned < len {
                let to = len.min(scanned + cutter::SCAN_BLOCK as u64) as usize;
                self.cutter.scan(&self.data[..to], 0, &mut self.cuts);
            } else {
                self.cutter.finish(len, &mut self.cuts);
            }
        }
        let end = self.cuts[self.next_cut] as usize;
        self.next_cut += 1;
        let item = (self.offset, end - self.offset);
        self.offset = end;
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::simd::{Kernel, Lanes};
    use super::window::{scan_portable, BYTE_KEY, MULTIPLIER, WINDOW};
    use super::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// The hash of the window ending at `index`, straight from its definition.
    fn window_hash(data: &[u8], index: usize) -> u32 {
        let digest = (0..WINDOW).fold(0u32, |sum, k| {
            sum.wrapping_add(u32::from(data[index - k] ^ BYTE_KEY).wrapping_shl(k as u32))
        });
        digest.wrapping_mul(MULTIPLIER)
    }

    #[test]
    fn the_rolled_hash_is_the_window_hash() {
        let data = pseudo_random(4096, 3);
        let masks = Masks {
            strict: top_bits_mask(3),
            loose: top_bits_mask(2),
        };
        let mut found = Vec::new();
        scan_portable(&data, WINDOW, data.len(), masks, &mut found);
        let want: Vec<_> = (WINDOW..data.len())
            .filter_map(|i| window::Candidate::of(i, window_hash(&data, i), masks))
            .collect();
        assert_eq!(found, want);
        assert!(found.len() > 500, "about a quarter of the positions pass");
    }

    #[test]
    fn every_kernel_finds_the_candidates_the_portable_scan_finds() {
        let kernels = Kernel::available();
        assert!(kernels.contains(&Kernel::Portable));
        let data = pseudo_random(1 << 20, 11);
        let mut lanes = Lanes::default();
        // Loose masks from 1 bit (every other position) to 14, ranges of every length modulo
        // 256 (whole turns per lane or not) from every offset modulo 16.
        for bits in [1, 2, 5, 9, 14] {
            let masks = Masks {
                strict: top_bits_mask(bits + 2),
                loose: top_bits_mask(bits),
            };
            let mut from = WINDOW;
            for step in 0..300 {
                let to = (from + step * 37 % 70_000).min(data.len());
                let mut want = Vec::new();
                scan_portable(&data, from, to, masks, &mut want);
                for &kernel in &kernels {
                    let mut got = Vec::new();
                    kernel.scan(&data, from, to, masks, &mut lanes, &mut got);
                    assert_eq!(got, want, "{kernel:?}, {bits} bits, {from}..{to}");
                }
                from = WINDOW + (from + 4099) % (data.len() / 2);
            }
        }
    }

    /// Cut points by [`Chunker::cut`], the one-chunk-at-a-time statement of the rule.
    fn cut_by_cut(c: &Chunker, data: &[u8]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut offset = 0;
        while offset < data.len() {
            let len = c.cut(&data[offset..]);
            out.push((offset, len));
            offset += len;
        }
        out
    }

    fn cut_by_cutter(c: &Chunker, data: &[u8], kernel: Kernel) -> Vec<(usize, usize)> {
        let mut cutter = Cutter::with_kernel(*c, kernel);
        let mut ends = Vec::new();
        cutter.scan(data, 0, &mut ends);
        cutter.finish(data.len() as u64, &mut ends);
        let mut start = 0;
        ends.into_iter()
            .map(|end| {
                let chunk = (start, end as usize - start);
                start = end as usize;
                chunk
            })
            .collect()
    }

    #[test]
    fn the_cutter_cuts_where_the_one_chunk_rule_does() {
        for (min, avg, max, norm) in [
            (64, 256, 1024, 1),
            (2048, 16384, 65536, 1),
            (1000, 3000, 9001, 2),
            (64, 65, 66, 0),
            (4096, 8192, 1 << 20, 3),
        ] {
            let c = Chunker::new(min, avg, max, norm).unwrap();
            for data in [
                pseudo_random(3 << 20, min as u64),
                // Runs longer than max_size, with random stretches between.
                (0..3 << 20)
                    .map(|i: usize| {
                        if (i / 100_000).is_multiple_of(2) {
                            0
                        } else {
                            ((i * 7919) >> 5) as u8
                        }
                    })
                    .collect(),
            ] {
                let want = cut_by_cut(&c, &data);
                assert_eq!(
                    c.chunks(&data).collect::<Vec<_>>(),
                    want,
                    "{min}/{avg}/{max}"
                );
                for kernel in Kernel::available() {
                    assert_eq!(cut_by_cutter(&c, &data, kernel), want, "{kernel:?}");
                }
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
            (16 << 10..22 << 10).contains(&avg),
            "average chunk {avg} far from the 18-19 KiB normalized chunking gives"
        );
    }

    #[test]
    fn runs_of_common_bytes_cut_at_max_size() {
        let c = Chunker::default();
        for byte in [0x00, 0xff, b' '] {
            let data = vec![byte; 300_000];
            let lens: Vec<_> = c.chunks(&data).map(|(_, l)| l).collect();
            assert_eq!(lens, vec![65536, 65536, 65536, 65536, 37856], "{byte:#x}");
        }
    }

    #[test]
    fn masks_are_the_top_bits() {
        let (strict, loose) = Chunker::default().masks();
        assert_eq!(strict, 0xfffe_0000, "15 bits for 16 KiB + 1");
        assert_eq!(loose, 0xfff8_0000, "13 bits for 16 KiB - 1");
        let (strict, loose) = Chunker::new(64, 65, 66, 3).unwrap().masks();
        assert_eq!((strict, loose), (top_bits_mask(9), top_bits_mask(3)));
        // The largest sizes accepted still leave a bit of the hash unmasked.
        let (strict, _) = Chunker::new(1 << 20, (1 << 28) - 1, 1 << 28, 3)
            .unwrap()
            .masks();
        assert_eq!(strict, top_bits_mask(31));
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
        let data = pseudo_random(DEFAULT_MIN + 1, 5);
        assert_eq!(c.chunks(&data).collect::<Vec<_>>(), cut_by_cut(&c, &data));
    }
}
