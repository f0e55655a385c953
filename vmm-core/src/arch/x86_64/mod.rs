//! x86_64 vCPU setup: PLACEHOLDER, being written (compile-only stub; never committed as is).

pub mod layout;

use kvm_ioctls::{Kvm, VcpuFd};

use crate::boot::BootEntry;
use crate::devices::virtio::GuestMemory;
use crate::host::VirtMode;

/// A vCPU that could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum VcpuSetupError {
    /// Placeholder.
    #[error("vcpu setup is not written yet")]
    NotWritten,
}

/// Configures vCPU `index` of `count` in Firecracker's order: CPUID, MSRs, registers, FPU, special
/// registers, LAPIC LINT0/LINT1.
pub fn configure_vcpu(
    _kvm: &Kvm,
    _vcpu: &VcpuFd,
    _index: u8,
    _count: u8,
    _mem: &GuestMemory,
    _entry: &BootEntry,
    _mode: VirtMode,
) -> Result<(), VcpuSetupError> {
    Err(VcpuSetupError::NotWritten)
}
