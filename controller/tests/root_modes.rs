//! Secrets at rest: the real `ignite daemon` runs a VM whose environment carries a secret, then
//! every file and directory under `--root` is checked. The root is private (0700), nothing in it
//! is readable or writable by group or others, and the secret is only in files of mode 0600.
//! Files may belong to other uids (the VMM jail runs VMs under their own uid): the mode bits
//! are what keeps them private.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::daemon::{vm_up, wait_for, DaemonProcess, KillVmsOnDrop};
use support::fleet::{manifest, registry_with_image, unavailable};
use support::git::Repo;

const SENTINEL: &str = "sentinel-4f1d9c2e-do-not-leak";

/// Every path under `root` (not following symlinks), with its metadata.
fn walk(root: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut found = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            // Files can vanish while the daemon works (temp files renamed into place).
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            if meta.is_dir() {
                todo.push(path.clone());
            }
            found.push((path, meta));
        }
    }
    found
}

fn contains(path: &Path, needle: &[u8]) -> bool {
    let Ok(bytes) = std::fs::read(path) else { return false };
    bytes.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn nothing_under_the_root_is_readable_by_other_users() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP nothing_under_the_root_is_readable_by_other_users: {why}");
        return;
    }
    let (_registry, image) = registry_with_image();
    let repo = Repo::new();
    let env = format!("  env:\n    - name: API_TOKEN\n      value: {SENTINEL}\n");
    repo.commit(&[("vms/vault.yaml", Some(&manifest("vault", &image, "64Mi", &env)))], "a VM with a secret");
    let base = tempfile::tempdir().unwrap();
    // A root made the ordinary way (mode 0755 under the usual umask), as an operator would.
    let root = base.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _guard = KillVmsOnDrop(&root);
    let mut daemon = DaemonProcess::start(&root, &repo.url(), &["--no-network"], &[]);
    wait_for("vault up", Duration::from_secs(90), || {
        daemon.assert_alive();
        vm_up(&root, "vault")
    });
    let root_mode = std::fs::metadata(&root).unwrap().permissions().mode() & 0o7777;
    assert_eq!(root_mode, 0o700, "--root is private");

    let mut open = Vec::new();
    let mut leaks = Vec::new();
    let mut holders = Vec::new();
    for (path, meta) in walk(&root) {
        let name = path.file_name().unwrap().to_string_lossy();
        // The test harness's own capture of the daemon's stderr, not the daemon's file.
        if path.parent() == Some(root.as_path()) && name.starts_with("daemon-") && name.ends_with(".log") {
            continue;
        }
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            open.push(format!("{} {mode:o} uid {}", path.display(), meta.uid()));
        }
        if meta.is_file() && contains(&path, SENTINEL.as_bytes()) {
            holders.push(path.display().to_string());
            if mode != 0o600 {
                leaks.push(format!("{} {mode:o}", path.display()));
            }
        }
    }
    assert!(open.is_empty(), "open to group or others:\n{}", open.join("\n"));
    assert!(leaks.is_empty(), "the secret is in files not of mode 0600:\n{}", leaks.join("\n"));
    // The walk did look where the secret lives: the config drive carries the environment.
    assert!(holders.iter().any(|h| h.ends_with("runtime/vault/config.img")), "{holders:?}");
    daemon.terminate();
}
