//! What the guest gets: its kernel command line, its config drive (settings for `ignite-init`)
//! and the `VmConfig` its VMM process runs.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use guest_api::config::{CopiedFile, GuestConfig};
use vmm_core::{ConsoleConfig, DiskConfig, NetConfig as VmNetConfig, VirtModeConfig, VmConfig, VsockConfig};

use crate::api::host_paths::{MAX_COPY_FILES_TOTAL_BYTES, MAX_COPY_FILE_BYTES};
use crate::api::{HostPaths, Vm};

use super::prepared::PreparedVm;

/// Every guest's vsock CID. The host side of each VM's vsock device is its own unix socket, not the
/// host kernel's vsock, so CIDs need not differ between VMs; 3 is the first one guests may have.
pub const GUEST_CID: u64 = 3;

/// Creates `dir` (and parents) readable by root only: it holds secrets (config drive).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// The VMM configuration of a prepared VM.
pub fn vm_config(vm: &Vm, prepared: &PreparedVm, virt_mode: VirtModeConfig) -> VmConfig {
    let mut config = VmConfig::new(&prepared.kernel);
    config.vcpus = vm.spec.cpus;
    config.memory_mib = u32::try_from(vm.spec.memory.mib()).unwrap_or(u32::MAX);
    config.cmdline = prepared.cmdline.clone();
    config.disks = vec![
        DiskConfig { path: prepared.disk.clone(), read_only: false },
        DiskConfig { path: prepared.config_drive.clone(), read_only: true },
    ];
    if let (Some(tap), Some(mac)) = (&prepared.tap, &prepared.mac) {
        // The guest may only send from its lease: see vmm-core's net SourceFilter.
        let ipv4 = prepared.ip.as_deref().and_then(|ip| ip.parse().ok());
        config.nets.push(VmNetConfig { tap: tap.clone(), mac: mac.clone(), ipv4 });
    }
    config.console = ConsoleConfig::Null; // the supervisor points it at the VM's console log
                                          // The guest agent (`ignite exec`); the supervisor puts the socket in the VM's run directory.
    config.vsock = Some(VsockConfig { guest_cid: GUEST_CID, uds_path: PathBuf::new() });
    config.virt_mode = virt_mode;
    config
}

/// The settings `ignite-init` reads from the config drive: hostname, command overrides,
/// environment, SSH keys and the copied files (host files read now, through `host_paths`, so the
/// guest gets the content as of this create).
pub fn guest_config(vm: &Vm, host_paths: &HostPaths) -> Result<GuestConfig, String> {
    use base64::Engine as _;
    let spec = &vm.spec;
    let (mut files, mut total) = (Vec::new(), 0u64);
    for (i, copy) in spec.copy_files.iter().enumerate() {
        let mode = copy.parsed_mode().and_then(Result::ok);
        let (content, mode) = match (&copy.source, &copy.content_base64) {
            (Some(source), _) => {
                let file = host_paths
                    .read(source, MAX_COPY_FILE_BYTES)
                    .map_err(|e| format!("spec.copyFiles[{i}].source: {}", guest_api::error_chain(&e)))?;
                (guest_api::config::encode_content(&file.content), mode.unwrap_or(file.mode))
            }
            (None, Some(content)) => {
                // Validation checked it decodes; re-encoded so the guest sees one canonical form.
                let compact: String = content.chars().filter(|c| !c.is_ascii_whitespace()).collect();
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(compact)
                    .map_err(|e| format!("spec.copyFiles[{i}].contentBase64: {e}"))?;
                (guest_api::config::encode_content(&bytes), mode.unwrap_or(0o644))
            }
            (None, None) => return Err(format!("spec.copyFiles[{i}]: names neither source nor contentBase64")),
        };
        total += content.len() as u64 / 4 * 3;
        if total > MAX_COPY_FILES_TOTAL_BYTES {
            return Err(format!("spec.copyFiles: more than the {MAX_COPY_FILES_TOTAL_BYTES} bytes one VM may copy"));
        }
        files.push(CopiedFile { path: copy.destination.clone(), mode, content });
    }
    Ok(GuestConfig {
        hostname: vm.metadata.name.clone(),
        command: spec.command.clone(),
        args: spec.args.clone(),
        env: spec.env.iter().map(|e| (e.name.clone(), e.value.clone())).collect(),
        working_dir: None,
        user: None,
        dns: Vec::new(),
        authorized_keys: spec.ssh.as_ref().map(|s| s.authorized_keys.clone()).unwrap_or_default(),
        files,
        join: None,
    })
}

/// Writes the config drive (mode 0600: it may hold keys and secrets).
pub fn write_drive(path: &Path, config: &GuestConfig) -> Result<(), guest_api::config::ConfigDriveError> {
    guest_api::config::write_config_drive(path, config)
}
