//! Bindings for page hashing.

use pyo3::exceptions::{PyIndexError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::input::{source_err, Input};
use super::with_threads;
use crate::pages::{self, PageHash};

/// Per-page digests and zero flags of one input.
#[pyclass(name = "PageDigests", module = "supermachine._core", frozen)]
pub(crate) struct PyPageDigests {
    inner: pages::PageDigests,
}

#[pymethods]
impl PyPageDigests {
    /// Name of the digest algorithm: "xxh3" or "blake3".
    #[getter]
    fn algo(&self) -> &'static str {
        self.inner.algo().name()
    }

    #[getter]
    fn digest_size(&self) -> usize {
        self.inner.algo().digest_size()
    }

    #[getter]
    fn page_count(&self) -> usize {
        self.inner.page_count()
    }

    #[getter]
    fn zero_pages(&self) -> usize {
        self.inner.zero_pages()
    }

    #[getter]
    fn byte_len(&self) -> u64 {
        self.inner.byte_len()
    }

    fn __len__(&self) -> usize {
        self.inner.page_count()
    }

    /// Digest of page `index` as bytes.
    fn digest<'py>(&self, py: Python<'py>, index: usize) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self
            .inner
            .digest_bytes(index)
            .ok_or_else(|| PyIndexError::new_err(format!("page {index} out of range")))?;
        Ok(PyBytes::new(py, &bytes))
    }

    fn is_zero_page(&self, index: usize) -> bool {
        self.inner.is_zero_page(index)
    }

    /// Same-offset comparison with `golden`: `(pages, same, differ)`.
    fn compare(&self, py: Python<'_>, golden: &PyPageDigests) -> PyResult<(usize, usize, usize)> {
        let cmp = py
            .detach(|| self.inner.compare(&golden.inner))
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        Ok((cmp.pages, cmp.same, cmp.differ))
    }

    fn __repr__(&self) -> String {
        format!(
            "PageDigests(algo={:?}, pages={}, zero_pages={})",
            self.inner.algo().name(),
            self.inner.page_count(),
            self.inner.zero_pages()
        )
    }
}

/// Hashes every 4 KiB page of `data` (a bytes-like object or a path, which is memory-mapped).
#[pyfunction]
#[pyo3(signature = (data, *, algo="xxh3", threads=None))]
fn page_digests(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    algo: &str,
    threads: Option<usize>,
) -> PyResult<PyPageDigests> {
    let algo: PageHash = algo.parse().map_err(PyValueError::new_err)?;
    let input = Input::extract(data)?;
    let inner = py.detach(|| {
        with_threads(threads, || {
            input.with_bytes(|b| pages::PageDigests::compute(b, algo))
        })
    })?;
    Ok(PyPageDigests {
        inner: inner.map_err(source_err)?,
    })
}

/// `(pages, unique)` over all inputs: how many pages, and how many distinct ones.
#[pyfunction]
fn unique_pages(py: Python<'_>, inputs: Vec<PyRef<'_, PyPageDigests>>) -> PyResult<(usize, usize)> {
    let refs: Vec<&pages::PageDigests> = inputs.iter().map(|p| &p.inner).collect();
    let count = py
        .detach(|| pages::unique_pages(&refs))
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok((count.pages, count.unique))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPageDigests>()?;
    m.add_function(wrap_pyfunction!(page_digests, m)?)?;
    m.add_function(wrap_pyfunction!(unique_pages, m)?)?;
    Ok(())
}
