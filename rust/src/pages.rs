//! Page hashing: digests of every 4 KiB page of a byte range, zero-page detection, same-offset
//! comparison against a golden page list, and unique-page counting across many inputs.
//!
//! These answer the density questions of VM snapshots: how much of a RAM image is zero, how much
//! differs from a golden snapshot at the same offset (what a diff snapshot stores), and how many
//! distinct pages all snapshots hold together (what perfect page sharing would keep).

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hash, Hasher};

use rayon::prelude::*;

mod xxh3_page;

pub use xxh3_page::xxh3_page;

/// Guest page size.
pub const PAGE_SIZE: usize = 4096;
/// Pages per work item: one 64-bit word of the zero bitmap.
const PAGES_PER_WORD: usize = 64;

/// Which digest identifies a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageHash {
    /// 64-bit XXH3: fast; fine for statistics, where a rare collision only skews a count.
    Xxh3,
    /// 256-bit BLAKE3: for decisions where a collision would corrupt data (sharing pages).
    Blake3,
}

impl PageHash {
    pub fn name(self) -> &'static str {
        match self {
            PageHash::Xxh3 => "xxh3",
            PageHash::Blake3 => "blake3",
        }
    }

    pub fn digest_size(self) -> usize {
        match self {
            PageHash::Xxh3 => 8,
            PageHash::Blake3 => 32,
        }
    }
}

impl std::str::FromStr for PageHash {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "xxh3" => Ok(PageHash::Xxh3),
            "blake3" => Ok(PageHash::Blake3),
            other => Err(format!(
                "unknown page hash {other:?}: expected \"xxh3\" or \"blake3\""
            )),
        }
    }
}

/// The digests of one input's pages, in page order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Digests {
    Xxh3(Vec<u64>),
    Blake3(Vec<[u8; 32]>),
}

/// Per-page digests and zero flags of one byte range. A final partial page is hashed as it is.
#[derive(Debug, Clone)]
pub struct PageDigests {
    digests: Digests,
    /// Bit `i % 64` of word `i / 64` is set when page `i` is all zeros.
    zero_bitmap: Vec<u64>,
    zero_pages: usize,
    byte_len: u64,
}

/// True when every byte is zero. Works 64 bytes at a time so the OR vectorizes and a non-zero
/// page (the common case) is rejected after its first cache line.
#[inline]
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(64);
    let blocks_zero = blocks.all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0);
    blocks_zero && blocks.remainder().iter().all(|&x| x == 0)
}

/// The whole page [`xxh3_page::PREFETCH_PAGES`] after page `index` of `data`, if there is one.
fn page_ahead(data: &[u8], index: usize) -> Option<&[u8; PAGE_SIZE]> {
    let start = (index + xxh3_page::PREFETCH_PAGES) * PAGE_SIZE;
    data.get(start..start + PAGE_SIZE)?.try_into().ok()
}

/// `digest(page, ahead)` of every page; `ahead` is a page the same thread hashes soon, for digests
/// that prefetch.
fn hash_pages<D, F>(data: &[u8], digest: F) -> (Vec<D>, Vec<u64>)
where
    D: Copy + Default + Send + Sync,
    F: Fn(&[u8], Option<&[u8; PAGE_SIZE]>) -> D + Sync + Send,
{
    let pages = data.len().div_ceil(PAGE_SIZE);
    let zero_digest = digest(&[0u8; PAGE_SIZE], None);
    let mut digests = vec![D::default(); pages];
    let mut bitmap = vec![0u64; pages.div_ceil(PAGES_PER_WORD)];
    digests
        .par_chunks_mut(PAGES_PER_WORD)
        .zip(bitmap.par_iter_mut())
        .zip(data.par_chunks(PAGES_PER_WORD * PAGE_SIZE))
        .enumerate()
        .for_each(|(block_index, ((out, word), block))| {
            for (i, (page, slot)) in block.chunks(PAGE_SIZE).zip(out.iter_mut()).enumerate() {
                let ahead = page_ahead(data, block_index * PAGES_PER_WORD + i);
                if is_zero(page) {
                    *word |= 1 << i;
                    // Only a full zero page has the precomputed digest; a short one is hashed.
                    *slot = if page.len() == PAGE_SIZE {
                        zero_digest
                    } else {
                        digest(page, ahead)
                    };
                } else {
                    *slot = digest(page, ahead);
                }
            }
        });
    (digests, bitmap)
}

impl PageDigests {
    /// Hashes every page of `data` in parallel on the current rayon pool.
    pub fn compute(data: &[u8], algo: PageHash) -> Self {
        let (digests, zero_bitmap) = match algo {
            PageHash::Xxh3 => {
                let (d, z) = hash_pages(data, xxh3_page);
                (Digests::Xxh3(d), z)
            }
            PageHash::Blake3 => {
                let (d, z) = hash_pages(data, |p, _| *blake3::hash(p).as_bytes());
                (Digests::Blake3(d), z)
            }
        };
        let zero_pages = zero_bitmap.iter().map(|w| w.count_ones() as usize).sum();
        Self {
            digests,
            zero_bitmap,
            zero_pages,
            byte_len: data.len() as u64,
        }
    }

    pub fn algo(&self) -> PageHash {
        match self.digests {
            Digests::Xxh3(_) => PageHash::Xxh3,
            Digests::Blake3(_) => PageHash::Blake3,
        }
    }

    pub fn page_count(&self) -> usize {
        match &self.digests {
            Digests::Xxh3(d) => d.len(),
            Digests::Blake3(d) => d.len(),
        }
    }

    pub fn byte_len(&self) -> u64 {
        self.byte_len
    }

    pub fn zero_pages(&self) -> usize {
        self.zero_pages
    }

    pub fn is_zero_page(&self, index: usize) -> bool {
        index < self.page_count() && self.zero_bitmap[index / 64] >> (index % 64) & 1 == 1
    }

    pub fn digests(&self) -> &Digests {
        &self.digests
    }

    /// The digest of page `index` as bytes (little-endian for XXH3).
    pub fn digest_bytes(&self, index: usize) -> Option<Vec<u8>> {
        match &self.digests {
            Digests::Xxh3(d) => d.get(index).map(|v| v.to_le_bytes().to_vec()),
            Digests::Blake3(d) => d.get(index).map(|v| v.to_vec()),
        }
    }

    /// Compares page `i` with the golden's page `i`. Pages past the golden's end differ.
    pub fn compare(&self, golden: &PageDigests) -> Result<Comparison, MismatchedHash> {
        fn count<D: PartialEq + Sync>(mine: &[D], golden: &[D]) -> usize {
            mine.par_iter()
                .zip(golden.par_iter())
                .filter(|(a, b)| a == b)
                .count()
        }
        let same = match (&self.digests, &golden.digests) {
            (Digests::Xxh3(a), Digests::Xxh3(b)) => count(a, b),
            (Digests::Blake3(a), Digests::Blake3(b)) => count(a, b),
            _ => {
                return Err(MismatchedHash {
                    mine: self.algo(),
                    golden: golden.algo(),
                })
            }
        };
        Ok(Comparison {
            pages: self.page_count(),
            same,
            differ: self.page_count() - same,
        })
    }
}

/// Result of a same-offset comparison with a golden page list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Comparison {
    pub pages: usize,
    /// Pages identical to the golden's page at the same offset (shareable with it).
    pub same: usize,
    /// Pages a diff against the golden has to store.
    pub differ: usize,
}

/// Digests of different algorithms cannot be compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot compare {} page digests with {} page digests", mine.name(), golden.name())]
pub struct MismatchedHash {
    pub mine: PageHash,
    pub golden: PageHash,
}

/// Total and distinct page counts over many inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UniqueCount {
    pub pages: usize,
    pub unique: usize,
}

/// A hasher for keys that are already uniformly distributed digests: it keeps (the first eight
/// bytes of) the digest as the hash instead of hashing it again, which makes counting distinct
/// pages several times faster than with the default SipHash.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(word);
    }

    fn write_u64(&mut self, value: u64) {
        self.0 ^= value;
    }
}

type DigestSet<'a, D> = HashSet<&'a D, BuildHasherDefault<DigestHasher>>;

/// Counts the distinct pages over all inputs (all zero pages are one distinct page).
pub fn unique_pages(inputs: &[&PageDigests]) -> Result<UniqueCount, MismatchedHash> {
    fn distinct<'a, D: Eq + Hash + 'a>(lists: impl Iterator<Item = &'a Vec<D>>) -> usize {
        let mut seen = DigestSet::default();
        for list in lists {
            seen.extend(list.iter());
        }
        seen.len()
    }
    let pages = inputs.iter().map(|p| p.page_count()).sum();
    let Some(first) = inputs.first() else {
        return Ok(UniqueCount {
            pages: 0,
            unique: 0,
        });
    };
    if let Some(other) = inputs.iter().find(|p| p.algo() != first.algo()) {
        return Err(MismatchedHash {
            mine: other.algo(),
            golden: first.algo(),
        });
    }
    let unique = match first.algo() {
        PageHash::Xxh3 => distinct(inputs.iter().filter_map(|p| match &p.digests {
            Digests::Xxh3(d) => Some(d),
            Digests::Blake3(_) => None,
        })),
        PageHash::Blake3 => distinct(inputs.iter().filter_map(|p| match &p.digests {
            Digests::Blake3(d) => Some(d),
            Digests::Xxh3(_) => None,
        })),
    };
    Ok(UniqueCount { pages, unique })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; PAGE_SIZE]
    }

    fn image(pages: &[u8]) -> Vec<u8> {
        pages.iter().flat_map(|&f| page(f)).collect()
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&page(0)));
        let mut p = page(0);
        p[PAGE_SIZE - 1] = 1;
        assert!(!is_zero(&p));
        assert!(!is_zero(&[0, 0, 3]));
    }

    #[test]
    fn known_answers_for_a_constructed_image() {
        for algo in [PageHash::Xxh3, PageHash::Blake3] {
            let golden = PageDigests::compute(&image(&[0, 1, 2, 0, 3]), algo);
            let other = PageDigests::compute(&image(&[0, 1, 9, 9, 3, 4]), algo);
            assert_eq!(golden.page_count(), 5);
            assert_eq!(golden.zero_pages(), 2);
            assert!(golden.is_zero_page(0) && golden.is_zero_page(3) && !golden.is_zero_page(1));
            let cmp = other.compare(&golden).unwrap();
            assert_eq!(
                cmp,
                Comparison {
                    pages: 6,
                    same: 3,
                    differ: 3
                }
            );
            // Distinct contents: 0, 1, 2, 3, 9, 4.
            assert_eq!(
                unique_pages(&[&golden, &other]).unwrap(),
                UniqueCount {
                    pages: 11,
                    unique: 6
                }
            );
        }
    }

    #[test]
    fn many_pages_across_bitmap_words() {
        let fills: Vec<u8> = (0..200)
            .map(|i| if i % 3 == 0 { 0 } else { (i % 251) as u8 })
            .collect();
        let d = PageDigests::compute(&image(&fills), PageHash::Xxh3);
        assert_eq!(d.zero_pages(), fills.iter().filter(|&&f| f == 0).count());
        for (i, &f) in fills.iter().enumerate() {
            assert_eq!(d.is_zero_page(i), f == 0, "page {i}");
        }
    }

    #[test]
    fn partial_last_page_is_its_own_page() {
        let mut data = image(&[5]);
        data.extend_from_slice(&[0u8; 100]);
        let d = PageDigests::compute(&data, PageHash::Xxh3);
        assert_eq!(d.page_count(), 2);
        assert_eq!(d.zero_pages(), 1);
        let full_zero = PageDigests::compute(&page(0), PageHash::Xxh3);
        assert_ne!(d.digest_bytes(1), full_zero.digest_bytes(0));
    }

    #[test]
    fn mixing_algorithms_is_refused() {
        let a = PageDigests::compute(&page(1), PageHash::Xxh3);
        let b = PageDigests::compute(&page(1), PageHash::Blake3);
        assert!(a.compare(&b).is_err());
        assert!(unique_pages(&[&a, &b]).is_err());
    }
}
