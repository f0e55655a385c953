//! Preparing the guest before the main process: what images expect from a normal boot (pseudo
//! filesystems, /dev links, loopback up, resource limits), the config drive, hostname and name
//! resolution files, ssh keys and copied files.

use std::os::unix::fs::{chown, PermissionsExt};
use std::path::Path;

use guest_api::boot::CONFIG_PARAM;
use guest_api::config::{self, GuestConfig};
use guest_api::image::{ImageConfig, IMAGE_CONFIG_PATH};
use ignite_init::error_chain as chain;
use ignite_init::sys;

use crate::log;

/// Mounts /proc, /sys, /sys/fs/cgroup (cgroup2), /dev (devtmpfs), /dev/pts, /dev/shm, /dev/mqueue,
/// /run and /tmp, then adds the /dev links ([`DEV_LINKS`]). A filesystem the kernel lacks is skipped
/// with a console line; failures are logged, not fatal, except /proc.
pub fn mount_pseudo_filesystems() -> Result<(), String> {
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    sys::mount("proc", "/proc", nodev, "").map_err(|e| format!("cannot mount /proc: {e}"))?;
    let mounts = [
        ("sysfs", "/sys", nodev, ""),
        ("cgroup2", "/sys/fs/cgroup", nodev, ""),
        ("devtmpfs", "/dev", libc::MS_NOSUID, "mode=0755"),
        ("devpts", "/dev/pts", libc::MS_NOSUID | libc::MS_NOEXEC, "mode=0620,ptmxmode=0666"),
        ("tmpfs", "/dev/shm", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777"),
        ("mqueue", "/dev/mqueue", nodev, ""),
        ("tmpfs", "/run", libc::MS_NOSUID | libc::MS_NODEV, "mode=0755"),
        ("tmpfs", "/tmp", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777"),
    ];
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let mounted = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for (fstype, target, flags, data) in mounts {
        if mounted.lines().any(|l| l.split(' ').nth(1) == Some(target)) {
            continue;
        }
        if !filesystems.is_empty() && !kernel_has_filesystem(&filesystems, fstype) {
            log(&format!("{target} not mounted: the kernel has no {fstype} filesystem"));
            continue;
        }
        if let Err(e) = sys::mount(fstype, target, flags, data) {
            log(&format!("cannot mount {fstype} on {target}: {e}"));
        }
    }
    for e in create_dev_links(Path::new("/dev")) {
        log(&e);
    }
    Ok(())
}

/// Whether `/proc/filesystems` (its text) lists `fstype` (lines `nodev\tNAME` or `\tNAME`).
fn kernel_has_filesystem(filesystems: &str, fstype: &str) -> bool {
    filesystems.lines().any(|line| line.split_whitespace().last() == Some(fstype))
}

/// The links a normal boot (udev, systemd, a container runtime) puts in /dev: name, target.
pub const DEV_LINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

/// Creates each of [`DEV_LINKS`] in `dev` unless something of that name exists (devtmpfs has its own
/// /dev/ptmx node); returns the failures as console lines.
fn create_dev_links(dev: &Path) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, target) in DEV_LINKS {
        let link = dev.join(name);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Err(e) = std::os::unix::fs::symlink(target, &link) {
            failures.push(format!("cannot link {} to {target}: {e}", link.display()));
        }
    }
    failures
}

/// Brings the loopback interface up (a kernel starts it down; `ip=` only configures eth0), so
/// services can listen on and reach 127.0.0.1 and ::1. A failure is logged.
pub fn loopback_up() {
    if let Err(e) = sys::interface_up("lo") {
        log(&format!("cannot bring the loopback interface up: {e}"));
    }
}

/// The open files limit every guest process starts with (soft and hard): 1048576, what Docker gave
/// containers for years (its unit's `LimitNOFILE=infinity`, i.e. the kernel's default `nr_open`) and
/// what images (databases, proxies) are tuned for, instead of the kernel's 1024/4096 for PID 1.
pub const NOFILE_LIMIT: u64 = 1 << 20;

/// The resource limits set on PID 1 (inherited by the main process, `ignite exec` commands and the
/// kubelet), given the kernel's `fs.nr_open` (the ceiling of RLIMIT_NOFILE; `None`: unknown):
/// (resource, name, soft, hard).
///
/// - open files: [`NOFILE_LIMIT`], bounded by `nr_open`;
/// - core dumps: soft 0, hard unlimited: a crashing service does not fill a small root disk with
///   cores, and `ulimit -c unlimited` still enables them when debugging (Docker's unit gives
///   unlimited, a habit of hosts with a large disk and systemd-coredump, neither of which a guest has).
///
/// Process count, locked memory and stack keep the kernel's defaults (scaled to the VM's memory).
fn rlimits(nr_open: Option<u64>) -> [(libc::__rlimit_resource_t, &'static str, u64, u64); 2] {
    let nofile = nr_open.map_or(NOFILE_LIMIT, |n| n.min(NOFILE_LIMIT));
    [(libc::RLIMIT_NOFILE, "RLIMIT_NOFILE", nofile, nofile), (libc::RLIMIT_CORE, "RLIMIT_CORE", 0, libc::RLIM_INFINITY)]
}

/// Sets [`rlimits`] on PID 1; failures are logged.
pub fn set_rlimits() {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse().ok());
    for (resource, name, soft, hard) in rlimits(nr_open) {
        if let Err(e) = sys::set_rlimit(resource, soft, hard) {
            log(&format!("cannot set {name} to {soft}/{hard}: {e}"));
        }
    }
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
    write_logged("/etc/hosts", hosts_file(&vm.hostname).as_bytes(), 0o644);
    if !vm.dns.is_empty() {
        let resolv: String = vm.dns.iter().map(|ns| format!("nameserver {ns}\n")).collect();
        write_logged("/etc/resolv.conf", resolv.as_bytes(), 0o644);
    }
}

/// The text of /etc/hosts: localhost on both loopback addresses, and the VM's `hostname` (if any) on
/// 127.0.0.1 so it resolves without DNS (as `hostname -f`, sudo and many servers expect).
fn hosts_file(hostname: &str) -> String {
    let name = if hostname.is_empty() { String::new() } else { format!(" {hostname}") };
    format!("127.0.0.1\tlocalhost{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filesystems_are_looked_up_by_name_in_proc_filesystems() {
        let text = "nodev\tsysfs\nnodev\ttmpfs\nnodev\tcgroup\n\text4\nnodev\tmqueue\n";
        assert!(kernel_has_filesystem(text, "ext4"));
        assert!(kernel_has_filesystem(text, "mqueue"));
        assert!(!kernel_has_filesystem(text, "cgroup2"), "cgroup (v1) is not cgroup2");
        assert!(!kernel_has_filesystem(text, "nodev"));
    }

    #[test]
    fn dev_links_are_created_once_and_existing_names_are_left_alone() {
        let dev = tempfile::tempdir().unwrap();
        std::fs::write(dev.path().join("ptmx"), b"a device node stands here").unwrap();
        assert_eq!(create_dev_links(dev.path()), Vec::<String>::new());
        assert_eq!(std::fs::read_link(dev.path().join("fd")).unwrap(), Path::new("/proc/self/fd"));
        assert_eq!(std::fs::read_link(dev.path().join("stderr")).unwrap(), Path::new("/proc/self/fd/2"));
        assert!(std::fs::read_link(dev.path().join("ptmx")).is_err(), "the existing ptmx is kept");
        assert_eq!(create_dev_links(dev.path()), Vec::<String>::new(), "a second run changes nothing");
        let missing = dev.path().join("no/such/dir");
        assert_eq!(create_dev_links(&missing).len(), DEV_LINKS.len(), "each failure is reported");
    }

    #[test]
    fn the_open_files_limit_is_dockers_bounded_by_nr_open_and_cores_are_off_but_allowed() {
        let limits = rlimits(None);
        assert_eq!((limits[0].0, limits[0].2, limits[0].3), (libc::RLIMIT_NOFILE, 1 << 20, 1 << 20));
        assert_eq!((limits[1].0, limits[1].2, limits[1].3), (libc::RLIMIT_CORE, 0, libc::RLIM_INFINITY));
        assert_eq!(rlimits(Some(4096))[0].2, 4096, "the kernel's nr_open is the ceiling");
        assert_eq!(rlimits(Some(1 << 30))[0].3, 1 << 20);
    }

    #[test]
    fn etc_hosts_resolves_the_hostname_and_localhost() {
        let hosts = hosts_file("web-1");
        assert!(
            hosts.lines().any(|l| l.starts_with("127.0.0.1") && l.split_whitespace().any(|w| w == "web-1")),
            "{hosts}"
        );
        assert!(hosts.lines().any(|l| l.starts_with("::1") && l.contains("localhost")), "{hosts}");
        assert_eq!(hosts_file(""), "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    }
}
