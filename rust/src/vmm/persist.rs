//! Capturing and loading KVM state for snapshots (the file format lives in
//! [`crate::snapshot`]).

use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::builder::{self, BeforeRun, Devices, Machine, Parts, Phases, Vmm, VmmError};
use super::memory::GuestRam;
use super::{
    os_msg, BootSource, CpuTemplate, CpuTemplateChoice, DiskConfig, MachineConfig, MemoryBacking,
    MountConfig, NetConfig, RawMode,
};
use crate::snapshot::memory::{self as snapmem, BaseRef, MemoryState};
use crate::snapshot::state::FpuState;
use crate::snapshot::{
    AtomicDir, DeviceState, MachineState, Snapshot, SnapshotError, VcpuState, VmState, MEMORY_FILE,
    VMSTATE_FILE,
};

/// MSRs moved per KVM_GET_MSRS / KVM_SET_MSRS call.
const MSR_CHUNK: usize = 64;
/// Size of `struct kvm_xsave`; larger XSAVE state needs KVM_GET_XSAVE2.
const XSAVE_LEGACY_SIZE: i32 = 4096;

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
    move |e| {
        format!(
            "{what} failed: {}",
            os_msg(&std::io::Error::from_raw_os_error(e.errno()))
        )
    }
}

/// What the host KVM supports that decides how vCPU state is moved.
#[derive(Debug, Clone)]
pub struct Caps {
    pub xsave: bool,
    pub xcrs: bool,
    /// MSRs KVM lists as saveable (KVM_GET_MSR_INDEX_LIST).
    pub msrs: Vec<u32>,
}

impl Caps {
    pub fn probe(kvm: &Kvm) -> Result<Caps, String> {
        let xsave2 = kvm.check_extension_int(Cap::Xsave2);
        let xsave = kvm.check_extension(Cap::Xsave) && xsave2 <= XSAVE_LEGACY_SIZE;
        let msrs = kvm
            .get_msr_index_list()
            .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        Ok(Caps {
            xsave,
            xcrs: kvm.check_extension(Cap::Xcrs),
            msrs,
        })
    }
}

fn msrs_of(indices: &[(u32, u64)]) -> Result<Msrs, String> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| "too many MSRs in one call".to_string())
}

/// Reads every listed MSR that KVM lets us read (some listed ones refuse on some hosts; they
/// are left out).
fn get_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>, String> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk: Vec<(u32, u64)> = rest[..rest.len().min(MSR_CHUNK)]
            .iter()
            .map(|&i| (i, 0))
            .collect();
        let mut msrs = msrs_of(&chunk)?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // Entry `n` (if any) was refused: skip it and go on after it.
        rest = &rest[(n + usize::from(n < chunk.len())).min(rest.len())..];
    }
    Ok(out)
}

/// Writes MSRs; ones this host refuses are skipped. Returns how many were refused.
fn set_msrs(fd: &VcpuFd, values: &[(u32, u64)]) -> Result<usize, String> {
    let mut refused = 0;
    let mut rest = values;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let n = fd
            .set_msrs(&msrs_of(chunk)?)
            .map_err(kvm_err("KVM_SET_MSRS"))?;
        if n < chunk.len() {
            refused += 1;
        }
        rest = &rest[(n + usize::from(n < chunk.len())).min(rest.len())..];
    }
    Ok(refused)
}

/// Captures one paused vCPU.
pub fn save_vcpu(fd: &VcpuFd, caps: &Caps) -> Result<VcpuState, String> {
    // KVM_GET_MP_STATE first: it may complete pending APIC work that the rest then reflects.
    let mp_state = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let fpu = if caps.xsave {
        FpuState::Xsave(Box::new(fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?))
    } else {
        FpuState::Fpu(Box::new(fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?))
    };
    let xcrs = if caps.xcrs {
        Some(fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?)
    } else {
        None
    };
    let debugregs = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let msrs = get_msrs(fd, &caps.msrs)?;
    let events = fd
        .get_vcpu_events()
        .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        regs,
        sregs,
        fpu,
        xcrs,
        msrs,
        lapic,
        events,
        debugregs,
        mp_state,
        tsc_khz: fd.get_tsc_khz().unwrap_or(0),
    })
}

/// Loads one vCPU's state (after its CPUID is set and before it first runs), in the order KVM
/// needs: special registers (APIC base) before the LAPIC, the LAPIC before MSRs such as the TSC
/// deadline, and pending events last. Returns how many MSRs the host refused.
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState, caps: &Caps) -> Result<usize, String> {
    // The guest calibrated its clocks against the saved TSC frequency: keep it.
    let here = fd.get_tsc_khz().unwrap_or(0);
    if s.tsc_khz != 0 && here != 0 && here.abs_diff(s.tsc_khz) > s.tsc_khz / 4000 {
        fd.set_tsc_khz(s.tsc_khz).map_err(|e| {
            format!(
                "the snapshot's TSC runs at {} kHz, this host's at {here} kHz, and KVM cannot \
                 scale it: {}",
                s.tsc_khz,
                os_msg(&std::io::Error::from_raw_os_error(e.errno()))
            )
        })?;
    }
    fd.set_mp_state(s.mp_state)
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    match &s.fpu {
        FpuState::Xsave(x) => {
            if !caps.xsave {
                return Err(
                    "the snapshot holds XSAVE state, but this host's KVM cannot load it".into(),
                );
            }
            // SAFETY: `caps.xsave` is only set when KVM_CAP_XSAVE2 reports at most 4096 bytes
            // of XSAVE state, so the kernel reads no further than the end of `kvm_xsave`.
            unsafe { fd.set_xsave(x) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        }
        FpuState::Fpu(f) => fd.set_fpu(f).map_err(kvm_err("KVM_SET_FPU"))?,
    }
    if let Some(x) = &s.xcrs {
        if caps.xcrs {
            fd.set_xcrs(x).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
    }
    fd.set_debug_regs(&s.debugregs)
        .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    let refused = set_msrs(fd, &s.msrs)?;
    fd.set_vcpu_events(&s.events)
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(refused)
}

fn chip(id: u32) -> kvm_irqchip {
    kvm_irqchip {
        chip_id: id,
        ..Default::default()
    }
}

/// Captures the in-kernel interrupt controllers, PIT and clock.
pub fn save_vm(vm: &VmFd) -> Result<VmState, String> {
    let mut pic_master = chip(KVM_IRQCHIP_PIC_MASTER);
    let mut pic_slave = chip(KVM_IRQCHIP_PIC_SLAVE);
    let mut ioapic = chip(KVM_IRQCHIP_IOAPIC);
    for c in [&mut pic_master, &mut pic_slave, &mut ioapic] {
        vm.get_irqchip(c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
    }
    let pit = vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?;
    let clock = vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
    Ok(VmState {
        pic_master,
        pic_slave,
        ioapic,
        pit,
        clock,
    })
}

/// Loads VM-wide state (before any vCPU runs). The clock continues from the saved value, so the
/// guest sees no jump for the time it spent on disk.
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), String> {
    vm.set_pit2(&s.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    let clock = kvm_bindings::kvm_clock_data {
        clock: s.clock.clock,
        // Only the value is meaningful on another host or later; flags such as
        // KVM_CLOCK_TSC_STABLE or a realtime pair must not be replayed.
        flags: 0,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
    for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        let expected = [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ];
        if !expected.contains(&c.chip_id) {
            return Err(format!("the saved irqchip id {} is unknown", c.chip_id));
        }
        vm.set_irqchip(c).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

/// What may differ between the VM that was snapshotted and the one restored from it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RestoreOverrides {
    /// Host Unix socket for vsock; required when the snapshot has a vsock device.
    pub vsock_path: Option<PathBuf>,
    /// The network card's backend, MAC address and policy; required when the snapshot has a
    /// network card. Each clone gets its own: nothing of the saved card's identity is reused.
    #[serde(default)]
    pub net: Option<NetConfig>,
    /// Where serial output is appended (none when `None`).
    pub console_log: Option<PathBuf>,
    /// The disks to attach, in device order, one per disk the snapshot has; a disk is read-only
    /// if the caller or the snapshot says so (the snapshot cannot make a caller's read-only disk
    /// writable). The snapshot file records no paths a restore would use: it may have been
    /// written by anyone, and a path from it would hand the guest any host file.
    pub disks: Vec<DiskConfig>,
    /// The host folders to share, one per shared folder the snapshot has, in device order; a
    /// folder is read-only if the caller or the snapshot says so. The guest mounts them afresh
    /// (a snapshot is only taken with every one unmounted).
    #[serde(default)]
    pub mounts: Vec<MountConfig>,
    /// Log guest writes from the restore on (see [`Vmm::dirty_pages`]).
    pub track_dirty_pages: bool,
    /// Where the base of a diff snapshot is (default: the path the diff recorded, relative to
    /// its directory).
    pub base: Option<PathBuf>,
}

/// Measurements of one snapshot.
#[derive(Debug, Clone, Default)]
pub struct SnapshotReport {
    /// Seconds spent in each phase, in order: pause, capture, memory, state, commit.
    pub phases: Vec<(&'static str, f64)>,
    /// Bytes of guest RAM written (all-zero pages are left as holes).
    pub memory_bytes: u64,
    pub state_bytes: u64,
    /// Identity of the snapshot's memory (see [`crate::snapshot::memory`]).
    pub memory_id: snapmem::MemoryId,
    /// For a diff: pages stored, and how many pages were compared with the base.
    pub diff_pages: Option<u64>,
    pub compared_pages: Option<u64>,
}

fn write_err(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |e| SnapshotError::Write {
        path: path.display().to_string(),
        msg: os_msg(&e),
    }
}

impl Vmm {
    /// Pauses the VM, captures its state, and writes `dir/memory.bin` and `dir/vmstate.bin`
    /// atomically (temporary files, fsync, rename, directory fsync). The VM stays paused;
    /// [`Vmm::resume`] continues it.
    ///
    /// With `base` (a snapshot directory with the same RAM size) the snapshot is a diff: only
    /// pages that differ from the base's memory are stored. When this VM was itself restored from
    /// that base, only the pages written since (copy-on-write copies, plus KVM's dirty log when
    /// tracking is on) are compared; otherwise every page is.
    pub fn snapshot(
        &self,
        dir: &Path,
        base: Option<&Path>,
    ) -> Result<SnapshotReport, SnapshotError> {
        self.check_snapshottable()?;
        let base = base.map(|b| open_base(self.ram.size, dir, b)).transpose()?;
        let mut out = AtomicDir::new(dir)?;
        let (memory, memory_tmp) = out.create(MEMORY_FILE)?;
        let (state, state_tmp) = out.create(VMSTATE_FILE)?;
        let mut report = self.snapshot_into(&memory, &state, base)?;
        let clock = Instant::now();
        out.finish(memory, &memory_tmp)?;
        out.finish(state, &state_tmp)?;
        out.commit()?;
        report
            .phases
            .push(("commit", clock.elapsed().as_secs_f64()));
        Ok(report)
    }

    /// Pauses the VM, captures its state, and writes the memory to `memory` and the state to
    /// `state` (both empty and writable; the caller syncs them and publishes them under their
    /// final names). `base` is the base of a diff, already opened (see [`open_base`]). This is
    /// all a jailed worker does for a snapshot: it opens no path.
    pub fn snapshot_into(
        &self,
        memory: &File,
        state: &File,
        base: Option<OpenedBase>,
    ) -> Result<SnapshotReport, SnapshotError> {
        let mut clock = Instant::now();
        let mut phases = Vec::new();
        self.check_snapshottable()?;
        let mut mark = |name: &'static str| {
            let now = Instant::now();
            phases.push((name, (now - clock).as_secs_f64()));
            clock = now;
        };
        self.pause().map_err(SnapshotError::Capture)?;
        for t in &self.transports {
            t.lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_quiesced(true);
        }
        // Again, now that no device serves the guest: it may have mounted a shared folder
        // since the first check. (The caller resumes the VM after an error, as after any.)
        self.check_snapshottable()?;
        mark("pause");
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (i, fd) in self.vcpus.iter().enumerate() {
            let fd = fd.lock().unwrap_or_else(|e| e.into_inner());
            vcpus.push(
                save_vcpu(&fd, &self.caps)
                    .map_err(|e| SnapshotError::Capture(format!("vCPU {i}: {e}")))?,
            );
        }
        let vm = save_vm(&self.vm).map_err(SnapshotError::Capture)?;
        let devices = DeviceState {
            serial: self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .state(),
            transports: self
                .transports
                .iter()
                .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).save())
                .collect(),
        };
        let machine = MachineState {
            memory_size: self.ram.size,
            vcpus: self.config.vcpus,
            template: match self.cpu_template() {
                CpuTemplate::Normal => 0,
                CpuTemplate::Compat => 1,
            },
            cmdline: self.cmdline().to_string(),
            console_capacity: self.config.console_capacity as u64,
            disks: self.config.disks.iter().map(|d| d.read_only).collect(),
            vsock: self.config.vsock_path.is_some(),
            net: self.config.net.is_some(),
            shares: self.config.mounts.iter().map(|m| m.read_only).collect(),
        };
        mark("capture");

        let base = match base {
            None => None,
            Some(b) => {
                let ram = GuestRam::new(self.ram.size >> 20, &MemoryBacking::Snapshot(b.layers))
                    .map_err(|e| SnapshotError::Base {
                        path: b.reference.path.clone(),
                        why: e.to_string(),
                    })?;
                Some((b.reference, ram))
            }
        };
        let memory_name = Path::new(MEMORY_FILE);
        memory
            .set_len(self.ram.size)
            .map_err(write_err(memory_name))?;
        let mut compared_pages = None;
        let written = match &base {
            None => self.ram.write_to(memory),
            Some((base_ref, base_ram)) => {
                let candidates = self.pages_written_since(&base_ref.id)?;
                compared_pages = Some(
                    candidates
                        .as_ref()
                        .map_or(self.ram.size / snapmem::PAGE_SIZE as u64, |c| {
                            c.iter().filter(|&&w| w).count() as u64
                        }),
                );
                self.ram
                    .write_diff(memory, base_ram, &base_ref.id, candidates.as_deref())
            }
        }
        .map_err(write_err(memory_name))?;
        mark("memory");
        let memory_state = MemoryState {
            id: written.id,
            base: base.map(|(r, _)| r),
            pages: written.pages,
        };
        let diff_pages = memory_state
            .base
            .as_ref()
            .map(|_| memory_state.stored_pages());
        let encoded = Snapshot {
            machine,
            vm,
            vcpus,
            devices,
            memory: memory_state,
        }
        .encode();
        (&*state)
            .write_all(&encoded)
            .map_err(write_err(Path::new(VMSTATE_FILE)))?;
        mark("state");
        Ok(SnapshotReport {
            phases,
            memory_bytes: written.bytes,
            state_bytes: encoded.len() as u64,
            memory_id: written.id,
            diff_pages,
            compared_pages,
        })
    }

    /// Refuses a snapshot while a device holds state a snapshot cannot carry: a shared
    /// folder the guest has mounted (its file server holds a host descriptor for every node id
    /// the guest kernel caches; a restored guest would hold ids nobody serves). Unmounted, a
    /// shared folder's server holds nothing, and the clone mounts it afresh.
    fn check_snapshottable(&self) -> Result<(), SnapshotError> {
        for t in &self.transports {
            let refusal = t
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .snapshot_refusal();
            if let Some(why) = refusal {
                return Err(SnapshotError::Capture(format!(
                    "{why}: unmount it in the guest before a snapshot"
                )));
            }
        }
        Ok(())
    }

    /// The pages that may differ from the snapshot whose memory is `base_id`, when this VM's
    /// RAM was restored from it or from a diff chain over it: the pages written since the
    /// restore plus the pages of every diff layered above it. `None` when the base is not in
    /// this VM's chain (then every page must be compared).
    fn pages_written_since(
        &self,
        base_id: &snapmem::MemoryId,
    ) -> Result<Option<Vec<bool>>, SnapshotError> {
        let layers = &self.ram.layers;
        let Some(at) = layers.iter().position(|l| &l.id == base_id) else {
            return Ok(None);
        };
        let capture = |e: String| SnapshotError::Capture(e);
        let Some(mut written) = self
            .ram
            .written_pages()
            .map_err(|e| capture(format!("cannot read /proc/self/pagemap: {}", os_msg(&e))))?
        else {
            return Ok(None);
        };
        for layer in &layers[at + 1..] {
            if let Some(bm) = &layer.pages {
                for (p, w) in written.iter_mut().enumerate() {
                    *w |= snapmem::bit(bm, p);
                }
            }
        }
        if self.config.track_dirty_pages {
            let dirty = self.dirty_pages().map_err(capture)?;
            for (p, w) in written.iter_mut().enumerate() {
                *w |= snapmem::bit(&dirty, p);
            }
        }
        Ok(Some(written))
    }

    /// Builds a VM from the snapshot in `dir` and starts it where it was saved. Guest RAM maps
    /// `dir/memory.bin` copy-on-write, so the cost does not grow with the RAM size and the file
    /// is never modified.
    pub fn restore(dir: &Path, overrides: &RestoreOverrides) -> Result<Vmm, VmmError> {
        Self::restore_with(dir, overrides, &mut || Ok(()))
    }

    /// [`Vmm::restore`], running `before_run` once the VM is built and every vCPU thread is
    /// spawned, before any can enter `KVM_RUN` (see [`BeforeRun`]). When it fails, the vCPU
    /// threads are stopped and joined and its error is returned.
    pub fn restore_with(
        dir: &Path,
        overrides: &RestoreOverrides,
        before_run: BeforeRun<'_>,
    ) -> Result<Vmm, VmmError> {
        let mut phases = Phases::new(Instant::now());
        let snap = Snapshot::load(dir)?;
        let config = restored_config(dir, &snap, overrides)?;
        phases.mark("load_state");
        // Start-up times count from here, as for a boot: loading the state is its own phase.
        let started = Instant::now();
        let (kvm, ram) = builder::open_memory(&config)?;
        phases.mark("memory");
        let machine = Machine::new(kvm, ram, &config)?;
        phases.mark("create_vm");
        let devices = Devices::build(&machine, &config, Some(&snap.devices))?;
        phases.mark("devices");
        restore_vm(&machine.vm, &snap.vm).map_err(restore_err)?;
        phases.mark("vm_state");
        let caps = Caps::probe(&machine.kvm).map_err(VmmError::Setup)?;
        let mut refused_msrs = 0;
        let vcpus = machine.create_vcpus(config.vcpus, |index, fd| {
            refused_msrs += restore_vcpu(fd, &snap.vcpus[usize::from(index)], &caps)
                .map_err(|e| restore_err(format!("vCPU {index}: {e}")))?;
            Ok(())
        })?;
        // Tell a kvmclock-aware guest it was stopped, so it does not report soft lockups.
        // Guests without kvmclock refuse this; that is fine.
        for fd in &vcpus {
            let _ = fd.lock().unwrap_or_else(|e| e.into_inner()).kvmclock_ctrl();
        }
        // Only now may devices raise interrupts: loading the irqchip and LAPIC state above
        // would have dropped them.
        for t in &devices.transports {
            t.lock().unwrap_or_else(|e| e.into_inner()).after_restore();
        }
        phases.mark("vcpu_state");
        let threads = builder::launch(&machine, &devices, &vcpus, before_run)?;
        phases.mark("running");
        Ok(Vmm::assemble(Parts {
            machine,
            devices,
            vcpus,
            threads,
            caps,
            cmdline: snap.machine.cmdline.clone(),
            refused_msrs,
            config,
            started,
            phases: phases.done(),
        }))
    }
}

fn restore_err(e: String) -> VmmError {
    VmmError::Snapshot(SnapshotError::Restore(e))
}

/// The configuration of the VM a snapshot describes, with what the caller may choose
/// (`overrides`) filled in and checked against it.
fn restored_config(
    dir: &Path,
    snap: &Snapshot,
    overrides: &RestoreOverrides,
) -> Result<MachineConfig, VmmError> {
    let m = &snap.machine;
    // The boot source is not used by a restore; it only fills the field.
    let mut cfg = MachineConfig::new(BootSource::Raw {
        path: dir.join(VMSTATE_FILE),
        load_addr: 0,
        mode: RawMode::Long,
    });
    cfg.memory_mib = m.memory_size >> 20;
    cfg.vcpus = m.vcpus;
    cfg.console_capacity = restored_console_capacity(m.console_capacity);
    cfg.console_log = overrides.console_log.clone();
    cfg.track_dirty_pages = overrides.track_dirty_pages;
    cfg.cpu_template = CpuTemplateChoice::Fixed(if m.template == 1 {
        CpuTemplate::Compat
    } else {
        CpuTemplate::Normal
    });
    cfg.disks = callers_devices(
        &overrides.disks,
        &m.disks,
        "disks but {given} disk paths were given (a restore attaches only the disks its caller \
         names)",
        |d| &mut d.read_only,
    )?;
    cfg.vsock_path = match (m.vsock, &overrides.vsock_path) {
        (false, None) => None,
        (false, Some(_)) => {
            return Err(VmmError::Config(
                "the snapshot has no vsock device, so vsock_path cannot be set".into(),
            ))
        }
        (true, None) => {
            return Err(VmmError::Config(
                "the snapshot has a vsock device: pass the vsock_path to serve it on".into(),
            ))
        }
        (true, Some(p)) => Some(p.clone()),
    };
    cfg.net = match (m.net, &overrides.net) {
        (false, None) => None,
        (false, Some(_)) => {
            return Err(VmmError::Config(
                "the snapshot has no network card, so a network cannot be attached".into(),
            ))
        }
        (true, None) => {
            return Err(VmmError::Config(
                "the snapshot has a network card: pass the network backend to attach it to".into(),
            ))
        }
        (true, Some(n)) => Some(n.clone()),
    };
    cfg.mounts = callers_devices(
        &overrides.mounts,
        &m.shares,
        "shared folders but {given} were given (a restore shares only the folders its caller \
         names)",
        |f| &mut f.read_only,
    )?;
    let layers = snapmem::resolve_chain(dir, snap, overrides.base.as_deref())?;
    cfg.memory_backing = MemoryBacking::Snapshot(layers);
    Ok(cfg)
}

/// The devices of one kind a restore attaches: the caller's, one per device of that kind the
/// snapshot has (`saved_read_only`), each read-only if the caller or the snapshot says so (a
/// snapshot cannot make a caller's read-only disk or folder writable). `mismatch` completes
/// "the snapshot has N ..." when the counts differ, with `{given}` for the caller's count.
fn callers_devices<T: Clone>(
    given: &[T],
    saved_read_only: &[bool],
    mismatch: &str,
    read_only: fn(&mut T) -> &mut bool,
) -> Result<Vec<T>, VmmError> {
    if given.len() != saved_read_only.len() {
        return Err(VmmError::Config(format!(
            "the snapshot has {} {}",
            saved_read_only.len(),
            mismatch.replace("{given}", &given.len().to_string())
        )));
    }
    Ok(given
        .iter()
        .zip(saved_read_only)
        .map(|(device, &saved)| {
            let mut device = device.clone();
            *read_only(&mut device) |= saved;
            device
        })
        .collect())
}

/// Largest console ring a restore keeps: the capacity comes from the snapshot file, and the
/// ring grows with what the guest prints, so a hostile value would let a guest fill host
/// memory. The default capacity is 1 MiB; this leaves room for callers that asked for more.
pub const MAX_RESTORED_CONSOLE_CAPACITY: usize = 64 << 20;

fn restored_console_capacity(saved: u64) -> usize {
    usize::try_from(saved)
        .unwrap_or(usize::MAX)
        .clamp(1, MAX_RESTORED_CONSOLE_CAPACITY)
}

impl Vmm {
    /// Bytes of serial output the console ring keeps.
    pub fn console_capacity(&self) -> usize {
        self.config.console_capacity
    }
}

/// `../name` when `target` is a sibling of `from` (snapshots in one store), so a store moved as
/// a whole keeps working; otherwise `target` as an absolute path.
fn relative_to(target: &Path, from: &Path) -> String {
    match (target.parent(), from.parent(), target.file_name()) {
        (Some(a), Some(b), Some(name)) if a == b => {
            Path::new("..").join(name).display().to_string()
        }
        _ => target.display().to_string(),
    }
}

/// The base of a diff snapshot, opened: what the diff records and the base's memory chain with
/// every file open.
pub struct OpenedBase {
    pub reference: BaseRef,
    pub layers: Vec<snapmem::MemoryLayer>,
}

/// Opens the base of a diff about to be written to `dir` for a VM with `memory_size` bytes of
/// RAM: the reference the diff records (its path relative to `dir` where they share a parent)
/// and its memory chain, every file opened and checked.
pub fn open_base(memory_size: u64, dir: &Path, base: &Path) -> Result<OpenedBase, SnapshotError> {
    let shown = base.display().to_string();
    let fail = |why: String| SnapshotError::Base {
        path: shown.clone(),
        why,
    };
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    if abs(base) == abs(dir) {
        return Err(fail("a snapshot cannot be its own base".into()));
    }
    let snap = snapmem::load_base(base)?;
    if snap.machine.memory_size != memory_size {
        return Err(fail(format!(
            "it has {} MiB of RAM, this VM {} MiB",
            snap.machine.memory_size >> 20,
            memory_size >> 20
        )));
    }
    let mut layers = snapmem::resolve_chain(base, &snap, None)?;
    // The chain's top is the base's own memory.bin, which resolve_chain leaves to be opened.
    let top = layers.last_mut().expect("a chain has its own layer");
    let file = crate::snapshot::open_regular(&top.path)
        .map_err(|e| fail(format!("{}: {}", top.path.display(), os_msg(&e))))?;
    let (memory_len, memory_mtime_ns) = snapmem::stamp_of(&file).map_err(|e| fail(os_msg(&e)))?;
    top.file = Some(snapmem::LayerFile(std::sync::Arc::new(file)));
    Ok(OpenedBase {
        reference: BaseRef {
            path: relative_to(&abs(base), &abs(dir)),
            id: snap.memory.id,
            memory_len,
            memory_mtime_ns,
        },
        layers,
    })
}
