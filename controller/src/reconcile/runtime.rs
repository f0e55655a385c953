//! The seam between the reconciler and the host: everything that creates, runs or removes a VM's
//! resources. The real implementation ([`crate::host`]) drives the image store, host networking and
//! the supervisor; [`super::fake::FakeRuntime`] records calls for fast tests of the logic.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::api::Vm;

/// How a VM's main process ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Exit {
    /// The exit status the guest reported (power port or console), or the VMM's own status.
    pub code: Option<i32>,
    /// The guest or the VMM crashed (triple fault, VMM error, killed).
    pub crashed: bool,
    /// A human-readable description (`exit status 3`, `killed by SIGKILL`, `triple fault`).
    pub detail: String,
}

impl Exit {
    /// A clean exit: status 0 and no crash.
    pub fn succeeded(&self) -> bool {
        !self.crashed && self.code == Some(0)
    }
}

/// What exists on the host for one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Actual {
    /// The VM is prepared (disk, network, config) from the spec with this fingerprint.
    pub prepared: Option<String>,
    /// Its VMM process is alive.
    pub running: bool,
    /// How the last process ended, if it ended on its own since the last start.
    pub last_exit: Option<Exit>,
    /// Resources found without a complete VM (a tap, a disk, a lease, a run directory): a crash
    /// left them behind and a delete must remove them.
    pub leftovers: Vec<String>,
}

impl Actual {
    /// Nothing at all exists for this VM.
    pub fn is_empty(&self) -> bool {
        self.prepared.is_none() && !self.running && self.leftovers.is_empty()
    }
}

/// What a successful create produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prepared {
    /// The guest's IPv4 address.
    pub ip: Option<String>,
    /// The guest's MAC address.
    pub mac: Option<String>,
    /// Digest the image reference resolved to.
    pub image_digest: Option<String>,
}

/// What a successful start produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Started {
    /// The VMM process id.
    pub pid: u32,
    /// Whether the VMM runs jailed (`false` only with the daemon's `--no-jail`).
    pub jailed: bool,
    /// How the guest started.
    pub boot: crate::api::BootStatus,
}

/// Why a runtime step failed. `reason` is a CamelCase word for conditions and events; the message
/// names the object and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RuntimeError {
    /// CamelCase reason (`ImagePullFailed`, `DiskFailed`, `NetworkFailed`, `StartFailed`...).
    pub reason: &'static str,
    /// Precise, user-facing description.
    pub message: String,
    /// Retrying cannot help without a change to the spec or the host (bad reference, missing kernel).
    pub permanent: bool,
}

impl RuntimeError {
    /// A failure that may go away by itself (registry down, a busy device).
    pub fn transient(reason: &'static str, message: impl Into<String>) -> Self {
        RuntimeError { reason, message: message.into(), permanent: false }
    }
    /// A failure that needs a change to the spec or the host.
    pub fn permanent(reason: &'static str, message: impl Into<String>) -> Self {
        RuntimeError { reason, message: message.into(), permanent: true }
    }
}

/// Host operations for VMs. Every method is idempotent and safe to call again after a crash at
/// any point inside it: the reconciler retries until the host matches.
pub trait Runtime: Send + Sync {
    /// What exists for `name` on the host.
    fn inspect(&self, name: &str) -> Result<Actual, RuntimeError>;
    /// Prepares everything except the process: image, kernel, disk, network lease and tap,
    /// port forwards, config drive. Records `fingerprint` so [`Runtime::inspect`] can report it.
    fn create(&self, vm: &Vm, fingerprint: &str) -> Result<Prepared, RuntimeError>;
    /// Starts the VMM process of a prepared VM (clearing any recorded exit).
    fn start(&self, vm: &Vm) -> Result<Started, RuntimeError>;
    /// Stops the VM's process: graceful within `grace`, then forced. Keeps its resources.
    fn stop(&self, name: &str, grace: Duration) -> Result<(), RuntimeError>;
    /// Forgets how the VM's last process ended (its console log stays until the next start), so
    /// [`Runtime::inspect`] reports no `last_exit`. For a VM that is not running.
    fn forget_exit(&self, name: &str) -> Result<(), RuntimeError>;
    /// Removes everything the VM owns except its IP/MAC lease when `keep_lease` (a recreate keeps
    /// the address): process, disk, tap, port forwards, config drive, run directory.
    fn destroy(&self, name: &str, keep_lease: bool) -> Result<(), RuntimeError>;
    /// Every VM name with anything on the host (processes, disks, taps, leases, run directories),
    /// so resources whose object is gone can be found after a crash.
    fn list(&self) -> Result<Vec<String>, RuntimeError>;
}
