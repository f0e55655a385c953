//! The zero page (`boot_params`) of the 64-bit Linux boot protocol, at [`ZERO_PAGE_START`].

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use vm_memory::GuestAddress;

use super::initrd::Initrd;
use super::kernel::HDRS_MAGIC;
use super::memmap::MemoryRange;
use super::BootError;
use crate::arch::layout::{CMDLINE_START, ZERO_PAGE_START};
use crate::devices::virtio::GuestMemory;

/// `boot_flag`: the boot sector signature.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `type_of_loader`: "other" (no assigned loader ID).
const LOADER_TYPE_OTHER: u8 = 0xff;
/// `kernel_alignment` for an ELF kernel, which carries no setup header (16 MiB, the x86_64
/// default `CONFIG_PHYSICAL_ALIGN` upper bound; must be non-zero).
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// Builds the zero page: the kernel's own setup header for a bzImage (else a blank one), the
/// loader fields, the command line, the initrd and the e820 map.
pub(crate) fn zero_page(
    header: Option<setup_header>,
    cmdline_size: usize,
    initrd: Option<&Initrd>,
    map: &[MemoryRange],
) -> Result<boot_params, BootError> {
    let mut hdr = header.unwrap_or(setup_header { kernel_alignment: DEFAULT_KERNEL_ALIGNMENT, ..Default::default() });
    hdr.type_of_loader = LOADER_TYPE_OTHER;
    hdr.boot_flag = BOOT_FLAG_MAGIC;
    hdr.header = HDRS_MAGIC;
    // Both fit in 32 bits: the command line sits below 1 MiB and is at most 2 KiB long.
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline_size as u32;
    if let Some(initrd) = initrd {
        // The initrd is placed below the MMIO gap, so below 4 GiB.
        hdr.ramdisk_image = initrd.addr as u32;
        hdr.ramdisk_size = initrd.size as u32;
    }

    let mut params = boot_params { hdr, ..Default::default() };
    let max = params.e820_table.len();
    if map.len() > max {
        return Err(BootError::MemoryMapTooLarge { what: "zero page", entries: map.len(), max });
    }
    for (slot, range) in map.iter().enumerate() {
        params.e820_table[slot] = boot_e820_entry { addr: range.addr, size: range.size, r#type: range.kind };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

/// Writes the zero page at [`ZERO_PAGE_START`].
pub(crate) fn write_zero_page(
    mem: &GuestMemory,
    header: Option<setup_header>,
    cmdline_size: usize,
    initrd: Option<&Initrd>,
    map: &[MemoryRange],
) -> Result<(), BootError> {
    let params = zero_page(header, cmdline_size, initrd, map)?;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&params, GuestAddress(ZERO_PAGE_START)), mem)
        .map_err(|source| BootError::Configurator { what: "zero page", source })
}
