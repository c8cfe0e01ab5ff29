//! Bindings for the host probe behind `supermachine doctor`.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::worker::host;

/// Every protection a VM worker can use on this host: name -> {"available": bool,
/// "detail": str}, in a stable order.
#[pyfunction]
fn host_protections(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let probed = py.detach(host::probe);
    let out = PyDict::new(py);
    for (name, p) in probed.entries() {
        let entry = PyDict::new(py);
        entry.set_item("available", p.available)?;
        entry.set_item("detail", &p.detail)?;
        out.set_item(name, entry)?;
    }
    Ok(out)
}

/// The jail workers get on this host: "full" (root), "unprivileged" (user namespaces) or
/// "minimal" (seccomp and no_new_privs); Landlock, where the kernel has it, goes with each.
#[pyfunction]
fn host_jail_level(py: Python<'_>) -> &'static str {
    py.detach(|| host::probe().jail_level().name())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(host_protections, m)?)?;
    m.add_function(wrap_pyfunction!(host_jail_level, m)?)?;
    Ok(())
}
