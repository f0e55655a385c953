//! kstatus-style conditions on [`VmStatus`]: exactly one of Ready / Reconciling / Stalled
//! describes the VM, and a condition's transition time changes only when its truth does.

use crate::api::{Condition, ConditionStatus, ConditionType, Phase, VmStatus};

/// The summary the reconciler wants the status to show after a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// New phase.
    pub phase: Phase,
    /// Which condition is true; the other two become false.
    pub condition: ConditionType,
    /// CamelCase reason.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
}

impl Summary {
    /// A summary with `condition` true.
    pub fn new(phase: Phase, condition: ConditionType, reason: &str, message: impl Into<String>) -> Self {
        Summary { phase, condition, reason: reason.to_string(), message: message.into() }
    }
}

/// Applies `summary` to `status` at time `now` (RFC 3339). Returns whether the true condition or
/// its reason changed (worth an event).
pub fn apply(status: &mut VmStatus, summary: &Summary, now: &str) -> bool {
    let before = current(status);
    status.phase = summary.phase;
    for kind in [ConditionType::Ready, ConditionType::Reconciling, ConditionType::Stalled] {
        let truth = if kind == summary.condition { ConditionStatus::True } else { ConditionStatus::False };
        let (reason, message) = if kind == summary.condition {
            (summary.reason.clone(), summary.message.clone())
        } else {
            (String::new(), String::new())
        };
        match status.conditions.iter_mut().find(|c| c.type_ == kind) {
            Some(existing) => {
                if existing.status != truth {
                    existing.last_transition_time = now.to_string();
                }
                existing.status = truth;
                existing.reason = reason;
                existing.message = message;
            }
            None => status.conditions.push(Condition {
                type_: kind,
                status: truth,
                reason,
                message,
                last_transition_time: now.to_string(),
            }),
        }
    }
    before != current(status)
}

/// The true condition and its reason, if any.
pub fn current(status: &VmStatus) -> Option<(ConditionType, String)> {
    status.conditions.iter().find(|c| c.status == ConditionStatus::True).map(|c| (c.type_, c.reason.clone()))
}

/// RFC 3339 "now", as written into status conditions and events.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_condition_is_true_and_transition_times_move_only_on_change() {
        let mut status = VmStatus::default();
        let creating = Summary::new(Phase::Creating, ConditionType::Reconciling, "Creating", "pulling");
        assert!(apply(&mut status, &creating, "t1"));
        assert_eq!(status.conditions.len(), 3);
        assert!(!apply(&mut status, &creating, "t2"), "same summary: no event");
        let ready = Summary::new(Phase::Running, ConditionType::Ready, "Running", "");
        assert!(apply(&mut status, &ready, "t3"));
        let by_type = |t| status.conditions.iter().find(|c| c.type_ == t).unwrap().clone();
        assert_eq!(by_type(ConditionType::Ready).status, ConditionStatus::True);
        assert_eq!(by_type(ConditionType::Ready).last_transition_time, "t3");
        assert_eq!(by_type(ConditionType::Reconciling).status, ConditionStatus::False);
        assert_eq!(by_type(ConditionType::Stalled).last_transition_time, "t1", "never became true");
        assert_eq!(status.phase, Phase::Running);
    }
}
