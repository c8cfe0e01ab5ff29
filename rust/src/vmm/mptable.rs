//! The MultiProcessor table (Intel MP specification 1.4) that tells a guest kernel without ACPI
//! how many CPUs it has, where its I/O APIC is, and how interrupt lines reach it.
//!
//! Without it a Linux guest sees one CPU and routes every interrupt through the legacy PIC,
//! which has 16 lines; with it the guest brings up the other vCPUs (INIT/SIPI through the
//! in-kernel local APICs) and programs the in-kernel I/O APIC, whose 24 pins KVM's default
//! routing maps one to one onto GSIs 0..=23.
//!
//! The table sits in the last KiB of base memory (`0x9fc00`), one of the places the MP
//! specification tells the guest to search, and which the PVH memory map reports as reserved.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::config::MAX_VCPUS;

/// Guest physical address of the table (the floating pointer, then the configuration table):
/// the start of the region the PVH memory map reserves below 1 MiB.
pub const MPTABLE_ADDR: u64 = super::boot::EBDA_START;
/// Bytes the table may use: up to the end of base memory at `0xa0000`.
const MPTABLE_SPACE: usize = 0x400;
/// Where the local APICs and the I/O APIC sit (their architectural defaults, which KVM's
/// in-kernel irqchip emulates).
pub const LOCAL_APIC_ADDR: u32 = 0xfee0_0000;
pub const IO_APIC_ADDR: u32 = 0xfec0_0000;
/// Input pins of KVM's in-kernel I/O APIC; every one is described to the guest.
pub const IO_APIC_PINS: u8 = 24;

const SPEC_REVISION: u8 = 4;
const LOCAL_APIC_VERSION: u8 = 0x14;
const IO_APIC_VERSION: u8 = 0x11;
/// CPUID leaf 1 EDX bits the processor entries claim: an FPU and a local APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// Family 6 in the CPUID leaf 1 EAX format; guests read the real value from CPUID.
const CPU_SIGNATURE: u32 = 6 << 8;
const ISA_BUS: u8 = 0;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IO_APIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INTERRUPT_VECTORED: u8 = 0;
const INTERRUPT_NMI: u8 = 1;
const INTERRUPT_EXTINT: u8 = 3;
/// Polarity and trigger mode "conform to the bus": edge, active high on ISA, which is how the
/// VMM's irqfds deliver (one pulse per interrupt).
const CONFORMING: u16 = 0;
/// "Every local APIC" as a local interrupt's destination.
const ALL_LOCAL_APICS: u8 = 0xff;

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const PROCESSOR_LEN: usize = 20;
const SMALL_ENTRY_LEN: usize = 8;

/// Why the table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("an MP table describes 1 to {MAX_VCPUS} vCPUs, not {0}")]
    VcpuCount(u8),
    #[error("cannot write the MP table to guest memory: {0}")]
    Memory(String),
}

/// Size of the whole table for `vcpus` processors.
const fn table_len(vcpus: usize) -> usize {
    FLOATING_POINTER_LEN
        + HEADER_LEN
        + vcpus * PROCESSOR_LEN
        + SMALL_ENTRY_LEN // the ISA bus
        + SMALL_ENTRY_LEN // the I/O APIC
        + IO_APIC_PINS as usize * SMALL_ENTRY_LEN
        + 2 * SMALL_ENTRY_LEN // LINT0 and LINT1
}

// The largest table must fit below 0xa0000.
const _: () = assert!(table_len(MAX_VCPUS as usize) <= MPTABLE_SPACE);

/// The byte that makes `bytes` sum to zero, as every MP structure's checksum must.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The I/O APIC's ID: the one after the last local APIC's.
pub fn io_apic_id(vcpus: u8) -> u8 {
    vcpus
}

fn processor(id: u8) -> [u8; PROCESSOR_LEN] {
    let mut e = [0u8; PROCESSOR_LEN];
    e[0] = ENTRY_PROCESSOR;
    e[1] = id;
    e[2] = LOCAL_APIC_VERSION;
    e[3] = 1 | if id == 0 { 2 } else { 0 }; // enabled; vCPU 0 is the bootstrap processor
    e[4..8].copy_from_slice(&CPU_SIGNATURE.to_le_bytes());
    e[8..12].copy_from_slice(&CPU_FEATURES.to_le_bytes());
    e
}

fn interrupt(kind: u8, irq_type: u8, bus_irq: u8, dest: u8, dest_pin: u8) -> [u8; 8] {
    let mut e = [0u8; SMALL_ENTRY_LEN];
    e[0] = kind;
    e[1] = irq_type;
    e[2..4].copy_from_slice(&CONFORMING.to_le_bytes());
    e[4] = ISA_BUS;
    e[5] = bus_irq;
    e[6] = dest;
    e[7] = dest_pin;
    e
}

/// The configuration table's entries: the processors, the ISA bus every device interrupt is
/// said to come from, the I/O APIC, ISA IRQ `n` on its pin `n` for every pin, and the local
/// interrupts firmware sets up (the PIC on vCPU 0's LINT0, NMI on every LINT1).
fn entries(vcpus: u8) -> (Vec<u8>, u16) {
    let io_apic = io_apic_id(vcpus);
    let mut out = Vec::new();
    let mut count = 0u16;
    let mut push = |bytes: &[u8]| {
        out.extend_from_slice(bytes);
        count += 1;
    };
    for id in 0..vcpus {
        push(&processor(id));
    }
    push(&[ENTRY_BUS, ISA_BUS, b'I', b'S', b'A', b' ', b' ', b' ']);
    let mut apic = [ENTRY_IO_APIC, io_apic, IO_APIC_VERSION, 1, 0, 0, 0, 0];
    apic[4..8].copy_from_slice(&IO_APIC_ADDR.to_le_bytes());
    push(&apic);
    for pin in 0..IO_APIC_PINS {
        push(&interrupt(
            ENTRY_IO_INTERRUPT,
            INTERRUPT_VECTORED,
            pin,
            io_apic,
            pin,
        ));
    }
    push(&interrupt(ENTRY_LOCAL_INTERRUPT, INTERRUPT_EXTINT, 0, 0, 0));
    push(&interrupt(
        ENTRY_LOCAL_INTERRUPT,
        INTERRUPT_NMI,
        0,
        ALL_LOCAL_APICS,
        1,
    ));
    (out, count)
}

/// The whole table as it lies in guest memory from [`MPTABLE_ADDR`].
pub fn build(vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(vcpus));
    }
    let (body, count) = entries(vcpus);
    let config_addr = MPTABLE_ADDR + FLOATING_POINTER_LEN as u64;
    let base_len = u16::try_from(HEADER_LEN + body.len()).expect("bounded by MPTABLE_SPACE");

    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(b"PCMP");
    header[4..6].copy_from_slice(&base_len.to_le_bytes());
    header[6] = SPEC_REVISION;
    header[8..16].copy_from_slice(b"SUPERMCH");
    header[16..28].copy_from_slice(b"MICROVM     ");
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&LOCAL_APIC_ADDR.to_le_bytes());
    let mut config = header.to_vec();
    config.extend_from_slice(&body);
    config[7] = checksum(&config);

    let mut pointer = [0u8; FLOATING_POINTER_LEN];
    pointer[0..4].copy_from_slice(b"_MP_");
    pointer[4..8].copy_from_slice(
        &u32::try_from(config_addr)
            .expect("below 1 MiB")
            .to_le_bytes(),
    );
    pointer[8] = 1; // length in 16-byte units
    pointer[9] = SPEC_REVISION;
    // feature bytes 0: the configuration table above is present, and no IMCR (virtual wire mode)
    pointer[10] = checksum(&pointer);

    let mut table = pointer.to_vec();
    table.extend_from_slice(&config);
    debug_assert_eq!(table.len(), table_len(usize::from(vcpus)));
    Ok(table)
}

/// Writes the table for `vcpus` processors at [`MPTABLE_ADDR`].
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MpTableError> {
    let table = build(vcpus)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_ADDR))
        .map_err(|e| MpTableError::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entries of a table, read back the way a guest parses them.
    fn parse(table: &[u8]) -> Vec<&[u8]> {
        let config = &table[FLOATING_POINTER_LEN..];
        let count = u16::from_le_bytes([config[34], config[35]]);
        let mut rest = &config[HEADER_LEN..];
        let mut out = Vec::new();
        for _ in 0..count {
            let len = if rest[0] == ENTRY_PROCESSOR {
                PROCESSOR_LEN
            } else {
                SMALL_ENTRY_LEN
            };
            out.push(&rest[..len]);
            rest = &rest[len..];
        }
        assert!(rest.is_empty(), "bytes after the last entry");
        out
    }

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)) == 0
    }

    #[test]
    fn checksums_lengths_and_pointer_agree() {
        for vcpus in [1, 2, 4, MAX_VCPUS] {
            let table = build(vcpus).unwrap();
            assert!(table.len() <= MPTABLE_SPACE);
            let (pointer, config) = table.split_at(FLOATING_POINTER_LEN);
            assert_eq!(&pointer[..4], b"_MP_");
            assert!(sums_to_zero(pointer));
            let at = u32::from_le_bytes(pointer[4..8].try_into().unwrap());
            assert_eq!(u64::from(at), MPTABLE_ADDR + FLOATING_POINTER_LEN as u64);
            assert_eq!(&config[..4], b"PCMP");
            let len = u16::from_le_bytes([config[4], config[5]]);
            assert_eq!(usize::from(len), config.len());
            assert!(sums_to_zero(config));
        }
    }

    #[test]
    fn one_processor_per_vcpu_and_vcpu_0_boots() {
        let table = build(4).unwrap();
        let cpus: Vec<_> = parse(&table)
            .into_iter()
            .filter(|e| e[0] == ENTRY_PROCESSOR)
            .collect();
        assert_eq!(cpus.len(), 4);
        for (id, cpu) in cpus.iter().enumerate() {
            assert_eq!(usize::from(cpu[1]), id);
            assert_eq!(cpu[3] & 1, 1, "enabled");
            assert_eq!(
                cpu[3] & 2 != 0,
                id == 0,
                "only vCPU 0 is the bootstrap processor"
            );
        }
    }

    #[test]
    fn every_io_apic_pin_has_its_own_isa_irq() {
        let table = build(2).unwrap();
        let entries = parse(&table);
        let apic = entries.iter().find(|e| e[0] == ENTRY_IO_APIC).unwrap();
        assert_eq!(apic[1], io_apic_id(2));
        assert_eq!(
            u32::from_le_bytes(apic[4..8].try_into().unwrap()),
            IO_APIC_ADDR
        );
        let pins: Vec<(u8, u8)> = entries
            .iter()
            .filter(|e| e[0] == ENTRY_IO_INTERRUPT)
            .map(|e| {
                assert_eq!((e[4], e[6]), (ISA_BUS, io_apic_id(2)));
                (e[5], e[7])
            })
            .collect();
        assert_eq!(pins, (0..IO_APIC_PINS).map(|p| (p, p)).collect::<Vec<_>>());
        let lint: Vec<_> = entries
            .iter()
            .filter(|e| e[0] == ENTRY_LOCAL_INTERRUPT)
            .map(|e| (e[1], e[6], e[7]))
            .collect();
        assert_eq!(
            lint,
            [
                (INTERRUPT_EXTINT, 0, 0),
                (INTERRUPT_NMI, ALL_LOCAL_APICS, 1)
            ]
        );
    }

    #[test]
    fn vcpu_counts_out_of_range_are_refused() {
        assert!(matches!(build(0), Err(MpTableError::VcpuCount(0))));
        assert!(build(MAX_VCPUS + 1).is_err());
    }
}
