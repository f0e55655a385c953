//! `spec.bootstrap.kubernetes` through the whole daemon, against a scripted Kubernetes API server
//! (kube's `tower-test` mock service: no API server can be installed here), with real tiny
//! guests: the VM gets a bootstrap-token Secret and a kubeadm join configuration on its 0600
//! config drive; the Node with its provider ID becomes its `nodeRef`; deleting the VM deletes the
//! Node and the token. The token is never in `ignite inspect`'s answer, the events, the status or
//! the daemon's logs (every tracing event, at every level, is captured).

mod support;

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use controller::daemon::{Daemon, DaemonKube};
use controller::grpc::proto::{self, vms_client::VmsClient};
use controller::source::{DirSpec, SourceKind, SourceSpec};
use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use support::daemon::{vm_up, wait_for};
use support::fleet::{daemon_config, manifest, registry_with_image, unavailable};

const NAME: &str = "a_vm_joins_with_a_created_token_that_never_leaks_and_its_node_goes_with_it";

/// Every tracing event and span field, formatted, at every level.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<String>>);

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        span.record(&mut Fields(&mut self.0.lock().unwrap()));
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        values.record(&mut Fields(&mut self.0.lock().unwrap()));
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut log = self.0.lock().unwrap();
        log.push('\n');
        event.record(&mut Fields(&mut log));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// What the scripted API server saw.
#[derive(Default)]
struct Cluster {
    /// `METHOD path` of every request.
    requests: Vec<String>,
    /// Secrets created and not deleted.
    secrets: Vec<Value>,
}

fn respond(send: tower_test::mock::SendResponse<Response<Body>>, status: u16, body: &Value) {
    let body = Body::from(serde_json::to_vec(body).unwrap());
    send.send_response(Response::builder().status(status).body(body).unwrap());
}

/// Serves the requests of token creation, Node discovery and deletion; watches are held open.
async fn api_server(mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>, cluster: Arc<Mutex<Cluster>>) {
    let node = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "web", "resourceVersion": "7"}, "spec": {"providerID": "ignite://test-host/web"}});
    let mut watches = Vec::new();
    while let Some((request, send)) = handle.next_request().await {
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let (method, path, query) = (parts.method.as_str(), parts.uri.path(), parts.uri.query().unwrap_or(""));
        let mut cluster = cluster.lock().unwrap();
        cluster.requests.push(format!("{method} {path}"));
        let list = |kind: &str, items: Vec<Value>| json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "7"}, "items": items});
        match (method, path) {
            ("GET", "/api/v1/namespaces/kube-system/secrets") => {
                respond(send, 200, &list("SecretList", cluster.secrets.clone()))
            }
            ("POST", "/api/v1/namespaces/kube-system/secrets") => {
                let secret: Value = serde_json::from_slice(&bytes).unwrap();
                respond(send, 201, &secret);
                cluster.secrets.push(secret);
            }
            ("DELETE", p) if p.starts_with("/api/v1/namespaces/kube-system/secrets/") => {
                let name = p.rsplit('/').next().unwrap().to_string();
                cluster.secrets.retain(|s| s["metadata"]["name"] != name.as_str());
                respond(send, 200, &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
            }
            ("GET", "/api/v1/nodes") if query.contains("watch=true") => watches.push(send),
            ("GET", "/api/v1/nodes") => respond(send, 200, &list("NodeList", vec![node.clone()])),
            ("DELETE", "/api/v1/nodes/web") => respond(send, 200, &node),
            _ => respond(send, 404, &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})),
        }
    }
}

/// The daemon's sources: the directory `path`, polled every 200 ms, as source `local`.
fn local_dir(path: &std::path::Path) -> Vec<SourceSpec> {
    vec![SourceSpec {
        name: "local".into(),
        kind: SourceKind::Directory(DirSpec { path: path.into(), interval: Duration::from_millis(200) }),
    }]
}

fn bootstrap_spec() -> String {
    format!(
        "  bootstrap:\n    kubernetes:\n      apiServerEndpoint: 10.61.0.1:6443\n      caCertHash: sha256:{}\n      createToken: true\n",
        "ab".repeat(32)
    )
}

fn text_of(data: &Value) -> String {
    String::from_utf8(serde_json::from_value::<k8s_openapi::ByteString>(data.clone()).unwrap().0).unwrap()
}

#[test]
fn a_vm_joins_with_a_created_token_that_never_leaks_and_its_node_goes_with_it() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP {NAME}: {why}");
        return;
    }
    let capture = Capture::default();
    tracing::subscriber::set_global_default(capture.clone()).unwrap();

    let (_registry, image) = registry_with_image();
    let bootstrap = bootstrap_spec();
    let fleet = tempfile::tempdir().unwrap();
    std::fs::write(fleet.path().join("web.yaml"), manifest("web", &image, "64Mi", &bootstrap)).unwrap();
    // Asks for a token Secret of kube-system the daemon does not let this host's sources use.
    let greedy = bootstrap.replace("createToken: true", "tokenSecretRef: bootstrap-token-abcdef");
    std::fs::write(fleet.path().join("greedy.yaml"), manifest("greedy", &image, "64Mi", &greedy)).unwrap();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let _guard = support::daemon::KillVmsOnDrop(r);
    let sources = local_dir(fleet.path());
    let mut config = daemon_config(r, sources, None);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cluster = Arc::new(Mutex::new(Cluster::default()));
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = runtime.block_on(async {
        tokio::spawn(api_server(handle, cluster.clone()));
        kube::Client::new(service, "default")
    });
    // This host's own sources (here a directory) may have tokens created; nothing else.
    let mut scope = controller::kube::scope::BootstrapScope::default();
    scope.allow_create_token(controller::kube::scope::HOST_SOURCES).unwrap();
    config.kube = Some(DaemonKube {
        settings: controller::kube::KubeSettings::new("test-host"),
        token_ttl: None,
        scope,
        microvms: false,
        client: Some(client),
    });
    let daemon = runtime.block_on(Daemon::start(config)).unwrap();
    let store = daemon.store().clone();

    wait_for("web up", Duration::from_secs(60), || vm_up(r, "web"));
    let refused = "VM \"greedy\": spec.bootstrap.kubernetes.tokenSecretRef: VMs of this host's own sources \
                   (git, directory, API) may not use secret kube-system/bootstrap-token-abcdef: the daemon allows \
                   it with --kube-token-secret @host/bootstrap-token-abcdef";
    wait_for("greedy stalled", Duration::from_secs(60), || {
        store.get_vm("greedy").unwrap().is_some_and(|v| {
            v.status.conditions.iter().any(|c| {
                format!("{:?}/{:?}", c.type_, c.status) == "Stalled/True"
                    && c.reason == "BootstrapNotAllowed"
                    && c.message.contains(refused)
            })
        })
    });
    let asked = cluster.lock().unwrap().requests.clone();
    assert!(!asked.iter().any(|r| r.contains("bootstrap-token-abcdef")), "the Secret is never read: {asked:?}");
    assert!(
        !controller::layout::RootLayout::new(r).runtime("greedy").prepared().exists(),
        "nothing is prepared for greedy"
    );
    std::fs::remove_file(fleet.path().join("greedy.yaml")).unwrap();
    let secret = cluster.lock().unwrap().secrets.first().cloned().expect("a bootstrap-token Secret was created");
    assert_eq!(secret["type"], "bootstrap.kubernetes.io/token");
    assert_eq!(secret["metadata"]["labels"]["ignite.dev/vm"], "web");
    let token_secret = text_of(&secret["data"]["token-secret"]);
    let token = format!("{}.{token_secret}", text_of(&secret["data"]["token-id"]));

    // The join configuration is on the config drive, readable by root only, in a private directory.
    let drive = r.join("runtime/web/config.img");
    assert_eq!(std::fs::metadata(&drive).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(r.join("runtime/web")).unwrap().permissions().mode() & 0o777, 0o700);
    let guest = guest_api::config::read_config_drive(std::fs::File::open(&drive).unwrap()).unwrap();
    let join = guest.join.expect("a join configuration on the drive");
    assert_eq!(join.config_path, "/etc/ignite/kubeadm-join.yaml");
    assert!(join.config.contains(&format!("token: {token}")), "{}", join.config);
    assert!(join.config.contains("provider-id: ignite://test-host/web"), "{}", join.config);

    wait_for("web's nodeRef", Duration::from_secs(30), || {
        store.get_vm("web").unwrap().is_some_and(|v| v.status.node_ref.as_deref() == Some("web"))
    });

    // What the API answers (`ignite inspect`), the store's status and the events never hold it.
    let socket = r.join("ignite.sock");
    let shown = runtime.block_on(async {
        let mut vms = VmsClient::new(controller::grpc::connect(&socket).await.unwrap());
        vms.get(proto::VmName { name: "web".into() }).await.unwrap().into_inner()
    });
    assert_eq!(shown.status.as_ref().unwrap().node_ref, "web");
    let everything =
        format!("{shown:?}\n{:?}\n{:?}", store.get_vm("web").unwrap(), store.events_since(0, 10_000).unwrap());
    assert!(!everything.contains(&token_secret), "the token leaked into the API, status or events:\n{everything}");

    // Deleting the VM deletes its Node and its token.
    std::fs::remove_file(fleet.path().join("web.yaml")).unwrap();
    wait_for("web gone", Duration::from_secs(60), || store.get_vm("web").unwrap().is_none());
    let cluster = cluster.lock().unwrap();
    assert!(cluster.requests.iter().any(|r| r == "DELETE /api/v1/nodes/web"), "{:?}", cluster.requests);
    assert!(cluster.secrets.is_empty(), "the VM's token is deleted with it: {:?}", cluster.secrets);

    runtime.block_on(daemon.shutdown());
    let logs = capture.0.lock().unwrap().clone();
    assert!(logs.contains("created a bootstrap token"), "the capture sees the daemon's logs:\n{logs}");
    assert!(!logs.contains(&token_secret), "the token leaked into the logs:\n{logs}");
}

/// A daemon without Kubernetes access cannot give a VM a token: the VM is `Stalled` with the
/// precise reason, before any disk is made, and the daemon carries on.
#[test]
fn create_token_without_kubernetes_access_is_a_precise_permanent_error() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP create_token_without_kubernetes_access_is_a_precise_permanent_error: {why}");
        return;
    }
    let (_registry, image) = registry_with_image();
    let fleet = tempfile::tempdir().unwrap();
    std::fs::write(fleet.path().join("node.yaml"), manifest("node", &image, "64Mi", &bootstrap_spec())).unwrap();
    std::fs::write(fleet.path().join("plain.yaml"), manifest("plain", &image, "64Mi", "")).unwrap();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let _guard = support::daemon::KillVmsOnDrop(r);
    let sources = local_dir(fleet.path());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let daemon = runtime.block_on(Daemon::start(daemon_config(r, sources, None))).unwrap();
    let store = daemon.store().clone();
    let expected =
        "VM \"node\": spec.bootstrap.kubernetes.createToken needs the daemon to run with --kube or --kubeconfig";
    wait_for("node stalled", Duration::from_secs(60), || {
        store.get_vm("node").unwrap().is_some_and(|v| {
            v.status.conditions.iter().any(|c| {
                format!("{:?}/{:?}", c.type_, c.status) == "Stalled/True"
                    && c.reason == "BootstrapFailed"
                    && c.message.contains(expected)
            })
        })
    });
    let status = store.get_vm("node").unwrap().unwrap().status;
    assert!(status.last_error.as_deref().is_some_and(|e| e.contains(expected)), "{status:?}");
    assert!(!controller::layout::RootLayout::new(r).runtime("node").prepared().exists(), "nothing is prepared for it");
    // The rest of the fleet is unaffected.
    wait_for("plain up", Duration::from_secs(60), || vm_up(r, "plain"));
    runtime.block_on(daemon.shutdown());
}
