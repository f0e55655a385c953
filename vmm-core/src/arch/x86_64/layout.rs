//! The guest physical memory map and interrupt layout, in one place so the boot code, the MP table,
//! the e820 map and the device manager cannot disagree.
//!
//! ```text
//! 0x0000_0500  GDT              0x0000_0520  IDT
//! 0x0000_6000  PVH start_info   0x0000_6040  PVH module list   0x0000_6100 PVH memory map
//! 0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack top   0x0000_9000  PML4  0xa000 PDPT  0xb000-0xefff 4 PDs (identity map of 4 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: MP floating pointer and MP configuration table
//! 0x000a_0000  legacy VGA/ROM hole (reserved in e820)
//! 0x0010_0000  kernel load address (HIMEM_START)
//! 0xd000_0000  32-bit MMIO gap: virtio-mmio devices, then IOAPIC (0xfec0_0000) and LAPIC (0xfee0_0000)
//! 0x1_0000_0000 memory above the gap when the guest has more than 3.25 GiB
//! ```

/// Where the GDT is written.
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the (empty) IDT is written.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map entries.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4 of the boot identity mapping.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table of the boot identity mapping.
pub const PDPTE_START: u64 = 0xa000;
/// First of [`PDE_COUNT`] page directories (2 MiB pages) of the boot identity mapping.
pub const PDE_START: u64 = 0xb000;
/// Number of page directories: the boot identity mapping covers 4 GiB, so the MMIO gap is reachable
/// before the guest builds its own page tables.
pub const PDE_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line, including the terminating NUL (x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table lives.
pub const EBDA_START: u64 = 0x9fc00;
/// End of usable low memory (the 640 KiB boundary).
pub const LOW_MEM_END: u64 = 0xa0000;
/// Where the kernel is loaded and where usable high memory begins.
pub const HIMEM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End (exclusive) of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// IOAPIC base address (KVM's in-kernel IOAPIC).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_START: u64 = 0xfee0_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;

/// Legacy IRQ of the i8042 keyboard controller.
pub const I8042_IRQ: u32 = 1;
/// Legacy IRQ of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// First IRQ handed to virtio devices; they take consecutive lines up to [`LAST_IRQ`].
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// Highest IOAPIC pin (KVM's IOAPIC has 24).
pub const LAST_IRQ: u32 = 23;
/// How many virtio-mmio devices fit: one IRQ line each.
pub const MAX_VIRTIO_DEVICES: usize = (LAST_IRQ - VIRTIO_FIRST_IRQ + 1) as usize;

/// COM1 I/O port base.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// i8042 data port; the command/status port is at +4.
pub const I8042_PORT_BASE: u16 = 0x60;
/// The ignite power-control port: a guest that writes a byte here powers the VM off, and the byte is
/// reported as the guest's exit code (the same port and width as QEMU's `isa-debug-exit`).
pub const POWER_PORT: u16 = 0xf4;

/// The virtio-mmio window and IRQ of the `index`-th virtio device.
pub fn virtio_slot(index: usize) -> (u64, u32) {
    (VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE, VIRTIO_FIRST_IRQ + index as u32)
}

/// The guest RAM regions for `mem_size` bytes: one region below the MMIO gap, and a second one above
/// 4 GiB for what does not fit below it.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_regions_skip_the_mmio_gap() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_regions(4 << 30), vec![(0, MMIO_GAP_START), (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)]);
    }

    #[test]
    fn virtio_slots_stay_below_the_ioapic() {
        let (addr, irq) = virtio_slot(MAX_VIRTIO_DEVICES - 1);
        assert!(addr + VIRTIO_MMIO_SIZE <= IOAPIC_START);
        assert_eq!(irq, LAST_IRQ);
    }
}
