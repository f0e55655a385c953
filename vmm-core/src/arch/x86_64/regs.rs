//! General purpose, FPU and special registers of a vCPU at kernel entry, and the boot GDT, IDT
//! and identity page tables they point to.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::Descriptor;
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_COUNT, PDE_START, PDPTE_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};
use super::VcpuSetupError;
use crate::boot::{BootEntry, BootProtocol};
use crate::devices::virtio::GuestMemory;

/// CR0: protected mode enable.
pub const CR0_PE: u64 = 1 << 0;
/// CR0: extension type (always 1 on anything newer than a 386).
pub const CR0_ET: u64 = 1 << 4;
/// CR0: paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension (required for long mode).
pub const CR4_PAE: u64 = 1 << 5;
/// EFER: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// RFLAGS with only the always-one bit 1 set (interrupts disabled).
const RFLAGS_RESERVED: u64 = 1 << 1;
/// Page table entry bits: present | writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page directory entry bits for a 2 MiB page: present | writable | page size.
const PDE_2M_PAGE: u64 = 0x83;
/// Entries in one page table page.
const ENTRIES_PER_TABLE: u64 = 512;

/// The boot GDT for a protocol: null, code, data, TSS (selectors 0x0, 0x8, 0x10, 0x18).
pub fn boot_gdt(protocol: BootProtocol) -> [Descriptor; 4] {
    match protocol {
        // 64-bit code (L=1), flat data, and a TSS the kernel replaces before it needs one.
        BootProtocol::Linux64 => [
            Descriptor::NULL,
            Descriptor::new(0xa09b, 0, 0xfffff),
            Descriptor::new(0xc093, 0, 0xfffff),
            Descriptor::new(0x808b, 0, 0xfffff),
        ],
        // PVH enters in 32-bit protected mode with flat 4 GiB segments.
        BootProtocol::Pvh => [
            Descriptor::NULL,
            Descriptor::new(0xc09b, 0, 0xfffff),
            Descriptor::new(0xc093, 0, 0xfffff),
            Descriptor::new(0x008b, 0, 0x67),
        ],
    }
}

/// Sets the general purpose registers the boot protocol expects at the entry point.
pub fn setup_regs(vcpu: &VcpuFd, entry: &BootEntry) -> Result<(), VcpuSetupError> {
    let regs = match entry.protocol {
        BootProtocol::Linux64 => kvm_regs {
            rip: entry.entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            // The 64-bit boot protocol passes the zero page in rsi.
            rsi: ZERO_PAGE_START,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
        // PVH passes the hvm_start_info in ebx.
        BootProtocol::Pvh => {
            kvm_regs { rip: entry.entry, rbx: PVH_INFO_START, rflags: RFLAGS_RESERVED, ..Default::default() }
        }
    };
    vcpu.set_regs(&regs).map_err(VcpuSetupError::SetRegs)
}

/// Sets the x87 control word and MXCSR to their power-on defaults (all exceptions masked).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), VcpuSetupError> {
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(VcpuSetupError::SetFpu)
}

/// Writes the GDT, IDT and (for the 64-bit protocol) identity page tables into `mem`, and sets the
/// segment and control registers to match.
pub fn setup_sregs(mem: &GuestMemory, vcpu: &VcpuFd, protocol: BootProtocol) -> Result<(), VcpuSetupError> {
    let mut sregs = vcpu.get_sregs().map_err(VcpuSetupError::GetSregs)?;
    configure_segments(mem, &mut sregs, protocol)?;
    match protocol {
        BootProtocol::Linux64 => {
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer &= !(EFER_LME | EFER_LMA);
        }
    }
    vcpu.set_sregs(&sregs).map_err(VcpuSetupError::SetSregs)
}

fn write_table(mem: &GuestMemory, what: &'static str, bytes: &[u8], addr: u64) -> Result<(), VcpuSetupError> {
    mem.write_slice(bytes, GuestAddress(addr)).map_err(|source| VcpuSetupError::WriteBootTables { what, source })
}

fn configure_segments(mem: &GuestMemory, sregs: &mut kvm_sregs, protocol: BootProtocol) -> Result<(), VcpuSetupError> {
    let gdt = boot_gdt(protocol);
    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.encode().to_le_bytes()).collect();
    write_table(mem, "gdt", &bytes, BOOT_GDT_START)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (bytes.len() - 1) as u16;

    // An empty IDT: the kernel installs its own before enabling interrupts; a fault before that
    // is a triple fault either way.
    write_table(mem, "idt", &0u64.to_le_bytes(), BOOT_IDT_START)?;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let data = gdt[2].to_kvm_segment(2);
    sregs.cs = gdt[1].to_kvm_segment(1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt[3].to_kvm_segment(3);
    Ok(())
}

/// Identity-maps the first `PDE_COUNT` GiB with 2 MiB pages: one PML4 entry, `PDE_COUNT` PDPT
/// entries and `PDE_COUNT` page directories, so the MMIO gap below 4 GiB is reachable too.
fn write_page_tables(mem: &GuestMemory) -> Result<(), VcpuSetupError> {
    write_table(mem, "pml4", &(PDPTE_START | PTE_PRESENT_RW).to_le_bytes(), PML4_START)?;
    let pdpt: Vec<u8> =
        (0..PDE_COUNT).flat_map(|i| ((PDE_START + i * 0x1000) | PTE_PRESENT_RW).to_le_bytes()).collect();
    write_table(mem, "pdpt", &pdpt, PDPTE_START)?;
    let pds: Vec<u8> =
        (0..PDE_COUNT * ENTRIES_PER_TABLE).flat_map(|page| ((page << 21) | PDE_2M_PAGE).to_le_bytes()).collect();
    write_table(mem, "page directories", &pds, PDE_START)
}

#[cfg(test)]
/// Walks the boot page tables in `mem` like the MMU would for a 2 MiB mapping.
pub(crate) fn translate(mem: &GuestMemory, virt: u64) -> Option<u64> {
    let read = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).ok();
    let pml4e = read(PML4_START + ((virt >> 39) & 0x1ff) * 8)?;
    let pdpte = read((pml4e & !0xfff) + ((virt >> 30) & 0x1ff) * 8)?;
    if pml4e & 1 == 0 || pdpte & 1 == 0 {
        return None;
    }
    let pde = read((pdpte & !0xfff) + ((virt >> 21) & 0x1ff) * 8)?;
    (pde & PDE_2M_PAGE == PDE_2M_PAGE).then_some((pde & !0x1f_ffff) | (virt & 0x1f_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tables_identity_map_four_gib() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem).unwrap();
        for addr in [0u64, 0x10_0000, 0x3fff_ffff, 0x4000_0000, 0xd000_0000, 0xfee0_0000, 0xffff_ffff] {
            assert_eq!(translate(&mem, addr), Some(addr), "{addr:#x}");
        }
        // Nothing above 4 GiB is mapped.
        assert_eq!(translate(&mem, 0x1_0000_0000), None);
    }
}
