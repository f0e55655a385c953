//! The MicroVM controller against a fake API server (tower-test mock service), the real store,
//! the real reconciler and the recording fake runtime: watch, finalizer add/remove, status
//! patches, host selection, and the bad cases (CRD missing, RBAC denied, the API server going
//! away mid-watch, an invalid spec, a name collision).

mod kube_fake;

use std::sync::Arc;
use std::time::Duration;

use controller::kube::controller::{self as kc, Context, KubeSettings};
use controller::kube::crd::FINALIZER;
use controller::kube::{KubeError, LabelSelector};
use controller::reconcile::fake::{Call, FakeRuntime};
use controller::reconcile::Reconciler;
use controller::store::Store;
use kube_fake::{FakeApi, Seen};
use serde_json::{json, Value};

const HOST: &str = "host-1";

struct Env {
    _dir: tempfile::TempDir,
    store: Store,
    runtime: Arc<FakeRuntime>,
    reconciler: Reconciler,
    api: FakeApi,
    ctx: Arc<Context>,
    controller: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.reconciler.queue().shut_down();
        if let Some(task) = self.controller.take() {
            task.abort();
        }
    }
}

fn settings(selector: &str) -> KubeSettings {
    KubeSettings {
        selector: LabelSelector::parse(selector).unwrap(),
        poll: Duration::from_millis(20),
        resync: Duration::from_secs(3600),
        retry_base: Duration::from_millis(20),
        retry_max: Duration::from_millis(100),
        ..KubeSettings::new(HOST)
    }
}

type HookFactory = Box<dyn FnOnce(Store) -> controller::kube::DeletionHook>;

fn env_with(settings: KubeSettings) -> Env {
    env_hooked(settings, None)
}

fn env_hooked(settings: KubeSettings, hook: Option<HookFactory>) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let runtime = Arc::new(FakeRuntime::new());
    let config = controller::testing::fast_reconciler_config(2);
    let reconciler = Reconciler::new(store.clone(), runtime.clone(), config);
    reconciler.spawn_workers();
    let (api, client) = FakeApi::start();
    let probe_store = store.clone();
    api.set_probe(move || {
        let names: Vec<String> = probe_store.list_vms().unwrap().into_iter().map(|r| r.vm.metadata.name).collect();
        names.join(",")
    });
    let mut ctx = Context::new(client, store.clone(), reconciler.queue().clone(), settings);
    if let Some(hook) = hook {
        ctx = ctx.with_deletion_hook(hook(store.clone()));
    }
    let ctx = Arc::new(ctx);
    Env { _dir: dir, store, runtime, reconciler, api, ctx, controller: None }
}

fn env() -> Env {
    env_with(settings(""))
}

fn spec(memory: &str) -> Value {
    json!({"image": "127.0.0.1:5000/busybox:1", "memory": memory})
}

impl Env {
    fn run(&mut self) {
        self.controller = Some(tokio::spawn(kc::run(self.ctx.clone())));
    }

    fn status(&self, ns: &str, name: &str) -> Value {
        self.api.get(ns, name).map(|o| o["status"].clone()).unwrap_or(Value::Null)
    }

    /// The condition that is True on the object: (type, reason, message).
    fn condition(&self, ns: &str, name: &str) -> Option<(String, String, String)> {
        let status = self.status(ns, name);
        let c = status["conditions"].as_array()?.iter().find(|c| c["status"] == "True")?.clone();
        Some((c["type"].as_str()?.into(), c["reason"].as_str()?.into(), c["message"].as_str()?.into()))
    }

    fn patches_of(&self, ns: &str, name: &str) -> Vec<Seen> {
        let path = format!("/apis/ignite.dev/v1alpha1/namespaces/{ns}/microvms/{name}");
        self.api.seen().into_iter().filter(|s| s.method == "PATCH" && s.path.starts_with(&path)).collect()
    }
}

/// Waits for `what` (a generous bound so a stuck controller fails instead of hanging CI).
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_microvm_gets_the_finalizer_first_then_a_vm_and_a_ready_status() {
    let mut env = env();
    env.api.create("prod", "web", json!({}), spec("64Mi"));
    env.run();
    until("Ready", || env.condition("prod", "web").is_some_and(|c| c.0 == "Ready")).await;

    let patches = env.patches_of("prod", "web");
    let first = &patches[0];
    assert!(!first.path.ends_with("/status"), "the finalizer comes first: {first:?}");
    assert_eq!(first.body["metadata"]["finalizers"], json!([FINALIZER]));
    assert!(first.body["metadata"]["resourceVersion"].is_string(), "guarded by the resourceVersion");
    assert_eq!(first.probe, "", "added before the VM existed");
    assert!(patches[1..].iter().all(|p| p.path.ends_with("/status")), "then only status patches");

    assert_eq!(env.runtime.calls(), [Call::Create("prod-web".into()), Call::Start("prod-web".into())]);
    let record = env.store.get_vm("prod-web").unwrap().unwrap();
    assert_eq!(record.owner, "kube:prod/web");
    let status = env.status("prod", "web");
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["phase"], "Running");
    assert_eq!(status["ip"], "10.61.0.2");
    assert_eq!((status["host"].as_str(), status["vmName"].as_str()), (Some(HOST), Some("prod-web")));
    let types: Vec<&str> =
        status["conditions"].as_array().unwrap().iter().map(|c| c["type"].as_str().unwrap()).collect();
    assert_eq!(types.len(), 3, "Ready, Reconciling and Stalled are all present: {types:?}");
    assert_eq!(env.api.get("prod", "web").unwrap()["metadata"]["finalizers"], json!([FINALIZER]));

    // A spec change is a new generation: recreated, and observedGeneration follows.
    env.api.update_spec("prod", "web", json!({"memory": "128Mi"}));
    until("generation 2 ready", || {
        env.status("prod", "web")["observedGeneration"] == 2
            && env.condition("prod", "web").is_some_and(|c| c.0 == "Ready")
    })
    .await;
    assert!(env.runtime.calls().contains(&Call::Destroy("prod-web".into(), true)), "recreated keeping the lease");
    assert_eq!(env.store.get_vm("prod-web").unwrap().unwrap().vm.spec.memory.bytes(), 128 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_microvm_follows_its_vm_at_once_not_at_the_next_resync() {
    // The resync is an hour: only the store's change events can bring the VM's exit over.
    let mut env = env();
    let mut never = spec("64Mi");
    never["restartPolicy"] = json!("Never");
    env.api.create("prod", "job", json!({}), never);
    env.run();
    until("Ready", || env.condition("prod", "job").is_some_and(|c| c.0 == "Ready")).await;
    assert_eq!(env.status("prod", "job")["phase"], "Running");

    env.runtime.exit(
        "prod-job",
        controller::reconcile::Exit { code: Some(3), crashed: false, detail: "exit status 3".into() },
    );
    env.reconciler.queue().add("prod-job");
    until("Failed", || env.status("prod", "job")["phase"] == "Failed").await;
    let (kind, _, message) = env.condition("prod", "job").unwrap();
    assert_eq!((kind.as_str(), message.as_str()), ("Stalled", "exit status 3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_microvm_removes_the_vm_then_releases_the_finalizer() {
    let mut env = env();
    env.api.create("prod", "web", json!({}), spec("64Mi"));
    env.run();
    until("Ready", || env.condition("prod", "web").is_some_and(|c| c.0 == "Ready")).await;
    env.api.delete("prod", "web");
    until("the object is gone", || env.api.get("prod", "web").is_none()).await;

    assert!(env.runtime.calls().contains(&Call::Destroy("prod-web".into(), false)));
    assert!(env.runtime.actual("prod-web").is_none(), "nothing left on the host");
    assert!(env.store.get_vm("prod-web").unwrap().is_none());
    let last = env.patches_of("prod", "web").pop().unwrap();
    assert_eq!(last.body["metadata"]["finalizers"], json!([]), "the finalizer is released last");
    assert_eq!(last.probe, "", "only once the VM was gone from the store");
    let deleting = env.patches_of("prod", "web").into_iter().any(|p| p.body["status"]["phase"] == "Deleting");
    assert!(deleting, "the status said Deleting meanwhile");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_microvm_whose_vm_never_got_created_is_still_released_on_delete() {
    let mut env = env();
    env.runtime.fail("prod-web", "create", 1000, true);
    env.api.create("prod", "web", json!({}), spec("64Mi"));
    env.run();
    until("Stalled", || env.condition("prod", "web").is_some_and(|c| c.0 == "Stalled")).await;
    let (_, reason, message) = env.condition("prod", "web").unwrap();
    assert_eq!(reason, "InjectedFailure", "the runtime's reason reaches the MicroVM: {message}");
    env.api.delete("prod", "web");
    until("the object is gone", || env.api.get("prod", "web").is_none()).await;
    assert!(env.store.get_vm("prod-web").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_hook_runs_after_the_vm_is_gone_and_its_failure_keeps_the_finalizer() {
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = calls.clone();
    let factory: HookFactory = Box::new(move |store: Store| {
        let fail_once = Arc::new(std::sync::atomic::AtomicBool::new(true));
        Arc::new(move |_client, deleted: controller::kube::DeletedVm| {
            let vm_present = store.get_vm(&deleted.vm_name).unwrap().is_some();
            seen.lock().unwrap().push((deleted.clone(), vm_present));
            let fail = fail_once.swap(false, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                if fail {
                    Err(KubeError::Forbidden {
                        verb: "delete",
                        resource: "nodes".into(),
                        object: Some(deleted.vm_name),
                        message: "injected".into(),
                    })
                } else {
                    Ok(())
                }
            })
        })
    });
    let mut env = env_hooked(settings(""), Some(factory));
    env.api.create("prod", "web", json!({}), spec("64Mi"));
    env.run();
    until("Ready", || env.condition("prod", "web").is_some_and(|c| c.0 == "Ready")).await;
    env.api.delete("prod", "web");
    until("the object is gone", || env.api.get("prod", "web").is_none()).await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "failed once, retried: {calls:?}");
    assert!(calls.iter().all(|(d, present)| d.vm_name == "prod-web" && d.namespace == "prod" && !present));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvms_of_other_hosts_are_never_touched() {
    let mut env = env_with(settings("pool=edge"));
    env.api.create("prod", "elsewhere", json!({"pool": "edge"}), json!({"image": "busybox", "host": "host-2"}));
    env.api.create("prod", "unlabelled", json!({}), spec("64Mi"));
    env.api.create("prod", "edge", json!({"pool": "edge"}), spec("64Mi"));
    env.api.create("prod", "pinned", json!({}), json!({"image": "busybox", "memory": "64Mi", "host": HOST}));
    env.run();
    until("both of ours ready", || {
        ["edge", "pinned"].iter().all(|n| env.condition("prod", n).is_some_and(|c| c.0 == "Ready"))
    })
    .await;
    for name in ["elsewhere", "unlabelled"] {
        assert!(env.patches_of("prod", name).is_empty(), "{name}: no finalizer, no status");
        assert!(env.api.get("prod", name).unwrap().get("status").is_none());
    }
    let mut names: Vec<String> = env.store.list_vms().unwrap().into_iter().map(|r| r.vm.metadata.name).collect();
    names.sort();
    assert_eq!(names, ["prod-edge", "prod-pinned"]);

    // Rescheduled away: the VM goes from this host; the object is left to the new host.
    let before = env.patches_of("prod", "pinned").len();
    env.api.update_spec("prod", "pinned", json!({"host": "host-2"}));
    until("the VM is removed here", || env.store.get_vm("prod-pinned").unwrap().is_none()).await;
    assert!(env.runtime.actual("prod-pinned").is_none());
    let after: Vec<_> = env.patches_of("prod", "pinned").into_iter().skip(before).map(|p| p.body).collect();
    assert!(after.is_empty(), "no write to a MicroVM of another host: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_namespace_only_its_microvms_are_watched() {
    let mut env = env_with(KubeSettings { namespace: Some("prod".into()), ..settings("") });
    env.api.create("prod", "web", json!({}), spec("64Mi"));
    env.api.create("dev", "web", json!({}), spec("64Mi"));
    env.run();
    until("prod/web ready", || env.condition("prod", "web").is_some_and(|c| c.0 == "Ready")).await;
    env.api.create("dev", "db", json!({}), spec("64Mi"));
    env.api.create("prod", "db", json!({}), spec("64Mi"));
    until("prod/db ready", || env.condition("prod", "db").is_some_and(|c| c.0 == "Ready")).await;
    let seen = env.api.seen();
    assert!(seen.iter().all(|s| s.path.starts_with("/apis/ignite.dev/v1alpha1/namespaces/prod/")), "{seen:#?}");
    assert!(env.patches_of("dev", "web").is_empty() && env.patches_of("dev", "db").is_empty());
    let mut names: Vec<String> = env.store.list_vms().unwrap().into_iter().map(|r| r.vm.metadata.name).collect();
    names.sort();
    assert_eq!(names, ["prod-db", "prod-web"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_spec_is_stalled_with_the_field_and_the_others_run() {
    let mut env = env();
    env.api.create("prod", "bad", json!({}), json!({"image": "busybox", "memory": "lots"}));
    env.api.create("prod", "small", json!({}), json!({"image": "busybox", "memory": "1Mi"}));
    env.api.create("prod", "good", json!({}), spec("64Mi"));
    env.run();
    until("all settled", || {
        env.condition("prod", "good").is_some_and(|c| c.0 == "Ready")
            && ["bad", "small"].iter().all(|n| env.condition("prod", n).is_some_and(|c| c.0 == "Stalled"))
    })
    .await;
    let (_, reason, message) = env.condition("prod", "bad").unwrap();
    assert_eq!(reason, "InvalidSpec");
    assert!(message.starts_with("spec.memory: invalid quantity \"lots\""), "{message}");
    let (_, _, message) = env.condition("prod", "small").unwrap();
    assert!(message.starts_with("spec.memory: 1Mi is not possible"), "{message}");
    assert_eq!(env.status("prod", "bad")["observedGeneration"], 1);
    assert!(env.store.get_vm("prod-bad").unwrap().is_none() && env.store.get_vm("prod-small").unwrap().is_none());

    // Fixing it runs it; breaking a running one keeps the VM on its last good spec.
    env.api.update_spec("prod", "bad", json!({"memory": "64Mi"}));
    until("fixed and ready", || env.condition("prod", "bad").is_some_and(|c| c.0 == "Ready")).await;
    env.api.update_spec("prod", "good", json!({"cpus": 200}));
    until("stalled", || env.condition("prod", "good").is_some_and(|c| c.0 == "Stalled")).await;
    let (_, _, message) = env.condition("prod", "good").unwrap();
    assert!(message.starts_with("spec.cpus: 200 vCPUs requested"), "{message}");
    assert_eq!(env.store.get_vm("prod-good").unwrap().unwrap().vm.spec.cpus, 1, "the last good spec keeps running");
    assert!(env.runtime.actual("prod-good").unwrap().running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_collisions_are_a_precise_status_not_a_takeover() {
    let mut env = env();
    let git_vm: controller::api::Vm = serde_json::from_value(json!({
        "apiVersion": "ignite.dev/v1alpha1", "kind": "VM", "metadata": {"name": "prod-web"},
        "spec": {"image": "busybox", "memory": "64Mi"},
    }))
    .unwrap();
    env.store.put_vm(&git_vm, "git:fleet", false).unwrap();
    env.api.create("prod", "web", json!({}), spec("128Mi"));
    env.api.create("a-b", "c", json!({}), spec("64Mi"));
    env.run();
    until("a-b/c ready", || env.condition("a-b", "c").is_some_and(|c| c.0 == "Ready")).await;
    // a/b-c read as NS-NAME would be a-b-c too: names are injective, so both run.
    env.api.create("a", "b-c", json!({}), spec("64Mi"));
    until("a/b-c ready", || env.condition("a", "b-c").is_some_and(|c| c.0 == "Ready")).await;
    assert_eq!(env.store.get_vm("a--b-c").unwrap().unwrap().owner, "kube:a-b/c");
    assert_eq!(env.store.get_vm("a-b-c").unwrap().unwrap().owner, "kube:a/b-c");
    // A git VM holding the name is never taken over.
    until("prod/web stalled", || env.condition("prod", "web").is_some_and(|c| c.1 == "NameConflict")).await;
    let (_, _, message) = env.condition("prod", "web").unwrap();
    assert!(message.contains("\"prod-web\"") && message.contains("git:fleet"), "{message}");
    assert_eq!(env.store.get_vm("prod-web").unwrap().unwrap().owner, "git:fleet");

    // Deleting one MicroVM removes its VM only.
    env.api.delete("a", "b-c");
    until("a/b-c gone", || env.api.get("a", "b-c").is_none()).await;
    assert!(env.store.get_vm("a-b-c").unwrap().is_none());
    assert!(env.store.get_vm("a--b-c").unwrap().is_some());
    assert!(env.store.get_vm("prod-web").unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_microvm_vanished_is_removed_after_a_successful_list_only() {
    let mut env = env();
    let ghost: controller::api::Vm = serde_json::from_value(json!({
        "apiVersion": "ignite.dev/v1alpha1", "kind": "VM", "metadata": {"name": "prod-ghost"},
        "spec": {"image": "busybox", "memory": "64Mi"},
    }))
    .unwrap();
    env.store.put_vm(&ghost, "kube:prod/ghost", false).unwrap();
    env.store.put_vm(&ghost_named("fleet-db"), "git:fleet", false).unwrap();
    env.reconciler.queue().add("prod-ghost");
    until("the ghost runs", || env.runtime.actual("prod-ghost").is_some_and(|a| a.running)).await;

    // A failed list releases nothing.
    env.api.go_away(1);
    assert!(kc::sweep_orphans(&env.ctx).await.is_err());
    assert!(!env.store.get_vm("prod-ghost").unwrap().unwrap().deletion_requested);

    env.api.create("prod", "web", json!({}), spec("64Mi"));
    env.run();
    until("the ghost is removed", || env.store.get_vm("prod-ghost").unwrap().is_none()).await;
    assert!(env.runtime.calls().contains(&Call::Destroy("prod-ghost".into(), false)));
    until("web ready", || env.condition("prod", "web").is_some_and(|c| c.0 == "Ready")).await;
    assert!(env.store.get_vm("fleet-db").unwrap().is_some(), "git's VMs are not the sweep's business");
    assert!(env.store.get_vm("prod-web").unwrap().is_some());
}

fn ghost_named(name: &str) -> controller::api::Vm {
    serde_json::from_value(json!({
        "apiVersion": "ignite.dev/v1alpha1", "kind": "VM", "metadata": {"name": name},
        "spec": {"image": "busybox", "memory": "64Mi"},
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_crd_is_named_with_the_fix_and_the_controller_starts_once_installed() {
    let mut env = env();
    env.api.set_crd_installed(false);
    let err = kc::preflight(&env.ctx).await.unwrap_err();
    assert_eq!(err.to_string(), "the MicroVM CRD is not installed: kubectl apply -f manifests/crd/microvm.yaml");
    env.run();
    until("a retried list", || env.api.seen().iter().filter(|s| s.code == 404).count() >= 2).await;
    env.api.create("prod", "web", json!({}), spec("64Mi"));
    env.api.set_crd_installed(true);
    until("Ready", || env.condition("prod", "web").is_some_and(|c| c.0 == "Ready")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_denials_name_the_verb_the_resource_and_the_object() {
    let env = env();
    env.api.forbid("GET", "/microvms");
    let err = kc::preflight(&env.ctx).await.unwrap_err().to_string();
    assert!(err.starts_with("forbidden: list microvms.ignite.dev: grant it"), "{err}");

    let env = self::env();
    env.api.create("prod", "web", json!({}), spec("64Mi"));
    env.api.forbid("PATCH", "/microvms/web/status");
    // One pass, as the controller runs it, on the object as listed.
    let obj: kube::core::DynamicObject = serde_json::from_value(env.api.get("prod", "web").unwrap()).unwrap();
    let err = kc::reconcile(Arc::new(obj), env.ctx.clone()).await.unwrap_err();
    assert!(matches!(err, KubeError::Forbidden { verb: "patch", .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.starts_with("forbidden: patch microvms.ignite.dev/status prod/web: "), "{text}");
    assert!(text.contains("manifests/kube/rbac.yaml"), "{text}");

    env.api.forbid("PATCH", "/microvms/web");
    let obj: kube::core::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "ignite.dev/v1alpha1", "kind": "MicroVM",
        "metadata": {"name": "web", "namespace": "prod", "resourceVersion": "1"}, "spec": spec("64Mi"),
    }))
    .unwrap();
    let err = kc::reconcile(Arc::new(obj), env.ctx.clone()).await.unwrap_err().to_string();
    assert!(err.starts_with("forbidden: patch microvms.ignite.dev prod/web"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_gone_mid_watch_is_retried_and_deletes_nothing() {
    let mut env = env();
    env.api.create("prod", "web", json!({}), spec("64Mi"));
    env.run();
    until("Ready", || env.condition("prod", "web").is_some_and(|c| c.0 == "Ready")).await;
    until("a held watch", || env.api.watching()).await;
    let before = env.api.seen().len();
    env.api.go_away(3);
    until("the controller watching again", || {
        let seen = env.api.seen();
        seen.len() > before + 3 && seen.last().is_some_and(|s| s.is_watch() && s.code == 200)
    })
    .await;
    let after: Vec<Seen> = env.api.seen().into_iter().skip(before).collect();
    assert!(after.iter().filter(|s| s.code == 0).count() >= 3, "the failures were seen: {after:?}");
    let resumed = after.last().unwrap();
    assert!(resumed.query.contains("resourceVersion=1"), "the watch resumed where it was: {resumed:?}");
    assert!(!env.runtime.calls().iter().any(|c| matches!(c, Call::Destroy(..) | Call::Stop(..))), "nothing removed");
    assert!(env.runtime.actual("prod-web").unwrap().running);
    assert!(env.store.get_vm("prod-web").unwrap().is_some());

    // Events after the outage are seen: the watch really resumed.
    env.api.update_spec("prod", "web", json!({"memory": "96Mi"}));
    until("generation 2", || env.status("prod", "web")["observedGeneration"] == 2).await;
}
