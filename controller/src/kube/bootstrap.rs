//! Kubernetes node bootstrap (`spec.bootstrap.kubernetes`): the kubeadm bootstrap token a VM joins
//! with (created by the controller, or read from a Secret the user names), and the kubeadm
//! `JoinConfiguration` that goes to the guest on its config drive.
//!
//! The token is a secret: it lives in the Secret, on the config drive (mode 0600) and in the guest's
//! `/etc/ignite/kubeadm-join.yaml` (mode 0600), and nowhere else. [`BootstrapToken`]'s `Debug` hides
//! it, no error message carries it, and nothing here logs it.

use std::collections::BTreeMap;
use std::time::SystemTime;

use ::kube::api::{Api, DeleteParams, ListParams, PostParams};
use guest_api::config::JoinConfig;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::ByteString;
use serde::Serialize;
use tracing::info;

use super::access::{label_value, ApiCallError, KubeAccess};
use crate::api::KubernetesBootstrap;

/// Where bootstrap-token Secrets live (the API server only honours them there).
pub const TOKEN_NAMESPACE: &str = "kube-system";
/// The Secret type of bootstrap tokens.
pub const TOKEN_SECRET_TYPE: &str = "bootstrap.kubernetes.io/token";
/// The group kubeadm's default RBAC lets join (CSR creation and auto-approval).
pub const NODE_TOKEN_GROUP: &str = "system:bootstrappers:kubeadm:default-node-token";
/// Label naming the VM a created token is for.
pub const VM_LABEL: &str = "ignite.dev/vm";
/// Label naming the host that created a token.
pub const HOST_LABEL: &str = "ignite.dev/host";
/// Where the join configuration is written in the guest (mode 0600).
pub const JOIN_CONFIG_PATH: &str = "/etc/ignite/kubeadm-join.yaml";

const TOKEN_CHARS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
const ID_LEN: usize = 6;
const SECRET_LEN: usize = 16;

/// A kubeadm bootstrap token, `[a-z0-9]{6}.[a-z0-9]{16}`: a public id and a secret part.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    id: String,
    secret: String,
}

impl std::fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BootstrapToken({}.<redacted>)", self.id)
    }
}

/// Why a token or its parts are not in kubeadm's format.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenFormatError {
    /// The id is not 6 characters of `[a-z0-9]`.
    #[error("token-id must be 6 characters of [a-z0-9]")]
    Id,
    /// The secret is not 16 characters of `[a-z0-9]`.
    #[error("token-secret must be 16 characters of [a-z0-9]")]
    Secret,
}

fn well_formed(part: &str, len: usize) -> bool {
    part.len() == len && part.bytes().all(|b| TOKEN_CHARS.contains(&b))
}

impl BootstrapToken {
    /// A new token from the operating system's random source (`/dev/urandom`).
    pub fn generate() -> std::io::Result<Self> {
        use std::io::Read as _;
        let mut urandom = std::fs::File::open("/dev/urandom")?;
        let mut chars = String::with_capacity(ID_LEN + SECRET_LEN);
        let mut buf = [0u8; 64];
        while chars.len() < ID_LEN + SECRET_LEN {
            urandom.read_exact(&mut buf)?;
            // 252 = 7 * 36: rejecting larger bytes keeps every character equally likely.
            for b in buf.iter().filter(|&&b| b < 252) {
                if chars.len() < ID_LEN + SECRET_LEN {
                    chars.push(TOKEN_CHARS[usize::from(b % 36)] as char);
                }
            }
        }
        let (id, secret) = chars.split_at(ID_LEN);
        Ok(BootstrapToken { id: id.to_string(), secret: secret.to_string() })
    }

    /// A token from its two parts, checked.
    pub fn from_parts(id: &str, secret: &str) -> Result<Self, TokenFormatError> {
        if !well_formed(id, ID_LEN) {
            return Err(TokenFormatError::Id);
        }
        if !well_formed(secret, SECRET_LEN) {
            return Err(TokenFormatError::Secret);
        }
        Ok(BootstrapToken { id: id.to_string(), secret: secret.to_string() })
    }

    /// The public part (it names the Secret, `bootstrap-token-<id>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The secret part.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The whole token, `id.secret`: only for the join configuration.
    pub fn expose(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }

    /// The Secret's name, `bootstrap-token-<id>`.
    pub fn secret_name(&self) -> String {
        format!("bootstrap-token-{}", self.id)
    }
}

/// Setting up a VM's node bootstrap failed.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The VM asks for a token but the daemon has no Kubernetes client.
    #[error("VM {vm:?}: spec.bootstrap.kubernetes.{field} needs the daemon to run with --kube or --kubeconfig")]
    NoKubeAccess {
        /// The VM.
        vm: String,
        /// `createToken` or `tokenSecretRef`.
        field: &'static str,
    },
    /// The referenced Secret does not exist.
    #[error("VM {vm:?}: spec.bootstrap.kubernetes.tokenSecretRef: secret {TOKEN_NAMESPACE}/{secret} does not exist")]
    SecretMissing {
        /// The VM.
        vm: String,
        /// The Secret's name.
        secret: String,
    },
    /// The referenced Secret is not a usable bootstrap token.
    #[error("VM {vm:?}: spec.bootstrap.kubernetes.tokenSecretRef: secret {TOKEN_NAMESPACE}/{secret} is not a bootstrap token: {problem}")]
    SecretMalformed {
        /// The VM.
        vm: String,
        /// The Secret's name.
        secret: String,
        /// What is wrong (never the token itself).
        problem: String,
    },
    /// The referenced Secret's token has expired.
    #[error("VM {vm:?}: spec.bootstrap.kubernetes.tokenSecretRef: the token in secret {TOKEN_NAMESPACE}/{secret} expired at {expiration}")]
    SecretExpired {
        /// The VM.
        vm: String,
        /// The Secret's name.
        secret: String,
        /// Its `expiration`.
        expiration: String,
    },
    /// A call to the API server failed.
    #[error("VM {vm:?}: bootstrap token")]
    Kube {
        /// The VM.
        vm: String,
        /// The failed call.
        #[source]
        source: ApiCallError,
    },
    /// No random bytes for a new token.
    #[error("VM {vm:?}: cannot read random bytes for a bootstrap token")]
    Random {
        /// The VM.
        vm: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl BootstrapError {
    /// Retrying cannot help without a change to the spec, the Secret, RBAC or the daemon's flags.
    pub fn is_permanent(&self) -> bool {
        match self {
            BootstrapError::Kube { source, .. } => source.is_permanent(),
            BootstrapError::Random { .. } => false,
            _ => true,
        }
    }
}

/// The bootstrap-token Secret the controller creates for `vm` on `host`, valid until `expires`.
pub fn token_secret(vm: &str, host: &str, token: &BootstrapToken, expires: SystemTime) -> Secret {
    let data = |s: &str| ByteString(s.as_bytes().to_vec());
    let data: BTreeMap<String, ByteString> = [
        ("token-id", data(token.id())),
        ("token-secret", data(token.secret())),
        ("expiration", data(&rfc3339(expires))),
        ("usage-bootstrap-authentication", data("true")),
        ("usage-bootstrap-signing", data("true")),
        ("auth-extra-groups", data(NODE_TOKEN_GROUP)),
        ("description", data(&format!("kubeadm join of ignite VM {vm} on host {host}"))),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(token.secret_name()),
            namespace: Some(TOKEN_NAMESPACE.into()),
            labels: Some(token_labels(vm, host)),
            ..Default::default()
        },
        type_: Some(TOKEN_SECRET_TYPE.into()),
        data: Some(data),
        ..Default::default()
    }
}

fn token_labels(vm: &str, host: &str) -> BTreeMap<String, String> {
    [(VM_LABEL.to_string(), vm.to_string()), (HOST_LABEL.to_string(), label_value(host))].into()
}

/// `when` as RFC 3339 in UTC, whole seconds.
pub fn rfc3339(when: SystemTime) -> String {
    let secs = when.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Timestamp::from_second(i64::try_from(secs).unwrap_or(i64::MAX)).map(|t| t.to_string()).unwrap_or_default()
}

/// What a bootstrap-token Secret holds, checked.
#[derive(Debug)]
pub struct SecretToken {
    /// The token.
    pub token: BootstrapToken,
    /// When it expires (`None`: never).
    pub expires: Option<SystemTime>,
}

/// Reads the token out of a bootstrap-token Secret. The problem names the key at fault, never its value.
pub fn token_from_secret(secret: &Secret) -> Result<SecretToken, String> {
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    if secret.type_.as_deref() != Some(TOKEN_SECRET_TYPE) {
        return Err(format!(
            "its type is {:?}, the API server only honours type {TOKEN_SECRET_TYPE}",
            secret.type_.as_deref().unwrap_or("")
        ));
    }
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let text = |key: &str| -> Result<Option<String>, String> {
        match data.get(key) {
            None => Ok(None),
            Some(v) => String::from_utf8(v.0.clone()).map(Some).map_err(|_| format!("data.{key} is not UTF-8")),
        }
    };
    let id = text("token-id")?.ok_or("data.token-id is missing")?;
    let secret_part = text("token-secret")?.ok_or("data.token-secret is missing")?;
    let token = BootstrapToken::from_parts(id.trim(), secret_part.trim()).map_err(|e| format!("data.{e}"))?;
    if name != token.secret_name() {
        return Err(format!("its name must be bootstrap-token-<token-id>, i.e. {}", token.secret_name()));
    }
    if text("usage-bootstrap-authentication")?.as_deref().map(str::trim) != Some("true") {
        return Err("data.usage-bootstrap-authentication must be \"true\" for kubeadm join".into());
    }
    let expires = match text("expiration")? {
        None => None,
        Some(e) => {
            let at: Timestamp =
                e.trim().parse().map_err(|_| format!("data.expiration {:?} is not an RFC 3339 time", e.trim()))?;
            Some(SystemTime::from(at))
        }
    };
    Ok(SecretToken { token, expires })
}

/// kubeadm's `JoinConfiguration` (`kubeadm.k8s.io/v1beta3`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JoinConfiguration<'a> {
    api_version: &'static str,
    kind: &'static str,
    discovery: Discovery<'a>,
    node_registration: NodeRegistration<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Discovery<'a> {
    bootstrap_token: BootstrapTokenDiscovery<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BootstrapTokenDiscovery<'a> {
    api_server_endpoint: &'a str,
    token: String,
    ca_cert_hashes: Vec<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NodeRegistration<'a> {
    name: &'a str,
    kubelet_extra_args: BTreeMap<&'static str, String>,
}

/// The kubeadm join configuration of `vm`: discovery by bootstrap token with the CA pinned, the node
/// named after the VM, and its provider ID `ignite://HOST/VM`.
pub fn join_configuration(vm: &str, provider_id: &str, k8s: &KubernetesBootstrap, token: &BootstrapToken) -> String {
    let config = JoinConfiguration {
        api_version: "kubeadm.k8s.io/v1beta3",
        kind: "JoinConfiguration",
        discovery: Discovery {
            bootstrap_token: BootstrapTokenDiscovery {
                api_server_endpoint: &k8s.api_server_endpoint,
                token: token.expose(),
                ca_cert_hashes: vec![&k8s.ca_cert_hash],
            },
        },
        node_registration: NodeRegistration {
            name: vm,
            kubelet_extra_args: [("provider-id", provider_id.to_string())].into(),
        },
    };
    serde_yaml::to_string(&config).expect("a join configuration serializes")
}

/// What the config drive carries for the guest: the join configuration at [`JOIN_CONFIG_PATH`],
/// run with `kubeadm join --config`, and the token's parts to hide from the console.
pub fn guest_join(vm: &str, provider_id: &str, k8s: &KubernetesBootstrap, token: &BootstrapToken) -> JoinConfig {
    JoinConfig {
        config_path: JOIN_CONFIG_PATH.into(),
        config: join_configuration(vm, provider_id, k8s, token),
        command: Vec::new(),
        redact: vec![token.expose(), token.secret().to_string()],
    }
}

/// The token `vm` joins with: read from `tokenSecretRef`, or created (reusing one this host made
/// for the VM that stays valid for at least half the TTL, and deleting the others). `now` is the
/// clock, passed in so expiry is testable.
pub async fn token_for(
    access: &KubeAccess,
    vm: &str,
    k8s: &KubernetesBootstrap,
    now: SystemTime,
) -> Result<BootstrapToken, BootstrapError> {
    match &k8s.token_secret_ref {
        Some(name) => referenced_token(access, vm, name, now).await,
        None => created_token(access, vm, now).await,
    }
}

fn secrets_api(access: &KubeAccess) -> Api<Secret> {
    Api::namespaced(access.client.clone(), TOKEN_NAMESPACE)
}

const SECRETS: &str = "secrets in namespace kube-system";

async fn referenced_token(
    access: &KubeAccess,
    vm: &str,
    name: &str,
    now: SystemTime,
) -> Result<BootstrapToken, BootstrapError> {
    let kube = |source| BootstrapError::Kube { vm: vm.into(), source };
    let secret = secrets_api(access)
        .get_opt(name)
        .await
        .map_err(|e| kube(ApiCallError::from_client("get", SECRETS, e)))?
        .ok_or_else(|| BootstrapError::SecretMissing { vm: vm.into(), secret: name.into() })?;
    let found = token_from_secret(&secret).map_err(|problem| BootstrapError::SecretMalformed {
        vm: vm.into(),
        secret: name.into(),
        problem,
    })?;
    if let Some(expires) = found.expires.filter(|&at| at <= now) {
        return Err(BootstrapError::SecretExpired { vm: vm.into(), secret: name.into(), expiration: rfc3339(expires) });
    }
    Ok(found.token)
}

fn vm_selector(access: &KubeAccess, vm: &str) -> ListParams {
    ListParams::default().labels(&format!("{VM_LABEL}={vm},{HOST_LABEL}={}", label_value(&access.host)))
}

async fn created_token(access: &KubeAccess, vm: &str, now: SystemTime) -> Result<BootstrapToken, BootstrapError> {
    let kube = |source| BootstrapError::Kube { vm: vm.into(), source };
    let api = secrets_api(access);
    let existing =
        api.list(&vm_selector(access, vm)).await.map_err(|e| kube(ApiCallError::from_client("list", SECRETS, e)))?;
    let fresh_until = now + access.token_ttl / 2;
    let mut reused = None;
    for secret in existing.items {
        let name = secret.metadata.name.clone().unwrap_or_default();
        match token_from_secret(&secret) {
            Ok(found) if reused.is_none() && found.expires.is_some_and(|at| at > fresh_until) => {
                reused = Some(found.token);
            }
            _ => delete_secret(&api, &name).await.map_err(kube)?,
        }
    }
    if let Some(token) = reused {
        info!(vm, secret = %token.secret_name(), "reusing the VM's bootstrap token");
        return Ok(token);
    }
    let token = BootstrapToken::generate().map_err(|source| BootstrapError::Random { vm: vm.into(), source })?;
    let secret = token_secret(vm, &access.host, &token, now + access.token_ttl);
    api.create(&PostParams::default(), &secret)
        .await
        .map_err(|e| kube(ApiCallError::from_client("create", SECRETS, e)))?;
    info!(vm, secret = %token.secret_name(), ttl = ?access.token_ttl, "created a bootstrap token");
    Ok(token)
}

async fn delete_secret(api: &Api<Secret>, name: &str) -> Result<(), ApiCallError> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(::kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(ApiCallError::from_client("delete", SECRETS, e)),
    }
}

/// Deletes every bootstrap token this host created for `vm` (the VM is gone). Idempotent.
pub async fn delete_tokens(access: &KubeAccess, vm: &str) -> Result<usize, ApiCallError> {
    let api = secrets_api(access);
    let existing =
        api.list(&vm_selector(access, vm)).await.map_err(|e| ApiCallError::from_client("list", SECRETS, e))?;
    let mut deleted = 0;
    for secret in existing.items {
        delete_secret(&api, secret.metadata.name.as_deref().unwrap_or_default()).await?;
        deleted += 1;
    }
    Ok(deleted)
}

#[cfg(test)]
#[path = "bootstrap_tests.rs"]
mod tests;
