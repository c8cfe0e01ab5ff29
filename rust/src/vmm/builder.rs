//! Assembles a running VM: the boot path ([`Vmm::start_with`]) and the building blocks it shares
//! with the restore path (`Vmm::restore_with` in [`super::persist`]): memory, the VM and its
//! irqchip, devices, vCPUs, and the launch of the vCPU threads.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::boot::{self, BootError, EntryPoint};
use super::bus::{Bus, SharedDevice};
use super::control::{Outcome, VmControl};
use super::cpuid::CpuTemplate;
use super::memory::{GuestRam, MemoryError};
use super::mptable::{self, MpTableError};
use super::persist;
use super::vcpu::{self, ExitStats, SharedVcpu, VcpuContext};
use super::vcpu_setup::{self, VcpuSetupError};
use super::vm::{self, VmError};
use super::{os_msg, BootSource, CpuTemplateChoice, MachineConfig};
use crate::devices::legacy::{
    ConsoleBuffer, I8042Data, PowerOffPort, PvPanic, SerialConsole, I8042,
};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::fs::{Fs, FsError};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_LEN};
use crate::devices::virtio::net::{Net, NetCounters, NetError};
use crate::devices::virtio::vsock::{Vsock, VsockError};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::snapshot::{DeviceState, SnapshotError};

/// First virtio-mmio window; devices follow every [`MMIO_LEN`] bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// GSI of the first virtio device; the next ones count up.
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// Virtio devices get the I/O APIC pins from [`VIRTIO_FIRST_GSI`] up (the MP table routes
/// every pin; lines 0..=4 are the PIT, i8042, cascade and serial ones).
pub const VIRTIO_MAX_DEVICES: usize = mptable::IO_APIC_PINS as usize - VIRTIO_FIRST_GSI as usize;

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
    VcpuSetup(#[from] VcpuSetupError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Fs(#[from] FsError),
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
            | VmmError::Fs(FsError::NotFound(_))
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
            | VmmError::Block(BlockError::RateLimit { .. })
            | VmmError::Net(NetError::RateLimit(_)) => ErrorClass::Value,
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
            | VmmError::Fs(FsError::Open { .. } | FsError::Thread { .. })
            | VmmError::Vsock(_)
            | VmmError::Net(NetError::Backend(_) | NetError::Worker(_))
            | VmmError::ConsoleLog { .. } => ErrorClass::Os,
            VmmError::Config(_)
            | VmmError::Fs(FsError::NotADirectory(_) | FsError::BadTag(_))
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
    /// For a disk or a shared folder: whether the guest may only read it.
    pub read_only: bool,
}

/// Timestamps of the start-up, for measurements.
#[derive(Debug, Clone, Copy)]
pub struct BootTimes {
    pub started: Instant,
    /// When `Vmm::start` (or `Vmm::restore`) had everything built and the vCPU threads released.
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
    pub(super) config: MachineConfig,
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
pub(super) struct Phases {
    last: Instant,
    out: Vec<(&'static str, f64)>,
}

impl Phases {
    pub(super) fn new(start: Instant) -> Self {
        Phases {
            last: start,
            out: Vec::new(),
        }
    }

    pub(super) fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.out.push((name, (now - self.last).as_secs_f64()));
        self.last = now;
    }

    pub(super) fn done(self) -> Vec<(&'static str, f64)> {
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

fn eventfd() -> Result<EventFd, VmmError> {
    EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| VmmError::Setup(format!("cannot create an eventfd: {}", os_msg(&e))))
}

/// A hook run once before the guest starts: the VM is complete (devices, including the vsock
/// device's thread, and every vCPU's state) and every vCPU thread has been spawned, but none
/// can pass the start barrier that precedes its first `KVM_RUN` until the hook returns, so no
/// guest instruction has run. A thread may still be setting itself up (signal mask, name,
/// registration) while the hook runs. The place to give up what the guest must never reach.
/// Its error fails the start, after the vCPU threads are joined.
pub type BeforeRun<'a> = &'a mut dyn FnMut() -> Result<(), VmmError>;

/// Checks the limits of `config`, then opens KVM and maps guest RAM: the first phase of every
/// start.
pub(super) fn open_memory(config: &MachineConfig) -> Result<(Kvm, GuestRam), VmmError> {
    config.check()?;
    let device_count = config.virtio_device_count();
    if device_count > VIRTIO_MAX_DEVICES {
        return Err(VmmError::Config(format!(
            "at most {VIRTIO_MAX_DEVICES} virtio devices are supported, got {device_count}"
        )));
    }
    vcpu::install_kick_handler().map_err(VmmError::Setup)?;
    let kvm = vm::open_kvm()?;
    let ram = GuestRam::new(config.memory_mib, &config.memory_backing)?;
    Ok((kvm, ram))
}

/// The VM itself (with its in-kernel irqchip and PIT), its RAM, and the state its devices and
/// vCPU threads share.
pub(super) struct Machine {
    pub kvm: Kvm,
    pub vm: VmFd,
    pub ram: GuestRam,
    pub template: CpuTemplate,
    pub control: Arc<VmControl>,
    pub console: Arc<ConsoleBuffer>,
    pub stats: Arc<ExitStats>,
}

impl Machine {
    /// Creates the VM over `ram`, with the CPU template `config` asks for.
    pub fn new(kvm: Kvm, ram: GuestRam, config: &MachineConfig) -> Result<Machine, VmmError> {
        let vm = vm::create_vm(&kvm, &ram, config.track_dirty_pages)?;
        let template = match config.cpu_template {
            CpuTemplateChoice::Auto => CpuTemplate::detect(),
            CpuTemplateChoice::Fixed(t) => t,
        };
        Ok(Machine {
            kvm,
            vm,
            ram,
            template,
            control: Arc::new(VmControl::new(vcpu::kick_signal())),
            console: Arc::new(ConsoleBuffer::new(config.console_capacity.max(1))),
            stats: Arc::new(ExitStats::default()),
        })
    }

    /// Creates `count` vCPUs, each with its CPUID, MSRs, FPU and LAPIC set up, then handed to
    /// `load` (boot registers, or saved state) before the next one is created, the order KVM
    /// has always seen here (TSC writes are matched against vCPU creation).
    pub fn create_vcpus(
        &self,
        count: u8,
        mut load: impl FnMut(u8, &VcpuFd) -> Result<(), VmmError>,
    ) -> Result<Vec<SharedVcpu>, VmmError> {
        let mut fds = Vec::with_capacity(usize::from(count));
        for index in 0..count {
            let fd = self
                .vm
                .create_vcpu(u64::from(index))
                .map_err(setup_err("KVM_CREATE_VCPU"))?;
            vcpu_setup::setup_vcpu(&self.kvm, &fd, self.template, index, count)?;
            load(index, &fd)?;
            fds.push(Arc::new(Mutex::new(fd)));
        }
        Ok(fds)
    }
}

/// The devices of a VM: legacy ones on the port bus, virtio-mmio ones (disks, vsock, network
/// card, shared folders) on the MMIO bus.
pub(super) struct Devices {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub serial: Arc<Mutex<SerialConsole>>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub info: Vec<DeviceInfo>,
}

impl Devices {
    /// Opens and wires the devices `config` names; with `saved`, each starts from the state a
    /// snapshot recorded (which must list the same virtio devices).
    pub fn build(
        m: &Machine,
        config: &MachineConfig,
        saved: Option<&DeviceState>,
    ) -> Result<Devices, VmmError> {
        let restore_err = |e: String| VmmError::Snapshot(SnapshotError::Restore(e));
        let serial_evt = eventfd()?;
        m.vm.register_irqfd(&serial_evt, SerialConsole::IRQ)
            .map_err(setup_err("KVM_IRQFD for the serial port"))?;
        let log = open_console_log(config)?;
        let (console, control) = (m.console.clone(), m.control.clone());
        let serial = match saved {
            None => SerialConsole::new(serial_evt, console, log, control),
            Some(s) => SerialConsole::from_state(&s.serial, serial_evt, console, log, control)
                .map_err(restore_err)?,
        };
        let serial = Arc::new(Mutex::new(serial));
        let pio = legacy_bus(&serial, &m.control)?;

        let virtio = open_virtio(config)?;
        if let Some(s) = saved {
            if s.transports.len() != virtio.len() {
                return Err(restore_err(format!(
                    "the snapshot has {} virtio devices, the configuration {}",
                    s.transports.len(),
                    virtio.len()
                )));
            }
        }
        let mut mmio = Bus::new();
        let mut transports = Vec::new();
        let mut info = Vec::new();
        for (i, (kind, path, read_only, dev)) in virtio.into_iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + i as u64 * MMIO_LEN;
            let gsi = VIRTIO_FIRST_GSI + i as u32;
            let evt = eventfd()?;
            m.vm.register_irqfd(&evt, gsi)
                .map_err(setup_err("KVM_IRQFD for a virtio device"))?;
            let interrupt = Arc::new(Interrupt::new(evt));
            let mem = m.ram.mem.clone();
            let transport = match saved {
                None => MmioTransport::new(dev, mem, interrupt),
                Some(s) => MmioTransport::restore(dev, mem, interrupt, &s.transports[i])
                    .map_err(restore_err)?,
            };
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(base, MMIO_LEN, transport.clone())
                .map_err(|e| VmmError::Setup(e.to_string()))?;
            transports.push(transport);
            info.push(DeviceInfo {
                kind,
                mmio_base: base,
                gsi,
                path,
                read_only,
            });
        }
        Ok(Devices {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            serial,
            transports,
            info,
        })
    }

    /// Stops the devices' own threads (vsock) once no vCPU can reach them any more.
    fn shutdown(&self) {
        for t in &self.transports {
            t.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
        }
    }
}

fn open_console_log(config: &MachineConfig) -> Result<Option<std::fs::File>, VmmError> {
    let Some(path) = &config.console_log else {
        return Ok(None);
    };
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(Some)
        .map_err(|e| VmmError::ConsoleLog {
            path: path.display().to_string(),
            msg: os_msg(&e),
        })
}

/// The port bus: serial console, i8042, the power-off port and pvpanic.
fn legacy_bus(
    serial: &Arc<Mutex<SerialConsole>>,
    control: &Arc<VmControl>,
) -> Result<Bus, VmmError> {
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
    let mut pio = Bus::new();
    for (base, len, dev) in legacy {
        pio.insert(base, len, dev)
            .map_err(|e| VmmError::Setup(e.to_string()))?;
    }
    Ok(pio)
}

/// One virtio device before it is placed: kind, host path, read-only, the device.
type VirtioSlot = (&'static str, PathBuf, bool, Box<dyn VirtioDevice>);

/// Opens the virtio backends `config` names, in device order: disks first, then vsock, then the
/// network card, then the shared folders (last, so that the devices of a VM without any keep
/// the places snapshots recorded).
fn open_virtio(config: &MachineConfig) -> Result<Vec<VirtioSlot>, VmmError> {
    let mut virtio: Vec<VirtioSlot> = Vec::new();
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
    if let Some(net) = &config.net {
        let fd = net
            .backend_fd
            .ok_or_else(|| NetError::Backend("none was given".into()))?;
        let dev = Net::new(fd, net.mac, net.policy.clone(), net.rate_limit)?;
        virtio.push(("net", PathBuf::new(), false, dev));
    }
    for m in &config.mounts {
        let dev = Fs::new(&m.host_dir, &m.tag, m.read_only)?;
        virtio.push(("fs", m.host_dir.clone(), m.read_only, dev));
    }
    Ok(virtio)
}

/// Loads what `config.boot` names into guest RAM; returns where vCPU 0 starts and the kernel
/// command line as the guest sees it (empty for a raw image).
fn load_boot_image(
    m: &Machine,
    config: &MachineConfig,
    devices: &[DeviceInfo],
) -> Result<(EntryPoint, String), VmmError> {
    match &config.boot {
        BootSource::Kernel {
            path,
            initramfs,
            cmdline,
        } => {
            let full = kernel_cmdline(cmdline, m.template, devices);
            let entry =
                boot::load_kernel(&m.ram.mem, m.ram.size, path, initramfs.as_deref(), &full)?;
            Ok((entry, full))
        }
        BootSource::Raw {
            path,
            load_addr,
            mode,
        } => Ok((
            boot::load_raw(&m.ram.mem, m.ram.size, path, *load_addr, *mode)?,
            String::new(),
        )),
    }
}

/// The caller's command line, plus the compatibility profile's parameters when that template
/// is in use (unless the caller chose CPU features itself), plus one `virtio_mmio.device=` per
/// device (the guest has no other way to find them).
fn kernel_cmdline(cmdline: &str, template: CpuTemplate, devices: &[DeviceInfo]) -> String {
    let mut full = cmdline.trim().to_string();
    if template == CpuTemplate::Compat && !full.contains("clearcpuid=") {
        full = format!("{} {full}", super::cpuid::COMPAT_KERNEL_PARAMS)
            .trim()
            .to_string();
    }
    for d in devices {
        if !full.is_empty() {
            full.push(' ');
        }
        full.push_str(&format!(
            "virtio_mmio.device=4K@{:#x}:{}",
            d.mmio_base, d.gsi
        ));
    }
    full
}

/// Spawns one thread per vCPU, runs `before_run`, then releases the threads into their
/// `KVM_RUN` loops (see [`BeforeRun`] for what holds when it runs). If spawning or
/// `before_run` fails, the threads are stopped and joined and the devices shut down before the
/// error is returned.
pub(super) fn launch(
    m: &Machine,
    devices: &Devices,
    vcpus: &[SharedVcpu],
    before_run: BeforeRun<'_>,
) -> Result<Vec<JoinHandle<()>>, VmmError> {
    let barrier = Arc::new(Barrier::new(vcpus.len() + 1));
    let mut threads = Vec::with_capacity(vcpus.len());
    for (index, fd) in vcpus.iter().enumerate() {
        let ctx = VcpuContext {
            index: index as u8,
            fd: fd.clone(),
            pio: devices.pio.clone(),
            mmio: devices.mmio.clone(),
            control: m.control.clone(),
            stats: m.stats.clone(),
            started: barrier.clone(),
        };
        match vcpu::spawn(ctx) {
            Ok(h) => threads.push(h),
            Err(e) => {
                let err = VmmError::Setup(format!("cannot start a vCPU thread: {}", os_msg(&e)));
                return Err(abandon(m, devices, &barrier, threads, vcpus.len(), err));
            }
        }
    }
    // Holding the threads at the barrier rather than parked past it (in the pause state, which
    // would also wait for their own set-up) keeps this step at a tenth of a millisecond: the
    // pause handshake measured ~2.5 ms per restore.
    if let Err(e) = before_run() {
        return Err(abandon(m, devices, &barrier, threads, vcpus.len(), e));
    }
    barrier.wait();
    Ok(threads)
}

/// Undoes a [`launch`] that cannot go on: the `threads` spawned so far (of `total`) wait at
/// `barrier`; they are told to leave, released, and joined, and the devices are shut down.
/// Returns `err`.
fn abandon(
    m: &Machine,
    devices: &Devices,
    barrier: &Arc<Barrier>,
    threads: Vec<JoinHandle<()>>,
    total: usize,
    err: VmmError,
) -> VmmError {
    m.control.finish(Outcome::Stopped);
    // The barrier waits for `total` vCPU threads and this one: stand in for the missing ones.
    for _ in threads.len()..total {
        let b = barrier.clone();
        std::thread::spawn(move || b.wait());
    }
    barrier.wait();
    for h in threads {
        let _ = h.join();
    }
    devices.shutdown();
    err
}

/// Everything a started VM is made of, for [`Vmm::assemble`].
pub(super) struct Parts {
    pub machine: Machine,
    pub devices: Devices,
    pub vcpus: Vec<SharedVcpu>,
    pub threads: Vec<JoinHandle<()>>,
    pub caps: persist::Caps,
    /// The kernel command line the guest booted with.
    pub cmdline: String,
    pub refused_msrs: usize,
    pub config: MachineConfig,
    pub started: Instant,
    pub phases: Vec<(&'static str, f64)>,
}

impl Vmm {
    /// Builds the VM described by `config` and starts its vCPUs.
    pub fn start(config: &MachineConfig) -> Result<Vmm, VmmError> {
        Self::start_with(config, &mut || Ok(()))
    }

    /// [`Vmm::start`], running `before_run` once the VM is built and every vCPU thread is
    /// spawned, before any can enter `KVM_RUN` (see [`BeforeRun`]). When it fails, the vCPU
    /// threads are stopped and joined and its error is returned.
    pub fn start_with(config: &MachineConfig, before_run: BeforeRun<'_>) -> Result<Vmm, VmmError> {
        let started = Instant::now();
        let mut phases = Phases::new(started);
        let (kvm, ram) = open_memory(config)?;
        phases.mark("memory");
        let machine = Machine::new(kvm, ram, config)?;
        phases.mark("create_vm");
        let devices = Devices::build(&machine, config, None)?;
        phases.mark("devices");
        // First, so that a raw image placed over it owns those bytes.
        mptable::write(&machine.ram.mem, config.vcpus)?;
        let (entry, cmdline) = load_boot_image(&machine, config, &devices.info)?;
        phases.mark("boot_image");
        let caps = persist::Caps::probe(&machine.kvm).map_err(VmmError::Setup)?;
        let vcpus = machine.create_vcpus(config.vcpus, |index, fd| {
            if index == 0 {
                vcpu_setup::setup_boot_regs(fd, &machine.ram.mem, entry)?;
            }
            Ok(())
        })?;
        let threads = launch(&machine, &devices, &vcpus, before_run)?;
        phases.mark("running");
        Ok(Vmm::assemble(Parts {
            machine,
            devices,
            vcpus,
            threads,
            caps,
            cmdline,
            refused_msrs: 0,
            config: config.clone(),
            started,
            phases: phases.done(),
        }))
    }

    /// Puts a started VM together (both start paths end here).
    pub(super) fn assemble(p: Parts) -> Vmm {
        let Machine {
            kvm: _,
            vm,
            ram,
            template,
            control,
            console,
            stats,
        } = p.machine;
        Vmm {
            control,
            threads: Mutex::new(p.threads),
            console,
            stats,
            transports: p.devices.transports,
            devices: p.devices.info,
            cmdline: p.cmdline,
            template,
            vsock_path: p.config.vsock_path.clone(),
            times: BootTimes {
                started: p.started,
                running: Instant::now(),
                first_run: None,
                first_console_byte: None,
            },
            config: p.config,
            serial: p.devices.serial,
            caps: p.caps,
            phases: p.phases,
            refused_msrs: p.refused_msrs,
            vcpus: p.vcpus,
            vm,
            ram,
        }
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

    /// What the network card counted (none without one).
    pub fn net_counters(&self) -> Option<NetCounters> {
        self.transports
            .iter()
            .find_map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).net_counters())
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
