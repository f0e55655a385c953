//! The Intel MultiProcessor Specification 1.4 table: how the guest learns its CPUs (APIC IDs
//! 0..n, CPU 0 the bootstrap processor), the ISA bus, the IOAPIC and how legacy IRQs reach it.
//! Linux finds the floating pointer by scanning the last KiB of base memory, where it is written.
//!
//! The table is serialized field by field (little endian) rather than through packed structs, so
//! no `unsafe` byte-view impls are needed.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START, LAST_IRQ, LOW_MEM_END};
use crate::devices::virtio::GuestMemory;

/// Size of the MP floating pointer structure.
pub const MPF_SIZE: usize = 16;
/// Size of the MP configuration table header.
pub const HEADER_SIZE: usize = 44;
/// Size of a processor entry.
pub const PROCESSOR_ENTRY_SIZE: usize = 20;
/// Size of every other entry type.
pub const ENTRY_SIZE: usize = 8;

/// Entry type: processor.
pub const MP_PROCESSOR: u8 = 0;
/// Entry type: bus.
pub const MP_BUS: u8 = 1;
/// Entry type: I/O APIC.
pub const MP_IOAPIC: u8 = 2;
/// Entry type: I/O interrupt assignment.
pub const MP_INTSRC: u8 = 3;
/// Entry type: local interrupt assignment.
pub const MP_LINTSRC: u8 = 4;

/// Interrupt type: vectored interrupt from the IOAPIC.
pub const MP_INT: u8 = 0;
/// Interrupt type: NMI.
pub const MP_NMI: u8 = 1;
/// Interrupt type: external (8259-compatible) interrupt.
pub const MP_EXTINT: u8 = 3;

/// Processor flag: enabled.
pub const CPU_ENABLED: u8 = 1;
/// Processor flag: bootstrap processor.
pub const CPU_BOOTSTRAP: u8 = 2;

/// MP specification revision 1.4.
const SPEC_REV: u8 = 4;
/// Local APIC version reported for every CPU (an integrated xAPIC).
const APIC_VERSION: u8 = 0x14;
/// IOAPIC version (82093AA-compatible, as KVM's in-kernel IOAPIC reports).
const IOAPIC_VERSION: u8 = 0x11;
/// CPU signature: family 6; Linux only prints it.
const CPU_SIGNATURE: u32 = 0x600;
/// CPU feature flags: FPU and on-chip APIC.
const CPU_FEATURES: u32 = (1 << 9) | 1;
/// Polarity and trigger mode "conform to the bus".
const CONFORMING: u16 = 0;
/// The destination APIC ID meaning "all local APICs".
const ALL_APICS: u8 = 0xff;
/// The only bus.
const ISA_BUS_ID: u8 = 0;

/// An MP table that cannot be built or written.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// Zero CPUs.
    #[error("the mp table needs at least one cpu")]
    NoCpus,
    /// The table for this many CPUs does not fit below the 640 KiB boundary.
    #[error("the mp table for {cpus} cpus does not fit in the {space} bytes at the ebda, at most {max} cpus do")]
    TooManyCpus {
        /// Requested CPU count.
        cpus: u8,
        /// Bytes available.
        space: usize,
        /// Largest CPU count that fits.
        max: usize,
    },
    /// Writing to guest memory failed.
    #[error("cannot write the mp table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Little-endian byte appender.
#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// The value that makes `bytes` sum to zero modulo 256.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)).wrapping_neg()
}

/// Size of the whole structure (floating pointer + table) for `cpus` CPUs.
pub fn table_size(cpus: usize) -> usize {
    let io_interrupts = LAST_IRQ as usize + 1;
    MPF_SIZE + HEADER_SIZE + cpus * PROCESSOR_ENTRY_SIZE + ENTRY_SIZE * (2 + io_interrupts + 2)
}

fn entries(cpus: u8) -> (Writer, u16) {
    let ioapic_id = cpus;
    let mut w = Writer::default();
    for apic_id in 0..cpus {
        let flags = if apic_id == 0 { CPU_ENABLED | CPU_BOOTSTRAP } else { CPU_ENABLED };
        w.u8(MP_PROCESSOR).u8(apic_id).u8(APIC_VERSION).u8(flags).u32(CPU_SIGNATURE).u32(CPU_FEATURES).u32(0).u32(0);
    }
    w.u8(MP_BUS).u8(ISA_BUS_ID).bytes(b"ISA   ");
    w.u8(MP_IOAPIC).u8(ioapic_id).u8(IOAPIC_VERSION).u8(1).u32(IOAPIC_START as u32);
    // ISA IRQ n arrives on IOAPIC pin n, for every pin, as KVM's default GSI routing does.
    for irq in 0..=LAST_IRQ as u8 {
        w.u8(MP_INTSRC).u8(MP_INT).u16(CONFORMING).u8(ISA_BUS_ID).u8(irq).u8(ioapic_id).u8(irq);
    }
    // Virtual wire mode: the PIC reaches the BSP on LINT0, NMIs reach every CPU on LINT1.
    w.u8(MP_LINTSRC).u8(MP_EXTINT).u16(CONFORMING).u8(ISA_BUS_ID).u8(0).u8(0).u8(0);
    w.u8(MP_LINTSRC).u8(MP_NMI).u16(CONFORMING).u8(ISA_BUS_ID).u8(0).u8(ALL_APICS).u8(1);
    let count = u16::from(cpus) + 2 + (LAST_IRQ as u16 + 1) + 2;
    (w, count)
}

/// Builds the floating pointer followed by the configuration table, to be placed at `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 {
        return Err(MpTableError::NoCpus);
    }
    let space = (LOW_MEM_END - EBDA_START) as usize;
    if table_size(usize::from(cpus)) > space {
        let max = (space - table_size(0)) / PROCESSOR_ENTRY_SIZE;
        return Err(MpTableError::TooManyCpus { cpus, space, max });
    }
    let (body, count) = entries(cpus);
    let table_len = HEADER_SIZE + body.0.len();

    let mut table = Writer::default();
    table.bytes(b"PCMP").u16(table_len as u16).u8(SPEC_REV).u8(0);
    table.bytes(b"IGNITE  ").bytes(b"MICROVM     ");
    table.u32(0).u16(0).u16(count).u32(APIC_START as u32).u16(0).u8(0).u8(0);
    table.bytes(&body.0);
    table.0[7] = checksum(&table.0);

    let mut mpf = Writer::default();
    let table_addr = (base + MPF_SIZE as u64) as u32;
    // Length in 16-byte units; feature byte 1 = 0 says a configuration table is present, feature
    // byte 2 bit 7 = 0 says virtual wire mode (no IMCR).
    mpf.bytes(b"_MP_").u32(table_addr).u8(1).u8(SPEC_REV).u8(0).bytes(&[0; 5]);
    mpf.0[10] = checksum(&mpf.0);

    mpf.bytes(&table.0);
    Ok(mpf.0)
}

/// Writes the MP table for `cpus` CPUs at [`EBDA_START`].
pub fn setup_mptable(mem: &GuestMemory, cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START)).map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    /// Parses the table read back from guest memory: (entry type, entry bytes) in order.
    fn parse(mem: &GuestMemory) -> Vec<(u8, Vec<u8>)> {
        let mut mpf = [0u8; MPF_SIZE];
        mem.read_slice(&mut mpf, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&mpf[0..4], b"_MP_");
        assert_eq!(sum(&mpf), 0, "floating pointer checksum");
        assert_eq!((mpf[8], mpf[9], mpf[11]), (1, 4, 0));
        let table_addr = u64::from(u32_at(&mpf, 4));
        let mut header = [0u8; HEADER_SIZE];
        mem.read_slice(&mut header, GuestAddress(table_addr)).unwrap();
        assert_eq!(&header[0..4], b"PCMP");
        assert_eq!(u32_at(&header, 36), APIC_START as u32);
        let len = usize::from(u16_at(&header, 4));
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(table_addr)).unwrap();
        assert_eq!(sum(&table), 0, "table checksum");
        assert!(table_addr + len as u64 <= LOW_MEM_END);

        let mut entries = Vec::new();
        let mut at = HEADER_SIZE;
        while at < len {
            let size = if table[at] == MP_PROCESSOR { PROCESSOR_ENTRY_SIZE } else { ENTRY_SIZE };
            entries.push((table[at], table[at..at + size].to_vec()));
            at += size;
        }
        assert_eq!(at, len);
        assert_eq!(usize::from(u16_at(&header, 34)), entries.len(), "entry count");
        entries
    }

    #[test]
    fn table_parses_back_with_correct_checksums_and_counts() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_mptable(&mem, 4).unwrap();
        let entries = parse(&mem);
        let of = |kind| entries.iter().filter(|(t, _)| *t == kind).map(|(_, e)| e.clone()).collect::<Vec<_>>();

        let cpus = of(MP_PROCESSOR);
        assert_eq!(cpus.iter().map(|e| e[1]).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
        assert_eq!(cpus.iter().map(|e| e[3]).collect::<Vec<_>>(), vec![3, 1, 1, 1]);
        assert_eq!(of(MP_BUS), vec![b"\x01\x00ISA   ".to_vec()]);
        let ioapic = of(MP_IOAPIC);
        assert_eq!(ioapic.len(), 1);
        assert_eq!((ioapic[0][1], ioapic[0][3], u32_at(&ioapic[0], 4)), (4, 1, IOAPIC_START as u32));
        let io = of(MP_INTSRC);
        assert_eq!(io.len(), LAST_IRQ as usize + 1);
        for (pin, e) in io.iter().enumerate() {
            assert_eq!(e, &vec![MP_INTSRC, MP_INT, 0, 0, 0, pin as u8, 4, pin as u8]);
        }
        let lint = of(MP_LINTSRC);
        assert_eq!(
            lint,
            vec![vec![MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0, 0], vec![MP_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xff, 1]]
        );
    }

    #[test]
    fn the_largest_vcpu_count_fits_and_more_is_an_error() {
        let max = usize::from(crate::config::MAX_VCPUS);
        assert!(table_size(max) <= (LOW_MEM_END - EBDA_START) as usize);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup_mptable(&mem, crate::config::MAX_VCPUS).unwrap();
        assert_eq!(parse(&mem).iter().filter(|(t, _)| *t == MP_PROCESSOR).count(), max);
        let err = build(200, EBDA_START).unwrap_err();
        assert!(matches!(err, MpTableError::TooManyCpus { cpus: 200, max: 37, .. }), "{err}");
        assert!(matches!(build(0, EBDA_START), Err(MpTableError::NoCpus)));
    }
}
