//! Run state shared by the vCPU threads, the devices and the owner of the VM: pause/resume,
//! the outcome that ends the VM, and the signal that kicks vCPU threads out of `KVM_RUN`.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    /// The guest wrote `code` to the power-off port (or asked KVM for a system shutdown).
    PowerOff { code: u32 },
    /// The guest reset itself: i8042 reset command, or a triple fault.
    Reset { reason: String },
    /// The guest kernel panicked (pvpanic port, or the panic seen on the console).
    Panic { reason: String },
    /// The VMM could not go on running the guest (KVM internal error, failed entry, ...).
    Crash { reason: String },
    /// The host stopped the VM.
    Stopped,
    /// The VMM process itself died (a signal, a panic, a forbidden system call); only a worker's
    /// owner reports this.
    VmmCrash { reason: String },
    /// The VM's memory limit was exceeded and the kernel killed its VMM process.
    OutOfMemory { reason: String },
}

impl Outcome {
    /// Short name of the kind: "poweroff", "reset", "panic", "crash", "stopped", "vmm_crash",
    /// "oom".
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::PowerOff { .. } => "poweroff",
            Outcome::Reset { .. } => "reset",
            Outcome::Panic { .. } => "panic",
            Outcome::Crash { .. } => "crash",
            Outcome::Stopped => "stopped",
            Outcome::VmmCrash { .. } => "vmm_crash",
            Outcome::OutOfMemory { .. } => "oom",
        }
    }

    /// One-line explanation.
    pub fn reason(&self) -> String {
        match self {
            Outcome::PowerOff { code } => format!("guest powered off with code {code}"),
            Outcome::Reset { reason }
            | Outcome::Panic { reason }
            | Outcome::Crash { reason }
            | Outcome::VmmCrash { reason }
            | Outcome::OutOfMemory { reason } => reason.clone(),
            Outcome::Stopped => "stopped by the host".to_string(),
        }
    }
}

/// What the vCPU threads should be doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Stopping,
}

struct Inner {
    run: RunState,
    /// vCPU threads currently parked because of a pause.
    parked: usize,
    /// vCPU threads that have not left their loop; only these may be signalled.
    threads: Vec<Option<libc::pthread_t>>,
    outcome: Option<Outcome>,
    /// A "Kernel panic" console line seen before the VM ended.
    panic_line: Option<String>,
}

/// Shared control block of one VM.
pub struct VmControl {
    inner: Mutex<Inner>,
    cond: Condvar,
    kick_signal: libc::c_int,
}

impl VmControl {
    pub fn new(kick_signal: libc::c_int) -> Self {
        VmControl {
            inner: Mutex::new(Inner {
                run: RunState::Running,
                parked: 0,
                threads: Vec::new(),
                outcome: None,
                panic_line: None,
            }),
            cond: Condvar::new(),
            kick_signal,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked while holding it; the state
        // itself is plain data and stays usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the calling thread as vCPU `index` (called by the vCPU thread itself).
    pub fn register_thread(&self, index: usize) {
        let mut g = self.lock();
        if g.threads.len() <= index {
            g.threads.resize(index + 1, None);
        }
        // SAFETY: pthread_self has no preconditions.
        g.threads[index] = Some(unsafe { libc::pthread_self() });
    }

    /// Unregisters vCPU `index`; after this it is never signalled again.
    pub fn unregister_thread(&self, index: usize) {
        let mut g = self.lock();
        if let Some(slot) = g.threads.get_mut(index) {
            *slot = None;
        }
        self.cond.notify_all();
    }

    fn kick_all(&self, g: &Inner) {
        for t in g.threads.iter().flatten() {
            // SAFETY: every registered thread is alive: it unregisters itself (under the same
            // lock we hold) before it returns, so the pthread_t is valid.
            unsafe {
                libc::pthread_kill(*t, self.kick_signal);
            }
        }
    }

    /// Ends the VM with `outcome` unless it already ended; returns whether this call decided it.
    /// A reset after a console panic line is reported as that panic.
    pub fn finish(&self, outcome: Outcome) -> bool {
        let mut g = self.lock();
        if g.outcome.is_some() {
            return false;
        }
        let outcome = match (outcome, &g.panic_line) {
            (Outcome::Reset { .. }, Some(line)) => Outcome::Panic {
                reason: line.clone(),
            },
            (o, _) => o,
        };
        g.outcome = Some(outcome);
        g.run = RunState::Stopping;
        // A worker's owner learns from shared memory that the VM ended, without asking.
        crate::worker::console_ring::mark_ended();
        self.kick_all(&g);
        self.cond.notify_all();
        true
    }

    /// Records a console line announcing a kernel panic.
    pub fn note_panic_line(&self, line: String) {
        let mut g = self.lock();
        if g.panic_line.is_none() {
            g.panic_line = Some(line);
        }
    }

    pub fn panic_line(&self) -> Option<String> {
        self.lock().panic_line.clone()
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.lock().outcome.clone()
    }

    pub fn run_state(&self) -> RunState {
        self.lock().run
    }

    /// Waits up to `timeout` (forever with `None`) for the VM to end.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<Outcome> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut g = self.lock();
        loop {
            if g.outcome.is_some() {
                return g.outcome.clone();
            }
            match deadline {
                None => g = self.cond.wait(g).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    g = self
                        .cond
                        .wait_timeout(g, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// Pauses every vCPU and waits until all of them are parked outside `KVM_RUN`.
    /// Returns false if the VM is not running (already ended) or the vCPUs did not park in time.
    pub fn pause(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        match g.run {
            RunState::Stopping => return false,
            RunState::Paused => {}
            RunState::Running => {
                g.run = RunState::Paused;
                self.kick_all(&g);
            }
        }
        loop {
            let alive = g.threads.iter().flatten().count();
            if g.run != RunState::Paused {
                return false;
            }
            if g.parked >= alive {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = self
                .cond
                .wait_timeout(g, (deadline - now).min(Duration::from_millis(50)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            // Re-kick in case a vCPU was between its state check and KVM_RUN without the
            // immediate-exit flag seen (belt and braces; kicks are idempotent).
            if g.run == RunState::Paused && g.parked < g.threads.iter().flatten().count() {
                self.kick_all(&g);
            }
        }
    }

    /// Resumes paused vCPUs. Returns false if the VM has ended.
    pub fn resume(&self) -> bool {
        let mut g = self.lock();
        match g.run {
            RunState::Stopping => false,
            RunState::Running => true,
            RunState::Paused => {
                g.run = RunState::Running;
                self.cond.notify_all();
                true
            }
        }
    }

    /// Called by a vCPU thread before each `KVM_RUN`: parks while paused, and returns false
    /// when the thread must leave its loop.
    pub fn vcpu_checkpoint(&self) -> bool {
        let mut g = self.lock();
        loop {
            match g.run {
                RunState::Running => return true,
                RunState::Stopping => return false,
                RunState::Paused => {
                    g.parked += 1;
                    self.cond.notify_all();
                    while g.run == RunState::Paused {
                        g = self.cond.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    g.parked -= 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_outcome_wins_and_reset_after_panic_line_is_panic() {
        let c = VmControl::new(0);
        c.note_panic_line("Kernel panic - not syncing: boom".into());
        assert!(c.finish(Outcome::Reset {
            reason: "i8042".into()
        }));
        assert!(!c.finish(Outcome::PowerOff { code: 1 }));
        assert_eq!(
            c.wait(Some(Duration::from_millis(1))),
            Some(Outcome::Panic {
                reason: "Kernel panic - not syncing: boom".into()
            })
        );
        assert_eq!(c.run_state(), RunState::Stopping);
        assert!(!c.pause(Duration::from_millis(1)));
    }

    #[test]
    fn wait_times_out_while_running() {
        let c = VmControl::new(0);
        assert_eq!(c.wait(Some(Duration::from_millis(5))), None);
    }
}
