//! Linux boot: PLACEHOLDER, being written (compile-only stub; never committed as is).

use std::path::Path;

use crate::devices::virtio::GuestMemory;

/// How the vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// The 64-bit Linux boot protocol: long mode, `rsi` = zero page.
    Linux64,
    /// PVH: 32-bit protected mode without paging, `ebx` = `hvm_start_info`.
    Pvh,
}

/// Where and how to start the boot vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// Guest physical entry address.
    pub entry: u64,
    /// The protocol the entry expects.
    pub protocol: BootProtocol,
}

/// What to load.
#[derive(Clone, Copy, Debug)]
pub struct BootSpec<'a> {
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: &'a Path,
    /// Optional initramfs.
    pub initrd: Option<&'a Path>,
    /// Complete kernel command line.
    pub cmdline: &'a str,
    /// Number of vCPUs (for the MP table).
    pub vcpus: u8,
}

/// A kernel that cannot be booted.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Placeholder.
    #[error("boot loading is not written yet")]
    NotWritten,
}

/// Loads the kernel, initrd, command line and boot structures into guest memory.
pub fn load(_mem: &GuestMemory, _spec: &BootSpec) -> Result<BootEntry, BootError> {
    Err(BootError::NotWritten)
}
