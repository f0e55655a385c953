//! The Snapshots service: create, list, delete VM snapshots and roll VMs back to them, over the
//! runtime's [`VmSnapshots`]. Every step is an event on the VM (`SnapshotTaken`, `SnapshotFailed`,
//! `SnapshotDeleted`, `RollingBack`, `RollbackRefused`).

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::{self, snapshots_server};
use super::server::{internal, ApiState};
use crate::api::conditions::now_rfc3339;
use crate::api::DesiredState;
use crate::host::snapshots::{SnapshotInfo, SnapshotOpError, VmSnapshots};
use crate::store::{Event, EventKind};

fn status(e: &SnapshotOpError) -> Status {
    let message = e.to_string();
    match e {
        SnapshotOpError::NoVm(_) | SnapshotOpError::NotFound { .. } => Status::not_found(message),
        SnapshotOpError::Name(_) => Status::invalid_argument(message),
        SnapshotOpError::Exists { .. } => Status::already_exists(message),
        SnapshotOpError::NotPrepared(_) => Status::unavailable(message),
        SnapshotOpError::Stale { .. } | SnapshotOpError::Unusable { .. } | SnapshotOpError::Pending { .. } => {
            Status::failed_precondition(message)
        }
        SnapshotOpError::Failed { .. } => Status::internal(message),
    }
}

fn snapshot(info: &SnapshotInfo) -> proto::Snapshot {
    proto::Snapshot {
        vm: info.vm.clone(),
        name: info.name.clone(),
        kind: info.kind.as_str().to_string(),
        created: info.created.clone(),
        memory_bytes: info.memory_bytes,
        disk_bytes: info.disk_bytes,
    }
}

impl ApiState {
    fn snapshots(&self) -> Result<Arc<dyn VmSnapshots>, Status> {
        self.snapshots.clone().ok_or_else(|| Status::unavailable("this API server has no runtime to snapshot VMs with"))
    }

    fn event(&self, vm: &str, kind: EventKind, reason: &str, message: String) {
        let event = Event { object: vm.to_string(), kind, reason: reason.to_string(), message, time: now_rfc3339() };
        if let Err(e) = self.store.append_event(&event) {
            tracing::warn!(vm, reason, error = %e, "cannot record an event");
        }
    }

    /// Runs a blocking snapshot operation off the async runtime; a failure becomes a Warning event
    /// with `reason` on the VM.
    async fn blocking<T: Send + 'static>(
        &self,
        vm: &str,
        reason: &'static str,
        op: impl FnOnce(&dyn VmSnapshots) -> Result<T, SnapshotOpError> + Send + 'static,
    ) -> Result<T, Status> {
        let snapshots = self.snapshots()?;
        let result = tokio::task::spawn_blocking(move || op(snapshots.as_ref()))
            .await
            .map_err(|e| Status::internal(format!("snapshot task failed: {e}")))?;
        result.map_err(|e| {
            if !matches!(e, SnapshotOpError::NoVm(_)) {
                self.event(vm, EventKind::Warning, reason, e.to_string());
            }
            status(&e)
        })
    }
}

#[tonic::async_trait]
impl snapshots_server::Snapshots for ApiState {
    async fn create(
        &self,
        request: Request<proto::CreateSnapshotRequest>,
    ) -> Result<Response<proto::Snapshot>, Status> {
        let request = request.into_inner();
        let vm = request.vm.clone();
        let name = (!request.name.is_empty()).then_some(request.name);
        let info = self
            .blocking(&vm, "SnapshotFailed", move |s| {
                s.create_snapshot(&request.vm, name.as_deref(), request.disk_only)
            })
            .await?;
        let what = match info.kind {
            crate::host::snapshots::SnapshotKind::Full => {
                format!("{} MiB of memory and the disk", info.memory_bytes >> 20)
            }
            crate::host::snapshots::SnapshotKind::Disk => "the disk only".to_string(),
        };
        self.event(&vm, EventKind::Normal, "SnapshotTaken", format!("snapshot {:?}: {what}", info.name));
        Ok(Response::new(snapshot(&info)))
    }

    async fn list(
        &self,
        request: Request<proto::ListSnapshotsRequest>,
    ) -> Result<Response<proto::ListSnapshotsResponse>, Status> {
        let vm = request.into_inner().vm;
        if !vm.is_empty() && self.store.get_vm(&vm).map_err(internal)?.is_none() {
            return Err(Status::not_found(format!("no VM named {vm:?} (see `ignite ps -a`)")));
        }
        let snapshots = self.snapshots()?;
        let infos = tokio::task::spawn_blocking(move || snapshots.list_snapshots((!vm.is_empty()).then_some(&vm)))
            .await
            .map_err(|e| Status::internal(format!("snapshot task failed: {e}")))?
            .map_err(|e| status(&e))?;
        Ok(Response::new(proto::ListSnapshotsResponse { snapshots: infos.iter().map(snapshot).collect() }))
    }

    async fn delete(&self, request: Request<proto::SnapshotRef>) -> Result<Response<proto::Empty>, Status> {
        let request = request.into_inner();
        let (vm, name) = (request.vm.clone(), request.name.clone());
        self.blocking(&vm, "SnapshotDeleteFailed", move |s| s.remove_snapshot(&request.vm, &request.name)).await?;
        self.event(&vm, EventKind::Normal, "SnapshotDeleted", format!("snapshot {name:?} removed"));
        Ok(Response::new(proto::Empty {}))
    }

    async fn rollback(&self, request: Request<proto::SnapshotRef>) -> Result<Response<proto::Snapshot>, Status> {
        let request = request.into_inner();
        let vm = request.vm.clone();
        let Some(record) = self.store.get_vm(&vm).map_err(internal)? else {
            return Err(Status::not_found(format!("no VM named {vm:?} (see `ignite ps -a`)")));
        };
        let info = self.blocking(&vm, "RollbackRefused", move |s| s.rollback(&request.vm, &request.name)).await?;
        let mut message = format!("to snapshot {:?} ({}, taken {})", info.name, info.kind.as_str(), info.created);
        if record.vm.spec.state == DesiredState::Stopped {
            if record.owner == "api" {
                self.set_desired_state(&vm, DesiredState::Running)?;
                message.push_str("; starting the stopped VM from it");
            } else {
                message.push_str(&format!(
                    "; the VM is declared stopped by {}: it starts from the snapshot once declared running",
                    record.owner
                ));
            }
        }
        self.event(&vm, EventKind::Normal, "RollingBack", message);
        self.queue.add(&vm);
        Ok(Response::new(snapshot(&info)))
    }
}
