//! The state a snapshot holds, and the limits a decoded state must respect. Each device's own
//! state type lives next to its device (serial port, virtio-mmio transport, virtqueue).

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Deserializer, Serialize};

pub use crate::devices::legacy::SerialRegs;
pub use crate::devices::virtio::mmio::TransportState;
pub use crate::devices::virtio::queue::QueueState;

use super::codec::{bounded, bounded_string, invalid, kvm, kvm_box, kvm_option};

/// Largest guest RAM a snapshot may describe: what the VMM maps.
pub const MAX_MEMORY_SIZE: u64 = crate::vmm::config::MAX_MEMORY_MIB << 20;
/// Most vCPUs a snapshot may describe: what the VMM builds.
pub const MAX_VCPUS: usize = crate::vmm::config::MAX_VCPUS as usize;
/// Longest kernel command line kept in a snapshot (Linux's own x86 limit is 2048 bytes).
pub const MAX_CMDLINE_LEN: usize = 4096;
/// Most MSRs one vCPU's state may hold; KVM's list of saveable MSRs has a few hundred.
pub const MAX_MSRS: usize = 4096;
/// Most virtio-mmio devices a VM has (disks, vsock, network card, shared folders), as the VMM
/// builds them.
pub const MAX_DEVICES: usize = crate::vmm::builder::VIRTIO_MAX_DEVICES;
/// Most virtqueues of one device (vsock has the most: 3).
pub const MAX_QUEUES: usize = 8;
/// Bytes the 8250's receive FIFO holds (vm-superio's FIFO size).
pub const MAX_SERIAL_FIFO: usize = 64;

/// How the VM was configured (what a restore must rebuild).
///
/// Host paths are not part of it: a restore attaches the disks, the vsock socket and the network
/// backend the caller names, never paths read from the file (which an attacker may have written).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MachineState {
    pub memory_size: u64,
    pub vcpus: u8,
    /// 0 = normal, 1 = compat CPU template.
    pub template: u8,
    #[serde(deserialize_with = "cmdline")]
    pub cmdline: String,
    pub console_capacity: u64,
    /// Whether each virtio-blk disk was read-only, in device order.
    #[serde(deserialize_with = "disks")]
    pub disks: Vec<bool>,
    /// Whether the VM had a vsock device.
    pub vsock: bool,
    /// Whether the VM had a network card.
    pub net: bool,
    /// Whether each shared host folder (virtio-fs) was read-only, in device order (after every
    /// other device). The guest had them unmounted when the snapshot was taken.
    #[serde(deserialize_with = "shares")]
    pub shares: Vec<bool>,
}

fn cmdline<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    bounded_string(d, MAX_CMDLINE_LEN, "a kernel command line")
}

fn disks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<bool>, D::Error> {
    bounded(d, MAX_DEVICES, "disks")
}

fn shares<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<bool>, D::Error> {
    bounded(d, MAX_DEVICES, "shared folders")
}

impl MachineState {
    /// How many virtio-mmio devices the VM had (disks, vsock, network card, shared folders).
    pub fn virtio_device_count(&self) -> usize {
        self.disks.len() + usize::from(self.vsock) + usize::from(self.net) + self.shares.len()
    }

    /// The values a restore relies on are in range.
    pub fn check(&self) -> Result<(), String> {
        let (memory_size, vcpus) = (self.memory_size, self.vcpus);
        if self.template > 1 {
            return Err(format!("unknown CPU template {}", self.template));
        }
        if memory_size == 0 || memory_size % (1 << 20) != 0 || memory_size > MAX_MEMORY_SIZE {
            return Err(format!(
                "the RAM size {memory_size} is not a whole number of MiB up to {} GiB",
                MAX_MEMORY_SIZE >> 30
            ));
        }
        if vcpus == 0 || usize::from(vcpus) > MAX_VCPUS {
            return Err(format!("{vcpus} vCPUs (1 to {MAX_VCPUS})"));
        }
        if self.virtio_device_count() > MAX_DEVICES {
            return Err(format!("more than {MAX_DEVICES} virtio devices"));
        }
        Ok(())
    }
}

/// VM-wide KVM state: interrupt controllers, PIT, clock.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmState {
    #[serde(deserialize_with = "kvm")]
    pub pic_master: kvm_irqchip,
    #[serde(deserialize_with = "kvm")]
    pub pic_slave: kvm_irqchip,
    #[serde(deserialize_with = "kvm")]
    pub ioapic: kvm_irqchip,
    #[serde(deserialize_with = "kvm")]
    pub pit: kvm_pit_state2,
    #[serde(deserialize_with = "kvm")]
    pub clock: kvm_clock_data,
}

/// The floating-point state: XSAVE area when KVM offers it, else the legacy FPU block.
#[derive(Debug, Serialize, Deserialize)]
pub enum FpuState {
    Xsave(#[serde(deserialize_with = "kvm_box")] Box<kvm_xsave>),
    Fpu(#[serde(with = "super::codec::boxed_fpu")] Box<kvm_fpu>),
}

impl Default for FpuState {
    fn default() -> Self {
        FpuState::Fpu(Box::default())
    }
}

/// One vCPU.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct VcpuState {
    #[serde(deserialize_with = "kvm")]
    pub regs: kvm_regs,
    #[serde(deserialize_with = "kvm")]
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    #[serde(deserialize_with = "kvm_option")]
    pub xcrs: Option<kvm_xcrs>,
    /// (index, value) of every MSR KVM lists as saveable and lets us read.
    #[serde(deserialize_with = "msrs")]
    pub msrs: Vec<(u32, u64)>,
    #[serde(deserialize_with = "kvm")]
    pub lapic: kvm_lapic_state,
    #[serde(deserialize_with = "kvm")]
    pub events: kvm_vcpu_events,
    #[serde(deserialize_with = "kvm")]
    pub debugregs: kvm_debugregs,
    #[serde(deserialize_with = "kvm")]
    pub mp_state: kvm_mp_state,
    /// Guest TSC frequency in kHz (0 when KVM could not tell).
    pub tsc_khz: u32,
}

fn msrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u32, u64)>, D::Error> {
    bounded(d, MAX_MSRS, "MSRs in one vCPU")
}

/// The vCPU list of a snapshot: 1 to [`MAX_VCPUS`] states.
pub fn vcpus<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<VcpuState>, D::Error> {
    let v = bounded(d, MAX_VCPUS, "vCPUs")?;
    if v.is_empty() {
        return Err(invalid("no vCPU state".into()));
    }
    Ok(v)
}

/// Device state. The i8042, power-off and pvpanic ports keep no state.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DeviceState {
    pub serial: SerialRegs,
    #[serde(deserialize_with = "transports")]
    pub transports: Vec<TransportState>,
}

fn transports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<TransportState>, D::Error> {
    bounded(d, MAX_DEVICES, "virtio devices")
}
