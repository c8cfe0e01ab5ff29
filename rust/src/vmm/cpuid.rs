//! CPUID templates applied with `KVM_SET_CPUID2`.
//!
//! * `Normal`: what the host KVM supports, minus what a microVM guest should not see
//!   (VMX/SMX, monitor/mwait, thermal and power management, perfmon, SGX, PT), with the
//!   hypervisor bit set and per-vCPU APIC IDs.
//! * `Compat`: `Normal`, plus what emulating hosts (a software nested hypervisor that runs
//!   guest kernel code through an instruction emulator) cannot run: the `GenuineIntel` vendor
//!   string, and no XSAVE (so no AVX family), SMAP, SMEP, PKU/OSPKE, FSGSBASE, RDPID, RDRAND,
//!   RDSEED, POPCNT, SERIALIZE, PCID, INVPCID, CX16, MOVBE, BMI1, BMI2, ERMS, FSRM, LA57,
//!   WAITPKG, MOVDIRI, MOVDIR64B, CLFLUSHOPT, CLWB; and no paravirtual feature that is used
//!   through a hypercall (see [`KVM_HYPERCALL_FEATURES`]).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// glibc's tunable that keeps its string and memory routines off AVX. On emulating hosts guest
/// *user* code runs natively and sees the host's AVX state enabled (CPUID.OSXSAVE = 1, XCR0 with
/// AVX and AVX-512 bits), while the guest kernel, booted with `noxsave` because it cannot run
/// `xrstor`, context-switches only x87/SSE state: AVX registers would leak between guest
/// processes and corrupt, e.g., a `memcpy` that is preempted. `AVX_Fast_Unaligned_Load` is the
/// preference that selects the AVX `memcpy`/`memmove`; clearing the AVX features alone leaves it
/// set. Both spellings (glibc >= 2.33 and 2.26-2.32) are given; unknown names are ignored.
macro_rules! compat_glibc_tunables {
    () => {
        "glibc.cpu.hwcaps=-AVX_Fast_Unaligned_Load,-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,\
-AVX512DQ,-AVX512CD,-AVX_VNNI,-FMA,-FMA4,-F16C,-AVX_Usable,-AVX2_Usable,-AVX512F_Usable,-AVX512VL_Usable,-AVX512BW_Usable,\
-AVX512DQ_Usable,-FMA_Usable,-FMA4_Usable,-F16C_Usable"
    };
}

/// The `GLIBC_TUNABLES` value for processes in a `Compat` guest (see `compat_glibc_tunables`).
pub const COMPAT_GLIBC_TUNABLES: &str = compat_glibc_tunables!();

/// Kernel parameters that hide the same features from a Linux guest. Emulating hosts do not
/// honour every `KVM_SET_CPUID2` mask (measured: the vendor string and CX16 are applied, XSAVE,
/// POPCNT, SMAP and friends still show), so with `Compat` the VMM also passes these. The last one
/// is not a kernel parameter: the kernel hands it to init (the guest agent) as an environment
/// variable, which keeps the agent's own glibc off AVX.
pub const COMPAT_KERNEL_PARAMS: &str = concat!(
    "noxsave clearcpuid=smap,smep,pku,ospke,fsgsbase,rdpid,rdrand,rdseed,popcnt,serialize,pcid,\
invpcid,cx16,movbe,bmi1,bmi2,erms,fsrm,la57,waitpkg,movdiri,movdir64b,clflushopt,clwb \
GLIBC_TUNABLES=",
    compat_glibc_tunables!()
);

/// A CPUID template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CpuTemplate {
    Normal,
    Compat,
}

impl CpuTemplate {
    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::Normal => "normal",
            CpuTemplate::Compat => "compat",
        }
    }

    /// `Compat` on hosts whose KVM emulates guest kernel code (kvm_pvm), else `Normal`.
    pub fn detect() -> Self {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            CpuTemplate::Compat
        } else {
            CpuTemplate::Normal
        }
    }
}

const fn bit(n: u32) -> u32 {
    1 << n
}

/// KVM's paravirtual feature leaf: EAX holds the `KVM_FEATURE_*` bits.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// The paravirtual features a guest uses through a hypercall instruction: PV_UNHALT (its
/// spinlock kick, bit 7), PV_SEND_IPI (11), PV_SCHED_YIELD (13) and HC_MAP_GPA_RANGE (16).
/// `Compat` hides them: it tells the guest it runs on Intel, so the guest issues `vmcall`, and on
/// an AMD host KVM answers that by rewriting the instruction in guest memory, which faults once
/// the guest kernel has made its text read-only (measured: a 4-vCPU guest oopsed in its first
/// paravirtual IPI, or hung with IPIs that never arrived). IPIs then go through the local APIC.
const KVM_HYPERCALL_FEATURES: u32 = bit(7) | bit(11) | bit(13) | bit(16);

// Leaf 1 ECX.
const L1_ECX_DTES64: u32 = bit(2);
const L1_ECX_MONITOR: u32 = bit(3);
const L1_ECX_DS_CPL: u32 = bit(4);
const L1_ECX_VMX: u32 = bit(5);
const L1_ECX_SMX: u32 = bit(6);
const L1_ECX_EST: u32 = bit(7);
const L1_ECX_TM2: u32 = bit(8);
const L1_ECX_FMA: u32 = bit(12);
const L1_ECX_CX16: u32 = bit(13);
const L1_ECX_PDCM: u32 = bit(15);
const L1_ECX_PCID: u32 = bit(17);
const L1_ECX_MOVBE: u32 = bit(22);
const L1_ECX_POPCNT: u32 = bit(23);
const L1_ECX_XSAVE: u32 = bit(26);
const L1_ECX_OSXSAVE: u32 = bit(27);
const L1_ECX_AVX: u32 = bit(28);
const L1_ECX_F16C: u32 = bit(29);
const L1_ECX_RDRAND: u32 = bit(30);
const L1_ECX_HYPERVISOR: u32 = bit(31);
// Leaf 1 EDX.
const L1_EDX_DS: u32 = bit(21);
const L1_EDX_ACPI: u32 = bit(22);
const L1_EDX_TM: u32 = bit(29);
const L1_EDX_PBE: u32 = bit(31);
// Leaf 7.0 EBX.
const L7_EBX_FSGSBASE: u32 = bit(0);
const L7_EBX_SGX: u32 = bit(2);
const L7_EBX_BMI1: u32 = bit(3);
const L7_EBX_AVX2: u32 = bit(5);
const L7_EBX_SMEP: u32 = bit(7);
const L7_EBX_BMI2: u32 = bit(8);
const L7_EBX_ERMS: u32 = bit(9);
const L7_EBX_INVPCID: u32 = bit(10);
const L7_EBX_AVX512: u32 =
    bit(16) | bit(17) | bit(21) | bit(26) | bit(27) | bit(28) | bit(30) | bit(31);
const L7_EBX_RDSEED: u32 = bit(18);
const L7_EBX_SMAP: u32 = bit(20);
const L7_EBX_CLFLUSHOPT: u32 = bit(23);
const L7_EBX_CLWB: u32 = bit(24);
const L7_EBX_PT: u32 = bit(25);
// Leaf 7.0 ECX.
const L7_ECX_AVX512_VBMI: u32 = bit(1);
const L7_ECX_PKU: u32 = bit(3);
const L7_ECX_OSPKE: u32 = bit(4);
const L7_ECX_WAITPKG: u32 = bit(5);
const L7_ECX_AVX512_MORE: u32 = bit(6) | bit(11) | bit(12) | bit(14);
const L7_ECX_VAES: u32 = bit(9);
const L7_ECX_VPCLMULQDQ: u32 = bit(10);
const L7_ECX_LA57: u32 = bit(16);
const L7_ECX_RDPID: u32 = bit(22);
const L7_ECX_MOVDIRI: u32 = bit(27);
const L7_ECX_MOVDIR64B: u32 = bit(28);
const L7_ECX_SGX_LC: u32 = bit(30);
// Leaf 7.0 EDX.
const L7_EDX_AVX512_4: u32 = bit(2) | bit(3) | bit(8) | bit(23);
const L7_EDX_FSRM: u32 = bit(4);
const L7_EDX_SERIALIZE: u32 = bit(14);
const L7_EDX_AMX: u32 = bit(22) | bit(24) | bit(25);
// Leaf 7.1 EAX.
const L7_1_EAX_AVX_VNNI_BF16: u32 = bit(4) | bit(5);
const L7_1_EAX_FAST_STRINGS: u32 = bit(10) | bit(11) | bit(12);

/// "GenuineIntel" as leaf 0 returns it in EBX, EDX, ECX.
const INTEL_EBX: u32 = u32::from_le_bytes(*b"Genu");
const INTEL_EDX: u32 = u32::from_le_bytes(*b"ineI");
const INTEL_ECX: u32 = u32::from_le_bytes(*b"ntel");

/// Applies `template` for vCPU `index` of `count` to the host-supported `cpuid`.
pub fn apply(cpuid: &mut CpuId, template: CpuTemplate, index: u8, count: u8) {
    let compat = template == CpuTemplate::Compat;
    for e in cpuid.as_mut_slice().iter_mut() {
        apply_entry(e, compat, index, count);
    }
}

fn apply_entry(e: &mut kvm_cpuid_entry2, compat: bool, index: u8, count: u8) {
    match (e.function, e.index) {
        (0, _) if compat => {
            e.ebx = INTEL_EBX;
            e.edx = INTEL_EDX;
            e.ecx = INTEL_ECX;
        }
        (1, _) => {
            e.ecx &= !(L1_ECX_DTES64
                | L1_ECX_MONITOR
                | L1_ECX_DS_CPL
                | L1_ECX_VMX
                | L1_ECX_SMX
                | L1_ECX_EST
                | L1_ECX_TM2
                | L1_ECX_PDCM);
            e.ecx |= L1_ECX_HYPERVISOR;
            e.edx &= !(L1_EDX_DS | L1_EDX_ACPI | L1_EDX_TM | L1_EDX_PBE);
            // EBX: APIC ID in 31..24, logical processor count in 23..16, CLFLUSH size kept.
            e.ebx = (e.ebx & 0xffff) | (u32::from(count) << 16) | (u32::from(index) << 24);
            if compat {
                e.ecx &= !(L1_ECX_XSAVE
                    | L1_ECX_OSXSAVE
                    | L1_ECX_AVX
                    | L1_ECX_FMA
                    | L1_ECX_F16C
                    | L1_ECX_RDRAND
                    | L1_ECX_POPCNT
                    | L1_ECX_PCID
                    | L1_ECX_CX16
                    | L1_ECX_MOVBE);
            }
        }
        // Monitor/mwait, thermal and power management, performance monitoring, SGX, PT.
        (5, _) | (0xa, _) | (0x12, _) | (0x14, _) => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        (6, _) => {
            // Keep only ARAT (APIC timer always running).
            e.eax &= bit(2);
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        (7, 0) => {
            e.ebx &= !(L7_EBX_SGX | L7_EBX_PT);
            e.ecx &= !(L7_ECX_SGX_LC | L7_ECX_WAITPKG);
            if compat {
                e.ebx &= !(L7_EBX_FSGSBASE
                    | L7_EBX_BMI1
                    | L7_EBX_AVX2
                    | L7_EBX_SMEP
                    | L7_EBX_BMI2
                    | L7_EBX_ERMS
                    | L7_EBX_INVPCID
                    | L7_EBX_AVX512
                    | L7_EBX_RDSEED
                    | L7_EBX_SMAP
                    | L7_EBX_CLFLUSHOPT
                    | L7_EBX_CLWB);
                e.ecx &= !(L7_ECX_AVX512_VBMI
                    | L7_ECX_PKU
                    | L7_ECX_OSPKE
                    | L7_ECX_AVX512_MORE
                    | L7_ECX_VAES
                    | L7_ECX_VPCLMULQDQ
                    | L7_ECX_LA57
                    | L7_ECX_RDPID
                    | L7_ECX_MOVDIRI
                    | L7_ECX_MOVDIR64B);
                e.edx &= !(L7_EDX_AVX512_4 | L7_EDX_FSRM | L7_EDX_SERIALIZE | L7_EDX_AMX);
            }
        }
        (7, 1) if compat => {
            e.eax &= !(L7_1_EAX_AVX_VNNI_BF16 | L7_1_EAX_FAST_STRINGS);
        }
        // XSAVE state components: none without XSAVE.
        (0xd, _) if compat => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        (KVM_CPUID_FEATURES, _) if compat => {
            e.eax &= !KVM_HYPERCALL_FEATURES;
        }
        // Extended topology: the x2APIC ID of this vCPU.
        (0xb, _) | (0x1f, _) => {
            e.edx = u32::from(index);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    #[test]
    fn compat_hides_the_listed_features_and_says_genuine_intel() {
        let mut cpuid = CpuId::from_entries(&[
            entry(0, 0),
            entry(1, 0),
            entry(7, 0),
            entry(0xd, 1),
            entry(KVM_CPUID_FEATURES, 0),
        ])
        .unwrap();
        apply(&mut cpuid, CpuTemplate::Compat, 1, 2);
        let e = cpuid.as_slice();
        let vendor: Vec<u8> = [e[0].ebx, e[0].edx, e[0].ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&vendor, b"GenuineIntel");
        assert_eq!(
            e[1].ecx & (L1_ECX_XSAVE | L1_ECX_CX16 | L1_ECX_POPCNT | L1_ECX_VMX),
            0
        );
        assert_ne!(e[1].ecx & L1_ECX_HYPERVISOR, 0);
        assert_eq!(e[1].ebx >> 24, 1);
        assert_eq!(
            e[2].ebx & (L7_EBX_SMAP | L7_EBX_SMEP | L7_EBX_FSGSBASE | L7_EBX_ERMS),
            0
        );
        assert_eq!(e[2].ecx & (L7_ECX_PKU | L7_ECX_LA57 | L7_ECX_RDPID), 0);
        assert_eq!(e[2].edx & (L7_EDX_SERIALIZE | L7_EDX_FSRM), 0);
        assert_eq!(e[3].eax, 0);
        assert_eq!(e[4].eax & KVM_HYPERCALL_FEATURES, 0);
        assert_ne!(e[4].eax, 0, "the other paravirtual features stay");
    }

    #[test]
    fn normal_keeps_vendor_and_xsave() {
        let mut cpuid = CpuId::from_entries(&[
            entry(0, 0),
            entry(1, 0),
            entry(7, 0),
            entry(KVM_CPUID_FEATURES, 0),
        ])
        .unwrap();
        apply(&mut cpuid, CpuTemplate::Normal, 0, 1);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx, u32::MAX);
        assert_ne!(e[1].ecx & L1_ECX_XSAVE, 0);
        assert_eq!(e[1].ecx & L1_ECX_VMX, 0);
        assert_ne!(e[2].ebx & L7_EBX_SMAP, 0);
        assert_eq!(e[3].eax, u32::MAX, "hardware KVM keeps its hypercalls");
    }
}
