//! Zero-copy byte inputs from Python: a buffer-protocol object or a filesystem path.

use std::path::PathBuf;

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::source::{MappedFile, SourceError};

/// Bytes to work on: a held Python buffer, or a path to open on the Rust side.
pub(crate) enum Input {
    Buffer(PyUntypedBuffer),
    Path(PathBuf),
}

impl Input {
    /// Accepts `str`/`os.PathLike` as a path and anything exporting a C-contiguous buffer as bytes.
    pub(crate) fn extract(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok(path) = obj.extract::<PathBuf>() {
            return Ok(Input::Path(path));
        }
        let buf = PyUntypedBuffer::get(obj).map_err(|_| {
            PyTypeError::new_err(format!(
                "expected a path or a bytes-like object, got {}",
                obj.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_else(|_| "?".into())
            ))
        })?;
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err("buffer must be C-contiguous"));
        }
        Ok(Input::Buffer(buf))
    }

    /// The buffer's bytes. Only valid while `self` (which holds the buffer export) is alive.
    ///
    /// The caller must not let Python code mutate the exporting object while the slice is in use;
    /// supermachine's API documents that inputs are read concurrently and must not change.
    pub(crate) fn buffer_bytes(buf: &PyUntypedBuffer) -> &[u8] {
        let len = buf.len_bytes();
        if len == 0 {
            return &[];
        }
        // SAFETY: the PyUntypedBuffer keeps the export (and so the memory) alive and unmoved for
        // its own lifetime, to which the returned slice is tied; the buffer is C-contiguous
        // (checked in `extract`), so `len_bytes` bytes starting at `buf_ptr` are one allocation.
        unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, len) }
    }

    /// Runs `f` over the whole input: the buffer directly, or the file memory-mapped.
    pub(crate) fn with_bytes<T>(&self, f: impl FnOnce(&[u8]) -> T) -> Result<T, SourceError> {
        match self {
            Input::Buffer(buf) => Ok(f(Self::buffer_bytes(buf))),
            Input::Path(path) => {
                let map = MappedFile::open(path)?;
                Ok(f(&map))
            }
        }
    }
}

/// Converts a source error into the matching Python exception.
pub(crate) fn source_err(e: SourceError) -> PyErr {
    PyOSError::new_err(e.to_string())
}
