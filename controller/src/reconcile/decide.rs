//! The pure heart of the reconciler: given what is declared and what exists, which single step
//! comes next. Level-triggered: the answer depends only on the two views, never on history, so
//! calling it again after a crash or a lost event gives the same answer.

use crate::api::{DesiredState, RestartPolicy};

use super::runtime::{Actual, Exit};

/// What the store says a VM should be (a view of its record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredView {
    /// Fingerprint of the spec ([`crate::api::VmSpec::fingerprint`]).
    pub fingerprint: String,
    /// Running or Stopped.
    pub state: DesiredState,
    /// What to do after the main process ends.
    pub restart_policy: RestartPolicy,
    /// With [`RestartPolicy::OnFailure`]: the most restarts in a row (`None`: no limit).
    pub max_restarts: Option<u32>,
    /// Restarts since the last start that was not a restart (`status.restarts`).
    pub restarts: u32,
}

/// The next step towards the desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing exists yet: prepare image, disk, network and config.
    Create,
    /// The VM exists but was built from another spec: tear it down (keeping its lease) and build it again.
    Recreate,
    /// Prepared and not running, should run.
    Start {
        /// The VM ran before and ended on its own: this start is a restart (counted, backed off).
        restart: bool,
    },
    /// Running, should not run.
    Stop,
    /// Stopped as asked after its main process ended on its own: forget that exit, so the next
    /// start is a fresh start, not a restart the restart policy would refuse.
    ForgetExit,
    /// The object is gone or being deleted: remove everything it owns.
    Delete,
    /// Nothing to do; the VM is where it should be.
    Settled(Settled),
}

/// Why a VM needs nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settled {
    /// Running as asked.
    Running,
    /// Stopped as asked.
    Stopped,
    /// Its main process ended and the restart policy says to leave it.
    Completed(Exit),
    /// Nothing exists and nothing is wanted.
    Gone,
}

/// Whether the restart policy restarts a VM after this exit.
pub fn restarts(desired: &DesiredView, exit: &Exit) -> bool {
    match desired.restart_policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => !exit.succeeded() && desired.max_restarts.is_none_or(|max| desired.restarts < max),
        RestartPolicy::Never => false,
    }
}

/// Decides the next step for one VM. `desired` is `None` when the object is gone from the store or
/// marked for deletion.
pub fn decide(desired: Option<&DesiredView>, actual: &Actual) -> Step {
    let Some(desired) = desired else {
        return if actual.is_empty() { Step::Settled(Settled::Gone) } else { Step::Delete };
    };
    match &actual.prepared {
        None => return Step::Create,
        Some(built_from) if *built_from != desired.fingerprint => return Step::Recreate,
        Some(_) => {}
    }
    match (desired.state, actual.running) {
        (DesiredState::Running, true) => Step::Settled(Settled::Running),
        (DesiredState::Stopped, true) => Step::Stop,
        (DesiredState::Stopped, false) if actual.last_exit.is_some() => Step::ForgetExit,
        (DesiredState::Stopped, false) => Step::Settled(Settled::Stopped),
        (DesiredState::Running, false) => match &actual.last_exit {
            None => Step::Start { restart: false },
            Some(exit) if restarts(desired, exit) => Step::Start { restart: true },
            Some(exit) => Step::Settled(Settled::Completed(exit.clone())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(state: DesiredState, restart_policy: RestartPolicy) -> DesiredView {
        DesiredView { fingerprint: "f1".into(), state, restart_policy, max_restarts: None, restarts: 0 }
    }

    fn actual(prepared: Option<&str>, running: bool, last_exit: Option<Exit>) -> Actual {
        Actual { prepared: prepared.map(String::from), running, last_exit, leftovers: Vec::new() }
    }

    fn exit(code: i32) -> Exit {
        Exit { code: Some(code), crashed: false, detail: String::new() }
    }

    #[test]
    fn nothing_declared_nothing_there_is_gone_and_leftovers_are_deleted() {
        assert_eq!(decide(None, &Actual::default()), Step::Settled(Settled::Gone));
        assert_eq!(decide(None, &actual(Some("f1"), true, None)), Step::Delete);
        let mut only_tap = Actual::default();
        only_tap.leftovers.push("tap ign123".into());
        assert_eq!(decide(None, &only_tap), Step::Delete);
    }

    #[test]
    fn a_new_vm_is_created_then_started() {
        let d = desired(DesiredState::Running, RestartPolicy::Always);
        assert_eq!(decide(Some(&d), &Actual::default()), Step::Create);
        assert_eq!(decide(Some(&d), &actual(Some("f1"), false, None)), Step::Start { restart: false });
        assert_eq!(decide(Some(&d), &actual(Some("f1"), true, None)), Step::Settled(Settled::Running));
    }

    #[test]
    fn a_changed_spec_recreates_whether_running_or_not() {
        let d = desired(DesiredState::Running, RestartPolicy::Always);
        assert_eq!(decide(Some(&d), &actual(Some("old"), true, None)), Step::Recreate);
        assert_eq!(decide(Some(&d), &actual(Some("old"), false, Some(exit(1)))), Step::Recreate);
        let stopped = desired(DesiredState::Stopped, RestartPolicy::Never);
        assert_eq!(decide(Some(&stopped), &actual(Some("old"), false, None)), Step::Recreate);
    }

    #[test]
    fn desired_stopped_stops_and_stays_stopped() {
        let d = desired(DesiredState::Stopped, RestartPolicy::Always);
        assert_eq!(decide(Some(&d), &actual(Some("f1"), true, None)), Step::Stop);
        assert_eq!(decide(Some(&d), &actual(Some("f1"), false, None)), Step::Settled(Settled::Stopped));
        assert_eq!(decide(Some(&d), &Actual::default()), Step::Create);
    }

    #[test]
    fn a_vm_stopped_after_it_ended_forgets_its_exit_so_start_runs_it_again() {
        let stopped = desired(DesiredState::Stopped, RestartPolicy::Never);
        assert_eq!(decide(Some(&stopped), &actual(Some("f1"), false, Some(exit(3)))), Step::ForgetExit);
        let running = desired(DesiredState::Running, RestartPolicy::Never);
        assert_eq!(decide(Some(&running), &actual(Some("f1"), false, None)), Step::Start { restart: false });
    }

    #[test]
    fn on_failure_gives_up_after_max_restarts() {
        let mut d = desired(DesiredState::Running, RestartPolicy::OnFailure);
        d.max_restarts = Some(2);
        for (restarts, step) in [
            (0, Step::Start { restart: true }),
            (1, Step::Start { restart: true }),
            (2, Step::Settled(Settled::Completed(exit(1)))),
        ] {
            d.restarts = restarts;
            assert_eq!(decide(Some(&d), &actual(Some("f1"), false, Some(exit(1)))), step, "after {restarts} restarts");
        }
        assert_eq!(
            decide(Some(&d), &actual(Some("f1"), false, Some(exit(0)))),
            Step::Settled(Settled::Completed(exit(0)))
        );
        d.max_restarts = Some(0);
        d.restarts = 0;
        assert_eq!(
            decide(Some(&d), &actual(Some("f1"), false, Some(exit(1)))),
            Step::Settled(Settled::Completed(exit(1)))
        );
    }

    #[test]
    fn restart_policy_decides_after_an_exit() {
        let cases = [
            (RestartPolicy::Always, exit(0), true),
            (RestartPolicy::Always, exit(3), true),
            (RestartPolicy::OnFailure, exit(0), false),
            (RestartPolicy::OnFailure, exit(3), true),
            (RestartPolicy::OnFailure, Exit { code: None, crashed: true, detail: "triple fault".into() }, true),
            (RestartPolicy::Never, exit(3), false),
        ];
        for (policy, e, restart) in cases {
            let d = desired(DesiredState::Running, policy);
            let step = decide(Some(&d), &actual(Some("f1"), false, Some(e.clone())));
            if restart {
                assert_eq!(step, Step::Start { restart: true }, "{policy:?} {e:?}");
            } else {
                assert_eq!(step, Step::Settled(Settled::Completed(e)), "{policy:?}");
            }
        }
    }
}
