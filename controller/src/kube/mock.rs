//! A scripted Kubernetes API server for tests: a `kube::Client` over `tower-test`'s mock service,
//! and helpers that take the next request, check its method and path, and answer it.

use ::kube::client::Body;
use http::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tower_test::mock::{self, Handle, SendResponse};

use super::access::KubeAccess;

/// The server side of the mock.
pub type Server = Handle<Request<Body>, Response<Body>>;

/// A client whose requests arrive at the returned [`Server`].
pub fn client() -> (::kube::Client, Server) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (::kube::Client::new(service, "default"), handle)
}

/// [`KubeAccess`] as host `host-1` over a mock client (inside a tokio runtime).
pub fn access() -> (KubeAccess, Server) {
    let (client, server) = client();
    (KubeAccess::new(client, "host-1"), server)
}

/// One request as the server saw it.
pub struct Seen {
    /// `GET`, `POST`, `DELETE`...
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The query string (empty when none), percent-decoded.
    pub query: String,
    /// The body as JSON (`Null` when empty).
    pub body: Value,
}

/// Takes the next request, asserts `method` and `path`, and answers `status` with `body`.
pub async fn expect(server: &mut Server, method: &str, path: &str, status: u16, body: Value) -> Seen {
    let (seen, send) = next(server).await;
    assert_eq!((seen.method.as_str(), seen.path.as_str()), (method, path), "unexpected request {}", seen.query);
    respond(send, status, body);
    seen
}

/// Takes the next request without answering it.
pub async fn next(server: &mut Server) -> (Seen, SendResponse<Response<Body>>) {
    let (request, send) = server.next_request().await.expect("the client sends a request");
    let (parts, body) = request.into_parts();
    let bytes = body.collect_bytes().await.expect("a readable request body");
    let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("a JSON body") };
    let query = parts.uri.query().unwrap_or_default();
    let seen = Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: percent_decode(query),
        body,
    };
    (seen, send)
}

/// Answers a taken request.
pub fn respond(send: SendResponse<Response<Body>>, status: u16, body: Value) {
    let response = Response::builder()
        .status(StatusCode::from_u16(status).expect("a valid status"))
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).expect("JSON")))
        .expect("a response");
    send.send_response(response);
}

/// The connection fails: what the client sees when the API server is gone.
pub async fn fail_connection(server: &mut Server) -> Seen {
    let (seen, send) = next(server).await;
    send.send_error(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused"));
    seen
}

/// A Kubernetes `Status` error body.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// A list of `kind` holding `items`.
pub fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
