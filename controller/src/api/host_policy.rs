//! What this host lets a manifest name besides its own VM: host files ([`HostPaths`]) and host
//! ports ([`PortPolicy`]). The operator sets both on the daemon; manifests come from whoever can
//! push to the fleet repository or reach the API, so nothing here is up to them.

use std::collections::BTreeMap;

use super::host_paths::HostPaths;
use super::types::Vm;
use super::validate::Problem;

/// The host port no VM may ever forward: the host's own SSH.
pub const SSH_PORT: u16 = 22;
/// Ports below this need `--allow-privileged-ports`.
pub const FIRST_UNPRIVILEGED_PORT: u16 = 1024;

/// Which host ports VMs may forward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortPolicy {
    /// Whether ports below [`FIRST_UNPRIVILEGED_PORT`] may be forwarded.
    allow_privileged: bool,
    /// Ports no VM may take (any protocol), with what they are for.
    reserved: BTreeMap<u16, String>,
}

impl Default for PortPolicy {
    /// Privileged ports refused; [`SSH_PORT`] reserved.
    fn default() -> Self {
        let reserved = BTreeMap::from([(SSH_PORT, "the host's SSH".to_string())]);
        PortPolicy { allow_privileged: false, reserved }
    }
}

impl PortPolicy {
    /// Also allows ports below [`FIRST_UNPRIVILEGED_PORT`] when `allow` (`--allow-privileged-ports`).
    pub fn allow_privileged(mut self, allow: bool) -> Self {
        self.allow_privileged = allow;
        self
    }

    /// Also reserves `port`, which `what` uses (e.g. the daemon's own `--listen`).
    pub fn reserve(mut self, port: u16, what: &str) -> Self {
        self.reserved.insert(port, what.to_string());
        self
    }

    /// Every host port of `vm` this policy refuses, as validation problems.
    pub fn check(&self, vm: &Vm) -> Vec<Problem> {
        let mut problems = Vec::new();
        for (i, port) in vm.spec.network.ports.iter().enumerate() {
            let field = format!("spec.network.ports[{i}]");
            if let Some(what) = self.reserved.get(&port.host_port) {
                problems.push((field, format!("host port {} is reserved for {what}", port.host_port)));
            } else if port.host_port < FIRST_UNPRIVILEGED_PORT && !self.allow_privileged {
                let message = format!(
                    "host port {} is privileged (below {FIRST_UNPRIVILEGED_PORT}): the operator must start the daemon with --allow-privileged-ports",
                    port.host_port
                );
                problems.push((field, message));
            }
        }
        problems
    }
}

/// Everything this host lets manifests name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostPolicy {
    /// Host files.
    pub paths: HostPaths,
    /// Host ports.
    pub ports: PortPolicy,
}

impl HostPolicy {
    /// Every problem of `vm` under this policy.
    pub fn check(&self, vm: &Vm) -> Vec<Problem> {
        let mut problems = self.paths.check(vm);
        problems.extend(self.ports.check(vm));
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(ports: &str) -> Vm {
        let doc = format!(
            "apiVersion: ignite.dev/v1alpha1\nkind: VM\nmetadata: {{name: a}}\nspec:\n  image: busybox\n  network: {{ports: {ports}}}\n"
        );
        serde_yaml::from_str(&doc).unwrap()
    }

    #[test]
    fn ssh_the_daemons_port_and_privileged_ports_are_refused() {
        let policy = PortPolicy::default().reserve(7443, "the daemon's API (--listen)");
        let problems = policy.check(&vm("[\"22:22\", \"7443:80\", \"80:80/udp\", \"8080:80\"]"));
        let got: Vec<(&str, &str)> = problems.iter().map(|(f, m)| (f.as_str(), m.as_str())).collect();
        assert_eq!(got[0], ("spec.network.ports[0]", "host port 22 is reserved for the host's SSH"));
        assert_eq!(got[1], ("spec.network.ports[1]", "host port 7443 is reserved for the daemon's API (--listen)"));
        assert_eq!(got[2].0, "spec.network.ports[2]");
        assert!(got[2].1.contains("--allow-privileged-ports"), "{problems:?}");
        assert_eq!(got.len(), 3, "8080 is fine: {problems:?}");
        let open = PortPolicy::default().allow_privileged(true);
        assert_eq!(open.check(&vm("[\"80:80\", \"443:443\"]")), Vec::<Problem>::new());
        assert_eq!(open.check(&vm("[\"22:2222\"]")).len(), 1, "SSH stays reserved");
    }
}
