//! The reconciler's logic against the real sled store and the recording fake runtime: fast, many
//! cases. The same reconciler drives real VMs in `gitops_real.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use controller::api::{ConditionStatus, ConditionType, Phase};
use controller::reconcile::fake::{Call, FakeRuntime};
use controller::reconcile::{Exit, Outcome, Reconciler};
use controller::source::{apply_revision, parse_revision, ApplyError};
use controller::store::Store;

fn manifest(name: &str, memory: &str, extra: &str) -> String {
    format!(
        "apiVersion: ignite.dev/v1alpha1\nkind: VM\nmetadata:\n  name: {name}\nspec:\n  image: 127.0.0.1:5000/busybox:1\n  memory: {memory}\n{extra}"
    )
}

struct Env {
    _dir: tempfile::TempDir,
    store: Store,
    runtime: Arc<FakeRuntime>,
    reconciler: Reconciler,
}

fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let runtime = Arc::new(FakeRuntime::new());
    let config = controller::testing::fast_reconciler_config(4);
    let reconciler = Reconciler::new(store.clone(), runtime.clone(), config);
    Env { _dir: dir, store, runtime, reconciler }
}

impl Env {
    fn apply(&self, owner: &str, revision: &str, files: &[(&str, &str)]) -> Result<Vec<String>, ApplyError> {
        let docs = parse_revision(revision, files.iter().copied(), &Default::default())?;
        let report = apply_revision(&self.store, owner, revision, &docs)?;
        Ok(report.touched().cloned().collect())
    }

    fn reconcile(&self, name: &str) -> Outcome {
        self.reconciler.reconcile(name).unwrap_or_else(|e| panic!("reconcile {name}: {e}"))
    }

    fn status(&self, name: &str) -> controller::api::VmStatus {
        self.store.get_vm(name).unwrap().unwrap_or_else(|| panic!("{name} is in the store")).status
    }

    fn ready(&self, name: &str) -> (ConditionStatus, String) {
        let status = self.status(name);
        let c = status.conditions.iter().find(|c| c.type_ == ConditionType::Ready).expect("Ready condition");
        (c.status, c.reason.clone())
    }
}

#[test]
fn a_committed_vm_is_created_started_and_ready_with_events() {
    let env = env();
    let touched = env.apply("git:fleet", "rev1", &[("web.yaml", &manifest("web", "256Mi", ""))]).unwrap();
    assert_eq!(touched, ["web"]);
    assert_eq!(env.reconcile("web"), Outcome::Settled);
    assert_eq!(env.runtime.calls(), [Call::Create("web".into()), Call::Start("web".into())]);
    let status = env.status("web");
    assert_eq!(status.phase, Phase::Running);
    assert_eq!(status.observed_revision.as_deref(), Some("rev1"));
    assert_eq!(status.ip.as_deref(), Some("10.61.0.2"));
    assert!(status.boot_time.is_some());
    assert_eq!(env.ready("web"), (ConditionStatus::True, "Running".into()));
    let reasons: Vec<String> = env.store.events_since(0, 100).unwrap().into_iter().map(|(_, e)| e.reason).collect();
    assert_eq!(reasons, ["Created", "Started", "Running"]);

    // Level-triggered: another pass changes nothing.
    env.runtime.clear_calls();
    assert_eq!(env.reconcile("web"), Outcome::Settled);
    assert!(env.runtime.calls().is_empty());
}

#[test]
fn a_spec_change_recreates_and_a_state_change_only_stops() {
    let env = env();
    env.apply("git:fleet", "rev1", &[("web.yaml", &manifest("web", "256Mi", ""))]).unwrap();
    env.reconcile("web");
    env.runtime.clear_calls();
    env.apply("git:fleet", "rev2", &[("web.yaml", &manifest("web", "512Mi", ""))]).unwrap();
    assert_eq!(env.ready("web"), (ConditionStatus::False, String::new()), "the old VM's Ready is not the new spec's");
    env.reconcile("web");
    assert_eq!(env.ready("web"), (ConditionStatus::True, "Running".into()));
    assert_eq!(
        env.runtime.calls(),
        [
            Call::Stop("web".into()),
            Call::Destroy("web".into(), true),
            Call::Create("web".into()),
            Call::Start("web".into())
        ]
    );
    assert_eq!(env.status("web").observed_revision.as_deref(), Some("rev2"));
    assert_eq!(env.status("web").observed_generation, 2);

    env.runtime.clear_calls();
    env.apply("git:fleet", "rev3", &[("web.yaml", &manifest("web", "512Mi", "  state: Stopped\n"))]).unwrap();
    env.reconcile("web");
    assert_eq!(env.runtime.calls(), [Call::Stop("web".into())], "state is not part of the fingerprint");
    assert_eq!(env.status("web").phase, Phase::Stopped);
    assert_eq!(env.ready("web"), (ConditionStatus::True, "Stopped".into()));
}

#[test]
fn a_file_removed_from_the_source_deletes_only_what_that_source_owns() {
    let env = env();
    env.apply("git:fleet", "rev1", &[("a.yaml", &manifest("a", "64Mi", "")), ("b.yaml", &manifest("b", "64Mi", ""))])
        .unwrap();
    env.apply("api", "api", &[("c.yaml", &manifest("c", "64Mi", ""))]).unwrap();
    for n in ["a", "b", "c"] {
        env.reconcile(n);
    }
    let touched = env.apply("git:fleet", "rev2", &[("a.yaml", &manifest("a", "64Mi", ""))]).unwrap();
    assert_eq!(touched, ["b"], "b is pruned, c belongs to the API");
    env.runtime.clear_calls();
    env.reconcile("b");
    assert_eq!(env.runtime.calls(), [Call::Destroy("b".into(), false)]);
    assert!(env.store.get_vm("b").unwrap().is_none());
    assert!(env.store.get_vm("c").unwrap().is_some());
    assert!(env.runtime.actual("b").is_none());
}

#[test]
fn an_invalid_revision_changes_nothing_and_names_file_line_and_field() {
    let env = env();
    env.apply("git:fleet", "rev1", &[("web.yaml", &manifest("web", "256Mi", ""))]).unwrap();
    let bad = [("web.yaml", manifest("web", "lots", "")), ("db.yaml", manifest("db", "64Mi", ""))];
    let files: Vec<(&str, &str)> = bad.iter().map(|(f, t)| (*f, t.as_str())).collect();
    let err = env.apply("git:fleet", "rev2", &files).unwrap_err().to_string();
    assert!(err.contains("rev2") && err.contains("web.yaml:") && err.contains("spec.memory"), "{err}");
    assert!(env.store.get_vm("db").unwrap().is_none(), "no half-applied revision");
    assert_eq!(env.store.get_vm("web").unwrap().unwrap().vm.spec.memory.mib(), 256);
}

#[test]
fn an_object_owned_by_another_source_is_refused_before_anything_is_written() {
    let env = env();
    env.apply("api", "api", &[("web.yaml", &manifest("web", "64Mi", ""))]).unwrap();
    let err = env
        .apply(
            "git:fleet",
            "rev1",
            &[("db.yaml", &manifest("db", "64Mi", "")), ("web.yaml", &manifest("web", "64Mi", ""))],
        )
        .unwrap_err();
    assert!(matches!(err, ApplyError::OwnerConflict { ref owner, .. } if owner == "api"), "{err}");
    assert!(err.to_string().contains("web.yaml"), "{err}");
    assert!(env.store.get_vm("db").unwrap().is_none());
}

#[test]
fn two_vms_never_share_a_host_port_and_the_later_one_is_refused_naming_both() {
    let env = env();
    let port = |p: &str| format!("  network: {{ports: [\"{p}\"]}}\n");
    env.apply("git:fleet", "rev1", &[("web.yaml", &manifest("web", "64Mi", &port("8080:80")))]).unwrap();
    // Another source, and another VM of the same source's next revision, both want 8080/tcp.
    let err = env.apply("git:other", "o1", &[("db.yaml", &manifest("db", "64Mi", &port("8080:5432")))]).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, ApplyError::PortConflict { .. }), "{err}");
    assert!(message.contains("VM \"db\" (declared in db.yaml) forwards host port 8080/tcp"), "{message}");
    assert!(message.contains("VM \"web\" (owned by git:fleet)"), "{message}");
    let both = [
        ("web.yaml", manifest("web", "64Mi", &port("8080:80"))),
        ("api.yaml", manifest("api", "64Mi", &port("8080:81"))),
    ];
    let files: Vec<(&str, &str)> = both.iter().map(|(f, t)| (*f, t.as_str())).collect();
    assert!(matches!(env.apply("git:fleet", "rev2", &files), Err(ApplyError::PortConflict { .. })));
    assert!(env.store.get_vm("db").unwrap().is_none() && env.store.get_vm("api").unwrap().is_none());
    // The same port over UDP is another port; a renamed VM keeps its port within its source.
    env.apply("git:other", "o2", &[("db.yaml", &manifest("db", "64Mi", &port("8080:53/udp")))]).unwrap();
    env.apply("git:fleet", "rev3", &[("web2.yaml", &manifest("web2", "64Mi", &port("8080:80")))]).unwrap();
}

#[test]
fn restart_policy_is_applied_after_the_guest_exits() {
    let env = env();
    let files = [
        ("always.yaml", manifest("always", "64Mi", "")),
        ("onfail.yaml", manifest("onfail", "64Mi", "  restartPolicy: OnFailure\n")),
        ("never.yaml", manifest("never", "64Mi", "  restartPolicy: Never\n")),
    ];
    let refs: Vec<(&str, &str)> = files.iter().map(|(f, t)| (*f, t.as_str())).collect();
    env.apply("git:fleet", "rev1", &refs).unwrap();
    for n in ["always", "onfail", "never"] {
        env.reconcile(n);
        env.runtime.exit(n, Exit { code: Some(0), crashed: false, detail: "exit status 0".into() });
    }
    env.runtime.clear_calls();
    for n in ["always", "onfail", "never"] {
        env.reconcile(n);
    }
    assert_eq!(env.runtime.calls(), [Call::Start("always".into())]);
    assert_eq!(env.status("always").restarts, 1);
    assert_eq!(env.status("onfail").phase, Phase::Stopped);
    assert_eq!(env.ready("never"), (ConditionStatus::True, "Completed".into()));

    env.runtime.exit("never", Exit { code: Some(3), crashed: false, detail: "exit status 3".into() });
    env.reconcile("never");
    let status = env.status("never");
    assert_eq!(status.phase, Phase::Failed);
    let stalled = status.conditions.iter().find(|c| c.type_ == ConditionType::Stalled).unwrap();
    assert_eq!((stalled.status, stalled.message.as_str()), (ConditionStatus::True, "exit status 3"));
}

#[test]
fn a_crash_loop_backs_off_instead_of_restarting_at_once() {
    let env = env();
    env.apply("git:fleet", "rev1", &[("web.yaml", &manifest("web", "64Mi", ""))]).unwrap();
    env.reconcile("web");
    let crash = || Exit { code: None, crashed: true, detail: "triple fault".into() };
    env.runtime.exit("web", crash());
    assert_eq!(env.reconcile("web"), Outcome::Settled, "the first restart is immediate");
    env.runtime.exit("web", crash());
    env.runtime.clear_calls();
    let wait = match env.reconcile("web") {
        Outcome::RequeueAfter(d) => d,
        other => panic!("expected a backoff, got {other:?}"),
    };
    assert!(wait > Duration::ZERO);
    assert!(env.runtime.calls().is_empty(), "not restarted during the backoff");
    assert_eq!(env.status("web").phase, Phase::Failed);
    let reconciling = env.status("web").conditions.into_iter().find(|c| c.type_ == ConditionType::Reconciling).unwrap();
    assert_eq!(reconciling.reason, "BackOff");
    std::thread::sleep(wait);
    env.reconcile("web");
    assert_eq!(env.runtime.calls(), [Call::Start("web".into())], "restarted once the backoff passed");
    assert_eq!(env.status("web").restarts, 2);
}

#[test]
fn failures_are_reported_then_retried_with_backoff_until_they_clear() {
    let env = env();
    env.apply("git:fleet", "rev1", &[("web.yaml", &manifest("web", "64Mi", ""))]).unwrap();
    env.runtime.fail("web", "create", 2, true);
    let err = env.reconciler.reconcile("web").unwrap_err().to_string();
    assert!(err.contains("injected create failure"), "{err}");
    let status = env.status("web");
    assert_eq!(status.phase, Phase::Failed);
    assert!(status.last_error.as_deref().unwrap().contains("injected"));
    let stalled = status.conditions.iter().find(|c| c.type_ == ConditionType::Stalled).unwrap();
    assert_eq!(stalled.status, ConditionStatus::True);

    // The workers retry with backoff until the failure clears.
    env.reconciler.queue().add("web");
    let workers = env.reconciler.spawn_workers();
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.status("web").phase != Phase::Running {
        assert!(Instant::now() < deadline, "never recovered: {:?}", env.status("web"));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(env.status("web").last_error, None);
    env.reconciler.queue().shut_down();
    workers.into_iter().for_each(|w| w.join().unwrap());
}

#[test]
fn leftovers_of_an_unknown_vm_are_removed() {
    let env = env();
    env.runtime.leave_behind("ghost", "tap ign0123");
    assert_eq!(env.reconciler.enqueue_all().unwrap(), 1);
    assert_eq!(env.reconcile("ghost"), Outcome::Settled);
    assert_eq!(env.runtime.calls(), [Call::Destroy("ghost".into(), false)]);
    assert!(env.runtime.actual("ghost").is_none());
}

#[test]
fn suspended_vms_are_left_alone_until_resumed() {
    let env = env();
    env.apply("git:fleet", "rev1", &[("web.yaml", &manifest("web", "64Mi", ""))]).unwrap();
    env.reconciler.suspend("web");
    assert_eq!(env.reconcile("web"), Outcome::Suspended);
    assert!(env.runtime.calls().is_empty());
    env.reconciler.resume("web");
    assert_eq!(env.reconcile("web"), Outcome::Settled);
    let annotated = manifest("web", "64Mi", "")
        .replace("metadata:\n", "metadata:\n  annotations:\n    ignite.dev/suspend: \"true\"\n");
    env.apply("git:fleet", "rev2", &[("web.yaml", &annotated)]).unwrap();
    env.apply("git:fleet", "rev3", &[("web.yaml", &annotated.replace("64Mi", "128Mi"))]).unwrap();
    env.runtime.clear_calls();
    assert_eq!(env.reconcile("web"), Outcome::Suspended);
    assert!(env.runtime.calls().is_empty());
}

#[test]
fn fifty_vms_converge_with_bounded_concurrency() {
    let env = env();
    let files: Vec<(String, String)> =
        (0..50).map(|i| (format!("vm{i}.yaml"), manifest(&format!("vm{i}"), "64Mi", ""))).collect();
    let refs: Vec<(&str, &str)> = files.iter().map(|(f, t)| (f.as_str(), t.as_str())).collect();
    for name in env.apply("git:fleet", "rev1", &refs).unwrap() {
        env.reconciler.queue().add(&name);
    }
    let workers = env.reconciler.spawn_workers();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let running = env.store.list_vms().unwrap().iter().filter(|r| r.status.phase == Phase::Running).count();
        if running == 50 {
            break;
        }
        assert!(Instant::now() < deadline, "only {running}/50 running");
        std::thread::sleep(Duration::from_millis(5));
    }
    env.reconciler.queue().shut_down();
    workers.into_iter().for_each(|w| w.join().unwrap());
    let starts = env.runtime.calls().iter().filter(|c| matches!(c, Call::Start(_))).count();
    assert_eq!(starts, 50, "each VM started exactly once");
}

#[test]
fn a_pruned_vm_that_never_got_created_leaves_the_store() {
    let env = env();
    env.runtime.fail("web", "create", 100, true);
    env.apply("git:fleet", "rev1", &[("web.yaml", &manifest("web", "256Mi", ""))]).unwrap();
    assert!(env.reconciler.reconcile("web").is_err(), "the create fails");
    assert!(env.runtime.actual("web").is_none(), "nothing on the host");
    assert_eq!(env.apply("git:fleet", "rev2", &[]).unwrap(), ["web"], "pruned");
    assert_eq!(env.reconcile("web"), Outcome::Settled);
    assert!(env.store.get_vm("web").unwrap().is_none(), "the record is removed, not left Deleting forever");
}
