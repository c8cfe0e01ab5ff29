//! The KVM VM file descriptor: creation, irqchip, PIT, TSS and memory slots.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestRam;
use super::os_msg;

/// Three pages KVM needs for the real-mode TSS on Intel, just below the 4 GiB boundary and
/// inside the MMIO hole, where no RAM or device lives.
pub const TSS_ADDR: u64 = 0xfffb_d000;
/// One page for the EPT identity map, right below the TSS.
pub const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("/dev/kvm is not accessible: {0}")]
    OpenKvm(String),
    #[error("KVM API version is {0}, expected 12")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    #[error("cannot create the KVM VM: {0}")]
    CreateVm(String),
    #[error("KVM {what} failed: {msg}")]
    Ioctl { what: &'static str, msg: String },
}

fn ioctl_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |e| VmError::Ioctl {
        what,
        msg: os_msg(&std::io::Error::from_raw_os_error(e.errno())),
    }
}

/// Opens `/dev/kvm` and checks the API version and the capabilities the VMM relies on.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new()
        .map_err(|e| VmError::OpenKvm(os_msg(&std::io::Error::from_raw_os_error(e.errno()))))?;
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(VmError::ApiVersion(v));
    }
    use kvm_ioctls::Cap;
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

/// Creates the VM: TSS and identity map, guest RAM slots (with KVM dirty-page logging when
/// `dirty_log` is set), in-kernel irqchip (before any vCPU) and PIT.
pub fn create_vm(kvm: &Kvm, ram: &GuestRam, dirty_log: bool) -> Result<VmFd, VmError> {
    let vm = kvm
        .create_vm()
        .map_err(|e| VmError::CreateVm(os_msg(&std::io::Error::from_raw_os_error(e.errno()))))?;
    vm.set_tss_address(TSS_ADDR as usize)
        .map_err(ioctl_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(IDENTITY_MAP_ADDR)
        .map_err(ioctl_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    for (slot, region) in ram.mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmError::Ioctl {
                what: "KVM_SET_USER_MEMORY_REGION",
                msg: e.to_string(),
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if dirty_log {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned by `ram`, which the
        // caller keeps alive for as long as the VM exists (the Vmm owns both, and drops the VM
        // fds and vCPU threads before the memory).
        unsafe { vm.set_user_memory_region(r) }.map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    vm.create_irq_chip()
        .map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(ioctl_err("KVM_CREATE_PIT2"))?;
    Ok(vm)
}
