//! The observed state of a VM. It lives in the controller's store only, never in git.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Accepted, nothing created yet.
    #[default]
    Pending,
    /// Image, disk and network are being prepared.
    Creating,
    /// The VM process is running.
    Running,
    /// Resources exist, no process runs (desired `Stopped`, or ended with restart policy `Never`).
    Stopped,
    /// Creation or start failed; retried with backoff.
    Failed,
    /// Being removed.
    Deleting,
}

/// kstatus-style condition types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ConditionType {
    /// The VM matches its spec and runs (or is stopped as asked).
    Ready,
    /// The controller is working towards the spec.
    Reconciling,
    /// The controller cannot make progress without a change (bad image, failing boot...).
    Stalled,
}

/// Truth value of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// Not known yet.
    Unknown,
}

/// One condition with its reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Which condition.
    #[serde(rename = "type")]
    pub type_: ConditionType,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// A CamelCase machine-readable reason (`ImagePullFailed`, `Booted`...).
    pub reason: String,
    /// A human-readable message.
    #[serde(default)]
    pub message: String,
    /// When the status last changed, RFC 3339.
    pub last_transition_time: String,
}

/// Everything the controller observed about one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    /// Current phase.
    pub phase: Phase,
    /// Ready / Reconciling / Stalled.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The guest's IPv4 address.
    #[serde(default)]
    pub ip: Option<String>,
    /// The guest's MAC address.
    #[serde(default)]
    pub mac: Option<String>,
    /// The source revision (git commit) that last declared this object.
    #[serde(default)]
    pub source_revision: Option<String>,
    /// The source revision (git commit) the running VM was built from.
    #[serde(default)]
    pub observed_revision: Option<String>,
    /// The object generation the running VM was built from.
    #[serde(default)]
    pub observed_generation: u64,
    /// When the current VM process started, RFC 3339.
    #[serde(default)]
    pub boot_time: Option<String>,
    /// How many times the restart policy restarted the VM since its last start that was not a
    /// restart (what `maxRestarts` limits).
    #[serde(default)]
    pub restarts: u32,
    /// The last error, for humans.
    #[serde(default)]
    pub last_error: Option<String>,
    /// The Kubernetes Node the guest registered as (`spec.bootstrap.kubernetes`), found by its
    /// provider ID `ignite://HOST/VM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_ref: Option<String>,
    /// How the main process ended when the restart policy left the VM stopped (`None` while it
    /// runs or restarts, cleared by the next start): what `ignite run` exits with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<LastExit>,
    /// The VMM runs without a jail (the daemon's `--no-jail`, for debugging only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unjailed: bool,
    /// How the guest last started: from a template or by booting its kernel, and why not warm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootStatus>,
}

/// How a VM's guest last started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootStatus {
    /// `warm` (restored from a template) or `cold` (the kernel booted).
    pub mode: String,
    /// The template a warm VM came from.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub template: String,
    /// Why a VM that wanted a warm start booted cold.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// How a VM's main process ended for good (its restart policy did not restart it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastExit {
    /// The exit status of the guest's main process, as ignite-init reported it (power port or
    /// console); `None` when the guest crashed or the VMM failed before any status.
    #[serde(default)]
    pub code: Option<i32>,
    /// The guest or its VMM crashed (triple fault, VMM error, killed).
    #[serde(default)]
    pub crashed: bool,
    /// For humans: `exit status 3`, `triple fault`.
    #[serde(default)]
    pub message: String,
    /// When the controller saw the VM end for good, RFC 3339.
    #[serde(default)]
    pub finished_at: String,
}
