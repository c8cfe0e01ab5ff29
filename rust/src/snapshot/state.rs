//! The state a snapshot holds, and its section encodings.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

use super::codec::{DecodeError, Reader, Writer};

/// Largest guest RAM a snapshot may describe (what `GuestRam` accepts: 64 GiB).
pub const MAX_MEMORY_SIZE: u64 = 64 << 30;
/// Most vCPUs a VM may have (what the VMM builds).
pub const MAX_VCPUS: usize = 32;
/// Longest kernel command line kept in a snapshot (Linux's own x86 limit is 2048 bytes).
pub const MAX_CMDLINE_LEN: usize = 4096;
/// Most MSRs one vCPU's state may hold; KVM's list of saveable MSRs has a few hundred.
pub const MAX_MSRS: usize = 4096;
/// Most virtio-mmio devices a VM has (disks and vsock), as the VMM builds them.
pub const MAX_DEVICES: usize = crate::vmm::builder::VIRTIO_MAX_DEVICES;
/// Most virtqueues of one device (vsock has the most: 3).
pub const MAX_QUEUES: usize = 8;
/// Bytes the 8250's receive FIFO holds (vm-superio's FIFO size).
pub const MAX_SERIAL_FIFO: usize = 64;

fn bad(why: String) -> DecodeError {
    DecodeError::Bad(why)
}

/// How the VM was configured (what a restore must rebuild).
///
/// Host paths are not part of it: a restore attaches the disks and the vsock socket the caller
/// names, never paths read from the file (which an attacker may have written). Format version 2
/// files still carry the paths the VM had; they are read past and ignored, and new files store
/// empty strings in their place.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MachineState {
    pub memory_size: u64,
    pub vcpus: u8,
    /// 0 = normal, 1 = compat CPU template.
    pub template: u8,
    pub cmdline: String,
    pub console_capacity: u64,
    /// Whether each virtio-blk disk was read-only, in device order.
    pub disks: Vec<bool>,
    /// Whether the VM had a vsock device.
    pub vsock: bool,
}

impl MachineState {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.memory_size);
        w.u8(self.vcpus);
        w.u8(self.template);
        w.str(&self.cmdline);
        w.u64(self.console_capacity);
        w.u64(self.disks.len() as u64);
        for ro in &self.disks {
            w.str("");
            w.bool(*ro);
        }
        w.bool(self.vsock);
        w.str("");
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(b);
        let memory_size = r.u64()?;
        let vcpus = r.u8()?;
        let template = r.u8()?;
        let cmdline = r.str()?;
        let console_capacity = r.u64()?;
        let n = r.count(9)?;
        if n > MAX_DEVICES {
            return Err(bad(format!("{n} disks (at most {MAX_DEVICES})")));
        }
        let mut disks = Vec::with_capacity(n);
        for _ in 0..n {
            r.bytes()?; // the path the disk had (ignored)
            disks.push(r.bool()?);
        }
        let vsock = r.bool()?;
        r.bytes()?; // the vsock socket path (ignored)
        r.finish()?;
        if template > 1 {
            return Err(bad(format!("unknown CPU template {template}")));
        }
        if memory_size == 0 || memory_size % (1 << 20) != 0 || memory_size > MAX_MEMORY_SIZE {
            return Err(bad(format!(
                "the RAM size {memory_size} is not a whole number of MiB up to {} GiB",
                MAX_MEMORY_SIZE >> 30
            )));
        }
        if vcpus == 0 || usize::from(vcpus) > MAX_VCPUS {
            return Err(bad(format!("{vcpus} vCPUs (1 to {MAX_VCPUS})")));
        }
        if cmdline.len() > MAX_CMDLINE_LEN {
            return Err(bad(format!(
                "a kernel command line of {} bytes (at most {MAX_CMDLINE_LEN})",
                cmdline.len()
            )));
        }
        if n + usize::from(vsock) > MAX_DEVICES {
            return Err(bad(format!("more than {MAX_DEVICES} virtio devices")));
        }
        Ok(MachineState {
            memory_size,
            vcpus,
            template,
            cmdline,
            console_capacity,
            disks,
            vsock,
        })
    }
}

/// VM-wide KVM state: interrupt controllers, PIT, clock.
#[derive(Debug, Clone, Default)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl VmState {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.pod(&self.pic_master);
        w.pod(&self.pic_slave);
        w.pod(&self.ioapic);
        w.pod(&self.pit);
        w.pod(&self.clock);
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(b);
        let s = VmState {
            pic_master: r.pod()?,
            pic_slave: r.pod()?,
            ioapic: r.pod()?,
            pit: r.pod()?,
            clock: r.pod()?,
        };
        r.finish()?;
        Ok(s)
    }
}

/// The floating-point state: XSAVE area when KVM offers it, else the legacy FPU block.
#[derive(Debug)]
pub enum FpuState {
    Xsave(Box<kvm_xsave>),
    Fpu(Box<kvm_fpu>),
}

impl Default for FpuState {
    fn default() -> Self {
        FpuState::Fpu(Box::default())
    }
}

/// One vCPU.
#[derive(Debug, Default)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: FpuState,
    pub xcrs: Option<kvm_xcrs>,
    /// (index, value) of every MSR KVM lists as saveable and lets us read.
    pub msrs: Vec<(u32, u64)>,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
    pub mp_state: kvm_mp_state,
    /// Guest TSC frequency in kHz (0 when KVM could not tell).
    pub tsc_khz: u32,
}

pub fn encode_vcpus(vcpus: &[VcpuState]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(vcpus.len() as u64);
    for v in vcpus {
        w.pod(&v.regs);
        w.pod(&v.sregs);
        match &v.fpu {
            FpuState::Xsave(x) => {
                w.u8(1);
                w.pod(x.as_ref());
            }
            FpuState::Fpu(f) => {
                w.u8(0);
                w.pod(f.as_ref());
            }
        }
        w.bool(v.xcrs.is_some());
        if let Some(x) = &v.xcrs {
            w.pod(x);
        }
        w.u64(v.msrs.len() as u64);
        for &(i, d) in &v.msrs {
            w.u32(i);
            w.u64(d);
        }
        w.pod(&v.lapic);
        w.pod(&v.events);
        w.pod(&v.debugregs);
        w.pod(&v.mp_state);
        w.u32(v.tsc_khz);
    }
    w.buf
}

pub fn decode_vcpus(b: &[u8]) -> Result<Vec<VcpuState>, DecodeError> {
    let mut r = Reader::new(b);
    let n = r.count(64)?;
    if n == 0 || n > MAX_VCPUS {
        return Err(bad(format!("{n} vCPUs")));
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let regs = r.pod()?;
        let sregs = r.pod()?;
        let fpu = match r.u8()? {
            1 => FpuState::Xsave(Box::new(r.pod()?)),
            0 => FpuState::Fpu(Box::new(r.pod()?)),
            k => return Err(DecodeError::Bad(format!("unknown FPU state kind {k}"))),
        };
        let xcrs = if r.bool()? { Some(r.pod()?) } else { None };
        let m = r.count(12)?;
        if m > MAX_MSRS {
            return Err(bad(format!("{m} MSRs in one vCPU (at most {MAX_MSRS})")));
        }
        let mut msrs = Vec::with_capacity(m);
        for _ in 0..m {
            msrs.push((r.u32()?, r.u64()?));
        }
        out.push(VcpuState {
            regs,
            sregs,
            fpu,
            xcrs,
            msrs,
            lapic: r.pod()?,
            events: r.pod()?,
            debugregs: r.pod()?,
            mp_state: r.pod()?,
            tsc_khz: r.u32()?,
        });
    }
    r.finish()?;
    Ok(out)
}

/// One virtqueue as the transport and device last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// One virtio-mmio transport and its device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub activated: bool,
    pub interrupt_status: u32,
    pub needs_reset: bool,
    pub queues: Vec<QueueState>,
}

/// The 8250 registers (vm-superio's state).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SerialRegs {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// Device state. The i8042, power-off and pvpanic ports keep no state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceState {
    pub serial: SerialRegs,
    pub transports: Vec<TransportState>,
}

impl DeviceState {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        let s = &self.serial;
        for b in [
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ] {
            w.u8(b);
        }
        w.bytes(&s.in_buffer);
        w.u64(self.transports.len() as u64);
        for t in &self.transports {
            w.u32(t.device_type);
            w.u32(t.status);
            w.u32(t.queue_sel);
            w.u32(t.device_features_sel);
            w.u32(t.driver_features_sel);
            w.u64(t.driver_features);
            w.bool(t.activated);
            w.u32(t.interrupt_status);
            w.bool(t.needs_reset);
            w.u64(t.queues.len() as u64);
            for q in &t.queues {
                w.u16(q.max_size);
                w.u16(q.size);
                w.bool(q.ready);
                w.u64(q.desc_table);
                w.u64(q.avail_ring);
                w.u64(q.used_ring);
                w.u16(q.next_avail);
                w.u16(q.next_used);
            }
        }
        w.buf
    }

    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(b);
        let serial = SerialRegs {
            baud_divisor_low: r.u8()?,
            baud_divisor_high: r.u8()?,
            interrupt_enable: r.u8()?,
            interrupt_identification: r.u8()?,
            line_control: r.u8()?,
            line_status: r.u8()?,
            modem_control: r.u8()?,
            modem_status: r.u8()?,
            scratch: r.u8()?,
            in_buffer: r.bytes()?.to_vec(),
        };
        if serial.in_buffer.len() > MAX_SERIAL_FIFO {
            return Err(bad(format!(
                "the serial port holds {} received bytes (its FIFO holds {MAX_SERIAL_FIFO})",
                serial.in_buffer.len()
            )));
        }
        let n = r.count(40)?;
        if n > MAX_DEVICES {
            return Err(bad(format!("{n} virtio devices (at most {MAX_DEVICES})")));
        }
        let mut transports = Vec::with_capacity(n);
        for _ in 0..n {
            let mut t = TransportState {
                device_type: r.u32()?,
                status: r.u32()?,
                queue_sel: r.u32()?,
                device_features_sel: r.u32()?,
                driver_features_sel: r.u32()?,
                driver_features: r.u64()?,
                activated: r.bool()?,
                interrupt_status: r.u32()?,
                needs_reset: r.bool()?,
                queues: Vec::new(),
            };
            let m = r.count(33)?;
            if m > MAX_QUEUES {
                return Err(bad(format!(
                    "a virtio device with {m} queues (at most {MAX_QUEUES})"
                )));
            }
            for _ in 0..m {
                t.queues.push(QueueState {
                    max_size: r.u16()?,
                    size: r.u16()?,
                    ready: r.bool()?,
                    desc_table: r.u64()?,
                    avail_ring: r.u64()?,
                    used_ring: r.u64()?,
                    next_avail: r.u16()?,
                    next_used: r.u16()?,
                });
            }
            transports.push(t);
        }
        r.finish()?;
        Ok(DeviceState { serial, transports })
    }
}
