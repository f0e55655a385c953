//! The controller process (`ignite daemon`): opens the store, recovers what a previous run left
//! (disks, VM processes, taps), starts the reconciler's workers, follows the sources and the
//! supervisor's exit notifications, and stops cleanly on request. VMs keep running when the
//! daemon stops; the next daemon re-adopts them.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::api::conditions::now_rfc3339;
use crate::host::{HostConfig, HostRuntime};
use crate::layout::RootLayout;
use crate::net::{HostNet, LinuxHostNet};
use crate::reconcile::{Reconciler, ReconcilerConfig, Runtime};
use crate::source::{self, SourceSpec, SyncOutcome};
use crate::source::{apply_revision, parse_revision, ApplyError};
use crate::store::{Event, EventKind, SourceState, Store, StoreError};
use crate::supervisor::{Supervisor, SupervisorConfig};
use guest_api::error_chain;

/// Everything `ignite daemon` needs.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The ignite root (`--root`).
    pub root: PathBuf,
    /// Where desired state comes from (git repositories, directories).
    pub sources: Vec<SourceSpec>,
    /// The real runtime's settings.
    pub host: HostConfig,
    /// Reconciler tunables.
    pub reconciler: ReconcilerConfig,
    /// The `ignite` binary that runs each VM (`ignite vmm run --config`).
    pub ignite_bin: PathBuf,
    /// How VMM processes are jailed, and their log caps.
    pub vmm: VmmPolicy,
    /// Where the gRPC API listens (`None`: no API).
    pub socket: Option<PathBuf>,
    /// The API over TCP with mutual TLS too (`--listen`), next to `socket` (ignored without it).
    pub tcp: Option<TcpApi>,
    /// Kubernetes (`--kube`): the node bootstrap's tokens and Nodes, and the MicroVMs of the cluster.
    pub kube: Option<DaemonKube>,
}

/// How the daemon works with a Kubernetes cluster (`ignite daemon --kube`).
#[derive(Clone)]
pub struct DaemonKube {
    /// This host's name, its MicroVM selection and the kubeconfig to connect with.
    pub settings: crate::kube::KubeSettings,
    /// Lifetime of created bootstrap tokens (`None`: the default).
    pub token_ttl: Option<std::time::Duration>,
    /// Which VMs may have a bootstrap token.
    pub scope: crate::kube::scope::BootstrapScope,
    /// Run the MicroVMs scheduled to this host (the MicroVM controller); without it the cluster only
    /// serves `spec.bootstrap.kubernetes`.
    pub microvms: bool,
    /// A client already connected (a test's scripted API server); `None`: connect with
    /// `settings.kubeconfig`.
    pub client: Option<::kube::Client>,
}

impl std::fmt::Debug for DaemonKube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonKube")
            .field("host", &self.settings.host_name)
            .field("microvms", &self.microvms)
            .finish_non_exhaustive()
    }
}

/// How the daemon runs VMM processes.
#[derive(Clone, Debug)]
pub struct VmmPolicy {
    /// The jail (`None`: `--no-jail`).
    pub jail: Option<crate::supervisor::JailPolicy>,
    /// The cap on each VM's console and VMM logs.
    pub log_max_bytes: u64,
}

impl Default for VmmPolicy {
    fn default() -> Self {
        VmmPolicy {
            jail: Some(crate::supervisor::JailPolicy::default()),
            log_max_bytes: crate::supervisor::DEFAULT_LOG_MAX_BYTES,
        }
    }
}

/// The API on a TCP address, with mutual TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpApi {
    /// Address and port (port 0: any free port, see [`Daemon::tcp_addr`]).
    pub addr: std::net::SocketAddr,
    /// The daemon's certificate and the CA of its clients.
    pub tls: crate::grpc::tls::ServerTls,
}

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The store could not be opened (another daemon may be running on the same root).
    #[error("opening the state store under {root}")]
    Store {
        /// The root.
        root: PathBuf,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// The root could not be created or made private (0700).
    #[error("making the root {root} private (mode 0700)")]
    Root {
        /// The root.
        root: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The snapshotter could not be chosen or recovered.
    #[error("preparing the disk snapshotter")]
    Snapshotter(#[source] image_store::SnapshotError),
    /// The supervisor could not start or adopt VM processes.
    #[error("re-adopting VM processes under {0}")]
    Supervisor(PathBuf, #[source] crate::supervisor::SupervisorError),
    /// The reconciler failed at start-up.
    #[error("queueing the fleet")]
    Reconcile(#[from] crate::reconcile::ReconcileError),
    /// The API socket could not be served.
    #[error("serving the API on {0}")]
    Api(PathBuf, #[source] std::io::Error),
    /// The API could not be served over TCP.
    #[error("serving the API over TCP with TLS")]
    ApiTcp(#[source] crate::grpc::tls::TlsError),
    /// Kubernetes could not be reached (`--kube`).
    #[error("connecting to Kubernetes (--kube)")]
    Kube(#[source] crate::kube::KubeError),
}

/// A running daemon: the reconciler with its workers, and the background tasks.
pub struct Daemon {
    store: Store,
    reconciler: Reconciler,
    runtime: Arc<HostRuntime>,
    /// The reconciler's worker threads; the health task watches that they all run.
    workers: Arc<std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>>,
    health: crate::grpc::standard::Health,
    health_task: Option<tokio::task::JoinHandle<()>>,
    triggers: Vec<(String, mpsc::Sender<()>)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    api_stop: Vec<tokio::sync::oneshot::Sender<()>>,
    tcp_addr: Option<std::net::SocketAddr>,
}

impl Daemon {
    /// Recovers and starts everything. Must run inside a tokio runtime.
    pub async fn start(config: DaemonConfig) -> Result<Daemon, DaemonError> {
        crate::private::secure_root(&config.root)
            .map_err(|source| DaemonError::Root { root: config.root.clone(), source })?;
        let store =
            Store::open(&config.root).map_err(|source| DaemonError::Store { root: config.root.clone(), source })?;
        let layout = RootLayout::new(&config.root);
        let paths = layout.store();
        // Opening the blob store sweeps what a crashed daemon left half-written or half-unpacked in tmp/.
        if let Err(e) = image_store::ContentStore::open(&paths) {
            warn!(error = %e, "could not sweep the image store's temp files");
        }
        let snapshotter =
            image_store::choose_snapshotter(&paths, None, &config.host.dm_pool).map_err(DaemonError::Snapshotter)?;
        let snapshotter_name = snapshotter.name().to_string();
        let recovered = snapshotter.recover().map_err(DaemonError::Snapshotter)?;
        if !recovered.removed.is_empty() {
            info!(removed = ?recovered.removed, "removed half-made disks left by a crash");
        }
        let run_dir = layout.vms_dir();
        // Template builds get their own supervisor and the last uids of the jail range.
        let (vm_jail, template_jail) = match &config.vmm.jail {
            Some(policy) => match policy.split_off(crate::host::templates::TEMPLATE_UIDS) {
                Some((vms, templates)) => (Some(vms), Some(templates)),
                None => (Some(policy.clone()), None),
            },
            None => (None, None),
        };
        let warm_start = match (config.host.warm_start, &config.host.init_bin, &template_jail) {
            (false, ..) => false,
            (true, None, _) => {
                warn!("no ignite-init binary (--init): every VM boots cold, templates need it");
                false
            }
            (true, Some(_), None) if vm_jail.is_some() => {
                warn!("the jail's uid range is too small to spare uids for templates: every VM boots cold");
                false
            }
            _ => true,
        };
        let template_supervisor = if !warm_start {
            None
        } else {
            let run_dir = layout.templates().run_dir();
            let supervisor = Supervisor::new(SupervisorConfig {
                run_dir: run_dir.clone(),
                ignite_bin: config.ignite_bin.clone(),
                jail: template_jail,
                log_max_bytes: config.vmm.log_max_bytes,
            })
            .map_err(|e| DaemonError::Supervisor(run_dir, e))?;
            Some(supervisor)
        };
        let supervisor = Supervisor::new(SupervisorConfig {
            run_dir: run_dir.clone(),
            ignite_bin: config.ignite_bin.clone(),
            jail: vm_jail,
            log_max_bytes: config.vmm.log_max_bytes,
        })
        .map_err(|e| DaemonError::Supervisor(run_dir.clone(), e))?;
        let vmm_jail =
            crate::grpc::VmmJailInfo { jailed: supervisor.jailed(), cgroups: supervisor.cgroups().map(|c| c.version) };
        match (supervisor.jailed(), supervisor.cgroups()) {
            (false, _) => warn!("VMMs run without a jail (--no-jail): a guest escaping into its VMM owns the host"),
            (true, Some(cgroups)) => info!(cgroups = %cgroups.version, "VMMs run jailed"),
            (true, None) => warn!("VMMs run jailed but without cgroup limits: no usable cgroups"),
        }
        let adopted = supervisor.adopt().map_err(|e| DaemonError::Supervisor(run_dir.clone(), e))?;
        info!(adopted = adopted.adopted.len(), exited = adopted.exited.len(), "re-adopted VM processes");
        let exits = supervisor.exits().expect("a new supervisor has its exit stream");
        let net: Arc<dyn HostNet> = Arc::new(LinuxHostNet::new());
        // One client serves the node bootstrap (`spec.bootstrap.kubernetes`) and the MicroVMs.
        let kube = match &config.kube {
            Some(k) => {
                let client = match &k.client {
                    Some(client) => client.clone(),
                    None => crate::kube::client::connect(k.settings.kubeconfig.as_deref())
                        .await
                        .map_err(DaemonError::Kube)?,
                };
                let mut access = crate::kube::access::KubeAccess::new(client.clone(), k.settings.host_name.clone());
                access.token_ttl = k.token_ttl.unwrap_or(access.token_ttl);
                access.scope = k.scope.clone();
                Some((access, client))
            }
            None => None,
        };
        let templates = template_supervisor.map(|supervisor| {
            let bridge = config.host.net.as_ref().map(|n| n.bridge.clone());
            let templates = crate::host::templates::Templates::new(
                layout.templates(),
                config.host.init_bin.clone(),
                supervisor,
                net.clone(),
                bridge,
            );
            for removed in templates.sweep() {
                info!(removed, "removed what a template build left");
            }
            Arc::new(templates)
        });
        let mut host_runtime =
            HostRuntime::new(layout.clone(), config.host.clone(), store.clone(), snapshotter, net, supervisor);
        if let Some(templates) = templates {
            host_runtime = host_runtime.with_templates(templates);
        }
        if let Some((access, _)) = &kube {
            host_runtime = host_runtime.with_kube(access.clone());
        }
        let runtime = Arc::new(host_runtime);
        // VMs that ended while no daemon watched: their exits count for the restart policy.
        for exit in &adopted.exited {
            runtime.record_exit(exit);
        }
        for name in &adopted.stale {
            runtime.record_exit(&crate::supervisor::VmExit {
                name: name.clone(),
                reason: vmm_core::ExitReason::Crash {
                    detail: "the VM process was gone when the daemon started".into(),
                },
                code: None,
                signal: None,
                console_tail: String::new(),
            });
        }
        let known: Vec<String> = store
            .list_vms()
            .map_err(|source| DaemonError::Store { root: config.root.clone(), source })?
            .into_iter()
            .map(|r| r.vm.metadata.name)
            .collect();
        for removed in runtime.sweep_network_orphans(&known) {
            info!(removed, "removed a network orphan");
        }
        for removed in runtime.sweep_snapshot_leftovers() {
            info!(removed, "removed what a crash left");
        }

        let reconciler = Reconciler::new(store.clone(), runtime.clone() as Arc<dyn Runtime>, config.reconciler.clone());
        let queued = reconciler.enqueue_all()?;
        info!(queued, "reconciling the fleet");
        let workers = Arc::new(std::sync::Mutex::new(reconciler.spawn_workers()));

        let mut daemon = Daemon {
            store,
            reconciler,
            runtime,
            workers,
            health: crate::grpc::standard::Health::new().await,
            health_task: None,
            triggers: Vec::new(),
            tasks: Vec::new(),
            api_stop: Vec::new(),
            tcp_addr: None,
        };
        daemon.watch_exits(exits);
        daemon.schedule_snapshots();
        daemon.health_task =
            Some(tokio::spawn(keep_health(daemon.health.clone(), daemon.store.clone(), daemon.workers.clone())));
        if let (Some((access, client)), Some(k)) = (kube, &config.kube) {
            info!(host = access.host, "watching Kubernetes Nodes for the VMs' nodeRef");
            daemon.tasks.push(tokio::spawn(crate::kube::nodes::watch_nodes(access, daemon.store.clone())));
            if k.microvms {
                let queue = daemon.reconciler.queue().clone();
                let ctx = crate::kube::Context::new(client, daemon.store.clone(), queue, k.settings.clone());
                info!(host = k.settings.host_name, "running the MicroVMs scheduled to this host");
                daemon.tasks.push(tokio::spawn(crate::kube::controller::run(Arc::new(ctx))));
            }
        }
        let configured: Vec<&str> = config.sources.iter().map(|s| s.name.as_str()).collect();
        match daemon.store.retain_source_states(&configured) {
            Ok(forgotten) if !forgotten.is_empty() => info!(?forgotten, "forgot sources no longer configured"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot forget the sources no longer configured"),
        }
        for spec in config.sources {
            daemon.follow(spec, &config.root, &config.host.policy);
        }
        if let Some(socket) = &config.socket {
            let state = crate::grpc::ApiState {
                store: daemon.store.clone(),
                queue: daemon.reconciler.queue().clone(),
                root: config.root.clone(),
                triggers: daemon.triggers.clone(),
                images: paths.clone(),
                insecure_registries: config.host.insecure_registries,
                snapshotter: snapshotter_name,
                vmm_jail,
                runtime: Some(daemon.runtime.clone() as Arc<dyn Runtime>),
                snapshots: Some(daemon.runtime.clone() as Arc<dyn crate::host::snapshots::VmSnapshots>),
                templates: Some(daemon.runtime.clone() as Arc<dyn crate::host::templates::TemplateOps>),
                health: daemon.health.clone(),
                policy: config.host.policy.clone(),
                local_clients: true,
            };
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = crate::grpc::serve(socket, state.clone(), async move {
                let _ = stopped.await;
            })
            .await
            .map_err(|e| DaemonError::Api(socket.clone(), e))?;
            daemon.tasks.push(server);
            daemon.api_stop.push(stop);
            info!(socket = %socket.display(), "API listening");
            if let Some(tcp) = &config.tcp {
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let (addr, server) = crate::grpc::serve_tcp(tcp.addr, &tcp.tls, state, async move {
                    let _ = stopped.await;
                })
                .await
                .map_err(DaemonError::ApiTcp)?;
                daemon.tasks.push(server);
                daemon.api_stop.push(stop);
                daemon.tcp_addr = Some(addr);
                info!(%addr, "API listening over TCP with mutual TLS");
            }
        }
        Ok(daemon)
    }

    /// The TCP address the API listens on, when it does (`--listen`).
    pub fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        self.tcp_addr
    }

    /// The store (status, events).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The reconciler (queue, suspend/resume).
    pub fn reconciler(&self) -> &Reconciler {
        &self.reconciler
    }

    /// Asks the source `name` to sync now. False if there is no such source.
    pub async fn trigger(&self, name: &str) -> bool {
        match self.triggers.iter().find(|(n, _)| n == name) {
            Some((_, tx)) => tx.send(()).await.is_ok(),
            None => false,
        }
    }

    /// Records every VM process exit and queues the VM, so its restart policy is applied.
    fn watch_exits(&mut self, mut exits: tokio::sync::mpsc::UnboundedReceiver<crate::supervisor::VmExit>) {
        let queue = self.reconciler.queue().clone();
        let store = self.store.clone();
        let runtime = self.runtime.clone();
        self.tasks.push(tokio::spawn(async move {
            while let Some(exit) = exits.recv().await {
                let Some(summary) = runtime.record_exit(&exit) else { continue };
                let kind = if summary.succeeded() { EventKind::Normal } else { EventKind::Warning };
                record(&store, &exit.name, kind, "Exited", &summary.detail);
                queue.add(&exit.name);
            }
        }));
    }

    /// Takes the snapshots `spec.snapshots` schedules ([`crate::host::schedule`]).
    fn schedule_snapshots(&mut self) {
        let store = self.store.clone();
        let runtime = self.runtime.clone();
        self.tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(crate::host::schedule::TICK).await;
                let (store, runtime) = (store.clone(), runtime.clone());
                let pass = tokio::task::spawn_blocking(move || {
                    let running = |vm: &str| runtime.supervisor().is_running(vm);
                    let events = crate::host::schedule::run_once(
                        &store,
                        runtime.as_ref(),
                        &running,
                        std::time::SystemTime::now(),
                    );
                    for event in &events {
                        if let Err(e) = store.append_event(event) {
                            warn!(vm = event.object, error = %e, "cannot record an event");
                        }
                    }
                });
                if let Err(e) = pass.await {
                    error!(error = %e, "the snapshot schedule pass failed");
                }
            }
        }));
    }

    fn follow(&mut self, spec: SourceSpec, root: &std::path::Path, policy: &crate::api::HostPolicy) {
        let (trigger_tx, trigger_rx) = mpsc::channel(4);
        self.triggers.push((spec.name.clone(), trigger_tx));
        let source = match source::open(&spec, &RootLayout::new(root).sources_dir()) {
            Ok(source) => source,
            Err(e) => {
                error!(source = spec.name, error = %error_chain(&e), "cannot open source");
                return;
            }
        };
        let mut outcomes = source::spawn_poller(source, spec.interval(), trigger_rx);
        let store = self.store.clone();
        let reconciler = self.reconciler.clone();
        let policy = policy.clone();
        self.tasks.push(tokio::spawn(async move {
            while let Some(outcome) = outcomes.recv().await {
                let store = store.clone();
                let reconciler = reconciler.clone();
                let spec = spec.clone();
                let policy = policy.clone();
                let handled =
                    tokio::task::spawn_blocking(move || handle_sync(&store, &reconciler, &spec, &policy, outcome))
                        .await;
                if let Err(e) = handled {
                    error!(error = %e, "source handler panicked");
                }
            }
        }));
    }

    /// Stops the workers and background tasks; VMs keep running.
    pub async fn shutdown(mut self) {
        if let Some(task) = self.health_task.take() {
            task.abort();
        }
        self.health.set(false).await;
        for stop in self.api_stop.drain(..) {
            let _ = stop.send(());
        }
        self.reconciler.queue().shut_down();
        for task in &self.tasks {
            task.abort();
        }
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = tokio::task::spawn_blocking(move || workers.into_iter().for_each(|w| drop(w.join()))).await;
        if let Err(e) = self.store.flush() {
            warn!(error = %e, "flushing the store");
        }
        info!("daemon stopped; VMs keep running and will be re-adopted");
    }
}

/// Keeps the health service current: SERVING while the store answers and every reconciler worker
/// runs, NOT_SERVING otherwise (a worker that panicked, a store that fails).
async fn keep_health(
    health: crate::grpc::standard::Health,
    store: Store,
    workers: Arc<std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>>,
) {
    let mut reported = None;
    loop {
        let workers_run = {
            let workers = workers.lock().unwrap_or_else(|e| e.into_inner());
            !workers.is_empty() && workers.iter().all(|w| !w.is_finished())
        };
        let serving = workers_run && store.revision().is_ok();
        if reported != Some(serving) {
            if !serving {
                warn!(workers_run, "the daemon is not serving: its health check says NOT_SERVING");
            }
            health.set(serving).await;
            reported = Some(serving);
        }
        tokio::time::sleep(crate::grpc::standard::HEALTH_INTERVAL).await;
    }
}

/// Applies one sync outcome: a valid new revision is applied and its objects queued; an invalid
/// revision or a fetch error is recorded on the source (and as an event) and changes nothing.
pub fn handle_sync(
    store: &Store,
    reconciler: &Reconciler,
    spec: &SourceSpec,
    policy: &crate::api::HostPolicy,
    outcome: SyncOutcome,
) {
    let owner = spec.owner();
    let mut state = store.get_source_state(&spec.name).ok().flatten().unwrap_or_else(|| SourceState {
        name: spec.name.clone(),
        url: spec.display_url(),
        ..Default::default()
    });
    state.last_sync = Some(now_rfc3339());
    let result = match outcome {
        SyncOutcome::Changed(snapshot) => {
            let files = snapshot.files.iter().map(|f| (f.path.as_str(), f.text.as_str()));
            parse_revision(&snapshot.revision, files, policy)
                .and_then(|docs| apply_revision(store, &owner, &snapshot.revision, &docs))
                .map(|report| (snapshot.revision.clone(), report))
                .map_err(|e| apply_error_message(&e))
        }
        SyncOutcome::Failed(e) => Err(error_chain(&e)),
    };
    match result {
        Ok((revision, report)) => {
            for name in report.touched() {
                reconciler.queue().add(name);
            }
            let message = format!(
                "applied {revision}: {} created, {} updated, {} pruned",
                report.created.len(),
                report.updated.len(),
                report.pruned.len()
            );
            info!(source = spec.name, "{message}");
            record(store, &format!("source/{}", spec.name), EventKind::Normal, "Applied", &message);
            state.revision = Some(revision);
            state.last_error = None;
        }
        Err(message) => {
            warn!(source = spec.name, error = %message, "source not applied");
            record(store, &format!("source/{}", spec.name), EventKind::Warning, "SyncFailed", &message);
            state.last_error = Some(message);
        }
    }
    if let Err(e) = store.put_source_state(&state) {
        warn!(error = %e, "cannot record the source state");
    }
}

fn apply_error_message(e: &ApplyError) -> String {
    error_chain(e)
}

fn record(store: &Store, object: &str, kind: EventKind, reason: &str, message: &str) {
    let event = Event {
        object: object.to_string(),
        kind,
        reason: reason.to_string(),
        message: message.to_string(),
        time: now_rfc3339(),
    };
    if let Err(e) = store.append_event(&event) {
        warn!(error = %e, "cannot record an event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn health_is_serving_only_while_every_worker_runs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let health = crate::grpc::standard::Health::new().await;
        assert!(!health.serving().await, "a new health service starts NOT_SERVING");
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            let _ = stopped.recv();
        });
        let workers = Arc::new(std::sync::Mutex::new(vec![worker]));
        let task = tokio::spawn(keep_health(health.clone(), store, workers));
        let wait_for = |want: bool| {
            let health = health.clone();
            async move {
                for _ in 0..100 {
                    if health.serving().await == want {
                        return true;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                false
            }
        };
        assert!(wait_for(true).await, "SERVING while the worker runs");
        drop(stop); // the worker ends, as a panicked one would
        assert!(wait_for(false).await, "NOT_SERVING once a worker is gone");
        task.abort();
    }
}
