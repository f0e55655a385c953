//! `configure_vcpu` against the real `/dev/kvm`: the vCPU is configured, never run, and its
//! registers are read back.

use kvm_bindings::{kvm_msr_entry, kvm_userspace_memory_region, Msrs};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::gdt::Descriptor;
use super::interrupts::{get_reg, APIC_LVT0, APIC_LVT1, APIC_MODE_EXTINT, APIC_MODE_NMI};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, HIMEM_START, PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};
use super::msr::{MSR_IA32_MISC_ENABLE, MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_WB_ENABLED};
use super::regs::{translate, CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME};
use super::*;
use crate::boot::BootProtocol;

/// A VM with the in-kernel irqchip, or `None` (with the reason printed) when KVM is unusable.
fn vm() -> Option<(Kvm, VmFd)> {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(err) => {
            eprintln!("skipping: cannot open /dev/kvm: {err}");
            return None;
        }
    };
    let vm = kvm.create_vm().expect("create vm");
    vm.create_irq_chip().expect("create irqchip");
    Some((kvm, vm))
}

fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

fn configure(kvm: &Kvm, vcpu: &VcpuFd, index: u8, mem: &GuestMemory, entry: &BootEntry) {
    configure_vcpu(kvm, vcpu, index, 2, mem, entry, VirtMode::Emulated).unwrap();
}

#[test]
fn linux64_vcpu_starts_in_long_mode_at_the_entry() {
    let Some((kvm, vm)) = vm() else { return };
    let mem = memory();
    let vcpu = vm.create_vcpu(0).unwrap();
    let entry = BootEntry { entry: 0x100_0000, protocol: BootProtocol::Linux64 };
    configure(&kvm, &vcpu, 0, &mem, &entry);

    let regs = vcpu.get_regs().unwrap();
    assert_eq!(
        (regs.rip, regs.rsp, regs.rbp, regs.rsi),
        (0x100_0000, BOOT_STACK_POINTER, BOOT_STACK_POINTER, ZERO_PAGE_START)
    );
    assert_eq!(regs.rflags, 2);

    let sregs = vcpu.get_sregs().unwrap();
    assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG | CR0_ET), CR0_PE | CR0_PG | CR0_ET);
    assert_ne!(sregs.cr4 & CR4_PAE, 0);
    assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
    assert_eq!(sregs.cr3, PML4_START);
    assert_eq!(
        (sregs.gdt.base, sregs.gdt.limit, sregs.idt.base, sregs.idt.limit),
        (BOOT_GDT_START, 31, BOOT_IDT_START, 7)
    );
    assert_eq!((sregs.cs.selector, sregs.cs.l, sregs.ds.selector, sregs.tr.selector), (8, 1, 16, 24));
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(BOOT_GDT_START + 8)).unwrap(),
        Descriptor::new(0xa09b, 0, 0xfffff).encode()
    );

    // The identity map covers the MMIO gap, so devices are reachable before the kernel's own tables.
    assert_eq!(translate(&mem, 0xd000_0000), Some(0xd000_0000));
    assert_eq!(translate(&mem, 0x100_0000), Some(0x100_0000));
}

#[test]
fn pvh_vcpu_starts_in_flat_protected_mode() {
    let Some((kvm, vm)) = vm() else { return };
    let mem = memory();
    let vcpu = vm.create_vcpu(0).unwrap();
    let entry = BootEntry { entry: 0x100_0040, protocol: BootProtocol::Pvh };
    configure(&kvm, &vcpu, 0, &mem, &entry);

    let regs = vcpu.get_regs().unwrap();
    assert_eq!((regs.rip, regs.rbx, regs.rflags), (0x100_0040, PVH_INFO_START, 2));
    let sregs = vcpu.get_sregs().unwrap();
    assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
    assert_eq!(sregs.efer & EFER_LMA, 0);
    assert_eq!((sregs.cs.selector, sregs.cs.db, sregs.cs.l, sregs.cs.limit), (8, 1, 0, 0xffff_ffff));
    assert_eq!((sregs.ss.base, sregs.ss.limit), (0, 0xffff_ffff));
}

#[test]
fn every_vcpu_gets_cpuid_msrs_and_lapic_wiring() {
    let Some((kvm, vm)) = vm() else { return };
    let mem = memory();
    let entry = BootEntry { entry: 0x100_0000, protocol: BootProtocol::Linux64 };
    for index in 0..2u8 {
        let vcpu = vm.create_vcpu(u64::from(index)).unwrap();
        configure(&kvm, &vcpu, index, &mem, &entry);

        let cpuid = vcpu.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
        let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, u32::from(index), "initial APIC ID");
        assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");
        // No assertion on the hidden features: this host's KVM (kvm_pvm) puts the host's feature
        // bits (leaves 1, 7, 0xd) back into the table it reports, as PLATFORM.md warns.

        let mut msrs = Msrs::from_entries(&[
            kvm_msr_entry { index: MSR_MTRR_DEF_TYPE, ..Default::default() },
            kvm_msr_entry { index: MSR_IA32_MISC_ENABLE, ..Default::default() },
        ])
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 2);
        assert_eq!(msrs.as_slice()[0].data, MTRR_DEF_TYPE_WB_ENABLED);
        assert_ne!(msrs.as_slice()[1].data & 1, 0, "fast strings");

        let lapic = vcpu.get_lapic().unwrap();
        assert_eq!((get_reg(&lapic, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((get_reg(&lapic, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}

#[test]
fn lapic_setup_without_an_irqchip_names_the_step() {
    let Ok(kvm) = Kvm::new() else {
        eprintln!("skipping: cannot open /dev/kvm");
        return;
    };
    let vm = kvm.create_vm().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let entry = BootEntry { entry: 0x100_0000, protocol: BootProtocol::Linux64 };
    let err = configure_vcpu(&kvm, &vcpu, 0, 1, &memory(), &entry, VirtMode::Hardware).unwrap_err();
    assert!(matches!(err, VcpuSetupError::GetLapic(_)), "{err:?}");
    assert_eq!(err.to_string(), "cannot read the local apic");
}

/// `mov al, 0x2a; out 0xf4, al; mov ebx, 0xd0000000; mov [rbx], eax` — the same bytes in 32-bit
/// and 64-bit mode. It ends on the MMIO write: a `hlt` would block in the in-kernel LAPIC.
const GUEST_CODE: &[u8] = &[0xb0, 0x2a, 0xe6, 0xf4, 0xbb, 0x00, 0x00, 0x00, 0xd0, 0x89, 0x03];

/// Runs `GUEST_CODE` from [`HIMEM_START`] under `protocol` and checks both of its exits.
fn run_guest(protocol: BootProtocol) {
    let mem = memory();
    let Some((kvm, vm)) = vm() else { return };
    mem.write_slice(GUEST_CODE, GuestAddress(HIMEM_START)).unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: 16 << 20,
        userspace_addr: mem.get_host_address(GuestAddress(0)).unwrap() as u64,
        flags: 0,
    };
    // SAFETY: the region is the whole of `mem`, which is declared before `vm` and so outlives it.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let entry = BootEntry { entry: HIMEM_START, protocol };
    configure(&kvm, &vcpu, 0, &mem, &entry);

    match vcpu.run().unwrap() {
        VcpuExit::IoOut(port, data) => assert_eq!((port, data), (0xf4, &[0x2a][..])),
        other => panic!("{protocol:?}: expected the port write, got {other:?}"),
    }
    match vcpu.run().unwrap() {
        VcpuExit::MmioWrite(addr, data) => assert_eq!((addr, data.len()), (0xd000_0000, 4)),
        other => panic!("{protocol:?}: expected the mmio write, got {other:?}"),
    }
}

#[test]
fn a_linux64_guest_runs_from_the_entry_and_reaches_the_mmio_gap() {
    run_guest(BootProtocol::Linux64);
}

#[test]
fn a_pvh_guest_runs_from_the_entry_and_reaches_the_mmio_gap() {
    run_guest(BootProtocol::Pvh);
}
