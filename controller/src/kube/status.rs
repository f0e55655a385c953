//! The status a host writes back to a MicroVM: the store's [`VmStatus`] in the shape Flux and
//! Argo CD understand (kstatus conditions and `observedGeneration`), plus where the VM runs.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::api::conditions::{self, Summary};
use crate::api::{Condition, ConditionStatus, ConditionType, Phase, VmStatus};

/// The observed state of a MicroVM, written through the status subresource by the host running it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MicroVmStatus {
    /// The `metadata.generation` this status describes (kstatus: Ready with an older generation is
    /// not current).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready / Reconciling / Stalled, kstatus style: exactly one is `True`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// `Pending`, `Creating`, `Running`, `Stopped`, `Failed` or `Deleting`.
    #[serde(default)]
    pub phase: Option<Phase>,
    /// The guest's IPv4 address.
    #[serde(default)]
    pub ip: Option<String>,
    /// The host running the VM.
    #[serde(default)]
    pub host: Option<String>,
    /// The VM's name on that host (`<namespace>-<name>`), as `ignite ps` shows it.
    #[serde(default)]
    pub vm_name: Option<String>,
    /// The Kubernetes Node the guest registered as, when it joins the cluster
    /// (`spec.bootstrap.kubernetes`).
    #[serde(default)]
    pub node_ref: Option<String>,
}

impl MicroVmStatus {
    /// The status of a MicroVM at `generation` whose VM is in the store with status `vm`. The
    /// store holds a `Ready` only for the spec the VM runs ([`Store::update_status`]), so a rollout
    /// is never taken for done before the new VM runs. A VM not looked at yet shows as
    /// `Reconciling/Pending`, with the transition times `previous` (what the object shows) has.
    ///
    /// [`Store::update_status`]: crate::store::Store::update_status
    pub fn observed(
        vm: &VmStatus,
        generation: Option<i64>,
        host: &str,
        vm_name: &str,
        previous: Option<&MicroVmStatus>,
    ) -> Self {
        let mut conditions = vm.conditions.clone();
        if conditions.is_empty() {
            // Stored, not yet looked at by the reconciler.
            let summary = Summary::new(Phase::Pending, ConditionType::Reconciling, "Pending", "queued on the host");
            let base = previous.filter(|p| !p.conditions.is_empty()).map_or(conditions, |p| p.conditions.clone());
            let mut pending = VmStatus { conditions: base, ..Default::default() };
            conditions::apply(&mut pending, &summary, &conditions::now_rfc3339());
            conditions = pending.conditions;
        }
        MicroVmStatus {
            observed_generation: generation,
            conditions,
            phase: Some(vm.phase),
            ip: vm.ip.clone(),
            host: Some(host.to_string()),
            vm_name: Some(vm_name.to_string()),
            node_ref: vm.node_ref.clone(),
        }
    }

    /// `previous` with `condition` made the true one (`Stalled` for a spec this host cannot run,
    /// `Reconciling` while deleting), transition times kept where the truth did not change.
    pub fn with_summary(previous: Option<&MicroVmStatus>, summary: &Summary, generation: Option<i64>) -> Self {
        let mut status = previous.cloned().unwrap_or_default();
        let mut vm = VmStatus { conditions: status.conditions.clone(), phase: summary.phase, ..Default::default() };
        conditions::apply(&mut vm, summary, &conditions::now_rfc3339());
        status.conditions = vm.conditions;
        status.phase = Some(summary.phase);
        status.observed_generation = generation;
        status
    }

    /// The condition that is `True`, if any.
    pub fn current(&self) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.status == ConditionStatus::True)
    }

    /// Whether the VM is where its spec wants it (Ready is true).
    pub fn is_ready(&self) -> bool {
        self.current().is_some_and(|c| c.type_ == ConditionType::Ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_status_is_mirrored() {
        let mut vm = VmStatus {
            phase: Phase::Running,
            ip: Some("10.61.0.2".into()),
            node_ref: Some("node-a".into()),
            ..Default::default()
        };
        conditions::apply(&mut vm, &Summary::new(Phase::Running, ConditionType::Ready, "Running", ""), "t1");
        vm.observed_generation = 4;
        let status = MicroVmStatus::observed(&vm, Some(3), "h1", "ns-web", None);
        assert_eq!(status.observed_generation, Some(3));
        assert!(status.is_ready());
        assert_eq!((status.ip.as_deref(), status.node_ref.as_deref()), (Some("10.61.0.2"), Some("node-a")));
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["conditions"][0]["type"], "Ready");
        assert_eq!(json["conditions"][0]["status"], "True");
        assert_eq!(json["phase"], "Running");
    }

    #[test]
    fn a_stalled_summary_keeps_the_transition_time_of_unchanged_conditions() {
        let mut vm = VmStatus::default();
        conditions::apply(&mut vm, &Summary::new(Phase::Running, ConditionType::Ready, "Running", ""), "t1");
        let running = MicroVmStatus::observed(&vm, Some(1), "h1", "ns-web", None);
        let bad = Summary::new(Phase::Running, ConditionType::Stalled, "InvalidSpec", "spec.memory: lots");
        let stalled = MicroVmStatus::with_summary(Some(&running), &bad, Some(2));
        let current = stalled.current().unwrap();
        assert_eq!((current.type_, current.reason.as_str()), (ConditionType::Stalled, "InvalidSpec"));
        assert_eq!(stalled.observed_generation, Some(2));
        assert!(!stalled.is_ready());
        let reconciling = stalled.conditions.iter().find(|c| c.type_ == ConditionType::Reconciling).unwrap();
        assert_eq!(reconciling.last_transition_time, "t1", "stayed False");
    }

    #[test]
    fn a_vm_not_looked_at_yet_is_pending_and_keeps_the_transition_time_the_object_shows() {
        let pending = MicroVmStatus::observed(&VmStatus::default(), Some(1), "h1", "ns-web", None);
        let current = pending.current().unwrap();
        assert_eq!((current.type_, current.reason.as_str()), (ConditionType::Reconciling, "Pending"));
        let mut shown = pending.clone();
        shown.conditions.iter_mut().for_each(|c| c.last_transition_time = "t0".into());
        let again = MicroVmStatus::observed(&VmStatus::default(), Some(1), "h1", "ns-web", Some(&shown));
        assert_eq!(again, shown, "a pass while pending writes nothing new");
    }
}
