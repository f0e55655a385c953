//! `spec.bootstrap.kubernetes` on the host: the join configuration a VM's config drive carries
//! (with a bootstrap token created or read through the daemon's Kubernetes client), and removing
//! the VM's Node and tokens when its disk goes.
//!
//! The runtime's steps are synchronous; the client's calls block on the daemon's tokio runtime,
//! each bounded by [`CALL_TIMEOUT`] so a hung API server cannot wedge a reconcile worker.

use std::future::Future;
use std::time::{Duration, SystemTime};

use guest_api::config::JoinConfig;
use tracing::{info, warn};

use crate::api::Vm;
use crate::kube::access::KubeAccess;
use crate::kube::{bootstrap, nodes};
use crate::reconcile::RuntimeError;
use guest_api::error_chain;

/// The longest one bootstrap step waits for the API server.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The reason of every bootstrap failure in conditions and events.
pub const REASON: &str = "BootstrapFailed";

fn block_on<T, E>(access: &KubeAccess, what: &str, call: impl Future<Output = Result<T, E>>) -> Result<T, RuntimeError>
where
    E: std::error::Error + BootstrapClass,
{
    match access.handle.block_on(async { tokio::time::timeout(CALL_TIMEOUT, call).await }) {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) if e.permanent() => Err(RuntimeError::permanent(REASON, error_chain(&e))),
        Ok(Err(e)) => Err(RuntimeError::transient(REASON, error_chain(&e))),
        Err(_) => Err(RuntimeError::transient(
            REASON,
            format!("{what}: the Kubernetes API server did not answer within {}s", CALL_TIMEOUT.as_secs()),
        )),
    }
}

/// Whether an error needs a change before a retry can help.
pub trait BootstrapClass {
    /// See the trait.
    fn permanent(&self) -> bool;
}

impl BootstrapClass for bootstrap::BootstrapError {
    fn permanent(&self) -> bool {
        self.is_permanent()
    }
}

impl BootstrapClass for crate::kube::access::ApiCallError {
    fn permanent(&self) -> bool {
        self.is_permanent()
    }
}

/// The reason of a bootstrap the daemon's allow-lists do not let the VM's namespace have.
pub const NOT_ALLOWED: &str = "BootstrapNotAllowed";

/// The join configuration for `vm`'s config drive, when it declares `spec.bootstrap.kubernetes`.
/// Without Kubernetes access that is a permanent error naming the field and the daemon flags; so
/// is a token the daemon's [`BootstrapScope`](crate::kube::scope::BootstrapScope) does not give
/// the VM's `owner` (checked before any call to the API server).
pub fn join_config(kube: Option<&KubeAccess>, vm: &Vm, owner: &str) -> Result<Option<JoinConfig>, RuntimeError> {
    let Some(k8s) = vm.spec.bootstrap.as_ref().and_then(|b| b.kubernetes.as_ref()) else {
        return Ok(None);
    };
    let name = vm.name();
    let Some(access) = kube else {
        let field = if k8s.create_token { "createToken" } else { "tokenSecretRef" };
        let e = bootstrap::BootstrapError::NoKubeAccess { vm: name.into(), field };
        return Err(RuntimeError::permanent(REASON, e.to_string()));
    };
    if let Some(message) = access.scope.refusal(crate::kube::scope::requester(owner), name, k8s) {
        warn!(vm = name, owner, error = %message, "bootstrap token not allowed");
        return Err(RuntimeError::permanent(NOT_ALLOWED, message));
    }
    let what = format!("VM {name:?}: bootstrap token");
    let token = block_on(access, &what, bootstrap::token_for(access, name, k8s, SystemTime::now()))?;
    info!(vm = name, provider_id = %access.provider_id(name), "join configuration on the config drive");
    Ok(Some(bootstrap::guest_join(name, &access.provider_id(name), k8s, &token)))
}

/// Deletes the Node `name` registered as and the bootstrap tokens created for it (its disk is
/// going: a rebuilt VM joins anew). Idempotent. Without Kubernetes access the Node is left with
/// a warning: the daemon cannot reach the cluster, and the VM must still be removable.
pub fn forget(kube: Option<&KubeAccess>, name: &str) -> Result<(), RuntimeError> {
    let Some(access) = kube else {
        warn!(vm = name, "the VM joined Kubernetes but the daemon has no Kubernetes access: its Node is left");
        return Ok(());
    };
    let what = format!("VM {name:?}: deleting its Node");
    let node = block_on(access, &what, nodes::delete_node(access, name))
        .map_err(|e| RuntimeError { message: format!("VM {name:?}: deleting its Node: {}", e.message), ..e })?;
    let what = format!("VM {name:?}: deleting its bootstrap tokens");
    let tokens = block_on(access, &what, bootstrap::delete_tokens(access, name)).map_err(|e| RuntimeError {
        message: format!("VM {name:?}: deleting its bootstrap tokens: {}", e.message),
        ..e
    })?;
    info!(vm = name, node = ?node, tokens, "removed the VM's Kubernetes Node and tokens");
    Ok(())
}

#[cfg(test)]
#[path = "kubernetes_tests.rs"]
mod tests;
