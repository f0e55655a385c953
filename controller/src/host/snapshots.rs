//! VM snapshots: a running VM's machine state and memory (saved by its VMM) with a point-in-time copy
//! of its disk (made by the snapshotter while the VM is paused), published atomically under
//! `vm-snapshots/<vm>/<name>/` ([`crate::layout::VmSnapshotsDir`]); and rollback to one of them.
//!
//! - **Create**: the VM is paused, its VMM saves state and memory into its `incoming/` directory
//!   (the only place the jailed VMM may write), the disk is copied next to them, `snapshot.json` is
//!   written, and the directory is renamed to its final name; then the VM resumes. A stopped VM (or
//!   `disk_only`) gets a disk-only snapshot. A crash at any point leaves a directory without
//!   `snapshot.json` (or one under `incoming/`), which [`HostRuntime::sweep_snapshot_leftovers`]
//!   removes at the next start.
//! - **Rollback**: the snapshot is checked first (its spec, its state file, the machine shape), so
//!   a bad snapshot is refused with the VM untouched; then the VM's process is stopped and
//!   `runtime/<vm>/restore.json` names the snapshot. The next start (the reconciler's) puts the
//!   snapshot's disk back and resumes the VM from its memory (a disk-only snapshot boots from the
//!   disk); the record is removed once the VMM runs, so a crash before that repeats the rollback.
//! - **Lifetime**: snapshots go with their VM, and with a recreate (a spec change): they hold a
//!   machine of the old spec.

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use vmm_core::control::VmState;

use super::{guest, prepared, HostRuntime};
use crate::api::conditions::now_rfc3339;
use guest_api::error_chain;

/// What a snapshot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SnapshotKind {
    /// Machine state, memory and disk: a rollback resumes the VM where it was.
    Full,
    /// The disk only: a rollback boots from it.
    Disk,
}

impl SnapshotKind {
    /// `full` or `disk`, as the API and the CLI show it.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Full => "full",
            SnapshotKind::Disk => "disk",
        }
    }
}

/// A snapshot's record (`snapshot.json`, written last).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotInfo {
    /// The VM.
    pub vm: String,
    /// The snapshot's name.
    pub name: String,
    /// What it holds.
    pub kind: SnapshotKind,
    /// When it was taken (RFC 3339).
    pub created: String,
    /// Bytes of guest memory saved (0 for a disk-only snapshot).
    pub memory_bytes: u64,
    /// The disk copy's length in bytes.
    pub disk_bytes: u64,
    /// The fingerprint of the VM's spec it was taken of: only that spec can take it back.
    pub fingerprint: String,
}

/// A pending rollback (`runtime/<vm>/restore.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PendingRestore {
    snapshot: String,
}

/// A snapshot operation that failed, naming the VM and the snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotOpError {
    /// The VM is not declared.
    #[error("no VM named {0:?} (see `ignite ps -a`)")]
    NoVm(String),
    /// The VM has no disk yet.
    #[error("VM {0:?} has no disk yet (it is still being created); try again once it exists")]
    NotPrepared(String),
    /// The snapshot name is not usable.
    #[error("{0:?} is not a snapshot name: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'")]
    Name(String),
    /// A snapshot of that name exists.
    #[error("VM {vm:?} has a snapshot named {name:?} already")]
    Exists {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
    },
    /// No such snapshot.
    #[error("VM {vm:?} has no snapshot named {name:?} (see `ignite snapshot ls {vm}`)")]
    NotFound {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
    },
    /// The snapshot is of another spec of the VM.
    #[error("snapshot {name:?} of VM {vm:?} was taken of another spec of the VM: only that spec can take it back")]
    Stale {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
    },
    /// The snapshot cannot be restored (damaged, another format or CPU, another machine shape).
    #[error("snapshot {name:?} of VM {vm:?} cannot be restored: {detail}")]
    Unusable {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
        /// Why, from the engine's check.
        detail: String,
    },
    /// A rollback to the snapshot is pending: it cannot be removed.
    #[error("snapshot {name:?} of VM {vm:?} is the target of a pending rollback; remove it once the VM runs")]
    Pending {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
    },
    /// A step failed on the host.
    #[error("VM {vm:?}: {action}: {detail}")]
    Failed {
        /// The VM.
        vm: String,
        /// What was being done.
        action: &'static str,
        /// The cause.
        detail: String,
    },
}

/// Snapshots of VMs, as the API serves them.
pub trait VmSnapshots: Send + Sync {
    /// Saves VM `vm` as `name` (default: the time, `YYYYMMDD-HHMMSS`): full when it runs and not
    /// `disk_only`, else its disk only. The VM keeps running.
    fn create_snapshot(&self, vm: &str, name: Option<&str>, disk_only: bool) -> Result<SnapshotInfo, SnapshotOpError>;
    /// The complete snapshots of `vm` (all VMs' when `None`), oldest first per VM.
    fn list_snapshots(&self, vm: Option<&str>) -> Result<Vec<SnapshotInfo>, SnapshotOpError>;
    /// Removes snapshot `name` of `vm`.
    fn remove_snapshot(&self, vm: &str, name: &str) -> Result<(), SnapshotOpError>;
    /// Checks snapshot `name` of `vm`, stops the VM's process and makes its next start a rollback to
    /// the snapshot. The caller makes the VM's desired state Running and queues it.
    fn rollback(&self, vm: &str, name: &str) -> Result<SnapshotInfo, SnapshotOpError>;
}

/// A snapshot name from an RFC 3339 time: `2026-12-03T09:30:00Z` -> `20261203-093000`.
pub(crate) fn name_at(now: &str) -> String {
    let digits: String = now.chars().filter(char::is_ascii_digit).collect();
    format!("{}-{}", &digits[..8.min(digits.len())], &digits[8.min(digits.len())..14.min(digits.len())])
}

fn failed<'a, E: std::error::Error>(vm: &'a str, action: &'static str) -> impl FnOnce(&E) -> SnapshotOpError + 'a {
    move |e| SnapshotOpError::Failed { vm: vm.to_string(), action, detail: error_chain(e) }
}

fn private_dir(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

impl HostRuntime {
    /// VM `vm`'s record, or [`SnapshotOpError::NoVm`]: only a declared VM's name (a plain label,
    /// never a path out of `vm-snapshots/`) reaches the snapshot directories.
    fn declared_vm(&self, vm: &str) -> Result<crate::store::VmRecord, SnapshotOpError> {
        let record = self.store.get_vm(vm).map_err(|e| failed(vm, "reading the store")(&e))?;
        record.ok_or_else(|| SnapshotOpError::NoVm(vm.into()))
    }

    fn read_snapshot(&self, vm: &str, name: &str) -> Result<SnapshotInfo, SnapshotOpError> {
        let path = self.layout.vm_snapshots(vm).record(name);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SnapshotOpError::NotFound { vm: vm.into(), name: name.into() })
            }
            Err(e) => return Err(failed(vm, "reading a snapshot record")(&e)),
        };
        serde_json::from_slice(&text).map_err(|e| SnapshotOpError::Unusable {
            vm: vm.into(),
            name: name.into(),
            detail: format!("{}: {e}", path.display()),
        })
    }

    fn pending_restore(&self, vm: &str) -> Option<String> {
        let path = prepared::dir(&self.runtime_dir(), vm).pending_restore();
        let text = std::fs::read(&path).ok()?;
        match serde_json::from_slice::<PendingRestore>(&text) {
            Ok(pending) => Some(pending.snapshot),
            Err(e) => {
                warn!(vm, path = %path.display(), error = %e, "ignoring an unreadable pending rollback");
                None
            }
        }
    }

    /// The snapshot a pending rollback names, with its disk put back as the VM's disk. Called by
    /// `start` with the VM's lock held; `None` when no rollback is pending (or its snapshot is gone).
    pub(super) fn apply_pending_restore(&self, vm: &str) -> Result<Option<SnapshotInfo>, SnapshotOpError> {
        let Some(name) = self.pending_restore(vm) else { return Ok(None) };
        let info = match self.read_snapshot(vm, &name) {
            Ok(info) => info,
            Err(e) => {
                warn!(vm, snapshot = name, error = %e, "the pending rollback's snapshot is unusable: booting as usual");
                self.clear_pending_restore(vm);
                return Ok(None);
            }
        };
        let disk = self.layout.vm_snapshots(vm).disk(&name);
        self.snapshotter.restore_disk(vm, &disk).map_err(|e| failed(vm, "putting the snapshot's disk back")(&e))?;
        info!(vm, snapshot = name, kind = info.kind.as_str(), "disk rolled back");
        Ok(Some(info))
    }

    /// Forgets a pending rollback (done, or impossible).
    pub(super) fn clear_pending_restore(&self, vm: &str) {
        let path = prepared::dir(&self.runtime_dir(), vm).pending_restore();
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(vm, path = %path.display(), error = %e, "cannot remove the pending rollback");
            }
        }
    }

    /// Removes every snapshot of VM `vm` (with the VM).
    pub(super) fn remove_all_snapshots(&self, vm: &str) -> std::io::Result<()> {
        match std::fs::remove_dir_all(self.layout.vm_snapshots(vm).path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The VMs that have a snapshot directory.
    pub(super) fn snapshot_owners(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.layout.vm_snapshots_dir()) else { return Vec::new() };
        entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
    }

    /// Repairs what crashed snapshot creations left: resumes VMs a snapshot held paused, and
    /// removes everything under each VM's `incoming/` and snapshot directories without their
    /// record. Call it after the supervisor adopted the running VMs. Returns what it did, for the log.
    pub fn sweep_snapshot_leftovers(&self) -> Vec<String> {
        let mut removed = Vec::new();
        for vm in prepared::list(&self.runtime_dir()).unwrap_or_default() {
            let marker = prepared::dir(&self.runtime_dir(), &vm).snapshotting();
            if !marker.exists() {
                continue;
            }
            if self.supervisor.is_running(&vm) {
                match self.supervisor.resume(&vm) {
                    Ok(()) => removed.push(format!("the pause of {vm} for a snapshot (resumed)")),
                    Err(e) => warn!(vm, error = %error_chain(&e), "cannot resume a VM a snapshot paused"),
                }
            }
            let _ = std::fs::remove_file(&marker);
        }
        for vm in self.snapshot_owners() {
            let dir = self.layout.vm_snapshots(&vm);
            let Ok(entries) = std::fs::read_dir(dir.path()) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let half_made: Vec<_> = if name == "incoming" {
                    std::fs::read_dir(entry.path()).map(|e| e.flatten().map(|e| e.path()).collect()).unwrap_or_default()
                } else if !dir.record(&name).exists() {
                    vec![entry.path()]
                } else {
                    Vec::new()
                };
                for path in half_made {
                    let gone = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                    match gone {
                        Ok(()) => removed.push(format!("half-made snapshot {}", path.display())),
                        Err(e) => warn!(path = %path.display(), error = %e, "cannot remove a half-made snapshot"),
                    }
                }
            }
        }
        removed
    }

    /// Pauses the running VM `vm` (unless it is paused), runs `body`, and resumes it again.
    fn while_paused<T>(
        &self,
        vm: &str,
        body: impl FnOnce() -> Result<T, SnapshotOpError>,
    ) -> Result<T, SnapshotOpError> {
        let status = self.supervisor.status(vm).map_err(|e| failed(vm, "asking its VMM for its state")(&e))?;
        let was_paused = status.state == VmState::Paused;
        if was_paused {
            return body();
        }
        // Before the pause: a daemon that crashes while the VM is paused leaves this behind, and
        // its successor resumes the VM (see sweep_snapshot_leftovers).
        let marker = prepared::dir(&self.runtime_dir(), vm).snapshotting();
        std::fs::write(&marker, b"").map_err(|e| failed(vm, "marking it paused for a snapshot")(&e))?;
        self.supervisor.pause(vm).map_err(|e| failed(vm, "pausing it")(&e))?;
        let result = body();
        if let Err(e) = self.supervisor.resume(vm) {
            warn!(vm, error = %error_chain(&e), "cannot resume the VM after its snapshot");
            if result.is_ok() {
                return Err(failed(vm, "resuming it after the snapshot")(&e));
            }
        }
        let _ = std::fs::remove_file(&marker);
        result
    }

    /// Saves machine state and memory (unless `disk_only` or the VM is stopped) and the disk into
    /// `incoming/<name>`. Returns the kind and the memory bytes.
    fn save_into(
        &self,
        vm: &str,
        name: &str,
        staging: &Path,
        disk_only: bool,
    ) -> Result<(SnapshotKind, u64), SnapshotOpError> {
        let disk = staging.join("disk");
        if !self.supervisor.is_running(vm) {
            private_dir(staging).map_err(|e| failed(vm, "creating the snapshot directory")(&e))?;
            self.snapshotter.save_disk(vm, &disk).map_err(|e| failed(vm, "copying its disk")(&e))?;
            return Ok((SnapshotKind::Disk, 0));
        }
        self.while_paused(vm, || {
            let (kind, memory) = if disk_only {
                private_dir(staging).map_err(|e| failed(vm, "creating the snapshot directory")(&e))?;
                (SnapshotKind::Disk, 0)
            } else {
                let bytes =
                    self.supervisor.snapshot(vm, name).map_err(|e| failed(vm, "saving its state and memory")(&e))?;
                (SnapshotKind::Full, bytes)
            };
            crate::failpoint::hit("snapshot:after-memory");
            self.snapshotter.save_disk(vm, &disk).map_err(|e| failed(vm, "copying its disk")(&e))?;
            Ok((kind, memory))
        })
    }
}

impl VmSnapshots for HostRuntime {
    fn create_snapshot(&self, vm: &str, name: Option<&str>, disk_only: bool) -> Result<SnapshotInfo, SnapshotOpError> {
        let created = now_rfc3339();
        let name = name.map_or_else(|| name_at(&created), str::to_string);
        vmm_core::snapshot::check_name(&name).map_err(|_| SnapshotOpError::Name(name.clone()))?;
        if name == "incoming" {
            return Err(SnapshotOpError::Name(name));
        }
        let lock = self.vm_lock(vm);
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        self.declared_vm(vm)?;
        let prepared = self.load(vm).map_err(|e| failed(vm, "reading its prepared state")(&e))?;
        let prepared = prepared.ok_or_else(|| SnapshotOpError::NotPrepared(vm.into()))?;
        let dir = self.layout.vm_snapshots(vm);
        if dir.record(&name).exists() {
            return Err(SnapshotOpError::Exists { vm: vm.into(), name });
        }
        let (target, staging) = (dir.snapshot(&name), dir.incoming().join(&name));
        for leftover in [&target, &staging] {
            if leftover.exists() {
                std::fs::remove_dir_all(leftover).map_err(|e| failed(vm, "removing a half-made snapshot")(&e))?;
            }
        }
        private_dir(&dir.incoming()).map_err(|e| failed(vm, "creating its snapshot directory")(&e))?;
        let saved = self.save_into(vm, &name, &staging, disk_only);
        let (kind, memory_bytes) = match saved {
            Ok(saved) => saved,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        let publish = || -> std::io::Result<SnapshotInfo> {
            let disk_bytes = std::fs::metadata(staging.join("disk"))?.len();
            let info = SnapshotInfo {
                vm: vm.into(),
                name: name.clone(),
                kind,
                created: created.clone(),
                memory_bytes,
                disk_bytes,
                fingerprint: prepared.fingerprint.clone(),
            };
            // The VMM wrote as the jail's uid: the published snapshot is root's alone.
            for entry in std::fs::read_dir(&staging)?.flatten() {
                std::os::unix::fs::chown(entry.path(), Some(0), Some(0))?;
            }
            std::os::unix::fs::chown(&staging, Some(0), Some(0))?;
            crate::private::write_json_atomic(&staging.join("snapshot.json"), &info)?;
            crate::failpoint::hit("snapshot:before-publish");
            std::fs::rename(&staging, &target)?;
            sync_dir(dir.path())?;
            Ok(info)
        };
        let info = publish().map_err(|e| {
            let _ = std::fs::remove_dir_all(&staging);
            failed(vm, "publishing the snapshot")(&e)
        })?;
        info!(vm, snapshot = name, kind = kind.as_str(), memory_bytes, "snapshot taken");
        Ok(info)
    }

    fn list_snapshots(&self, vm: Option<&str>) -> Result<Vec<SnapshotInfo>, SnapshotOpError> {
        let vms = match vm {
            Some(vm) => {
                self.declared_vm(vm)?;
                vec![vm.to_string()]
            }
            None => self.snapshot_owners(),
        };
        let mut all = Vec::new();
        for vm in vms {
            let Ok(entries) = std::fs::read_dir(self.layout.vm_snapshots(&vm).path()) else { continue };
            let mut infos: Vec<SnapshotInfo> = entries
                .flatten()
                .filter_map(|e| self.read_snapshot(&vm, &e.file_name().to_string_lossy()).ok())
                .collect();
            infos.sort_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
            all.extend(infos);
        }
        Ok(all)
    }

    fn remove_snapshot(&self, vm: &str, name: &str) -> Result<(), SnapshotOpError> {
        vmm_core::snapshot::check_name(name).map_err(|_| SnapshotOpError::Name(name.into()))?;
        let lock = self.vm_lock(vm);
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        self.declared_vm(vm)?;
        self.read_snapshot(vm, name)?;
        if self.pending_restore(vm).as_deref() == Some(name) {
            return Err(SnapshotOpError::Pending { vm: vm.into(), name: name.into() });
        }
        let dir = self.layout.vm_snapshots(vm);
        // The record first: whatever a crash leaves of the rest is a half-made snapshot.
        std::fs::remove_file(dir.record(name)).map_err(|e| failed(vm, "removing the snapshot")(&e))?;
        std::fs::remove_dir_all(dir.snapshot(name)).map_err(|e| failed(vm, "removing the snapshot")(&e))?;
        info!(vm, snapshot = name, "snapshot removed");
        Ok(())
    }

    fn rollback(&self, vm: &str, name: &str) -> Result<SnapshotInfo, SnapshotOpError> {
        vmm_core::snapshot::check_name(name).map_err(|_| SnapshotOpError::Name(name.into()))?;
        let lock = self.vm_lock(vm);
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        let record = self.declared_vm(vm)?;
        let prepared = self.load(vm).map_err(|e| failed(vm, "reading its prepared state")(&e))?;
        let prepared = prepared.ok_or_else(|| SnapshotOpError::NotPrepared(vm.into()))?;
        let info = self.read_snapshot(vm, name)?;
        if info.fingerprint != prepared.fingerprint {
            return Err(SnapshotOpError::Stale { vm: vm.into(), name: name.into() });
        }
        let dir = self.layout.vm_snapshots(vm);
        let unusable = |detail: String| SnapshotOpError::Unusable { vm: vm.into(), name: name.into(), detail };
        let disk = dir.disk(name);
        std::fs::metadata(&disk).map_err(|e| unusable(format!("{}: {e}", disk.display())))?;
        if info.kind == SnapshotKind::Full {
            // Everything the new VMM will check, checked now: a refusal leaves the VM running.
            let config = guest::vm_config(&record.vm, &prepared, self.config.virt_mode);
            vmm_core::snapshot::load(&dir.snapshot(name))
                .and_then(|loaded| loaded.check_fits(&config))
                .map_err(|e| unusable(error_chain(&e)))?;
        }
        if self.supervisor.is_running(vm) {
            self.mark_stopping(vm);
            self.supervisor.kill(vm).map_err(|e| failed(vm, "stopping its VMM")(&e))?;
        }
        let runtime = prepared::dir(&self.runtime_dir(), vm);
        super::exits::clear(&runtime).map_err(|e| failed(vm, "clearing its last exit")(&e))?;
        self.supervisor.cleanup(vm).map_err(|e| failed(vm, "removing its run directory")(&e))?;
        crate::private::write_json_atomic(&runtime.pending_restore(), &PendingRestore { snapshot: name.into() })
            .map_err(|e| failed(vm, "recording the rollback")(&e))?;
        info!(vm, snapshot = name, kind = info.kind.as_str(), "rollback pending: the next start restores it");
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_the_time() {
        assert_eq!(name_at("2026-12-03T09:30:05Z"), "20261203-093005");
        assert!(vmm_core::snapshot::check_name(&name_at(&now_rfc3339())).is_ok());
    }

    #[test]
    fn records_refuse_unknown_fields() {
        let info = SnapshotInfo {
            vm: "web".into(),
            name: "a".into(),
            kind: SnapshotKind::Full,
            created: "2026-12-03T09:30:05Z".into(),
            memory_bytes: 1,
            disk_bytes: 2,
            fingerprint: "f".into(),
        };
        let text = serde_json::to_string(&info).unwrap();
        assert!(text.contains("\"kind\":\"full\"") && text.contains("memoryBytes"), "{text}");
        assert_eq!(serde_json::from_str::<SnapshotInfo>(&text).unwrap(), info);
        let extra = text.replace('}', ",\"x\":1}");
        assert!(serde_json::from_str::<SnapshotInfo>(&extra).is_err());
    }
}
