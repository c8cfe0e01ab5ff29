//! Resource limits per VM: one cgroup per worker process.
//!
//! cgroup v2 is preferred for each controller it offers; a controller that v2 lacks is looked for
//! in the v1 hierarchies (hybrid hosts mount memory, cpu and pids as v1 and leave the unified
//! hierarchy without controllers). Groups are created beneath the caller's own groups, found
//! through `/proc/self/mountinfo` and `/proc/self/cgroup`, so a limit set on the caller's service
//! still bounds its VMs.
//!
//! cgroup v2 forbids enabling controllers for children of a group that holds processes (the
//! "no internal processes" rule), and the caller's group always holds the caller. So a v2 group
//! goes beneath `<caller group>/supermachine` only when the caller's group already delegates the
//! controllers (its `cgroup.subtree_control` lists them); otherwise beneath `<root>/supermachine`
//! when the hierarchy root is writable (root), and [`VmCgroup::describe`] says so.
//!
//! Every write is checked to land in a cgroup file system, and group names are validated, so a
//! bad name or a surprising mount table never makes this module write elsewhere.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Smallest memory limit accepted: below this not even the VMM process starts.
pub const MIN_MEMORY_MAX: u64 = 16 << 20;
/// Largest memory limit accepted (1 TiB, far above any VM this VMM builds).
pub const MAX_MEMORY_MAX: u64 = 1 << 40;
/// Smallest CPU share: the kernel's smallest CFS quota (1 ms) per 100 ms period.
pub const MIN_CPU_MAX: f64 = 0.01;
/// Largest CPU share accepted (the VMM caps vCPUs far below this).
pub const MAX_CPU_MAX: f64 = 1024.0;
/// Largest process/thread count accepted (the kernel's own `pid_max` ceiling).
pub const MAX_PIDS_MAX: u64 = 4 << 20;
/// Longest group name (a file name component, kept short for readable paths).
pub const MAX_NAME_LEN: usize = 64;
/// The parent group that holds every VM's group.
pub const PARENT_GROUP: &str = "supermachine";

/// CFS period used for CPU quotas (100 ms, the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;
/// Longest interface file read (status files are a few hundred bytes).
const MAX_FILE_READ: u64 = 64 << 10;
/// `rmdir` of a group whose last process just exited can briefly fail with `EBUSY`.
const REMOVE_ATTEMPTS: u32 = 50;
const REMOVE_RETRY_DELAY: Duration = Duration::from_millis(2);

const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Errors of limit validation and cgroup set-up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("memory_max of {0} bytes is out of range: it must be between {MIN_MEMORY_MAX} and {MAX_MEMORY_MAX} bytes")]
    MemoryOutOfRange(u64),
    #[error("cpu_max of {0} CPUs is out of range: it must be a number between {MIN_CPU_MAX} and {MAX_CPU_MAX}")]
    CpuOutOfRange(f64),
    #[error("pids_max of {0} is out of range: it must be between 1 and {MAX_PIDS_MAX}")]
    PidsOutOfRange(u64),
    #[error("cgroup name {0:?} is not valid: it must be 1 to {MAX_NAME_LEN} letters, digits, '-' or '_'")]
    InvalidName(String),
    #[error("no cgroup {controller} controller is available to this process: {reason}")]
    NoController {
        controller: &'static str,
        reason: String,
    },
    #[error("cannot place a cgroup v2 group for {controllers}: {reason}")]
    NoV2Parent { controllers: String, reason: String },
    #[error("a cgroup named {0} already exists and holds processes or groups: VM cgroup names must be unique")]
    AlreadyExists(PathBuf),
    #[error("{0} is not in a cgroup file system: refusing to write there")]
    NotCgroupFs(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("cannot create the cgroup {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
}

/// Resource limits of one VM's worker process (and every thread and process it starts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory in bytes: guest RAM plus VMM overhead. RAM and swap together stay under it (the
    /// swap a group may use is set to nothing beyond it). Exceeding it gets the worker OOM-killed.
    pub memory_max: Option<u64>,
    /// CPU time as a number of CPUs (0.5 = half of one CPU), enforced per 100 ms period.
    pub cpu_max: Option<f64>,
    /// Processes and threads (every vCPU is a thread).
    pub pids_max: Option<u64>,
}

impl Limits {
    /// Checks every number against its bounds.
    pub fn validate(&self) -> Result<(), CgroupError> {
        if let Some(m) = self.memory_max {
            if !(MIN_MEMORY_MAX..=MAX_MEMORY_MAX).contains(&m) {
                return Err(CgroupError::MemoryOutOfRange(m));
            }
        }
        if let Some(c) = self.cpu_max {
            // `contains` is false for NaN, so NaN is rejected too.
            if !(MIN_CPU_MAX..=MAX_CPU_MAX).contains(&c) {
                return Err(CgroupError::CpuOutOfRange(c));
            }
        }
        if let Some(p) = self.pids_max {
            if !(1..=MAX_PIDS_MAX).contains(&p) {
                return Err(CgroupError::PidsOutOfRange(p));
            }
        }
        Ok(())
    }

    /// True when no limit is asked (then no cgroup is made).
    pub fn is_empty(&self) -> bool {
        self.memory_max.is_none() && self.cpu_max.is_none() && self.pids_max.is_none()
    }

    fn controllers(&self) -> Vec<Controller> {
        let mut out = Vec::new();
        if self.memory_max.is_some() {
            out.push(Controller::Memory);
        }
        if self.cpu_max.is_some() {
            out.push(Controller::Cpu);
        }
        if self.pids_max.is_some() {
            out.push(Controller::Pids);
        }
        out
    }
}

/// The controllers this module uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Controller {
    Memory,
    Cpu,
    Pids,
}

impl Controller {
    pub const ALL: [Controller; 3] = [Controller::Memory, Controller::Cpu, Controller::Pids];

    /// The kernel's name of the controller.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
        }
    }
}

/// cgroup version of a hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Version {
    V1,
    V2,
}

/// Where a controller is available to this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub version: Version,
    /// Mount point of the hierarchy.
    pub mount: PathBuf,
    /// The caller's own group in it (a directory under `mount`).
    pub group: PathBuf,
}

/// Finds where `controller` is available to this process: cgroup v2 when its root offers the
/// controller, else the v1 hierarchy that has it.
pub fn locate(controller: Controller) -> Result<Location, CgroupError> {
    let mounts = read_small("/proc/self/mountinfo".as_ref())?;
    let groups = read_small("/proc/self/cgroup".as_ref())?;
    locate_in(
        controller,
        &parse_mountinfo(&mounts),
        &parse_proc_cgroup(&groups),
    )
}

fn locate_in(
    controller: Controller,
    mounts: &[CgroupMount],
    groups: &[ProcGroup],
) -> Result<Location, CgroupError> {
    let name = controller.name();
    let mut v2_reason = "no cgroup2 file system is mounted".to_string();
    if let Some(own) = groups.iter().find(|g| g.hierarchy == 0) {
        for m in mounts.iter().filter(|m| m.version == Version::V2) {
            let Some(group) = m.group_dir(&own.path) else {
                continue;
            };
            let offered = read_small(&m.mount_point.join("cgroup.controllers"))
                .map(|s| s.split_whitespace().any(|c| c == name))
                .unwrap_or(false);
            if offered {
                return Ok(Location {
                    version: Version::V2,
                    mount: m.mount_point.clone(),
                    group,
                });
            }
            v2_reason = format!(
                "the cgroup v2 hierarchy at {} does not offer it",
                m.mount_point.display()
            );
        }
    }
    for g in groups
        .iter()
        .filter(|g| g.controllers.iter().any(|c| c == name))
    {
        for m in mounts
            .iter()
            .filter(|m| m.version == Version::V1 && m.options.iter().any(|o| o == name))
        {
            if let Some(group) = m.group_dir(&g.path) {
                return Ok(Location {
                    version: Version::V1,
                    mount: m.mount_point.clone(),
                    group,
                });
            }
        }
    }
    Err(CgroupError::NoController {
        controller: name,
        reason: format!("{v2_reason}, and no cgroup v1 hierarchy of this process has it mounted"),
    })
}

/// A cgroup (v1 or v2) mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    version: Version,
    /// The group of the hierarchy this mount shows at its mount point.
    root: String,
    mount_point: PathBuf,
    /// Super-block options: for v1, the controllers it carries.
    options: Vec<String>,
}

impl CgroupMount {
    /// The directory of group `path` (as `/proc/self/cgroup` names it) under this mount, when the
    /// mount shows it.
    fn group_dir(&self, path: &str) -> Option<PathBuf> {
        let rel = if self.root == "/" {
            path.strip_prefix('/')?
        } else {
            let rest = path.strip_prefix(self.root.as_str())?;
            if !rest.is_empty() && !rest.starts_with('/') {
                return None;
            }
            rest.trim_start_matches('/')
        };
        // Group paths come from the kernel; still refuse anything that could leave the mount.
        if rel.split('/').any(|c| c == "..") {
            return None;
        }
        Some(if rel.is_empty() {
            self.mount_point.clone()
        } else {
            self.mount_point.join(rel)
        })
    }
}

/// One line of `/proc/self/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcGroup {
    hierarchy: u32,
    controllers: Vec<String>,
    path: String,
}

fn parse_proc_cgroup(text: &str) -> Vec<ProcGroup> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let hierarchy = parts.next()?.parse().ok()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            if !path.starts_with('/') {
                return None;
            }
            Some(ProcGroup {
                hierarchy,
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect(),
                path: path.to_string(),
            })
        })
        .collect()
}

/// Mountinfo escapes space, tab, newline and backslash in paths as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(v) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            // ID PARENT MAJ:MIN ROOT MOUNT-POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER-OPTIONS
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let version = match *right.first()? {
                "cgroup2" => Version::V2,
                "cgroup" => Version::V1,
                _ => return None,
            };
            Some(CgroupMount {
                version,
                root: unescape_mount_path(left.get(3)?),
                mount_point: PathBuf::from(unescape_mount_path(left.get(4)?)),
                options: right
                    .get(2)
                    .map(|o| o.split(',').map(str::to_string).collect())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// One per-VM group directory and the controllers it limits.
#[derive(Debug)]
struct GroupDir {
    version: Version,
    path: PathBuf,
    controllers: Vec<Controller>,
}

/// The cgroups of one VM's worker: one directory on v2, or one per v1 hierarchy used.
#[derive(Debug)]
pub struct VmCgroup {
    dirs: Vec<GroupDir>,
    /// Why a v2 group sits at the hierarchy root instead of beneath the caller's group.
    placement_note: Option<String>,
    removed: bool,
}

impl VmCgroup {
    /// Creates the groups of VM `name` with `limits` set; `None` when no limit is asked.
    ///
    /// `name` must be unique per VM among the caller's VMs (a leftover empty group of the same
    /// name is replaced; one holding processes is an error).
    pub fn create(name: &str, limits: &Limits) -> Result<Option<VmCgroup>, CgroupError> {
        limits.validate()?;
        if limits.is_empty() {
            return Ok(None);
        }
        validate_name(name)?;
        let mut cg = VmCgroup {
            dirs: Vec::new(),
            placement_note: None,
            removed: false,
        };
        // Group the controllers by the hierarchy that carries them.
        let mut by_group: Vec<(Location, Vec<Controller>)> = Vec::new();
        for c in limits.controllers() {
            let loc = locate(c)?;
            match by_group.iter_mut().find(|(l, _)| l.mount == loc.mount) {
                Some((_, cs)) => cs.push(c),
                None => by_group.push((loc, vec![c])),
            }
        }
        for (loc, controllers) in by_group {
            // On failure `cg` drops and removes what was already made.
            let parent = match loc.version {
                Version::V1 => {
                    let parent = loc.group.join(PARENT_GROUP);
                    make_dir(&parent, true)?;
                    parent
                }
                Version::V2 => {
                    let (parent, note) = v2_parent(&loc, &controllers)?;
                    cg.placement_note = note;
                    parent
                }
            };
            let path = parent.join(name);
            make_dir(&path, false)?;
            cg.dirs.push(GroupDir {
                version: loc.version,
                path,
                controllers,
            });
            let dir = cg.dirs.last().expect("just pushed");
            set_limits(dir, limits)?;
        }
        Ok(Some(cg))
    }

    /// Moves process `pid` (with all its threads) into the VM's groups.
    pub fn add_process(&self, pid: libc::pid_t) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            write_file(&dir.path.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Whether the kernel's OOM killer killed a process in the VM's memory group.
    pub fn oom_killed(&self) -> bool {
        self.dirs
            .iter()
            .filter(|d| d.controllers.contains(&Controller::Memory))
            .any(|d| {
                let file = match d.version {
                    Version::V2 => "memory.events",
                    Version::V1 => "memory.oom_control",
                };
                read_small(&d.path.join(file))
                    .ok()
                    .and_then(|text| key_value(&text, "oom_kill"))
                    .is_some_and(|n| n > 0)
            })
    }

    /// Processes in the VM's groups that hit `pids_max` when forking (0 without a pids limit).
    pub fn pids_max_hits(&self) -> u64 {
        self.dirs
            .iter()
            .filter(|d| d.controllers.contains(&Controller::Pids))
            .filter_map(|d| read_small(&d.path.join("pids.events")).ok())
            .filter_map(|text| key_value(&text, "max"))
            .sum()
    }

    /// The group directories, one per hierarchy used.
    pub fn paths(&self) -> Vec<&Path> {
        self.dirs.iter().map(|d| d.path.as_path()).collect()
    }

    /// Where the groups live, for error messages and `supermachine doctor`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, d) in self.dirs.iter().enumerate() {
            if i > 0 {
                out.push_str("; ");
            }
            let names: Vec<&str> = d.controllers.iter().map(|c| c.name()).collect();
            let v = match d.version {
                Version::V1 => "v1",
                Version::V2 => "v2",
            };
            let _ = write!(
                out,
                "cgroup {v} {} at {}",
                names.join(", "),
                d.path.display()
            );
        }
        if let Some(note) = &self.placement_note {
            let _ = write!(out, " ({note})");
        }
        out
    }

    /// Removes the groups (best effort): call after the worker exited.
    pub fn remove(mut self) {
        self.remove_dirs();
    }

    fn remove_dirs(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        for d in self.dirs.iter().rev() {
            remove_dir(&d.path);
        }
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        self.remove_dirs();
    }
}

fn validate_name(name: &str) -> Result<(), CgroupError> {
    // No dots: every interface file has one, so a group name can never shadow one, and ".."
    // can never appear.
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidName(name.to_string()))
    }
}

/// Chooses (and prepares) the v2 parent group for `controllers`.
fn v2_parent(
    loc: &Location,
    controllers: &[Controller],
) -> Result<(PathBuf, Option<String>), CgroupError> {
    let names: Vec<&str> = controllers.iter().map(|c| c.name()).collect();
    let delegated = read_small(&loc.group.join("cgroup.subtree_control"))
        .map(|s| names.iter().all(|n| s.split_whitespace().any(|c| c == *n)))
        .unwrap_or(false);
    let (base, note) = if delegated {
        (loc.group.clone(), None)
    } else if loc.group == loc.mount {
        // The root is exempt from the no-internal-processes rule.
        (loc.mount.clone(), None)
    } else {
        // The caller's group holds the caller, so it cannot pass controllers to children.
        let note = format!(
            "placed at the cgroup v2 root because the caller's group {} holds processes and does \
             not delegate {}",
            loc.group.display(),
            names.join(", ")
        );
        (loc.mount.clone(), Some(note))
    };
    let enable = |group: &Path| -> Result<(), CgroupError> {
        let file = group.join("cgroup.subtree_control");
        let present = read_small(&file)?;
        let missing: Vec<String> = names
            .iter()
            .filter(|n| !present.split_whitespace().any(|c| c == **n))
            .map(|n| format!("+{n}"))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        write_file(&file, &missing.join(" "))
    };
    let explain = |e: CgroupError| {
        CgroupError::NoV2Parent {
        controllers: names.join(", "),
        reason: format!(
            "{e} (the caller's group {} holds processes, so cgroup v2 allows no controllers beneath \
             it; run as root, or from a delegated group whose cgroup.subtree_control lists them)",
            loc.group.display()
        ),
    }
    };
    if !delegated {
        enable(&base).map_err(explain)?;
    }
    let parent = base.join(PARENT_GROUP);
    make_dir(&parent, true).map_err(explain)?;
    enable(&parent).map_err(explain)?;
    Ok((parent, note))
}

fn set_limits(dir: &GroupDir, limits: &Limits) -> Result<(), CgroupError> {
    let p = &dir.path;
    for c in &dir.controllers {
        match (c, dir.version) {
            (Controller::Memory, Version::V2) => {
                let m = limits
                    .memory_max
                    .expect("memory controller implies a limit");
                write_file(&p.join("memory.max"), &m.to_string())?;
                write_optional(&p.join("memory.swap.max"), "0")?;
                // One OOM kill ends every process of the worker, never half of it.
                write_optional(&p.join("memory.oom.group"), "1")?;
            }
            (Controller::Memory, Version::V1) => {
                let m = limits
                    .memory_max
                    .expect("memory controller implies a limit");
                write_file(&p.join("memory.limit_in_bytes"), &m.to_string())?;
                // RAM plus swap under the same bound (present only with swap accounting).
                write_optional(&p.join("memory.memsw.limit_in_bytes"), &m.to_string())?;
            }
            (Controller::Cpu, v) => {
                let cpus = limits.cpu_max.expect("cpu controller implies a limit");
                // Validated to [0.01, 1024]: the quota is 1 ms .. 102.4 s per period.
                let quota = (cpus * CPU_PERIOD_US as f64).round() as u64;
                match v {
                    Version::V2 => {
                        write_file(&p.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?
                    }
                    Version::V1 => {
                        write_file(&p.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                        write_file(&p.join("cpu.cfs_quota_us"), &quota.to_string())?;
                    }
                }
            }
            (Controller::Pids, _) => {
                let n = limits.pids_max.expect("pids controller implies a limit");
                write_file(&p.join("pids.max"), &n.to_string())?;
            }
        }
    }
    Ok(())
}

/// `key N` lines of cgroup status files.
fn key_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Whether the file system holding the open file `f` is a cgroup file system.
fn on_cgroup_fs(f: &File) -> bool {
    // SAFETY: zeroed statfs is a valid out-buffer of plain integers.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the call's duration and `st` is a valid out-pointer.
    let rc = unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libc targets.
    let magic = st.f_type as i64;
    rc == 0 && (magic == CGROUP_SUPER_MAGIC || magic == CGROUP2_SUPER_MAGIC)
}

fn open_dir_checked(dir: &Path) -> Result<(), CgroupError> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|source| CgroupError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
    if on_cgroup_fs(&f) {
        Ok(())
    } else {
        Err(CgroupError::NotCgroupFs(dir.to_path_buf()))
    }
}

/// Creates a group directory after checking that its parent is a cgroup directory.
/// `shared` groups (the common parent) may exist already; a per-VM group that exists is
/// removed first when empty (a leftover of a crashed owner), else it is an error.
fn make_dir(path: &Path, shared: bool) -> Result<(), CgroupError> {
    let parent = path.parent().unwrap_or(path);
    open_dir_checked(parent)?;
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            open_dir_checked(path)?;
            if shared {
                return Ok(());
            }
            fs::remove_dir(path).map_err(|_| CgroupError::AlreadyExists(path.to_path_buf()))?;
            fs::create_dir(path).map_err(|source| CgroupError::Create {
                path: path.to_path_buf(),
                source,
            })
        }
        Err(source) => Err(CgroupError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn remove_dir(path: &Path) {
    if open_dir_checked(path).is_err() {
        return;
    }
    for _ in 0..REMOVE_ATTEMPTS {
        match fs::remove_dir(path) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(REMOVE_RETRY_DELAY)
            }
            _ => return,
        }
    }
}

/// Writes `value` to a cgroup interface file, refusing anything outside a cgroup file system.
fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    let err = |source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    };
    // No O_CREAT: interface files exist or the write is wrong.
    let mut f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(err)?;
    if !on_cgroup_fs(&f) {
        return Err(CgroupError::NotCgroupFs(path.to_path_buf()));
    }
    f.write_all(value.as_bytes()).map_err(err)
}

/// Like [`write_file`] for a file that only some kernels or configurations have.
fn write_optional(path: &Path, value: &str) -> Result<(), CgroupError> {
    match write_file(path, value) {
        Err(CgroupError::Write { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Ok(())
        }
        other => other,
    }
}

fn read_small(path: &Path) -> Result<String, CgroupError> {
    let err = |source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(err)?;
    let mut text = String::new();
    f.take(MAX_FILE_READ)
        .read_to_string(&mut text)
        .map_err(err)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command, Stdio};

    const MIB: u64 = 1 << 20;

    #[test]
    fn limits_are_bounded() {
        let ok = Limits {
            memory_max: Some(64 * MIB),
            cpu_max: Some(0.5),
            pids_max: Some(64),
        };
        ok.validate().unwrap();
        let bad = [
            Limits {
                memory_max: Some(MIN_MEMORY_MAX - 1),
                ..ok
            },
            Limits {
                memory_max: Some(MAX_MEMORY_MAX + 1),
                ..ok
            },
            Limits {
                cpu_max: Some(0.001),
                ..ok
            },
            Limits {
                cpu_max: Some(f64::NAN),
                ..ok
            },
            Limits {
                cpu_max: Some(f64::INFINITY),
                ..ok
            },
            Limits {
                pids_max: Some(0),
                ..ok
            },
            Limits {
                pids_max: Some(MAX_PIDS_MAX + 1),
                ..ok
            },
        ];
        for l in bad {
            let e = l.validate().unwrap_err().to_string();
            assert!(e.contains("out of range: it must be"), "{e}");
        }
        assert!(VmCgroup::create("x", &bad[0]).is_err());
        assert!(VmCgroup::create("x", &Limits::default()).unwrap().is_none());
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "..", "a/b", "memory.max", "a b", &"x".repeat(65)] {
            let e = VmCgroup::create(
                bad,
                &Limits {
                    pids_max: Some(8),
                    ..Limits::default()
                },
            )
            .unwrap_err();
            assert!(matches!(e, CgroupError::InvalidName(_)), "{bad:?}: {e}");
        }
        validate_name("vm-1234_5").unwrap();
    }

    #[test]
    fn parses_mountinfo_and_proc_cgroup() {
        let mounts = parse_mountinfo(
            "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
             32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n\
             35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
             41 31 0:38 / /sys/fs/cgroup/uni\\040fied rw - cgroup2 cgroup2 rw,nsdelegate\n",
        );
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[0].options, ["rw", "cpu", "cpuacct"]);
        assert_eq!(mounts[2].version, Version::V2);
        assert_eq!(
            mounts[2].mount_point,
            PathBuf::from("/sys/fs/cgroup/uni fied")
        );
        let groups =
            parse_proc_cgroup("4:memory:/docker/abc/x\n2:cpu,cpuacct:/\n0::/user.slice\nbad\n");
        assert_eq!(groups.len(), 3);
        assert_eq!(groups[1].controllers, ["cpu", "cpuacct"]);
        // A mount whose root is a sub-group shows only paths beneath that sub-group.
        assert_eq!(
            mounts[1].group_dir("/docker/abc/x"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/x"))
        );
        assert_eq!(mounts[1].group_dir("/docker/abcd"), None);
        assert_eq!(mounts[1].group_dir("/other"), None);
        assert_eq!(
            mounts[0].group_dir("/"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))
        );
        let loc = locate_in(Controller::Memory, &mounts, &groups).unwrap();
        assert_eq!(loc.version, Version::V1);
        assert_eq!(loc.group, PathBuf::from("/sys/fs/cgroup/memory/x"));
        let e = locate_in(Controller::Pids, &mounts, &groups).unwrap_err();
        assert!(
            e.to_string().starts_with("no cgroup pids controller"),
            "{e}"
        );
    }

    /// Whether real cgroup tests can run; prints why not.
    fn can_run(limits: &Limits) -> bool {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: creating cgroups needs root");
            return false;
        }
        for c in limits.controllers() {
            if let Err(e) = locate(c) {
                eprintln!("skipped: {e}");
                return false;
            }
        }
        true
    }

    fn name(test: &str) -> String {
        format!("test-{}-{test}", std::process::id())
    }

    /// A shell that waits for a line on stdin before running `script`, so it can be moved into
    /// the group before it does anything.
    fn gated_shell(script: &str) -> Child {
        Command::new("sh")
            .arg("-c")
            .arg(format!("read go; {script}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn release(child: &mut Child) {
        child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    }

    fn procs(cg: &VmCgroup) -> Vec<String> {
        cg.paths()
            .iter()
            .map(|p| read_small(&p.join("cgroup.procs")).unwrap())
            .collect()
    }

    #[test]
    fn limits_are_written_and_processes_move_in() {
        let limits = Limits {
            memory_max: Some(64 * MIB),
            cpu_max: Some(0.5),
            pids_max: Some(32),
        };
        if !can_run(&limits) {
            return;
        }
        let cg = VmCgroup::create(&name("files"), &limits).unwrap().unwrap();
        let mut child = gated_shell("sleep 5");
        let pid = child.id() as libc::pid_t;
        cg.add_process(pid).unwrap();
        for list in procs(&cg) {
            assert_eq!(list.trim(), pid.to_string());
        }
        let mut seen = Vec::new();
        for d in &cg.dirs {
            for c in &d.controllers {
                let (file, want) = match (c, d.version) {
                    (Controller::Memory, Version::V1) => {
                        ("memory.limit_in_bytes", (64 * MIB).to_string())
                    }
                    (Controller::Memory, Version::V2) => ("memory.max", (64 * MIB).to_string()),
                    (Controller::Cpu, Version::V1) => ("cpu.cfs_quota_us", "50000".to_string()),
                    (Controller::Cpu, Version::V2) => ("cpu.max", "50000 100000".to_string()),
                    (Controller::Pids, _) => ("pids.max", "32".to_string()),
                };
                assert_eq!(read_small(&d.path.join(file)).unwrap().trim(), want);
                seen.push(*c);
            }
        }
        seen.sort_by_key(|c| c.name());
        assert_eq!(
            seen,
            [Controller::Cpu, Controller::Memory, Controller::Pids]
        );
        assert!(cg.describe().contains(&name("files")), "{}", cg.describe());
        assert!(!cg.oom_killed());
        // The name is taken while the group holds a process.
        let e = VmCgroup::create(&name("files"), &limits).unwrap_err();
        assert!(matches!(e, CgroupError::AlreadyExists(_)), "{e}");

        child.kill().unwrap();
        child.wait().unwrap();
        let paths: Vec<PathBuf> = cg.paths().iter().map(|p| p.to_path_buf()).collect();
        cg.remove();
        for p in paths {
            assert!(!p.exists(), "{} was left behind", p.display());
        }
    }

    #[test]
    fn allocating_past_memory_max_is_oom_killed() {
        let limits = Limits {
            memory_max: Some(32 * MIB),
            ..Limits::default()
        };
        if !can_run(&limits) {
            return;
        }
        let cg = VmCgroup::create(&name("oom"), &limits).unwrap().unwrap();
        // dd's 128 MiB buffer is filled by read(2): every page is touched and charged.
        let mut child = gated_shell("exec dd if=/dev/zero of=/dev/null bs=128M count=1");
        cg.add_process(child.id() as libc::pid_t).unwrap();
        assert!(!cg.oom_killed());
        release(&mut child);
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        assert!(cg.oom_killed());
        let paths: Vec<PathBuf> = cg.paths().iter().map(|p| p.to_path_buf()).collect();
        drop(cg);
        assert!(paths.iter().all(|p| !p.exists()));
    }

    #[test]
    fn the_same_allocation_fits_without_the_limit() {
        // The control for the OOM test: dd itself succeeds when the group allows it.
        let limits = Limits {
            memory_max: Some(512 * MIB),
            ..Limits::default()
        };
        if !can_run(&limits) {
            return;
        }
        let cg = VmCgroup::create(&name("fits"), &limits).unwrap().unwrap();
        let mut child = gated_shell("exec dd if=/dev/zero of=/dev/null bs=128M count=1");
        cg.add_process(child.id() as libc::pid_t).unwrap();
        release(&mut child);
        assert!(child.wait().unwrap().success());
        assert!(!cg.oom_killed());
    }

    #[test]
    fn pids_max_stops_forks() {
        let limits = Limits {
            pids_max: Some(1),
            ..Limits::default()
        };
        if !can_run(&limits) {
            return;
        }
        let cg = VmCgroup::create(&name("pids"), &limits).unwrap().unwrap();
        // `true` runs as a forked child: with one process allowed (the shell) the fork fails.
        let mut child = gated_shell("/bin/true && echo forked");
        cg.add_process(child.id() as libc::pid_t).unwrap();
        release(&mut child);
        let out = child.wait_with_output().unwrap();
        assert!(!String::from_utf8_lossy(&out.stdout).contains("forked"));
        assert!(!out.status.success());
        assert!(cg.pids_max_hits() >= 1);
    }
}
