//! What a VM is made of, as the VMM takes it: [`MachineConfig`], and the defaults and limits of
//! its fields. These constants are the one owner of those facts: the snapshot format, the worker
//! protocol and the Python package (through `_core`) all read them from here.

use std::path::PathBuf;

use super::cpuid::CpuTemplate;
use super::memory::MemoryBacking;
use super::VmmError;
use crate::devices::rate_limiter::RateLimit;
use crate::devices::virtio::net::NetRateLimit;
use crate::net::EgressPolicy;

/// Guest RAM when none is asked for: enough for a Linux guest running ordinary tools.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// Largest guest RAM the VMM maps or a snapshot may describe.
pub const MAX_MEMORY_MIB: u64 = 64 << 10;
pub const DEFAULT_VCPUS: u8 = 1;
/// Most vCPUs a VM may have (and a snapshot may describe: it bounds what a restore allocates).
pub const MAX_VCPUS: u8 = 32;
/// Bytes of serial output kept in memory when none is asked for.
pub const DEFAULT_CONSOLE_CAPACITY: usize = 1 << 20;

/// Where the first vCPU starts.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum BootSource {
    /// An uncompressed ELF `vmlinux`, entered through its PVH note (32-bit protected mode,
    /// paging off, `%ebx` = physical address of `hvm_start_info`).
    Kernel {
        path: PathBuf,
        initramfs: Option<PathBuf>,
        cmdline: String,
    },
    /// A flat binary copied to `load_addr` and started there (see [`RawMode`]).
    Raw {
        path: PathBuf,
        load_addr: u64,
        mode: RawMode,
    },
}

/// CPU mode a raw binary starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RawMode {
    /// 16-bit real mode: `cs = load_addr >> 4`, `ip = 0`, `sp = 0xfff0` in the same segment;
    /// `load_addr` must be 16-byte aligned and below 1 MiB.
    Real,
    /// 64-bit long mode at CPL 0: the first 4 GiB identity-mapped with 2 MiB pages (so the
    /// virtio-mmio window is reachable), flat 64-bit code and data segments, interrupts off,
    /// `rip = load_addr`, `rsp = 0x80000`, no IDT.
    Long,
}

/// Which CPUID template to present; `Auto` picks `Compat` on emulating hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CpuTemplateChoice {
    Auto,
    Fixed(CpuTemplate),
}

/// One virtio-blk disk.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Bandwidth and operation limits of this disk (none: unlimited). On a restore, the limit
    /// of the disk given now applies (a snapshot records none).
    pub rate_limit: Option<RateLimit>,
}

/// One host folder shared with the guest (virtio-fs), which the guest mounts by its tag.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MountConfig {
    pub host_dir: PathBuf,
    /// The name the guest mounts it by (`mount -t virtiofs <tag> <dir>`): 1 to
    /// [`MAX_TAG_LEN`] ASCII letters, digits, `.`, `_` or `-`, unique in the VM.
    pub tag: String,
    pub read_only: bool,
}

/// Longest tag of a shared folder (the virtio-fs configuration space holds 36 bytes).
pub const MAX_TAG_LEN: usize = crate::devices::virtio::fs::TAG_LEN;

/// The VM's network card: where its backend listens, its MAC address, what it may reach and
/// how fast.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    /// The backend: this process's descriptor of a connected Unix stream socket (the other end
    /// is passt's). The VMM takes its own copy while the VM is built. Never serialised: a
    /// worker gets the socket itself alongside its request, never a number from the wire.
    #[serde(skip)]
    pub backend_fd: Option<std::os::fd::RawFd>,
    pub mac: [u8; 6],
    pub policy: EgressPolicy,
    #[serde(default)]
    pub rate_limit: NetRateLimit,
}

/// Everything needed to build and start a VM.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MachineConfig {
    pub boot: BootSource,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub memory_backing: MemoryBacking,
    pub disks: Vec<DiskConfig>,
    pub vsock_path: Option<PathBuf>,
    /// A network card (none: the guest has no network at all).
    pub net: Option<NetConfig>,
    /// Host folders shared with the guest. A VM with any cannot be snapshotted (yet).
    #[serde(default)]
    pub mounts: Vec<MountConfig>,
    pub console_log: Option<PathBuf>,
    /// Bytes of serial output kept in memory (the oldest are dropped first).
    pub console_capacity: usize,
    pub cpu_template: CpuTemplateChoice,
    /// Log guest writes to RAM in KVM (for [`Vmm::dirty_pages`]); costs a write fault per
    /// page per logging round.
    pub track_dirty_pages: bool,
}

impl MachineConfig {
    /// A configuration with the defaults for everything but the boot source.
    pub fn new(boot: BootSource) -> Self {
        MachineConfig {
            boot,
            memory_mib: DEFAULT_MEMORY_MIB,
            vcpus: DEFAULT_VCPUS,
            memory_backing: MemoryBacking::Memfd,
            disks: Vec::new(),
            vsock_path: None,
            net: None,
            mounts: Vec::new(),
            console_log: None,
            console_capacity: DEFAULT_CONSOLE_CAPACITY,
            cpu_template: CpuTemplateChoice::Auto,
            track_dirty_pages: false,
        }
    }

    /// Refuses a configuration outside the limits above, naming the field.
    pub fn check(&self) -> Result<(), VmmError> {
        if !(1..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(VmmError::Config(format!(
                "memory_mib must be between 1 and {MAX_MEMORY_MIB}, got {}",
                self.memory_mib
            )));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(VmmError::Config(format!(
                "vcpus must be between 1 and {MAX_VCPUS}, got {}",
                self.vcpus
            )));
        }
        if let Some(net) = &self.net {
            net.policy
                .check()
                .map_err(|e| VmmError::Config(format!("the network policy: {e}")))?;
            if net.mac[0] & 1 != 0 {
                return Err(VmmError::Config(
                    "the network card's MAC address must be a unicast address".into(),
                ));
            }
        }
        for (i, m) in self.mounts.iter().enumerate() {
            if !crate::devices::virtio::fs::device::valid_tag(&m.tag) {
                return Err(VmmError::Config(format!(
                    "the tag {:?} of the shared folder {} must be 1 to {MAX_TAG_LEN} ASCII \
                     letters, digits, '.', '_' or '-'",
                    m.tag,
                    m.host_dir.display()
                )));
            }
            if self.mounts[..i].iter().any(|o| o.tag == m.tag) {
                return Err(VmmError::Config(format!(
                    "two shared folders have the tag {:?}",
                    m.tag
                )));
            }
        }
        Ok(())
    }

    /// How many virtio-mmio devices the VM has.
    pub fn virtio_device_count(&self) -> usize {
        self.disks.len()
            + usize::from(self.vsock_path.is_some())
            + usize::from(self.net.is_some())
            + self.mounts.len()
    }
}
