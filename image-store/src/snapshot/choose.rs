//! Picking a snapshotter for a store: devicemapper where the kernel has it, else reflink where the
//! store's filesystem can clone, else copy; or the one named by an explicit override.

use std::sync::Arc;

use super::{
    reflink_supported, DmPoolConfig, DmSnapshotter, FileSnapshotter, HostOps, LinuxHostOps, SnapshotError, Snapshotter,
};
use crate::StorePaths;

/// The names [`choose`] accepts as an override.
pub const SNAPSHOTTER_NAMES: [&str; 3] = ["devicemapper", "reflink", "copy"];

/// Chooses a snapshotter for `paths` on this host (see [`choose_with`]); a devicemapper one keeps
/// its thin pool where `pool` says.
pub fn choose(
    paths: &StorePaths,
    override_name: Option<&str>,
    pool: &DmPoolConfig,
) -> Result<Box<dyn Snapshotter>, SnapshotError> {
    choose_with(paths, override_name, pool, Arc::new(LinuxHostOps))
}

/// Chooses a snapshotter using `ops` for host access.
///
/// Automatic choice: `devicemapper` if `ops.dm_available()`, else `reflink` if a probe file can be
/// cloned in the reflink state directory (same filesystem as the store), else `copy`. An override
/// picks one explicitly: `devicemapper` without device-mapper is [`SnapshotError::DmUnavailable`];
/// `reflink` is honoured even where cloning fails, and then each creation fails with
/// [`SnapshotError::ReflinkUnsupported`]; an unknown name is [`SnapshotError::UnknownSnapshotter`].
pub fn choose_with(
    paths: &StorePaths,
    override_name: Option<&str>,
    pool: &DmPoolConfig,
    ops: Arc<dyn HostOps>,
) -> Result<Box<dyn Snapshotter>, SnapshotError> {
    let dm = |ops| Box::new(DmSnapshotter::new(paths, pool.clone(), ops));
    let chosen: Box<dyn Snapshotter> = match override_name {
        Some("devicemapper") if !ops.dm_available() => return Err(SnapshotError::DmUnavailable),
        Some("devicemapper") => dm(ops),
        Some("reflink") => Box::new(FileSnapshotter::reflink(paths, ops)),
        Some("copy") => Box::new(FileSnapshotter::copy(paths, ops)),
        Some(other) => return Err(SnapshotError::UnknownSnapshotter { name: other.into() }),
        None if ops.dm_available() => dm(ops),
        None if reflink_supported(&paths.snapshots_dir("reflink")) => Box::new(FileSnapshotter::reflink(paths, ops)),
        None => Box::new(FileSnapshotter::copy(paths, ops)),
    };
    tracing::info!(snapshotter = chosen.name(), overridden = override_name.is_some(), "snapshotter chosen");
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::RecordingHostOps;

    #[test]
    fn dm_first_then_reflink_or_copy() {
        let dir = tempfile::tempdir().unwrap();
        let paths = StorePaths::new(dir.path());
        assert_eq!(
            choose_with(&paths, None, &DmPoolConfig::default(), Arc::new(RecordingHostOps::with_dm())).unwrap().name(),
            "devicemapper"
        );
        let fallback =
            choose_with(&paths, None, &DmPoolConfig::default(), Arc::new(RecordingHostOps::without_dm())).unwrap();
        let expected = if reflink_supported(&paths.snapshots_dir("reflink")) { "reflink" } else { "copy" };
        assert_eq!(fallback.name(), expected);
    }

    #[test]
    fn overrides() {
        let dir = tempfile::tempdir().unwrap();
        let paths = StorePaths::new(dir.path());
        let ops = || Arc::new(RecordingHostOps::without_dm());
        let pool = DmPoolConfig::default();
        assert_eq!(choose_with(&paths, Some("copy"), &pool, ops()).unwrap().name(), "copy");
        assert_eq!(choose_with(&paths, Some("reflink"), &pool, ops()).unwrap().name(), "reflink");
        let dm = choose_with(&paths, Some("devicemapper"), &pool, ops()).err().unwrap();
        assert!(dm.to_string().contains("/dev/mapper/control"), "{dm}");
        let e = choose_with(&paths, Some("zfs"), &pool, ops()).err().unwrap().to_string();
        assert!(e.contains("zfs") && e.contains("devicemapper, reflink, copy"), "{e}");
    }
}
