//! The on-disk layout under `--root`, named in one place. Every path the daemon, the supervisor, the
//! gRPC services and the CLI use under the root comes from here; the image store's part is
//! [`image_store::StorePaths`], reached through [`RootLayout::store`].
//!
//! ```text
//! ROOT/                      0700 (see crate::private)
//!   state/                   the sled store: VMs, leases, events, sources
//!   sources/                 git checkouts and source caches
//!   runtime/<vm>/            what the host prepared for a VM and how it last ended
//!     prepared.json  last-exit.json  config.img  (a copied kernel)
//!     restore.json           a rollback the next start carries out
//!     snapshotting           a snapshot holds the VM paused (resumed after a daemon crash)
//!   vms/<vm>/                the VM's run directory, shared with its VMM process
//!     config.json  pid  exit.json  jail.json  jail/
//!     console.log[.1]  vmm.log[.1]
//!     control.sock  console.sock  vsock.sock[_<port>]
//!   vm-snapshots/<vm>/       the VM's snapshots (VmSnapshotsDir); removed with the VM
//!     incoming/              the VMM's --snapshot-dir (the jailed VMM's uid owns it)
//!     <name>/                state  memory  disk  snapshot.json (written last: complete)
//!   daemon.log               a daemon the CLI started
//!   blobs/ images/ rootfs/ kernels/ snapshots/ tmp/   the image store (StorePaths)
//! ```

use std::path::{Path, PathBuf};

use image_store::StorePaths;

/// Every path under one `--root`.
#[derive(Clone, Debug)]
pub struct RootLayout {
    root: PathBuf,
}

impl RootLayout {
    /// The layout of `root`.
    pub fn new(root: impl Into<PathBuf>) -> RootLayout {
        RootLayout { root: root.into() }
    }

    /// The root directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image store's part of the root.
    pub fn store(&self) -> StorePaths {
        StorePaths::new(&self.root)
    }

    /// The sled database.
    pub fn state_db(&self) -> PathBuf {
        self.root.join("state")
    }

    /// Where sources keep their checkouts.
    pub fn sources_dir(&self) -> PathBuf {
        self.root.join("sources")
    }

    /// The host's per-VM records (`runtime/<vm>/`).
    pub fn runtime_dir(&self) -> PathBuf {
        self.root.join("runtime")
    }

    /// The host's record of VM `name` (`runtime/<vm>/`).
    pub fn runtime(&self, name: &str) -> RuntimeDir {
        RuntimeDir::new(&self.runtime_dir(), name)
    }

    /// The VMs' run directories (`vms/`), the supervisor's `run_dir`.
    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// The run directory of VM `name`.
    pub fn vm(&self, name: &str) -> VmDir {
        VmDir::new(&self.vms_dir(), name)
    }

    /// The directory holding every VM's snapshots (`vm-snapshots/`).
    pub fn vm_snapshots_dir(&self) -> PathBuf {
        self.root.join("vm-snapshots")
    }

    /// The snapshots of VM `name` (`vm-snapshots/<vm>/`).
    pub fn vm_snapshots(&self, name: &str) -> VmSnapshotsDir {
        VmSnapshotsDir { dir: self.vm_snapshots_dir().join(name) }
    }

    /// The log of a daemon the CLI started.
    pub fn daemon_log(&self) -> PathBuf {
        self.root.join("daemon.log")
    }

    /// The warm-start templates (`templates/`).
    pub fn templates(&self) -> TemplatesDir {
        TemplatesDir { dir: self.root.join("templates") }
    }
}

/// The warm-start templates (`templates/`): one directory per template key holding the snapshot
/// files a warm VM restores from ([`vmm_core::snapshot`]) and `template.json`, written last (a
/// directory without it is not a template). Builds happen in `.build-<key>/`, their VMM's run
/// directory under `.run/`; both are swept when the daemon starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplatesDir {
    dir: PathBuf,
}

impl TemplatesDir {
    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Template `key`'s directory (its `state` and `memory`).
    pub fn template(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// Template `key`'s record (`template.json`).
    pub fn record(&self, key: &str) -> PathBuf {
        self.template(key).join("template.json")
    }

    /// Where template `key` is being built: its initramfs, placeholder disks and the VMM's
    /// snapshot directory.
    pub fn build(&self, key: &str) -> PathBuf {
        self.dir.join(format!(".build-{key}"))
    }

    /// The run directories of template builds' VMMs (a supervisor of their own, so the VMs'
    /// orphan sweep never sees them).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join(".run")
    }
}

/// One VM's record on the host (`runtime/<vm>/`): what was prepared for it and how it last ended. It
/// outlives the VM's processes (a stopped VM keeps it) and goes with the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeDir {
    dir: PathBuf,
}

impl RuntimeDir {
    /// The record of VM `name` under `runtime_dir`.
    pub fn new(runtime_dir: &Path, name: &str) -> RuntimeDir {
        RuntimeDir { dir: runtime_dir.join(name) }
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// What the host prepared (disk, tap, lease, the spec's fingerprint).
    pub fn prepared(&self) -> PathBuf {
        self.dir.join("prepared.json")
    }

    /// How the VM's main process last ended, as the restart policy judges it (`reconcile::Exit`).
    /// Not the VMM's own exit record ([`VmDir::exit_record`]), from which it is translated.
    pub fn last_exit(&self) -> PathBuf {
        self.dir.join("last-exit.json")
    }

    /// Where releases before `last-exit.json` kept it; read once after an upgrade, then removed.
    pub fn legacy_last_exit(&self) -> PathBuf {
        self.dir.join("exit.json")
    }

    /// The config drive the guest reads (`ignite.config=/dev/vdb`).
    pub fn config_drive(&self) -> PathBuf {
        self.dir.join("config.img")
    }

    /// Present while a snapshot holds the VM paused: a daemon that crashed meanwhile has its
    /// successor resume the VM.
    pub fn snapshotting(&self) -> PathBuf {
        self.dir.join("snapshotting")
    }

    /// The snapshot a rollback asked the next start to resume from (its disk is put back first).
    pub fn pending_restore(&self) -> PathBuf {
        self.dir.join("restore.json")
    }
}

/// One VM's snapshots (`vm-snapshots/<vm>/`). A snapshot is a directory holding the machine state
/// and memory files the VMM wrote ([`vmm_core::snapshot`]), a copy of the VM's disk, and
/// `snapshot.json`, which is written last: a directory without it is a half-made snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSnapshotsDir {
    dir: PathBuf,
}

impl VmSnapshotsDir {
    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Where the VMM saves (its `--snapshot-dir`, writable by the jailed VMM); a saved snapshot
    /// moves from here to [`Self::snapshot`] once its disk copy and record are made.
    pub fn incoming(&self) -> PathBuf {
        self.dir.join("incoming")
    }

    /// Snapshot `name`'s directory.
    pub fn snapshot(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Snapshot `name`'s copy of the VM's disk.
    pub fn disk(&self, name: &str) -> PathBuf {
        self.snapshot(name).join("disk")
    }

    /// Snapshot `name`'s record (`snapshot.json`).
    pub fn record(&self, name: &str) -> PathBuf {
        self.snapshot(name).join("snapshot.json")
    }
}

/// One VM's run directory (`vms/<vm>/`): what the supervisor and the VMM process share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmDir {
    dir: PathBuf,
}

impl VmDir {
    /// The run directory of VM `name` under `vms_dir`.
    pub fn new(vms_dir: &Path, name: &str) -> VmDir {
        VmDir { dir: vms_dir.join(name) }
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The VMM's configuration, written by the supervisor before the spawn.
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// The VMM's pid and start time (`PID STARTTIME`).
    pub fn pid(&self) -> PathBuf {
        self.dir.join("pid")
    }

    /// How the VMM process ended, written by the VMM itself (`vmm_core::ExitRecord`).
    pub fn exit_record(&self) -> PathBuf {
        self.dir.join("exit.json")
    }

    /// The uid/gid the VM's jail runs as.
    pub fn jail_record(&self) -> PathBuf {
        self.dir.join("jail.json")
    }

    /// The jail's root directory (the VMM's `/` after `pivot_root`).
    pub fn jail_root(&self) -> PathBuf {
        self.dir.join("jail")
    }

    /// The guest's serial console output (rotated to `console.log.1`).
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// The VMM's own log (rotated to `vmm.log.1`); a seccomp kill is reported here.
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }

    /// The VMM's control socket (status, pause, resume, stop, kill).
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// The console socket: serial output out, console input in (`ignite attach`).
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }

    /// The host side of the VM's vsock device (`CONNECT <port>` protocol; guest-initiated
    /// connections go to `vsock.sock_<port>`).
    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }

    /// The sockets a VMM serves; an ended VMM's are removed.
    pub fn sockets(&self) -> [PathBuf; 3] {
        [self.control_socket(), self.console_socket(), self.vsock_socket()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_is_under_the_root_and_vm_files_under_their_vm() {
        let layout = RootLayout::new("/var/lib/ignite");
        let vm = layout.vm("web");
        assert_eq!(vm.path(), Path::new("/var/lib/ignite/vms/web"));
        let files = [
            vm.config(),
            vm.pid(),
            vm.exit_record(),
            vm.jail_record(),
            vm.jail_root(),
            vm.console_log(),
            vm.vmm_log(),
            vm.control_socket(),
            vm.console_socket(),
            vm.vsock_socket(),
        ];
        let mut names: Vec<_> = files.iter().map(|f| f.strip_prefix(vm.path()).unwrap().to_owned()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), files.len(), "no two files share a name");
        let runtime = layout.runtime("web");
        assert_eq!(runtime.path(), Path::new("/var/lib/ignite/runtime/web"));
        let records = [runtime.prepared(), runtime.last_exit(), runtime.config_drive()];
        assert!(records.iter().all(|f| f.parent() == Some(runtime.path())));
        assert_ne!(
            runtime.last_exit().file_name(),
            vm.exit_record().file_name(),
            "the two exit files have different names"
        );
        for dir in [layout.state_db(), layout.sources_dir(), layout.runtime_dir(), layout.daemon_log()] {
            assert_eq!(dir.parent(), Some(layout.root()));
        }
        assert_eq!(layout.store().root(), layout.root());
    }
}
