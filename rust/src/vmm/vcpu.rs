//! vCPU threads: one per vCPU, each running the `KVM_RUN` loop and dispatching exits to the
//! buses. The owner kicks threads out of `KVM_RUN` with a real-time signal whose handler sets
//! `immediate_exit` on the thread's own `kvm_run`, so a signal that lands just before the ioctl
//! is not lost.

use std::cell::Cell;
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, unblock_signal, SIGRTMIN};

use super::bus::Bus;
use super::control::{Outcome, VmControl};

thread_local! {
    /// The `kvm_run` area of the vCPU running on this thread, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN() + 2
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work here: read a thread-local pointer and store a byte.
    let run = KVM_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: the pointer is set by this very thread to its vCPU's mmapped kvm_run and
        // cleared before that mapping goes away; a volatile byte store is signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), String> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), handle_kick)
            .map_err(|e| format!("cannot install the vCPU kick signal handler: {e}"));
    });
    result
}

/// Exit counters, for tests and diagnostics.
#[derive(Default)]
pub struct ExitStats {
    pub unhandled_pio: std::sync::atomic::AtomicU64,
    pub unhandled_mmio: std::sync::atomic::AtomicU64,
    /// When vCPU 0 first entered `KVM_RUN`.
    pub first_run: std::sync::OnceLock<std::time::Instant>,
}

/// A vCPU fd: its thread holds the lock only around `KVM_RUN` and exit handling, so the owner
/// can read and write vCPU state while the VM is paused.
pub type SharedVcpu = Arc<Mutex<VcpuFd>>;

pub struct VcpuContext {
    pub index: u8,
    pub fd: SharedVcpu,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub control: Arc<VmControl>,
    pub stats: Arc<ExitStats>,
    /// Released when every vCPU thread is about to enter its loop (start-up barrier).
    pub started: Arc<std::sync::Barrier>,
}

/// Spawns the thread of one vCPU.
pub fn spawn(ctx: VcpuContext) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{}", ctx.index))
        .spawn(move || run(ctx))
}

fn run(ctx: VcpuContext) {
    let index = ctx.index as usize;
    // The creating thread may block real-time signals; this one must receive the kick.
    let _ = unblock_signal(kick_signal());
    let run_ptr: *mut kvm_run = ctx
        .fd
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_kvm_run();
    KVM_RUN.with(|c| c.set(run_ptr));
    ctx.control.register_thread(index);
    ctx.started.wait();
    // The filter goes on before the guest runs a single instruction (no-op in-process).
    if let Err(e) = crate::worker::seccomp::apply(crate::worker::seccomp::ThreadKind::Vcpu) {
        ctx.control.finish(Outcome::Crash {
            reason: format!("vCPU {index}: {e}"),
        });
    }
    while ctx.control.vcpu_checkpoint() {
        if index == 0 {
            ctx.stats.first_run.get_or_init(std::time::Instant::now);
        }
        let mut fd = ctx.fd.lock().unwrap_or_else(|e| e.into_inner());
        let exit = fd.run();
        let outcome = match exit {
            Ok(exit) => handle_exit(&ctx.pio, &ctx.mmio, &ctx.stats, ctx.index, exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(Outcome::Crash {
                reason: format!(
                    "vCPU {index}: KVM_RUN failed: {}",
                    super::os_msg(&std::io::Error::from_raw_os_error(e.errno()))
                ),
            }),
        };
        if let Some(outcome) = outcome {
            let outcome = match outcome {
                Outcome::Crash { reason } if reason.contains("KVM_EXIT_INTERNAL_ERROR") => {
                    // SAFETY: run_ptr is this vCPU's live kvm_run mapping and the exit reason is
                    // KVM_EXIT_INTERNAL_ERROR, so the `internal` union member is the active one.
                    let suberror = unsafe { (*run_ptr).__bindgen_anon_1.internal.suberror };
                    let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    Outcome::Crash {
                        reason: format!("{reason} (suberror {suberror}, rip {rip:#x})"),
                    }
                }
                o => o,
            };
            ctx.control.finish(outcome);
            break;
        }
    }
    ctx.control.unregister_thread(index);
    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
}

fn handle_exit(
    pio: &Bus,
    mmio: &Bus,
    stats: &ExitStats,
    index: u8,
    exit: VcpuExit<'_>,
) -> Option<Outcome> {
    use std::sync::atomic::Ordering::Relaxed;
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !pio.read(u64::from(port), data) {
                stats.unhandled_pio.fetch_add(1, Relaxed);
            }
            None
        }
        VcpuExit::IoOut(port, data) => {
            if !pio.write(u64::from(port), data) {
                stats.unhandled_pio.fetch_add(1, Relaxed);
            }
            None
        }
        VcpuExit::MmioRead(addr, data) => {
            if !mmio.read(addr, data) {
                stats.unhandled_mmio.fetch_add(1, Relaxed);
            }
            None
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !mmio.write(addr, data) {
                stats.unhandled_mmio.fetch_add(1, Relaxed);
            }
            None
        }
        VcpuExit::Shutdown => Some(Outcome::Reset {
            reason: format!("vCPU {index}: triple fault (KVM_EXIT_SHUTDOWN)"),
        }),
        VcpuExit::Hlt => Some(Outcome::Crash {
            reason: format!("vCPU {index}: halted with no interrupt controller to wake it"),
        }),
        VcpuExit::SystemEvent(kind, _) => Some(match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Outcome::PowerOff { code: 0 },
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Outcome::Reset {
                reason: format!("vCPU {index}: system reset event"),
            },
            other => Outcome::Crash {
                reason: format!("vCPU {index}: system event {other}"),
            },
        }),
        VcpuExit::FailEntry(reason, cpu) => Some(Outcome::Crash {
            reason: format!(
                "vCPU {index}: KVM_EXIT_FAIL_ENTRY (hardware reason {reason:#x}, cpu {cpu})"
            ),
        }),
        VcpuExit::InternalError => Some(Outcome::Crash {
            reason: format!("vCPU {index}: KVM_EXIT_INTERNAL_ERROR"),
        }),
        VcpuExit::Intr => None,
        other => Some(Outcome::Crash {
            reason: format!("vCPU {index}: unexpected exit {other:?}"),
        }),
    }
}
