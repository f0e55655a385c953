//! Keeping `--root` private: it holds secrets at rest (the store has every manifest's env and
//! files, config drives carry them to guests, disks and console logs hold whatever guests wrote).
//! The root itself is mode 0700 and every process that writes under it runs with umask 077, so
//! nothing there is readable or writable by group or others, whatever mode a file is created with
//! by us, sled, libgit2, mkfs or the VMM.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// The mode of `--root`.
pub const ROOT_MODE: u32 = 0o700;
/// The umask of every ignite process writing under `--root`.
pub const UMASK: u32 = 0o077;

/// Sets this process's umask to [`UMASK`] (inherited by the VMM processes it starts). Call it
/// first thing in a process that writes under `--root`, before any thread starts.
pub fn restrict_umask() {
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(UMASK));
}

/// Creates `root` (mode 0700) if missing, and makes an existing root 0700: a root created before
/// (or by hand, 0755) must not keep other users able to look inside.
pub fn secure_root(root: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(ROOT_MODE).create(root)?;
    let mode = std::fs::metadata(root)?.permissions().mode() & 0o7777;
    if mode != ROOT_MODE {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(ROOT_MODE))?;
        tracing::info!(root = %root.display(), old = format!("{mode:o}"), "made the root private (0700)");
    }
    Ok(())
}

/// Writes `value` as JSON to `path` through a synced temp file (`<path>.tmp`) renamed into place:
/// a reader, or the daemon after a crash, sees the old record or the new one, never half of one.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_root_is_closed_and_a_missing_one_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        secure_root(&open).unwrap();
        assert_eq!(std::fs::metadata(&open).unwrap().permissions().mode() & 0o7777, 0o700);
        let missing = dir.path().join("a/b");
        secure_root(&missing).unwrap();
        assert_eq!(std::fs::metadata(&missing).unwrap().permissions().mode() & 0o7777, 0o700);
    }
}
