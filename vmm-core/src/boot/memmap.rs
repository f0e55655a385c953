//! The guest's e820 memory map, shared by the zero page and the PVH start info so both boot
//! protocols describe memory identically.

use crate::arch::layout::{EBDA_START, HIMEM_START};

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

/// One e820 range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRange {
    /// First byte.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The memory map for guest RAM `regions` (start, length): base memory up to the EBDA, the
/// EBDA/VGA/BIOS area reserved (it holds the MP table), then the RAM from 1 MiB on, region by
/// region (the MMIO gap below 4 GiB is simply absent).
pub fn memory_map(regions: impl IntoIterator<Item = (u64, u64)>) -> Vec<MemoryRange> {
    let mut map = vec![
        MemoryRange { addr: 0, size: EBDA_START, kind: E820_RAM },
        MemoryRange { addr: EBDA_START, size: HIMEM_START - EBDA_START, kind: E820_RESERVED },
    ];
    for (start, len) in regions {
        let from = start.max(HIMEM_START);
        let end = start + len;
        if end > from {
            map.push(MemoryRange { addr: from, size: end - from, kind: E820_RAM });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::{ram_regions, MMIO_GAP_END, MMIO_GAP_START};

    #[test]
    fn small_guest_has_base_memory_a_hole_and_high_memory() {
        let map = memory_map(ram_regions(128 << 20));
        assert_eq!(
            map,
            vec![
                MemoryRange { addr: 0, size: 0x9fc00, kind: E820_RAM },
                MemoryRange { addr: 0x9fc00, size: 0x60400, kind: E820_RESERVED },
                MemoryRange { addr: 0x10_0000, size: (128 << 20) - 0x10_0000, kind: E820_RAM },
            ]
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let map = memory_map(ram_regions(8 << 30));
        assert_eq!(map.len(), 4);
        assert_eq!(map[2], MemoryRange { addr: HIMEM_START, size: MMIO_GAP_START - HIMEM_START, kind: E820_RAM });
        assert_eq!(map[3], MemoryRange { addr: MMIO_GAP_END, size: (8 << 30) - MMIO_GAP_START, kind: E820_RAM });
    }
}
