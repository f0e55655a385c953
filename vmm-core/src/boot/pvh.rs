//! The PVH `hvm_start_info` at [`PVH_INFO_START`], with the initrd as module 0 at
//! [`PVH_MODLIST_START`] and the memory map at [`PVH_MEMMAP_START`].

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::GuestAddress;

use super::initrd::Initrd;
use super::memmap::MemoryRange;
use super::BootError;
use crate::arch::layout::{CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START};
use crate::devices::virtio::GuestMemory;

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// The `hvm_start_info` version with a memory map.
const START_INFO_VERSION: u32 = 1;

/// Writes the start info, module list and memory map.
pub(crate) fn write_start_info(
    mem: &GuestMemory,
    initrd: Option<&Initrd>,
    map: &[MemoryRange],
) -> Result<(), BootError> {
    // The memory map runs from PVH_MEMMAP_START up to the zero page, which PVH does not use but
    // which the layout reserves.
    let max = (ZERO_PAGE_START - PVH_MEMMAP_START) as usize / size_of::<hvm_memmap_table_entry>();
    if map.len() > max {
        return Err(BootError::MemoryMapTooLarge { what: "pvh memory map", entries: map.len(), max });
    }
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|range| hvm_memmap_table_entry { addr: range.addr, size: range.size, type_: range.kind, reserved: 0 })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|initrd| hvm_modlist_entry { paddr: initrd.addr, size: initrd.size, ..Default::default() })
        .into_iter()
        .collect();

    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: START_INFO_VERSION,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { PVH_MODLIST_START },
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
        .map_err(|source| BootError::Configurator { what: "pvh start info", source })
}
