//! Which MicroVMs this host takes, and the names they get on it.
//!
//! - A MicroVM with `spec.host` is taken by the host of that name only.
//! - A MicroVM without `spec.host` is taken by every host whose `--kube-selector` matches its
//!   labels (an empty selector matches everything: fine for one host; with several hosts give
//!   each a selector, or set `spec.host`).
//! - On the host, MicroVM `NS/NAME` is the VM `NS-NAME`, owned by `kube:NS/NAME`. Two MicroVMs
//!   mapping to the same VM name (`a-b/c` and `a/b-c`), or one colliding with a VM from git, are an
//!   ownership conflict reported in the second one's status; neither VM is touched.

use std::collections::BTreeMap;

use super::errors::KubeError;

/// One requirement of an equality-based label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// An equality-based label selector (`k=v,k!=v,k,!k`), as `kubectl get -l` takes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
    text: String,
}

impl LabelSelector {
    /// Parses `text`; the empty selector matches every object. Set-based forms (`in`, `notin`) are
    /// refused.
    pub fn parse(text: &str) -> Result<LabelSelector, KubeError> {
        let bad = |reason: &str| KubeError::Selector { selector: text.to_string(), reason: reason.to_string() };
        let mut requirements = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part.contains('(') || part.contains(' ') {
                return Err(bad("set-based requirements (in, notin) are not supported"));
            }
            let valid_key =
                |k: &str| !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
            let requirement = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(k.to_string(), v.to_string())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(k.to_string(), v.to_string())
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(k.to_string())
            } else {
                Requirement::Exists(part.to_string())
            };
            let key = match &requirement {
                Requirement::Equals(k, _)
                | Requirement::NotEquals(k, _)
                | Requirement::Exists(k)
                | Requirement::NotExists(k) => k,
            };
            if !valid_key(key) {
                return Err(bad(&format!("{key:?} is not a label key")));
            }
            requirements.push(requirement);
        }
        Ok(LabelSelector { requirements, text: text.to_string() })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

impl std::fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Whether a MicroVM with `host` (`spec.host`) and `labels` belongs to the host `ours`.
pub fn is_ours(ours: &str, selector: &LabelSelector, host: Option<&str>, labels: &BTreeMap<String, String>) -> bool {
    match host {
        Some(host) => host == ours,
        None => selector.matches(labels),
    }
}

/// The VM name of MicroVM `namespace/name` on the host: the namespace with each `-` doubled, a
/// `-`, and the name (validated like any VM name: a DNS label of at most 63 characters).
///
/// Injective, so two MicroVMs never share a VM: `a-b/c` is `a--b-c`, `a/b-c` is `a-b-c`. A
/// namespace never ends with `-` and a name never starts with one, so the first run of `-` of odd
/// length is the separator. Namespaces without `-` keep the plain `namespace-name`.
pub fn vm_name(namespace: &str, name: &str) -> String {
    format!("{}-{name}", namespace.replace('-', "--"))
}

/// The store owner of MicroVM `namespace/name`: each MicroVM stands alone.
pub fn owner(namespace: &str, name: &str) -> String {
    format!("kube:{namespace}/{name}")
}

/// The MicroVM `(namespace, name)` a store owner stands for; `None` for owners that are not
/// MicroVMs (git, directories, the API).
pub fn parse_owner(owner: &str) -> Option<(&str, &str)> {
    owner.strip_prefix("kube:")?.split_once('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn equality_selectors_match_like_kubectl() {
        let s = LabelSelector::parse("pool=edge, tier!=db,gpu,!spot").unwrap();
        assert!(s.matches(&labels(&[("pool", "edge"), ("gpu", "")])));
        assert!(!s.matches(&labels(&[("pool", "edge")])), "gpu missing");
        assert!(!s.matches(&labels(&[("pool", "edge"), ("gpu", ""), ("spot", "1")])), "spot present");
        assert!(!s.matches(&labels(&[("pool", "edge"), ("gpu", ""), ("tier", "db")])));
        assert!(LabelSelector::parse("").unwrap().matches(&labels(&[])), "empty matches all");
        let err = LabelSelector::parse("env in (a,b)").unwrap_err().to_string();
        assert!(err.contains("\"env in (a,b)\"") && err.contains("set-based"), "{err}");
        assert!(LabelSelector::parse("=x").is_err());
    }

    #[test]
    fn spec_host_wins_over_the_selector() {
        let none = LabelSelector::parse("pool=edge").unwrap();
        let edge = labels(&[("pool", "edge")]);
        assert!(is_ours("h1", &none, Some("h1"), &labels(&[])), "scheduled here, labels irrelevant");
        assert!(!is_ours("h1", &none, Some("h2"), &edge), "scheduled elsewhere");
        assert!(is_ours("h1", &none, None, &edge));
        assert!(!is_ours("h1", &none, None, &labels(&[])));
    }

    #[test]
    fn names_and_owners_include_the_namespace() {
        assert_eq!(vm_name("prod", "web"), "prod-web");
        assert_eq!(vm_name("a-b", "c"), "a--b-c");
        assert_eq!(vm_name("a", "b-c"), "a-b-c");
        assert_ne!(vm_name("a-b", "c"), vm_name("a", "b-c"));
        assert_ne!(vm_name("a--b", "c"), vm_name("a-b", "-c"));
        // Every split of a few names stays apart, and within the VM-name alphabet.
        let parts = ["a", "a-b", "b-c", "a--b", "c", "x-y-z", "x"];
        let mut seen = std::collections::HashMap::new();
        for ns in parts {
            for name in parts {
                let vm = vm_name(ns, name);
                assert!(vm.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'), "{vm}");
                if let Some(other) = seen.insert(vm.clone(), (ns, name)) {
                    panic!("{ns}/{name} and {}/{} both map to {vm}", other.0, other.1);
                }
            }
        }
        assert_eq!(owner("prod", "web"), "kube:prod/web");
        assert_ne!(owner("a-b", "c"), owner("a", "b-c"), "same VM name, different owners: a conflict, not a takeover");
        assert_eq!(parse_owner(&owner("a-b", "c")), Some(("a-b", "c")));
        assert_eq!(parse_owner("git:fleet"), None);
        assert_eq!(parse_owner("api"), None);
    }
}
