//! x86_64 vCPU setup: what the boot vCPU must look like when it first enters the kernel, done in
//! Firecracker's order (CPUID, MSRs, registers, FPU, special registers, LAPIC), plus the MP table
//! that tells the guest how many CPUs and which interrupt routing it has.

pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;

#[cfg(test)]
mod kvm_tests;

use kvm_ioctls::{Kvm, VcpuFd};

use crate::boot::BootEntry;
use crate::devices::virtio::GuestMemory;
use crate::host::VirtMode;

/// The KVM error type every setup step reports.
type KvmError = kvm_ioctls::Error;

/// A vCPU that could not be configured: which step failed, and the KVM error behind it.
#[derive(Debug, thiserror::Error)]
pub enum VcpuSetupError {
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("cannot read the cpuid supported by kvm")]
    GetSupportedCpuid(#[source] KvmError),
    /// The CPUID table could not be extended with the topology sub-leaves.
    #[error("cannot add cpuid leaf {leaf:#x} sub-leaf {subleaf}: the table is full")]
    CpuidTableFull {
        /// The leaf that was being added.
        leaf: u32,
        /// Its sub-leaf.
        subleaf: u32,
    },
    /// `KVM_SET_CPUID2` failed.
    #[error("cannot set the vcpu cpuid")]
    SetCpuid(#[source] KvmError),
    /// The MSR list could not be built (more entries than `KVM_MAX_MSR_ENTRIES`).
    #[error("cannot build the boot msr list")]
    BuildMsrs(#[source] vmm_sys_util::fam::Error),
    /// `KVM_SET_MSRS` failed.
    #[error("cannot set the boot msrs")]
    SetMsrs(#[source] KvmError),
    /// `KVM_SET_MSRS` stopped early: KVM refused one MSR.
    #[error("kvm accepted {written} of {total} boot msrs and refused msr {index:#x}")]
    MsrRefused {
        /// The first MSR KVM did not accept.
        index: u32,
        /// How many MSRs were written before it.
        written: usize,
        /// How many MSRs were passed.
        total: usize,
    },
    /// `KVM_SET_REGS` failed.
    #[error("cannot set the general purpose registers")]
    SetRegs(#[source] KvmError),
    /// `KVM_SET_FPU` failed.
    #[error("cannot set the fpu registers")]
    SetFpu(#[source] KvmError),
    /// `KVM_GET_SREGS` failed.
    #[error("cannot read the special registers")]
    GetSregs(#[source] KvmError),
    /// `KVM_SET_SREGS` failed.
    #[error("cannot set the special registers")]
    SetSregs(#[source] KvmError),
    /// The GDT, IDT or page tables could not be written into guest memory.
    #[error("cannot write the boot {what} into guest memory")]
    WriteBootTables {
        /// Which table.
        what: &'static str,
        /// The guest memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// `KVM_GET_LAPIC` failed (is the in-kernel irqchip created?).
    #[error("cannot read the local apic")]
    GetLapic(#[source] KvmError),
    /// `KVM_SET_LAPIC` failed.
    #[error("cannot set the local apic")]
    SetLapic(#[source] KvmError),
}

/// Configures vCPU `index` of `count` in Firecracker's order: CPUID, MSRs, registers, FPU, special
/// registers, LAPIC LINT0/LINT1.
///
/// Every vCPU gets the boot register state; with the in-kernel irqchip the application processors
/// wait for INIT/SIPI anyway, and INIT resets what was set here. The GDT, IDT and page tables are
/// written into `mem` each time (the content is identical for every vCPU).
pub fn configure_vcpu(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    index: u8,
    count: u8,
    mem: &GuestMemory,
    entry: &BootEntry,
    mode: VirtMode,
) -> Result<(), VcpuSetupError> {
    cpuid::setup_cpuid(kvm, vcpu, index, count, mode)?;
    msr::setup_msrs(vcpu)?;
    regs::setup_regs(vcpu, entry)?;
    regs::setup_fpu(vcpu)?;
    regs::setup_sregs(mem, vcpu, entry.protocol)?;
    interrupts::set_lint(vcpu)
}
