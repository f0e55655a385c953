//! `VmConfig`: the serializable description of one microVM. Live objects are built from it by
//! [`crate::Vm::start`]; nothing here touches the host.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything needed to boot one microVM. Serializes to JSON so the daemon can hand it to a
/// per-VM `ignite vmm` process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VmConfig {
    /// Number of vCPUs (1..=[`MAX_VCPUS`]).
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Kernel image: an ELF `vmlinux` (64-bit or PVH entry) or a bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs loaded next to the kernel.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line, without the device announcements the VMM appends itself.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Block devices, in order: the first is `/dev/vda`.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Network interfaces backed by host tap devices.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// Optional virtio-vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Whether to offer a virtio-rng device (entropy from the host's `getrandom`).
    #[serde(default = "default_true")]
    pub rng: bool,
    /// Where the serial console goes.
    #[serde(default)]
    pub console: ConsoleConfig,
    /// A unix socket serving the serial console too: clients get its output and type its input
    /// (`ignite attach`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_socket: Option<PathBuf>,
    /// A cap on a console log file: past it the log is rotated (one old file, `<log>.1`, is kept),
    /// so a chatty or hostile guest cannot fill the disk. `None` for no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_max_bytes: Option<u64>,
    /// Jail the VMM process (see [`crate::jail`]); `None` runs it with the caller's privileges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<crate::jail::JailConfig>,
    /// Where `snapshot` control requests save (`<dir>/<name>`); none means the VM cannot be saved
    /// through its control socket. A jailed VMM sees it as [`crate::jail::JAIL_SNAPSHOTS`], so it must
    /// belong to the jail's uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_dir: Option<PathBuf>,
    /// Start from this snapshot directory ([`crate::snapshot`]) instead of booting the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<PathBuf>,
    /// How to handle the host's virtualization mode (see [`crate::host::VirtMode`]).
    #[serde(default)]
    pub virt_mode: VirtModeConfig,
}

/// The largest vCPU count the MP table and the interrupt layout support.
pub const MAX_VCPUS: u8 = 32;
/// The smallest guest memory that can hold the boot structures and a minimal kernel.
pub const MIN_MEMORY_MIB: u32 = 16;
/// The largest guest memory accepted (the 32-bit MMIO hole is placed above it when needed).
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;

fn default_cmdline() -> String {
    "console=ttyS0 reboot=k panic=-1".to_string()
}

fn default_true() -> bool {
    true
}

impl VmConfig {
    /// A configuration with one vCPU, 128 MiB, the default command line and no devices.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            vcpus: 1,
            memory_mib: 128,
            kernel: kernel.into(),
            initrd: None,
            cmdline: default_cmdline(),
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            rng: true,
            console: ConsoleConfig::default(),
            console_socket: None,
            console_max_bytes: None,
            jail: None,
            snapshot_dir: None,
            restore_from: None,
            virt_mode: VirtModeConfig::default(),
        }
    }

    /// How many virtio-mmio devices the VM gets (disks, interfaces, vsock, rng).
    pub fn virtio_device_count(&self) -> usize {
        self.disks.len() + self.nets.len() + usize::from(self.vsock.is_some()) + usize::from(self.rng)
    }

    /// Checks the values that do not need the host: counts, sizes, duplicate identifiers.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        let devices = self.virtio_device_count();
        if devices > crate::arch::layout::MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        if let Some(vsock) = &self.vsock {
            if vsock.guest_cid < 3 || vsock.guest_cid > u64::from(u32::MAX) {
                return Err(ConfigError::VsockCid(vsock.guest_cid));
            }
        }
        if self.cmdline.contains('\n') || self.cmdline.contains('\0') {
            return Err(ConfigError::Cmdline);
        }
        Ok(())
    }
}

/// A virtio-blk device backed by a raw file or block device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DiskConfig {
    /// Path of the backing file.
    pub path: PathBuf,
    /// Expose the disk read-only (`VIRTIO_BLK_F_RO`); writes fail with an I/O error status.
    #[serde(default)]
    pub read_only: bool,
}

/// A virtio-net device backed by an existing host tap device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetConfig {
    /// Name of the host tap device (created by the caller, e.g. the controller's host networking).
    pub tap: String,
    /// The guest MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The guest's IPv4 address, when the host assigned one: frames from another source address are
    /// dropped (see `devices::virtio::net::SourceFilter`). Frames from another MAC are dropped always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<std::net::Ipv4Addr>,
}

/// A virtio-vsock device whose host side is a unix socket, Firecracker-style: the host connects to
/// `uds_path` and writes `CONNECT <port>\n`; guest-initiated connections to port P go to `uds_path_P`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub guest_cid: u64,
    /// The host-side unix socket path.
    pub uds_path: PathBuf,
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ConsoleConfig {
    /// The VMM process's standard output.
    #[default]
    Stdout,
    /// Appended to a file (created if missing).
    File(PathBuf),
    /// Discarded.
    Null,
}

/// Whether to apply the workarounds for hosts whose KVM runs guests through an instruction emulator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum VirtModeConfig {
    /// Detect it from the host CPU flags.
    #[default]
    Auto,
    /// Hardware virtualization: no workarounds.
    Hardware,
    /// Software/emulated KVM: add the guest kernel arguments and handle emulation failures.
    Emulated,
}

/// A configuration value that cannot be used, named precisely.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    Vcpus(u8),
    /// Memory size out of range.
    #[error("memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {0} MiB")]
    Memory(u32),
    /// More virtio devices than interrupt lines and MMIO slots.
    #[error("{0} virtio devices requested, at most {max} are supported", max = crate::arch::layout::MAX_VIRTIO_DEVICES)]
    TooManyDevices(usize),
    /// vsock CID out of range.
    #[error("vsock guest CID must be between 3 and 2^32-1, got {0}")]
    VsockCid(u64),
    /// Command line with a newline or NUL byte.
    #[error("the kernel command line must not contain newlines or NUL bytes")]
    Cmdline,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json_and_rejects_unknown_fields() {
        let mut config = VmConfig::new("/k/vmlinux");
        config.disks.push(DiskConfig { path: "/d.img".into(), read_only: true });
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), config);
        let bad = json.replacen("\"vcpus\"", "\"vcpuz\"", 1);
        let err = serde_json::from_str::<VmConfig>(&bad).unwrap_err().to_string();
        assert!(err.contains("vcpuz"), "{err}");
    }

    #[test]
    fn validate_names_the_bad_value() {
        let mut config = VmConfig::new("/k");
        config.vcpus = 0;
        assert_eq!(config.validate(), Err(ConfigError::Vcpus(0)));
        config.vcpus = 2;
        config.memory_mib = 1;
        assert_eq!(config.validate(), Err(ConfigError::Memory(1)));
        config.memory_mib = 64;
        config.vsock = Some(VsockConfig { guest_cid: 2, uds_path: "/v".into() });
        assert_eq!(config.validate(), Err(ConfigError::VsockCid(2)));
        config.vsock = None;
        config.cmdline.push('\n');
        assert_eq!(config.validate(), Err(ConfigError::Cmdline));
        config.cmdline.pop();
        assert_eq!(config.validate(), Ok(()));
    }
}
