//! Fuzz target `cdc`: the chunker on hostile bytes and sizes.
//!
//! The input gives the chunk sizes (any valid `min`/`avg`/`max` from the floor up, any
//! normalization), how to expand the data (as is, each byte as a run, or the data repeated, so
//! runs longer than `max_size` and repeats past the hash window occur), a read pattern, and the
//! data. Every way of cutting must agree with the one-chunk-at-a-time rule ([`Chunker::cut`]):
//! [`Chunker::chunks`], a [`Cutter`] on every SIMD kernel the CPU has, and [`chunk_reader`]
//! reading in uneven pieces, with the bytes it hands out equal to the input's. Chunks must cover
//! the input, none longer than `max_size`, none but the last at most `min_size`.
//!
//! The seed corpus in `rust/fuzz/corpus/cdc/` is written by
//! `SUPERMACHINE_FUZZ_WRITE_SEEDS=1 cargo test --test fuzz_cdc seed_corpus`.

// The shared driver has an unneeded `mut` (reported upstream); keep -D warnings clean here.
#[allow(unused_mut)]
mod fuzz_support;

use fuzz_support::Input;

use std::io::{self, Read};

use supermachine_core::cdc::cutter::Cutter;
use supermachine_core::cdc::simd::Kernel;
use supermachine_core::cdc::stream::chunk_reader;
use supermachine_core::cdc::{Chunker, MIN_SIZE_FLOOR};

/// Expanded inputs stay below this, so a run takes milliseconds.
const MAX_EXPANDED: usize = 1 << 20;

/// Hands out the data in pieces whose sizes cycle through `steps`.
struct Uneven<'a> {
    data: &'a [u8],
    steps: Vec<usize>,
    turn: usize,
}

impl Read for Uneven<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let step = self.steps[self.turn % self.steps.len()];
        self.turn += 1;
        let n = step.min(out.len()).min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn chunker(input: &mut Input<'_>) -> Chunker {
    let min = MIN_SIZE_FLOOR + usize::from(input.u16() % 4096);
    let avg = min + 1 + usize::from(input.u16());
    let max = avg + 1 + usize::from(input.u16()) * 4;
    Chunker::new(min, avg, max, u32::from(input.u8() % 4)).expect("sizes built to be valid")
}

fn expand(mode: u8, data: &[u8]) -> Vec<u8> {
    match mode % 3 {
        0 => data.to_vec(),
        1 => data
            .iter()
            .flat_map(|&b| std::iter::repeat_n(b, 1 + usize::from(b) * 97))
            .take(MAX_EXPANDED)
            .collect(),
        _ => data
            .iter()
            .copied()
            .cycle()
            .take(MAX_EXPANDED.min(data.len() * 40))
            .collect(),
    }
}

fn by_rule(chunker: &Chunker, data: &[u8]) -> Vec<u64> {
    let mut ends = Vec::new();
    let mut offset = 0;
    while offset < data.len() {
        offset += chunker.cut(&data[offset..]);
        ends.push(offset as u64);
    }
    ends
}

fn target(raw: &[u8]) {
    let mut input = Input(raw);
    let chunker = chunker(&mut input);
    let mode = input.u8();
    let steps: Vec<usize> = input
        .bytes(3)
        .iter()
        .map(|&b| 1 + usize::from(b) * 613)
        .collect();
    let data = expand(mode, input.0);
    let want = by_rule(&chunker, &data);

    let mut start = 0u64;
    for &end in &want {
        let len = end - start;
        assert!(len <= chunker.max_size() as u64, "a chunk of {len} bytes");
        assert!(
            len > chunker.min_size() as u64 || end == data.len() as u64,
            "a short chunk of {len} bytes before the end"
        );
        start = end;
    }
    assert_eq!(start, data.len() as u64, "the chunks cover the input");

    let whole: Vec<u64> = chunker.chunks(&data).map(|(o, l)| (o + l) as u64).collect();
    assert_eq!(whole, want, "Chunker::chunks");
    for kernel in Kernel::available() {
        let mut cutter = Cutter::with_kernel(chunker, kernel);
        let mut ends = Vec::new();
        cutter.scan(&data, 0, &mut ends);
        cutter.finish(data.len() as u64, &mut ends);
        assert_eq!(ends, want, "{kernel:?}");
    }
    let mut streamed = Vec::new();
    let reader = Uneven {
        data: &data,
        steps,
        turn: 0,
    };
    let total = chunk_reader::<_, io::Error, _>(reader, &chunker, |offset, bytes| {
        let at = offset as usize;
        assert_eq!(bytes, &data[at..at + bytes.len()], "streamed bytes at {at}");
        streamed.push(offset + bytes.len() as u64);
        Ok(())
    })
    .unwrap();
    assert_eq!(total, data.len() as u64);
    assert_eq!(streamed, want, "chunk_reader");
}

#[test]
fn fuzz_cdc() {
    fuzz_support::run("cdc", target);
}

fn seed(sizes: [u16; 3], norm: u8, mode: u8, steps: [u8; 3], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for size in sizes {
        out.extend_from_slice(&size.to_le_bytes());
    }
    out.push(norm);
    out.push(mode);
    out.extend_from_slice(&steps);
    out.extend_from_slice(data);
    out
}

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let random: Vec<u8> = (0..40_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    vec![
        ("empty", Vec::new()),
        (
            "smallest-sizes-random",
            seed([0, 0, 0], 3, 0, [0, 1, 2], &random),
        ),
        (
            "defaults-random",
            seed([1984, 14335, 12288], 1, 0, [255, 7, 90], &random),
        ),
        ("runs", seed([0, 200, 50], 0, 1, [3, 0, 0], &random[..4000])),
        (
            "repeated-window",
            seed([100, 300, 900], 2, 2, [0, 0, 0], &random[..31]),
        ),
        ("zeros", seed([0, 1000, 0], 1, 0, [1, 1, 1], &[0; 30_000])),
    ]
}

/// The committed seeds are exactly what [`seeds`] builds; with
/// `SUPERMACHINE_FUZZ_WRITE_SEEDS=1` they are (re)written instead.
#[test]
fn seed_corpus() {
    fuzz_support::check_seeds("cdc", &seeds());
}
