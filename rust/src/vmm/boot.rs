//! Loading what the guest boots into guest RAM: an ELF `vmlinux` through PVH (with its initramfs,
//! command line and `hvm_start_info`), or a flat binary. The [`EntryPoint`] it returns is turned
//! into the boot vCPU's registers by [`super::vcpu_setup`].

use std::fs::File;
use std::path::Path;

use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::memory::{layout, MMIO_HOLE_START};
use super::{os_msg, RawMode};

/// Raw long mode: PML4, then the PDPT, then four page directories (identity map of 4 GiB).
pub const PML4_ADDR: u64 = 0x1000;
const PDPT_ADDR: u64 = 0x2000;
const PD_ADDR: u64 = 0x3000;
const PAGE_TABLES_END: u64 = 0x7000;
/// PVH structures.
pub const PVH_INFO_ADDR: u64 = 0x6000;
const PVH_MODLIST_ADDR: u64 = 0x6040;
const PVH_MEMMAP_ADDR: u64 = 0x7000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line (x86 Linux's COMMAND_LINE_SIZE, including the NUL).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the extended BIOS data area; RAM below it is usable, up to 1 MiB is reserved.
pub(super) const EBDA_START: u64 = 0x9fc00;
const HIGH_MEM_START: u64 = 0x10_0000;

const PVH_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel image {0} not found")]
    KernelNotFound(String),
    #[error("cannot open kernel image {path}: {msg}")]
    KernelOpen { path: String, msg: String },
    #[error("kernel image {0} is not an ELF vmlinux (a bzImage must be unpacked first)")]
    NotElf(String),
    #[error("cannot load kernel image {path}: {msg}")]
    KernelLoad { path: String, msg: String },
    #[error("vmlinux {0} has no PVH entry note (build it with CONFIG_PVH=y)")]
    NoPvh(String),
    #[error("initramfs {0} not found")]
    InitramfsNotFound(String),
    #[error("cannot read initramfs {path}: {msg}")]
    InitramfsRead { path: String, msg: String },
    #[error(
        "initramfs ({size} bytes) does not fit in guest RAM above the kernel; raise memory_mib"
    )]
    InitramfsTooBig { size: u64 },
    #[error("kernel command line is {len} bytes, the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("raw image {0} not found")]
    RawNotFound(String),
    #[error("cannot read raw image {path}: {msg}")]
    RawRead { path: String, msg: String },
    #[error("raw image {path} ({size} bytes at {addr:#x}) does not fit: {why}")]
    RawPlacement {
        path: String,
        size: u64,
        addr: u64,
        why: &'static str,
    },
    #[error("writing boot data to guest memory failed: {0}")]
    Memory(String),
}

fn mem_err(e: impl std::fmt::Display) -> BootError {
    BootError::Memory(e.to_string())
}

/// Where and how the first vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// 32-bit protected mode, paging off, `%ebx` = `hvm_start_info`.
    Pvh { entry: u64 },
    /// 64-bit long mode with the identity map.
    Long { entry: u64 },
    /// Real mode at `segment:0`.
    Real { segment: u16 },
}

/// End of RAM below the MMIO hole.
fn low_ram_end(ram_size: u64) -> u64 {
    ram_size.min(MMIO_HOLE_START)
}

/// Loads `vmlinux` (and the initramfs and command line) for PVH boot and writes `hvm_start_info`.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
) -> Result<EntryPoint, BootError> {
    let path = kernel.display().to_string();
    let mut file = File::open(kernel).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            BootError::KernelNotFound(path.clone())
        } else {
            BootError::KernelOpen {
                path: path.clone(),
                msg: os_msg(&e),
            }
        }
    })?;
    let mut magic = [0u8; 4];
    let is_elf = std::io::Read::read_exact(&mut file, &mut magic).is_ok() && magic == *b"\x7fELF";
    if !is_elf {
        return Err(BootError::NotElf(path));
    }
    let loaded = Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_MEM_START))).map_err(
        |e| match e {
            linux_loader::loader::Error::Elf(
                linux_loader::loader::elf::Error::InvalidElfMagicNumber,
            ) => BootError::NotElf(path.clone()),
            other => BootError::KernelLoad {
                path: path.clone(),
                msg: other.to_string(),
            },
        },
    )?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.0,
        _ => return Err(BootError::NoPvh(path)),
    };

    // Command line.
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX - 1,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(mem_err)?;

    // Initramfs at the top of low RAM, page aligned, above the kernel.
    let mut modules = Vec::new();
    if let Some(initrd) = initramfs {
        let ipath = initrd.display().to_string();
        let data = std::fs::read(initrd).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                BootError::InitramfsNotFound(ipath.clone())
            } else {
                BootError::InitramfsRead {
                    path: ipath.clone(),
                    msg: os_msg(&e),
                }
            }
        })?;
        let size = data.len() as u64;
        let kernel_end = (loaded.kernel_end + 0xfff) & !0xfff;
        let top = low_ram_end(ram_size);
        let addr = top
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= kernel_end.max(HIGH_MEM_START))
            .ok_or(BootError::InitramfsTooBig { size })?;
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(mem_err)?;
        modules.push((addr, size));
    }

    // Memory map.
    let mut memmap: Vec<(u64, u64, u32)> = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIGH_MEM_START - EBDA_START, E820_RESERVED),
    ];
    for (gpa, len, _) in layout(ram_size) {
        if gpa == 0 {
            memmap.push((HIGH_MEM_START, len - HIGH_MEM_START, E820_RAM));
        } else {
            memmap.push((gpa, len, E820_RAM));
        }
    }
    let mut table = Vec::new();
    for (addr, size, kind) in &memmap {
        table.extend_from_slice(&addr.to_le_bytes());
        table.extend_from_slice(&size.to_le_bytes());
        table.extend_from_slice(&kind.to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes());
    }
    mem.write_slice(&table, GuestAddress(PVH_MEMMAP_ADDR))
        .map_err(mem_err)?;
    let mut modlist = Vec::new();
    for (addr, size) in &modules {
        modlist.extend_from_slice(&addr.to_le_bytes());
        modlist.extend_from_slice(&size.to_le_bytes());
        modlist.extend_from_slice(&0u64.to_le_bytes());
        modlist.extend_from_slice(&0u64.to_le_bytes());
    }
    mem.write_slice(&modlist, GuestAddress(PVH_MODLIST_ADDR))
        .map_err(mem_err)?;

    // hvm_start_info (56 bytes).
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&PVH_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&(modules.len() as u32).to_le_bytes());
    info.extend_from_slice(
        &(if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_ADDR
        })
        .to_le_bytes(),
    );
    info.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes()); // rsdp
    info.extend_from_slice(&PVH_MEMMAP_ADDR.to_le_bytes());
    info.extend_from_slice(&(memmap.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    debug_assert_eq!(info.len(), 56);
    mem.write_slice(&info, GuestAddress(PVH_INFO_ADDR))
        .map_err(mem_err)?;
    Ok(EntryPoint::Pvh { entry })
}

/// Copies a flat binary to `load_addr` and, for long mode, writes the identity page tables.
pub fn load_raw(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    image: &Path,
    load_addr: u64,
    mode: RawMode,
) -> Result<EntryPoint, BootError> {
    let path = image.display().to_string();
    let data = std::fs::read(image).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            BootError::RawNotFound(path.clone())
        } else {
            BootError::RawRead {
                path: path.clone(),
                msg: os_msg(&e),
            }
        }
    })?;
    let size = data.len() as u64;
    let placement = |why| BootError::RawPlacement {
        path: path.clone(),
        size,
        addr: load_addr,
        why,
    };
    let end = load_addr
        .checked_add(size)
        .ok_or_else(|| placement("the address wraps"))?;
    if end > low_ram_end(ram_size) {
        return Err(placement("it ends beyond guest RAM"));
    }
    let entry = match mode {
        RawMode::Long => {
            if load_addr < PAGE_TABLES_END {
                return Err(placement("long mode images must load at or above 0x7000"));
            }
            write_identity_map(mem)?;
            EntryPoint::Long { entry: load_addr }
        }
        RawMode::Real => {
            if !load_addr.is_multiple_of(16) || end > HIGH_MEM_START || load_addr < 0x600 {
                return Err(placement(
                    "real mode images must be 16-byte aligned between 0x600 and 1 MiB",
                ));
            }
            EntryPoint::Real {
                segment: (load_addr >> 4) as u16,
            }
        }
    };
    mem.write_slice(&data, GuestAddress(load_addr))
        .map_err(mem_err)?;
    Ok(entry)
}

fn write_identity_map(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    mem.write_obj(PDPT_ADDR | PRESENT_RW, GuestAddress(PML4_ADDR))
        .map_err(mem_err)?;
    for i in 0..4u64 {
        let pd = PD_ADDR + i * 0x1000;
        mem.write_obj(pd | PRESENT_RW, GuestAddress(PDPT_ADDR + i * 8))
            .map_err(mem_err)?;
        let mut entries = Vec::with_capacity(4096);
        for j in 0..512u64 {
            let phys = ((i << 9) + j) << 21;
            entries.extend_from_slice(&(phys | PRESENT_RW | HUGE).to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd))
            .map_err(mem_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_placement_is_checked() {
        let ram = crate::vmm::memory::GuestRam::new(2, &crate::vmm::MemoryBacking::Memfd).unwrap();
        let dir = std::env::temp_dir().join(format!("sm-raw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("img.bin");
        std::fs::write(&img, [0xf4u8; 16]).unwrap();
        assert!(load_raw(&ram.mem, ram.size, &img, 0x1000, RawMode::Long).is_err());
        assert!(load_raw(&ram.mem, ram.size, &img, 0x1ffff8, RawMode::Long).is_err());
        assert!(load_raw(&ram.mem, ram.size, &img, 0x7c08, RawMode::Real).is_err());
        assert_eq!(
            load_raw(&ram.mem, ram.size, &img, 0x7c00, RawMode::Real).unwrap(),
            EntryPoint::Real { segment: 0x7c0 }
        );
        assert_eq!(
            load_raw(&ram.mem, ram.size, &img, 0x10000, RawMode::Long).unwrap(),
            EntryPoint::Long { entry: 0x10000 }
        );
        let pml4: u64 = ram.mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        let pd3_last: u64 = ram
            .mem
            .read_obj(GuestAddress(PD_ADDR + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(pd3_last, (((3u64 << 9) + 511) << 21) | 0x83);
        assert!(matches!(
            load_kernel(&ram.mem, ram.size, &img, None, ""),
            Err(BootError::NotElf(_))
        ));
        assert!(matches!(
            load_kernel(&ram.mem, ram.size, &dir.join("nope"), None, ""),
            Err(BootError::KernelNotFound(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
