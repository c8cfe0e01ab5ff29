//! Binding for the VMM: `supermachine._core.Vm`.

use std::path::PathBuf;
use std::time::Duration;

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use super::input::Input;
use crate::devices::rate_limiter::RateLimit;
use crate::snapshot::memory::id_hex;
use crate::snapshot::Snapshot;
use crate::vmm::persist::RestoreOverrides;
use crate::vmm::{
    BootSource, CpuTemplate, CpuTemplateChoice, DiskConfig, MachineConfig, MemoryBacking,
    MountConfig, NetConfig, Outcome, RawMode, Vmm, VmmError,
};
use crate::worker::client::{IsolationChoice, WorkerError, WorkerOptions, WorkerVm};
use crate::worker::protocol::{ErrorKind, VmInfo, WireDevice, WireError, WireTimings};
use crate::worker::server;

/// The `supermachine.errors` class of each error kind, and the builtin it also derives from
/// (raised when the errors module cannot be imported).
fn error_class(kind: ErrorKind) -> (&'static str, fn(String) -> PyErr) {
    match kind {
        ErrorKind::NotFound => ("VmmFileNotFoundError", PyFileNotFoundError::new_err),
        ErrorKind::Os => ("VmmOSError", PyOSError::new_err),
        ErrorKind::Kvm => ("KvmUnavailableError", PyOSError::new_err),
        ErrorKind::Config => ("VmConfigError", PyValueError::new_err),
        ErrorKind::Snapshot => ("SnapshotStateError", PyValueError::new_err),
        ErrorKind::SnapshotWrite => ("SnapshotWriteError", PyOSError::new_err),
        ErrorKind::Jail => ("JailError", PyOSError::new_err),
        ErrorKind::State => ("VmmStateError", PyRuntimeError::new_err),
        ErrorKind::Runtime => ("VmmRuntimeError", PyRuntimeError::new_err),
    }
}

/// Raises `name` from `supermachine.errors` with `msg`.
fn raise(name: &str, fallback: fn(String) -> PyErr, msg: String) -> PyErr {
    Python::attach(|py| {
        match py
            .import("supermachine.errors")
            .and_then(|m| m.getattr(name))
        {
            Ok(class) => match class.call1((msg.clone(),)) {
                Ok(exc) => PyErr::from_value(exc),
                Err(e) => e,
            },
            Err(_) => fallback(msg),
        }
    })
}

fn wire_err(e: WireError) -> PyErr {
    let (name, fallback) = error_class(e.kind);
    raise(name, fallback, e.message)
}

fn vmm_err(e: VmmError) -> PyErr {
    wire_err(server::wire_error(e))
}

fn worker_err(e: WorkerError) -> PyErr {
    match e {
        WorkerError::Vmm(w) => wire_err(w),
        WorkerError::Crashed(o @ Outcome::OutOfMemory { .. }) => {
            raise("VmOutOfMemoryError", PyRuntimeError::new_err, o.reason())
        }
        WorkerError::Crashed(o) => raise("VmmCrashedError", PyRuntimeError::new_err, o.reason()),
        e @ WorkerError::Spawn { .. } => {
            raise("WorkerStartError", PyOSError::new_err, e.to_string())
        }
        e @ WorkerError::Limits(_) => {
            raise("ResourceLimitError", PyOSError::new_err, e.to_string())
        }
        e @ WorkerError::Snapshot(_) => {
            raise("SnapshotWriteError", PyOSError::new_err, e.to_string())
        }
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
    "net",
    "net_fd",
    "mounts",
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

/// A disk's "rate_limit" dict: {bytes_per_sec, bytes_burst, ops_per_sec, ops_burst}, each
/// optional (checked by the VMM when it opens the disk).
fn parse_rate_limit(d: &Bound<'_, PyDict>) -> PyResult<Option<RateLimit>> {
    let Some(limit) = d.get_item("rate_limit")?.filter(|v| !v.is_none()) else {
        return Ok(None);
    };
    let limit = limit
        .cast::<PyDict>()
        .map_err(|_| PyTypeError::new_err("a disk's 'rate_limit' must be a dict"))?;
    const KNOWN: [&str; 4] = ["bytes_per_sec", "bytes_burst", "ops_per_sec", "ops_burst"];
    for k in limit.keys() {
        let k: String = k.extract()?;
        if !KNOWN.contains(&k.as_str()) {
            return Err(PyValueError::new_err(format!(
                "unknown rate_limit key '{k}' (known: {})",
                KNOWN.join(", ")
            )));
        }
    }
    Ok(Some(RateLimit {
        bytes_per_sec: get(limit, "bytes_per_sec")?,
        bytes_burst: get(limit, "bytes_burst")?,
        ops_per_sec: get(limit, "ops_per_sec")?,
        ops_burst: get(limit, "ops_burst")?,
    }))
}

/// The "disks" entry of a config or restore overrides: paths (read-write, or for a restore as
/// saved) or dicts {path, read_only, rate_limit}.
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
                if !["path", "read_only", "rate_limit"].contains(&k.as_str()) {
                    return Err(PyValueError::new_err(format!("unknown disk key '{k}'")));
                }
            }
            let path: PathBuf =
                get(disk, "path")?.ok_or_else(|| PyValueError::new_err("a disk needs a 'path'"))?;
            out.push(DiskConfig {
                path,
                read_only: get(disk, "read_only")?.unwrap_or(false),
                rate_limit: parse_rate_limit(disk)?,
            });
        }
    }
    Ok(out)
}

/// The "mounts" entry of a config or restore overrides: dicts {host_dir, tag, read_only}
/// (checked by the VMM: the
/// tag's form and uniqueness, and the folder when its device opens it).
fn parse_mounts(d: &Bound<'_, PyDict>) -> PyResult<Vec<MountConfig>> {
    let Some(mounts) = d.get_item("mounts")?.filter(|v| !v.is_none()) else {
        return Ok(Vec::new());
    };
    let list = mounts
        .cast::<PyList>()
        .map_err(|_| PyTypeError::new_err("key 'mounts' must be a list"))?;
    let mut out = Vec::with_capacity(list.len());
    for item in list.iter() {
        let mount = item.cast::<PyDict>().map_err(|_| {
            PyTypeError::new_err("each mount must be a dict {host_dir, tag, read_only}")
        })?;
        for k in mount.keys() {
            let k: String = k.extract()?;
            if !["host_dir", "tag", "read_only"].contains(&k.as_str()) {
                return Err(PyValueError::new_err(format!("unknown mount key '{k}'")));
            }
        }
        let need = |key: &str| PyValueError::new_err(format!("a mount needs a '{key}'"));
        out.push(MountConfig {
            host_dir: get(mount, "host_dir")?.ok_or_else(|| need("host_dir"))?,
            tag: get(mount, "tag")?.ok_or_else(|| need("tag"))?,
            read_only: get(mount, "read_only")?.unwrap_or(false),
        });
    }
    Ok(out)
}

fn parse_config(d: &Bound<'_, PyDict>) -> PyResult<MachineConfig> {
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
    let mut cfg = MachineConfig::new(boot);
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
    cfg.net = parse_net(d)?;
    cfg.mounts = parse_mounts(d)?;
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

/// How a VM ended.
#[pyclass(frozen, get_all, eq, name = "VmOutcome", module = "supermachine._core")]
#[derive(PartialEq)]
pub(crate) struct PyOutcome {
    /// "poweroff", "reset", "panic", "crash", "stopped", "vmm_crash" or "oom".
    kind: &'static str,
    reason: String,
    /// The power-off code (poweroff only).
    code: Option<i64>,
}

impl From<&Outcome> for PyOutcome {
    fn from(o: &Outcome) -> Self {
        PyOutcome {
            kind: o.kind(),
            reason: o.reason(),
            code: match o {
                Outcome::PowerOff { code } => Some(i64::from(*code)),
                _ => None,
            },
        }
    }
}

#[pymethods]
impl PyOutcome {
    fn __repr__(&self) -> String {
        let code = self.code.map_or("None".to_string(), |c| c.to_string());
        format!(
            "VmOutcome(kind={:?}, reason={:?}, code={code})",
            self.kind, self.reason
        )
    }
}

/// When a VM's start-up reached its milestones, in seconds from the start or restore call.
#[pyclass(frozen, name = "VmTimings", module = "supermachine._core")]
pub(crate) struct PyTimings {
    /// The vCPUs were released.
    #[pyo3(get)]
    running: f64,
    #[pyo3(get)]
    first_kvm_run: Option<f64>,
    #[pyo3(get)]
    first_console_byte: Option<f64>,
    phases: Vec<(String, f64)>,
    /// MSRs a restore could not load on this host.
    #[pyo3(get)]
    refused_msrs: u64,
}

#[pymethods]
impl PyTimings {
    /// Seconds per start-up phase, in the order they ran (restore: load_state, memory,
    /// create_vm, devices, vm_state, vcpu_state, running; a worker adds spawn, limits and
    /// hello first).
    #[getter]
    fn phases<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (name, secs) in &self.phases {
            d.set_item(name, secs)?;
        }
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!(
            "VmTimings(running={}, phases={} entries, refused_msrs={})",
            self.running,
            self.phases.len(),
            self.refused_msrs
        )
    }
}

/// One virtio device of a VM.
#[pyclass(frozen, get_all, name = "VmDevice", module = "supermachine._core")]
pub(crate) struct PyDevice {
    /// "blk" or "vsock".
    kind: String,
    mmio_base: u64,
    gsi: u32,
    /// The disk image or the vsock socket on the host.
    path: PathBuf,
    /// For a disk: whether the guest may only read it (False for vsock).
    read_only: bool,
}

impl From<WireDevice> for PyDevice {
    fn from(d: WireDevice) -> Self {
        PyDevice {
            kind: d.kind,
            mmio_base: d.mmio_base,
            gsi: d.gsi,
            path: d.path,
            read_only: d.read_only,
        }
    }
}

#[pymethods]
impl PyDevice {
    fn __repr__(&self) -> String {
        format!(
            "VmDevice(kind={:?}, mmio_base={:#x}, gsi={}, path={:?}, read_only={})",
            self.kind,
            self.mmio_base,
            self.gsi,
            self.path,
            if self.read_only { "True" } else { "False" }
        )
    }
}

const WORKER_KEYS: &[&str] = &[
    "program",
    "isolation",
    "runtime_dir",
    "uid",
    "gid",
    "seccomp",
    "memory_max",
    "cpu_max",
    "pids_max",
    "cgroup_name",
    "console_capacity",
];

/// The "worker" argument of start/restore: how to run the VM's own VMM process.
fn parse_worker(d: &Bound<'_, PyDict>) -> PyResult<WorkerOptions> {
    for k in d.keys() {
        let k: String = k
            .extract()
            .map_err(|_| PyTypeError::new_err("worker keys must be strings"))?;
        if !WORKER_KEYS.contains(&k.as_str()) {
            return Err(PyValueError::new_err(format!(
                "unknown worker key '{k}' (known: {})",
                WORKER_KEYS.join(", ")
            )));
        }
    }
    let program: PathBuf =
        get(d, "program")?.ok_or_else(|| PyValueError::new_err("the worker needs a 'program'"))?;
    let isolation = match get::<String>(d, "isolation")?.as_deref() {
        None | Some("namespaces") => IsolationChoice::Namespaces,
        Some("user_namespaces") => IsolationChoice::UserNamespaces,
        Some("none") => IsolationChoice::None,
        Some(other) => {
            return Err(PyValueError::new_err(format!(
                "isolation must be 'namespaces', 'user_namespaces' or 'none', got '{other}'"
            )))
        }
    };
    Ok(WorkerOptions {
        program,
        isolation,
        runtime_dir: get(d, "runtime_dir")?,
        uid: get(d, "uid")?,
        gid: get(d, "gid")?,
        seccomp: get(d, "seccomp")?.unwrap_or(true),
        limits: crate::worker::cgroup::Limits {
            memory_max: get(d, "memory_max")?,
            cpu_max: get(d, "cpu_max")?,
            pids_max: get(d, "pids_max")?,
        },
        cgroup_name: get(d, "cgroup_name")?,
        console_capacity: get(d, "console_capacity")?
            .unwrap_or(crate::vmm::config::DEFAULT_CONSOLE_CAPACITY),
    })
}

/// Where a VM's VMM runs. (One per VM and never moved: the variants' sizes do not matter.)
#[allow(clippy::large_enum_variant)]
enum Backend {
    /// In this process (threads): kept to measure against, and for callers without a worker.
    InProcess(Vmm),
    /// In its own jailed worker process.
    Worker(WorkerVm),
}

/// A running microVM. Create with `Vm.start(config)`.
#[pyclass(name = "Vm", module = "supermachine._core", frozen)]
pub(crate) struct PyVm {
    inner: Backend,
    /// What does not change while the VM runs, read once.
    info: VmInfo,
}

impl PyVm {
    fn new(inner: Backend) -> Self {
        let info = match &inner {
            Backend::InProcess(vmm) => VmInfo::describe(vmm, Vec::new()),
            Backend::Worker(w) => w.info().clone(),
        };
        PyVm { inner, info }
    }
}

/// The "net" key: the network card's configuration as JSON (the shape of [`NetConfig`]), which
/// the Python layer builds from its typed settings, and "net_fd": the caller's end of the
/// socket pair whose other end the backend (passt) holds. The caller keeps owning it.
fn parse_net(d: &Bound<'_, PyDict>) -> PyResult<Option<NetConfig>> {
    let fd: Option<i32> = get(d, "net_fd")?;
    let Some(json) = get::<String>(d, "net")? else {
        return match fd {
            None => Ok(None),
            Some(_) => Err(PyValueError::new_err("'net_fd' was given without 'net'")),
        };
    };
    let mut net = serde_json::from_str::<NetConfig>(&json).map_err(|e| {
        PyValueError::new_err(format!(
            "config key 'net' is not a network configuration: {e}"
        ))
    })?;
    net.backend_fd = Some(fd.ok_or_else(|| {
        PyValueError::new_err("'net' needs 'net_fd', the socket connected to its backend")
    })?);
    Ok(Some(net))
}

fn parse_overrides(d: &Bound<'_, PyDict>) -> PyResult<RestoreOverrides> {
    let mut ov = RestoreOverrides::default();
    for k in d.keys() {
        let k: String = k
            .extract()
            .map_err(|_| PyTypeError::new_err("override keys must be strings"))?;
        const KNOWN: [&str; 8] = [
            "vsock_path",
            "net",
            "net_fd",
            "console_log",
            "disks",
            "mounts",
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
    ov.net = parse_net(d)?;
    ov.console_log = get(d, "console_log")?;
    ov.disks = parse_disks(d, "override")?;
    ov.mounts = parse_mounts(d)?;
    ov.track_dirty_pages = get(d, "track_dirty_pages")?.unwrap_or(false);
    ov.base = get(d, "base")?;
    Ok(ov)
}

fn timeout_arg(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Some(Duration::from_secs_f64(t.min(1e9)))),
        Some(t) => Err(PyValueError::new_err(format!(
            "timeout must be a non-negative number of seconds, got {t}"
        ))),
    }
}

#[pymethods]
impl PyVm {
    /// Builds and starts a VM from a config dict (see the type stubs for the keys). With
    /// `worker` (a dict: program, isolation, runtime_dir, uid, gid, seccomp, memory_max, cpu_max,
    /// pids_max, cgroup_name, console_capacity) the VMM runs in its own jailed process;
    /// without, in this one.
    #[staticmethod]
    #[pyo3(signature = (config, worker=None))]
    fn start(
        py: Python<'_>,
        config: &Bound<'_, PyDict>,
        worker: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let cfg = parse_config(config)?;
        let inner = match worker {
            None => Backend::InProcess(py.detach(|| Vmm::start(&cfg)).map_err(vmm_err)?),
            Some(w) => {
                let mut options = parse_worker(w)?;
                options.console_capacity = cfg.console_capacity;
                Backend::Worker(
                    py.detach(|| WorkerVm::start(&cfg, &options))
                        .map_err(worker_err)?,
                )
            }
        };
        Ok(PyVm::new(inner))
    }

    /// Restores a VM from a snapshot directory written by `Vm.snapshot` and starts it.
    /// `overrides` may set "vsock_path" (required when the snapshot has a vsock device),
    /// "console_log", "disks" (the disks to attach, one per saved disk, in order: required when
    /// the snapshot has disks, as the state file names none; a path or {path, read_only}, and a
    /// disk is read-only if either the caller or the snapshot says so), "track_dirty_pages" and "base"
    /// (where a diff's base snapshot is, if not the sibling directory it recorded). `worker`: as
    /// for `start`.
    #[staticmethod]
    #[pyo3(signature = (dir, overrides=None, worker=None))]
    fn restore(
        py: Python<'_>,
        dir: PathBuf,
        overrides: Option<&Bound<'_, PyDict>>,
        worker: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let ov = match overrides {
            Some(d) => parse_overrides(d)?,
            None => RestoreOverrides::default(),
        };
        let inner = match worker {
            None => Backend::InProcess(py.detach(|| Vmm::restore(&dir, &ov)).map_err(vmm_err)?),
            Some(w) => {
                let options = parse_worker(w)?;
                Backend::Worker(
                    py.detach(|| WorkerVm::restore(&dir, &ov, &options))
                        .map_err(worker_err)?,
                )
            }
        };
        Ok(PyVm::new(inner))
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
        let d = PyDict::new(py);
        let phases = PyDict::new(py);
        match &self.inner {
            Backend::InProcess(vmm) => {
                let report = py
                    .detach(|| vmm.snapshot(&dir, base.as_deref()))
                    .map_err(|e| vmm_err(VmmError::Snapshot(e)))?;
                d.set_item("memory_bytes", report.memory_bytes)?;
                d.set_item("state_bytes", report.state_bytes)?;
                d.set_item("memory_id", id_hex(&report.memory_id))?;
                d.set_item("diff_pages", report.diff_pages)?;
                d.set_item("compared_pages", report.compared_pages)?;
                for (name, secs) in &report.phases {
                    phases.set_item(*name, *secs)?;
                }
            }
            Backend::Worker(w) => {
                let report = py
                    .detach(|| w.snapshot(&dir, base.as_deref()))
                    .map_err(worker_err)?;
                d.set_item("memory_bytes", report.memory_bytes)?;
                d.set_item("state_bytes", report.state_bytes)?;
                d.set_item("memory_id", id_hex(&report.memory_id))?;
                d.set_item("diff_pages", report.diff_pages)?;
                d.set_item("compared_pages", report.compared_pages)?;
                for (name, secs) in &report.phases {
                    phases.set_item(name, *secs)?;
                }
            }
        }
        d.set_item("phases", phases)?;
        Ok(d)
    }

    /// Pages the guest wrote since the start or the previous call: one bit per 4 KiB page, least
    /// significant bit first, in guest RAM order (RAM above the MMIO hole follows the part
    /// below). VMM writes (devices, write_memory) are not logged. Needs track_dirty_pages.
    fn dirty_pages<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let bits = match &self.inner {
            Backend::InProcess(vmm) => py
                .detach(|| vmm.dirty_pages())
                .map_err(PyRuntimeError::new_err)?,
            Backend::Worker(w) => py.detach(|| w.dirty_pages()).map_err(worker_err)?,
        };
        Ok(PyBytes::new(py, &bits))
    }

    /// Pauses every vCPU (returns once none runs guest code).
    fn pause(&self, py: Python<'_>) -> PyResult<()> {
        match &self.inner {
            Backend::InProcess(vmm) => py.detach(|| vmm.pause()).map_err(PyRuntimeError::new_err),
            Backend::Worker(w) => py.detach(|| w.pause()).map_err(worker_err),
        }
    }

    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        match &self.inner {
            Backend::InProcess(vmm) => py.detach(|| vmm.resume()).map_err(PyRuntimeError::new_err),
            Backend::Worker(w) => py.detach(|| w.resume()).map_err(worker_err),
        }
    }

    /// Stops the VM and joins its threads (or collects its worker); idempotent.
    fn stop(&self, py: Python<'_>) {
        match &self.inner {
            Backend::InProcess(vmm) => py.detach(|| vmm.stop()),
            Backend::Worker(w) => py.detach(|| w.stop()),
        }
    }

    /// Waits up to `timeout` seconds (forever with None) for the VM to end; returns the
    /// outcome, or None on timeout.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<PyOutcome>> {
        let timeout = timeout_arg(timeout)?;
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
            let ended = match &self.inner {
                Backend::InProcess(vmm) => py.detach(|| vmm.wait(Some(step))),
                Backend::Worker(w) => py.detach(|| w.wait(Some(step))),
            };
            if let Some(o) = ended {
                return Ok(Some(PyOutcome::from(&o)));
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(None);
            }
            py.check_signals()?;
        }
    }

    /// None while running; then how the VM ended.
    #[getter]
    fn outcome(&self, py: Python<'_>) -> Option<PyOutcome> {
        let outcome = match &self.inner {
            Backend::InProcess(vmm) => vmm.outcome(),
            // Asked on every warm-pool acquire: the common answer needs no round trip, and
            // keeping the GIL for it spares a wait of up to the interpreter's switch interval
            // (5 ms) to take it back when another thread runs Python.
            Backend::Worker(w) if w.plainly_running() => None,
            Backend::Worker(w) => py.detach(|| w.outcome()),
        };
        outcome.as_ref().map(PyOutcome::from)
    }

    /// Captured serial console output.
    fn console<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let bytes = match &self.inner {
            Backend::InProcess(vmm) => vmm.console(),
            Backend::Worker(w) => w.console(),
        };
        PyBytes::new(py, &bytes)
    }

    fn read_memory<'py>(
        &self,
        py: Python<'py>,
        gpa: u64,
        length: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let data = match &self.inner {
            Backend::InProcess(vmm) => py
                .detach(|| vmm.read_memory(gpa, length))
                .map_err(PyValueError::new_err)?,
            Backend::Worker(w) => py
                .detach(|| w.read_memory(gpa, length))
                .map_err(worker_err)?,
        };
        Ok(PyBytes::new(py, &data))
    }

    fn write_memory(&self, py: Python<'_>, gpa: u64, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let input = Input::extract(data)?;
        let Input::Buffer(buf) = &input else {
            return Err(PyTypeError::new_err("data must be a bytes-like object"));
        };
        let bytes = Input::buffer_bytes(buf);
        match &self.inner {
            Backend::InProcess(vmm) => vmm
                .write_memory(gpa, bytes)
                .map_err(PyValueError::new_err)?,
            Backend::Worker(w) => w.write_memory(gpa, bytes).map_err(worker_err)?,
        }
        let _ = py;
        Ok(())
    }

    /// Bytes of serial output the console ring keeps.
    #[getter]
    fn console_capacity(&self) -> usize {
        self.info.console_capacity as usize
    }

    /// Host path of the vsock Unix socket, if the VM has one.
    #[getter]
    fn vsock_path(&self) -> Option<String> {
        (self.info.vsock_path.as_ref()).map(|p| p.to_string_lossy().into_owned())
    }

    /// The kernel command line as passed to the guest (with the virtio-mmio devices added).
    #[getter]
    fn cmdline(&self) -> String {
        self.info.cmdline.clone()
    }

    #[getter]
    fn cpu_template(&self) -> String {
        self.info.cpu_template.clone()
    }

    #[getter]
    fn memory_size(&self) -> u64 {
        self.info.memory_size
    }

    /// The worker's process id (None when the VMM runs in this process).
    #[getter]
    fn pid(&self) -> Option<i32> {
        match &self.inner {
            Backend::InProcess(_) => None,
            Backend::Worker(w) => Some(w.pid()),
        }
    }

    /// The protections the VMM runs under, by name (empty in this process).
    #[getter]
    fn protections(&self) -> Vec<String> {
        match &self.inner {
            Backend::InProcess(_) => Vec::new(),
            Backend::Worker(w) => w.protections(),
        }
    }

    /// The VM's virtio devices, in MMIO order.
    #[getter]
    fn devices(&self) -> Vec<PyDevice> {
        self.info
            .devices
            .iter()
            .cloned()
            .map(PyDevice::from)
            .collect()
    }

    /// The virtio status register of device `index` as the guest sees it
    /// (0x40 = DEVICE_NEEDS_RESET).
    fn device_status(&self, py: Python<'_>, index: usize) -> PyResult<u32> {
        let status = match &self.inner {
            Backend::InProcess(vmm) => vmm.device_status(index),
            Backend::Worker(w) => py.detach(|| w.device_status(index)).map_err(worker_err)?,
        };
        status.ok_or_else(|| PyValueError::new_err(format!("no virtio device {index}")))
    }

    /// What the network card counted (JSON, the shape of `NetCounters`), or None without one.
    fn net_counters_json(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let counters = match &self.inner {
            Backend::InProcess(vmm) => vmm.net_counters(),
            Backend::Worker(w) => py.detach(|| w.net_counters()).map_err(worker_err)?,
        };
        counters
            .map(|c| serde_json::to_string(&c))
            .transpose()
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    /// (port I/O, MMIO) guest accesses that hit no device.
    #[getter]
    fn unhandled_exits(&self, py: Python<'_>) -> PyResult<(u64, u64)> {
        match &self.inner {
            Backend::InProcess(vmm) => Ok(vmm.unhandled_exits()),
            Backend::Worker(w) => py.detach(|| w.unhandled_exits()).map_err(worker_err),
        }
    }

    /// When the start-up reached its milestones (first_kvm_run and first_console_byte are None
    /// until they happen), and its phases.
    #[getter]
    fn timings(&self, py: Python<'_>) -> PyResult<PyTimings> {
        let (t, phases, origin) = match &self.inner {
            Backend::InProcess(vmm) => {
                let t = WireTimings::from(vmm);
                let (phases, origin) = (t.phases.clone(), t.started_ns);
                (t, phases, origin)
            }
            // The worker's phases include its own start-up, timed from this process's call.
            Backend::Worker(w) => {
                let (t, phases) = py.detach(|| w.timings()).map_err(worker_err)?;
                (t, phases, w.called_ns())
            }
        };
        let since = |ns: u64| ns.saturating_sub(origin) as f64 / 1e9;
        Ok(PyTimings {
            running: since(t.running_ns),
            first_kvm_run: t.first_run_ns.map(since),
            first_console_byte: t.first_console_byte_ns.map(since),
            phases,
            refused_msrs: t.refused_msrs,
        })
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) {
        self.stop(py);
    }

    fn __repr__(&self) -> String {
        let (state, where_) = match &self.inner {
            Backend::InProcess(vmm) => (
                vmm.outcome()
                    .map_or("running".to_string(), |o| o.kind().to_string()),
                "in-process".to_string(),
            ),
            Backend::Worker(w) => ("?".to_string(), format!("worker pid {}", w.pid())),
        };
        format!(
            "Vm(memory={} MiB, cpu_template={}, {where_}, state={state})",
            self.memory_size() >> 20,
            self.cpu_template()
        )
    }
}

/// What a snapshot directory's `vmstate.bin` says, checked (magic, version, length, CRC):
/// {"memory_size", "vcpus", "cmdline", "cpu_template", "disks": [read_only, ...],
/// "vsock": bool, "net": bool, "shares": [read_only, ...], "memory_id",
/// "base": None | {"path", "memory_id"}, "diff_pages"}.
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
    d.set_item("net", m.net)?;
    d.set_item("shares", m.shares.clone())?;
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
    m.add_class::<PyOutcome>()?;
    m.add_class::<PyDevice>()?;
    m.add_class::<PyTimings>()?;
    Ok(())
}
