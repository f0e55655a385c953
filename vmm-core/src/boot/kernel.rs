//! Kernel image loading. linux-loader copies the bytes; the headers are checked here first so
//! that a wrong file, a kernel built for another machine, or one larger than guest memory gets an
//! error that says so, rather than a loader error about a failed read.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::mem::size_of;
use std::path::Path;

use linux_loader::bootparam::{setup_header, XLF_KERNEL_64};
use linux_loader::elf::{
    Elf64_Ehdr, Elf64_Phdr, EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2LSB, ELFMAG, EM_X86_64, PT_LOAD,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{BootEntry, BootError, BootProtocol};
use crate::arch::layout::HIMEM_START;
use crate::devices::virtio::GuestMemory;

/// Offset of the setup header in a bzImage.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// Offset of the "HdrS" magic in a bzImage.
const HDRS_OFFSET: usize = 0x202;
/// The setup header magic, "HdrS".
pub(crate) const HDRS_MAGIC: u32 = u32::from_le_bytes(*b"HdrS");
/// The 64-bit entry point lies this far past the start of the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// The first boot protocol version with a 64-bit entry point (2.12, `xloadflags`).
const BOOT_PROTOCOL_64BIT: u16 = 0x020c;

/// A kernel in guest memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LoadedKernel {
    /// Where the boot vCPU starts.
    pub entry: BootEntry,
    /// End (exclusive) of the memory the kernel occupies, including a bzImage's decompression room.
    pub end: u64,
    /// A bzImage's setup header, to seed the zero page.
    pub setup_header: Option<setup_header>,
}

impl LoadedKernel {
    /// The highest address the kernel accepts for an initrd byte, if the kernel says.
    pub fn initrd_addr_max(&self) -> Option<u64> {
        let max = self.setup_header.map(|hdr| hdr.initrd_addr_max)?;
        (max != 0).then_some(u64::from(max))
    }
}

/// Loads an ELF `vmlinux` or a bzImage from `path`.
pub(crate) fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, BootError> {
    let read_err = |source| BootError::KernelRead { path: path.to_owned(), source };
    let mut file = File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    let mut head = Vec::new();
    (&mut file)
        .take((SETUP_HEADER_OFFSET + size_of::<setup_header>()) as u64)
        .read_to_end(&mut head)
        .map_err(read_err)?;

    if head.starts_with(ELFMAG) {
        load_elf(mem, path, &mut file, &head)
    } else if head.get(HDRS_OFFSET..HDRS_OFFSET + 4) == Some(&HDRS_MAGIC.to_le_bytes()[..]) {
        load_bzimage(mem, path, &mut file, &head, len)
    } else {
        Err(BootError::NotAKernel { path: path.to_owned() })
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> BootError {
    BootError::BadKernel { path: path.to_owned(), reason: reason.into() }
}

/// The end of the guest RAM that starts at address 0 (the region the kernel must fit in).
fn low_ram_end(mem: &GuestMemory) -> u64 {
    mem.find_region(GuestAddress(0)).map_or(0, |region| region.len())
}

/// Checks that `start..end` is guest RAM.
fn check_fits(mem: &GuestMemory, path: &Path, start: u64, end: u64) -> Result<(), BootError> {
    let fits = end >= start && usize::try_from(end - start).is_ok_and(|len| mem.check_range(GuestAddress(start), len));
    if fits {
        Ok(())
    } else {
        Err(BootError::KernelTooLarge { path: path.to_owned(), start, end, ram_end: low_ram_end(mem) })
    }
}

fn load_elf(mem: &GuestMemory, path: &Path, file: &mut File, head: &[u8]) -> Result<LoadedKernel, BootError> {
    let mut ehdr = Elf64_Ehdr::default();
    let header = head.get(..size_of::<Elf64_Ehdr>()).ok_or_else(|| bad(path, "the ELF header is truncated"))?;
    ehdr.as_mut_slice().copy_from_slice(header);
    if ehdr.e_ident[EI_CLASS] != ELFCLASS64 || ehdr.e_ident[EI_DATA] != ELFDATA2LSB {
        return Err(bad(path, "not a little-endian 64-bit ELF"));
    }
    if ehdr.e_machine != EM_X86_64 {
        return Err(bad(path, format!("ELF machine {} is not x86_64 ({EM_X86_64})", ehdr.e_machine)));
    }
    if usize::from(ehdr.e_phentsize) != size_of::<Elf64_Phdr>() {
        return Err(bad(
            path,
            format!("ELF program header size {} is not {}", ehdr.e_phentsize, size_of::<Elf64_Phdr>()),
        ));
    }
    if ehdr.e_entry < HIMEM_START {
        return Err(bad(path, format!("entry point {:#x} lies below {HIMEM_START:#x}", ehdr.e_entry)));
    }

    let read_err = |source| BootError::KernelRead { path: path.to_owned(), source };
    file.seek(SeekFrom::Start(ehdr.e_phoff)).map_err(read_err)?;
    let mut start = u64::MAX;
    let mut end = 0;
    for _ in 0..ehdr.e_phnum {
        let mut phdr = Elf64_Phdr::default();
        file.read_exact(phdr.as_mut_slice()).map_err(read_err)?;
        if phdr.p_type != PT_LOAD || phdr.p_memsz == 0 {
            continue;
        }
        // Everything below HIMEM_START belongs to the boot structures written after the kernel.
        if phdr.p_paddr < HIMEM_START {
            return Err(bad(path, format!("a segment loads at {:#x}, below {HIMEM_START:#x}", phdr.p_paddr)));
        }
        let seg_end = phdr.p_paddr.checked_add(phdr.p_memsz).ok_or_else(|| bad(path, "a segment wraps around"))?;
        check_fits(mem, path, phdr.p_paddr, seg_end)?;
        start = start.min(phdr.p_paddr);
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err(bad(path, "the ELF has no loadable segment"));
    }

    let loaded = Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START)))
        .map_err(|source| BootError::KernelLoad { path: path.to_owned(), source })?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => BootEntry { entry: addr.0, protocol: BootProtocol::Pvh },
        _ => BootEntry { entry: loaded.kernel_load.0, protocol: BootProtocol::Linux64 },
    };
    tracing::debug!(start = format_args!("{start:#x}"), end = format_args!("{end:#x}"), "ELF kernel segments");
    Ok(LoadedKernel { entry, end, setup_header: None })
}

fn load_bzimage(
    mem: &GuestMemory,
    path: &Path,
    file: &mut File,
    head: &[u8],
    len: u64,
) -> Result<LoadedKernel, BootError> {
    let mut hdr = setup_header::default();
    let bytes = head
        .get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size_of::<setup_header>())
        .ok_or_else(|| bad(path, "the bzImage setup header is truncated"))?;
    hdr.as_mut_slice().copy_from_slice(bytes);
    let (version, xloadflags) = (hdr.version, hdr.xloadflags);
    if version < BOOT_PROTOCOL_64BIT || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad(
            path,
            format!("the bzImage has no 64-bit entry point (boot protocol {version:#x}, xloadflags {xloadflags:#x})"),
        ));
    }
    let setup_sects = if hdr.setup_sects == 0 { 4 } else { u64::from(hdr.setup_sects) };
    let payload = len
        .checked_sub((setup_sects + 1) * 512)
        .ok_or_else(|| bad(path, "the bzImage is shorter than its setup sectors"))?;
    let load = u64::from(hdr.code32_start);
    if load < HIMEM_START {
        return Err(bad(path, format!("the bzImage loads at {load:#x}, below {HIMEM_START:#x}")));
    }
    // The decompressor runs in place at the preferred address (or the load address if that is
    // higher) and needs `init_size` bytes from there.
    let pref_address = hdr.pref_address;
    let decompress_at = load.max(pref_address);
    let end = (load + payload).max(decompress_at + u64::from(hdr.init_size));
    check_fits(mem, path, load, end)?;

    let loaded = BzImage::load(mem, None, file, Some(GuestAddress(HIMEM_START)))
        .map_err(|source| BootError::KernelLoad { path: path.to_owned(), source })?;
    let entry = BootEntry { entry: loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET, protocol: BootProtocol::Linux64 };
    Ok(LoadedKernel { entry, end, setup_header: loaded.setup_header })
}
