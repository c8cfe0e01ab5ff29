//! Devices of the VMM: legacy port-I/O devices and virtio-mmio devices.
//!
//! Everything a guest controls (register values, queue addresses, descriptor chains, lengths)
//! is validated here: a misbehaving guest gets an error status or a device marked
//! `DEVICE_NEEDS_RESET`, never a VMM panic or a host access outside guest RAM.

pub mod legacy;
pub mod rate_limiter;
pub mod virtio;
