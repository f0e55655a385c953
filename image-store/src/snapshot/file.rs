//! [`FileSnapshotter`]: disks that are plain files in the state directory, made by a sparse copy
//! (`copy`) or a FICLONE clone (`reflink`) of the base, then grown with `resize2fs`.
//!
//! Layout: `snapshots/<name>/<vm>.ext4` for complete disks, `snapshots/<name>/.<vm>.ext4.tmp` while
//! one is being made. VM ids never start with `.`, so a temp file can never be mistaken for a disk.
//! The final name is made with `link(2)` (which refuses to overwrite) and the temp name then
//! unlinked, so two racing creations cannot silently replace each other's disk.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{
    check_size, copy::sparse_copy, grow_ext4, host_err, io_err, reflink::reflink_file, sync_file, validate_vm_id, Disk,
    HostOps, RecoveryReport, SnapshotError, Snapshotter,
};
use crate::StorePaths;

/// How the base is duplicated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Copy,
    Reflink,
}

/// A snapshotter whose disks are files: `copy` or `reflink`.
pub struct FileSnapshotter {
    method: Method,
    dir: PathBuf,
    ops: Arc<dyn HostOps>,
}

impl FileSnapshotter {
    /// The `copy` snapshotter: sparse copies, works on any filesystem.
    pub fn copy(paths: &StorePaths, ops: Arc<dyn HostOps>) -> Self {
        FileSnapshotter { method: Method::Copy, dir: paths.snapshots_dir("copy"), ops }
    }

    /// The `reflink` snapshotter: FICLONE clones; creation fails clearly where the store's
    /// filesystem cannot clone (see [`super::reflink_supported`]).
    pub fn reflink(paths: &StorePaths, ops: Arc<dyn HostOps>) -> Self {
        FileSnapshotter { method: Method::Reflink, dir: paths.snapshots_dir("reflink"), ops }
    }

    /// Where the disk of `vm_id` lives once complete.
    pub fn disk_path(&self, vm_id: &str) -> PathBuf {
        self.dir.join(format!("{vm_id}.ext4"))
    }

    fn tmp_path(&self, vm_id: &str) -> PathBuf {
        self.dir.join(format!(".{vm_id}.ext4.tmp"))
    }

    fn disk(&self, vm_id: &str) -> Disk {
        Disk { path: self.disk_path(vm_id), vm_id: vm_id.into(), snapshotter: self.name().into() }
    }

    /// Copies `src` to `dst` the way this snapshotter copies bases.
    fn duplicate(&self, vm_id: &str, src: &Path, dst: &Path) -> Result<(), SnapshotError> {
        match self.method {
            Method::Copy => sparse_copy(src, dst).map_err(io_err(vm_id, "sparse-copy into", dst)),
            Method::Reflink => reflink_file(vm_id, src, dst),
        }
    }

    /// [`Self::duplicate`] for VM snapshots' disks, which may live on another filesystem than the
    /// store (no clone across filesystems): a sparse copy where a clone is refused.
    fn duplicate_or_copy(&self, vm_id: &str, src: &Path, dst: &Path) -> Result<(), SnapshotError> {
        match self.duplicate(vm_id, src, dst) {
            Err(SnapshotError::ReflinkUnsupported { detail, .. }) => {
                tracing::debug!(vm = vm_id, %detail, "no clone possible; copying");
                sparse_copy(src, dst).map_err(io_err(vm_id, "sparse-copy into", dst))
            }
            other => other,
        }
    }

    /// Every step after the temp file exists; the caller deletes the temp file if this fails.
    fn fill(&self, vm_id: &str, base: &Path, tmp: &Path, size: u64) -> Result<(), SnapshotError> {
        self.duplicate(vm_id, base, tmp)?;
        let file = OpenOptions::new().write(true).open(tmp).map_err(io_err(vm_id, "open", tmp))?;
        // Extending with set_len keeps the new tail as a hole: the disk stays sparse until written.
        file.set_len(size).map_err(io_err(vm_id, "extend", tmp))?;
        grow_ext4(self.ops.as_ref(), tmp).map_err(host_err(vm_id, "growing ext4", tmp.display()))?;
        // The disk must be durable before its final name appears, or a power cut could leave a
        // complete-looking but empty disk.
        file.sync_all().map_err(io_err(vm_id, "sync", tmp))?;
        Ok(())
    }
}

/// Removes a file, treating "already gone" as success (this is what makes removal idempotent).
fn remove_if_exists(vm_id: &str, path: &Path) -> Result<bool, SnapshotError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(vm_id, "remove", path)(e)),
    }
}

impl Snapshotter for FileSnapshotter {
    fn name(&self) -> &'static str {
        match self.method {
            Method::Copy => "copy",
            Method::Reflink => "reflink",
        }
    }

    fn create(&self, vm_id: &str, base: &Path, size_bytes: u64) -> Result<Disk, SnapshotError> {
        validate_vm_id(vm_id)?;
        let span = tracing::info_span!("snapshot_create", snapshotter = self.name(), vm = vm_id);
        let _enter = span.enter();
        check_size(vm_id, base, size_bytes)?;
        fs::create_dir_all(&self.dir).map_err(io_err(vm_id, "create state dir", &self.dir))?;
        let (disk, tmp) = (self.disk_path(vm_id), self.tmp_path(vm_id));
        if disk.exists() {
            return Err(SnapshotError::AlreadyExists { vm_id: vm_id.into(), path: disk });
        }
        // create_new: a temp file that already exists belongs to a concurrent creation or to a crash
        // that `recover` has not cleaned yet; neither may be overwritten.
        OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                SnapshotError::AlreadyExists { vm_id: vm_id.into(), path: tmp.clone() }
            }
            _ => io_err(vm_id, "create", &tmp)(e),
        })?;
        let result = self.fill(vm_id, base, &tmp, size_bytes).and_then(|()| {
            fs::hard_link(&tmp, &disk).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    SnapshotError::AlreadyExists { vm_id: vm_id.into(), path: disk.clone() }
                }
                _ => io_err(vm_id, "publish", &disk)(e),
            })
        });
        // Whether or not it worked, the temp name must go; on failure this is the whole rollback.
        let cleanup = remove_if_exists(vm_id, &tmp);
        result?;
        cleanup?;
        tracing::info!(disk = %disk.display(), size_bytes, "disk created");
        Ok(self.disk(vm_id))
    }

    fn remove(&self, vm_id: &str) -> Result<(), SnapshotError> {
        validate_vm_id(vm_id)?;
        let removed = remove_if_exists(vm_id, &self.disk_path(vm_id))?;
        remove_if_exists(vm_id, &self.tmp_path(vm_id))?;
        if removed {
            tracing::info!(snapshotter = self.name(), vm = vm_id, "disk removed");
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<Disk>, SnapshotError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("*", "list", &self.dir)(e)),
        };
        let mut disks = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("*", "list", &self.dir))?;
            let name = entry.file_name();
            let Some(vm_id) = name.to_str().and_then(|n| n.strip_suffix(".ext4")) else { continue };
            if validate_vm_id(vm_id).is_ok() {
                disks.push(self.disk(vm_id));
            }
        }
        disks.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        Ok(disks)
    }

    /// A reflink clone where the method is `reflink` and both files share a filesystem (no data
    /// copied: blocks are shared until written), else a sparse copy.
    fn save_disk(&self, vm_id: &str, dst: &Path) -> Result<(), SnapshotError> {
        let disk = self.disk_of(vm_id)?;
        self.duplicate_or_copy(vm_id, &disk.path, dst)?;
        sync_file(vm_id, dst)
    }

    /// Duplicates `src` into the temp name and renames it over the disk: a crash leaves either the
    /// old disk or the restored one, never a mix.
    fn restore_disk(&self, vm_id: &str, src: &Path) -> Result<(), SnapshotError> {
        let disk = self.disk_of(vm_id)?;
        let tmp = self.tmp_path(vm_id);
        remove_if_exists(vm_id, &tmp)?;
        let result = self
            .duplicate_or_copy(vm_id, src, &tmp)
            .and_then(|()| sync_file(vm_id, &tmp))
            .and_then(|()| fs::rename(&tmp, &disk.path).map_err(io_err(vm_id, "replace the disk with", &tmp)));
        if result.is_err() {
            remove_if_exists(vm_id, &tmp)?;
        }
        result
    }

    /// Removes temp files of creations interrupted by a crash and adopts every complete disk: a
    /// disk only gets its final name once fully written and synced, so whatever has one is usable.
    fn recover(&self) -> Result<RecoveryReport, SnapshotError> {
        let mut report = RecoveryReport::default();
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(vm_id) = name.to_str().and_then(|n| n.strip_prefix('.')?.strip_suffix(".ext4.tmp")) else {
                    continue;
                };
                remove_if_exists(vm_id, &entry.path())?;
                tracing::info!(snapshotter = self.name(), vm = vm_id, "removed half-made disk left by a crash");
                report.removed.push(vm_id.to_string());
            }
        }
        report.adopted = self.list()?;
        Ok(report)
    }
}
