//! Linux boot: loads the kernel (ELF `vmlinux`, PVH or 64-bit entry, or a bzImage), the command
//! line and the initrd into guest memory, and writes what the kernel reads at entry: the MP table,
//! and either the zero page (64-bit boot protocol) or the PVH `hvm_start_info`, each with the same
//! e820 memory map.
//!
//! Where everything goes is fixed by [`crate::arch::layout`].

mod initrd;
mod kernel;
pub mod memmap;
mod pvh;
mod zero_page;

#[cfg(test)]
mod test_images;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START};
use crate::arch::x86_64::mptable::{self, MpTableError};
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

/// A kernel, initrd or command line that cannot be booted, or boot data that cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {path}")]
    KernelRead {
        /// The kernel path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither an ELF nor a bzImage.
    #[error("{path} is not a kernel: it is neither an ELF vmlinux nor a bzImage")]
    NotAKernel {
        /// The kernel path.
        path: PathBuf,
    },
    /// An ELF or bzImage whose headers rule out booting it here.
    #[error("kernel {path} cannot be booted: {reason}")]
    BadKernel {
        /// The kernel path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The kernel needs memory the guest does not have.
    #[error(
        "kernel {path} needs guest memory {start:#x}..{end:#x}, but guest RAM below the mmio gap ends at {ram_end:#x}"
    )]
    KernelTooLarge {
        /// The kernel path.
        path: PathBuf,
        /// First byte the kernel needs.
        start: u64,
        /// End (exclusive) of what the kernel needs.
        end: u64,
        /// End of the guest's low RAM.
        ram_end: u64,
    },
    /// linux-loader failed to copy the kernel into guest memory.
    #[error("cannot load kernel {path} into guest memory")]
    KernelLoad {
        /// The kernel path.
        path: PathBuf,
        /// The loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The command line does not fit at [`CMDLINE_START`].
    #[error("the kernel command line is {len} bytes with its terminating NUL, at most {max} are allowed")]
    CmdlineTooLong {
        /// Length including the terminating NUL.
        len: usize,
        /// [`CMDLINE_MAX_SIZE`].
        max: usize,
    },
    /// The command line contains a NUL byte, which would silently truncate it.
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    /// The initrd file cannot be opened or read.
    #[error("cannot read initrd {path}")]
    InitrdRead {
        /// The initrd path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// No room for the initrd between the kernel and the top of low memory.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory between the kernel end {low:#x} and {high:#x}")]
    InitrdTooLarge {
        /// The initrd path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Lowest usable address (the page-aligned kernel end).
        low: u64,
        /// Highest usable address (exclusive).
        high: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("cannot copy initrd {path} into guest memory")]
    InitrdLoad {
        /// The initrd path.
        path: PathBuf,
        /// The guest memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The MP table cannot be built or written.
    #[error("cannot set up the mp table")]
    MpTable(#[source] MpTableError),
    /// More memory ranges than the boot structure can describe.
    #[error("the guest memory map has {entries} ranges, the {what} holds at most {max}")]
    MemoryMapTooLarge {
        /// Which structure.
        what: &'static str,
        /// Ranges needed.
        entries: usize,
        /// Ranges that fit.
        max: usize,
    },
    /// A boot structure cannot be written into guest memory.
    #[error("cannot write the {what} into guest memory")]
    WriteBootData {
        /// Which structure.
        what: &'static str,
        /// The guest memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// linux-loader's boot configurator rejected the zero page or the PVH start info.
    #[error("cannot write the {what} into guest memory")]
    Configurator {
        /// Which structure.
        what: &'static str,
        /// The configurator's error.
        #[source]
        source: linux_loader::configurator::Error,
    },
}

/// Loads the kernel, initrd, command line and boot structures into guest memory.
pub fn load(mem: &GuestMemory, spec: &BootSpec) -> Result<BootEntry, BootError> {
    let kernel = kernel::load_kernel(mem, spec.kernel)?;
    let cmdline_size = write_cmdline(mem, spec.cmdline)?;
    let initrd = match spec.initrd {
        Some(path) => Some(initrd::load_initrd(mem, path, kernel.end, kernel.initrd_addr_max())?),
        None => None,
    };
    mptable::setup_mptable(mem, spec.vcpus).map_err(BootError::MpTable)?;
    let map = memmap::memory_map(mem.iter().map(|region| (region.start_addr().0, region.len())));
    match kernel.entry.protocol {
        BootProtocol::Linux64 => {
            zero_page::write_zero_page(mem, kernel.setup_header, cmdline_size, initrd.as_ref(), &map)?
        }
        BootProtocol::Pvh => pvh::write_start_info(mem, initrd.as_ref(), &map)?,
    }
    tracing::debug!(
        kernel = %spec.kernel.display(),
        entry = format_args!("{:#x}", kernel.entry.entry),
        protocol = ?kernel.entry.protocol,
        kernel_end = format_args!("{:#x}", kernel.end),
        initrd = ?initrd,
        "kernel loaded"
    );
    Ok(kernel.entry)
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`]; returns its size with the NUL.
fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<usize, BootError> {
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    if bytes.len() > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong { len: bytes.len(), max: CMDLINE_MAX_SIZE });
    }
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|source| BootError::WriteBootData { what: "kernel command line", source })?;
    Ok(bytes.len())
}
