//! [`DmSnapshotter`]: the dm `snapshot` target over a read-only base and a sparse COW file.
//!
//! Per VM, under `snapshots/devicemapper/<vm>/`:
//! - `base.ext4`: a hard link to the base image (so every loop device of this VM is backed by a file
//!   under the VM's directory, which is how removal and recovery find them), loop-attached read-only;
//! - `cow`: a sparse file, loop-attached read-write, holding the VM's writes;
//! - `disk.json`: written (temp name + rename) only once everything below exists; it marks the disk
//!   complete.
//!
//! Devices: `ignite-<vm>+origin` (read-only: the base, then a `zero` target up to the requested size,
//! so the disk can be larger than the base) and `ignite-<vm>` (the `snapshot` target, persistent, 4 KiB
//! chunks), which the VMM opens as `/dev/mapper/ignite-<vm>`. VM ids cannot contain `+`, so helper
//! names never collide with a VM's.
//!
//! Guarantees:
//! - creation failing at any step tears down what that step and earlier ones made (dm devices, then
//!   loop devices, then files) before the error is returned;
//! - [`Snapshotter::remove`] finds devices by name and by backing file, not from memory: it is
//!   idempotent and works after a crash; if a device is busy it keeps the files, so a retry can finish;
//! - [`Snapshotter::recover`] only touches VMs that have a directory here or a loop device backed by a
//!   file in it (an `ignite-*` dm device of another store is never removed). Complete disks whose
//!   devices still exist are adopted; complete disks whose devices are gone (host reboot) are
//!   re-assembled from their files, keeping the VM's writes; anything without `disk.json` is removed.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    check_size, copy::sparse_copy, grow_ext4, host_err, io_err, validate_vm_id, Disk, HostOps, RecoveryReport,
    SnapshotError, Snapshotter,
};
use crate::StorePaths;

const SECTOR: u64 = 512;
/// Snapshot chunk size in sectors (4 KiB, the ext4 block size).
const CHUNK_SECTORS: u64 = 8;

/// The `disk.json` record of a complete disk.
#[derive(Serialize, Deserialize)]
struct Record {
    disk: Disk,
    base_bytes: u64,
    size_bytes: u64,
}

/// The device-mapper snapshotter.
pub struct DmSnapshotter {
    dir: PathBuf,
    ops: Arc<dyn HostOps>,
}

/// The dm name of a VM's disk.
pub(crate) fn disk_name(vm_id: &str) -> String {
    format!("ignite-{vm_id}")
}

fn origin_name(vm_id: &str) -> String {
    format!("ignite-{vm_id}+origin")
}

impl DmSnapshotter {
    /// The snapshotter with its state under `paths.snapshots_dir("devicemapper")`; every device
    /// operation goes through `ops`.
    pub fn new(paths: &StorePaths, ops: Arc<dyn HostOps>) -> Self {
        DmSnapshotter { dir: paths.snapshots_dir("devicemapper"), ops }
    }

    fn vm_dir(&self, vm_id: &str) -> PathBuf {
        self.dir.join(vm_id)
    }

    fn disk(vm_id: &str) -> Disk {
        Disk {
            path: Path::new("/dev/mapper").join(disk_name(vm_id)),
            vm_id: vm_id.into(),
            snapshotter: "devicemapper".into(),
        }
    }

    fn read_record(&self, vm_id: &str) -> Result<Option<Record>, SnapshotError> {
        let path = self.vm_dir(vm_id).join("disk.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|source| SnapshotError::Record {
                vm_id: vm_id.into(),
                path,
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(vm_id, "read", &path)(e)),
        }
    }

    /// Attaches the VM's files and creates its two dm devices; returns the disk device.
    fn assemble(&self, vm_id: &str, base_bytes: u64, size_bytes: u64) -> Result<PathBuf, SnapshotError> {
        let dir = self.vm_dir(vm_id);
        let (base, cow) = (dir.join("base.ext4"), dir.join("cow"));
        let ops = self.ops.as_ref();
        let base_loop = ops.loop_attach(&base, true).map_err(host_err(vm_id, "attaching base", base.display()))?;
        let cow_loop = ops.loop_attach(&cow, false).map_err(host_err(vm_id, "attaching cow", cow.display()))?;
        let base_sectors = base_bytes / SECTOR;
        let size_sectors = size_bytes.div_ceil(SECTOR);
        let mut origin_table = format!("0 {base_sectors} linear {} 0", base_loop.display());
        if size_sectors > base_sectors {
            // Reads past the base return zeros; the snapshot catches every write, so nothing is
            // ever written to the origin and it can stay read-only.
            origin_table.push_str(&format!("\n{base_sectors} {} zero", size_sectors - base_sectors));
        }
        let origin_name = origin_name(vm_id);
        let origin = ops.dm_create(&origin_name, &origin_table, true).map_err(host_err(
            vm_id,
            "creating dm device",
            &origin_name,
        ))?;
        let table = format!("0 {size_sectors} snapshot {} {} P {CHUNK_SECTORS}", origin.display(), cow_loop.display());
        let name = disk_name(vm_id);
        ops.dm_create(&name, &table, false).map_err(host_err(vm_id, "creating dm device", &name))
    }

    /// Every step of [`Snapshotter::create`] after the VM directory exists.
    fn build(&self, vm_id: &str, base: &Path, base_bytes: u64, size_bytes: u64) -> Result<Disk, SnapshotError> {
        let dir = self.vm_dir(vm_id);
        let link = dir.join("base.ext4");
        if let Err(e) = fs::hard_link(base, &link) {
            // A base on another filesystem cannot be linked; a sparse copy keeps the invariant that
            // every backing file lives in the VM's directory, at the cost of the base's size.
            tracing::warn!(vm = vm_id, error = %e, "cannot hard-link base; copying it");
            sparse_copy(base, &link).map_err(io_err(vm_id, "copy base to", &link))?;
        }
        let cow = dir.join("cow");
        let file = File::create_new(&cow).map_err(io_err(vm_id, "create cow file", &cow))?;
        // Room for every chunk plus the exception table (16 bytes per 4 KiB chunk) and the header;
        // sparse, so only what the VM writes is allocated.
        file.set_len(size_bytes + size_bytes / 64 + (4 << 20)).map_err(io_err(vm_id, "size cow file", &cow))?;
        drop(file);
        let device = self.assemble(vm_id, base_bytes, size_bytes)?;
        grow_ext4(self.ops.as_ref(), &device).map_err(host_err(vm_id, "growing ext4", device.display()))?;
        let record = Record { disk: Self::disk(vm_id), base_bytes, size_bytes };
        let (tmp, path) = (dir.join(".disk.json.tmp"), dir.join("disk.json"));
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(&record).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().map_err(io_err(vm_id, "write record", &path))?;
        Ok(record.disk)
    }

    /// Removes the VM's dm devices (disk first: it holds the origin) and detaches every loop device
    /// backed by a file in its directory. Idempotent: absent devices are skipped.
    ///
    /// Every step is attempted even when an earlier one failed (a failed dm listing must not leak the
    /// loop devices); the first error is returned.
    fn teardown_devices(&self, vm_id: &str) -> Result<(), SnapshotError> {
        let ops = self.ops.as_ref();
        let mut first_error = None;
        let mut note = |r: Result<(), SnapshotError>| {
            if let Err(e) = r {
                tracing::warn!(vm = vm_id, error = %e, "teardown step failed");
                first_error.get_or_insert(e);
            }
        };
        // Without device-mapper there can be no dm device, and `dmsetup ls` would only fail.
        if ops.dm_available() {
            match ops.dm_list() {
                Ok(list) => {
                    let present: Vec<String> = list.into_iter().map(|d| d.name).collect();
                    for name in [disk_name(vm_id), origin_name(vm_id)] {
                        if present.contains(&name) {
                            note(ops.dm_remove(&name).map_err(host_err(vm_id, "removing dm device", &name)));
                        }
                    }
                }
                Err(e) => note(Err(host_err(vm_id, "listing dm devices", "dmsetup")(e))),
            }
        }
        match self.loops_of(vm_id) {
            Ok(loops) => {
                for dev in loops {
                    note(ops.loop_detach(&dev).map_err(host_err(vm_id, "detaching", dev.display())));
                }
            }
            Err(e) => note(Err(e)),
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Loop devices backed by files in the VM's directory (compared both as given and canonical,
    /// since the kernel reports the resolved path).
    fn loops_of(&self, vm_id: &str) -> Result<Vec<PathBuf>, SnapshotError> {
        let roots = self.roots();
        let loops = self.ops.loop_list().map_err(host_err(vm_id, "listing loop devices", "losetup"))?;
        Ok(loops
            .into_iter()
            .filter(|l| roots.iter().any(|r| l.backing_file.starts_with(r.join(vm_id))))
            .map(|l| l.device)
            .collect())
    }

    fn roots(&self) -> Vec<PathBuf> {
        let mut roots = vec![self.dir.clone()];
        if let Ok(c) = fs::canonicalize(&self.dir) {
            if c != self.dir {
                roots.push(c);
            }
        }
        roots
    }

    /// Full removal: devices, then files. Files are kept if a device could not be removed, so that a
    /// later retry still finds the loop devices by their backing files.
    fn teardown(&self, vm_id: &str) -> Result<(), SnapshotError> {
        self.teardown_devices(vm_id)?;
        let dir = self.vm_dir(vm_id);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(vm_id, "remove", &dir)(e)),
            _ => Ok(()),
        }
    }

    /// VM ids that have a directory here or a loop device backed by a file in one.
    fn known_vms(&self) -> Result<Vec<String>, SnapshotError> {
        let mut vms = Vec::new();
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                if let Some(name) = entry.file_name().to_str() {
                    vms.push(name.to_string());
                }
            }
        }
        let roots = self.roots();
        for l in self.ops.loop_list().map_err(host_err("*", "listing loop devices", "losetup"))? {
            for root in &roots {
                if let Ok(rest) = l.backing_file.strip_prefix(root) {
                    if let Some(first) = rest.components().next().and_then(|c| c.as_os_str().to_str()) {
                        vms.push(first.to_string());
                    }
                }
            }
        }
        vms.retain(|v| validate_vm_id(v).is_ok());
        vms.sort();
        vms.dedup();
        Ok(vms)
    }
}

impl Snapshotter for DmSnapshotter {
    fn name(&self) -> &'static str {
        "devicemapper"
    }

    fn create(&self, vm_id: &str, base: &Path, size_bytes: u64) -> Result<Disk, SnapshotError> {
        validate_vm_id(vm_id)?;
        let span = tracing::info_span!("snapshot_create", snapshotter = "devicemapper", vm = vm_id);
        let _enter = span.enter();
        let base_bytes = check_size(vm_id, base, size_bytes)?;
        fs::create_dir_all(&self.dir).map_err(io_err(vm_id, "create state dir", &self.dir))?;
        let dir = self.vm_dir(vm_id);
        // create_dir (not _all) is the creation lock: an existing directory is a disk, a creation in
        // progress, or crash leftovers for `recover`; none may be reused.
        fs::create_dir(&dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                SnapshotError::AlreadyExists { vm_id: vm_id.into(), path: dir.clone() }
            }
            _ => io_err(vm_id, "create", &dir)(e),
        })?;
        match self.build(vm_id, base, base_bytes, size_bytes) {
            Ok(disk) => {
                tracing::info!(disk = %disk.path.display(), size_bytes, "disk created");
                Ok(disk)
            }
            Err(e) => {
                tracing::error!(error = %e, "disk creation failed; rolling back");
                if let Err(rollback) = self.teardown(vm_id) {
                    // The original error matters more; what is left is found again by
                    // `remove` or `recover`, which rediscover devices by name and backing file.
                    tracing::error!(error = %rollback, "rollback incomplete; recover or remove will finish it");
                }
                Err(e)
            }
        }
    }

    fn remove(&self, vm_id: &str) -> Result<(), SnapshotError> {
        validate_vm_id(vm_id)?;
        self.teardown(vm_id)?;
        tracing::info!(snapshotter = "devicemapper", vm = vm_id, "disk removed");
        Ok(())
    }

    fn list(&self) -> Result<Vec<Disk>, SnapshotError> {
        let Ok(entries) = fs::read_dir(&self.dir) else { return Ok(Vec::new()) };
        let mut disks = Vec::new();
        for entry in entries.flatten() {
            let Some(vm_id) = entry.file_name().to_str().map(str::to_string) else { continue };
            if validate_vm_id(&vm_id).is_err() {
                continue;
            }
            if let Some(record) = self.read_record(&vm_id)? {
                disks.push(record.disk);
            }
        }
        disks.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        Ok(disks)
    }

    fn recover(&self) -> Result<RecoveryReport, SnapshotError> {
        let mut report = RecoveryReport::default();
        let live: Vec<String> = if self.ops.dm_available() {
            self.ops
                .dm_list()
                .map_err(host_err("*", "listing dm devices", "dmsetup"))?
                .into_iter()
                .map(|d| d.name)
                .collect()
        } else {
            Vec::new()
        };
        for vm_id in self.known_vms()? {
            match self.read_record(&vm_id) {
                Ok(Some(record)) if live.contains(&disk_name(&vm_id)) => report.adopted.push(record.disk),
                Ok(Some(record)) => {
                    // Complete on disk but its devices are gone (reboot) or partial: rebuild them from
                    // the files; the COW keeps the VM's writes (persistent snapshot).
                    self.teardown_devices(&vm_id)?;
                    if let Err(e) = self.assemble(&vm_id, record.base_bytes, record.size_bytes) {
                        self.teardown_devices(&vm_id)?;
                        return Err(e);
                    }
                    tracing::info!(vm = %vm_id, "re-assembled disk after restart");
                    report.adopted.push(record.disk);
                }
                Ok(None) => {
                    tracing::info!(vm = %vm_id, "removing half-made disk left by a crash");
                    self.teardown(&vm_id)?;
                    report.removed.push(vm_id);
                }
                Err(e) => {
                    // Records are renamed into place whole, so an unreadable one was damaged from
                    // outside: keep the VM's data and let the other VMs start.
                    tracing::error!(vm = %vm_id, error = %e, "skipping disk with unreadable record");
                }
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
#[path = "devicemapper_tests.rs"]
mod tests;
