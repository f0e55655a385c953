//! Errors of the Kubernetes controller, each naming the object (`namespace/name`), the verb and
//! the resource, so an RBAC or installation problem says what to fix.

use super::crd::RESOURCE;

/// A failure of the MicroVM controller.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The API server does not serve MicroVMs.
    #[error("the MicroVM CRD is not installed: kubectl apply -f manifests/crd/microvm.yaml")]
    CrdMissing,
    /// RBAC denied a request.
    #[error("forbidden: {verb} {resource}{}: grant it to the daemon's service account (manifests/kube/rbac.yaml): {message}", on(.object))]
    Forbidden {
        /// The verb (`list`, `watch`, `patch`...).
        verb: &'static str,
        /// The resource (`microvms.ignite.dev`, `microvms.ignite.dev/status`).
        resource: String,
        /// The object, `namespace/name`, when the request was about one.
        object: Option<String>,
        /// The API server's message.
        message: String,
    },
    /// Another request failed.
    #[error("{verb} {resource}{}", on(.object))]
    Api {
        /// The verb.
        verb: &'static str,
        /// The resource.
        resource: String,
        /// The object, `namespace/name`, when the request was about one.
        object: Option<String>,
        /// Why.
        #[source]
        source: Box<::kube::Error>,
    },
    /// The kubeconfig or in-cluster configuration cannot be used.
    #[error("cannot configure the Kubernetes client{}", .path.as_ref().map(|p| format!(" from {}", p.display())).unwrap_or_default())]
    Config {
        /// The kubeconfig file, when one was named.
        path: Option<std::path::PathBuf>,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// `--kube-selector` is not an equality-based label selector.
    #[error("invalid label selector {selector:?}: {reason} (use k=v, k!=v, k or !k, comma-separated)")]
    Selector {
        /// The selector as given.
        selector: String,
        /// What is wrong.
        reason: String,
    },
    /// The store failed while applying or reading a MicroVM's VM.
    #[error("MicroVM {object}")]
    Store {
        /// The object, `namespace/name`.
        object: String,
        /// Why.
        #[source]
        source: crate::store::StoreError,
    },
    /// The MicroVM watch ended with an error (retried with backoff by the caller).
    #[error("watching {RESOURCE}")]
    Watch(#[source] Box<::kube::runtime::watcher::Error>),
}

fn on(object: &Option<String>) -> String {
    object.as_ref().map(|o| format!(" {o}")).unwrap_or_default()
}

impl KubeError {
    /// Classifies a failed request: 404 on the resource itself means the CRD is missing, 403 is
    /// RBAC, anything else is kept with its verb, resource and object.
    pub fn from_api(verb: &'static str, resource: &str, object: Option<String>, err: ::kube::Error) -> KubeError {
        match &err {
            ::kube::Error::Api(status) if status.code == 403 => {
                KubeError::Forbidden { verb, resource: resource.to_string(), object, message: status.message.clone() }
            }
            ::kube::Error::Api(status) if status.code == 404 && object.is_none() => KubeError::CrdMissing,
            _ => KubeError::Api { verb, resource: resource.to_string(), object, source: Box::new(err) },
        }
    }

    /// The object is gone (404) or changed under us (409): look again instead of failing.
    pub fn is_not_found_or_conflict(&self) -> bool {
        matches!(self, KubeError::Api { source, .. } if matches!(&**source, ::kube::Error::Api(s) if s.code == 404 || s.code == 409))
    }
}
