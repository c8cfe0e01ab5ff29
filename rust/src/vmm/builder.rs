//! Assembles a running VM from a [`VmConfig`]: memory, VM, devices, boot image, vCPUs.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::boot::{self, BootError};
use super::bus::{Bus, SharedDevice};
use super::control::{Outcome, VmControl};
use super::cpuid::CpuTemplate;
use super::memory::{GuestRam, MemoryError};
use super::persist;
use super::vcpu::{self, ExitStats, SharedVcpu, VcpuContext};
use super::vm::{self, VmError};
use super::{os_msg, BootSource, CpuTemplateChoice, VmConfig};
use crate::devices::legacy::{
    ConsoleBuffer, I8042Data, PowerOffPort, PvPanic, SerialConsole, I8042,
};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_LEN};
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::snapshot::{Snapshot, SnapshotError};

/// First virtio-mmio window; devices follow every [`MMIO_LEN`] bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// GSI of the first virtio device; the next ones count up.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// The legacy PIC has 16 lines; the VMM uses 5..=15 for virtio devices.
pub const VIRTIO_MAX_DEVICES: usize = 11;

/// Why a VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot open console log {path}: {msg}")]
    ConsoleLog { path: String, msg: String },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("{0}")]
    Setup(String),
}

/// How a [`VmmError`] should surface to callers that classify errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// A file that does not exist.
    NotFound,
    /// Any other operating-system level failure (permissions, I/O, /dev/kvm).
    Os,
    /// A bad value in the configuration.
    Value,
    /// KVM or the VMM itself failed.
    Runtime,
}

impl VmmError {
    pub fn class(&self) -> ErrorClass {
        match self {
            VmmError::Boot(
                BootError::KernelNotFound(_)
                | BootError::InitramfsNotFound(_)
                | BootError::RawNotFound(_),
            )
            | VmmError::Block(BlockError::NotFound(_))
            | VmmError::Snapshot(
                SnapshotError::Missing { .. } | SnapshotError::BaseMissing { .. },
            ) => ErrorClass::NotFound,
            VmmError::Snapshot(
                SnapshotError::NotASnapshot { .. }
                | SnapshotError::Base { .. }
                | SnapshotError::Truncated { .. }
                | SnapshotError::Corrupt { .. }
                | SnapshotError::Version { .. }
                | SnapshotError::Memory { .. },
            )
            | VmmError::Memory(MemoryError::SnapshotSize { .. })
            | VmmError::Block(BlockError::RateLimit { .. }) => ErrorClass::Value,
            VmmError::Snapshot(SnapshotError::Read { .. } | SnapshotError::Write { .. }) => {
                ErrorClass::Os
            }
            VmmError::Vm(VmError::OpenKvm(_))
            | VmmError::Memory(MemoryError::File { .. } | MemoryError::Truncate { .. })
            | VmmError::Boot(
                BootError::KernelOpen { .. }
                | BootError::InitramfsRead { .. }
                | BootError::RawRead { .. },
            )
            | VmmError::Block(BlockError::Open { .. })
            | VmmError::Vsock(_)
            | VmmError::ConsoleLog { .. } => ErrorClass::Os,
            VmmError::Config(_)
            | VmmError::Memory(MemoryError::BadSize(_))
            | VmmError::Boot(
                BootError::NotElf(_)
                | BootError::NoPvh(_)
                | BootError::InitramfsTooBig { .. }
                | BootError::CmdlineTooLong { .. }
                | BootError::CmdlineNul
                | BootError::RawPlacement { .. }
                | BootError::KernelLoad { .. },
            ) => ErrorClass::Value,
            _ => ErrorClass::Runtime,
        }
    }
}

/// One virtio device as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub kind: &'static str,
    pub mmio_base: u64,
    pub gsi: u32,
    pub path: PathBuf,
    /// For a disk: whether the guest may only read it.
    pub read_only: bool,
}

/// Timestamps of the start-up, for measurements.
#[derive(Debug, Clone, Copy)]
pub struct BootTimes {
    pub started: Instant,
    /// When `Vmm::start` had everything built and the vCPU threads released.
    pub running: Instant,
    /// When vCPU 0 first entered `KVM_RUN`.
    pub first_run: Option<Instant>,
    /// When the first serial byte arrived.
    pub first_console_byte: Option<Instant>,
}

/// A running VM. Dropping it stops it.
pub struct Vmm {
    pub(super) control: Arc<VmControl>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    console: Arc<ConsoleBuffer>,
    stats: Arc<ExitStats>,
    pub(super) transports: Vec<Arc<Mutex<MmioTransport>>>,
    devices: Vec<DeviceInfo>,
    cmdline: String,
    template: CpuTemplate,
    vsock_path: Option<PathBuf>,
    times: BootTimes,
    pub(super) config: VmConfig,
    pub(super) serial: Arc<Mutex<SerialConsole>>,
    pub(super) caps: persist::Caps,
    /// Seconds spent in each start-up phase, in order.
    pub(super) phases: Vec<(&'static str, f64)>,
    /// MSRs a restore could not load on this host.
    refused_msrs: usize,
    // Drop order: the vCPU and VM fds before guest RAM.
    pub(super) vcpus: Vec<SharedVcpu>,
    pub(super) vm: VmFd,
    pub(super) ram: GuestRam,
}

/// Durations of consecutive start-up phases.
struct Phases {
    last: Instant,
    out: Vec<(&'static str, f64)>,
}

impl Phases {
    fn new(start: Instant) -> Self {
        Phases {
            last: start,
            out: Vec::new(),
        }
    }

    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.out.push((name, (now - self.last).as_secs_f64()));
        self.last = now;
    }

    fn done(self) -> Vec<(&'static str, f64)> {
        self.out
    }
}

fn setup_err(what: &str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError + '_ {
    move |e| {
        VmmError::Setup(format!(
            "{what}: {}",
            os_msg(&std::io::Error::from_raw_os_error(e.errno()))
        ))
    }
}

impl Vmm {
    /// Builds the VM described by `config` and starts its vCPUs.
    pub fn start(config: &VmConfig) -> Result<Vmm, VmmError> {
        Self::build(config, None)
    }

    /// Builds a VM, either booting `config.boot` or, with `restore`, loading a snapshot's state
    /// (guest RAM must then be `MemoryBacking::Snapshot`).
    pub(super) fn build(config: &VmConfig, restore: Option<&Snapshot>) -> Result<Vmm, VmmError> {
        let started = Instant::now();
        let mut phases = Phases::new(started);
        if config.vcpus == 0 || config.vcpus > 32 {
            return Err(VmmError::Config(format!(
                "vcpus must be between 1 and 32, got {}",
                config.vcpus
            )));
        }
        let device_count = config.disks.len() + usize::from(config.vsock_path.is_some());
        if device_count > VIRTIO_MAX_DEVICES {
            return Err(VmmError::Config(format!(
                "at most {VIRTIO_MAX_DEVICES} virtio devices are supported, got {device_count}"
            )));
        }
        vcpu::install_kick_handler().map_err(VmmError::Setup)?;
        let kvm = vm::open_kvm()?;
        let ram = GuestRam::new(config.memory_mib, &config.memory_backing)?;
        phases.mark("memory");
        let vm = vm::create_vm(&kvm, &ram, config.track_dirty_pages)?;
        let template = match config.cpu_template {
            CpuTemplateChoice::Auto => CpuTemplate::detect(),
            CpuTemplateChoice::Fixed(t) => t,
        };
        let control = Arc::new(VmControl::new(vcpu::kick_signal()));
        let console = Arc::new(ConsoleBuffer::new(config.console_capacity.max(1)));
        phases.mark("create_vm");

        // Legacy devices on the port bus.
        let mut pio = Bus::new();
        let serial_evt = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmmError::Setup(format!("cannot create an eventfd: {}", os_msg(&e))))?;
        vm.register_irqfd(&serial_evt, SerialConsole::IRQ)
            .map_err(setup_err("KVM_IRQFD for the serial port"))?;
        let log = match &config.console_log {
            None => None,
            Some(path) => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| VmmError::ConsoleLog {
                        path: path.display().to_string(),
                        msg: os_msg(&e),
                    })?,
            ),
        };
        let serial = match restore {
            None => SerialConsole::new(serial_evt, console.clone(), log, control.clone()),
            Some(snap) => SerialConsole::from_state(
                &snap.devices.serial,
                serial_evt,
                console.clone(),
                log,
                control.clone(),
            )
            .map_err(|e| VmmError::Snapshot(SnapshotError::Restore(e)))?,
        };
        let serial = Arc::new(Mutex::new(serial));
        let legacy: [(u64, u64, SharedDevice); 5] = [
            (SerialConsole::PORT, SerialConsole::LEN, serial.clone()),
            (I8042::DATA_PORT, 1, Arc::new(Mutex::new(I8042Data))),
            (
                I8042::COMMAND_PORT,
                1,
                Arc::new(Mutex::new(I8042::new(control.clone()))),
            ),
            (
                PowerOffPort::PORT,
                PowerOffPort::LEN,
                Arc::new(Mutex::new(PowerOffPort::new(control.clone()))),
            ),
            (
                PvPanic::PORT,
                1,
                Arc::new(Mutex::new(PvPanic::new(control.clone()))),
            ),
        ];
        for (base, len, dev) in legacy {
            pio.insert(base, len, dev)
                .map_err(|e| VmmError::Setup(e.to_string()))?;
        }

        // virtio-mmio devices: disks first, then vsock.
        let mut mmio = Bus::new();
        let mut transports = Vec::new();
        let mut devices = Vec::new();
        let mut virtio: Vec<(&'static str, PathBuf, bool, Box<dyn VirtioDevice>)> = Vec::new();
        for disk in &config.disks {
            virtio.push((
                "blk",
                disk.path.clone(),
                disk.read_only,
                Box::new(Block::open(&disk.path, disk.read_only, disk.rate_limit)?),
            ));
        }
        if let Some(path) = &config.vsock_path {
            virtio.push(("vsock", path.clone(), false, Vsock::new(path)?));
        }
        if let Some(snap) = restore {
            if snap.devices.transports.len() != virtio.len() {
                return Err(VmmError::Snapshot(SnapshotError::Restore(format!(
                    "the snapshot has {} virtio devices, the configuration {}",
                    snap.devices.transports.len(),
                    virtio.len()
                ))));
            }
        }
        for (i, (kind, path, read_only, dev)) in virtio.into_iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * MMIO_LEN;
            let gsi = VIRTIO_FIRST_GSI + i as u32;
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| {
                VmmError::Setup(format!("cannot create an eventfd: {}", os_msg(&e)))
            })?;
            vm.register_irqfd(&evt, gsi)
                .map_err(setup_err("KVM_IRQFD for a virtio device"))?;
            let interrupt = Arc::new(Interrupt::new(evt));
            let transport = match restore {
                None => MmioTransport::new(dev, ram.mem.clone(), interrupt),
                Some(snap) => MmioTransport::restore(
                    dev,
                    ram.mem.clone(),
                    interrupt,
                    &snap.devices.transports[i],
                )
                .map_err(|e| VmmError::Snapshot(SnapshotError::Restore(e)))?,
            };
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(base, MMIO_LEN, transport.clone())
                .map_err(|e| VmmError::Setup(e.to_string()))?;
            transports.push(transport);
            devices.push(DeviceInfo {
                kind,
                mmio_base: base,
                gsi,
                path,
                read_only,
            });
        }
        phases.mark("devices");

        // Boot image, or the saved VM-wide state.
        let (mut entry, cmdline) = match (restore, &config.boot) {
            (Some(snap), _) => {
                persist::restore_vm(&vm, &snap.vm)
                    .map_err(|e| VmmError::Snapshot(SnapshotError::Restore(e)))?;
                (None, snap.machine.cmdline.clone())
            }
            (
                None,
                BootSource::Kernel {
                    path,
                    initramfs,
                    cmdline,
                },
            ) => {
                let mut full = cmdline.trim().to_string();
                if template == CpuTemplate::Compat && !full.contains("clearcpuid=") {
                    full = format!("{} {full}", super::cpuid::COMPAT_KERNEL_PARAMS)
                        .trim()
                        .to_string();
                }
                for d in &devices {
                    if !full.is_empty() {
                        full.push(' ');
                    }
                    full.push_str(&format!(
                        "virtio_mmio.device=4K@{:#x}:{}",
                        d.mmio_base, d.gsi
                    ));
                }
                let entry =
                    boot::load_kernel(&ram.mem, ram.size, path, initramfs.as_deref(), &full)?;
                (Some(entry), full)
            }
            (
                None,
                BootSource::Raw {
                    path,
                    load_addr,
                    mode,
                },
            ) => (
                Some(boot::load_raw(&ram.mem, ram.size, path, *load_addr, *mode)?),
                String::new(),
            ),
        };
        phases.mark(if restore.is_some() {
            "vm_state"
        } else {
            "boot_image"
        });

        // vCPUs.
        let pio = Arc::new(pio);
        let mmio = Arc::new(mmio);
        let stats = Arc::new(ExitStats::default());
        let barrier = Arc::new(Barrier::new(usize::from(config.vcpus) + 1));
        let caps = persist::Caps::probe(&kvm).map_err(VmmError::Setup)?;
        let mut fds = Vec::new();
        let mut refused_msrs = 0;
        for index in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(setup_err("KVM_CREATE_VCPU"))?;
            boot::setup_vcpu(&kvm, &fd, template, index, config.vcpus)?;
            match restore {
                Some(snap) => {
                    refused_msrs +=
                        persist::restore_vcpu(&fd, &snap.vcpus[usize::from(index)], &caps)
                            .map_err(|e| {
                                VmmError::Snapshot(SnapshotError::Restore(format!(
                                    "vCPU {index}: {e}"
                                )))
                            })?;
                }
                None => {
                    if let (0, Some(entry)) = (index, entry.take()) {
                        boot::setup_boot_regs(&fd, &ram.mem, entry)?;
                    }
                }
            }
            fds.push(Arc::new(Mutex::new(fd)));
        }
        if restore.is_some() {
            // Tell a kvmclock-aware guest it was stopped, so it does not report soft lockups.
            // Guests without kvmclock refuse this; that is fine.
            for fd in &fds {
                let _ = fd.lock().unwrap_or_else(|e| e.into_inner()).kvmclock_ctrl();
            }
            // Only now may devices raise interrupts: loading the irqchip and LAPIC state above
            // would have dropped them.
            for t in &transports {
                t.lock().unwrap_or_else(|e| e.into_inner()).after_restore();
            }
            phases.mark("vcpu_state");
        }
        let mut threads = Vec::new();
        for (index, fd) in fds.iter().enumerate() {
            let ctx = VcpuContext {
                index: index as u8,
                fd: fd.clone(),
                pio: pio.clone(),
                mmio: mmio.clone(),
                control: control.clone(),
                stats: stats.clone(),
                started: barrier.clone(),
            };
            match vcpu::spawn(ctx) {
                Ok(h) => threads.push(h),
                Err(e) => {
                    // Threads already spawned wait at the barrier: tell them to leave, then
                    // release them.
                    control.finish(Outcome::Stopped);
                    for _ in index..usize::from(config.vcpus) {
                        let b = barrier.clone();
                        std::thread::spawn(move || b.wait());
                    }
                    barrier.wait();
                    for h in threads {
                        let _ = h.join();
                    }
                    return Err(VmmError::Setup(format!(
                        "cannot start a vCPU thread: {}",
                        os_msg(&e)
                    )));
                }
            }
        }
        barrier.wait();
        phases.mark("running");
        Ok(Vmm {
            control,
            threads: Mutex::new(threads),
            console,
            stats,
            transports,
            devices,
            cmdline,
            template,
            vsock_path: config.vsock_path.clone(),
            times: BootTimes {
                started,
                running: Instant::now(),
                first_run: None,
                first_console_byte: None,
            },
            config: config.clone(),
            serial,
            caps,
            phases: phases.done(),
            refused_msrs,
            vcpus: fds,
            vm,
            ram,
        })
    }

    /// The outcome, or `None` while the VM runs.
    pub fn outcome(&self) -> Option<Outcome> {
        self.control.outcome()
    }

    /// Waits up to `timeout` (forever with `None`) for the VM to end.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<Outcome> {
        self.control.wait(timeout)
    }

    /// Pauses all vCPUs; returns once none is inside `KVM_RUN`.
    pub fn pause(&self) -> Result<(), String> {
        if self.control.pause(Duration::from_secs(5)) {
            Ok(())
        } else if let Some(o) = self.control.outcome() {
            Err(format!("the VM has ended ({})", o.kind()))
        } else {
            Err("the vCPUs did not pause within 5 seconds".into())
        }
    }

    pub fn resume(&self) -> Result<(), String> {
        if self.control.resume() {
            // Devices a snapshot quiesced go back to work (a no-op otherwise).
            for t in &self.transports {
                t.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .set_quiesced(false);
            }
            Ok(())
        } else {
            let kind = self.control.outcome().map_or("stopping", |o| o.kind());
            Err(format!("the VM has ended ({kind})"))
        }
    }

    /// Stops the VM (if still running) and joins its threads. Idempotent.
    pub fn stop(&self) {
        self.control.finish(Outcome::Stopped);
        let threads: Vec<_> =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        for t in &self.transports {
            t.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
        }
    }

    /// The captured serial output (the newest bytes, up to the configured capacity).
    pub fn console(&self) -> Vec<u8> {
        self.console.contents()
    }

    /// Total serial bytes the guest wrote (including any no longer kept).
    pub fn console_total(&self) -> u64 {
        self.console.total()
    }

    pub fn read_memory(&self, gpa: u64, len: usize) -> Result<Vec<u8>, String> {
        if !self.ram.contains(gpa, len) {
            return Err(format!(
                "guest range {gpa:#x}+{len:#x} is outside guest RAM ({} MiB)",
                self.ram.size >> 20
            ));
        }
        let mut buf = vec![0u8; len];
        self.ram
            .mem
            .read_slice(&mut buf, GuestAddress(gpa))
            .map_err(|e| e.to_string())?;
        Ok(buf)
    }

    pub fn write_memory(&self, gpa: u64, data: &[u8]) -> Result<(), String> {
        if !self.ram.contains(gpa, data.len()) {
            return Err(format!(
                "guest range {gpa:#x}+{:#x} is outside guest RAM ({} MiB)",
                data.len(),
                self.ram.size >> 20
            ));
        }
        self.ram
            .mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| e.to_string())
    }

    pub fn memory_size(&self) -> u64 {
        self.ram.size
    }

    pub fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    /// virtio status register of device `index` (as the guest reads it).
    pub fn device_status(&self, index: usize) -> Option<u32> {
        self.transports
            .get(index)
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).status())
    }

    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    pub fn cpu_template(&self) -> CpuTemplate {
        self.template
    }

    pub fn vsock_path(&self) -> Option<&PathBuf> {
        self.vsock_path.as_ref()
    }

    pub fn unhandled_exits(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.stats.unhandled_pio.load(Relaxed),
            self.stats.unhandled_mmio.load(Relaxed),
        )
    }

    /// Seconds spent in each start-up (or restore) phase, in order.
    pub fn phases(&self) -> &[(&'static str, f64)] {
        &self.phases
    }

    /// Guest RAM pages the guest wrote since the VM started or the previous call, one bit per
    /// 4 KiB page (least significant bit first) in RAM-file order, as KVM logged them. Writes by
    /// the VMM itself (devices, `write_memory`) are not included. Needs `track_dirty_pages`.
    pub fn dirty_pages(&self) -> Result<Vec<u8>, String> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        if !self.config.track_dirty_pages {
            return Err("dirty-page tracking is off; start the VM with track_dirty_pages".into());
        }
        let mut out = Vec::with_capacity((self.ram.size / 4096 / 8) as usize);
        for (slot, region) in self.ram.mem.iter().enumerate() {
            let pages = (region.len() / 4096) as usize;
            let words = self
                .vm
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|e| {
                    format!(
                        "KVM_GET_DIRTY_LOG failed: {}",
                        os_msg(&std::io::Error::from_raw_os_error(e.errno()))
                    )
                })?;
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            out.extend_from_slice(&bytes[..pages.div_ceil(8)]);
        }
        Ok(out)
    }

    /// MSRs that a restore could not load on this host (0 after a normal start).
    pub fn refused_msrs(&self) -> usize {
        self.refused_msrs
    }

    pub fn times(&self) -> BootTimes {
        BootTimes {
            first_run: self.stats.first_run.get().copied(),
            first_console_byte: self.console.first_byte_at(),
            ..self.times
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop();
    }
}
