//! The `fastcdc` crate's v2020 chunker, exposed to Python so the benchmarks can time it on the
//! very same buffers as supermachine's chunker, in the same process and run.

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Chunks a contiguous buffer with `fastcdc::v2020::FastCDC` and returns the chunk lengths.
#[pyfunction]
#[pyo3(signature = (data, min_size=2048, avg_size=16384, max_size=65536))]
fn fastcdc_v2020_lengths(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    min_size: usize,
    avg_size: usize,
    max_size: usize,
) -> PyResult<Vec<u32>> {
    let buf = PyUntypedBuffer::get(data)?;
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err("buffer must be C-contiguous"));
    }
    let (ptr, len) = (buf.buf_ptr() as usize, buf.len_bytes());
    py.detach(|| {
        // SAFETY: `buf` keeps the exporter's memory alive and unmoved until it is dropped after
        // this closure; the benchmark never mutates the buffer while it is being chunked.
        let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        let chunker = fastcdc::v2020::FastCDC::new(bytes, min_size, avg_size, max_size);
        Ok(chunker.map(|c| c.length as u32).collect())
    })
}

#[pymodule]
fn supermachine_bench_peers(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fastcdc_v2020_lengths, m)?)
}
