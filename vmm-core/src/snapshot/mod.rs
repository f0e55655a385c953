//! Saving a paused VM to a directory and building a new VM from it.
//!
//! A snapshot directory holds two files:
//! - [`STATE_FILE`]: a header ([`MAGIC`], [`FORMAT_VERSION`], the payload's length and SHA-256) and
//!   the payload, the JSON of a [`MachineState`]: the host CPU it was taken on, the VM's shape, each
//!   vCPU's registers, the VM's interrupt controllers, timer and clock, and the legacy devices;
//! - [`MEMORY_FILE`]: guest RAM, region after region in guest-address order. A restore maps it
//!   privately (copy on write): pages are read as the guest touches them, and the guest's writes
//!   never reach the file, so one snapshot can start any number of VMs.
//!
//! [`save`] writes both under temporary names, syncs them and renames the memory file first: a
//! directory with a state file always has the memory that goes with it, and a crash in the middle
//! leaves no state file, which [`load`] reports as a missing file. A damaged state file (checksum), one
//! from another format version, one taken on another CPU model, or a memory file of the wrong size is
//! refused before anything of the new VM exists.
//!
//! What is saved, and in which order, follows what KVM requires: `mp_state` is read first (reading it
//! lets the local APIC accept pending INIT/SIPI events), `vcpu_events` last; on restore the MSRs are
//! written with the TSC before the TSC deadline, and `mp_state` before the local APIC's registers.
//! A vCPU saves its own state on its own thread, after one `KVM_RUN` with `immediate_exit` set has
//! completed any port or MMIO read it was in the middle of.
//!
//! Virtio devices are saved with their transport registers and live queues; while the state and
//! memory are saved every device is held still, so a request is either complete in guest memory or
//! still in the available ring, and the restored device serves it then (exactly once). The vsock
//! device's host connections do not survive: the restored device sends the driver a transport reset
//! event, the guest drops its connections (its listeners stay) and host clients connect again.

mod vcpu;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_TSC_STABLE};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use crate::devices::legacy::i8042::I8042State;
use crate::devices::legacy::serial::SerialState;
use crate::devices::virtio::mmio::TransportState;
use crate::devices::virtio::GuestMemory;
use crate::exit::ExitReason;

pub use vcpu::VcpuState;
pub(crate) use vcpu::{restore_vcpu, save_vcpu, xsave_fits};

/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The guest memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// The first bytes of every state file.
pub const MAGIC: &[u8; 16] = b"ignite-snapshot\n";
/// The state format this build writes and reads. Any change to [`MachineState`] or its parts bumps it.
pub const FORMAT_VERSION: u32 = 1;
/// The header: magic, version (u32), payload length (u64), SHA-256 of the payload.
const HEADER_LEN: usize = MAGIC.len() + 4 + 8 + 32;
/// A state file larger than this is not ours (a real one is tens of KiB per vCPU).
const MAX_PAYLOAD: u64 = 64 << 20;

/// A snapshot that could not be taken or used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A snapshot file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state file does not start with [`MAGIC`], or is cut short.
    #[error("{path} is not an ignite snapshot state file ({detail})")]
    NotASnapshot {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The state file was written by a build with another format.
    #[error("{path} has snapshot format version {found}; this build reads version {FORMAT_VERSION} only")]
    Version {
        /// The state file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The payload does not match its checksum: the file is damaged.
    #[error("{path} is damaged: its contents do not match the checksum in its header")]
    Checksum {
        /// The state file.
        path: PathBuf,
    },
    /// The payload passed its checksum but does not decode (a bug, or a hand-edited file).
    #[error("{path}: cannot decode the machine state")]
    Decode {
        /// The state file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The snapshot was taken on another CPU model: its saved CPU state would not run here.
    #[error("the snapshot was taken on {taken_on}, this host is {here}: restore it on the same CPU model")]
    HostCpu {
        /// The CPU it was taken on.
        taken_on: HostCpu,
        /// This host's CPU.
        here: HostCpu,
    },
    /// The VM to restore into is not shaped like the one saved.
    #[error("the snapshot has {what} {saved}, the vm to restore it into has {config}")]
    Shape {
        /// Which property (`vcpus`, `memory MiB`).
        what: &'static str,
        /// The snapshot's value.
        saved: u64,
        /// The configuration's value.
        config: u64,
    },
    /// The memory file does not hold the guest memory the state describes.
    #[error("{path} holds {found} bytes, the snapshot's guest memory is {expected} bytes")]
    MemorySize {
        /// The memory file.
        path: PathBuf,
        /// Its size.
        found: u64,
        /// The size of guest RAM.
        expected: u64,
    },
    /// A KVM call while saving or restoring failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which call (e.g. `vcpu 1: get lapic`).
        what: String,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A virtio device cannot take its saved state (another kind of device in its slot, another
    /// queue layout, or it does not start again).
    #[error("virtio device {index} cannot be restored: {detail}")]
    Device {
        /// Its slot.
        index: usize,
        /// Why.
        detail: String,
    },
    /// The VM has a device (or the host a CPU feature) whose state the format cannot hold yet.
    #[error("the vm has {device}, whose state snapshots cannot hold yet")]
    Unsupported {
        /// The device (e.g. `virtio-blk disk /var/lib/x.img`).
        device: String,
    },
    /// The VMM was started without a snapshot directory.
    #[error("this vm has no snapshot directory (start its vmm with --snapshot-dir)")]
    NoDirectory,
    /// The snapshot name is not one plain path component.
    #[error("`{name}` is not a snapshot name: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'")]
    Name {
        /// The name given.
        name: String,
    },
    /// A snapshot of that name exists.
    #[error("a snapshot named `{name}` exists already")]
    Exists {
        /// The name given.
        name: String,
    },
    /// The VM ended before or while it was being saved.
    #[error("the vm has exited ({0})")]
    Exited(ExitReason),
}

impl SnapshotError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
        move |source| SnapshotError::Io { path: path.to_path_buf(), source }
    }

    pub(crate) fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
        let what = what.into();
        move |source| SnapshotError::Kvm { what, source }
    }
}

/// The host CPU a snapshot belongs to: vendor, family, model and stepping from CPUID.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCpu {
    /// `GenuineIntel`, `AuthenticAMD`, ...
    pub vendor: String,
    /// Family, model and stepping (CPUID leaf 1, EAX).
    pub signature: u32,
}

impl HostCpu {
    /// This host's CPU.
    pub fn current() -> HostCpu {
        use std::arch::x86_64::__cpuid;
        let leaf0 = __cpuid(0);
        let vendor: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx].iter().flat_map(|r| r.to_le_bytes()).collect();
        HostCpu { vendor: String::from_utf8_lossy(&vendor).into_owned(), signature: __cpuid(1).eax }
    }
}

impl std::fmt::Display for HostCpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.signature;
        let family = ((s >> 8) & 0xf) + ((s >> 20) & 0xff);
        let model = ((s >> 4) & 0xf) | ((s >> 12) & 0xf0);
        write!(f, "{} family {family:#x} model {model:#x} stepping {}", self.vendor, s & 0xf)
    }
}

/// The VM-wide KVM state: the in-kernel interrupt controllers, the PIT and the clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The i8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

const PIC_MASTER: u32 = 0;
const PIC_SLAVE: u32 = 1;
const IOAPIC: u32 = 2;

impl VmState {
    /// Reads the VM-wide state (the vCPUs must be paused).
    pub(crate) fn save(vm: &VmFd) -> Result<VmState, SnapshotError> {
        let chip = |id: u32, name: &str| {
            let mut chip = kvm_irqchip { chip_id: id, ..Default::default() };
            vm.get_irqchip(&mut chip).map_err(SnapshotError::kvm(format!("get irqchip {name}")))?;
            Ok::<_, SnapshotError>(chip)
        };
        Ok(VmState {
            pic_master: chip(PIC_MASTER, "pic master")?,
            pic_slave: chip(PIC_SLAVE, "pic slave")?,
            ioapic: chip(IOAPIC, "ioapic")?,
            pit: vm.get_pit2().map_err(SnapshotError::kvm("get pit"))?,
            clock: vm.get_clock().map_err(SnapshotError::kvm("get clock"))?,
        })
    }

    /// Writes the state into a new VM (before its vCPUs are restored).
    pub(crate) fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        vm.set_pit2(&self.pit).map_err(SnapshotError::kvm("set pit"))?;
        // Only the clock value is restored: the flags describe the host it was read on.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            flags: self.clock.flags & !KVM_CLOCK_TSC_STABLE,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(SnapshotError::kvm("set clock"))?;
        for (chip, name) in [(&self.pic_master, "pic master"), (&self.pic_slave, "pic slave"), (&self.ioapic, "ioapic")]
        {
            vm.set_irqchip(chip).map_err(SnapshotError::kvm(format!("set irqchip {name}")))?;
        }
        Ok(())
    }
}

/// Everything of a paused VM except its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// The CPU the snapshot was taken on.
    pub host_cpu: HostCpu,
    /// Guest RAM in MiB (the memory file's regions follow the layout for this size).
    pub memory_mib: u32,
    /// Each vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The VM-wide KVM state.
    pub vm: VmState,
    /// COM1.
    pub serial: SerialState,
    /// The keyboard controller.
    pub i8042: I8042State,
    /// The virtio-mmio transports and their devices, in slot order.
    pub virtio: Vec<TransportState>,
}

/// Checks that `name` can name a snapshot directory: 1 to 64 of `[A-Za-z0-9._-]`, not starting with
/// `.` (so never `.`, `..` or a hidden temporary name).
pub fn check_name(name: &str) -> Result<(), SnapshotError> {
    let plain = name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > 64 || name.starts_with('.') || !plain {
        return Err(SnapshotError::Name { name: name.to_string() });
    }
    Ok(())
}

/// Writes `state` and `mem` into `dir` (created if missing), atomically as described in the module
/// documentation. Returns the bytes written to the memory file.
pub fn save(dir: &Path, state: &MachineState, mem: &GuestMemory) -> Result<u64, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(SnapshotError::io(dir))?;
    let memory_tmp = dir.join(format!(".{MEMORY_FILE}.tmp"));
    let written = write_synced(&memory_tmp, |file| {
        let mut written = 0u64;
        for region in mem.iter() {
            let len = region.len() as usize;
            mem.write_all_volatile_to(region.start_addr(), file, len).map_err(std::io::Error::other)?;
            written += len as u64;
        }
        Ok(written)
    })?;
    let payload =
        serde_json::to_vec(state).map_err(|source| SnapshotError::Decode { path: dir.join(STATE_FILE), source })?;
    let state_tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    write_synced(&state_tmp, |file| {
        file.write_all(MAGIC)?;
        file.write_all(&FORMAT_VERSION.to_le_bytes())?;
        file.write_all(&(payload.len() as u64).to_le_bytes())?;
        file.write_all(&Sha256::digest(&payload))?;
        file.write_all(&payload)
    })?;
    let memory = dir.join(MEMORY_FILE);
    std::fs::rename(&memory_tmp, &memory).map_err(SnapshotError::io(&memory))?;
    let state_path = dir.join(STATE_FILE);
    std::fs::rename(&state_tmp, &state_path).map_err(SnapshotError::io(&state_path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(SnapshotError::io(dir))?;
    Ok(written)
}

fn write_synced<T>(path: &Path, body: impl FnOnce(&mut File) -> std::io::Result<T>) -> Result<T, SnapshotError> {
    let mut file = File::create(path).map_err(SnapshotError::io(path))?;
    let out = body(&mut file).and_then(|out| file.sync_all().map(|()| out));
    out.map_err(|source| {
        let _ = std::fs::remove_file(path);
        SnapshotError::Io { path: path.to_path_buf(), source }
    })
}

/// A snapshot read back: its machine state, checked, and its memory file, open.
pub struct Loaded {
    /// The machine state.
    pub state: MachineState,
    /// The memory file, open for reading.
    pub memory: File,
    /// Its path (for errors).
    pub memory_path: PathBuf,
}

/// Reads and checks the snapshot in `dir`: header, version, checksum, host CPU, and that the memory
/// file exists. Nothing is mapped yet.
pub fn load(dir: &Path) -> Result<Loaded, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let mut file = File::open(&path).map_err(SnapshotError::io(&path))?;
    let not_ours = |detail: &str| SnapshotError::NotASnapshot { path: path.clone(), detail: detail.to_string() };
    let mut header = [0u8; HEADER_LEN];
    file.read_exact(&mut header).map_err(|_| not_ours("shorter than its header"))?;
    if &header[..MAGIC.len()] != MAGIC {
        return Err(not_ours("wrong magic"));
    }
    let field = |at: usize, len: usize| &header[MAGIC.len() + at..MAGIC.len() + at + len];
    let version = u32::from_le_bytes(field(0, 4).try_into().unwrap_or_default());
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version { path, found: version });
    }
    let len = u64::from_le_bytes(field(4, 8).try_into().unwrap_or_default());
    if len > MAX_PAYLOAD {
        return Err(not_ours(&format!("a payload of {len} bytes is announced")));
    }
    let mut payload = Vec::with_capacity(len as usize);
    file.take(len + 1).read_to_end(&mut payload).map_err(SnapshotError::io(&path))?;
    if payload.len() as u64 != len || Sha256::digest(&payload).as_slice() != field(12, 32) {
        return Err(SnapshotError::Checksum { path });
    }
    let state: MachineState =
        serde_json::from_slice(&payload).map_err(|source| SnapshotError::Decode { path: path.clone(), source })?;
    let here = HostCpu::current();
    if state.host_cpu != here {
        return Err(SnapshotError::HostCpu { taken_on: state.host_cpu, here });
    }
    let memory_path = dir.join(MEMORY_FILE);
    let memory = File::open(&memory_path).map_err(SnapshotError::io(&memory_path))?;
    Ok(Loaded { state, memory, memory_path })
}

impl Loaded {
    /// Checks that a VM built from `config` can take this snapshot: the same vCPU count, memory size
    /// and number of virtio devices, and a memory file of exactly that memory's size. What
    /// [`crate::Vm::restore`] checks before it builds anything, for callers that must know before
    /// they stop the VM the snapshot replaces.
    pub fn check_fits(&self, config: &crate::VmConfig) -> Result<(), SnapshotError> {
        let saved = &self.state;
        for (what, saved, config) in [
            ("vcpus", saved.vcpus.len() as u64, u64::from(config.vcpus)),
            ("memory MiB", u64::from(saved.memory_mib), u64::from(config.memory_mib)),
            ("virtio devices", saved.virtio.len() as u64, config.virtio_device_count() as u64),
        ] {
            if saved != config {
                return Err(SnapshotError::Shape { what, saved, config });
            }
        }
        let expected: u64 = crate::vm::ram_ranges(config.memory_mib).iter().map(|&(_, len)| len as u64).sum();
        let found = self.memory.metadata().map_err(SnapshotError::io(&self.memory_path))?.len();
        if found != expected {
            return Err(SnapshotError::MemorySize { path: self.memory_path.clone(), found, expected });
        }
        Ok(())
    }
}

/// Maps `file` privately as guest memory with the regions `ranges` (copy on write: the guest's writes
/// stay in this process). The file must hold exactly the regions' bytes.
pub(crate) fn map_memory(
    file: &File,
    path: &Path,
    ranges: &[(GuestAddress, usize)],
) -> Result<GuestMemory, SnapshotError> {
    let expected: u64 = ranges.iter().map(|&(_, len)| len as u64).sum();
    let found = file.metadata().map_err(SnapshotError::io(path))?.len();
    if found != expected {
        return Err(SnapshotError::MemorySize { path: path.to_path_buf(), found, expected });
    }
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for &(start, len) in ranges {
        let file = file.try_clone().map_err(SnapshotError::io(path))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(file, offset)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| SnapshotError::Io { path: path.to_path_buf(), source: std::io::Error::other(e.to_string()) })?;
        let region = GuestRegionMmap::new(mapping, start).ok_or_else(|| SnapshotError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(format!("region at {:#x} overflows the guest address space", start.0)),
        })?;
        regions.push(region);
        offset += len as u64;
    }
    GuestMemory::from_regions(regions)
        .map_err(|e| SnapshotError::Io { path: path.to_path_buf(), source: std::io::Error::other(e.to_string()) })
}

#[cfg(test)]
mod tests;
