//! What the host runtime needs to talk to a Kubernetes API server for node bootstrap: the client, the
//! name this host goes by in provider IDs, the bootstrap tokens' lifetime, and the errors of a call.

use std::time::Duration;

/// How long a created bootstrap token stays valid (kubeadm's own default is 24 h; a VM joins within
/// minutes, so a short lifetime limits what a leaked token is worth).
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// The scheme of every provider ID this controller gives its nodes.
pub const PROVIDER_SCHEME: &str = "ignite://";

/// Kubernetes access of the real runtime (`ignite daemon --kube` / `--kubeconfig`).
#[derive(Clone)]
pub struct KubeAccess {
    /// The client (its default namespace is not used: tokens live in `kube-system`).
    pub client: ::kube::Client,
    /// This host's name, the `HOST` in provider IDs `ignite://HOST/VM`.
    pub host: String,
    /// Lifetime of created bootstrap tokens.
    pub token_ttl: Duration,
    /// Which VMs may have a token (`--kube-token-secret`, `--kube-bootstrap-namespaces`): none
    /// by default.
    pub scope: super::scope::BootstrapScope,
    /// The tokio runtime the client's calls run on: the runtime's steps are synchronous (they run on
    /// reconcile worker threads or in `spawn_blocking`) and block on it.
    pub handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for KubeAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAccess").field("host", &self.host).field("token_ttl", &self.token_ttl).finish()
    }
}

impl KubeAccess {
    /// Access through `client` as `host`, with the default token lifetime, on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new(client: ::kube::Client, host: impl Into<String>) -> Self {
        KubeAccess {
            client,
            host: host.into(),
            token_ttl: DEFAULT_TOKEN_TTL,
            scope: Default::default(),
            handle: tokio::runtime::Handle::current(),
        }
    }

    /// The provider ID of `vm` on this host.
    pub fn provider_id(&self, vm: &str) -> String {
        provider_id(&self.host, vm)
    }
}

/// This machine's host name (`/proc/sys/kernel/hostname`), `localhost` when unreadable.
pub fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `ignite://HOST/VM`: the provider ID the kubelet of `vm` registers its Node with.
pub fn provider_id(host: &str, vm: &str) -> String {
    format!("{PROVIDER_SCHEME}{host}/{vm}")
}

/// The VM a provider ID names, when it is one of `host`'s.
pub fn vm_of_provider_id<'a>(host: &str, provider_id: &'a str) -> Option<&'a str> {
    let rest = provider_id.strip_prefix(PROVIDER_SCHEME)?.strip_prefix(host)?.strip_prefix('/')?;
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

/// A label value from free text (a host name): characters outside `[A-Za-z0-9._-]` become `-`, at
/// most 63 characters, starting and ending with an alphanumeric (empty becomes `unknown`).
pub fn label_value(text: &str) -> String {
    let mapped: String =
        text.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '-' }).take(63).collect();
    let trimmed = mapped.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if trimmed.is_empty() {
        "unknown".into()
    } else {
        trimmed.to_string()
    }
}

/// A call to the API server failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiCallError {
    /// RBAC denied the call.
    #[error(
        "the Kubernetes API server refused to let the daemon {verb} {resource} (403 Forbidden: {message}); \
         grant it to the daemon's identity (manifests/kube/rbac.yaml)"
    )]
    Forbidden {
        /// `create`, `get`, `list`, `delete`...
        verb: &'static str,
        /// What was asked for, e.g. `secrets in namespace kube-system`.
        resource: String,
        /// The API server's message.
        message: String,
    },
    /// The API server answered with another error status.
    #[error("cannot {verb} {resource}: the Kubernetes API server answered {code}: {message}")]
    Status {
        /// The verb.
        verb: &'static str,
        /// The resource.
        resource: String,
        /// The HTTP status.
        code: u16,
        /// The API server's message.
        message: String,
    },
    /// The API server could not be reached (or its answer could not be read).
    #[error("cannot {verb} {resource}: the Kubernetes API server is unreachable")]
    Unreachable {
        /// The verb.
        verb: &'static str,
        /// The resource.
        resource: String,
        /// The client's error.
        #[source]
        source: ::kube::Error,
    },
}

impl ApiCallError {
    /// Classifies a client error of `verb` on `resource`.
    pub fn from_client(verb: &'static str, resource: impl Into<String>, error: ::kube::Error) -> Self {
        let resource = resource.into();
        match error {
            ::kube::Error::Api(status) if status.code == 403 => {
                ApiCallError::Forbidden { verb, resource, message: status.message }
            }
            ::kube::Error::Api(status) => {
                ApiCallError::Status { verb, resource, code: status.code, message: status.message }
            }
            source => ApiCallError::Unreachable { verb, resource, source },
        }
    }

    /// Retrying cannot help until someone changes RBAC or the request (403, and 4xx other than
    /// 408/409/429); unreachable servers and 5xx may recover by themselves.
    pub fn is_permanent(&self) -> bool {
        match self {
            ApiCallError::Forbidden { .. } => true,
            ApiCallError::Status { code, .. } => (400..500).contains(code) && ![408, 409, 429].contains(code),
            ApiCallError::Unreachable { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_ids_round_trip_only_for_this_host() {
        let id = provider_id("host-1", "web");
        assert_eq!(id, "ignite://host-1/web");
        assert_eq!(vm_of_provider_id("host-1", &id), Some("web"));
        assert_eq!(vm_of_provider_id("host-2", &id), None);
        assert_eq!(vm_of_provider_id("host", &id), None, "a prefix of the host name is another host");
        assert_eq!(vm_of_provider_id("host-1", "ignite://host-1/"), None);
        assert_eq!(vm_of_provider_id("host-1", "ignite://host-1/a/b"), None);
        assert_eq!(vm_of_provider_id("host-1", "aws:///eu-west-1a/i-0123"), None);
    }

    #[test]
    fn label_values_are_valid() {
        assert_eq!(label_value("node-1.example.com"), "node-1.example.com");
        assert_eq!(label_value("-my host!"), "my-host");
        assert_eq!(label_value("***"), "unknown");
        assert_eq!(label_value(&"a".repeat(100)).len(), 63);
    }

    #[test]
    fn client_errors_are_classified() {
        let status = |code: u16| {
            ::kube::Error::Api(
                ::kube::core::Status::failure("secrets is forbidden: User \"system:serviceaccount:ignite:ignite\" cannot create resource \"secrets\"", "Forbidden")
                    .with_code(code)
                    .boxed(),
            )
        };
        let e = ApiCallError::from_client("create", "secrets in namespace kube-system", status(403));
        assert!(e.is_permanent());
        let text = e.to_string();
        assert!(text.contains("refused to let the daemon create secrets in namespace kube-system"), "{text}");
        assert!(text.contains("cannot create resource"), "{text}");
        assert!(!ApiCallError::from_client("get", "nodes", status(500)).is_permanent());
        assert!(!ApiCallError::from_client("get", "nodes", status(429)).is_permanent());
        assert!(ApiCallError::from_client("get", "nodes", status(422)).is_permanent());
        let gone = ::kube::Error::Service("connection refused".into());
        let e = ApiCallError::from_client("list", "nodes", gone);
        assert!(matches!(e, ApiCallError::Unreachable { .. }) && !e.is_permanent());
        assert_eq!(e.to_string(), "cannot list nodes: the Kubernetes API server is unreachable");
    }
}
