//! virtio 1.x devices on the MMIO transport.

pub mod block;
pub mod device_thread;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod vsock;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::MmioTransport;
pub use queue::Queue;

/// Feature bit every device offers and every driver must accept (no legacy interface).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bits.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// The interrupt line of one device (an irqfd on its GSI), its status register, and the
/// "needs reset" flag a device raises when the driver broke the protocol.
pub struct Interrupt {
    evt: EventFd,
    status: AtomicU32,
    needs_reset: AtomicBool,
}

impl Interrupt {
    pub fn new(evt: EventFd) -> Self {
        Interrupt {
            evt,
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
        }
    }

    /// Signals used buffers.
    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        // The eventfd counter only overflows after 2^64 - 1 unread signals.
        let _ = self.evt.write(1);
    }

    /// Marks the device broken (DEVICE_NEEDS_RESET) and tells the driver.
    pub fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            self.raise(INT_CONFIG);
        }
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the status register and the "needs reset" flag to saved values (no signal).
    pub fn restore(&self, status: u32, needs_reset: bool) {
        self.status.store(status, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// The eventfd (registered by the VMM as an irqfd).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// A chain taken from a queue, or why there is none.
pub enum Popped {
    Chain(queue::DescriptorChain),
    Empty,
    /// The queue is broken; the device was marked DEVICE_NEEDS_RESET (a chain that could not
    /// be walked was returned to the driver first).
    Broken,
}

/// Takes the next chain of `queue`. A chain that cannot be walked goes back to the driver
/// unused, and a chain or ring the driver broke marks the device DEVICE_NEEDS_RESET.
pub fn pop_chain(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) -> Popped {
    match queue.pop(mem) {
        Ok(Some(chain)) => Popped::Chain(chain),
        Ok(None) => Popped::Empty,
        Err(Ok(bad)) => {
            let _ = queue.add_used(mem, bad.head, 0);
            interrupt.set_needs_reset();
            Popped::Broken
        }
        Err(Err(_)) => {
            interrupt.set_needs_reset();
            Popped::Broken
        }
    }
}

/// A virtio device behind an [`MmioTransport`].
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue (the number of queues is the length).
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Offered features, including [`VIRTIO_F_VERSION_1`].
    fn features(&self) -> u64;
    /// Reads device configuration space; `offset` and `data` are already bounds-checked
    /// against [`VirtioDevice::config_len`].
    fn read_config(&self, offset: usize, data: &mut [u8]);
    fn config_len(&self) -> usize;
    /// Starts the device with the driver's (validated) queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: std::sync::Arc<Interrupt>,
    ) -> Result<(), String>;
    /// The driver notified queue `index` (only called while activated).
    fn notify(&mut self, index: u16);
    /// Stops the device and forgets the queues.
    fn reset(&mut self);
    /// The VM is going away: stop any worker threads for good.
    fn shutdown(&mut self) {
        self.reset();
    }
    /// The live queues of an activated device (their ring indices move on as the device
    /// works), or `None` when the transport's copy is current.
    fn live_queues(&self) -> Option<Vec<Queue>> {
        None
    }
    /// Stops (`true`) or restarts background work that touches guest memory, so a snapshot
    /// sees memory and queues at rest.
    fn set_quiesced(&mut self, _quiesced: bool) {}
    /// Called once after the device was re-activated from a snapshot.
    fn restored(&mut self) {}
    /// Why a snapshot cannot carry the device's state now (`None`: it can).
    fn snapshot_refusal(&self) -> Option<String> {
        None
    }
    /// What a network card counted (none for other devices).
    fn net_counters(&self) -> Option<net::NetCounters> {
        None
    }
}
