//! Preparing the guest before the main process: pseudo filesystems, the config drive, hostname and name
//! resolution files, ssh keys and copied files.

use std::os::unix::fs::{chown, PermissionsExt};
use std::path::Path;

use guest_api::boot::CONFIG_PARAM;
use guest_api::config::{self, GuestConfig};
use guest_api::image::{ImageConfig, IMAGE_CONFIG_PATH};
use ignite_init::error_chain as chain;
use ignite_init::sys;

use crate::log;

/// Mounts /proc, /sys, /dev (devtmpfs), /dev/pts, /run and /tmp; failures are logged, not fatal, except /proc.
pub fn mount_pseudo_filesystems() -> Result<(), String> {
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    sys::mount("proc", "/proc", nodev, "").map_err(|e| format!("cannot mount /proc: {e}"))?;
    let mounts = [
        ("sysfs", "/sys", nodev, ""),
        ("devtmpfs", "/dev", libc::MS_NOSUID, "mode=0755"),
        ("devpts", "/dev/pts", libc::MS_NOSUID | libc::MS_NOEXEC, "mode=0620,ptmxmode=0666"),
        ("tmpfs", "/run", libc::MS_NOSUID | libc::MS_NODEV, "mode=0755"),
        ("tmpfs", "/tmp", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777"),
    ];
    let mounted = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for (fstype, target, flags, data) in mounts {
        if mounted.lines().any(|l| l.split(' ').nth(1) == Some(target)) {
            continue;
        }
        if let Err(e) = sys::mount(fstype, target, flags, data) {
            log(&format!("cannot mount {fstype} on {target}: {e}"));
        }
    }
    Ok(())
}

/// Reads the config drive named by `ignite.config=` on the kernel command line (none: defaults).
pub fn load_guest_config() -> Result<GuestConfig, String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("cannot read /proc/cmdline: {e}"))?;
    let Some(device) = cmdline.split_whitespace().find_map(|arg| arg.strip_prefix(CONFIG_PARAM)) else {
        log("no ignite.config= on the kernel command line: running the image's own configuration");
        return Ok(GuestConfig::default());
    };
    let drive = std::fs::File::open(device).map_err(|e| format!("cannot open config drive {device}: {e}"))?;
    config::read_config_drive(std::io::BufReader::new(drive)).map_err(|e| format!("{device}: {}", chain(&e)))
}

/// Reads the image configuration (absent: empty, so overrides alone can name the command).
pub fn load_image_config() -> Result<ImageConfig, String> {
    let path = format!("/{IMAGE_CONFIG_PATH}");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{path} is invalid: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(format!("cannot read {path}: {e}")),
    }
}

/// Sets the hostname and writes /etc/hostname, /etc/hosts and /etc/resolv.conf (failures are logged).
pub fn network_identity(vm: &GuestConfig) {
    if !vm.hostname.is_empty() {
        if let Err(e) = sys::sethostname(&vm.hostname) {
            log(&format!("cannot set hostname {:?}: {e}", vm.hostname));
        }
        write_logged("/etc/hostname", format!("{}\n", vm.hostname).as_bytes(), 0o644);
    }
    let name = if vm.hostname.is_empty() { String::new() } else { format!(" {}", vm.hostname) };
    let hosts = format!("127.0.0.1\tlocalhost{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    write_logged("/etc/hosts", hosts.as_bytes(), 0o644);
    if !vm.dns.is_empty() {
        let resolv: String = vm.dns.iter().map(|ns| format!("nameserver {ns}\n")).collect();
        write_logged("/etc/resolv.conf", resolv.as_bytes(), 0o644);
    }
}

/// Writes root's authorized_keys, the copied files and the reserved join configuration.
pub fn write_files(vm: &GuestConfig, root_home: &str) -> Result<(), String> {
    if !vm.authorized_keys.is_empty() {
        let dir = Path::new(root_home).join(".ssh");
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        let keys: String = vm.authorized_keys.iter().map(|k| format!("{}\n", k.trim_end())).collect();
        write(&dir.join("authorized_keys"), keys.as_bytes(), 0o600)?;
        let _ = chown(&dir, Some(0), Some(0));
    }
    for file in &vm.files {
        let content = config::decode_content(file).map_err(|e| chain(&e))?;
        write(Path::new(&file.path), &content, file.mode)?;
    }
    if let Some(join) = &vm.join {
        write(Path::new(&join.config_path), join.config.as_bytes(), 0o600)?;
    }
    Ok(())
}

fn write_logged(path: &str, content: &[u8], mode: u32) {
    if let Err(e) = write(Path::new(path), content, mode) {
        log(&e);
    }
}

/// Writes `content` to `path` (parents created) and sets `mode`.
fn write(path: &Path, content: &[u8], mode: u32) -> Result<(), String> {
    let err = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    std::fs::write(path, content).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)
}
