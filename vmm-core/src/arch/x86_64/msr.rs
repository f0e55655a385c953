//! Model-specific registers at kernel entry: the syscall MSRs cleared (the kernel sets them up),
//! fast strings on, and write-back as the default memory type so the guest does not run uncached
//! before it programs the MTRRs.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use super::VcpuSetupError;

/// `IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_SYSENTER_CS`.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// `IA32_SYSENTER_ESP`.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// `IA32_SYSENTER_EIP`.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// `IA32_MISC_ENABLE`.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// `IA32_MTRR_DEF_TYPE`.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// `STAR`: legacy syscall target.
pub const MSR_STAR: u32 = 0xc000_0081;
/// `LSTAR`: 64-bit syscall target.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `CSTAR`: compatibility-mode syscall target.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// `SYSCALL_MASK` (FMASK).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// `KERNEL_GS_BASE`.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// `IA32_MISC_ENABLE`: fast-string operations enabled.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// `IA32_MTRR_DEF_TYPE`: MTRRs enabled (bit 11), default type write-back (6).
pub const MTRR_DEF_TYPE_WB_ENABLED: u64 = (1 << 11) | 6;

/// The MSRs every vCPU gets before it first runs, in the order they are set.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_WB_ENABLED),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect()
}

/// Sets the boot MSRs; `KVM_SET_MSRS` stops at the first MSR it refuses, so a short count is an
/// error that names that MSR.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), VcpuSetupError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(VcpuSetupError::BuildMsrs)?;
    let written = vcpu.set_msrs(&msrs).map_err(VcpuSetupError::SetMsrs)?;
    if written < entries.len() {
        return Err(VcpuSetupError::MsrRefused { index: entries[written].index, written, total: entries.len() });
    }
    Ok(())
}
