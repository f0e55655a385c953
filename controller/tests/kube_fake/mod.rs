//! A small fake Kubernetes API server for the MicroVM resource, behind `tower-test`'s mock
//! service: it keeps objects with resourceVersions and generations, answers list, watch (long
//! poll: a watch is answered once there are events after its resourceVersion), merge patches of
//! the object and of its status subresource (with resourceVersion preconditions), and removes an
//! object being deleted once its finalizers are gone. Failures are injected on request: CRD not
//! installed (404), RBAC denial (403), the server going away (transport errors).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock::{self, SendResponse};

const PREFIX: &str = "/apis/ignite.dev/v1alpha1/";

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// `GET`, `PATCH`...
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The query string.
    pub query: String,
    /// The body as JSON (`Null` when empty).
    pub body: Value,
    /// What the probe said when the request arrived.
    pub probe: String,
    /// The HTTP status answered (0: a transport error).
    pub code: u16,
}

impl Seen {
    /// A watch request.
    pub fn is_watch(&self) -> bool {
        self.query.contains("watch=true")
    }
}

/// One watch event: resourceVersion, type, object.
type Event = (u64, &'static str, Value);

#[derive(Default)]
struct State {
    objects: BTreeMap<(String, String), Value>,
    events: Vec<Event>,
    rv: u64,
    seen: Vec<Seen>,
    crd_installed: bool,
    forbidden: Vec<(String, String)>,
    transport_errors: u32,
    /// Held watches: after which resourceVersion, in which namespace (`None`: all).
    watches: Vec<(u64, Option<String>, SendResponse<Response<Body>>)>,
}

type Probe = Arc<dyn Fn() -> String + Send + Sync>;

/// The fake API server; cheap to clone.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    probe: Arc<Mutex<Option<Probe>>>,
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": message}),
    )
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl FakeApi {
    /// A server with the CRD installed, and a client talking to it (default namespace `default`).
    pub fn start() -> (FakeApi, kube::Client) {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let api = FakeApi {
            state: Arc::new(Mutex::new(State { crd_installed: true, rv: 100, ..Default::default() })),
            probe: Arc::new(Mutex::new(None)),
        };
        let server = api.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                server.handle(request, send).await;
            }
        });
        (api, kube::Client::new(service, "default"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Evaluates `probe` at every request and records its answer in [`Seen::probe`].
    pub fn set_probe(&self, probe: impl Fn() -> String + Send + Sync + 'static) {
        *self.probe.lock().unwrap() = Some(Arc::new(probe));
    }

    /// Whether the CRD is installed (lists and watches answer 404 otherwise).
    pub fn set_crd_installed(&self, installed: bool) {
        self.lock().crd_installed = installed;
    }

    /// Answers 403 to every `method` request whose path ends with `path_suffix`.
    pub fn forbid(&self, method: &str, path_suffix: &str) {
        self.lock().forbidden.push((method.to_string(), path_suffix.to_string()));
    }

    /// The server goes away: held watches and the next `n` requests fail at the transport.
    pub fn go_away(&self, n: u32) {
        let mut state = self.lock();
        state.transport_errors = n;
        for (_, _, send) in state.watches.drain(..) {
            send.send_error(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset by peer"));
        }
    }

    /// Whether a watch is held, waiting for events (the controller is watching).
    pub fn watching(&self) -> bool {
        !self.lock().watches.is_empty()
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.lock().seen.clone()
    }

    /// The object `ns/name` as the server holds it.
    pub fn get(&self, ns: &str, name: &str) -> Option<Value> {
        self.lock().objects.get(&(ns.to_string(), name.to_string())).cloned()
    }

    /// Creates a MicroVM (`kubectl apply` of a new object).
    pub fn create(&self, ns: &str, name: &str, labels: Value, spec: Value) {
        let mut state = self.lock();
        state.rv += 1;
        let obj = json!({
            "apiVersion": "ignite.dev/v1alpha1",
            "kind": "MicroVM",
            "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}"), "generation": 1,
                         "resourceVersion": state.rv.to_string(), "labels": labels,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": spec,
        });
        state.objects.insert((ns.to_string(), name.to_string()), obj.clone());
        let rv = state.rv;
        state.events.push((rv, "ADDED", obj));
        Self::flush(&mut state);
    }

    /// Changes the spec (`kubectl apply` of a changed object): the generation moves.
    pub fn update_spec(&self, ns: &str, name: &str, spec_patch: Value) {
        let mut state = self.lock();
        let key = (ns.to_string(), name.to_string());
        let mut obj = state.objects.get(&key).cloned().expect("the object exists");
        merge(&mut obj["spec"], &spec_patch);
        obj["metadata"]["generation"] = json!(obj["metadata"]["generation"].as_i64().unwrap() + 1);
        Self::store(&mut state, key, obj);
    }

    /// `kubectl delete`: with finalizers the object only gets a deletionTimestamp.
    pub fn delete(&self, ns: &str, name: &str) {
        let mut state = self.lock();
        let key = (ns.to_string(), name.to_string());
        let mut obj = state.objects.get(&key).cloned().expect("the object exists");
        obj["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:01:00Z");
        Self::store(&mut state, key, obj);
    }

    /// Writes `obj` with a new resourceVersion (removing it when deleted and unfinalized) and
    /// answers the held watches.
    fn store(state: &mut State, key: (String, String), mut obj: Value) {
        state.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        let finalized = obj["metadata"]["finalizers"].as_array().is_none_or(|f| f.is_empty());
        let rv = state.rv;
        if obj["metadata"]["deletionTimestamp"].is_string() && finalized {
            state.objects.remove(&key);
            state.events.push((rv, "DELETED", obj));
        } else {
            state.objects.insert(key, obj.clone());
            state.events.push((rv, "MODIFIED", obj));
        }
        Self::flush(state);
    }

    fn flush(state: &mut State) {
        fn pending<'a>(events: &'a [Event], after: u64, ns: Option<&'a str>) -> impl Iterator<Item = &'a Event> + 'a {
            events.iter().filter(move |(v, _, o)| *v > after && ns.is_none_or(|ns| o["metadata"]["namespace"] == ns))
        }
        let (ready, waiting): (Vec<_>, Vec<_>) = state
            .watches
            .drain(..)
            .partition(|(after, ns, _)| pending(&state.events, *after, ns.as_deref()).next().is_some());
        state.watches = waiting;
        for (after, ns, send) in ready {
            let mut body = Vec::new();
            for (_, kind, obj) in pending(&state.events, after, ns.as_deref()) {
                body.extend(serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap());
                body.push(b'\n');
            }
            send.send_response(Response::builder().status(200).body(Body::from(body)).unwrap());
        }
    }

    async fn handle(&self, request: Request<Body>, send: SendResponse<Response<Body>>) {
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap_or_default();
        let body: Value =
            if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        let probe = self.probe.lock().unwrap().clone().map(|p| p()).unwrap_or_default();
        let mut state = self.lock();
        let mut seen = Seen {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or_default().to_string(),
            body,
            probe,
            code: 0,
        };
        if state.transport_errors > 0 {
            state.transport_errors -= 1;
            state.seen.push(seen);
            send.send_error(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused"));
            return;
        }
        let answer = Self::answer(&mut state, &seen);
        match answer {
            None => {
                // A watch with nothing to report yet: held until something changes.
                let after = seen
                    .query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("resourceVersion="))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let namespace = seen.path.split('/').skip_while(|p| *p != "namespaces").nth(1).map(String::from);
                seen.code = 200;
                state.seen.push(seen);
                state.watches.push((after, namespace, send));
                Self::flush(&mut state);
            }
            Some((code, value)) => {
                seen.code = code;
                state.seen.push(seen);
                let response =
                    Response::builder().status(code).body(Body::from(serde_json::to_vec(&value).unwrap())).unwrap();
                send.send_response(response);
            }
        }
    }

    fn answer(state: &mut State, seen: &Seen) -> Option<(u16, Value)> {
        if state.forbidden.iter().any(|(m, p)| *m == seen.method && seen.path.ends_with(p.as_str())) {
            let message = format!(
                "microvms.ignite.dev is forbidden: User \"system:serviceaccount:ignite:ignite\" cannot {} resource",
                seen.method.to_lowercase()
            );
            return Some(status(403, "Forbidden", &message));
        }
        let Some(rest) = seen.path.strip_prefix(PREFIX) else {
            return Some(status(404, "NotFound", "the server could not find the requested resource"));
        };
        if !state.crd_installed {
            return Some(status(404, "NotFound", "the server could not find the requested resource"));
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let (namespace, object) = match parts.as_slice() {
            ["microvms"] => (None, None),
            ["namespaces", ns, "microvms"] => (Some(*ns), None),
            ["namespaces", ns, "microvms", name] => (Some(*ns), Some((*name, false))),
            ["namespaces", ns, "microvms", name, "status"] => (Some(*ns), Some((*name, true))),
            _ => return Some(status(404, "NotFound", "no such path")),
        };
        match (seen.method.as_str(), object) {
            // Held, and answered by the flush once there are events after its resourceVersion.
            ("GET", None) if seen.is_watch() => None,
            ("GET", None) => {
                let items: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|((ns, _), _)| namespace.is_none_or(|want| want == ns))
                    .map(|(_, o)| o.clone())
                    .collect();
                Some((
                    200,
                    json!({"apiVersion": "ignite.dev/v1alpha1", "kind": "MicroVMList", "metadata": {"resourceVersion": state.rv.to_string()}, "items": items}),
                ))
            }
            ("PATCH", Some((name, subresource))) => {
                let key = (namespace.unwrap_or_default().to_string(), name.to_string());
                let Some(mut obj) = state.objects.get(&key).cloned() else {
                    return Some(status(404, "NotFound", &format!("microvms.ignite.dev \"{name}\" not found")));
                };
                let mut patch = seen.body.clone();
                if let Some(rv) = patch.pointer("/metadata/resourceVersion").cloned() {
                    if rv != obj["metadata"]["resourceVersion"] {
                        return Some(status(409, "Conflict", "the object has been modified; please apply your changes to the latest version and try again"));
                    }
                    patch["metadata"].as_object_mut().unwrap().remove("resourceVersion");
                }
                if subresource {
                    merge(&mut obj["status"], &patch["status"]);
                } else {
                    if let Some(meta) = patch.get("metadata") {
                        merge(&mut obj["metadata"], meta);
                    }
                }
                Self::store(state, key.clone(), obj.clone());
                let stored = state.objects.get(&key).cloned().unwrap_or(obj);
                Some((200, stored))
            }
            _ => Some(status(405, "MethodNotAllowed", "not supported by the fake")),
        }
    }
}
