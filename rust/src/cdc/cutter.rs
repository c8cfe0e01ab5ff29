//! Turning candidates into cut points: normalized chunking over a stream of candidates.
//!
//! The scan (in [`super::simd`]) finds every position whose hash passes the loose mask; the
//! [`Cutter`] walks them in order and decides, for the chunk being built, where it ends: the first
//! strict candidate at least `min_size` bytes in, or failing that the first candidate at least
//! `avg_size` bytes in, or `max_size` bytes in. A cut is only reported once it is final, that is
//! once every candidate before it has been seen, so the same cuts come out whether the input is
//! scanned whole or a buffer at a time.

use super::simd::{Kernel, Lanes};
use super::window::{Candidate, WINDOW};
use super::Chunker;

/// Bytes scanned per call to the kernel: a block and its lanes' candidate lists stay in the
/// core's L2 cache (a stream's read buffer is this size too).
pub const SCAN_BLOCK: usize = 256 << 10;

/// Where the cuts of one input fall, fed with that input's bytes in order.
#[derive(Debug, Clone)]
pub struct Cutter {
    chunker: Chunker,
    kernel: Kernel,
    /// Start of the chunk being built (an input offset).
    start: u64,
    /// Every candidate below this input offset has been seen.
    scanned: u64,
    found: Vec<Candidate>,
    lanes: Lanes,
}

impl Cutter {
    pub fn new(chunker: Chunker) -> Self {
        Self::with_kernel(chunker, Kernel::detect())
    }

    /// A cutter that scans with `kernel` (which the CPU must support).
    pub fn with_kernel(chunker: Chunker, kernel: Kernel) -> Self {
        Self {
            chunker,
            kernel,
            start: 0,
            scanned: 0,
            found: Vec::new(),
            lanes: Lanes::default(),
        }
    }

    pub fn chunker(&self) -> &Chunker {
        &self.chunker
    }

    /// Start of the chunk not yet cut.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The first input offset not scanned yet. The next [`Cutter::scan`] needs the [`WINDOW`]
    /// bytes before it.
    pub fn scanned(&self) -> u64 {
        self.scanned
    }

    /// Scans the input from [`Cutter::scanned`] to `base + data.len()`, where `data` holds the
    /// input bytes from offset `base` (at least [`WINDOW`] bytes before `scanned`, or from the
    /// start of the input), and appends the end offsets of the chunks that became final.
    pub fn scan(&mut self, data: &[u8], base: u64, cuts: &mut Vec<u64>) {
        let end = base + data.len() as u64;
        // No chunk ends within its first `min_size` (> WINDOW) bytes, so the first WINDOW bytes
        // of the input need no hashing.
        if self.scanned < WINDOW as u64 {
            assert_eq!(base, 0, "the input is scanned from its start");
            self.scanned = end.min(WINDOW as u64);
        }
        assert!(base + WINDOW as u64 <= self.scanned || self.scanned >= end);
        while self.scanned < end {
            let to = end.min(self.scanned + SCAN_BLOCK as u64);
            let (from_index, to_index) = ((self.scanned - base) as usize, (to - base) as usize);
            self.found.clear();
            self.kernel.scan(
                data,
                from_index,
                to_index,
                self.chunker.masks,
                &mut self.lanes,
                &mut self.found,
            );
            for i in 0..self.found.len() {
                let candidate = self.found[i];
                self.candidate(base + candidate.index as u64, candidate.strict, cuts);
            }
            self.scanned = to;
            self.cut_full_chunks(self.scanned, cuts);
        }
    }

    /// The input ends at `len` (everything before it scanned): appends the remaining cuts.
    pub fn finish(&mut self, len: u64, cuts: &mut Vec<u64>) {
        // Full chunks up to the last byte; what remains after them is the last chunk.
        self.cut_full_chunks(len.saturating_sub(1), cuts);
        if len > self.start {
            self.start = len;
            cuts.push(len);
        }
    }

    /// A candidate after input byte `index`.
    fn candidate(&mut self, index: u64, strict: bool, cuts: &mut Vec<u64>) {
        self.cut_full_chunks(index, cuts);
        let length = index + 1 - self.start;
        let past_min = length > self.chunker.min_size as u64;
        let past_avg = length > self.chunker.avg_size as u64;
        if past_min && (strict || past_avg) {
            self.start = index + 1;
            cuts.push(self.start);
        }
    }

    /// Cuts the chunks that reach `max_size` at or before offset `limit` (a candidate's byte,
    /// the scanned point, the input's end): no candidate before `limit` ended them, so they end
    /// at their maximum size.
    fn cut_full_chunks(&mut self, limit: u64, cuts: &mut Vec<u64>) {
        let max = self.chunker.max_size as u64;
        while self.start + max <= limit {
            self.start += max;
            cuts.push(self.start);
        }
    }
}
