//! Binding for the VMM: `supermachine._core.Vm`.

use std::path::PathBuf;
use std::time::Duration;

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use super::input::Input;
use crate::snapshot::memory::id_hex;
use crate::snapshot::Snapshot;
use crate::vmm::builder::ErrorClass;
use crate::vmm::persist::RestoreOverrides;
use crate::vmm::{
    BootSource, CpuTemplate, CpuTemplateChoice, DiskConfig, MemoryBacking, Outcome, RawMode,
    VmConfig, Vmm, VmmError,
};

fn vmm_err(e: VmmError) -> PyErr {
    let msg = e.to_string();
    match e.class() {
        ErrorClass::NotFound => PyFileNotFoundError::new_err(msg),
        ErrorClass::Os => PyOSError::new_err(msg),
        ErrorClass::Value => PyValueError::new_err(msg),
        ErrorClass::Runtime => PyRuntimeError::new_err(msg),
    }
}

const KEYS: &[&str] = &[
    "kernel",
    "initramfs",
    "cmdline",
    "raw",
    "raw_load_addr",
    "raw_mode",
    "memory_mib",
    "memory_file",
    "vcpus",
    "disks",
    "vsock_path",
    "console_log",
    "console_capacity",
    "cpu_template",
    "track_dirty_pages",
];

fn get<'py, T: FromPyObjectOwned<'py>>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<Option<T>> {
    match d.get_item(key)? {
        None => Ok(None),
        Some(v) if v.is_none() => Ok(None),
        Some(v) => v.extract::<T>().map(Some).map_err(|_| {
            PyTypeError::new_err(format!(
                "config key '{key}' has the wrong type ({})",
                v.get_type()
                    .name()
                    .map(|n| n.to_string())
                    .unwrap_or_else(|_| "?".into())
            ))
        }),
    }
}

/// The "disks" entry of a config or restore overrides: paths (read-write, or for a restore as
/// saved) or dicts {path, read_only}.
fn parse_disks(d: &Bound<'_, PyDict>, what: &str) -> PyResult<Vec<DiskConfig>> {
    let mut out = Vec::new();
    if let Some(disks) = d.get_item("disks")?.filter(|v| !v.is_none()) {
        let list = disks
            .cast::<PyList>()
            .map_err(|_| PyTypeError::new_err(format!("{what} key 'disks' must be a list")))?;
        for item in list.iter() {
            if let Ok(path) = item.extract::<PathBuf>() {
                out.push(DiskConfig {
                    path,
                    read_only: false,
                    rate_limit: None,
                });
                continue;
            }
            let disk = item.cast::<PyDict>().map_err(|_| {
                PyTypeError::new_err("each disk must be a path or a dict {path, read_only}")
            })?;
            for k in disk.keys() {
                let k: String = k.extract()?;
                if k != "path" && k != "read_only" {
                    return Err(PyValueError::new_err(format!("unknown disk key '{k}'")));
                }
            }
            let path: PathBuf =
                get(disk, "path")?.ok_or_else(|| PyValueError::new_err("a disk needs a 'path'"))?;
            out.push(DiskConfig {
                path,
                read_only: get(disk, "read_only")?.unwrap_or(false),
                rate_limit: None,
            });
        }
    }
    Ok(out)
}

fn parse_config(d: &Bound<'_, PyDict>) -> PyResult<VmConfig> {
    for k in d.keys() {
        let k: String = k
            .extract()
            .map_err(|_| PyTypeError::new_err("config keys must be strings"))?;
        if !KEYS.contains(&k.as_str()) {
            return Err(PyValueError::new_err(format!(
                "unknown config key '{k}' (known: {})",
                KEYS.join(", ")
            )));
        }
    }
    let kernel: Option<PathBuf> = get(d, "kernel")?;
    let raw: Option<PathBuf> = get(d, "raw")?;
    let boot = match (kernel, raw) {
        (Some(_), Some(_)) => {
            return Err(PyValueError::new_err(
                "config has both 'kernel' and 'raw'; give one",
            ))
        }
        (None, None) => {
            return Err(PyValueError::new_err(
                "config needs 'kernel' (a vmlinux) or 'raw' (a flat binary)",
            ))
        }
        (Some(path), None) => BootSource::Kernel {
            path,
            initramfs: get(d, "initramfs")?,
            cmdline: get(d, "cmdline")?.unwrap_or_default(),
        },
        (None, Some(path)) => {
            let mode = match get::<String>(d, "raw_mode")?.as_deref() {
                None | Some("long") => RawMode::Long,
                Some("real") => RawMode::Real,
                Some(other) => {
                    return Err(PyValueError::new_err(format!(
                        "raw_mode must be 'long' or 'real', got '{other}'"
                    )))
                }
            };
            let default_addr = if mode == RawMode::Real {
                0x7c00
            } else {
                0x10_0000
            };
            BootSource::Raw {
                path,
                load_addr: get(d, "raw_load_addr")?.unwrap_or(default_addr),
                mode,
            }
        }
    };
    let mut cfg = VmConfig::new(boot);
    if let Some(m) = get(d, "memory_mib")? {
        cfg.memory_mib = m;
    }
    if let Some(path) = get::<PathBuf>(d, "memory_file")? {
        cfg.memory_backing = MemoryBacking::File(path);
    }
    if let Some(v) = get(d, "vcpus")? {
        cfg.vcpus = v;
    }
    cfg.disks = parse_disks(d, "config")?;
    cfg.vsock_path = get(d, "vsock_path")?;
    cfg.console_log = get(d, "console_log")?;
    cfg.track_dirty_pages = get(d, "track_dirty_pages")?.unwrap_or(false);
    if let Some(c) = get(d, "console_capacity")? {
        cfg.console_capacity = c;
    }
    cfg.cpu_template = match get::<String>(d, "cpu_template")?.as_deref() {
        None | Some("auto") => CpuTemplateChoice::Auto,
        Some("normal") => CpuTemplateChoice::Fixed(CpuTemplate::Normal),
        Some("compat") => CpuTemplateChoice::Fixed(CpuTemplate::Compat),
        Some(other) => {
            return Err(PyValueError::new_err(format!(
                "cpu_template must be 'auto', 'normal' or 'compat', got '{other}'"
            )))
        }
    };
    Ok(cfg)
}

fn outcome_dict<'py>(py: Python<'py>, o: &Outcome) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("kind", o.kind())?;
    if let Outcome::PowerOff { code } = o {
        d.set_item("code", code)?;
    }
    d.set_item("reason", o.reason())?;
    Ok(d)
}

/// A running microVM. Create with `Vm.start(config)`.
#[pyclass(name = "Vm", module = "supermachine._core", frozen)]
pub(crate) struct PyVm {
    inner: Vmm,
}

#[pymethods]
impl PyVm {
    /// Builds and starts a VM from a config dict (see the type stubs for the keys).
    #[staticmethod]
    fn start(py: Python<'_>, config: &Bound<'_, PyDict>) -> PyResult<Self> {
        let cfg = parse_config(config)?;
        let inner = py.detach(|| Vmm::start(&cfg)).map_err(vmm_err)?;
        Ok(PyVm { inner })
    }

    /// Restores a VM from a snapshot directory written by `Vm.snapshot` and starts it.
    /// `overrides` may set "vsock_path" (required when the snapshot has a vsock device),
    /// "console_log", "disks" (the disks to attach, one per saved disk, in order: required when
    /// the snapshot has disks, as the state file names none; a path or {path, read_only}, and a
    /// disk is read-only if either the caller or the snapshot says so), "track_dirty_pages" and "base"
    /// (where a diff's base snapshot is, if not the sibling directory it recorded).
    #[staticmethod]
    #[pyo3(signature = (dir, overrides=None))]
    fn restore(
        py: Python<'_>,
        dir: PathBuf,
        overrides: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let mut ov = RestoreOverrides::default();
        if let Some(d) = overrides {
            for k in d.keys() {
                let k: String = k
                    .extract()
                    .map_err(|_| PyTypeError::new_err("override keys must be strings"))?;
                const KNOWN: [&str; 5] = [
                    "vsock_path",
                    "console_log",
                    "disks",
                    "track_dirty_pages",
                    "base",
                ];
                if !KNOWN.contains(&k.as_str()) {
                    return Err(PyValueError::new_err(format!(
                        "unknown restore override '{k}' (known: {})",
                        KNOWN.join(", ")
                    )));
                }
            }
            ov.vsock_path = get(d, "vsock_path")?;
            ov.console_log = get(d, "console_log")?;
            ov.disks = parse_disks(d, "override")?;
            ov.track_dirty_pages = get(d, "track_dirty_pages")?.unwrap_or(false);
            ov.base = get(d, "base")?;
        }
        let inner = py.detach(|| Vmm::restore(&dir, &ov)).map_err(vmm_err)?;
        Ok(PyVm { inner })
    }

    /// Pauses the VM and writes a snapshot to `dir` (memory.bin + vmstate.bin, atomically).
    /// With `base` (a snapshot directory) only the pages that differ from the base are stored.
    /// The VM stays paused: call `resume()` or `stop()`. Returns {"memory_bytes",
    /// "state_bytes", "memory_id", "diff_pages", "compared_pages", "phases": {name: seconds}}.
    #[pyo3(signature = (dir, base=None))]
    fn snapshot<'py>(
        &self,
        py: Python<'py>,
        dir: PathBuf,
        base: Option<PathBuf>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let report = py
            .detach(|| self.inner.snapshot(&dir, base.as_deref()))
            .map_err(|e| vmm_err(VmmError::Snapshot(e)))?;
        let d = PyDict::new(py);
        d.set_item("memory_bytes", report.memory_bytes)?;
        d.set_item("state_bytes", report.state_bytes)?;
        d.set_item("memory_id", id_hex(&report.memory_id))?;
        d.set_item("diff_pages", report.diff_pages)?;
        d.set_item("compared_pages", report.compared_pages)?;
        let phases = PyDict::new(py);
        for (name, secs) in &report.phases {
            phases.set_item(*name, *secs)?;
        }
        d.set_item("phases", phases)?;
        Ok(d)
    }

    /// Pages the guest wrote since the start or the previous call: one bit per 4 KiB page, least
    /// significant bit first, in guest RAM order (RAM above the MMIO hole follows the part
    /// below). VMM writes (devices, write_memory) are not logged. Needs track_dirty_pages.
    fn dirty_pages<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bits = py
            .detach(|| self.inner.dirty_pages())
            .map_err(PyRuntimeError::new_err)?;
        Ok(PyBytes::new(py, &bits))
    }

    /// Pauses every vCPU (returns once none runs guest code).
    fn pause(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.pause())
            .map_err(PyRuntimeError::new_err)
    }

    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.resume())
            .map_err(PyRuntimeError::new_err)
    }

    /// Stops the VM and joins its threads; idempotent.
    fn stop(&self, py: Python<'_>) {
        py.detach(|| self.inner.stop());
    }

    /// Waits up to `timeout` seconds (forever with None) for the VM to end; returns the
    /// outcome, or None on timeout.
    #[pyo3(signature = (timeout=None))]
    fn wait<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let timeout = match timeout {
            None => None,
            Some(t) if t.is_finite() && t >= 0.0 => Some(Duration::from_secs_f64(t.min(1e9))),
            Some(t) => {
                return Err(PyValueError::new_err(format!(
                    "timeout must be a non-negative number of seconds, got {t}"
                )))
            }
        };
        // Wait in slices so Ctrl-C reaches Python.
        let slice = Duration::from_millis(200);
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            let step = match deadline {
                None => slice,
                Some(d) => d
                    .saturating_duration_since(std::time::Instant::now())
                    .min(slice),
            };
            if let Some(o) = py.detach(|| self.inner.wait(Some(step))) {
                return outcome_dict(py, &o).map(Some);
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(None);
            }
            py.check_signals()?;
        }
    }

    /// None while running; else {"kind": "poweroff"|"reset"|"panic"|"crash"|"stopped",
    /// "reason": str, "code": int (poweroff only)}.
    #[getter]
    fn outcome<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        self.inner
            .outcome()
            .map(|o| outcome_dict(py, &o))
            .transpose()
    }

    /// Captured serial console output.
    fn console<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.console())
    }

    fn read_memory<'py>(
        &self,
        py: Python<'py>,
        gpa: u64,
        length: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let data = py
            .detach(|| self.inner.read_memory(gpa, length))
            .map_err(PyValueError::new_err)?;
        Ok(PyBytes::new(py, &data))
    }

    fn write_memory(&self, py: Python<'_>, gpa: u64, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let input = Input::extract(data)?;
        let Input::Buffer(buf) = &input else {
            return Err(PyTypeError::new_err("data must be a bytes-like object"));
        };
        let bytes = Input::buffer_bytes(buf);
        self.inner
            .write_memory(gpa, bytes)
            .map_err(PyValueError::new_err)?;
        let _ = py;
        Ok(())
    }

    /// Bytes of serial output the console ring keeps.
    #[getter]
    fn console_capacity(&self) -> usize {
        self.inner.console_capacity()
    }

    /// Host path of the vsock Unix socket, if the VM has one.
    #[getter]
    fn vsock_path(&self) -> Option<String> {
        self.inner
            .vsock_path()
            .map(|p| p.to_string_lossy().into_owned())
    }

    /// The kernel command line as passed to the guest (with the virtio-mmio devices added).
    #[getter]
    fn cmdline(&self) -> &str {
        self.inner.cmdline()
    }

    #[getter]
    fn cpu_template(&self) -> &'static str {
        self.inner.cpu_template().name()
    }

    #[getter]
    fn memory_size(&self) -> u64 {
        self.inner.memory_size()
    }

    /// virtio devices: [{"kind": "blk"|"vsock", "mmio_base": int, "gsi": int, "path": str}].
    #[getter]
    fn devices<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.inner
            .devices()
            .iter()
            .map(|dev| {
                let d = PyDict::new(py);
                d.set_item("kind", dev.kind)?;
                d.set_item("mmio_base", dev.mmio_base)?;
                d.set_item("gsi", dev.gsi)?;
                d.set_item("path", dev.path.to_string_lossy())?;
                d.set_item("read_only", dev.read_only)?;
                Ok(d)
            })
            .collect()
    }

    /// The virtio status register of device `index` as the guest sees it
    /// (0x40 = DEVICE_NEEDS_RESET).
    fn device_status(&self, index: usize) -> PyResult<u32> {
        self.inner
            .device_status(index)
            .ok_or_else(|| PyValueError::new_err(format!("no virtio device {index}")))
    }

    /// (port I/O, MMIO) guest accesses that hit no device.
    #[getter]
    fn unhandled_exits(&self) -> (u64, u64) {
        self.inner.unhandled_exits()
    }

    /// Seconds from the start of `Vm.start` (or `Vm.restore`) to: "running" (vCPU threads
    /// released), "first_kvm_run", "first_console_byte" (None until they happen); "phases":
    /// {name: seconds} of the start-up (restore: load_state, memory, create_vm, devices,
    /// vm_state, vcpu_state, running); "refused_msrs": MSRs a restore could not load.
    #[getter]
    fn timings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let t = self.inner.times();
        let d = PyDict::new(py);
        let since = |i: std::time::Instant| i.duration_since(t.started).as_secs_f64();
        d.set_item("running", since(t.running))?;
        d.set_item("first_kvm_run", t.first_run.map(since))?;
        d.set_item("first_console_byte", t.first_console_byte.map(since))?;
        let phases = PyDict::new(py);
        for (name, secs) in self.inner.phases() {
            phases.set_item(*name, *secs)?;
        }
        d.set_item("phases", phases)?;
        d.set_item("refused_msrs", self.inner.refused_msrs())?;
        Ok(d)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) {
        py.detach(|| self.inner.stop());
    }

    fn __repr__(&self) -> String {
        let state = match self.inner.outcome() {
            None => "running".to_string(),
            Some(o) => o.kind().to_string(),
        };
        format!(
            "Vm(memory={} MiB, cpu_template={}, state={state})",
            self.inner.memory_size() >> 20,
            self.inner.cpu_template().name()
        )
    }
}

/// What a snapshot directory's `vmstate.bin` says, checked (magic, version, length, CRC):
/// {"memory_size", "vcpus", "cmdline", "cpu_template", "disks": [read_only, ...],
/// "vsock": bool, "memory_id", "base": None | {"path", "memory_id"}, "diff_pages"}.
#[pyfunction]
fn snapshot_info<'py>(py: Python<'py>, dir: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    let snap = py
        .detach(|| Snapshot::load(&dir))
        .map_err(|e| vmm_err(VmmError::Snapshot(e)))?;
    let d = PyDict::new(py);
    let m = &snap.machine;
    d.set_item("memory_size", m.memory_size)?;
    d.set_item("vcpus", m.vcpus)?;
    d.set_item("cmdline", &m.cmdline)?;
    d.set_item(
        "cpu_template",
        if m.template == 1 { "compat" } else { "normal" },
    )?;
    d.set_item("disks", m.disks.clone())?;
    d.set_item("vsock", m.vsock)?;
    d.set_item("memory_id", id_hex(&snap.memory.id))?;
    match &snap.memory.base {
        None => d.set_item("base", py.None())?,
        Some(b) => {
            let base = PyDict::new(py);
            base.set_item("path", &b.path)?;
            base.set_item("memory_id", id_hex(&b.id))?;
            d.set_item("base", base)?;
        }
    }
    d.set_item("diff_pages", snap.memory.stored_pages())?;
    Ok(d)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(snapshot_info, m)?)?;
    m.add_class::<PyVm>()?;
    Ok(())
}
