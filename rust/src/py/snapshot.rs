//! Snapshot identity for Python: the memory identity the VMM records in `vmstate.bin`, computed
//! again from `memory.bin`, so Python verifies a snapshot against the VMM's own record.

use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::snapshot::memory::{id_hex, snapshot_memory_id};

/// A descriptor of the caller's own: a duplicate, so the caller keeps (and closes) its own.
fn dup_fd(fd: RawFd) -> std::io::Result<File> {
    // SAFETY: F_DUPFD_CLOEXEC reads no memory; an invalid descriptor fails with EBADF.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a descriptor this call just created and nothing else owns.
    Ok(unsafe { File::from_raw_fd(new) })
}

/// The memory identity (hex) of the snapshot in `dir`, computed from `memory.bin` (or from the
/// open file `memory_fd`) with the page bitmap and base identity of its `vmstate.bin`: equal to
/// `snapshot_info(dir)["memory_id"]` exactly when the file holds the memory the VMM wrote.
/// Reads the whole file with the GIL released.
#[pyfunction]
#[pyo3(signature = (dir, memory_fd=None))]
fn hash_snapshot_memory(
    py: Python<'_>,
    dir: PathBuf,
    memory_fd: Option<RawFd>,
) -> PyResult<String> {
    let file = match memory_fd {
        None => None,
        Some(fd) => Some(dup_fd(fd).map_err(|e| {
            PyOSError::new_err(format!("memory_fd {fd}: {}", crate::vmm::os_msg(&e)))
        })?),
    };
    if let Some(f) = &file {
        let regular = f
            .metadata()
            .map(|m| m.file_type().is_file())
            .unwrap_or(false);
        if !regular {
            return Err(PyValueError::new_err(format!(
                "memory_fd {} is not a regular file",
                memory_fd.unwrap_or(-1)
            )));
        }
    }
    py.detach(|| snapshot_memory_id(&dir, file.as_ref()))
        .map(|id| id_hex(&id))
        .map_err(PyValueError::new_err)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(hash_snapshot_memory, m)?)?;
    Ok(())
}
