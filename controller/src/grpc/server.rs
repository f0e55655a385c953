//! The gRPC services over the store, the reconciler's queue and the sources' triggers.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert;
use super::proto::{
    self, events_server, host_server, images_server, kernels_server, snapshots_server, sources_server,
    templates_server, vms_server,
};
use crate::layout::RootLayout;
use crate::reconcile::{Runtime, WorkQueue};
use crate::source::{apply_objects, parse_revision, ApplyError};
use crate::store::{Store, StoreError, VmChange};
use guest_api::error_chain;

/// Everything the API serves from. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    /// The state store.
    pub store: Store,
    /// The reconciler's queue: applied and deleted objects are queued at once.
    pub queue: Arc<WorkQueue>,
    /// The ignite root (see [`ApiState::layout`]).
    pub root: PathBuf,
    /// On-demand sync triggers of the sources, by name.
    pub triggers: Vec<(String, mpsc::Sender<()>)>,
    /// The image store (images and kernels).
    pub images: image_store::StorePaths,
    /// Pull every image over plain HTTP.
    pub insecure_registries: bool,
    /// How VM disks are made (`devicemapper`, `reflink`, `copy`).
    pub snapshotter: String,
    /// How VMM processes run, for `Host.Info`: jailed or not, and the cgroup version.
    pub vmm_jail: VmmJailInfo,
    /// The runtime, for `Kill` (`None`: killing is refused as unavailable).
    pub runtime: Option<Arc<dyn Runtime>>,
    /// VM snapshots, for the Snapshots service (`None`: refused as unavailable).
    pub snapshots: Option<Arc<dyn crate::host::snapshots::VmSnapshots>>,
    /// Warm-start templates, for the Templates service (`None`: refused as unavailable).
    pub templates: Option<Arc<dyn crate::host::templates::TemplateOps>>,
    /// What the standard health service reports (the daemon keeps it current).
    pub health: super::standard::Health,
    /// What applied manifests may name on this host (files, ports).
    pub policy: crate::api::HostPolicy,
    /// Whether clients may name any path on the daemon's host (image and kernel import): true only
    /// on the owner-only unix socket, whose clients can read the host's files anyway;
    /// [`serve_tcp`] always clears it, so remote clients reach only the policy's paths.
    pub local_clients: bool,
}

pub(super) type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// How often followed logs and events are polled.
const POLL: Duration = Duration::from_millis(200);

pub(super) fn internal(e: StoreError) -> Status {
    Status::internal(error_chain(&e))
}

pub(super) fn stream_from<T: Send + 'static>(rx: mpsc::Receiver<Result<T, Status>>) -> Stream_<T> {
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl vms_server::Vms for ApiState {
    async fn list(&self, _: Request<proto::ListVmsRequest>) -> Result<Response<proto::ListVmsResponse>, Status> {
        let revision = self.store.revision().map_err(internal)?;
        let vms = self.store.list_vms().map_err(internal)?.iter().map(convert::vm).collect();
        Ok(Response::new(proto::ListVmsResponse { vms, revision }))
    }

    async fn get(&self, request: Request<proto::VmName>) -> Result<Response<proto::Vm>, Status> {
        let name = request.into_inner().name;
        match self.store.get_vm(&name).map_err(internal)? {
            Some(record) => Ok(Response::new(convert::vm(&record))),
            None => Err(Status::not_found(format!("no VM named {name:?} (see `ignite ps -a`)"))),
        }
    }

    type WatchStream = Stream_<proto::VmEvent>;

    async fn watch(&self, request: Request<proto::WatchVmsRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let store = self.store.clone();
        // Subscribe first, then catch up: no change falls in between (some may come twice).
        let mut changes = store.watch_vms();
        let catch_up = if request.from_revision > 0 {
            match store.changes_since(request.from_revision).map_err(internal)? {
                Some(changes) => changes,
                None => {
                    let resync = proto::VmEvent { kind: Kind::Resync as i32, ..Default::default() };
                    let _ = tx.send(Ok(resync)).await;
                    snapshot(&store)?
                }
            }
        } else if request.snapshot {
            snapshot(&store)?
        } else {
            Vec::new()
        };
        tokio::spawn(async move {
            for change in catch_up {
                if tx.send(Ok(vm_event(change))).await.is_err() {
                    return; // the client went away
                }
            }
            // Wait for a change or for the client to go away, whichever comes first, so a
            // disconnected watcher never pins a task (nor holds up the daemon's shutdown).
            loop {
                let change = tokio::select! {
                    () = tx.closed() => return,
                    change = changes.next_change() => change,
                };
                let Some(change) = change else { return };
                if tx.send(Ok(vm_event(change))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream_from(rx)))
    }

    async fn apply(&self, request: Request<proto::ApplyRequest>) -> Result<Response<proto::ApplyResponse>, Status> {
        let request = request.into_inner();
        let files = request.files.iter().map(|f| (f.path.as_str(), f.text.as_str()));
        let docs = parse_revision("api", files, &self.policy).map_err(|e| Status::invalid_argument(error_chain(&e)))?;
        let report = apply_objects(&self.store, "api", &docs, request.force).map_err(|e| match e {
            ApplyError::OwnerConflict { .. } => {
                Status::failed_precondition(format!("{e} (or use --force to take it over)"))
            }
            ApplyError::PortConflict { .. } => Status::failed_precondition(error_chain(&e)),
            other => Status::internal(error_chain(&other)),
        })?;
        for name in report.touched() {
            self.queue.add(name);
        }
        Ok(Response::new(proto::ApplyResponse {
            created: report.created,
            updated: report.updated,
            unchanged: report.unchanged,
        }))
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteVmRequest>,
    ) -> Result<Response<proto::DeleteVmResponse>, Status> {
        let request = request.into_inner();
        let name = request.name;
        let record = self.store.get_vm(&name).map_err(internal)?;
        let Some(record) = record else {
            return Err(Status::not_found(format!("no VM named {name:?}")));
        };
        if record.owner != "api" && !request.force {
            return Err(Status::failed_precondition(format!(
                "VM {name:?} is owned by {}: remove it from that source, or use --force (the source will declare it again)",
                record.owner
            )));
        }
        self.store.mark_deletion(&name).map_err(internal)?;
        self.queue.add(&name);
        Ok(Response::new(proto::DeleteVmResponse {}))
    }

    async fn set_state(&self, request: Request<proto::SetStateRequest>) -> Result<Response<proto::Vm>, Status> {
        let request = request.into_inner();
        let state = match request.state.as_str() {
            "Running" => crate::api::DesiredState::Running,
            "Stopped" => crate::api::DesiredState::Stopped,
            other => return Err(Status::invalid_argument(format!("state {other:?}: expected Running or Stopped"))),
        };
        self.set_desired_state(&request.name, state).map(Response::new)
    }

    async fn kill(&self, request: Request<proto::VmName>) -> Result<Response<proto::Vm>, Status> {
        let name = request.into_inner().name;
        let Some(runtime) = self.runtime.clone() else {
            return Err(Status::unavailable("this API server has no runtime to kill VMs with"));
        };
        // Desired state first, so the reconciler does not start it again.
        let vm = self.set_desired_state(&name, crate::api::DesiredState::Stopped)?;
        let killed = name.clone();
        tokio::task::spawn_blocking(move || runtime.stop(&killed, Duration::ZERO))
            .await
            .map_err(|e| Status::internal(format!("kill task failed: {e}")))?
            .map_err(|e| Status::internal(format!("killing VM {name:?}: {}", error_chain(&e))))?;
        self.queue.add(&name);
        Ok(Response::new(vm))
    }

    type ExecStream = Stream_<proto::ExecOutput>;

    async fn exec(
        &self,
        request: Request<tonic::Streaming<proto::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        super::exec::exec(self, request.into_inner()).await.map(Response::new)
    }

    type AttachStream = Stream_<proto::AttachOutput>;

    async fn attach(
        &self,
        request: Request<tonic::Streaming<proto::AttachInput>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        super::exec::attach(self, request.into_inner()).await.map(Response::new)
    }

    type LogsStream = Stream_<proto::LogChunk>;

    async fn logs(&self, request: Request<proto::LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        let request = request.into_inner();
        if self.store.get_vm(&request.name).map_err(internal)?.is_none() {
            return Err(Status::not_found(format!("no VM named {:?}", request.name)));
        }
        let path = self.layout().vm(&request.name).console_log();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(follow_log(path, request.tail_bytes, request.follow, tx));
        Ok(Response::new(stream_from(rx)))
    }
}

use proto::vm_event::Kind;

/// Every VM as an upsert, at the store's current revision.
fn snapshot(store: &Store) -> Result<Vec<VmChange>, Status> {
    let revision = store.revision().map_err(internal)?;
    let records = store.list_vms().map_err(internal)?;
    Ok(records.into_iter().map(|r| VmChange { name: r.vm.metadata.name.clone(), record: Some(r), revision }).collect())
}

fn vm_event(change: VmChange) -> proto::VmEvent {
    match &change.record {
        Some(record) => proto::VmEvent {
            kind: Kind::Upsert as i32,
            name: change.name,
            vm: Some(convert::vm(record)),
            revision: change.revision,
        },
        None => proto::VmEvent { kind: Kind::Delete as i32, name: change.name, vm: None, revision: change.revision },
    }
}

impl ApiState {
    /// The paths under the root (per-VM run directories for logs, exec and attach).
    pub fn layout(&self) -> RootLayout {
        RootLayout::new(&self.root)
    }

    /// Sets the desired state of a VM the API owns and queues it.
    pub(super) fn set_desired_state(&self, name: &str, state: crate::api::DesiredState) -> Result<proto::Vm, Status> {
        let Some(record) = self.store.get_vm(name).map_err(internal)? else {
            return Err(Status::not_found(format!("no VM named {name:?} (see `ignite ps -a`)")));
        };
        if record.owner != "api" {
            return Err(Status::failed_precondition(format!(
                "VM {name:?} is owned by {}: declare `state: {state:?}` in its manifest there",
                record.owner
            )));
        }
        let mut vm = record.vm;
        vm.spec.state = state;
        self.store.put_vm(&vm, "api", false).map_err(internal)?;
        self.queue.add(name);
        let record = self.store.get_vm(name).map_err(internal)?.ok_or_else(|| Status::not_found(name))?;
        Ok(convert::vm(&record))
    }
}

/// Streams `path` from `tail` bytes before its end (0: the start), then its growth if `follow`.
/// The largest console chunk one `LogChunk` carries.
const LOG_CHUNK: usize = 64 << 10;

async fn follow_log(path: PathBuf, tail: u64, follow: bool, tx: mpsc::Sender<Result<proto::LogChunk, Status>>) {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut offset = match tokio::fs::metadata(&path).await {
        Ok(m) if tail > 0 => m.len().saturating_sub(tail),
        _ => 0,
    };
    loop {
        if let Ok(mut file) = tokio::fs::File::open(&path).await {
            let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
            if len < offset {
                offset = 0; // a new process started a new log
            }
            if file.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                // Chunk by chunk: a log of any size streams in bounded memory (the channel holds a
                // few chunks) and in messages every client accepts.
                loop {
                    let mut buf = vec![0; LOG_CHUNK];
                    let n = match file.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    buf.truncate(n);
                    offset += n as u64;
                    if tx.send(Ok(proto::LogChunk { data: buf })).await.is_err() {
                        return;
                    }
                }
            }
        }
        if !follow || tx.is_closed() {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}

#[tonic::async_trait]
impl events_server::Events for ApiState {
    type WatchStream = Stream_<proto::Event>;

    async fn watch(&self, request: Request<proto::WatchEventsRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut after = request.after_seq;
            loop {
                let batch = match store.events_since(after, 500) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(internal(e))).await;
                        return;
                    }
                };
                for (seq, event) in &batch {
                    after = *seq;
                    if tx.send(Ok(convert::event(*seq, event))).await.is_err() {
                        return;
                    }
                }
                if batch.len() < 500 {
                    if !request.follow || tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
        });
        Ok(Response::new(stream_from(rx)))
    }
}

#[tonic::async_trait]
impl sources_server::Sources for ApiState {
    async fn list(&self, _: Request<proto::Empty>) -> Result<Response<proto::ListSourcesResponse>, Status> {
        let sources = self.store.list_source_states().map_err(internal)?.iter().map(convert::source).collect();
        Ok(Response::new(proto::ListSourcesResponse { sources }))
    }

    async fn sync(&self, request: Request<proto::SourceName>) -> Result<Response<proto::Empty>, Status> {
        let name = request.into_inner().name;
        match self.triggers.iter().find(|(n, _)| *n == name) {
            Some((_, tx)) => {
                let _ = tx.try_send(()); // a sync already pending is as good
                Ok(Response::new(proto::Empty {}))
            }
            None => Err(Status::not_found(format!("no source named {name:?}"))),
        }
    }
}

fn memory_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
    kib.unwrap_or(0) * 1024
}

#[tonic::async_trait]
impl host_server::Host for ApiState {
    async fn info(&self, _: Request<proto::Empty>) -> Result<Response<proto::HostInfo>, Status> {
        let vms = self.store.list_vms().map_err(internal)?;
        let running = vms.iter().filter(|r| r.status.phase == crate::api::Phase::Running).count();
        Ok(Response::new(proto::HostInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            root: self.root.display().to_string(),
            virt_mode: format!("{:?}", vmm_core::VirtMode::detect()),
            cpus: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
            memory_bytes: memory_bytes(),
            vms: vms.len() as u32,
            running_vms: running as u32,
            snapshotter: self.snapshotter.clone(),
            vmm_jail: if self.vmm_jail.jailed { "jailed".into() } else { "unjailed (--no-jail)".into() },
            cgroups: self.vmm_jail.cgroups.map_or("none".to_string(), |v| v.to_string()),
        }))
    }
}

/// How the daemon runs VMM processes, as `Host.Info` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmmJailInfo {
    /// Whether VMMs are jailed.
    pub jailed: bool,
    /// The cgroup version VMs are limited through (`None`: no cgroup limits).
    pub cgroups: Option<vmm_core::jail::cgroup::CgroupVersion>,
}

/// Serves the API on the unix socket `path` (mode 0600: the API can start VMs) until `shutdown`.
pub async fn serve(
    path: &Path,
    state: ApiState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    remove_stale_socket(path).await?;
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    // Every client's bytes go through the authority fix: see `authority.rs` for why.
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::UnixListenerStream::new(listener), |conn| {
        conn.map(super::authority::AuthorityFix::new)
    });
    let router = services(tonic::transport::Server::builder(), state);
    Ok(tokio::spawn(async move {
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, shutdown).await {
            tracing::error!(error = %e, "the API server stopped");
        }
    }))
}

/// Removes the socket file at `path` left by a daemon that is gone, so this one can bind it; a
/// socket some process still answers on is never taken over (AddrInUse, saying what to do).
async fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another ignite daemon answers on this socket: stop it, or give this one its own --socket",
        ));
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Serves the API on TCP `addr` with mutual TLS until `shutdown`; returns the address bound (so
/// port 0 picks a free one) and the server's task.
pub async fn serve_tcp(
    addr: std::net::SocketAddr,
    tls: &super::tls::ServerTls,
    state: ApiState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>), super::tls::TlsError> {
    use super::tls::TlsError;
    let builder = tonic::transport::Server::builder()
        .tls_config(tls.config()?)
        .map_err(|source| TlsError::Transport { context: "the TLS server configuration was refused".into(), source })?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| TlsError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| TlsError::Bind { addr, source })?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let router = services(builder, ApiState { local_clients: false, ..state });
    Ok((
        bound,
        tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, shutdown).await {
                tracing::error!(error = %e, "the TCP API server stopped");
            }
        }),
    ))
}

/// Every API service, with the standard health and reflection services, on `builder`.
fn services(mut builder: tonic::transport::Server, state: ApiState) -> tonic::transport::server::Router {
    let (reflection_v1, reflection_v1alpha) = super::standard::reflection();
    builder
        .add_service(state.health.service())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        // An Apply carries whole manifest files (their own cap is checked when they are parsed).
        .add_service(
            vms_server::VmsServer::new(state.clone())
                .max_decoding_message_size(crate::api::bounds::MAX_MANIFEST_BYTES + (1 << 20)),
        )
        .add_service(events_server::EventsServer::new(state.clone()))
        .add_service(sources_server::SourcesServer::new(state.clone()))
        .add_service(images_server::ImagesServer::new(state.clone()))
        .add_service(kernels_server::KernelsServer::new(state.clone()))
        .add_service(snapshots_server::SnapshotsServer::new(state.clone()))
        .add_service(templates_server::TemplatesServer::new(state.clone()))
        .add_service(host_server::HostServer::new(state))
}

#[cfg(test)]
mod tests {
    use super::remove_stale_socket;

    #[tokio::test]
    async fn a_big_console_log_streams_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let log: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &log).unwrap();
        for (tail, expected) in [(0, &log[..]), (100_000, &log[log.len() - 100_000..])] {
            let (tx, mut rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(super::follow_log(path.clone(), tail, false, tx));
            let mut got = Vec::new();
            while let Some(chunk) = rx.recv().await {
                let chunk = chunk.unwrap().data;
                assert!(chunk.len() <= super::LOG_CHUNK, "a chunk of {} bytes", chunk.len());
                got.extend(chunk);
            }
            assert!(got == expected, "tail {tail}: {} bytes streamed, {} expected", got.len(), expected.len());
        }
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_live_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ignite.sock");
        // Nothing there: nothing to do.
        remove_stale_socket(&path).await.unwrap();

        // A daemon that answers keeps its socket.
        let live = tokio::net::UnixListener::bind(&path).unwrap();
        let err = remove_stale_socket(&path).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains("another ignite daemon answers"), "{err}");
        assert!(path.exists(), "a live daemon's socket was removed");

        // The daemon is gone but its socket file stayed (a crash): it is removed.
        drop(live);
        assert!(path.exists());
        remove_stale_socket(&path).await.unwrap();
        assert!(!path.exists());
    }
}
