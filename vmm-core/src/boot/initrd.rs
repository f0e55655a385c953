//! Initrd placement: as high as possible in the RAM that starts at address 0, so the kernel's
//! own early allocations (which grow upward from its end) do not collide with it.

use std::fs::File;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::BootError;
use crate::devices::virtio::GuestMemory;

/// Guest page size; the boot protocol wants the initrd page-aligned.
const PAGE_SIZE: u64 = 0x1000;

/// Where the initrd landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Initrd {
    /// Guest physical address of the first byte.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Chooses the page-aligned address for `size` bytes: as high as possible below `high`, not below
/// `low`.
pub(crate) fn place(size: u64, low: u64, high: u64) -> Option<u64> {
    let low = low.checked_next_multiple_of(PAGE_SIZE)?;
    let addr = high.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= low).then_some(addr)
}

/// Loads the initrd at `path` above `kernel_end` and below both the end of low RAM (which is
/// below the 32-bit MMIO gap, so below 4 GiB) and the kernel's `initrd_addr_max` if it has one.
pub(crate) fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    addr_max: Option<u64>,
) -> Result<Initrd, BootError> {
    let read_err = |source| BootError::InitrdRead { path: path.to_owned(), source };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();

    let low_ram_end = mem.find_region(GuestAddress(0)).map_or(0, |region| region.len());
    let high = addr_max.map_or(low_ram_end, |max| low_ram_end.min(max.saturating_add(1)));
    let too_large = || BootError::InitrdTooLarge { path: path.to_owned(), size, low: kernel_end, high };
    let addr = place(size, kernel_end, high).ok_or_else(too_large)?;
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|source| BootError::InitrdLoad { path: path.to_owned(), source })?;
    Ok(Initrd { addr, size })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_is_page_aligned_and_as_high_as_possible() {
        assert_eq!(place(0x1800, 0x20_0000, 0x800_0000), Some(0x7ff_e000));
        assert_eq!(place(0x1000, 0x20_0000, 0x800_0000), Some(0x7ff_f000));
        // Exactly fills the room between the (page-rounded) kernel end and the top.
        assert_eq!(place(0x1000, 0x7ff_e001, 0x800_0000), Some(0x7ff_f000));
        assert_eq!(place(0x1001, 0x7ff_e001, 0x800_0000), None);
        assert_eq!(place(0x900_0000, 0, 0x800_0000), None);
    }
}
