//! Legacy port-I/O devices: 8250 serial console, i8042 (reset only), power-off and pvpanic ports.

mod serial;

pub use serial::{ConsoleBuffer, SerialConsole, SerialRegs};

use std::sync::Arc;

use crate::vmm::bus::BusDevice;
use crate::vmm::control::{Outcome, VmControl};

/// i8042 keyboard controller, reduced to what a guest needs to reset the machine: status reads
/// say "nothing pending", and command `0xfe` (pulse the reset line) ends the VM as `Reset`.
pub struct I8042 {
    control: Arc<VmControl>,
}

impl I8042 {
    pub const DATA_PORT: u64 = 0x60;
    pub const COMMAND_PORT: u64 = 0x64;
    const CMD_RESET: u8 = 0xfe;

    pub fn new(control: Arc<VmControl>) -> Self {
        I8042 { control }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // Registered once per port; only the command port gets writes with meaning.
        if data.first() == Some(&Self::CMD_RESET) {
            self.control.finish(Outcome::Reset {
                reason: "guest reset through the i8042 controller".into(),
            });
        }
    }
}

/// A data-port stub for the i8042 (reads 0, writes ignored).
pub struct I8042Data;

impl BusDevice for I8042Data {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// Power-off port (isa-debug-exit style, but the value is the exit code as written): a 1-, 2-
/// or 4-byte write of `N` ends the VM as `PowerOff(N)`. Reads return 0.
pub struct PowerOffPort {
    control: Arc<VmControl>,
}

impl PowerOffPort {
    pub const PORT: u64 = 0x501;
    pub const LEN: u64 = 4;

    pub fn new(control: Arc<VmControl>) -> Self {
        PowerOffPort { control }
    }
}

impl BusDevice for PowerOffPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        let mut raw = [0u8; 4];
        let n = data.len().min(4);
        raw[..n].copy_from_slice(&data[..n]);
        self.control.finish(Outcome::PowerOff {
            code: u32::from_le_bytes(raw),
        });
    }
}

/// pvpanic ISA port: reads advertise "panicked" and "crash loaded"; a write with bit 0 set ends
/// the VM as `Panic`.
pub struct PvPanic {
    control: Arc<VmControl>,
}

impl PvPanic {
    pub const PORT: u64 = 0x505;
    const PANICKED: u8 = 1;
    const CRASH_LOADED: u8 = 2;

    pub fn new(control: Arc<VmControl>) -> Self {
        PvPanic { control }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = Self::PANICKED | Self::CRASH_LOADED;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let v = data.first().copied().unwrap_or(0);
        if v & Self::PANICKED != 0 {
            let reason = self
                .control
                .panic_line()
                .unwrap_or_else(|| "guest kernel panic (pvpanic)".into());
            self.control.finish(Outcome::Panic { reason });
        } else if v & Self::CRASH_LOADED != 0 {
            self.control
                .note_panic_line("guest kernel crashed (pvpanic: crash loaded)".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_off_code_and_reset() {
        let c = Arc::new(VmControl::new(0));
        let mut p = PowerOffPort::new(c.clone());
        p.write(0, &[7, 1]);
        assert_eq!(c.outcome(), Some(Outcome::PowerOff { code: 0x107 }));
        let c = Arc::new(VmControl::new(0));
        let mut k = I8042::new(c.clone());
        k.write(0, &[0xd1]);
        assert_eq!(c.outcome(), None);
        k.write(0, &[0xfe]);
        assert_eq!(c.outcome().map(|o| o.kind()), Some("reset"));
        let c = Arc::new(VmControl::new(0));
        let mut pp = PvPanic::new(c.clone());
        let mut b = [0u8; 1];
        pp.read(0, &mut b);
        assert_eq!(b, [3]);
        pp.write(0, &[1]);
        assert_eq!(c.outcome().map(|o| o.kind()), Some("panic"));
    }
}
