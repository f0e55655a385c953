//! Loop-mounted scratch filesystems for tests that need a real xfs, btrfs or ext4 mount, torn down
//! so that nothing is left behind: no mount, no loop device.
//!
//! Unmounting can fail with EBUSY for a moment after the test closed its last file: a process that
//! another test thread forked at that instant holds copies of every open descriptor until it execs,
//! and filesystems finish background work on close. So teardown retries, then detaches lazily, and
//! waits for the loop device to go before it returns; whatever still holds the mount is named.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::snapshot::{HostOps, LinuxHostOps};

/// How long teardown keeps retrying a busy unmount and waits for a loop device to go.
pub const TEARDOWN_PATIENCE: Duration = Duration::from_secs(10);

/// A filesystem image attached to a loop device and mounted; unmounted and detached on drop, also
/// when the test panics.
pub struct LoopMount {
    /// The loop device the image is attached to.
    pub device: PathBuf,
    /// Where the filesystem is mounted.
    pub mountpoint: PathBuf,
    image: PathBuf,
}

impl LoopMount {
    /// Creates `dir/fs.img` of `bytes`, formats it with `mkfs` (program and options; the image path is
    /// appended), attaches it and mounts it on `dir/mnt`.
    pub fn new(dir: &Path, bytes: u64, mkfs: &[&str]) -> LoopMount {
        let image = dir.join("fs.img");
        std::fs::File::create(&image).and_then(|f| f.set_len(bytes)).expect("create the filesystem image");
        let status = Command::new(mkfs[0]).args(&mkfs[1..]).arg(&image).status().expect("run mkfs");
        assert!(status.success(), "{mkfs:?} {} failed", image.display());
        let device = LinuxHostOps.loop_attach(&image, false).expect("attach a loop device");
        let mountpoint = dir.join("mnt");
        std::fs::create_dir_all(&mountpoint).expect("create the mount point");
        let mounted = LoopMount { device, mountpoint, image };
        let out = Command::new("mount").arg(&mounted.device).arg(&mounted.mountpoint).output().expect("run mount");
        assert!(out.status.success(), "mount failed: {}", String::from_utf8_lossy(&out.stderr));
        mounted
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if let Err(e) = unmount(&self.mountpoint) {
            eprintln!("teardown: {e}");
        }
        if let Err(e) = detach_all(&self.image) {
            eprintln!("teardown: {e}");
        }
    }
}

/// An existing image mounted with `mount -o loop[,OPTIONS]`; unmounted, and its loop device gone, on
/// drop.
pub struct Mounted {
    /// Where the filesystem is mounted.
    pub mountpoint: PathBuf,
    image: PathBuf,
}

impl Mounted {
    /// Mounts `image` on `mountpoint` through a loop device, with extra mount `options` (e.g. `ro`).
    /// The error is mount's own message.
    pub fn loop_mount(image: &Path, mountpoint: &Path, options: &str) -> Result<Mounted, String> {
        let options = if options.is_empty() { "loop".to_string() } else { format!("loop,{options}") };
        let out = Command::new("mount")
            .args(["-o", &options])
            .arg(image)
            .arg(mountpoint)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount -o {options} failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Mounted { mountpoint: mountpoint.to_path_buf(), image: image.to_path_buf() })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = unmount(&self.mountpoint) {
            eprintln!("teardown: {e}");
        }
        if let Err(e) = detach_all(&self.image) {
            eprintln!("teardown: {e}");
        }
    }
}

/// Unmounts `mountpoint`, retrying while it is busy for up to [`TEARDOWN_PATIENCE`], then detaching it
/// lazily so the mount is gone from the namespace at once. Not mounted counts as done.
pub fn unmount(mountpoint: &Path) -> Result<(), String> {
    let deadline = Instant::now() + TEARDOWN_PATIENCE;
    loop {
        if !is_mounted(mountpoint) {
            return Ok(());
        }
        let out = Command::new("umount").arg(mountpoint).output().map_err(|e| format!("umount: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let holders = holders_of(mountpoint);
            let lazy = Command::new("umount").arg("-l").arg(mountpoint).status();
            return Err(format!(
                "{} stayed busy for {TEARDOWN_PATIENCE:?} ({}); held by {holders:?}; lazy unmount: {lazy:?}",
                mountpoint.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Detaches every loop device backed by `image` and waits until none is left (a device still in
/// use only goes once its last user closes it).
pub fn detach_all(image: &Path) -> Result<(), String> {
    let deadline = Instant::now() + TEARDOWN_PATIENCE;
    loop {
        let left = loops_backed_by(image);
        if left.is_empty() {
            return Ok(());
        }
        for device in &left {
            // Fails while the device is busy; the kernel then clears it on its last close.
            let _ = LinuxHostOps.loop_detach(device);
        }
        if Instant::now() >= deadline {
            return Err(format!("loop devices still attached to {}: {left:?}", image.display()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Loop devices whose backing file is `image`.
pub fn loops_backed_by(image: &Path) -> Vec<PathBuf> {
    let canon = std::fs::canonicalize(image).unwrap_or_else(|_| image.to_path_buf());
    LinuxHostOps
        .loop_list()
        .unwrap_or_default()
        .into_iter()
        .filter(|l| l.backing_file == image || l.backing_file == canon)
        .map(|l| l.device)
        .collect()
}

/// Whether `path` is a mount point in this mount namespace.
pub fn is_mounted(path: &Path) -> bool {
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mp| Path::new(&unescape_mountinfo(mp)) == canon)
}

/// Mount points in mountinfo escape space, tab, newline and backslash as octal.
fn unescape_mountinfo(field: &str) -> String {
    field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// `pid (comm)` of every process with an open file or working directory under `mountpoint`.
fn holders_of(mountpoint: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return found };
    for proc_dir in procs.flatten() {
        let pid = proc_dir.file_name().to_string_lossy().into_owned();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let base = proc_dir.path();
        let cwd = std::fs::read_link(base.join("cwd")).ok().into_iter();
        let fds = std::fs::read_dir(base.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok());
        if cwd.chain(fds).any(|target| target.starts_with(mountpoint)) {
            let comm = std::fs::read_to_string(base.join("comm")).unwrap_or_default();
            found.push(format!("{pid} ({})", comm.trim()));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/tmp/a\\040b\\134c"), "/tmp/a b\\c");
    }

    #[test]
    fn the_root_is_mounted_and_a_fresh_directory_is_not() {
        assert!(is_mounted(Path::new("/")));
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mounted(dir.path()));
        assert_eq!(unmount(dir.path()), Ok(()));
    }
}
