//! `supermachine._core`: the thin binding layer between the Rust core and Python.
//!
//! Conventions: long work runs with the GIL released (`Python::detach`); inputs are taken
//! zero-copy from any C-contiguous buffer (bytes, bytearray, memoryview, mmap, NumPy arrays) or
//! read from a path; errors become `ValueError`/`OSError` with one-line messages.

mod cdc;
mod host;
mod input;
mod layers;
mod pages;
mod snapshot;
mod vm;

use pyo3::prelude::*;

/// Runs `f` on a rayon pool of `threads` workers, or on the global pool when `None`.
pub(crate) fn with_threads<T: Send>(
    threads: Option<usize>,
    f: impl FnOnce() -> T + Send,
) -> PyResult<T> {
    match threads {
        None => Ok(f()),
        Some(0) => Err(pyo3::exceptions::PyValueError::new_err(
            "threads must be at least 1",
        )),
        Some(n) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| {
                    pyo3::exceptions::PyRuntimeError::new_err(format!(
                        "cannot start {n} threads: {e}"
                    ))
                })?;
            Ok(pool.install(f))
        }
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PAGE_SIZE", crate::pages::PAGE_SIZE)?;
    // The VMM's defaults and limits, so Python's VmConfig states them once (owner: vmm::config).
    m.add("DEFAULT_MEMORY_MIB", crate::vmm::DEFAULT_MEMORY_MIB)?;
    m.add("MAX_MEMORY_MIB", crate::vmm::MAX_MEMORY_MIB)?;
    m.add("DEFAULT_VCPUS", crate::vmm::DEFAULT_VCPUS)?;
    m.add("MAX_VCPUS", crate::vmm::MAX_VCPUS)?;
    m.add(
        "MAX_VIRTIO_DEVICES",
        crate::vmm::builder::VIRTIO_MAX_DEVICES,
    )?;
    m.add(
        "WORKER_PROTOCOL_VERSION",
        crate::worker::protocol::PROTOCOL_VERSION,
    )?;
    let builtin: Vec<(&str, String)> = crate::net::BUILTIN_DENY
        .iter()
        .map(|(name, cidr)| (*name, cidr.to_string()))
        .collect();
    m.add("NET_BUILTIN_DENY", builtin)?;
    m.add(
        "COMPAT_GLIBC_TUNABLES",
        crate::vmm::cpuid::COMPAT_GLIBC_TUNABLES,
    )?;
    cdc::register(m)?;
    pages::register(m)?;
    layers::register(m)?;
    vm::register(m)?;
    snapshot::register(m)?;
    host::register(m)?;
    Ok(())
}
