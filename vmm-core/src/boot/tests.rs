//! Loader tests against in-process guest memory: no KVM involved.

use std::io::Write;
use std::path::Path;

use linux_loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use tempfile::NamedTempFile;
use vm_memory::{Bytes, GuestAddress};

use super::memmap::{E820_RAM, E820_RESERVED};
use super::test_images::{BzImage, ElfImage};
use super::*;
use crate::arch::layout::{
    ram_regions, EBDA_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};

fn guest(mib: u64) -> GuestMemory {
    let ranges: Vec<_> = ram_regions(mib << 20).into_iter().map(|(a, l)| (GuestAddress(a), l as usize)).collect();
    GuestMemory::from_ranges(&ranges).unwrap()
}

fn file(bytes: &[u8]) -> NamedTempFile {
    let mut f = NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f
}

fn spec<'a>(kernel: &'a Path, initrd: Option<&'a Path>, cmdline: &'a str) -> BootSpec<'a> {
    BootSpec { kernel, initrd, cmdline, vcpus: 2 }
}

fn zero_page(mem: &GuestMemory) -> boot_params {
    mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap()
}

/// The zero page's e820 table as (addr, size, type); copies out of the packed struct.
fn e820(params: &boot_params) -> Vec<(u64, u64, u32)> {
    let table = params.e820_table;
    (0..usize::from(params.e820_entries)).map(|i| ({ table[i].addr }, { table[i].size }, { table[i].r#type })).collect()
}

fn expected_map(mib: u64) -> Vec<(u64, u64, u32)> {
    vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        (HIMEM_START, (mib << 20) - HIMEM_START, E820_RAM),
    ]
}

#[test]
fn elf_kernel_boots_with_the_64bit_protocol() {
    let kernel = file(&ElfImage::new().build());
    let mem = guest(64);
    let entry = load(&mem, &spec(kernel.path(), None, "console=ttyS0 panic=-1")).unwrap();
    assert_eq!(entry, BootEntry { entry: 0x10_0000, protocol: BootProtocol::Linux64 });
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0xf4);

    let mut cmdline = [0u8; 24];
    mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_START)).unwrap();
    assert_eq!(&cmdline, b"console=ttyS0 panic=-1\0\0");

    let params = zero_page(&mem);
    let hdr = params.hdr;
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert_eq!({ hdr.header }, 0x5372_6448);
    assert_eq!({ hdr.type_of_loader }, 0xff);
    assert_eq!({ hdr.kernel_alignment }, 0x100_0000);
    assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
    assert_eq!({ hdr.cmdline_size }, 23);
    assert_eq!(({ hdr.ramdisk_image }, { hdr.ramdisk_size }), (0, 0));
    assert_eq!(e820(&params), expected_map(64));

    let mut mpf = [0u8; 4];
    mem.read_slice(&mut mpf, GuestAddress(EBDA_START)).unwrap();
    assert_eq!(&mpf, b"_MP_");
}

#[test]
fn pvh_note_selects_the_pvh_entry_and_start_info() {
    let image = ElfImage { pvh_entry: Some(0x10_0040), code: vec![0x90; 0x80], ..ElfImage::new() };
    let kernel = file(&image.build());
    let initrd = file(&[0x5a; 0x1800]);
    let mem = guest(32);
    let entry = load(&mem, &spec(kernel.path(), Some(initrd.path()), "quiet")).unwrap();
    assert_eq!(entry, BootEntry { entry: 0x10_0040, protocol: BootProtocol::Pvh });

    let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
    assert_eq!((info.magic, info.version, info.flags), (0x336e_c578, 1, 0));
    assert_eq!(info.cmdline_paddr, CMDLINE_START);
    assert_eq!((info.nr_modules, info.modlist_paddr), (1, PVH_MODLIST_START));
    assert_eq!((info.memmap_paddr, info.memmap_entries), (PVH_MEMMAP_START, 3));

    let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
    assert_eq!((module.paddr, module.size), ((32 << 20) - 0x2000, 0x1800));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(module.paddr + 0x17ff)).unwrap(), 0x5a);

    let map: Vec<_> = (0..3u64)
        .map(|i| mem.read_obj::<hvm_memmap_table_entry>(GuestAddress(PVH_MEMMAP_START + i * 24)).unwrap())
        .map(|e| (e.addr, e.size, e.type_))
        .collect();
    assert_eq!(map, expected_map(32));
}

#[test]
fn elf_without_the_xen_note_keeps_the_64bit_entry() {
    let image = ElfImage { pvh_entry: None, ..ElfImage::new() };
    let kernel = file(&image.build());
    let entry = load(&guest(16), &spec(kernel.path(), None, "")).unwrap();
    assert_eq!(entry.protocol, BootProtocol::Linux64);
}

#[test]
fn initrd_is_page_aligned_at_the_top_of_low_memory() {
    let kernel = file(&ElfImage::new().build());
    let contents: Vec<u8> = (0..0x2345u32).map(|i| i as u8).collect();
    let initrd = file(&contents);
    let mem = guest(64);
    load(&mem, &spec(kernel.path(), Some(initrd.path()), "")).unwrap();

    let hdr = zero_page(&mem).hdr;
    let addr = u64::from(hdr.ramdisk_image);
    assert_eq!(addr, ((64 << 20) - 0x2345) & !0xfff);
    assert_eq!({ hdr.ramdisk_size }, 0x2345);
    let mut back = vec![0u8; contents.len()];
    mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
    assert_eq!(back, contents);
}

#[test]
fn initrd_that_does_not_fit_is_an_error_naming_it() {
    let kernel = file(&ElfImage::new().build());
    let initrd = NamedTempFile::new().unwrap();
    initrd.as_file().set_len(16 << 20).unwrap();
    let err = load(&guest(16), &spec(kernel.path(), Some(initrd.path()), "")).unwrap_err();
    assert!(matches!(err, BootError::InitrdTooLarge { size, .. } if size == 16 << 20), "{err:?}");
    assert!(err.to_string().contains(&initrd.path().display().to_string()), "{err}");
}

#[test]
fn command_line_longer_than_the_limit_is_rejected() {
    let kernel = file(&ElfImage::new().build());
    let mem = guest(16);
    let longest = "x".repeat(CMDLINE_MAX_SIZE - 1);
    load(&mem, &spec(kernel.path(), None, &longest)).unwrap();
    let err = load(&mem, &spec(kernel.path(), None, &format!("{longest}y"))).unwrap_err();
    assert!(matches!(err, BootError::CmdlineTooLong { len: 2049, max: 2048 }), "{err:?}");
    let err = load(&mem, &spec(kernel.path(), None, "a\0b")).unwrap_err();
    assert!(matches!(err, BootError::CmdlineNul), "{err:?}");
}

#[test]
fn a_file_that_is_not_a_kernel_is_named() {
    let mem = guest(16);
    for bytes in [&b"#!/bin/sh\necho hello\n"[..], &[][..], &[0u8; 4096][..]] {
        let not_kernel = file(bytes);
        let err = load(&mem, &spec(not_kernel.path(), None, "")).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&not_kernel.path().display().to_string()) && msg.contains("not a kernel"), "{msg}");
    }
}

#[test]
fn a_missing_kernel_is_named() {
    let err = load(&guest(16), &spec(Path::new("/nonexistent/vmlinux"), None, "")).unwrap_err();
    assert!(matches!(err, BootError::KernelRead { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
}

#[test]
fn a_kernel_larger_than_memory_is_rejected() {
    let image = ElfImage { memsz: 32 << 20, ..ElfImage::new() };
    let kernel = file(&image.build());
    let err = load(&guest(16), &spec(kernel.path(), None, "")).unwrap_err();
    assert!(
        matches!(err, BootError::KernelTooLarge { start: 0x10_0000, end, ram_end, .. } if end == 0x10_0000 + (32 << 20) && ram_end == 16 << 20),
        "{err:?}"
    );
}

#[test]
fn elf_headers_that_rule_out_booting_are_explained() {
    let mem = guest(16);
    let cases = [
        (ElfImage { machine: 183, ..ElfImage::new() }, "not x86_64"),
        (ElfImage { entry: 0x1000, ..ElfImage::new() }, "entry point"),
        (ElfImage { paddr: 0x8000, entry: 0x10_0000, ..ElfImage::new() }, "below"),
    ];
    for (image, needle) in cases {
        let kernel = file(&image.build());
        let err = load(&mem, &spec(kernel.path(), None, "")).unwrap_err();
        assert!(matches!(err, BootError::BadKernel { .. }), "{err:?}");
        assert!(err.to_string().contains(needle), "{err}");
    }
}

#[test]
fn bzimage_enters_at_the_64bit_entry_with_its_setup_header() {
    let kernel = file(&BzImage::new().build());
    let initrd = file(&[1; 100]);
    let mem = guest(64);
    let entry = load(&mem, &spec(kernel.path(), Some(initrd.path()), "ro")).unwrap();
    assert_eq!(entry, BootEntry { entry: 0x10_0200, protocol: BootProtocol::Linux64 });
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_3fff)).unwrap(), 0xab);

    let params = zero_page(&mem);
    let hdr = params.hdr;
    // The kernel's own fields survive, the loader's are filled in.
    assert_eq!(({ hdr.version }, { hdr.init_size }, { hdr.kernel_alignment }), (0x020f, 0x40_0000, 0x20_0000));
    assert_eq!(({ hdr.type_of_loader }, { hdr.boot_flag }, { hdr.header }), (0xff, 0xaa55, 0x5372_6448));
    assert_eq!(({ hdr.cmd_line_ptr }, { hdr.cmdline_size }), (CMDLINE_START as u32, 3));
    assert_eq!(({ hdr.ramdisk_image }, { hdr.ramdisk_size }), ((64 << 20) - 0x1000, 100));
    assert_eq!(e820(&params), expected_map(64));
}

#[test]
fn bzimage_initrd_respects_initrd_addr_max() {
    let image = BzImage { initrd_addr_max: 0x1ff_ffff, ..BzImage::new() };
    let kernel = file(&image.build());
    let initrd = file(&[1; 0x1000]);
    let mem = guest(64);
    load(&mem, &spec(kernel.path(), Some(initrd.path()), "")).unwrap();
    assert_eq!({ zero_page(&mem).hdr.ramdisk_image }, 0x1ff_f000);
}

#[test]
fn bzimage_without_a_64bit_entry_or_room_to_decompress_is_rejected() {
    let mem = guest(16);
    for image in [BzImage { xloadflags: 0, ..BzImage::new() }, BzImage { version: 0x020b, ..BzImage::new() }] {
        let kernel = file(&image.build());
        let err = load(&mem, &spec(kernel.path(), None, "")).unwrap_err();
        assert!(err.to_string().contains("no 64-bit entry point"), "{err}");
    }
    let image = BzImage { init_size: 0x100_0000, ..BzImage::new() };
    let kernel = file(&image.build());
    let err = load(&mem, &spec(kernel.path(), None, "")).unwrap_err();
    assert!(matches!(err, BootError::KernelTooLarge { end: 0x200_0000, .. }), "{err:?}");
}

#[test]
fn too_many_vcpus_for_the_mp_table_is_an_error() {
    let kernel = file(&ElfImage::new().build());
    let spec = BootSpec { vcpus: 100, ..spec(kernel.path(), None, "") };
    let err = load(&guest(16), &spec).unwrap_err();
    assert!(matches!(err, BootError::MpTable(_)), "{err:?}");
}
