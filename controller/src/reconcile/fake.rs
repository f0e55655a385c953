//! An in-memory [`Runtime`] for tests of the reconciler's logic: it records every call, keeps
//! per-VM state like the real host would, and fails on request. The real counterpart is
//! [`crate::host::HostRuntime`], tested with real VMs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use crate::api::Vm;

use super::runtime::{Actual, Exit, Prepared, Runtime, RuntimeError, Started};

/// One recorded call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// `create(name)`.
    Create(String),
    /// `start(name)`.
    Start(String),
    /// `stop(name)`.
    Stop(String),
    /// `forget_exit(name)`.
    ForgetExit(String),
    /// `destroy(name, keep_lease)`.
    Destroy(String, bool),
}

#[derive(Default)]
struct State {
    vms: BTreeMap<String, Actual>,
    calls: Vec<Call>,
    fail: HashMap<(String, &'static str), (u32, bool)>,
    next_pid: u32,
}

/// A fake host. See the module docs.
#[derive(Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
}

impl FakeRuntime {
    /// An empty host.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the next `times` calls of `op` (`"create"`, `"start"`, `"stop"`, `"forget_exit"`, `"destroy"`) for
    /// `name` fail; `permanent` marks the error as needing a spec change.
    pub fn fail(&self, name: &str, op: &'static str, times: u32, permanent: bool) {
        self.lock().fail.insert((name.to_string(), op), (times, permanent));
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Forgets the recorded calls.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// The state of `name`, if anything exists.
    pub fn actual(&self, name: &str) -> Option<Actual> {
        self.lock().vms.get(name).cloned()
    }

    /// Simulates the VM's main process ending on its own.
    pub fn exit(&self, name: &str, exit: Exit) {
        if let Some(vm) = self.lock().vms.get_mut(name) {
            vm.running = false;
            vm.last_exit = Some(exit);
        }
    }

    /// Simulates resources a crash left behind for `name` (e.g. a tap without a VM).
    pub fn leave_behind(&self, name: &str, what: &str) {
        self.lock().vms.entry(name.to_string()).or_default().leftovers.push(what.to_string());
    }

    fn check(state: &mut State, name: &str, op: &'static str) -> Result<(), RuntimeError> {
        if let Some((times, permanent)) = state.fail.get_mut(&(name.to_string(), op)) {
            if *times > 0 {
                *times -= 1;
                let message = format!("injected {op} failure for VM {name:?}");
                return Err(RuntimeError { reason: "InjectedFailure", message, permanent: *permanent });
            }
        }
        Ok(())
    }
}

impl Runtime for FakeRuntime {
    fn inspect(&self, name: &str) -> Result<Actual, RuntimeError> {
        Ok(self.lock().vms.get(name).cloned().unwrap_or_default())
    }

    fn create(&self, vm: &Vm, fingerprint: &str) -> Result<Prepared, RuntimeError> {
        let mut state = self.lock();
        let name = vm.metadata.name.clone();
        state.calls.push(Call::Create(name.clone()));
        Self::check(&mut state, &name, "create")?;
        let index = state.vms.len();
        let entry = state.vms.entry(name).or_default();
        entry.prepared = Some(fingerprint.to_string());
        entry.leftovers.clear();
        Ok(Prepared {
            ip: Some(format!("10.61.0.{}", index + 2)),
            mac: Some(format!("02:00:00:00:00:{:02x}", index + 2)),
            image_digest: None,
        })
    }

    fn start(&self, vm: &Vm) -> Result<Started, RuntimeError> {
        let mut state = self.lock();
        let name = vm.metadata.name.clone();
        state.calls.push(Call::Start(name.clone()));
        Self::check(&mut state, &name, "start")?;
        state.next_pid += 1;
        let pid = 1000 + state.next_pid;
        let entry = state.vms.get_mut(&name).ok_or_else(|| {
            RuntimeError::transient("NotPrepared", format!("VM {name:?} is not prepared (create it first)"))
        })?;
        entry.running = true;
        entry.last_exit = None;
        Ok(Started { pid, jailed: true, boot: crate::api::BootStatus { mode: "cold".into(), ..Default::default() } })
    }

    fn stop(&self, name: &str, _grace: Duration) -> Result<(), RuntimeError> {
        let mut state = self.lock();
        state.calls.push(Call::Stop(name.to_string()));
        Self::check(&mut state, name, "stop")?;
        if let Some(vm) = state.vms.get_mut(name) {
            vm.running = false;
            vm.last_exit = None;
        }
        Ok(())
    }

    fn forget_exit(&self, name: &str) -> Result<(), RuntimeError> {
        let mut state = self.lock();
        state.calls.push(Call::ForgetExit(name.to_string()));
        Self::check(&mut state, name, "forget_exit")?;
        if let Some(vm) = state.vms.get_mut(name) {
            vm.last_exit = None;
        }
        Ok(())
    }

    fn destroy(&self, name: &str, keep_lease: bool) -> Result<(), RuntimeError> {
        let mut state = self.lock();
        state.calls.push(Call::Destroy(name.to_string(), keep_lease));
        Self::check(&mut state, name, "destroy")?;
        state.vms.remove(name);
        Ok(())
    }

    fn list(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(self.lock().vms.keys().cloned().collect())
    }
}
