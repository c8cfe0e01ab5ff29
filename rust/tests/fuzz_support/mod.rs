//! A small mutation fuzzer that runs on stable Rust under `cargo test`.
//!
//! Each fuzz target is an integration test that calls [`run`] with a name and a closure taking the
//! raw input bytes. The driver first replays every file of the target's corpus
//! (`rust/fuzz/corpus/<name>/`, kept in the repository: hostile inputs found once stay tested
//! forever), then mutates corpus entries at random until the time budget is spent. A panic in the
//! target fails the test and writes the input to `target/fuzz-failures/<name>-<seed>.bin` so it can
//! be added to the corpus.
//!
//! Environment:
//! - `SUPERMACHINE_FUZZ_SECONDS`: time budget per target after the corpus replay (default 1).
//! - `SUPERMACHINE_FUZZ_SEED`: the PRNG seed (default: from the clock; printed either way, so a
//!   failure can be reproduced).
//!
//! The harnesses are the coverage-agnostic half: they find panics, overflows and hangs on the
//! hostile paths in seconds, on any toolchain. Coverage-guided fuzzing (cargo fuzz) can reuse the
//! same target functions and corpora.

#![allow(dead_code)]

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Inputs longer than this are cut: the targets' own limits are tested by the corpus, and big
/// inputs only slow the loop.
const MAX_INPUT: usize = 64 * 1024;

/// xorshift64*: deterministic for a seed, good enough to pick mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Values that sit on the edges parsers get wrong.
const INTERESTING: [u64; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x1000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    i64::MAX as u64,
    u64::MAX,
];

/// One random change to `data`, in place.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    match rng.below(8) {
        0 if !data.is_empty() => {
            let i = rng.below(data.len());
            data[i] ^= 1 << rng.below(8);
        }
        1 if !data.is_empty() => {
            let i = rng.below(data.len());
            data[i] = rng.next_u64() as u8;
        }
        2 if !data.is_empty() => {
            let i = rng.below(data.len());
            let n = 1 + rng.below((data.len() - i).min(16));
            data.drain(i..i + n);
        }
        3 => {
            let i = rng.below(data.len() + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            data.splice(i..i, bytes);
        }
        4 if data.len() >= 8 => {
            // An interesting little-endian integer of 1, 2, 4 or 8 bytes.
            let width = [1usize, 2, 4, 8][rng.below(4)];
            let i = rng.below(data.len() - width + 1);
            let value = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
            data[i..i + width].copy_from_slice(&value[..width]);
        }
        5 if !data.is_empty() => {
            let keep = rng.below(data.len());
            data.truncate(keep);
        }
        6 if !corpus.is_empty() => {
            // Splice the tail of another corpus entry in.
            let other = &corpus[rng.below(corpus.len())];
            if !other.is_empty() {
                let from = rng.below(other.len());
                let at = rng.below(data.len() + 1);
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
        }
        _ => {
            // Duplicate a block (repeated records, repeated sections).
            if !data.is_empty() {
                let i = rng.below(data.len());
                let n = 1 + rng.below((data.len() - i).min(64));
                let block = data[i..i + n].to_vec();
                let at = rng.below(data.len() + 1);
                data.splice(at..at, block);
            }
        }
    }
    data.truncate(MAX_INPUT);
}

fn corpus_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
        .join(name)
}

fn load_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut entries: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(read) => read
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    entries.sort();
    entries
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display())))
        .collect()
}

fn seconds_budget() -> Duration {
    let secs = std::env::var("SUPERMACHINE_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(1.0);
    Duration::from_secs_f64(secs)
}

fn seed() -> u64 {
    std::env::var("SUPERMACHINE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

fn record_failure(name: &str, seed: u64, input: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{name}-{seed}.bin"));
    let _ = std::fs::write(&path, input);
    path
}

/// Runs `target` over the corpus of `name`, then over mutations of it for the time budget.
/// Panics (failing the test) with the seed and the path of the saved input if `target` panics.
pub fn run(name: &str, mut target: impl FnMut(&[u8])) {
    let corpus = load_corpus(&corpus_dir(name));
    assert!(
        !corpus.is_empty(),
        "fuzz target {name} has no corpus in {}",
        corpus_dir(name).display()
    );
    let seed = seed();
    eprintln!(
        "fuzz {name}: {} corpus entries, seed {seed} (SUPERMACHINE_FUZZ_SEED to repeat)",
        corpus.len()
    );
    let check = |input: &[u8], target: &mut dyn FnMut(&[u8])| {
        if panic::catch_unwind(AssertUnwindSafe(|| target(input))).is_err() {
            let saved = record_failure(name, seed, input);
            panic!(
                "fuzz target {name} panicked on an input of {} bytes (seed {seed}), saved to {}",
                input.len(),
                saved.display()
            );
        }
    };
    for input in &corpus {
        check(input, &mut target);
    }
    let mut rng = Rng::new(seed);
    let deadline = Instant::now() + seconds_budget();
    let mut runs = 0u64;
    while Instant::now() < deadline {
        let mut input = corpus[rng.below(corpus.len())].clone();
        for _ in 0..1 + rng.below(8) {
            mutate(&mut rng, &mut input, &corpus);
        }
        check(&input, &mut target);
        runs += 1;
    }
    eprintln!("fuzz {name}: {runs} mutated inputs, no failure");
}

/// The committed seed corpus of target `name` (`rust/fuzz/corpus/<name>/seed-*.bin`) is exactly
/// `seeds`; with `SUPERMACHINE_FUZZ_WRITE_SEEDS=1` the files are (re)written instead.
#[allow(dead_code)] // not every harness has built seeds
pub fn check_seeds(name: &str, seeds: &[(&str, Vec<u8>)]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
        .join(name);
    let write = std::env::var_os("SUPERMACHINE_FUZZ_WRITE_SEEDS").is_some();
    for (seed, bytes) in seeds {
        let path = dir.join(format!("seed-{seed}.bin"));
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, bytes).unwrap();
        } else {
            let stored = std::fs::read(&path).unwrap_or_default();
            assert!(
                &stored == bytes,
                "{} is out of date: regenerate the seeds",
                path.display()
            );
        }
    }
}

/// Reads a fuzz input front to back; past its end every read is zero (so every input, however
/// short, is a complete run).
pub struct Input<'a>(pub &'a [u8]);

#[allow(dead_code)] // each harness reads what it needs
impl Input<'_> {
    pub fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn addr(&mut self) -> [u8; 4] {
        [self.u8(), self.u8(), self.u8(), self.u8()]
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }
    /// An entry of `table`, by the next byte.
    pub fn pick<T: Copy>(&mut self, table: &[T]) -> T {
        table[usize::from(self.u8()) % table.len()]
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
