//! The KVM virtual machine monitor: guest memory, VM and vCPU set-up, boot loaders, the exit
//! loop, and the buses the devices in [`crate::devices`] hang on.
//!
//! Layout (x86_64):
//!
//! | guest physical range         | use                                                    |
//! | ---------------------------- | ------------------------------------------------------ |
//! | `0x500`                      | boot GDT                                               |
//! | `0x1000..0x7000`             | raw long mode: identity page tables (PML4, PDPT, 4 PD) |
//! | `0x6000`, `0x6040`, `0x7000` | PVH: `hvm_start_info`, module list, memory map         |
//! | `0x20000`                    | PVH: kernel command line                               |
//! | `0x100000..`                 | kernel (ELF physical addresses) / raw binary (default) |
//! | top of low RAM               | initramfs                                              |
//! | `0xd000_0000..`              | virtio-mmio devices, 4 KiB apart, GSI 5, 6, ...        |
//! | `0xc000_0000..0x1_0000_0000` | never RAM (MMIO hole); RAM above 3 GiB moves to 4 GiB  |
//!
//! Legacy I/O ports: COM1 8250 at `0x3f8` (IRQ 4), i8042 at `0x60`/`0x64` (command `0xfe` on
//! `0x64` resets, which ends the VM as `Reset`), a power-off port at `0x501` (a write of value `N`
//! ends the VM as `PowerOff(N)`), and a pvpanic port at `0x505` (bit 0 written ends it as `Panic`).

pub mod boot;
pub mod builder;
pub mod bus;
pub mod control;
pub mod cpuid;
pub mod memory;
pub mod persist;
pub mod vcpu;
pub mod vcpu_setup;
pub mod vm;

use std::path::PathBuf;

pub use builder::{Vmm, VmmError};
pub use control::Outcome;
pub use cpuid::CpuTemplate;
pub use memory::MemoryBacking;

use crate::devices::rate_limiter::RateLimit;

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

/// Everything needed to build and start a VM.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    pub boot: BootSource,
    pub memory_mib: u64,
    pub vcpus: u8,
    pub memory_backing: MemoryBacking,
    pub disks: Vec<DiskConfig>,
    pub vsock_path: Option<PathBuf>,
    pub console_log: Option<PathBuf>,
    /// Bytes of serial output kept in memory (the oldest are dropped first).
    pub console_capacity: usize,
    pub cpu_template: CpuTemplateChoice,
    /// Log guest writes to RAM in KVM (for [`Vmm::dirty_pages`]); costs a write fault per
    /// page per logging round.
    pub track_dirty_pages: bool,
}

impl VmConfig {
    /// A configuration with the defaults for everything but the boot source.
    pub fn new(boot: BootSource) -> Self {
        VmConfig {
            boot,
            memory_mib: 128,
            vcpus: 1,
            memory_backing: MemoryBacking::Memfd,
            disks: Vec::new(),
            vsock_path: None,
            console_log: None,
            console_capacity: 1 << 20,
            cpu_template: CpuTemplateChoice::Auto,
            track_dirty_pages: false,
        }
    }
}

/// Formats an OS error without Rust's " (os error N)" suffix, for one-line messages.
pub(crate) fn os_msg(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
