//! Bindings for content-defined chunking.

use std::fs::File;
use std::io;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use rayon::prelude::*;

use super::input::{source_err, Input};
use super::with_threads;
use crate::cdc::cutter::Cutter;
use crate::cdc::simd::Kernel;
use crate::cdc::{self, stream::chunk_reader_with, Chunker};

fn chunker(
    min_size: usize,
    avg_size: usize,
    max_size: usize,
    normalization: u32,
) -> PyResult<Chunker> {
    Chunker::new(min_size, avg_size, max_size, normalization)
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The scan kernel named `name` (the fastest the CPU has when `None`).
fn kernel(name: Option<&str>) -> PyResult<Kernel> {
    name.map_or(Ok(Kernel::detect()), |name| {
        Kernel::from_name(name).map_err(|e| PyValueError::new_err(e.to_string()))
    })
}

/// Chunk lengths of one input. A path is streamed (bounded memory for any file size); a buffer
/// is chunked in place.
fn lengths(input: &Input, chunker: &Chunker, kernel: Kernel) -> PyResult<Vec<u32>> {
    match input {
        Input::Buffer(buf) => Ok(chunker
            .chunks_with(Input::buffer_bytes(buf), kernel)
            .map(|(_, len)| len as u32)
            .collect()),
        Input::Path(path) => {
            let file = File::open(path)
                .map_err(|e| PyOSError::new_err(format!("cannot open {}: {e}", path.display())))?;
            let mut out = Vec::new();
            chunk_reader_with::<_, io::Error, _>(
                file,
                Cutter::with_kernel(*chunker, kernel),
                |_, chunk| {
                    out.push(chunk.len() as u32);
                    Ok(())
                },
            )
            .map_err(|e| PyOSError::new_err(format!("cannot read {}: {e}", path.display())))?;
            Ok(out)
        }
    }
}

/// Chunk lengths of `data` (a bytes-like object or a path), in order. `kernel` names the scan
/// (`avx512`, `avx2`, `portable`; by default the fastest the CPU has): the cuts are the same
/// whichever runs, so it only matters to the benchmarks and the tests.
#[pyfunction]
#[pyo3(signature = (data, *, min_size=cdc::DEFAULT_MIN, avg_size=cdc::DEFAULT_AVG, max_size=cdc::DEFAULT_MAX, normalization=cdc::DEFAULT_NORMALIZATION, kernel=None))]
fn cdc_lengths(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    min_size: usize,
    avg_size: usize,
    max_size: usize,
    normalization: u32,
    kernel: Option<&str>,
) -> PyResult<Vec<u32>> {
    let chunker = chunker(min_size, avg_size, max_size, normalization)?;
    let kernel = self::kernel(kernel)?;
    let input = Input::extract(data)?;
    py.detach(|| lengths(&input, &chunker, kernel))
}

/// Chunk lengths of many inputs, chunked in parallel across `threads` workers.
#[pyfunction]
#[pyo3(signature = (inputs, *, min_size=cdc::DEFAULT_MIN, avg_size=cdc::DEFAULT_AVG, max_size=cdc::DEFAULT_MAX, normalization=cdc::DEFAULT_NORMALIZATION, threads=None))]
fn cdc_lengths_many(
    py: Python<'_>,
    inputs: Vec<Bound<'_, PyAny>>,
    min_size: usize,
    avg_size: usize,
    max_size: usize,
    normalization: u32,
    threads: Option<usize>,
) -> PyResult<Vec<Vec<u32>>> {
    let chunker = chunker(min_size, avg_size, max_size, normalization)?;
    let inputs = inputs
        .iter()
        .map(Input::extract)
        .collect::<PyResult<Vec<_>>>()?;
    py.detach(|| {
        with_threads(threads, || {
            let kernel = Kernel::detect();
            inputs
                .par_iter()
                .map(|i| lengths(i, &chunker, kernel))
                .collect()
        })
    })?
}

/// Chunks of `data` with their 128-bit XXH3 digests: `[(offset, length, digest_bytes)]`.
#[pyfunction]
#[pyo3(signature = (data, *, min_size=cdc::DEFAULT_MIN, avg_size=cdc::DEFAULT_AVG, max_size=cdc::DEFAULT_MAX, normalization=cdc::DEFAULT_NORMALIZATION))]
fn cdc_chunks(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    min_size: usize,
    avg_size: usize,
    max_size: usize,
    normalization: u32,
) -> PyResult<Vec<(u64, u32, [u8; 16])>> {
    let chunker = chunker(min_size, avg_size, max_size, normalization)?;
    let input = Input::extract(data)?;
    py.detach(|| {
        input
            .with_bytes(|bytes| {
                chunker
                    .chunks(bytes)
                    .map(|(off, len)| {
                        let digest =
                            xxhash_rust::xxh3::xxh3_128(&bytes[off..off + len]).to_be_bytes();
                        (off as u64, len as u32, digest)
                    })
                    .collect()
            })
            .map_err(source_err)
    })
}

/// The (strict, loose) masks a chunker with these sizes uses.
#[pyfunction]
#[pyo3(signature = (*, min_size=cdc::DEFAULT_MIN, avg_size=cdc::DEFAULT_AVG, max_size=cdc::DEFAULT_MAX, normalization=cdc::DEFAULT_NORMALIZATION))]
fn cdc_masks(
    min_size: usize,
    avg_size: usize,
    max_size: usize,
    normalization: u32,
) -> PyResult<(u32, u32)> {
    Ok(chunker(min_size, avg_size, max_size, normalization)?.masks())
}

/// The scan kernels this CPU can run, fastest first.
#[pyfunction]
fn cdc_kernels() -> Vec<&'static str> {
    Kernel::available().into_iter().map(Kernel::name).collect()
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("CDC_WINDOW", cdc::window::WINDOW)?;
    m.add("CDC_MULTIPLIER", cdc::window::MULTIPLIER)?;
    m.add("CDC_BYTE_KEY", cdc::window::BYTE_KEY)?;
    m.add_function(wrap_pyfunction!(cdc_lengths, m)?)?;
    m.add_function(wrap_pyfunction!(cdc_lengths_many, m)?)?;
    m.add_function(wrap_pyfunction!(cdc_chunks, m)?)?;
    m.add_function(wrap_pyfunction!(cdc_masks, m)?)?;
    m.add_function(wrap_pyfunction!(cdc_kernels, m)?)?;
    Ok(())
}
