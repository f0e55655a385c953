use serde_json::{json, Value};

use super::*;
use crate::api::Vm;
use crate::kube::mock::{self, expect};

fn node_json(name: &str, provider_id: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "resourceVersion": "5"},
           "spec": {"providerID": provider_id}})
}

fn node(name: &str, provider_id: &str) -> Node {
    serde_json::from_value(node_json(name, provider_id)).unwrap()
}

fn store_with(vms: &[&str]) -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    for name in vms {
        let vm: Vm = serde_json::from_value(json!({
            "apiVersion": "ignite.dev/v1alpha1", "kind": "VM",
            "metadata": {"name": name}, "spec": {"image": "busybox"},
        }))
        .unwrap();
        store.put_vm(&vm, "api", false).unwrap();
    }
    (dir, store)
}

fn node_ref(store: &Store, vm: &str) -> Option<String> {
    store.get_vm(vm).unwrap().unwrap().status.node_ref
}

fn nodes() -> Value {
    mock::list(
        "NodeList",
        vec![
            node_json("control-plane", "aws:///eu-west-1a/i-0123"),
            node_json("web-other-host", "ignite://host-2/web"),
            node_json("web", "ignite://host-1/web"),
        ],
    )
}

#[tokio::test]
async fn the_node_is_found_by_its_provider_id_on_this_host_only() {
    let (access, mut server) = mock::access();
    let client = tokio::spawn(async move { find_node(&access, "web").await });
    expect(&mut server, "GET", "/api/v1/nodes", 200, nodes()).await;
    assert_eq!(client.await.unwrap().unwrap().as_deref(), Some("web"));

    let (access, mut server) = mock::access();
    let client = tokio::spawn(async move { find_node(&access, "db").await });
    expect(&mut server, "GET", "/api/v1/nodes", 200, nodes()).await;
    assert_eq!(client.await.unwrap().unwrap(), None);
}

#[tokio::test]
async fn deleting_a_vm_deletes_its_node() {
    let (access, mut server) = mock::access();
    let client = tokio::spawn(async move { delete_node(&access, "web").await });
    expect(&mut server, "GET", "/api/v1/nodes", 200, nodes()).await;
    expect(&mut server, "DELETE", "/api/v1/nodes/web", 200, node_json("web", "ignite://host-1/web")).await;
    assert_eq!(client.await.unwrap().unwrap().as_deref(), Some("web"));
}

#[tokio::test]
async fn a_node_already_gone_is_fine() {
    let (access, mut server) = mock::access();
    let client = tokio::spawn(async move { delete_node(&access, "web").await });
    expect(&mut server, "GET", "/api/v1/nodes", 200, nodes()).await;
    let gone = mock::status(404, "NotFound", "nodes \"web\" not found");
    expect(&mut server, "DELETE", "/api/v1/nodes/web", 404, gone).await;
    assert_eq!(client.await.unwrap().unwrap().as_deref(), Some("web"));

    // No Node registered at all: nothing to delete, no DELETE sent.
    let (access, mut server) = mock::access();
    let client = tokio::spawn(async move { delete_node(&access, "web").await });
    expect(&mut server, "GET", "/api/v1/nodes", 200, mock::list("NodeList", vec![])).await;
    assert_eq!(client.await.unwrap().unwrap(), None);
    drop(server);
}

#[tokio::test]
async fn deleting_a_node_without_rbac_names_verb_and_resource() {
    let (access, mut server) = mock::access();
    let client = tokio::spawn(async move { delete_node(&access, "web").await });
    expect(&mut server, "GET", "/api/v1/nodes", 200, nodes()).await;
    let denied =
        mock::status(403, "Forbidden", "nodes \"web\" is forbidden: User \"ignite\" cannot delete resource \"nodes\"");
    expect(&mut server, "DELETE", "/api/v1/nodes/web", 403, denied).await;
    let err = client.await.unwrap().unwrap_err();
    assert!(matches!(err, ApiCallError::Forbidden { verb: "delete", .. }) && err.is_permanent(), "{err:?}");
    assert!(err.to_string().contains("refused to let the daemon delete nodes"), "{err}");
}

#[tokio::test]
async fn listing_nodes_on_a_gone_api_server_is_transient() {
    let (access, mut server) = mock::access();
    let client = tokio::spawn(async move { delete_node(&access, "web").await });
    mock::fail_connection(&mut server).await;
    let err = client.await.unwrap().unwrap_err();
    assert!(matches!(err, ApiCallError::Unreachable { verb: "list", .. }) && !err.is_permanent(), "{err:?}");
}

#[test]
fn the_tracker_sets_and_clears_node_refs() {
    let (_dir, store) = store_with(&["web", "db"]);
    let mut tracker = NodeTracker::new("host-1", store.clone());
    tracker.apply(watcher::Event::Init).unwrap();
    tracker.apply(watcher::Event::InitApply(node("web", "ignite://host-1/web"))).unwrap();
    tracker.apply(watcher::Event::InitApply(node("db-elsewhere", "ignite://host-2/db"))).unwrap();
    tracker.apply(watcher::Event::InitApply(node("ghost", "ignite://host-1/ghost"))).unwrap();
    tracker.apply(watcher::Event::InitDone).unwrap();
    assert_eq!(node_ref(&store, "web").as_deref(), Some("web"));
    assert_eq!(node_ref(&store, "db"), None, "another host's VM of the same name");

    tracker.apply(watcher::Event::Apply(node("db", "ignite://host-1/db"))).unwrap();
    assert_eq!(node_ref(&store, "db").as_deref(), Some("db"));
    tracker.apply(watcher::Event::Delete(node("db", "ignite://host-1/db"))).unwrap();
    assert_eq!(node_ref(&store, "db"), None);

    // A relist that no longer has the web Node clears it.
    tracker.apply(watcher::Event::Init).unwrap();
    tracker.apply(watcher::Event::InitDone).unwrap();
    assert_eq!(node_ref(&store, "web"), None);
}

#[test]
fn a_deleted_node_does_not_clear_a_newer_node_ref() {
    let (_dir, store) = store_with(&["web"]);
    let mut tracker = NodeTracker::new("host-1", store.clone());
    tracker.apply(watcher::Event::Apply(node("web-old", "ignite://host-1/web"))).unwrap();
    tracker.apply(watcher::Event::Apply(node("web", "ignite://host-1/web"))).unwrap();
    tracker.apply(watcher::Event::Delete(node("web-old", "ignite://host-1/web"))).unwrap();
    assert_eq!(node_ref(&store, "web").as_deref(), Some("web"));
}

#[tokio::test]
async fn the_watch_reports_the_node_then_its_deletion() {
    let (_dir, store) = store_with(&["web"]);
    let (access, mut server) = mock::access();
    let watch = tokio::spawn(watch_nodes(access, store.clone()));

    let listed = expect(&mut server, "GET", "/api/v1/nodes", 200, nodes()).await;
    assert!(!listed.query.contains("watch=true"), "a list first: {}", listed.query);
    // The watcher asks for the watch only once the listed Nodes were handled.
    let (watch_request, send) = mock::next(&mut server).await;
    assert!(watch_request.query.contains("watch=true"), "{}", watch_request.query);
    assert_eq!(node_ref(&store, "web").as_deref(), Some("web"));

    let deleted = json!({"type": "DELETED", "object": node_json("web", "ignite://host-1/web")});
    let line = format!("{deleted}\n");
    let response = http::Response::builder().status(200).body(::kube::client::Body::from(line.into_bytes())).unwrap();
    send.send_response(response);
    // The watch stream ended: the watcher watches again once it handled the deletion.
    let (again, _send) = mock::next(&mut server).await;
    assert!(again.query.contains("watch=true"), "{}", again.query);
    assert_eq!(node_ref(&store, "web"), None);
    watch.abort();
}

#[tokio::test]
async fn a_vm_declared_after_its_node_appeared_gets_its_node_ref() {
    let (_dir, store) = store_with(&[]);
    let mut tracker = NodeTracker::new("host-1", store.clone());
    tracker.apply(watcher::Event::Apply(node("web", "ignite://host-1/web"))).unwrap();
    let mut changes = store.watch_vms();
    let (_other, declared) = store_with(&["web"]);
    let record = declared.get_vm("web").unwrap().unwrap();
    store.put_vm(&record.vm, "api", false).unwrap();
    let change = changes.next_change().await.expect("the put is a change");
    tracker.vm_changed(&change).unwrap();
    assert_eq!(node_ref(&store, "web").as_deref(), Some("web"));
    // A change that already carries it writes nothing more.
    let again = store.get_vm("web").unwrap().unwrap();
    tracker.vm_changed(&VmChange { name: "web".into(), record: Some(again.clone()), revision: 0 }).unwrap();
    assert_eq!(store.get_vm("web").unwrap().unwrap().revision, again.revision);
}
