//! The Kubernetes Nodes of this host's VMs: a VM's kubelet registers with provider ID
//! `ignite://HOST/VM` (see [`super::bootstrap`]); the controller finds that Node, reports its name
//! as the VM's `nodeRef` in the store (so `ignite ps/inspect` and the MicroVM status show it), and
//! deletes it when the VM goes.

use std::collections::BTreeMap;

use ::kube::api::{Api, DeleteParams, ListParams};
use ::kube::runtime::watcher;
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use tracing::{debug, info, warn};

use super::access::{vm_of_provider_id, ApiCallError, KubeAccess};
use crate::store::{Store, StoreError, VmChange};

const NODES: &str = "nodes";

/// The VM `node` belongs to, when its provider ID is one of `host`'s.
pub fn vm_of_node<'a>(host: &str, node: &'a Node) -> Option<&'a str> {
    vm_of_provider_id(host, node.spec.as_ref()?.provider_id.as_deref()?)
}

/// The name of the Node whose provider ID is `ignite://HOST/vm`, if one registered.
pub async fn find_node(access: &KubeAccess, vm: &str) -> Result<Option<String>, ApiCallError> {
    let api: Api<Node> = Api::all(access.client.clone());
    let nodes = api.list(&ListParams::default()).await.map_err(|e| ApiCallError::from_client("list", NODES, e))?;
    Ok(nodes.items.into_iter().find(|n| vm_of_node(&access.host, n) == Some(vm)).and_then(|n| n.metadata.name))
}

/// Deletes the Node of `vm` (the VM is gone, or rebuilt from a fresh disk that must join anew).
/// Returns the Node's name when there was one. Idempotent: no Node, or one deleted meanwhile
/// (404), is success.
pub async fn delete_node(access: &KubeAccess, vm: &str) -> Result<Option<String>, ApiCallError> {
    let Some(name) = find_node(access, vm).await? else {
        return Ok(None);
    };
    let api: Api<Node> = Api::all(access.client.clone());
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => {
            info!(vm, node = name, "deleted the VM's Kubernetes Node");
            Ok(Some(name))
        }
        Err(::kube::Error::Api(status)) if status.code == 404 => Ok(Some(name)),
        Err(e) => Err(ApiCallError::from_client("delete", NODES, e)),
    }
}

/// Follows Node events into the store's `nodeRef` of this host's VMs.
///
/// Keeps which Node belongs to which VM, so a deleted Node (or one gone from a relist) clears the
/// VM's `nodeRef` only when it still names that Node.
pub struct NodeTracker {
    host: String,
    store: Store,
    /// Node name → VM name, for the Nodes of this host's VMs seen so far.
    known: BTreeMap<String, String>,
    /// Nodes listed since the last `Init` (a relist in progress).
    relisted: Option<BTreeMap<String, String>>,
}

impl NodeTracker {
    /// A tracker for `host`'s VMs in `store`.
    pub fn new(host: impl Into<String>, store: Store) -> Self {
        NodeTracker { host: host.into(), store, known: BTreeMap::new(), relisted: None }
    }

    /// Applies one watcher event. Store errors of VMs that do not exist (a Node outliving its VM,
    /// or another tool's) are not errors.
    pub fn apply(&mut self, event: watcher::Event<Node>) -> Result<(), StoreError> {
        match event {
            watcher::Event::Init => self.relisted = Some(BTreeMap::new()),
            watcher::Event::InitApply(node) => {
                if let Some((node, vm)) = self.owned(&node) {
                    self.set(&vm, &node)?;
                    self.relisted.get_or_insert_with(BTreeMap::new).insert(node, vm);
                }
            }
            watcher::Event::InitDone => {
                let listed = self.relisted.take().unwrap_or_default();
                let gone: Vec<(String, String)> = self
                    .known
                    .iter()
                    .filter(|(n, _)| !listed.contains_key(*n))
                    .map(|(n, v)| (n.clone(), v.clone()))
                    .collect();
                for (node, vm) in gone {
                    self.clear(&vm, &node)?;
                }
                self.known = listed;
            }
            watcher::Event::Apply(node) => {
                if let Some((node, vm)) = self.owned(&node) {
                    self.set(&vm, &node)?;
                    self.known.insert(node, vm);
                }
            }
            watcher::Event::Delete(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                if let Some(vm) = self.known.remove(&name) {
                    self.clear(&vm, &name)?;
                }
            }
        }
        Ok(())
    }

    /// Applies a change of the store: a VM that appears (or lost its `nodeRef`) while its Node is
    /// already known gets it, so the order in which VM and Node show up does not matter.
    pub fn vm_changed(&self, change: &VmChange) -> Result<(), StoreError> {
        let Some(record) = &change.record else {
            return Ok(());
        };
        let Some((node, _)) = self.known.iter().find(|(_, vm)| **vm == change.name) else {
            return Ok(());
        };
        if record.status.node_ref.as_deref() == Some(node.as_str()) {
            return Ok(());
        }
        self.set(&change.name, node)
    }

    fn owned(&self, node: &Node) -> Option<(String, String)> {
        let vm = vm_of_node(&self.host, node)?;
        Some((node.metadata.name.clone()?, vm.to_string()))
    }

    fn set(&self, vm: &str, node: &str) -> Result<(), StoreError> {
        match self.store.update_status(vm, |s| s.node_ref = Some(node.to_string())) {
            Ok(_) => {
                debug!(vm, node, "nodeRef");
                Ok(())
            }
            Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn clear(&self, vm: &str, node: &str) -> Result<(), StoreError> {
        let update = self.store.update_status(vm, |s| {
            if s.node_ref.as_deref() == Some(node) {
                s.node_ref = None;
            }
        });
        match update {
            Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Watches every Node, and the store's VMs, and keeps the `nodeRef` of this host's VMs up to date
/// until either stream ends (never, in practice: the watcher relists after errors, which are
/// logged, with backoff).
pub async fn watch_nodes(access: KubeAccess, store: Store) {
    use ::kube::runtime::WatchStreamExt as _;
    let api: Api<Node> = Api::all(access.client.clone());
    let mut vms = store.watch_vms();
    let mut tracker = NodeTracker::new(access.host.clone(), store);
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
    loop {
        let recorded = tokio::select! {
            event = events.next() => match event {
                None => return,
                Some(Ok(event)) => tracker.apply(event),
                Some(Err(e)) => {
                    warn!(error = %guest_api::error_chain(&e), "watching Kubernetes Nodes");
                    Ok(())
                }
            },
            change = vms.next_change() => match change {
                None => return,
                Some(change) => tracker.vm_changed(&change),
            },
        };
        if let Err(e) = recorded {
            warn!(error = %guest_api::error_chain(&e), "cannot record a VM's nodeRef");
        }
    }
}

#[cfg(test)]
#[path = "nodes_tests.rs"]
mod tests;
