//! [`DmSnapshotter`]: device-mapper thin provisioning through the `devicemapper` crate, which talks
//! to `/dev/mapper/control` directly (no `dmsetup`), as containerd's devmapper snapshotter and
//! Flintlock lay it out:
//!
//! - **one thin pool per store**: its data and metadata on sparse files under the state directory,
//!   attached as loop devices, or on block devices the operator names ([`DmPoolConfig`]); 64 KiB
//!   data blocks, a low-water mark at a tenth of the data, `error_if_no_space` so a full pool fails
//!   writes at once instead of hanging guests;
//! - **one thin volume per base image**, holding its ext4, written once and shared;
//! - **one thin snapshot per VM** (`create_snap` of the image's volume), grown to the VM's size with
//!   `resize2fs`: no data is copied.
//!
//! State under `snapshots/devicemapper/`:
//! - `pool.json`: where the pool lives; written once the pool exists. While it exists the pool's
//!   metadata is reused on every start (after a daemon or host restart), never formatted again;
//! - `pool/data`, `pool/metadata`: the sparse backing files (file-backed pools only);
//! - `volumes/img-<key>.json`, `volumes/vm-<vm>.json`: one record per thin volume, written with
//!   `complete: false` *before* the pool is asked for the thin id (an intent), and rewritten with
//!   `complete: true` once the volume is whole. A thin id is never handed out twice, and a crash at
//!   any step leaves a record that [`Snapshotter::recover`] finishes or undoes.
//!
//! dm names carry a hash of the state directory (`ignite-<store>-pool`, `ignite-<store>-vm-<vm>`),
//! so two stores on one host never touch each other's devices. A VM's disk is its thin device's node
//! `/dev/dm-<minor>`, which exists with or without udev.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use devicemapper::{
    DataBlocks, DevId, Device, DmDevice, DmError, DmFlags, DmName, DmNameBuf, DmOptions, LinearDev,
    LinearDevTargetParams, LinearTargetParams, Sectors, TargetLine, ThinDev, ThinDevId, ThinPoolDev, ThinPoolStatus,
    ThinTargetParams, DM,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    check_size, copy::write_nonzero, grow_ext4, host_err, io_err, validate_vm_id, Disk, HostOps, RecoveryReport,
    SnapshotError, Snapshotter,
};
use crate::StorePaths;

const SECTOR: u64 = 512;
/// The pool's data block: 64 KiB (128 sectors), containerd's and Flintlock's choice.
const DATA_BLOCK_SECTORS: u64 = 128;
/// Default size of the sparse data file of a file-backed pool.
pub const DEFAULT_DATA_FILE_BYTES: u64 = 100 << 30;
/// Default size of the sparse metadata file of a file-backed pool.
pub const DEFAULT_METADATA_FILE_BYTES: u64 = 1 << 30;

/// Where the thin pool keeps its data and metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmPoolConfig {
    /// A block device for the pool's data (`--dm-pool-data`); `None`: a sparse file in the store.
    pub data_device: Option<PathBuf>,
    /// A block device for the pool's metadata (`--dm-pool-metadata`); `None`: a sparse file.
    pub metadata_device: Option<PathBuf>,
    /// Size of the sparse data file when no device is given.
    pub data_file_bytes: u64,
    /// Size of the sparse metadata file when no device is given.
    pub metadata_file_bytes: u64,
}

impl Default for DmPoolConfig {
    fn default() -> Self {
        DmPoolConfig {
            data_device: None,
            metadata_device: None,
            data_file_bytes: DEFAULT_DATA_FILE_BYTES,
            metadata_file_bytes: DEFAULT_METADATA_FILE_BYTES,
        }
    }
}

/// How full the pool is (from the kernel's thin-pool status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    /// Data bytes in use.
    pub used_bytes: u64,
    /// Data bytes in all.
    pub total_bytes: u64,
    /// Below this many free bytes the pool counts as full: no new disk is made.
    pub low_water_bytes: u64,
    /// Metadata blocks in use and in all.
    pub metadata_used: u64,
    /// Metadata blocks in all.
    pub metadata_total: u64,
}

/// `pool.json`: the pool's backing, fixed when it was created.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PoolRecord {
    /// The data block device, or `None` for `pool/data`.
    data_device: Option<PathBuf>,
    /// The metadata block device, or `None` for `pool/metadata`.
    metadata_device: Option<PathBuf>,
}

/// One thin volume's record.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Volume {
    thin_id: u32,
    /// Virtual size.
    size_bytes: u64,
    /// False from the intent until the volume is whole.
    complete: bool,
    /// An image volume: the base file it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base: Option<PathBuf>,
    /// A VM volume: the image volume it is a snapshot of (its record name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<String>,
}

impl Volume {
    /// The volume's thin id as the pool takes it.
    fn id(&self, vm_id: &str) -> Result<ThinDevId, SnapshotError> {
        ThinDevId::new_u64(u64::from(self.thin_id)).map_err(dm_err(vm_id, "use thin id", self.thin_id))
    }
}

/// Steps of a creation at which a test can make [`Snapshotter::create`] stop dead, as if the
/// process were killed there (no rollback), to prove that [`Snapshotter::recover`] cleans up.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// The intent record is written, the pool not yet asked.
    AfterIntent,
    /// The thin volume exists and is active.
    AfterThin,
    /// The VM's ext4 is grown; its record still says incomplete.
    AfterGrow,
}

/// The active pool and the dm handle.
struct Active {
    dm: DM,
    pool: ThinPoolDev,
}

/// The device-mapper thin-pool snapshotter.
pub struct DmSnapshotter {
    dir: PathBuf,
    /// `ignite-<hash of dir>`: the prefix of every dm name of this store.
    prefix: String,
    config: DmPoolConfig,
    ops: Arc<dyn HostOps>,
    /// The pool, set up on first use; the lock also serialises every creation and removal.
    active: Mutex<Option<Active>>,
    crash: Mutex<Option<CrashPoint>>,
}

/// A simulated crash ([`CrashPoint`]).
fn crashed(vm_id: &str) -> SnapshotError {
    SnapshotError::Io {
        vm_id: vm_id.into(),
        action: "simulate a crash at",
        path: "test crash point".into(),
        source: std::io::Error::other("simulated crash"),
    }
}

/// Builds a [`SnapshotError::Dm`].
fn dm_err(vm_id: &str, action: &'static str, device: impl std::fmt::Display) -> impl FnOnce(DmError) -> SnapshotError {
    let (vm_id, device) = (vm_id.to_string(), device.to_string());
    move |source| SnapshotError::Dm { vm_id, action, device, source: Box::new(source) }
}

fn dm_name(name: &str) -> Result<DmNameBuf, SnapshotError> {
    DmNameBuf::new(name.to_string()).map_err(dm_err("*", "name dm device", name))
}

/// The size of a file or block device (seeking to its end works for both).
fn size_of(vm_id: &str, path: &Path) -> Result<u64, SnapshotError> {
    File::open(path).and_then(|mut f| f.seek(SeekFrom::End(0))).map_err(io_err(vm_id, "size", path))
}

/// The device number of a block device.
fn device_of(vm_id: &str, path: &Path) -> Result<Device, SnapshotError> {
    let meta = fs::metadata(path).map_err(io_err(vm_id, "stat", path))?;
    if !std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
        return Err(io_err(vm_id, "use as a block device", path)(std::io::Error::other("not a block device")));
    }
    Ok(Device::from(meta.rdev()))
}

/// Writes `value` to `path` whole: temp file, fsync, rename.
fn write_json(vm_id: &str, path: &Path, value: &impl Serialize) -> Result<(), SnapshotError> {
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(path.parent().unwrap_or(Path::new("/")))?.sync_all()
    };
    write().map_err(io_err(vm_id, "write record", path))
}

fn read_json<T: serde::de::DeserializeOwned>(vm_id: &str, path: &Path) -> Result<Option<T>, SnapshotError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|source| SnapshotError::Record {
            vm_id: vm_id.into(),
            path: path.into(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(vm_id, "read", path)(e)),
    }
}

/// A VM volume's record name.
fn vm_volume(vm_id: &str) -> String {
    format!("vm-{vm_id}")
}

/// An image volume's record name: a hash of the base file's path, size and modification time (a
/// base rebuilt in place is another image).
fn image_volume(vm_id: &str, base: &Path) -> Result<String, SnapshotError> {
    let meta = fs::metadata(base).map_err(io_err(vm_id, "read base image", base))?;
    let canonical = fs::canonicalize(base).map_err(io_err(vm_id, "resolve base image", base))?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default();
    let mut hash = Sha256::new();
    hash.update(canonical.as_os_str().as_encoded_bytes());
    hash.update(meta.len().to_le_bytes());
    hash.update(mtime.as_nanos().to_le_bytes());
    Ok(format!("img-{}", &hex::encode(hash.finalize())[..16]))
}

impl DmSnapshotter {
    /// The snapshotter with its state under `paths.snapshots_dir("devicemapper")` and its pool as
    /// `config` says. Nothing is touched until the first call that needs the pool.
    pub fn new(paths: &StorePaths, config: DmPoolConfig, ops: Arc<dyn HostOps>) -> Self {
        let dir = paths.snapshots_dir("devicemapper");
        let canonical = fs::canonicalize(paths.root()).unwrap_or_else(|_| paths.root().to_path_buf());
        let hash = hex::encode(Sha256::digest(canonical.as_os_str().as_encoded_bytes()));
        DmSnapshotter {
            dir,
            prefix: format!("ignite-{}", &hash[..8]),
            config,
            ops,
            active: Mutex::new(None),
            crash: Mutex::new(None),
        }
    }

    /// Makes the next creation stop dead at `point` (tests of crash recovery).
    #[doc(hidden)]
    pub fn crash_at(&self, point: Option<CrashPoint>) {
        *self.crash.lock().unwrap_or_else(|e| e.into_inner()) = point;
    }

    fn crash_point(&self, vm_id: &str, here: CrashPoint) -> Result<(), SnapshotError> {
        match *self.crash.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(point) if point == here => Err(crashed(vm_id)),
            _ => Ok(()),
        }
    }

    /// The dm name of a volume (`ignite-<store>-<record name>`) or of a pool part.
    fn name(&self, part: &str) -> String {
        format!("{}-{part}", self.prefix)
    }

    fn volumes_dir(&self) -> PathBuf {
        self.dir.join("volumes")
    }

    fn record_path(&self, volume: &str) -> PathBuf {
        self.volumes_dir().join(format!("{volume}.json"))
    }

    fn read_volume(&self, vm_id: &str, volume: &str) -> Result<Option<Volume>, SnapshotError> {
        read_json(vm_id, &self.record_path(volume))
    }

    /// Every volume record: (record name, record); unreadable ones are logged and skipped (they were
    /// damaged from outside: renames are atomic).
    fn volumes(&self) -> Result<Vec<(String, Volume)>, SnapshotError> {
        let dir = self.volumes_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("*", "list", &dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let file = entry.file_name();
            let Some(volume) = file.to_str().and_then(|f| f.strip_suffix(".json")) else { continue };
            match self.read_volume("*", volume) {
                Ok(Some(record)) => out.push((volume.to_string(), record)),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "skipping an unreadable volume record"),
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The pool, set up (or reattached) on first use.
    fn pool(&self) -> Result<MutexGuard<'_, Option<Active>>, SnapshotError> {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if active.is_none() {
            *active = Some(self.setup_pool()?);
        }
        Ok(active)
    }

    /// The pool's backing device: the configured block device, or the sparse file attached to a
    /// loop device (the one already attached, after a daemon restart).
    fn backing(&self, device: &Option<PathBuf>, file: &str, bytes: u64) -> Result<PathBuf, SnapshotError> {
        if let Some(device) = device {
            return Ok(device.clone());
        }
        let path = self.dir.join("pool").join(file);
        fs::create_dir_all(self.dir.join("pool")).map_err(io_err("*", "create", &self.dir.join("pool")))?;
        if !path.exists() {
            let f = File::create_new(&path).map_err(io_err("*", "create pool file", &path))?;
            f.set_len(bytes).map_err(io_err("*", "size pool file", &path))?;
        }
        if let Some(attached) = self.loops_of_pool_file(file)?.into_iter().next() {
            return Ok(attached);
        }
        self.ops.loop_attach(&path, false).map_err(host_err("*", "attaching pool file", path.display()))
    }

    /// The loop devices backed by the pool file `file` (the kernel reports the resolved path).
    fn loops_of_pool_file(&self, file: &str) -> Result<Vec<PathBuf>, SnapshotError> {
        let path = self.dir.join("pool").join(file);
        let canonical = fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        let loops = self.ops.loop_list().map_err(host_err("*", "listing loop devices", "losetup"))?;
        Ok(loops
            .into_iter()
            .filter(|l| l.backing_file == path || l.backing_file == canonical)
            .map(|l| l.device)
            .collect())
    }

    fn setup_pool(&self) -> Result<Active, SnapshotError> {
        let dm = DM::new().map_err(|_| SnapshotError::DmUnavailable)?;
        let record_path = self.dir.join("pool.json");
        let wanted = PoolRecord {
            data_device: self.config.data_device.clone(),
            metadata_device: self.config.metadata_device.clone(),
        };
        let existing: Option<PoolRecord> = read_json("*", &record_path)?;
        if let Some(existing) = &existing {
            if *existing != wanted {
                return Err(SnapshotError::PoolMismatch {
                    record: record_path,
                    was: format!("{existing:?}"),
                    now: format!("{wanted:?}"),
                });
            }
        }
        fs::create_dir_all(&self.dir).map_err(io_err("*", "create state dir", &self.dir))?;
        let meta_path = self.backing(&wanted.metadata_device, "metadata", self.config.metadata_file_bytes)?;
        let data_path = self.backing(&wanted.data_device, "data", self.config.data_file_bytes)?;
        let pool_name = dm_name(&self.name("pool"))?;
        if existing.is_none() {
            // A new pool: a crash before pool.json may have left a pool device; its metadata held
            // no volume yet (volumes are made only once pool.json exists), so start it afresh.
            self.remove_device(&dm, "*", &pool_name)?;
            // The kernel formats the metadata when its first block is zero.
            let zero = || -> std::io::Result<()> {
                let mut f = OpenOptions::new().write(true).open(&meta_path)?;
                f.write_all(&[0u8; 4096])?;
                f.sync_all()
            };
            zero().map_err(io_err("*", "clear the pool metadata on", &meta_path))?;
        }
        let linear = |part: &str, path: &Path| -> Result<LinearDev, SnapshotError> {
            let sectors = Sectors(size_of("*", path)? / SECTOR);
            let params = LinearTargetParams::new(device_of("*", path)?, Sectors(0));
            let line = TargetLine::new(Sectors(0), sectors, LinearDevTargetParams::Linear(params));
            let name = dm_name(&self.name(part))?;
            LinearDev::setup(&dm, &name, None, vec![line]).map_err(dm_err("*", "set up", &*name))
        };
        let meta = linear("pool-meta", &meta_path)?;
        let data = linear("pool-data", &data_path)?;
        let blocks = data.size().0 / DATA_BLOCK_SECTORS;
        let low_water = DataBlocks((blocks / 10).max(1));
        let features = vec!["error_if_no_space".to_string()];
        let pool = if existing.is_none() {
            ThinPoolDev::new(&dm, &pool_name, None, meta, data, Sectors(DATA_BLOCK_SECTORS), low_water, features)
        } else {
            ThinPoolDev::setup(&dm, &pool_name, None, meta, data, Sectors(DATA_BLOCK_SECTORS), low_water, features)
        }
        .map_err(dm_err("*", "set up thin pool", &*pool_name))?;
        if existing.is_none() {
            write_json("*", &record_path, &wanted)?;
            tracing::info!(pool = %&*pool_name, data = %data_path.display(), metadata = %meta_path.display(), "thin pool created");
        } else {
            tracing::info!(pool = %&*pool_name, "thin pool reattached");
        }
        Ok(Active { dm, pool })
    }

    /// The dm devices of this store that exist (its pool, the pool's parts, its volumes).
    pub fn devices(&self) -> Result<Vec<String>, SnapshotError> {
        let dm = DM::new().map_err(|_| SnapshotError::DmUnavailable)?;
        Ok(self.devices_of(&dm)?.iter().map(|name| name.to_string()).collect())
    }

    fn devices_of(&self, dm: &DM) -> Result<Vec<DmNameBuf>, SnapshotError> {
        let prefix = format!("{}-", self.prefix);
        let devices = dm.list_devices().map_err(dm_err("*", "list", "dm devices"))?;
        Ok(devices.into_iter().map(|(name, _, _)| name).filter(|name| name.to_string().starts_with(&prefix)).collect())
    }

    /// Takes this store's dm devices down (volumes, then the pool, then its linear parts) and
    /// detaches the pool files' loop devices, keeping every file, record and the pool's metadata:
    /// what a host shutdown does. The next call that needs the pool reattaches it and its volumes.
    pub fn deactivate(&self) -> Result<(), SnapshotError> {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        *active = None;
        let dm = DM::new().map_err(|_| SnapshotError::DmUnavailable)?;
        let mut names = self.devices_of(&dm)?;
        let rank = |name: &DmNameBuf| match name.to_string().strip_prefix(&self.prefix) {
            Some("-pool") => 1,
            Some("-pool-meta" | "-pool-data") => 2,
            _ => 0,
        };
        names.sort_by_key(rank);
        for name in &names {
            self.remove_device(&dm, "*", name)?;
        }
        for file in ["data", "metadata"] {
            for device in self.loops_of_pool_file(file)? {
                self.ops.loop_detach(&device).map_err(host_err("*", "detaching", device.display()))?;
            }
        }
        tracing::info!(devices = names.len(), "thin pool deactivated");
        Ok(())
    }

    /// How full the pool is.
    pub fn usage(&self) -> Result<PoolUsage, SnapshotError> {
        let guard = self.pool()?;
        let active = guard.as_ref().expect("pool set up");
        Self::usage_of(active)
    }

    fn usage_of(active: &Active) -> Result<PoolUsage, SnapshotError> {
        let name = active.pool.name().to_string();
        // NOFLUSH: reading the status must not commit the pool's metadata.
        let options = DmOptions::default().set_flags(DmFlags::DM_NOFLUSH);
        let status = active.pool.status(&active.dm, options).map_err(dm_err("*", "read status of", &*name))?;
        let ThinPoolStatus::Working(status) = status else {
            return Err(SnapshotError::PoolUnhealthy { pool: name, status: format!("{status:?}") });
        };
        let block = DATA_BLOCK_SECTORS * SECTOR;
        let total_blocks = status.usage.total_data.0;
        Ok(PoolUsage {
            used_bytes: status.usage.used_data.0 * block,
            total_bytes: total_blocks * block,
            low_water_bytes: (total_blocks / 10).max(1) * block,
            metadata_used: status.usage.used_meta.0,
            metadata_total: status.usage.total_meta.0,
        })
    }

    /// Refuses new work when the pool has less than `needed` bytes free above its low-water mark:
    /// the operator hears it from a failed creation, before any guest's write fails.
    fn check_space(active: &Active, vm_id: &str, needed: u64) -> Result<(), SnapshotError> {
        let usage = Self::usage_of(active)?;
        let free = usage.total_bytes.saturating_sub(usage.used_bytes);
        if free < usage.low_water_bytes + needed {
            return Err(SnapshotError::PoolFull {
                vm_id: vm_id.into(),
                pool: active.pool.name().to_string(),
                free_bytes: free,
                total_bytes: usage.total_bytes,
                needed_bytes: needed + usage.low_water_bytes,
            });
        }
        Ok(())
    }

    /// A thin id no record holds (records are written before the pool hears of an id).
    fn next_thin_id(&self) -> Result<u32, SnapshotError> {
        Ok(self.volumes()?.iter().map(|(_, v)| v.thin_id + 1).max().unwrap_or(1))
    }

    /// Activates a volume whose thin id the pool knows (idempotent).
    fn activate(&self, active: &Active, vm_id: &str, volume: &str, record: &Volume) -> Result<ThinDev, SnapshotError> {
        let name = dm_name(&self.name(volume))?;
        let id = record.id(vm_id)?;
        ThinDev::setup(&active.dm, &name, None, Sectors(record.size_bytes.div_ceil(SECTOR)), &active.pool, id)
            .map_err(dm_err(vm_id, "activate", &*name))
    }

    /// Removes a dm device if it exists, retrying while something (udev's probe) holds it briefly.
    fn remove_device(&self, dm: &DM, vm_id: &str, name: &DmName) -> Result<(), SnapshotError> {
        let mut attempt = 0;
        loop {
            if !devicemapper::device_exists(dm, name).map_err(dm_err(vm_id, "look up", name))? {
                return Ok(());
            }
            match dm.device_remove(&DevId::Name(name), DmOptions::default()) {
                Ok(_) => return Ok(()),
                Err(e) if attempt < 20 => {
                    tracing::debug!(device = %name, error = %e, "dm device busy; retrying");
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(dm_err(vm_id, "remove", name)(e)),
            }
        }
    }

    /// Removes a volume: its device, its thin id in the pool, its record. For an incomplete record the
    /// pool may never have heard of the id, so deleting it may fail; that is ignored.
    fn destroy(&self, active: &Active, vm_id: &str, volume: &str, record: &Volume) -> Result<(), SnapshotError> {
        let name = dm_name(&self.name(volume))?;
        self.remove_device(&active.dm, vm_id, &name)?;
        let deleted = devicemapper::message(&active.dm, &active.pool, &format!("delete {}", record.thin_id));
        match deleted {
            Err(e) if record.complete => return Err(dm_err(vm_id, "delete thin volume from", active.pool.name())(e)),
            Err(e) => tracing::debug!(volume, error = %e, "incomplete volume had no thin id"),
            Ok(()) => {}
        }
        let path = self.record_path(volume);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(vm_id, "remove", &path)(e)),
            _ => Ok(()),
        }
    }

    /// The image's thin volume, made (the base written into it once) if it does not exist yet.
    fn image(
        &self,
        active: &Active,
        vm_id: &str,
        base: &Path,
        base_bytes: u64,
    ) -> Result<(String, ThinDev), SnapshotError> {
        let volume = image_volume(vm_id, base)?;
        match self.read_volume(vm_id, &volume)? {
            Some(record) if record.complete => {
                return Ok((volume.clone(), self.activate(active, vm_id, &volume, &record)?))
            }
            Some(record) => self.destroy(active, vm_id, &volume, &record)?,
            None => {}
        }
        Self::check_space(active, vm_id, base_bytes)?;
        let mut record = Volume {
            thin_id: self.next_thin_id()?,
            size_bytes: base_bytes.next_multiple_of(SECTOR),
            complete: false,
            base: Some(base.to_path_buf()),
            image: None,
        };
        write_json(vm_id, &self.record_path(&volume), &record)?;
        let made = || -> Result<ThinDev, SnapshotError> {
            let name = dm_name(&self.name(&volume))?;
            let id = record.id(vm_id)?;
            let dev = ThinDev::new(&active.dm, &name, None, Sectors(record.size_bytes / SECTOR), &active.pool, id)
                .map_err(dm_err(vm_id, "create thin volume", &*name))?;
            let node = dev.devnode();
            let copy = || -> std::io::Result<()> {
                let mut input = File::open(base)?;
                let mut output = OpenOptions::new().write(true).open(&node)?;
                write_nonzero(&mut input, &mut output)?;
                output.sync_all()
            };
            copy().map_err(io_err(vm_id, "write the base image into", &node))?;
            Ok(dev)
        };
        match made() {
            Ok(dev) => {
                record.complete = true;
                write_json(vm_id, &self.record_path(&volume), &record)?;
                tracing::info!(volume, base = %base.display(), "image thin volume written");
                Ok((volume, dev))
            }
            Err(e) => {
                if let Err(undo) = self.destroy(active, vm_id, &volume, &record) {
                    tracing::error!(error = %undo, "could not undo the image volume; recover will");
                }
                Err(e)
            }
        }
    }

    /// Every step of [`Snapshotter::create`] once the pool is active.
    fn build(
        &self,
        active: &Active,
        vm_id: &str,
        base: &Path,
        base_bytes: u64,
        size_bytes: u64,
    ) -> Result<Disk, SnapshotError> {
        let volume = vm_volume(vm_id);
        if let Some(record) = self.read_volume(vm_id, &volume)? {
            if record.complete {
                let path = self.activate(active, vm_id, &volume, &record)?.devnode();
                return Err(SnapshotError::AlreadyExists { vm_id: vm_id.into(), path });
            }
            // Leftovers of a crash that recover has not seen yet.
            self.destroy(active, vm_id, &volume, &record)?;
        }
        let (image, origin) = self.image(active, vm_id, base, base_bytes)?;
        // A snapshot shares every block; room for the guest's first writes is all it needs.
        Self::check_space(active, vm_id, 0)?;
        let mut record = Volume {
            thin_id: self.next_thin_id()?,
            size_bytes: size_bytes.next_multiple_of(SECTOR),
            complete: false,
            base: None,
            image: Some(image),
        };
        write_json(vm_id, &self.record_path(&volume), &record)?;
        self.crash_point(vm_id, CrashPoint::AfterIntent)?;
        let made = || -> Result<PathBuf, SnapshotError> {
            let name = dm_name(&self.name(&volume))?;
            let id = record.id(vm_id)?;
            let mut dev = origin
                .snapshot(&active.dm, &name, None, &active.pool, id)
                .map_err(dm_err(vm_id, "snapshot", &*name))?;
            // A thin volume can be larger than its origin: reads past the origin's end are zeros.
            let sectors = Sectors(record.size_bytes / SECTOR);
            if sectors > dev.size() {
                let line = TargetLine::new(Sectors(0), sectors, ThinTargetParams::new(active.pool.device(), id, None));
                dev.set_table(&active.dm, line).map_err(dm_err(vm_id, "grow", &*name))?;
            }
            self.crash_point(vm_id, CrashPoint::AfterThin)?;
            let node = dev.devnode();
            tracing::debug!(device = %node.display(), "thin snapshot made; growing its ext4");
            grow_ext4(self.ops.as_ref(), &node).map_err(host_err(vm_id, "growing ext4", node.display()))?;
            self.crash_point(vm_id, CrashPoint::AfterGrow)?;
            Ok(node)
        };
        match made() {
            Ok(path) => {
                record.complete = true;
                write_json(vm_id, &self.record_path(&volume), &record)?;
                Ok(Disk { path, vm_id: vm_id.into(), snapshotter: "devicemapper".into() })
            }
            Err(e) if self.crash.lock().unwrap_or_else(|p| p.into_inner()).is_some() => Err(e),
            Err(e) => {
                if let Err(undo) = self.destroy(active, vm_id, &volume, &record) {
                    tracing::error!(error = %undo, "rollback incomplete; recover or remove will finish it");
                }
                Err(e)
            }
        }
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
        let guard = self.pool()?;
        let active = guard.as_ref().expect("pool set up");
        fs::create_dir_all(self.volumes_dir()).map_err(io_err(vm_id, "create", &self.volumes_dir()))?;
        let disk = self.build(active, vm_id, base, base_bytes, size_bytes)?;
        tracing::info!(disk = %disk.path.display(), size_bytes, "disk created");
        Ok(disk)
    }

    fn remove(&self, vm_id: &str) -> Result<(), SnapshotError> {
        validate_vm_id(vm_id)?;
        let volume = vm_volume(vm_id);
        let Some(record) = self.read_volume(vm_id, &volume)? else {
            // No record: nothing of ours, unless a device of that name outlived it.
            if let Ok(dm) = DM::new() {
                self.remove_device(&dm, vm_id, &dm_name(&self.name(&volume))?)?;
            }
            return Ok(());
        };
        let guard = self.pool()?;
        self.destroy(guard.as_ref().expect("pool set up"), vm_id, &volume, &record)?;
        tracing::info!(snapshotter = "devicemapper", vm = vm_id, "disk removed");
        Ok(())
    }

    fn list(&self) -> Result<Vec<Disk>, SnapshotError> {
        let vms: Vec<(String, Volume)> =
            self.volumes()?.into_iter().filter(|(name, v)| v.complete && name.starts_with("vm-")).collect();
        if vms.is_empty() {
            return Ok(Vec::new());
        }
        let guard = self.pool()?;
        let active = guard.as_ref().expect("pool set up");
        let mut disks = Vec::new();
        for (volume, record) in vms {
            let vm_id = &volume["vm-".len()..];
            let path = self.activate(active, vm_id, &volume, &record)?.devnode();
            disks.push(Disk { path, vm_id: vm_id.into(), snapshotter: "devicemapper".into() });
        }
        Ok(disks)
    }

    fn recover(&self) -> Result<RecoveryReport, SnapshotError> {
        let mut report = RecoveryReport::default();
        let volumes = self.volumes()?;
        if volumes.is_empty() && !self.dir.join("pool.json").exists() {
            return Ok(report);
        }
        let guard = self.pool()?;
        let active = guard.as_ref().expect("pool set up");
        let in_use: Vec<&str> = volumes.iter().filter_map(|(_, v)| v.image.as_deref()).collect();
        for (volume, record) in &volumes {
            let vm_id = volume.strip_prefix("vm-").unwrap_or("*");
            let orphan_image = record.base.as_ref().is_some_and(|b| !b.exists()) && !in_use.contains(&volume.as_str());
            if !record.complete || orphan_image {
                tracing::info!(volume, "removing a half-made or orphaned volume");
                self.destroy(active, vm_id, volume, record)?;
                if volume.starts_with("vm-") {
                    report.removed.push(vm_id.to_string());
                }
                continue;
            }
            let dev = self.activate(active, vm_id, volume, record)?;
            if volume.starts_with("vm-") {
                report.adopted.push(Disk {
                    path: dev.devnode(),
                    vm_id: vm_id.into(),
                    snapshotter: "devicemapper".into(),
                });
            }
        }
        // dm devices of this store that no record names (a crash between a device's creation and
        // its record's removal) go too.
        let known: Vec<String> = volumes
            .iter()
            .map(|(v, _)| self.name(v))
            .chain(["pool", "pool-meta", "pool-data"].map(|p| self.name(p)))
            .collect();
        for name in self.devices_of(&active.dm)? {
            let text = name.to_string();
            if !known.contains(&text) {
                tracing::info!(device = %text, "removing a dm device no record names");
                self.remove_device(&active.dm, "*", &name)?;
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_keys_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.ext4"), dir.path().join("b.ext4"));
        fs::write(&a, b"one").unwrap();
        fs::write(&b, b"one").unwrap();
        let key = image_volume("vm", &a).unwrap();
        assert!(key.starts_with("img-") && key.len() == 20, "{key}");
        assert_eq!(key, image_volume("vm", &a).unwrap());
        assert_ne!(key, image_volume("vm", &b).unwrap(), "another path is another image");
        fs::write(&a, b"two!").unwrap();
        assert_ne!(key, image_volume("vm", &a).unwrap(), "a rewritten base is another image");
    }

    #[test]
    fn names_are_per_store() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ops: Arc<dyn HostOps> = Arc::new(crate::snapshot::RecordingHostOps::with_dm());
        let a = DmSnapshotter::new(&StorePaths::new(one.path()), DmPoolConfig::default(), ops.clone());
        let b = DmSnapshotter::new(&StorePaths::new(two.path()), DmPoolConfig::default(), ops);
        assert_ne!(a.name("pool"), b.name("pool"));
        assert!(a.name(&vm_volume("web")).ends_with("-vm-web"));
        // The longest VM id still makes a valid dm name (at most 127 bytes).
        assert!(dm_name(&a.name(&vm_volume(&"x".repeat(64)))).is_ok());
    }
}
