//! The virtio-mmio transport (version 2, no legacy interface): a 4 KiB register window per device.

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::queue::{Queue, QueueState};
use super::{status, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vmm::bus::BusDevice;

/// One virtio-mmio transport and its device, as a snapshot keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
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
    #[serde(deserialize_with = "queues")]
    pub queues: Vec<QueueState>,
}

fn queues<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<QueueState>, D::Error> {
    crate::snapshot::codec::bounded(
        d,
        crate::snapshot::state::MAX_QUEUES,
        "queues in one virtio device",
    )
}

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5348_4d53; // "SMHS"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
/// Length of the shared memory region `SHMSel` selects (virtio 1.2, 4.2.2).
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_START: u64 = 0x100;
/// Size of the register window.
pub const MMIO_LEN: u64 = 0x1000;

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// Register state of one device and the device itself.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .into_iter()
            .map(Queue::new)
            .collect();
        MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            activated: false,
        }
    }

    /// The device status as the driver sees it.
    pub fn status(&self) -> u32 {
        let mut s = self.status;
        if self.interrupt.needs_reset() {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    /// Saves the registers and the queues (the device's live copies once activated).
    pub fn save(&self) -> TransportState {
        let live = if self.activated {
            self.device.live_queues()
        } else {
            None
        };
        let queues = match live {
            Some(q) if q.len() == self.queues.len() => q,
            _ => self.queues.clone(),
        };
        let states = queues.iter().map(Queue::state).collect();
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            activated: self.activated,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            queues: states,
        }
    }

    /// Rebuilds a transport from [`MmioTransport::save`] around a freshly opened `device`,
    /// re-activating it with the saved queues when it was live.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        state: &TransportState,
    ) -> Result<Self, String> {
        let mut t = MmioTransport::new(device, mem, interrupt);
        if state.device_type != t.device.device_type() {
            return Err(format!(
                "a virtio device of type {} was saved where this configuration has type {}",
                state.device_type,
                t.device.device_type()
            ));
        }
        if state.queues.len() != t.queues.len()
            || state
                .queues
                .iter()
                .zip(&t.queues)
                .any(|(s, q)| s.max_size != q.max_size)
        {
            return Err(format!(
                "the saved queues of virtio device type {} do not match the device",
                state.device_type
            ));
        }
        if state.driver_features & !t.device.features() != 0 {
            return Err(format!(
                "virtio device type {} no longer offers the features the driver accepted",
                state.device_type
            ));
        }
        t.queues = state.queues.iter().map(Queue::from_state).collect();
        t.queue_sel = state.queue_sel;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.driver_features = state.driver_features;
        t.status = state.status;
        t.interrupt
            .restore(state.interrupt_status, state.needs_reset);
        if state.activated {
            t.activate();
            if !t.activated {
                return Err(format!(
                    "virtio device type {} could not be re-activated with its saved queues",
                    state.device_type
                ));
            }
        }
        Ok(t)
    }

    /// Lets a re-activated device tell the driver about the restore (see
    /// [`VirtioDevice::restored`]). Call it once the interrupt controllers and vCPUs hold their
    /// saved state, or the interrupt it may raise is lost.
    pub fn after_restore(&mut self) {
        if self.activated {
            self.device.restored();
        }
    }

    /// Pauses or restarts the device's background work (see [`VirtioDevice::set_quiesced`]).
    pub fn set_quiesced(&mut self, quiesced: bool) {
        self.device.set_quiesced(quiesced);
    }

    /// Why a snapshot cannot carry the device's state now (see
    /// [`VirtioDevice::snapshot_refusal`]).
    pub fn snapshot_refusal(&self) -> Option<String> {
        self.device.snapshot_refusal()
    }

    /// What the device counted, if it is a network card.
    pub fn net_counters(&self) -> Option<super::net::NetCounters> {
        self.device.net_counters()
    }

    /// Stops the device for good (the VM is going away).
    pub fn shutdown(&mut self) {
        self.device.shutdown();
        self.activated = false;
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may only change while the queue is not live.
    fn queue_writable(&self) -> bool {
        !self.activated && self.status & status::FEATURES_OK != 0
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt.clear();
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits may only be added (except by a reset), in the order the spec prescribes.
        if value & self.status != self.status {
            self.interrupt.set_needs_reset();
            return;
        }
        let added = value & !self.status;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0
                && self.status & status::DRIVER != 0;
            if !ok {
                // FEATURES_OK does not stick; the driver sees that and gives up.
                self.status = value & !status::FEATURES_OK & !status::DRIVER_OK;
                return;
            }
        }
        if added & status::DRIVER_OK != 0 {
            if (value | self.status) & status::FEATURES_OK == 0 {
                self.interrupt.set_needs_reset();
                return;
            }
            self.status = value;
            self.activate();
            return;
        }
        self.status = value;
    }

    fn activate(&mut self) {
        if self.activated {
            return;
        }
        for q in self.queues.iter().filter(|q| q.ready) {
            if q.validate(&self.mem).is_err() {
                self.interrupt.set_needs_reset();
                return;
            }
        }
        let queues = self.queues.clone();
        match self
            .device
            .activate(self.mem.clone(), queues, self.interrupt.clone())
        {
            Ok(()) => self.activated = true,
            Err(_) => self.interrupt.set_needs_reset(),
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status(),
            REG_CONFIG_GENERATION => 0,
            // No device has shared memory regions; a length of -1 says so (a length of 0
            // would be a region, which Linux's virtio-fs driver would try to map for DAX).
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let writable = self.queue_writable();
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => set_low(&mut self.driver_features, v),
                    1 => set_high(&mut self.driver_features, v),
                    _ => {}
                }
            }
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM if writable => {
                if let Some(q) = self.selected_queue() {
                    // Checked at ready time against max_size and power of two.
                    q.size = v.min(u32::from(u16::MAX)) as u16;
                }
            }
            REG_QUEUE_READY if writable => {
                let mem = self.mem.clone();
                let interrupt = self.interrupt.clone();
                if let Some(q) = self.selected_queue() {
                    if v == 1 {
                        q.ready = true;
                        if q.validate(&mem).is_err() {
                            q.ready = false;
                            interrupt.set_needs_reset();
                        }
                    } else {
                        q.ready = false;
                    }
                }
            }
            REG_QUEUE_DESC_LOW if writable => {
                if let Some(q) = self.selected_queue() {
                    set_low(&mut q.desc_table, v)
                }
            }
            REG_QUEUE_DESC_HIGH if writable => {
                if let Some(q) = self.selected_queue() {
                    set_high(&mut q.desc_table, v)
                }
            }
            REG_QUEUE_DRIVER_LOW if writable => {
                if let Some(q) = self.selected_queue() {
                    set_low(&mut q.avail_ring, v)
                }
            }
            REG_QUEUE_DRIVER_HIGH if writable => {
                if let Some(q) = self.selected_queue() {
                    set_high(&mut q.avail_ring, v)
                }
            }
            REG_QUEUE_DEVICE_LOW if writable => {
                if let Some(q) = self.selected_queue() {
                    set_low(&mut q.used_ring, v)
                }
            }
            REG_QUEUE_DEVICE_HIGH if writable => {
                if let Some(q) = self.selected_queue() {
                    set_high(&mut q.used_ring, v)
                }
            }
            REG_QUEUE_NOTIFY if self.activated && (v as usize) < self.queues.len() => {
                self.device.notify(v as u16);
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.write_status(v),
            // Read-only registers, queue registers while live, and unknown offsets are ignored.
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_START {
            let off = (offset - CONFIG_START) as usize;
            let len = self.device.config_len();
            if off.checked_add(data.len()).is_some_and(|end| end <= len) {
                self.device.read_config(off, data);
            }
            return;
        }
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Configuration space of our devices is read-only; registers are 32-bit only.
        if offset < CONFIG_START && data.len() == 4 && offset.is_multiple_of(4) {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.write_reg(offset, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::queue::tests::{ram, AVAIL, DESC, USED};
    use vmm_sys_util::eventfd::EventFd;

    struct Dummy {
        activated: bool,
        notified: Vec<u16>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: usize, data: &mut [u8]) {
            data.fill(offset as u8 + 1);
        }
        fn config_len(&self) -> usize {
            8
        }
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            q: Vec<Queue>,
            _: Arc<Interrupt>,
        ) -> Result<(), String> {
            assert!(q[0].ready);
            self.activated = true;
            Ok(())
        }
        fn notify(&mut self, index: u16) {
            self.notified.push(index);
        }
        fn reset(&mut self) {
            self.activated = false;
        }
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn transport() -> MmioTransport {
        let ram = ram();
        let dev = Box::new(Dummy {
            activated: false,
            notified: vec![],
        });
        MmioTransport::new(
            dev,
            ram.mem.clone(),
            Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
        )
    }

    fn negotiate(t: &mut MmioTransport) {
        w(t, REG_STATUS, status::ACKNOWLEDGE);
        w(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, REG_DRIVER_FEATURES_SEL, 1);
        w(t, REG_DRIVER_FEATURES, 1);
        w(
            t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    #[test]
    fn identity_and_feature_negotiation() {
        let mut t = transport();
        assert_eq!(r(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 42);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        // Without VERSION_1 FEATURES_OK does not stick.
        w(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
        w(&mut t, REG_STATUS, 0);
        negotiate(&mut t);
        assert_ne!(r(&mut t, REG_STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn bad_queue_setup_marks_needs_reset_and_good_setup_activates() {
        let mut t = transport();
        negotiate(&mut t);
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 16);
        w(&mut t, REG_QUEUE_NUM, 12);
        w(&mut t, REG_QUEUE_DESC_LOW, DESC as u32);
        w(&mut t, REG_QUEUE_DRIVER_LOW, AVAIL as u32);
        w(&mut t, REG_QUEUE_DEVICE_LOW, USED as u32);
        w(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        assert_ne!(r(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(
            r(&mut t, REG_INTERRUPT_STATUS) & crate::devices::virtio::INT_CONFIG,
            0
        );
        // A reset clears it; a proper set-up activates the device.
        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        negotiate(&mut t);
        w(&mut t, REG_QUEUE_NUM, 8);
        w(&mut t, REG_QUEUE_DESC_LOW, DESC as u32);
        w(&mut t, REG_QUEUE_DRIVER_LOW, AVAIL as u32);
        w(&mut t, REG_QUEUE_DEVICE_LOW, USED as u32);
        w(&mut t, REG_QUEUE_DEVICE_HIGH, 0);
        w(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        w(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(t.activated);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        w(&mut t, REG_QUEUE_NOTIFY, 7); // no such queue: ignored
                                        // Queue registers are frozen while live.
        w(&mut t, REG_QUEUE_DESC_LOW, 0x5000);
        assert_eq!(t.queues[0].desc_table, DESC);
    }

    #[test]
    fn saved_state_restores_a_live_transport_and_refuses_a_mismatch() {
        let mut t = transport();
        negotiate(&mut t);
        w(&mut t, REG_QUEUE_NUM, 8);
        w(&mut t, REG_QUEUE_DESC_LOW, DESC as u32);
        w(&mut t, REG_QUEUE_DRIVER_LOW, AVAIL as u32);
        w(&mut t, REG_QUEUE_DEVICE_LOW, USED as u32);
        w(&mut t, REG_QUEUE_READY, 1);
        w(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(t.activated);
        let saved = t.save();
        assert!(saved.activated);
        assert_eq!(saved.driver_features, VIRTIO_F_VERSION_1);
        assert_eq!(saved.queues[0].size, 8);
        let dev = Box::new(Dummy {
            activated: false,
            notified: vec![],
        });
        let mem = t.mem.clone();
        let mut back = MmioTransport::restore(
            dev,
            mem.clone(),
            Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
            &saved,
        )
        .unwrap();
        assert!(back.activated);
        assert_eq!(back.save(), saved);
        assert_eq!(r(&mut back, REG_STATUS), t.status());
        w(&mut back, REG_QUEUE_NOTIFY, 0);

        let mut other = saved.clone();
        other.device_type = 2;
        let dev = Box::new(Dummy {
            activated: false,
            notified: vec![],
        });
        let err = MmioTransport::restore(
            dev,
            mem,
            Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
            &other,
        )
        .err()
        .unwrap();
        assert!(err.contains("type 2"), "{err}");
    }

    #[test]
    fn there_is_no_shared_memory_region() {
        let mut t = transport();
        for id in [0, 1, 255] {
            w(&mut t, 0x0ac, id);
            assert_eq!(r(&mut t, REG_SHM_LEN_LOW), u32::MAX);
            assert_eq!(r(&mut t, REG_SHM_LEN_HIGH), u32::MAX);
        }
    }

    #[test]
    fn wild_offsets_and_sizes_are_harmless() {
        let mut t = transport();
        let mut b = [0xaau8; 8];
        t.read(0x100 + 4, &mut b);
        assert_eq!(b, [0; 8], "config read past the end");
        let mut b = [0u8; 2];
        t.read(0x104, &mut b);
        assert_eq!(b, [5, 5]);
        let mut b = [0xaau8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0], "16-bit register read");
        for off in (0..0x1000).step_by(4) {
            w(&mut t, off, 0xffff_ffff);
            r(&mut t, off);
        }
        t.write(0x3, &[1]);
        t.write(0xfff, &[1, 2, 3, 4]);
    }
}
