//! Host networking: one bridge with the subnet's gateway address, one tap per VM on it, a
//! persistent IP/MAC lease per VM (kept in the store), the guest address set at boot by the
//! kernel's `ip=` argument, and port forwards from the host (iptables DNAT in ignite's own
//! chains, every rule tagged with its VM). Everything is removed with the VM, and leftovers of a
//! crash are found by their names (`ign*` taps, `ignite:<vm>` rule comments).
//!
//! Privileged operations sit behind [`HostNet`]: [`LinuxHostNet`] runs `ip` and `iptables`,
//! [`RecordingHostNet`] (tests) keeps the same state in memory.

#[cfg(any(test, feature = "test-utils"))]
mod fake;
mod linux;
mod names;
mod subnet;

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::api::Protocol;

#[cfg(any(test, feature = "test-utils"))]
pub use fake::RecordingHostNet;
pub use linux::LinuxHostNet;
pub use names::{collision, kernel_ip_arg, mac_for, tap_name, TAP_PREFIX};
pub use subnet::{Subnet, SubnetError};

/// The host network VMs join.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConfig {
    /// The bridge (created if missing).
    pub bridge: String,
    /// Addresses: the bridge takes the first, VMs the others.
    pub subnet: Subnet,
    /// Masquerade VM traffic leaving the host through other interfaces.
    pub masquerade: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig { bridge: "ignite0".into(), subnet: "10.61.0.0/24".parse().expect("valid"), masquerade: false }
    }
}

/// A host port forwarded to a VM.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortForward {
    /// The VM (tags the rule).
    pub vm: String,
    /// Port on the host.
    pub host_port: u16,
    /// The VM's address.
    pub guest_ip: Ipv4Addr,
    /// Port in the guest.
    pub guest_port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
}

/// A host networking operation that failed, with the command's own words.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A command could not be run at all.
    #[error("cannot run {command}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command failed.
    #[error("{command} failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its standard error.
        stderr: String,
    },
    /// A sysctl could not be written.
    #[error("cannot set {path}")]
    Sysctl {
        /// The /proc/sys path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Host network operations. Every method is idempotent.
pub trait HostNet: Send + Sync {
    /// Creates the bridge if missing, gives it the gateway address, brings it up, enables
    /// forwarding, and installs ignite's iptables chains (and masquerading if asked).
    fn ensure_bridge(&self, config: &NetConfig) -> Result<(), NetError>;
    /// Creates tap `name` if missing, attaches it to `bridge` and brings it up.
    fn create_tap(&self, name: &str, bridge: &str) -> Result<(), NetError>;
    /// Deletes tap `name`; a missing tap is fine.
    fn delete_tap(&self, name: &str) -> Result<(), NetError>;
    /// Every tap ignite created ([`TAP_PREFIX`]).
    fn list_taps(&self) -> Result<Vec<String>, NetError>;
    /// Adds a port forward (no duplicate if it exists).
    fn add_port_forward(&self, forward: &PortForward) -> Result<(), NetError>;
    /// Removes every port forward of `vm`.
    fn remove_port_forwards(&self, vm: &str) -> Result<(), NetError>;
    /// Every port forward ignite installed.
    fn list_port_forwards(&self) -> Result<Vec<PortForward>, NetError>;
}
