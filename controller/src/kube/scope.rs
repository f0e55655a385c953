//! Which VMs may have the daemon hand them a bootstrap token (`spec.bootstrap.kubernetes`).
//!
//! A token lets a machine join the cluster as a node, and the daemon's identity can read and
//! create them in `kube-system`; without a bound, anyone who may create a MicroVM in any namespace
//! (or push to the fleet repository) could have any token Secret of `kube-system` copied into a VM
//! they control. So both are allow-lists on the daemon, empty by default:
//!
//! - `--kube-token-secret NS/NAME`: MicroVMs of namespace `NS` may name `tokenSecretRef: NAME`.
//! - `--kube-bootstrap-namespaces NS`: MicroVMs of namespace `NS` may ask for `createToken`.
//!
//! VMs from this host's own git, directory and API sources have no namespace; they stand as
//! [`HOST_SOURCES`] (`@host`, which no namespace can be called) in both lists.

use std::collections::BTreeSet;

use crate::api::KubernetesBootstrap;

use super::bootstrap::TOKEN_NAMESPACE;

/// What VMs from this host's own sources (git, directory, API) are called in the allow-lists.
pub const HOST_SOURCES: &str = "@host";

/// The allow-lists (see the module docs). The default allows nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootstrapScope {
    token_secrets: BTreeSet<(String, String)>,
    create_token: BTreeSet<String>,
}

/// A flag value that is not `NAMESPACE/NAME` or not a namespace.
#[derive(Debug, thiserror::Error)]
#[error("{value:?}: {problem}")]
pub struct ScopeError {
    /// The value given.
    pub value: String,
    /// What is wrong.
    pub problem: &'static str,
}

fn requester_ok(ns: &str) -> bool {
    ns == HOST_SOURCES
        || (!ns.is_empty()
            && ns.len() <= 63
            && ns.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !ns.starts_with('-')
            && !ns.ends_with('-'))
}

impl BootstrapScope {
    /// Lets MicroVMs of namespace `NS` use Secret `kube-system/NAME`, from `NS/NAME`.
    pub fn allow_token_secret(&mut self, entry: &str) -> Result<(), ScopeError> {
        let err = |problem| ScopeError { value: entry.to_string(), problem };
        let (ns, name) = entry.split_once('/').ok_or_else(|| err("expected NAMESPACE/SECRET-NAME"))?;
        if !requester_ok(ns) {
            return Err(err("the namespace must be a DNS label (or @host for this host's own sources)"));
        }
        if name.is_empty() || name.contains('/') {
            return Err(err("expected NAMESPACE/SECRET-NAME"));
        }
        self.token_secrets.insert((ns.to_string(), name.to_string()));
        Ok(())
    }

    /// Lets MicroVMs of namespace `ns` ask for `createToken`.
    pub fn allow_create_token(&mut self, ns: &str) -> Result<(), ScopeError> {
        if !requester_ok(ns) {
            return Err(ScopeError {
                value: ns.to_string(),
                problem: "must be a namespace (a DNS label) or @host for this host's own sources",
            });
        }
        self.create_token.insert(ns.to_string());
        Ok(())
    }

    /// Why the VM `vm` of `requester` (a namespace or [`HOST_SOURCES`]) may not have what `k8s`
    /// asks for, or `None` when it may.
    pub fn refusal(&self, requester: &str, vm: &str, k8s: &KubernetesBootstrap) -> Option<String> {
        let who = if requester == HOST_SOURCES {
            "VMs of this host's own sources (git, directory, API)".to_string()
        } else {
            format!("MicroVMs of namespace {requester:?}")
        };
        match &k8s.token_secret_ref {
            Some(name) if !self.token_secrets.contains(&(requester.to_string(), name.clone())) => Some(format!(
                "VM {vm:?}: spec.bootstrap.kubernetes.tokenSecretRef: {who} may not use secret \
                 {TOKEN_NAMESPACE}/{name}: the daemon allows it with --kube-token-secret {requester}/{name}"
            )),
            None if k8s.create_token && !self.create_token.contains(requester) => Some(format!(
                "VM {vm:?}: spec.bootstrap.kubernetes.createToken: {who} may not have bootstrap tokens created: \
                 the daemon allows it with --kube-bootstrap-namespaces {requester}"
            )),
            _ => None,
        }
    }
}

/// The requester a VM's store owner stands for: the MicroVM's namespace, or [`HOST_SOURCES`].
pub fn requester(owner: &str) -> &str {
    super::select::parse_owner(owner).map_or(HOST_SOURCES, |(ns, _)| ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k8s(secret: Option<&str>, create: bool) -> KubernetesBootstrap {
        let mut doc = serde_json::json!({"apiServerEndpoint": "10.0.0.1:6443",
            "caCertHash": format!("sha256:{}", "a".repeat(64))});
        if let Some(s) = secret {
            doc["tokenSecretRef"] = s.into();
        }
        if create {
            doc["createToken"] = true.into();
        }
        serde_json::from_value(doc).unwrap()
    }

    #[test]
    fn nothing_is_allowed_until_the_daemon_says_so() {
        let mut scope = BootstrapScope::default();
        let e = scope.refusal("team-a", "team--a-web", &k8s(None, true)).unwrap();
        assert!(e.contains("createToken") && e.contains("--kube-bootstrap-namespaces team-a"), "{e}");
        let e = scope.refusal("team-a", "w", &k8s(Some("bootstrap-token-abcdef"), false)).unwrap();
        assert!(e.contains("kube-system/bootstrap-token-abcdef"), "{e}");
        assert!(e.contains("--kube-token-secret team-a/bootstrap-token-abcdef"), "{e}");
        let e = scope.refusal(HOST_SOURCES, "w", &k8s(None, true)).unwrap();
        assert!(e.contains("this host's own sources") && e.contains("--kube-bootstrap-namespaces @host"), "{e}");

        scope.allow_create_token("team-a").unwrap();
        scope.allow_token_secret("team-b/bootstrap-token-abcdef").unwrap();
        assert_eq!(scope.refusal("team-a", "w", &k8s(None, true)), None);
        assert!(scope.refusal("team-b", "w", &k8s(None, true)).is_some(), "per namespace");
        assert_eq!(scope.refusal("team-b", "w", &k8s(Some("bootstrap-token-abcdef"), false)), None);
        assert!(scope.refusal("team-a", "w", &k8s(Some("bootstrap-token-abcdef"), false)).is_some());
        assert!(scope.refusal("team-b", "w", &k8s(Some("bootstrap-token-zzzzzz"), false)).is_some());

        assert!(scope.allow_token_secret("no-slash").is_err());
        assert!(scope.allow_token_secret("Bad_NS/x").is_err());
        assert!(scope.allow_create_token("-x").is_err());
        assert!(scope.allow_create_token(HOST_SOURCES).is_ok());
        assert_eq!(requester("kube:team-a/web"), "team-a");
        assert_eq!(requester("git:fleet"), HOST_SOURCES);
        assert_eq!(requester("api"), HOST_SOURCES);
    }
}
