//! The MicroVM controller: a kube-runtime [`Controller`] over the MicroVMs of one namespace (or
//! all), reconciling the ones scheduled to this host through the same store, apply path and
//! reconciler as git.
//!
//! One pass for MicroVM `NS/NAME` ([`reconcile`]):
//! 1. Not ours ([`super::select`]): nothing is written to it; if this host still runs its VM
//!    (it was rescheduled), the VM is removed here.
//! 2. Being deleted and carrying our finalizer: the VM is marked for deletion and the pass polls
//!    until the reconciler removed it and everything it owns; then the deletion hook runs (node
//!    cleanup) and the finalizer is removed. Idempotent and safe to cancel at any point: the
//!    finalizer goes last.
//! 3. Otherwise the finalizer is added (before anything exists on the host), the spec is parsed and
//!    validated like a git manifest (a bad one is `Stalled` with the field path, the previous VM
//!    keeps running), applied as a one-object revision for owner `kube:NS/NAME`, and the store's
//!    status is written back through the status subresource when it changed.
//!
//! A pass runs when the MicroVM changes, when its VM's record changes in the store (a new
//! status, a nodeRef, its removal: [`store_triggers`]), and besides every `poll` while the VM
//! converges or is being removed, every `resync` once settled.
//!
//! API errors never delete anything: a VM is only removed for a MicroVM that carries a
//! `deletionTimestamp` or names another host. A watch that fails is retried with backoff.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, ListParams, Patch, PatchParams};
use ::kube::core::{ApiResource, DynamicObject};
use ::kube::runtime::controller::{Action, Controller};
use ::kube::runtime::reflector::ObjectRef;
use ::kube::runtime::watcher;
use ::kube::{Client, ResourceExt as _};
use futures_util::future::BoxFuture;
use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tracing::{debug, error, info, info_span, warn, Instrument as _};

use super::crd::{MicroVM, FINALIZER, RESOURCE};
use super::errors::KubeError;
use super::select::{self, LabelSelector};
use super::status::MicroVmStatus;
use crate::api::conditions::Summary;
use crate::api::{self, ConditionType, ObjectMeta, Phase, Vm, VmSpec};
use crate::reconcile::{Backoff, WorkQueue};
use crate::source::{apply_revision, ApplyError};
use crate::store::Store;
use guest_api::error_chain;

const STATUS_RESOURCE: &str = "microvms.ignite.dev/status";

/// Settings of the MicroVM controller (`ignite daemon --kube ...`).
#[derive(Clone, Debug)]
pub struct KubeSettings {
    /// Watch this namespace only (`--namespace`); `None`: every namespace.
    pub namespace: Option<String>,
    /// The kubeconfig (`--kubeconfig`); `None`: inferred like kubectl, or in-cluster.
    pub kubeconfig: Option<std::path::PathBuf>,
    /// This host's name (`--kube-host-name`, default the hostname), matched against `spec.host`.
    pub host_name: String,
    /// Which MicroVMs without `spec.host` this host takes (`--kube-selector`).
    pub selector: LabelSelector,
    /// How soon a MicroVM whose VM is still converging is looked at again.
    pub poll: Duration,
    /// How often a settled MicroVM is looked at again.
    pub resync: Duration,
    /// First retry delay after a failed pass or watch; doubles per failure.
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl KubeSettings {
    /// Settings for host `host_name` with the default intervals, every namespace, every MicroVM
    /// without `spec.host`.
    pub fn new(host_name: impl Into<String>) -> Self {
        KubeSettings {
            namespace: None,
            kubeconfig: None,
            host_name: host_name.into(),
            selector: LabelSelector::default(),
            poll: Duration::from_secs(2),
            resync: Duration::from_secs(300),
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(60),
        }
    }
}

/// A MicroVM whose VM is gone from this host, given to the [`DeletionHook`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeletedVm {
    /// The MicroVM's namespace.
    pub namespace: String,
    /// The MicroVM's name.
    pub name: String,
    /// The VM's name on this host.
    pub vm_name: String,
    /// `status.nodeRef` as it was.
    pub node_ref: Option<String>,
}

/// Runs after a MicroVM's VM is gone and before its finalizer is removed (e.g. deleting the Node
/// the guest registered as). An error keeps the finalizer and is retried with backoff.
pub type DeletionHook = Arc<dyn Fn(Client, DeletedVm) -> BoxFuture<'static, Result<(), KubeError>> + Send + Sync>;

/// Shared state of the controller's passes.
pub struct Context {
    /// The Kubernetes client (also for the node bootstrap code).
    pub client: Client,
    /// The controller's store.
    pub store: Store,
    /// The reconciler's queue: VMs whose desired state changed are added to it.
    pub queue: Arc<WorkQueue>,
    /// Settings.
    pub settings: KubeSettings,
    /// Called when a MicroVM's VM is gone, before the finalizer is removed.
    pub on_vm_deleted: Option<DeletionHook>,
    resource: ApiResource,
    backoff: Backoff,
    /// Per MicroVM (`NS/NAME`): the last status this host wrote (see [`shown_status`]).
    written: std::sync::Mutex<HashMap<String, Written>>,
}

impl Context {
    /// A context for `client` over `store`, queueing into `queue`.
    pub fn new(client: Client, store: Store, queue: Arc<WorkQueue>, settings: KubeSettings) -> Self {
        Context {
            backoff: Backoff::new(settings.retry_base, settings.retry_max),
            client,
            store,
            queue,
            settings,
            on_vm_deleted: None,
            resource: ApiResource::erase::<MicroVM>(&()),
            written: Default::default(),
        }
    }

    /// Sets the hook run when a MicroVM's VM is gone.
    pub fn with_deletion_hook(mut self, hook: DeletionHook) -> Self {
        self.on_vm_deleted = Some(hook);
        self
    }

    fn watched_api(&self) -> Api<DynamicObject> {
        match &self.settings.namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &self.resource),
            None => Api::all_with(self.client.clone(), &self.resource),
        }
    }

    fn api(&self, namespace: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), namespace, &self.resource)
    }
}

/// Checks that MicroVMs can be listed: a missing CRD or RBAC denial is a clear error here rather
/// than a watch failing forever.
pub async fn preflight(ctx: &Context) -> Result<(), KubeError> {
    ctx.watched_api()
        .list(&ListParams::default().limit(1))
        .await
        .map(drop)
        .map_err(|e| KubeError::from_api("list", RESOURCE, None, e))
}

/// This host's name as Kubernetes tooling would show it: the kernel's hostname.
pub fn default_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Runs the controller until the task is dropped: preflight (retried with backoff, logging the
/// reason), then the watch. Errors of the watch are logged and retried; nothing is deleted
/// because of them.
pub async fn run(ctx: Arc<Context>) {
    let mut delay = ctx.settings.retry_base;
    loop {
        match preflight(&ctx).await {
            Ok(()) => break,
            Err(err) => {
                error!(error = %error_chain(&err), retry_in = ?delay, "cannot watch MicroVMs");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(ctx.settings.retry_max);
            }
        }
    }
    info!(host = ctx.settings.host_name, namespace = ?ctx.settings.namespace, selector = %ctx.settings.selector, "watching MicroVMs");
    let sweeper = ctx.clone();
    let sweep = tokio::spawn(async move {
        loop {
            match sweep_orphans(&sweeper).await {
                Ok(released) if !released.is_empty() => info!(?released, "removing VMs whose MicroVM is gone"),
                Ok(_) => {}
                Err(err) => warn!(error = %error_chain(&err), "cannot look for VMs whose MicroVM is gone"),
            }
            tokio::time::sleep(sweeper.settings.resync).await;
        }
    });
    // The sweep stops with the controller (this task being dropped or aborted).
    let _sweep = AbortOnDrop(sweep);
    let backoff = TriggerBackoff::new(ctx.settings.retry_base, ctx.settings.retry_max);
    Controller::new_with(ctx.watched_api(), watcher::Config::default(), ctx.resource.clone())
        .trigger_backoff(backoff)
        .reconcile_on(store_triggers(&ctx.store, ctx.resource.clone()))
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            match result {
                Ok((object, action)) => debug!(%object, ?action, "reconciled"),
                Err(::kube::runtime::controller::Error::QueueError(err)) => {
                    warn!(error = %error_chain(&classify_watch(err)), "MicroVM watch failed; retrying")
                }
                // Reported (with its backoff) by the error policy.
                Err(::kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                // A store trigger for a MicroVM that is gone (or not listed yet): nothing to do.
                Err(::kube::runtime::controller::Error::ObjectNotFound(object)) => {
                    debug!(%object, "VM changed for a MicroVM not in the cache")
                }
                Err(err) => warn!(error = %error_chain(&err), "MicroVM controller"),
            }
        })
        .await;
}

/// The MicroVMs whose VM record changed in the store (the reconciler wrote its status, the Node
/// watcher its nodeRef, or it was removed), so each one's status follows its VM at once, also a
/// settled one whose next resync is far away. Removals are mapped through the owners seen before.
fn store_triggers(store: &Store, resource: ApiResource) -> impl futures_util::Stream<Item = ObjectRef<DynamicObject>> {
    // Subscribe before listing, so no change falls between the two.
    let changes = store.watch_vms();
    let owners: HashMap<String, (String, String)> = store
        .list_vms()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| microvm_of(&r.owner).map(|key| (r.vm.metadata.name, key)))
        .collect();
    futures_util::stream::unfold((changes, owners), move |(mut changes, mut owners)| {
        let resource = resource.clone();
        async move {
            loop {
                let change = changes.next_change().await?;
                let key = match &change.record {
                    Some(record) => microvm_of(&record.owner).inspect(|key| {
                        owners.insert(change.name.clone(), key.clone());
                    }),
                    None => owners.remove(&change.name),
                };
                if let Some((namespace, name)) = key {
                    let object = ObjectRef::new_with(&name, resource).within(&namespace);
                    return Some((object, (changes, owners)));
                }
            }
        }
    })
}

fn microvm_of(owner: &str) -> Option<(String, String)> {
    select::parse_owner(owner).map(|(ns, name)| (ns.to_string(), name.to_string()))
}

fn classify_watch(err: watcher::Error) -> KubeError {
    match err {
        watcher::Error::InitialListFailed(e) => KubeError::from_api("list", RESOURCE, None, e),
        watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            KubeError::from_api("watch", RESOURCE, None, e)
        }
        watcher::Error::WatchError(status) => KubeError::from_api("watch", RESOURCE, None, ::kube::Error::Api(status)),
        other => KubeError::Watch(Box::new(other)),
    }
}

/// The error policy: per-object exponential backoff; conflicts and vanished objects are retried
/// at once by the next event.
pub fn error_policy(obj: Arc<DynamicObject>, err: &KubeError, ctx: Arc<Context>) -> Action {
    let key = object_key(&obj);
    let delay = ctx.backoff.next(&key);
    if err.is_not_found_or_conflict() {
        debug!(microvm = key, error = %error_chain(err), "object changed under us; looking again");
        return Action::requeue(ctx.settings.retry_base);
    }
    warn!(microvm = key, error = %error_chain(err), retry_in = ?delay, "MicroVM reconcile failed");
    Action::requeue(delay)
}

fn object_key(obj: &DynamicObject) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}

/// One pass for a MicroVM (see the module docs).
pub async fn reconcile(obj: Arc<DynamicObject>, ctx: Arc<Context>) -> Result<Action, KubeError> {
    let key = object_key(&obj);
    let span = info_span!("kube_reconcile", microvm = %key, generation = ?obj.metadata.generation);
    let result = reconcile_inner(&obj, &ctx).instrument(span).await;
    if result.is_ok() {
        ctx.backoff.reset(&key);
    }
    result
}

async fn reconcile_inner(obj: &DynamicObject, ctx: &Context) -> Result<Action, KubeError> {
    let namespace = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let key = format!("{namespace}/{name}");
    let owner = select::owner(&namespace, &name);
    let vm_name = select::vm_name(&namespace, &name);
    let host = obj.data.pointer("/spec/host").and_then(Value::as_str);
    let ours = select::is_ours(&ctx.settings.host_name, &ctx.settings.selector, host, obj.labels());
    let has_finalizer = obj.finalizers().iter().any(|f| f == FINALIZER);

    if !ours {
        // Someone else's: never written to. A VM this host still runs for it was rescheduled away.
        if release(ctx, &key, &owner)? {
            info!(to = ?host, "rescheduled to another host: removing the VM here");
            return Ok(Action::requeue(ctx.settings.poll));
        }
        return Ok(Action::await_change());
    }
    let api = ctx.api(&namespace);
    let previous = shown_status(ctx, obj, &key);

    if obj.metadata.deletion_timestamp.is_some() {
        if !has_finalizer {
            return Ok(Action::await_change());
        }
        if release(ctx, &key, &owner)? {
            let summary = Summary::new(
                Phase::Deleting,
                ConditionType::Reconciling,
                "Deleting",
                "removing the VM and everything it owns",
            );
            let status = MicroVmStatus::with_summary(previous.as_ref(), &summary, obj.metadata.generation);
            patch_status(ctx, &api, obj, &key, previous.as_ref(), &status).await?;
            return Ok(Action::requeue(ctx.settings.poll));
        }
        if let Some(hook) = &ctx.on_vm_deleted {
            let deleted = DeletedVm {
                namespace: namespace.clone(),
                name: name.clone(),
                vm_name: vm_name.clone(),
                node_ref: previous.as_ref().and_then(|s| s.node_ref.clone()),
            };
            hook(ctx.client.clone(), deleted).await?;
        }
        let remaining: Vec<&String> = obj.finalizers().iter().filter(|f| *f != FINALIZER).collect();
        patch_finalizers(&api, &key, &name, obj, json!(remaining)).await?;
        ctx.written.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
        info!("VM removed; finalizer released");
        return Ok(Action::await_change());
    }

    if !has_finalizer {
        // Before anything exists on the host, so a deletion always comes through us.
        let mut finalizers: Vec<String> = obj.finalizers().to_vec();
        finalizers.push(FINALIZER.to_string());
        patch_finalizers(&api, &key, &name, obj, json!(finalizers)).await?;
        debug!("finalizer added");
    }

    let generation = obj.metadata.generation;
    let vm = match desired_vm(obj, &vm_name) {
        Ok(vm) => vm,
        Err(problems) => {
            let message = problems.iter().map(|(f, m)| format!("{f}: {m}")).collect::<Vec<_>>().join("; ");
            warn!(error = %message, "invalid MicroVM spec; the VM (if any) keeps its previous spec");
            let summary = Summary::new(current_phase(ctx, &vm_name), ConditionType::Stalled, "InvalidSpec", message);
            let status = MicroVmStatus::with_summary(previous.as_ref(), &summary, generation);
            patch_status(ctx, &api, obj, &key, previous.as_ref(), &with_placement(status, ctx, &vm_name)).await?;
            return Ok(Action::await_change());
        }
    };
    let revision = format!("generation {}", generation.unwrap_or_default());
    match apply_revision(&ctx.store, &owner, &revision, &[(key.clone(), vm)]) {
        Ok(report) => report.touched().for_each(|n| ctx.queue.add(n)),
        Err(ApplyError::OwnerConflict { owner: other, .. }) => {
            let message = format!(
                "VM name {vm_name:?} (from namespace and name) is already taken on host {} by {other}: rename this MicroVM or move it to another namespace",
                ctx.settings.host_name
            );
            warn!(error = %message, "name conflict");
            let summary = Summary::new(Phase::Pending, ConditionType::Stalled, "NameConflict", message);
            let status = MicroVmStatus::with_summary(previous.as_ref(), &summary, generation);
            patch_status(ctx, &api, obj, &key, previous.as_ref(), &status).await?;
            // The other object may go away: look again later.
            return Ok(Action::requeue(ctx.settings.resync));
        }
        Err(err @ ApplyError::PortConflict { .. }) => {
            warn!(error = %err, "host port conflict");
            let summary = Summary::new(Phase::Pending, ConditionType::Stalled, "PortConflict", error_chain(&err));
            let status = MicroVmStatus::with_summary(previous.as_ref(), &summary, generation);
            patch_status(ctx, &api, obj, &key, previous.as_ref(), &status).await?;
            // The other VM may give the port up: look again later.
            return Ok(Action::requeue(ctx.settings.resync));
        }
        Err(ApplyError::Store(source)) => return Err(KubeError::Store { object: key, source }),
        Err(err @ ApplyError::Invalid { .. }) => {
            let summary = Summary::new(Phase::Pending, ConditionType::Stalled, "InvalidSpec", error_chain(&err));
            let status = MicroVmStatus::with_summary(previous.as_ref(), &summary, generation);
            patch_status(ctx, &api, obj, &key, previous.as_ref(), &status).await?;
            return Ok(Action::await_change());
        }
    }
    let record = ctx.store.get_vm(&vm_name).map_err(|source| KubeError::Store { object: key.clone(), source })?;
    let Some(record) = record else {
        return Ok(Action::requeue(ctx.settings.poll));
    };
    let host = &ctx.settings.host_name;
    let status = MicroVmStatus::observed(&record.status, generation, host, &vm_name, previous.as_ref());
    patch_status(ctx, &api, obj, &key, previous.as_ref(), &status).await?;
    let settled = status.is_ready() || status.current().is_some_and(|c| c.type_ == ConditionType::Stalled);
    Ok(Action::requeue(if settled { ctx.settings.resync } else { ctx.settings.poll }))
}

/// Releases the VMs of MicroVMs that no longer exist at all (their finalizer was removed by hand,
/// or the daemon was down while the CRD was deleted). Only records stored *before* a complete,
/// successful list are considered, so a MicroVM created meanwhile is never mistaken for a gone
/// one, and a failed list releases nothing. Returns the owners released.
pub async fn sweep_orphans(ctx: &Context) -> Result<Vec<String>, KubeError> {
    let store_err = |source| KubeError::Store { object: "*".into(), source };
    let before: Vec<String> = ctx
        .store
        .list_vms()
        .map_err(store_err)?
        .into_iter()
        .filter(|r| !r.deletion_requested)
        .map(|r| r.owner)
        .filter(|owner| owner.starts_with("kube:"))
        .collect();
    if before.is_empty() {
        return Ok(Vec::new());
    }
    let listed = ctx
        .watched_api()
        .list(&ListParams::default())
        .await
        .map_err(|e| KubeError::from_api("list", RESOURCE, None, e))?;
    let present: std::collections::HashSet<String> =
        listed.items.iter().map(|o| select::owner(&o.namespace().unwrap_or_default(), &o.name_any())).collect();
    let in_scope = |owner: &str| match &ctx.settings.namespace {
        Some(ns) => owner.strip_prefix("kube:").and_then(|o| o.split_once('/')).is_some_and(|(n, _)| n == ns),
        None => true,
    };
    let mut released = Vec::new();
    for owner in before {
        if in_scope(&owner) && !present.contains(&owner) && release(ctx, &owner, &owner)? {
            released.push(owner);
        }
    }
    Ok(released)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Marks every VM `owner` has on this host for deletion and queues it. True while any is left.
fn release(ctx: &Context, key: &str, owner: &str) -> Result<bool, KubeError> {
    let store_err = |source| KubeError::Store { object: key.to_string(), source };
    let records = ctx.store.vms_owned_by(owner).map_err(store_err)?;
    if records.is_empty() {
        return Ok(false);
    }
    match apply_revision(&ctx.store, owner, "deleted", &[]) {
        Ok(_)
        | Err(ApplyError::OwnerConflict { .. } | ApplyError::Invalid { .. } | ApplyError::PortConflict { .. }) => {}
        Err(ApplyError::Store(source)) => return Err(store_err(source)),
    }
    for record in records {
        ctx.queue.add(&record.vm.metadata.name);
    }
    Ok(true)
}

fn previous_status(obj: &DynamicObject) -> Option<MicroVmStatus> {
    obj.data.get("status").and_then(|s| serde_json::from_value(s.clone()).ok())
}

fn current_phase(ctx: &Context, vm_name: &str) -> Phase {
    ctx.store.get_vm(vm_name).ok().flatten().map(|r| r.status.phase).unwrap_or_default()
}

/// Fills in where the VM runs (and its address) from the store, for statuses not built from it.
fn with_placement(mut status: MicroVmStatus, ctx: &Context, vm_name: &str) -> MicroVmStatus {
    status.host = Some(ctx.settings.host_name.clone());
    status.vm_name = Some(vm_name.to_string());
    status.ip = ctx.store.get_vm(vm_name).ok().flatten().and_then(|r| r.status.ip);
    status
}

/// The VM a MicroVM declares, checked like a git manifest; every problem with its field path.
pub fn desired_vm(obj: &DynamicObject, vm_name: &str) -> Result<Vm, Vec<(String, String)>> {
    let mut spec = match obj.data.get("spec") {
        Some(Value::Object(map)) => map.clone(),
        _ => return Err(vec![("spec".into(), "missing: a MicroVM needs a spec with at least an image".into())]),
    };
    match spec.remove("host") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(other) => return Err(vec![("spec.host".into(), format!("must be a host name, found {other}"))]),
    }
    let spec: VmSpec = serde_path_to_error::deserialize(Value::Object(spec)).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "spec".to_string() } else { format!("spec.{path}") };
        vec![(field, e.into_inner().to_string())]
    })?;
    let labels: BTreeMap<String, String> = obj.labels().clone();
    let annotations = obj
        .annotations()
        .iter()
        .filter(|(k, _)| !k.starts_with("kubectl.kubernetes.io/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let vm = Vm {
        api_version: api::API_VERSION.to_string(),
        kind: api::KIND_VM.to_string(),
        metadata: ObjectMeta { name: vm_name.to_string(), labels, annotations },
        spec,
    };
    let problems: Vec<(String, String)> = api::validate::validate(&vm)
        .into_iter()
        .chain(host_path_problems(&vm))
        .map(|(field, message)| {
            if field == "metadata.name" {
                let message = format!(
                    "the VM name on the host, {vm_name:?} (the namespace with each '-' doubled, '-', the name), must be a DNS label of at most 63 characters: shorten the namespace or the name"
                );
                (field, message)
            } else {
                (field, message)
            }
        })
        .collect();
    if problems.is_empty() {
        Ok(vm)
    } else {
        Err(problems)
    }
}

/// A `MicroVM` never names a host file: whoever may create one in some namespace is not the
/// host's operator. Files come inline (`contentBase64`), kernels from the kernel store.
fn host_path_problems(vm: &api::Vm) -> Vec<(String, String)> {
    let refused = "a MicroVM cannot name a file on the host";
    api::host_paths::named_host_paths(vm)
        .into_iter()
        .map(|(field, _)| {
            let instead = if field == "spec.kernel.path" {
                "import the kernel and name it in kernel.image"
            } else {
                "give the content inline with contentBase64"
            };
            (field, format!("{refused}: {instead}"))
        })
        .collect()
}

/// The last status this host wrote to a MicroVM, and the object versions up to that write: the
/// one each write started from and the one it produced.
struct Written {
    status: MicroVmStatus,
    versions: std::collections::VecDeque<String>,
}

/// How many versions [`Written`] remembers per MicroVM.
const WRITTEN_VERSIONS: usize = 16;

/// The status the MicroVM shows: the object's, unless the cached object is a version from before
/// this host's last write (a store trigger can run a pass before the watch brings the write's
/// echo), then what that write set. A version this host did not see is someone else's write, and
/// its status counts.
fn shown_status(ctx: &Context, obj: &DynamicObject, key: &str) -> Option<MicroVmStatus> {
    let written = ctx.written.lock().unwrap_or_else(|p| p.into_inner());
    match (written.get(key), obj.resource_version()) {
        (Some(w), Some(version)) if w.versions.contains(&version) => Some(w.status.clone()),
        _ => previous_status(obj),
    }
}

/// Writes `status` through the status subresource unless it is what the object shows (`shown`,
/// from [`shown_status`]).
async fn patch_status(
    ctx: &Context,
    api: &Api<DynamicObject>,
    obj: &DynamicObject,
    key: &str,
    shown: Option<&MicroVmStatus>,
    status: &MicroVmStatus,
) -> Result<(), KubeError> {
    if shown == Some(status) {
        return Ok(());
    }
    let patch = json!({ "status": status });
    let updated = api
        .patch_status(&obj.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| KubeError::from_api("patch", STATUS_RESOURCE, Some(key.to_string()), e))?;
    let mut written = ctx.written.lock().unwrap_or_else(|p| p.into_inner());
    let entry = written
        .entry(key.to_string())
        .or_insert_with(|| Written { status: status.clone(), versions: Default::default() });
    entry.status = status.clone();
    entry.versions.extend(obj.resource_version().into_iter().chain(updated.resource_version()));
    while entry.versions.len() > WRITTEN_VERSIONS {
        entry.versions.pop_front();
    }
    debug!(phase = ?status.phase, "status written");
    Ok(())
}

/// Replaces the finalizer list, guarded by the object's resourceVersion (a concurrent change is a
/// 409 and the pass runs again).
async fn patch_finalizers(
    api: &Api<DynamicObject>,
    key: &str,
    name: &str,
    obj: &DynamicObject,
    finalizers: Value,
) -> Result<(), KubeError> {
    let patch = json!({ "metadata": { "finalizers": finalizers, "resourceVersion": obj.resource_version() } });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| KubeError::from_api("patch", RESOURCE, Some(key.to_string()), e))?;
    Ok(())
}

/// Exponential backoff of the watch: `base`, doubling to `max`, reset once a watch succeeds.
struct TriggerBackoff {
    base: Duration,
    max: Duration,
    next: Duration,
}

impl TriggerBackoff {
    fn new(base: Duration, max: Duration) -> Self {
        TriggerBackoff { base, max, next: base }
    }
}

impl Iterator for TriggerBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let current = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(current)
    }
}

impl ::kube::runtime::utils::Backoff for TriggerBackoff {
    fn reset(&mut self) {
        self.next = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(name: &str, spec: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "ignite.dev/v1alpha1", "kind": "MicroVM",
            "metadata": {"name": name, "namespace": "prod", "labels": {"pool": "edge"}, "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{...}", "ignite.dev/suspend": "true"}},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn a_microvm_becomes_the_vm_of_its_mapped_name() {
        let vm = desired_vm(&object("web", json!({"image": "busybox", "host": "h1", "memory": "64Mi"})), "prod-web")
            .unwrap();
        assert_eq!((vm.api_version.as_str(), vm.kind.as_str(), vm.name()), ("ignite.dev/v1alpha1", "VM", "prod-web"));
        assert_eq!(vm.spec.memory.bytes(), 64 << 20);
        assert_eq!(vm.metadata.labels.get("pool").map(String::as_str), Some("edge"));
        let annotations: Vec<&String> = vm.metadata.annotations.keys().collect();
        assert_eq!(annotations, ["ignite.dev/suspend"], "kubectl's bookkeeping is dropped, ours kept");
    }

    #[test]
    fn every_problem_names_its_field() {
        let problems = |name: &str, vm_name: &str, spec: Value| desired_vm(&object(name, spec), vm_name).unwrap_err();
        let long = "x".repeat(60);
        let p = problems(&long, &format!("prod-{long}"), json!({"image": "busybox"}));
        assert_eq!(p[0].0, "metadata.name");
        assert!(p[0].1.contains("each '-' doubled") && p[0].1.contains("63"), "{p:?}");
        let p = problems("web", "prod-web", json!({"image": "busybox", "host": 7}));
        assert_eq!(p, [("spec.host".to_string(), "must be a host name, found 7".to_string())]);
        let p = problems("web", "prod-web", json!({"image": "busybox", "network": {"ports": ["80"]}}));
        assert_eq!(p[0].0, "spec.network.ports[0]", "{p:?}");
        let p = problems("web", "prod-web", json!({"memory": "64Mi"}));
        assert!(p[0].0 == "spec" && p[0].1.contains("image"), "{p:?}");
        let p = desired_vm(&serde_json::from_value(json!({"metadata": {"name": "a"}})).unwrap(), "prod-a").unwrap_err();
        assert_eq!(p[0].0, "spec");
    }

    #[test]
    fn a_microvm_never_names_a_host_file() {
        let spec = json!({"image": "busybox", "kernel": {"path": "/boot/vmlinuz"},
            "copyFiles": [{"source": "/etc/shadow", "destination": "/root/shadow"},
                          {"contentBase64": "aGk=", "destination": "/etc/motd"}]});
        let p = desired_vm(&object("web", spec), "prod-web").unwrap_err();
        let fields: Vec<&str> = p.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["spec.copyFiles[0].source", "spec.kernel.path"], "{p:?}");
        assert!(p.iter().all(|(_, m)| m.contains("cannot name a file on the host")), "{p:?}");
        let inline = json!({"image": "busybox", "copyFiles": [{"contentBase64": "aGk=", "destination": "/etc/motd"}]});
        assert!(desired_vm(&object("web", inline), "prod-web").is_ok());
    }
}
