use std::os::unix::fs::PermissionsExt;

use serde_json::json;

use super::*;
use crate::kube::mock::{self, expect};

fn vm(bootstrap: serde_json::Value) -> Vm {
    let mut doc = json!({
        "apiVersion": "ignite.dev/v1alpha1", "kind": "VM", "metadata": {"name": "web"},
        "spec": {"image": "busybox"},
    });
    if !bootstrap.is_null() {
        doc["spec"]["bootstrap"] = json!({"kubernetes": bootstrap});
    }
    serde_json::from_value(doc).unwrap()
}

fn create_token() -> serde_json::Value {
    json!({"apiServerEndpoint": "10.61.0.1:6443", "caCertHash": format!("sha256:{}", "ab".repeat(32)), "createToken": true})
}

#[test]
fn a_vm_without_bootstrap_needs_no_kubernetes() {
    assert_eq!(join_config(None, &vm(serde_json::Value::Null), "git:fleet").unwrap(), None);
}

#[test]
fn bootstrap_without_kubernetes_access_is_a_permanent_precise_error() {
    let err = join_config(None, &vm(create_token()), "git:fleet").unwrap_err();
    assert!(err.permanent);
    assert_eq!(err.reason, "BootstrapFailed");
    assert_eq!(
        err.message,
        "VM \"web\": spec.bootstrap.kubernetes.createToken needs the daemon to run with --kube or --kubeconfig"
    );
    let by_ref =
        json!({"apiServerEndpoint": "k:6443", "caCertHash": "sha256:00", "tokenSecretRef": "bootstrap-token-abcdef"});
    let err = join_config(None, &vm(by_ref), "git:fleet").unwrap_err();
    assert!(err.message.contains("spec.bootstrap.kubernetes.tokenSecretRef needs the daemon"), "{}", err.message);
    forget(None, "web").expect("a VM is removable without Kubernetes access");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn the_join_configuration_lands_private_on_the_config_drive() {
    let (mut access, mut server) = mock::access();
    access.scope.allow_create_token("team").unwrap();
    // The runtime's steps are synchronous and block on the daemon's runtime, as on a reconcile worker.
    let step = std::thread::spawn(move || join_config(Some(&access), &vm(create_token()), "kube:team/web"));
    expect(&mut server, "GET", "/api/v1/namespaces/kube-system/secrets", 200, mock::list("SecretList", vec![])).await;
    let (posted, send) = mock::next(&mut server).await;
    mock::respond(send, 201, posted.body.clone());
    let join =
        tokio::task::spawn_blocking(move || step.join().unwrap()).await.unwrap().unwrap().expect("a join config");
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(posted.body).unwrap();
    let token = bootstrap::token_from_secret(&secret).unwrap().token;
    assert!(join.config.contains(&format!("token: {}", token.expose())), "{}", join.config);
    assert!(join.config.contains("provider-id: ignite://host-1/web"), "{}", join.config);

    let dir = tempfile::tempdir().unwrap();
    let drive = dir.path().join("config.img");
    let mut config = guest_api::config::GuestConfig { hostname: "web".into(), ..Default::default() };
    config.join = Some(join.clone());
    crate::host::guest::write_drive(&drive, &config).unwrap();
    assert_eq!(std::fs::metadata(&drive).unwrap().permissions().mode() & 0o777, 0o600);
    let back = guest_api::config::read_config_drive(std::fs::File::open(&drive).unwrap()).unwrap();
    assert_eq!(back.join.as_ref(), Some(&join));
    assert_eq!(back.join.unwrap().config_path, "/etc/ignite/kubeadm-join.yaml");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn an_unreachable_api_server_is_a_transient_bootstrap_failure() {
    let (mut access, mut server) = mock::access();
    access.scope.allow_create_token(crate::kube::scope::HOST_SOURCES).unwrap();
    let step = std::thread::spawn(move || join_config(Some(&access), &vm(create_token()), "git:fleet"));
    mock::fail_connection(&mut server).await;
    let err = tokio::task::spawn_blocking(move || step.join().unwrap()).await.unwrap().unwrap_err();
    assert!(!err.permanent && err.reason == "BootstrapFailed", "{err:?}");
    assert!(err.message.starts_with("VM \"web\": bootstrap token: cannot list secrets"), "{}", err.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_token_outside_the_daemons_allow_lists_is_refused_before_any_call() {
    let (mut access, _server) = mock::access();
    access.scope.allow_create_token("team-a").unwrap();
    access.scope.allow_token_secret("team-a/bootstrap-token-abcdef").unwrap();
    let by_ref = json!({"apiServerEndpoint": "k:6443", "caCertHash": format!("sha256:{}", "ab".repeat(32)),
        "tokenSecretRef": "bootstrap-token-abcdef"});
    // Another namespace, and this host's own sources: neither is on the lists. The mock API
    // server would hang a call: the refusal comes first.
    let access = std::sync::Arc::new(access);
    let a = access.clone();
    let refused = tokio::task::spawn_blocking(move || {
        (
            join_config(Some(&a), &vm(create_token()), "kube:team-b/web").unwrap_err(),
            join_config(Some(&a), &vm(by_ref.clone()), "kube:team-b/web").unwrap_err(),
            join_config(Some(&a), &vm(create_token()), "git:fleet").unwrap_err(),
        )
    })
    .await
    .unwrap();
    for err in [&refused.0, &refused.1, &refused.2] {
        assert!(err.permanent && err.reason == NOT_ALLOWED, "{err:?}");
    }
    assert!(refused.0.message.contains("--kube-bootstrap-namespaces team-b"), "{}", refused.0.message);
    assert!(
        refused.1.message.contains("may not use secret kube-system/bootstrap-token-abcdef"),
        "{}",
        refused.1.message
    );
    assert!(refused.1.message.contains("--kube-token-secret team-b/bootstrap-token-abcdef"), "{}", refused.1.message);
    assert!(refused.2.message.contains("--kube-bootstrap-namespaces @host"), "{}", refused.2.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn forgetting_a_vm_deletes_its_node_and_tokens() {
    let (access, mut server) = mock::access();
    let step = std::thread::spawn(move || forget(Some(&access), "web"));
    let nodes = mock::list(
        "NodeList",
        vec![json!({"metadata": {"name": "web"}, "spec": {"providerID": "ignite://host-1/web"}})],
    );
    expect(&mut server, "GET", "/api/v1/nodes", 200, nodes).await;
    expect(&mut server, "DELETE", "/api/v1/nodes/web", 200, json!({"metadata": {"name": "web"}})).await;
    let listed =
        expect(&mut server, "GET", "/api/v1/namespaces/kube-system/secrets", 200, mock::list("SecretList", vec![]))
            .await;
    assert!(listed.query.contains("ignite.dev/vm=web"), "{}", listed.query);
    tokio::task::spawn_blocking(move || step.join().unwrap()).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_node_deletion_refused_by_rbac_keeps_the_vm_with_a_precise_error() {
    let (access, mut server) = mock::access();
    let step = std::thread::spawn(move || forget(Some(&access), "web"));
    let denied = mock::status(403, "Forbidden", "nodes is forbidden: User \"ignite\" cannot list resource \"nodes\"");
    expect(&mut server, "GET", "/api/v1/nodes", 403, denied).await;
    let err = tokio::task::spawn_blocking(move || step.join().unwrap()).await.unwrap().unwrap_err();
    assert!(err.permanent, "{err:?}");
    assert!(
        err.message.starts_with(
            "VM \"web\": deleting its Node: the Kubernetes API server refused to let the daemon list nodes"
        ),
        "{}",
        err.message
    );
}
