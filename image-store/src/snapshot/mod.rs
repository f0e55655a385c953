//! Snapshotters: per-VM writable root disks made from a shared, read-only base ext4.
//!
//! Three implementations sit behind [`Snapshotter`]:
//! - [`DmSnapshotter`] (`devicemapper`): a device-mapper thin pool (the `devicemapper` crate): one
//!   thin volume per base image, one thin snapshot per VM; needs device-mapper.
//! - [`FileSnapshotter::reflink`] (`reflink`): a FICLONE clone of the base (xfs, btrfs).
//! - [`FileSnapshotter::copy`] (`copy`): a sparse copy of the base, works everywhere.
//!
//! Every one grows the disk's ext4 to the requested size with `resize2fs`, keeps its state under
//! [`crate::StorePaths::snapshots_dir`], and shares these guarantees:
//! - **Atomic creation**: a disk appears under its final name only once complete (temp name + rename,
//!   or for devicemapper a volume record marked complete last). A failure part-way removes
//!   everything that step made before returning the error.
//! - **Idempotent removal**: [`Snapshotter::remove`] discovers what exists (files, records, dm devices)
//!   rather than trusting memory, so it can be repeated, and is safe after a crash or a half-failed
//!   earlier removal.
//! - **Crash recovery**: [`Snapshotter::recover`], called at start-up, re-adopts complete disks and
//!   removes half-made ones; see each implementation for details.
//!
//! All privileged operations go through [`HostOps`] (real: [`LinuxHostOps`]; fake:
//! `RecordingHostOps` with the `test-utils` feature).

mod choose;
mod copy;
mod devicemapper;
#[cfg(any(test, feature = "test-utils"))]
mod fake;
mod file;
mod hostops;
mod reflink;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use choose::{choose, choose_with, SNAPSHOTTER_NAMES};
pub use copy::sparse_copy;
pub use devicemapper::{
    CrashPoint, DmPoolConfig, DmSnapshotter, PoolUsage, DEFAULT_DATA_FILE_BYTES, DEFAULT_METADATA_FILE_BYTES,
};
#[cfg(any(test, feature = "test-utils"))]
pub use fake::{HostCall, HostOp, RecordingHostOps};
pub use file::FileSnapshotter;
pub use hostops::{grow_ext4, HostOps, HostOpsError, LinuxHostOps, LoopDevice};
pub use reflink::{reflink_file, reflink_supported};

/// A VM's writable root disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The file or block device the VMM opens read-write.
    pub path: PathBuf,
    /// The VM it belongs to.
    pub vm_id: String,
    /// The name of the snapshotter that made it (`copy`, `reflink`, `devicemapper`).
    pub snapshotter: String,
}

/// What [`Snapshotter::recover`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Complete disks that are kept (and listed).
    pub adopted: Vec<Disk>,
    /// VM ids whose half-made leftovers (temp files, loop or dm devices) were removed.
    pub removed: Vec<String>,
}

/// Makes and removes per-VM writable disks.
pub trait Snapshotter: Send + Sync {
    /// The snapshotter's name (`copy`, `reflink` or `devicemapper`).
    fn name(&self) -> &'static str;

    /// Makes a writable disk of `size_bytes` for `vm_id` from the ext4 image `base`.
    ///
    /// Fails if `size_bytes` is smaller than the base, or if the VM already has a disk. On failure
    /// nothing made by this call is left behind.
    fn create(&self, vm_id: &str, base: &Path, size_bytes: u64) -> Result<Disk, SnapshotError>;

    /// Frees every file, loop device and dm device made for `vm_id`. Idempotent: removing a VM that has
    /// nothing is a success.
    fn remove(&self, vm_id: &str) -> Result<(), SnapshotError>;

    /// The complete disks this snapshotter holds.
    fn list(&self) -> Result<Vec<Disk>, SnapshotError>;

    /// Called at start-up: re-adopts complete disks left by a previous run and removes half-made ones.
    fn recover(&self) -> Result<RecoveryReport, SnapshotError>;

    /// Copies `vm_id`'s disk as it is now to the new file `dst` (a VM snapshot's disk), synced
    /// before returning. The caller keeps the disk still meanwhile (the VM paused or stopped).
    ///
    /// By default a sparse copy of the disk's file or device.
    fn save_disk(&self, vm_id: &str, dst: &Path) -> Result<(), SnapshotError> {
        let disk = self.disk_of(vm_id)?;
        sparse_copy(&disk.path, dst).map_err(io_err(vm_id, "copy the disk to", dst))?;
        sync_file(vm_id, dst)
    }

    /// Puts the contents of `src` (made by [`Snapshotter::save_disk`]) back as `vm_id`'s disk. The
    /// VM must not be running.
    ///
    /// By default every byte is written over the disk in place (a device keeps its identity, and
    /// zeros must overwrite what the guest wrote since); file snapshotters replace the file
    /// atomically instead, so a crash leaves either the old or the restored disk.
    fn restore_disk(&self, vm_id: &str, src: &Path) -> Result<(), SnapshotError> {
        let disk = self.disk_of(vm_id)?;
        let mut input = std::fs::File::open(src).map_err(io_err(vm_id, "open the saved disk", src))?;
        let mut output = std::fs::OpenOptions::new().write(true).open(&disk.path).map_err(io_err(
            vm_id,
            "open the disk",
            &disk.path,
        ))?;
        std::io::copy(&mut input, &mut output).map_err(io_err(vm_id, "write the saved disk to", &disk.path))?;
        output.sync_all().map_err(io_err(vm_id, "sync", &disk.path))
    }

    /// `vm_id`'s complete disk, or [`SnapshotError::NoDisk`].
    fn disk_of(&self, vm_id: &str) -> Result<Disk, SnapshotError> {
        validate_vm_id(vm_id)?;
        self.list()?
            .into_iter()
            .find(|d| d.vm_id == vm_id)
            .ok_or_else(|| SnapshotError::NoDisk { vm_id: vm_id.into(), snapshotter: self.name() })
    }
}

/// Syncs the file at `path` (a copy that must be durable before it is published).
pub(crate) fn sync_file(vm_id: &str, path: &Path) -> Result<(), SnapshotError> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(io_err(vm_id, "sync", path))
}

/// Errors from the snapshotters.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM id cannot be used in file and device names.
    #[error("invalid vm id {vm_id:?}: {reason}")]
    InvalidVmId {
        /// The offending id.
        vm_id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The requested disk is smaller than the base image.
    #[error("vm {vm_id}: requested disk size {requested} bytes is smaller than base {} ({base_size} bytes)", base.display())]
    SizeTooSmall {
        /// The VM.
        vm_id: String,
        /// Requested size in bytes.
        requested: u64,
        /// The base image.
        base: PathBuf,
        /// The base image's size in bytes.
        base_size: u64,
    },
    /// The VM already has a disk from this snapshotter.
    #[error("vm {vm_id}: a disk already exists at {}", path.display())]
    AlreadyExists {
        /// The VM.
        vm_id: String,
        /// The existing disk.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("vm {vm_id}: could not {action} {}", path.display())]
    Io {
        /// The VM (`*` for store-wide operations such as listing).
        vm_id: String,
        /// What was being done (`read base`, `create cow file`...).
        action: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A privileged host operation (loop, dm, resize2fs, e2fsck) failed.
    #[error("vm {vm_id}: {action} on {device} failed")]
    Host {
        /// The VM (`*` for store-wide operations).
        vm_id: String,
        /// What was being done.
        action: &'static str,
        /// The device, dm name or file operated on.
        device: String,
        /// The command's error, with its stderr (boxed: it is large, and errors are the cold path).
        #[source]
        source: Box<HostOpsError>,
    },
    /// The store's filesystem cannot clone files (FICLONE).
    #[error(
        "vm {vm_id}: cannot reflink {} to {}: the filesystem does not support FICLONE (use xfs with reflink=1 or btrfs, or the copy snapshotter): {detail}",
        base.display(), path.display()
    )]
    ReflinkUnsupported {
        /// The VM.
        vm_id: String,
        /// The base image.
        base: PathBuf,
        /// The clone that could not be made.
        path: PathBuf,
        /// What `cp --reflink=always` reported.
        detail: String,
    },
    /// A state record is unreadable.
    #[error("vm {vm_id}: corrupt snapshot record {}", path.display())]
    Record {
        /// The VM.
        vm_id: String,
        /// The record file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The VM has no disk in this snapshotter.
    #[error("vm {vm_id} has no disk in the {snapshotter} snapshotter")]
    NoDisk {
        /// The VM.
        vm_id: String,
        /// The snapshotter asked.
        snapshotter: &'static str,
    },
    /// Device-mapper was requested explicitly but is not available.
    #[error("snapshotter devicemapper needs device-mapper, but /dev/mapper/control cannot be opened on this host")]
    DmUnavailable,
    /// A device-mapper operation failed.
    #[error("vm {vm_id}: could not {action} {device}")]
    Dm {
        /// The VM (`*` for the pool).
        vm_id: String,
        /// What was being done.
        action: &'static str,
        /// The dm device or pool.
        device: String,
        /// The kernel's or the crate's error (boxed: errors are the cold path).
        #[source]
        source: Box<::devicemapper::DmError>,
    },
    /// The thin pool was created on other devices than it is now configured with.
    #[error("the thin pool recorded in {} was made on {was}, but this daemon is configured with {now}: start it with the same --dm-pool-data/--dm-pool-metadata, or remove the store's devicemapper state", record.display())]
    PoolMismatch {
        /// `pool.json`.
        record: PathBuf,
        /// What the record says.
        was: String,
        /// What the configuration says.
        now: String,
    },
    /// The thin pool is not working (read-only, out of metadata space, failed).
    #[error("thin pool {pool} is not usable: {status}")]
    PoolUnhealthy {
        /// The pool's dm name.
        pool: String,
        /// Its status.
        status: String,
    },
    /// The thin pool has too little free space for another disk.
    #[error("vm {vm_id}: thin pool {pool} is full: {free_bytes} of {total_bytes} bytes free, {needed_bytes} needed (a tenth of the pool is kept for the running guests' writes); remove VMs or grow the pool")]
    PoolFull {
        /// The VM whose disk was refused.
        vm_id: String,
        /// The pool's dm name.
        pool: String,
        /// Free data bytes.
        free_bytes: u64,
        /// All data bytes.
        total_bytes: u64,
        /// What the disk and the low-water mark need.
        needed_bytes: u64,
    },
    /// An override named no known snapshotter.
    #[error("unknown snapshotter {name:?}; valid snapshotters: {}", SNAPSHOTTER_NAMES.join(", "))]
    UnknownSnapshotter {
        /// The name given.
        name: String,
    },
}

/// Checks that a VM id is usable in file names and dm names (`ignite-<vm>`): 1-64 characters from
/// `[A-Za-z0-9_.-]`, not starting with `.` or `-`. `+` is deliberately excluded because the
/// devicemapper snapshotter uses it to name helper devices, so those can never collide with a VM's.
pub fn validate_vm_id(vm_id: &str) -> Result<(), SnapshotError> {
    let bad = |reason| Err(SnapshotError::InvalidVmId { vm_id: vm_id.into(), reason });
    if vm_id.is_empty() || vm_id.len() > 64 {
        return bad("must be 1 to 64 characters");
    }
    if vm_id.starts_with(['.', '-']) {
        return bad("must not start with '.' or '-'");
    }
    if !vm_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return bad("only letters, digits, '_', '.' and '-' are allowed");
    }
    Ok(())
}

/// Size of the base image, and the size check every snapshotter applies.
pub(crate) fn check_size(vm_id: &str, base: &Path, requested: u64) -> Result<u64, SnapshotError> {
    let base_size = std::fs::metadata(base)
        .map_err(|source| SnapshotError::Io {
            vm_id: vm_id.into(),
            action: "read base image",
            path: base.into(),
            source,
        })?
        .len();
    if requested < base_size {
        return Err(SnapshotError::SizeTooSmall { vm_id: vm_id.into(), requested, base: base.into(), base_size });
    }
    Ok(base_size)
}

/// Shorthand for an [`SnapshotError::Io`] builder.
pub(crate) fn io_err(vm_id: &str, action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let (vm_id, path) = (vm_id.to_string(), path.to_path_buf());
    move |source| SnapshotError::Io { vm_id, action, path, source }
}

/// Shorthand for an [`SnapshotError::Host`] builder.
pub(crate) fn host_err(
    vm_id: &str,
    action: &'static str,
    device: impl std::fmt::Display,
) -> impl FnOnce(HostOpsError) -> SnapshotError {
    let (vm_id, device) = (vm_id.to_string(), device.to_string());
    move |source| SnapshotError::Host { vm_id, action, device, source: Box::new(source) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_are_checked() {
        for ok in ["web-1", "a", "vm_2.prod"] {
            validate_vm_id(ok).unwrap();
        }
        for bad in ["", "-x", ".x", "a/b", "a+origin", "a b", &"x".repeat(65)] {
            assert!(matches!(validate_vm_id(bad), Err(SnapshotError::InvalidVmId { .. })), "{bad}");
        }
    }

    #[test]
    fn size_error_names_both_sizes() {
        let dir = std::env::temp_dir().join(format!("ignite-size-{}", std::process::id()));
        std::fs::write(&dir, vec![0u8; 4096]).unwrap();
        let e = check_size("vm1", &dir, 1024).unwrap_err().to_string();
        std::fs::remove_file(&dir).unwrap();
        assert!(e.contains("1024") && e.contains("4096") && e.contains("vm1"), "{e}");
    }
}
