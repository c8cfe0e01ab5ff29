//! Per-vCPU set-up before a vCPU first runs: CPUID, MSRs, FPU and LAPIC LINT pins for every
//! vCPU (booted or restored), and the boot vCPU's registers and GDT for an [`EntryPoint`].

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::{EntryPoint, PML4_ADDR, PVH_INFO_ADDR};
use super::cpuid::{self, CpuTemplate};
use super::os_msg;

/// Boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Raw long mode: initial stack pointer.
pub const RAW_STACK_TOP: u64 = 0x80000;

/// Why a vCPU could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum VcpuSetupError {
    #[error("vCPU {index}: KVM {what} failed: {msg}")]
    Kvm {
        index: u8,
        what: &'static str,
        msg: String,
    },
    /// The boot GDT lives in guest RAM.
    #[error("writing boot data to guest memory failed: {0}")]
    Gdt(String),
}

/// A GDT descriptor from access/flags bits (`flags` = 0xF0FF mask layout), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let limit = ((entry >> 32) & 0x000f_0000) as u32 | (entry & 0xffff) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

fn vcpu_err(index: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuSetupError {
    move |e| VcpuSetupError::Kvm {
        index,
        what,
        msg: os_msg(&std::io::Error::from_raw_os_error(e.errno())),
    }
}

/// Sets the boot vCPU's registers for `entry`, writing the GDT it needs.
pub fn setup_boot_regs(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
) -> Result<(), VcpuSetupError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(vcpu_err(0, "KVM_GET_SREGS"))?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        EntryPoint::Real { segment } => {
            let base = u64::from(segment) << 4;
            for seg in [
                &mut sregs.cs,
                &mut sregs.ds,
                &mut sregs.es,
                &mut sregs.fs,
                &mut sregs.gs,
                &mut sregs.ss,
            ] {
                seg.base = base;
                seg.selector = segment;
                seg.limit = 0xffff;
            }
            regs.rip = 0;
            regs.rsp = 0xfff0;
        }
        EntryPoint::Pvh { .. } | EntryPoint::Long { .. } => {
            let long = matches!(entry, EntryPoint::Long { .. });
            let code = if long { 0xa09b } else { 0xc09b };
            let gdt = [
                gdt_entry(0, 0, 0),
                gdt_entry(code, 0, 0xfffff),
                gdt_entry(0xc093, 0, 0xfffff),
                gdt_entry(0x008b, 0, 0x67),
            ];
            let mut bytes = Vec::with_capacity(32);
            for e in gdt {
                bytes.extend_from_slice(&e.to_le_bytes());
            }
            mem.write_slice(&bytes, GuestAddress(GDT_ADDR))
                .map_err(|e| VcpuSetupError::Gdt(e.to_string()))?;
            sregs.gdt.base = GDT_ADDR;
            sregs.gdt.limit = (bytes.len() - 1) as u16;
            sregs.idt.base = 0;
            sregs.idt.limit = 0;
            let cs = segment_from_gdt(gdt[1], 1);
            let ds = segment_from_gdt(gdt[2], 2);
            let tr = segment_from_gdt(gdt[3], 3);
            sregs.cs = cs;
            sregs.ds = ds;
            sregs.es = ds;
            sregs.fs = ds;
            sregs.gs = ds;
            sregs.ss = ds;
            sregs.tr = tr;
            if long {
                sregs.cr3 = PML4_ADDR;
                sregs.cr4 = X86_CR4_PAE;
                sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
                sregs.efer = EFER_LME | EFER_LMA;
                if let EntryPoint::Long { entry } = entry {
                    regs.rip = entry;
                }
                regs.rsp = RAW_STACK_TOP;
                regs.rbp = RAW_STACK_TOP;
            } else {
                sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
                sregs.cr4 = 0;
                sregs.efer = 0;
                if let EntryPoint::Pvh { entry } = entry {
                    regs.rip = entry;
                }
                regs.rbx = PVH_INFO_ADDR;
            }
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(vcpu_err(0, "KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(vcpu_err(0, "KVM_SET_REGS"))?;
    Ok(())
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// CPUID, MSRs, FPU and LAPIC LINT pins of one vCPU.
pub fn setup_vcpu(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    template: CpuTemplate,
    index: u8,
    count: u8,
) -> Result<(), VcpuSetupError> {
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(vcpu_err(index, "KVM_GET_SUPPORTED_CPUID"))?;
    cpuid::apply(&mut cpuid, template, index, count);
    vcpu.set_cpuid2(&cpuid)
        .map_err(vcpu_err(index, "KVM_SET_CPUID2"))?;

    let wanted = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),          // fast strings
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
    ];
    let entries: Vec<kvm_msr_entry> = wanted
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuSetupError::Kvm {
        index,
        what: "KVM_SET_MSRS",
        msg: "too many MSRs".into(),
    })?;
    let n = vcpu
        .set_msrs(&msrs)
        .map_err(vcpu_err(index, "KVM_SET_MSRS"))?;
    if n != entries.len() {
        return Err(VcpuSetupError::Kvm {
            index,
            what: "KVM_SET_MSRS",
            msg: format!("MSR {:#x} was refused", entries[n].index),
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(vcpu_err(index, "KVM_SET_FPU"))?;

    // LINT0 = ExtINT (the PIC), LINT1 = NMI, as firmware leaves them.
    let mut lapic = vcpu.get_lapic().map_err(vcpu_err(index, "KVM_GET_LAPIC"))?;
    for (offset, mode) in [(0x350usize, 0x7u32), (0x360, 0x4)] {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[offset + i] as u8;
        }
        let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(vcpu_err(index, "KVM_SET_LAPIC"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code64 = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code64.l, code64.db, code64.g, code64.type_),
            (1, 0, 1, 0xb)
        );
        assert_eq!(
            (code64.limit, code64.selector, code64.present),
            (0xffff_ffff, 8, 1)
        );
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.db, data.s, data.type_, data.base), (1, 1, 3, 0));
        let tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((tss.limit, tss.s, tss.g), (0x67, 0, 0));
    }
}
