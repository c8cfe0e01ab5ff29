//! The part every virtio device with a worker thread shares (vsock, net): the state the
//! transport side and the worker share under one lock, the eventfd that wakes the worker, and
//! the thread's life (spawned under the device seccomp filter, stopped and joined once).
//!
//! The transport side (the [`super::VirtioDevice`] methods, called by the vCPU thread that
//! trapped the MMIO access) only changes the shared state and kicks; the worker serves the
//! queues under the lock and waits for its host sockets without it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, Queue};
use crate::worker::seccomp::ThreadKind;

/// What a worker serves once the driver activated the device: guest memory, the queues and
/// the interrupt.
pub struct ActiveQueues {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub interrupt: Arc<Interrupt>,
}

/// The state a device shares with its worker; `extra` is the device's own part.
#[derive(Default)]
pub struct Shared<E> {
    pub active: Option<ActiveQueues>,
    /// The worker must end.
    pub stop: bool,
    /// While set the worker leaves guest memory and the queues alone (snapshots).
    pub quiesced: bool,
    pub extra: E,
}

/// A device's worker thread and what it shares with it.
pub struct DeviceThread<E> {
    shared: Arc<Mutex<Shared<E>>>,
    kick: Arc<EventFd>,
    handle: Option<JoinHandle<()>>,
}

impl<E: Send + 'static> DeviceThread<E> {
    /// Starts thread `name` running `body(kick, shared)` once the device seccomp filter is on
    /// (a no-op in-process): the worker is filtered before it touches a host socket or guest
    /// memory. A filter that cannot be applied ends the thread at once, with a line saying so.
    pub fn spawn<F>(name: &str, extra: E, body: F) -> std::io::Result<Self>
    where
        F: FnOnce(Arc<EventFd>, Arc<Mutex<Shared<E>>>) + Send + 'static,
    {
        Self::spawn_as(ThreadKind::Device, name, extra, body)
    }

    /// [`DeviceThread::spawn`] under the filter of thread kind `kind` (the file server's
    /// thread has a list of its own).
    pub fn spawn_as<F>(kind: ThreadKind, name: &str, extra: E, body: F) -> std::io::Result<Self>
    where
        F: FnOnce(Arc<EventFd>, Arc<Mutex<Shared<E>>>) + Send + 'static,
    {
        let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let shared = Arc::new(Mutex::new(Shared {
            active: None,
            stop: false,
            quiesced: false,
            extra,
        }));
        let (thread_kick, thread_shared) = (kick.clone(), shared.clone());
        let label = name.to_string();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if let Err(e) = crate::worker::seccomp::apply(kind) {
                    eprintln!("{label}: the device thread stops: {e}");
                    return;
                }
                body(thread_kick, thread_shared)
            })?;
        Ok(DeviceThread {
            shared,
            kick,
            handle: Some(handle),
        })
    }
}

impl<E> DeviceThread<E> {
    /// The shared state (a worker that panicked under the lock does not take the device down).
    pub fn lock(&self) -> MutexGuard<'_, Shared<E>> {
        lock(&self.shared)
    }

    /// Wakes the worker.
    pub fn kick(&self) {
        let _ = self.kick.write(1);
    }

    /// Hands the driver's queues to the worker; `what` names the device and its queue count.
    pub fn activate(
        &self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
        count: usize,
        what: &str,
    ) -> Result<(), String> {
        if queues.len() != count {
            return Err(format!("{what} has {count} queues"));
        }
        self.lock().active = Some(ActiveQueues {
            mem,
            queues,
            interrupt,
        });
        self.kick();
        Ok(())
    }

    /// Takes the queues away from the worker.
    pub fn deactivate(&self) {
        self.lock().active = None;
        self.kick();
    }

    pub fn live_queues(&self) -> Option<Vec<Queue>> {
        self.lock().active.as_ref().map(|a| a.queues.clone())
    }

    pub fn set_quiesced(&self, quiesced: bool) {
        self.lock().quiesced = quiesced;
        self.kick();
    }

    /// Ends the worker and waits for it; later calls do nothing. Returns whether it was running.
    pub fn stop(&mut self) -> bool {
        let Some(handle) = self.handle.take() else {
            return false;
        };
        self.lock().stop = true;
        self.kick();
        let _ = handle.join();
        true
    }
}

impl<E> Drop for DeviceThread<E> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Locks `shared` (a worker that panicked under the lock does not take the device down).
pub fn lock<E>(shared: &Mutex<Shared<E>>) -> MutexGuard<'_, Shared<E>> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}
