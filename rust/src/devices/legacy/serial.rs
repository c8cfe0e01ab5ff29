//! COM1: a 16550A-compatible UART (vm-superio) whose output goes to a bounded in-memory ring and
//! optionally a log file. Output is scanned for kernel panic lines.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::serial::{NoEvents, SerialState};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::bus::BusDevice;
use crate::vmm::control::{Outcome, VmControl};

/// The 8250 registers (vm-superio's state) as a snapshot keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
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
    #[serde(deserialize_with = "fifo")]
    pub in_buffer: Vec<u8>,
}

fn fifo<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    crate::snapshot::codec::bounded(
        d,
        crate::snapshot::state::MAX_SERIAL_FIFO,
        "bytes in the serial port's receive FIFO",
    )
}

/// Raises the serial IRQ through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The last `capacity` bytes of console output.
pub struct ConsoleBuffer {
    inner: Mutex<(VecDeque<u8>, u64)>,
    capacity: usize,
    first_byte: std::sync::OnceLock<std::time::Instant>,
}

impl ConsoleBuffer {
    pub fn new(capacity: usize) -> Self {
        ConsoleBuffer {
            inner: Mutex::new((VecDeque::new(), 0)),
            capacity,
            first_byte: std::sync::OnceLock::new(),
        }
    }

    pub fn push(&self, data: &[u8]) {
        crate::worker::console_ring::mirror(data);
        if !data.is_empty() {
            self.first_byte.get_or_init(std::time::Instant::now);
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (buf, dropped) = &mut *g;
        buf.extend(data);
        if buf.len() > self.capacity {
            let excess = buf.len() - self.capacity;
            buf.drain(..excess);
            *dropped += excess as u64;
        }
    }

    /// The kept bytes, oldest first.
    pub fn contents(&self) -> Vec<u8> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0.iter().copied().collect()
    }

    /// When the first byte arrived.
    pub fn first_byte_at(&self) -> Option<std::time::Instant> {
        self.first_byte.get().copied()
    }

    /// Bytes ever written (kept + dropped).
    pub fn total(&self) -> u64 {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0.len() as u64 + g.1
    }
}

const PANIC_MARKER: &str = "Kernel panic - not syncing";
const PANIC_END_MARKER: &str = "---[ end Kernel panic";
const MAX_LINE: usize = 512;

/// Where serial output goes.
pub struct ConsoleSink {
    buffer: Arc<ConsoleBuffer>,
    log: Option<File>,
    line: Vec<u8>,
    control: Arc<VmControl>,
}

impl ConsoleSink {
    fn scan(&mut self, data: &[u8]) {
        for &b in data {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line);
                let line = line.trim();
                if line.contains(PANIC_END_MARKER) {
                    let reason = self
                        .control
                        .panic_line()
                        .unwrap_or_else(|| "guest kernel panic".into());
                    self.control.finish(Outcome::Panic { reason });
                } else if let Some(start) = line.find(PANIC_MARKER) {
                    self.control.note_panic_line(line[start..].to_string());
                }
                self.line.clear();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer.push(data);
        if let Some(log) = &mut self.log {
            // A full disk must not stop the guest: drop the log and keep the ring.
            if log.write_all(data).is_err() {
                self.log = None;
            }
        }
        self.scan(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// COM1 on the port-I/O bus (8 registers at 0x3f8, IRQ 4).
pub struct SerialConsole {
    serial: Serial<IrqTrigger, NoEvents, ConsoleSink>,
}

impl SerialConsole {
    pub const PORT: u64 = 0x3f8;
    pub const LEN: u64 = 8;
    pub const IRQ: u32 = 4;

    pub fn new(
        irq: EventFd,
        buffer: Arc<ConsoleBuffer>,
        log: Option<File>,
        control: Arc<VmControl>,
    ) -> Self {
        let sink = ConsoleSink {
            buffer,
            log,
            line: Vec::new(),
            control,
        };
        SerialConsole {
            serial: Serial::new(IrqTrigger(irq), sink),
        }
    }

    /// A console whose UART registers come from a snapshot.
    pub fn from_state(
        state: &SerialRegs,
        irq: EventFd,
        buffer: Arc<ConsoleBuffer>,
        log: Option<File>,
        control: Arc<VmControl>,
    ) -> Result<Self, String> {
        let sink = ConsoleSink {
            buffer,
            log,
            line: Vec::new(),
            control,
        };
        let st = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let serial = Serial::from_state(&st, IrqTrigger(irq), NoEvents, sink)
            .map_err(|e| format!("the saved serial port state is invalid: {e:?}"))?;
        Ok(SerialConsole { serial })
    }

    /// The UART registers, for a snapshot.
    pub fn state(&self) -> SerialRegs {
        let s = self.serial.state();
        SerialRegs {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() == 1 && offset < Self::LEN {
            data[0] = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < Self::LEN {
            // An interrupt that cannot be raised (eventfd full) is not worth stopping for.
            let _ = self.serial.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_bytes() {
        let b = ConsoleBuffer::new(4);
        b.push(b"abc");
        b.push(b"def");
        assert_eq!(b.contents(), b"cdef");
        assert_eq!(b.total(), 6);
    }

    #[test]
    fn serial_output_lands_in_the_ring_and_panics_are_seen() {
        let control = Arc::new(VmControl::new(0));
        let buf = Arc::new(ConsoleBuffer::new(1 << 16));
        let mut s =
            SerialConsole::new(EventFd::new(0).unwrap(), buf.clone(), None, control.clone());
        for &c in b"hi\n[ 1.0] Kernel panic - not syncing: VFS\n" {
            s.write(0, &[c]);
        }
        assert!(buf.contents().starts_with(b"hi\n"));
        assert_eq!(
            control.panic_line().as_deref(),
            Some("Kernel panic - not syncing: VFS")
        );
        assert_eq!(control.outcome(), None);
        for &c in b"---[ end Kernel panic - not syncing: VFS ]---\n" {
            s.write(0, &[c]);
        }
        assert_eq!(control.outcome().map(|o| o.kind()), Some("panic"));
    }
}
