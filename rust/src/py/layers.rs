//! Bindings for the layer dedup index.

use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::with_threads;
use crate::cdc::{self, Chunker};
use crate::layers::{DedupConfig, DedupIndex, LayerError, SchemeStats};

/// Chunk index over OCI layer blobs, for both content-defined and fixed-size chunking.
#[pyclass(name = "LayerDedup", module = "supermachine._core", frozen)]
pub(crate) struct PyLayerDedup {
    index: DedupIndex,
}

fn stats_dict<'py>(py: Python<'py>, s: SchemeStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("chunks", s.chunks)?;
    d.set_item("bytes", s.bytes)?;
    d.set_item("unique_chunks", s.unique_chunks)?;
    d.set_item("unique_bytes", s.unique_bytes)?;
    d.set_item("unique_zstd_bytes", s.unique_zstd_bytes)?;
    Ok(d)
}

#[pymethods]
impl PyLayerDedup {
    #[new]
    #[pyo3(signature = (*, min_size=cdc::DEFAULT_MIN, avg_size=cdc::DEFAULT_AVG, max_size=cdc::DEFAULT_MAX, normalization=cdc::DEFAULT_NORMALIZATION, fixed_size=512 * 1024, zstd_level=3))]
    fn new(
        min_size: usize,
        avg_size: usize,
        max_size: usize,
        normalization: u32,
        fixed_size: usize,
        zstd_level: i32,
    ) -> PyResult<Self> {
        let chunker = Chunker::new(min_size, avg_size, max_size, normalization)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        if fixed_size == 0 {
            return Err(PyValueError::new_err("fixed_size must be positive"));
        }
        if !(1..=22).contains(&zstd_level) {
            return Err(PyValueError::new_err(format!(
                "zstd_level must be 1 to 22, got {zstd_level}"
            )));
        }
        Ok(Self {
            index: DedupIndex::new(DedupConfig {
                chunker,
                fixed_size,
                zstd_level,
            }),
        })
    }

    /// Adds layer blobs in parallel. Returns one dict per path, in order: either the layer's
    /// sizes (`format`, `compressed_bytes`, `uncompressed_bytes`, `cdc_chunks`, `fixed_chunks`)
    /// or `error` (a one-line message naming the file) for a blob that was skipped.
    /// `progress(n)` is called with increments of compressed bytes read.
    #[pyo3(signature = (paths, progress=None, threads=None))]
    fn add_layers<'py>(
        &self,
        py: Python<'py>,
        paths: Vec<PathBuf>,
        progress: Option<Py<PyAny>>,
        threads: Option<usize>,
    ) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let report = |n: u64| {
            if let Some(cb) = &progress {
                // Progress is cosmetic: a failing callback must not abort the scan.
                Python::attach(|py| {
                    if let Err(e) = cb.call1(py, (n,)) {
                        e.write_unraisable(py, None);
                    }
                });
            }
        };
        let results =
            py.detach(|| with_threads(threads, || self.index.add_layers(&paths, &report)))?;
        results
            .into_iter()
            .zip(&paths)
            .map(|(result, path)| {
                let d = PyDict::new(py);
                d.set_item("path", path)?;
                match result {
                    Ok(r) => {
                        d.set_item("format", r.format.name())?;
                        d.set_item("compressed_bytes", r.compressed_bytes)?;
                        d.set_item("uncompressed_bytes", r.uncompressed_bytes)?;
                        d.set_item("cdc_chunks", r.cdc_chunks)?;
                        d.set_item("fixed_chunks", r.fixed_chunks)?;
                    }
                    Err(e) => {
                        d.set_item("not_a_layer", matches!(e, LayerError::NotALayer { .. }))?;
                        d.set_item("error", e.to_string())?;
                    }
                }
                Ok(d)
            })
            .collect()
    }

    /// Totals of content-defined chunking over the layers added so far.
    fn cdc_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, self.index.cdc_stats())
    }

    /// Totals of fixed-size chunking over the layers added so far.
    fn fixed_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, self.index.fixed_stats())
    }

    #[getter]
    fn fixed_size(&self) -> usize {
        self.index.config().fixed_size
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyLayerDedup>()
}
