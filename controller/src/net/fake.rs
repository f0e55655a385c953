//! An in-memory [`HostNet`] for tests of logic; [`super::LinuxHostNet`] is its real counterpart,
//! tested in a network namespace (`tests/net_linux.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::{HostNet, NetConfig, NetError, PortForward};

#[derive(Default)]
struct State {
    bridges: BTreeSet<String>,
    taps: BTreeMap<String, String>,
    forwards: BTreeSet<PortForward>,
    calls: Vec<String>,
}

/// Records calls and keeps bridges, taps and forwards in memory.
#[derive(Default)]
pub struct RecordingHostNet {
    state: Mutex<State>,
}

impl RecordingHostNet {
    /// An empty host.
    pub fn new() -> Self {
        Self::default()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Every call, as `op arg`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }
}

impl HostNet for RecordingHostNet {
    fn ensure_bridge(&self, config: &NetConfig) -> Result<(), NetError> {
        let mut s = self.lock();
        s.calls.push(format!("ensure_bridge {}", config.bridge));
        s.bridges.insert(config.bridge.clone());
        Ok(())
    }
    fn create_tap(&self, name: &str, bridge: &str) -> Result<(), NetError> {
        let mut s = self.lock();
        s.calls.push(format!("create_tap {name}"));
        s.taps.insert(name.to_string(), bridge.to_string());
        Ok(())
    }
    fn delete_tap(&self, name: &str) -> Result<(), NetError> {
        let mut s = self.lock();
        s.calls.push(format!("delete_tap {name}"));
        s.taps.remove(name);
        Ok(())
    }
    fn list_taps(&self) -> Result<Vec<String>, NetError> {
        Ok(self.lock().taps.keys().cloned().collect())
    }
    fn add_port_forward(&self, forward: &PortForward) -> Result<(), NetError> {
        let mut s = self.lock();
        s.calls.push(format!("add_port_forward {} {}", forward.vm, forward.host_port));
        s.forwards.insert(forward.clone());
        Ok(())
    }
    fn remove_port_forwards(&self, vm: &str) -> Result<(), NetError> {
        let mut s = self.lock();
        s.calls.push(format!("remove_port_forwards {vm}"));
        s.forwards.retain(|f| f.vm != vm);
        Ok(())
    }
    fn list_port_forwards(&self) -> Result<Vec<PortForward>, NetError> {
        Ok(self.lock().forwards.iter().cloned().collect())
    }
}
