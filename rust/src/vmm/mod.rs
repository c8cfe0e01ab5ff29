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
//! | `0x9fc00..0xa0000`           | MP table: vCPUs, I/O APIC, interrupt routing           |
//! | `0x100000..`                 | kernel (ELF physical addresses) / raw binary (default) |
//! | top of low RAM               | initramfs                                              |
//! | `0xd000_0000..`              | virtio-mmio devices, 4 KiB apart, GSI 5, 6, ... 23     |
//! | `0xc000_0000..0x1_0000_0000` | never RAM (MMIO hole); RAM above 3 GiB moves to 4 GiB  |
//!
//! Legacy I/O ports: COM1 8250 at `0x3f8` (IRQ 4), i8042 at `0x60`/`0x64` (command `0xfe` on
//! `0x64` resets, which ends the VM as `Reset`), a power-off port at `0x501` (a write of value `N`
//! ends the VM as `PowerOff(N)`), and a pvpanic port at `0x505` (bit 0 written ends it as `Panic`).

pub mod boot;
pub mod builder;
pub mod bus;
pub mod config;
pub mod control;
pub mod cpuid;
pub mod memory;
pub mod mptable;
pub mod persist;
pub mod vcpu;
pub mod vcpu_setup;
pub mod vm;

pub use builder::{Vmm, VmmError};
pub use config::{
    BootSource, CpuTemplateChoice, DiskConfig, MachineConfig, MountConfig, NetConfig, RawMode,
    DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, MAX_MEMORY_MIB, MAX_VCPUS,
};
pub use control::Outcome;
pub use cpuid::CpuTemplate;
pub use memory::MemoryBacking;

/// Formats an OS error without Rust's " (os error N)" suffix, for one-line messages.
pub(crate) fn os_msg(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}
