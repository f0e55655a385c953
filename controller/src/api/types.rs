//! The desired-state types of the VM API. Every struct rejects unknown fields; defaults are the
//! ones documented on each field (and in the generated schema under `manifests/`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::quantity::{PortMapping, Quantity};

/// The only API version this controller serves.
pub const API_VERSION: &str = "ignite.dev/v1alpha1";
/// The kind of a VM document.
pub const KIND_VM: &str = "VM";

/// One microVM, as declared by a user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Vm {
    /// Always `ignite.dev/v1alpha1`.
    pub api_version: String,
    /// Always `VM`.
    pub kind: String,
    /// Name, labels and annotations.
    pub metadata: ObjectMeta,
    /// What the VM should be.
    pub spec: VmSpec,
}

/// Identity and free-form metadata of an object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Unique name on this host: a DNS label (lowercase letters, digits, `-`, at most 63 characters).
    pub name: String,
    /// Labels, used for selection.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations, never interpreted by the controller.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The desired state of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VmSpec {
    /// OCI image reference of the root filesystem (e.g. `127.0.0.1:5000/busybox:1.36`).
    pub image: String,
    /// Which kernel boots the VM; defaults to the host's default kernel.
    #[serde(default, skip_serializing_if = "KernelSpec::is_default")]
    pub kernel: KernelSpec,
    /// Number of vCPUs (default 1).
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    /// Guest memory, a quantity such as `512Mi` (default `512Mi`).
    #[serde(default = "default_memory")]
    pub memory: Quantity,
    /// Size of the writable root disk, such as `4Gi` (default `4Gi`).
    #[serde(default = "default_disk_size")]
    pub disk_size: Quantity,
    /// Replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image's cmd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Environment variables added to (or overriding) the image's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Network settings.
    #[serde(default, skip_serializing_if = "NetworkSpec::is_default")]
    pub network: NetworkSpec,
    /// Host files copied into the guest before its entrypoint starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copy_files: Vec<CopyFile>,
    /// SSH access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh: Option<SshSpec>,
    /// What to do when the VM's main process ends (default `Always`).
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// With `restartPolicy: OnFailure` only: how many restarts in a row after failures before the
    /// VM is left stopped (as `docker run --restart on-failure:N`). Counted from the last start
    /// that was not a restart (`status.restarts`). Default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restarts: Option<u32>,
    /// Whether the VM should be running (default `Running`).
    #[serde(default)]
    pub state: DesiredState,
    /// Reserved for Kubernetes nodes: how the guest joins a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapSpec>,
    /// Snapshots taken on a schedule while the VM runs (`ignite snapshot ls` shows them as
    /// `auto-<time>`); only the newest `keep` of them are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<SnapshotSchedule>,
    /// `Warm` (the default): start from a snapshot of an already booted guest (a template) where one
    /// can serve; `Cold`: always boot the kernel. A VM that wanted warm and booted cold (no template
    /// yet, the restore failed) says why in its status and events.
    #[serde(default, skip_serializing_if = "BootMode::is_default")]
    pub boot: BootMode,
}

/// `spec.boot`: how a VM's guest starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum BootMode {
    /// From the template of its kernel and shape when one is built (see `ignite template`), else cold.
    #[default]
    Warm,
    /// Boot the kernel.
    Cold,
}

impl BootMode {
    /// Whether this is the default (`Warm`), left out when a spec is written.
    pub fn is_default(&self) -> bool {
        *self == BootMode::Warm
    }
}

/// `spec.snapshots`: how often a running VM is snapshotted, and how many such snapshots are kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SnapshotSchedule {
    /// The interval, such as `1h`, `30m` or `90s` (at least `10s`).
    pub every: String,
    /// How many scheduled snapshots are kept (1 to 100); the oldest go first. Snapshots taken by
    /// hand are never pruned.
    pub keep: u32,
}

impl SnapshotSchedule {
    /// The shortest interval a schedule may have.
    pub const MIN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
    /// The most scheduled snapshots one VM may keep.
    pub const MAX_KEEP: u32 = 100;

    /// The interval, or why `every` is not one.
    pub fn interval(&self) -> Result<std::time::Duration, String> {
        let every = humantime::parse_duration(&self.every)
            .map_err(|e| format!("{:?} is not a duration such as 1h, 30m or 90s: {e}", self.every))?;
        if every < Self::MIN_EVERY {
            return Err(format!("{:?} is shorter than the shortest interval, 10s", self.every));
        }
        Ok(every)
    }
}

fn default_cpus() -> u8 {
    1
}
fn default_memory() -> Quantity {
    Quantity::from_bytes(512 << 20)
}
fn default_disk_size() -> Quantity {
    Quantity::from_bytes(4 << 30)
}

/// Which kernel boots the VM: an OCI kernel image or a file on the host, and its command line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KernelSpec {
    /// A kernel imported into the store (`ignite kernel import`), by name, or an OCI image holding one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// A kernel file on the host (absolute path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Extra kernel command-line arguments, appended to the controller's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

impl KernelSpec {
    fn is_default(&self) -> bool {
        self == &KernelSpec::default()
    }
}

/// One environment variable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EnvVar {
    /// Variable name.
    pub name: String,
    /// Value (may be empty).
    #[serde(default)]
    pub value: String,
}

/// Network settings of a VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkSpec {
    /// Ports forwarded from the host to the guest, `"HOST:GUEST[/tcp|udp]"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
}

impl NetworkSpec {
    fn is_default(&self) -> bool {
        self.ports.is_empty()
    }
}

/// A file written into the guest at boot: a host file (`source`) or inline content
/// (`contentBase64`), exactly one of the two.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CopyFile {
    /// Absolute path of a file on the host, under a directory the host's operator allowed
    /// (`ignite daemon --allow-host-path`); read when the VM is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
    /// The content itself, base64 (what `ignite run --copy-files` sends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_base64: Option<String>,
    /// Permission bits in octal, e.g. `"0755"` (default: the host file's, or `0644` for content).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Absolute path inside the guest.
    pub destination: String,
}

impl CopyFile {
    /// The permission bits `mode` names, if it is valid octal up to `7777`.
    pub fn parsed_mode(&self) -> Option<Result<u32, String>> {
        let mode = self.mode.as_deref()?;
        Some(
            u32::from_str_radix(mode.strip_prefix("0o").unwrap_or(mode), 8)
                .ok()
                .filter(|m| *m <= 0o7777 && !mode.is_empty())
                .ok_or_else(|| format!("{mode:?} is not a file mode: use octal like \"0644\" or \"0755\"")),
        )
    }
}

/// SSH access to the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SshSpec {
    /// Public keys written to root's `authorized_keys`.
    #[serde(default)]
    pub authorized_keys: Vec<String>,
}

/// What the supervisor does when a VM's main process ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum RestartPolicy {
    /// Restart whatever the exit status.
    #[default]
    Always,
    /// Restart only after a non-zero exit status or a crash.
    OnFailure,
    /// Never restart.
    Never,
}

/// Whether the VM should run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum DesiredState {
    /// The VM should be running.
    #[default]
    Running,
    /// The VM should exist (disk, network lease) but not run.
    Stopped,
}

/// How a VM joins a cluster when it boots (issue "Kubernetes").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BootstrapSpec {
    /// Join a Kubernetes cluster with kubeadm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesBootstrap>,
}

/// kubeadm join parameters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubernetesBootstrap {
    /// API server endpoint, `host:port`.
    pub api_server_endpoint: String,
    /// CA certificate hash, `sha256:<hex>`.
    pub ca_cert_hash: String,
    /// Name of a Secret in `kube-system` holding a bootstrap token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_ref: Option<String>,
    /// Let the controller create a bootstrap token.
    #[serde(default)]
    pub create_token: bool,
}

impl Vm {
    /// The object's name.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }
}

impl VmSpec {
    /// A digest of everything that shapes the VM as built: image, kernel, sizes, command,
    /// environment, network, files, keys and bootstrap. `state`, `restartPolicy`, `maxRestarts`,
    /// `snapshots` and `boot` are left out: changing them stops, starts or restarts the VM (or changes
    /// its snapshot schedule) without rebuilding it. A VM whose fingerprint changed is recreated.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest as _;
        let mut shaped = self.clone();
        shaped.state = DesiredState::default();
        shaped.restart_policy = RestartPolicy::default();
        shaped.max_restarts = None;
        shaped.snapshots = None;
        shaped.boot = BootMode::default();
        let json = serde_json::to_vec(&shaped).expect("a VM spec serializes to JSON");
        hex::encode(sha2::Sha256::digest(json))
    }

    /// Whether going from `self` to `other` needs the VM to be rebuilt (see [`VmSpec::fingerprint`]).
    pub fn needs_recreate(&self, other: &VmSpec) -> bool {
        self.fingerprint() != other.fingerprint()
    }
}
