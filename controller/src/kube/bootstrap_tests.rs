use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use super::*;
use crate::kube::mock::{self, expect};

const SECRETS_PATH: &str = "/api/v1/namespaces/kube-system/secrets";
const HASH: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn create_token() -> KubernetesBootstrap {
    KubernetesBootstrap {
        api_server_endpoint: "10.61.0.1:6443".into(),
        ca_cert_hash: HASH.into(),
        token_secret_ref: None,
        create_token: true,
    }
}

fn token_ref(name: &str) -> KubernetesBootstrap {
    KubernetesBootstrap { token_secret_ref: Some(name.into()), create_token: false, ..create_token() }
}

fn b64(s: &str) -> String {
    serde_json::to_value(ByteString(s.as_bytes().to_vec())).unwrap().as_str().unwrap().to_string()
}

fn unb64(v: &Value) -> String {
    String::from_utf8(serde_json::from_value::<ByteString>(v.clone()).unwrap().0).unwrap()
}

/// A bootstrap-token Secret as the API server returns it, with `expiration` (None: no key).
fn token_secret_json(id: &str, secret: &str, expiration: Option<SystemTime>, labels: Value) -> Value {
    let mut data = json!({
        "token-id": b64(id),
        "token-secret": b64(secret),
        "usage-bootstrap-authentication": b64("true"),
        "usage-bootstrap-signing": b64("true"),
    });
    if let Some(at) = expiration {
        data["expiration"] = json!(b64(&rfc3339(at)));
    }
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": format!("bootstrap-token-{id}"), "namespace": "kube-system", "labels": labels},
        "type": TOKEN_SECRET_TYPE,
        "data": data,
    })
}

fn labels() -> Value {
    json!({"ignite.dev/vm": "web", "ignite.dev/host": "host-1"})
}

#[test]
fn generated_tokens_have_kubeadm_format_and_differ() {
    let a = BootstrapToken::generate().unwrap();
    let b = BootstrapToken::generate().unwrap();
    let whole = a.expose();
    let (id, secret) = whole.split_once('.').unwrap();
    assert_eq!((id.len(), secret.len()), (6, 16));
    assert!(whole.bytes().all(|c| c == b'.' || c.is_ascii_lowercase() || c.is_ascii_digit()), "{whole}");
    assert_eq!(BootstrapToken::from_parts(id, secret).unwrap(), a);
    assert_ne!(a, b, "two tokens from the OS random source");
    assert_eq!(a.secret_name(), format!("bootstrap-token-{id}"));
}

#[test]
fn debug_never_shows_the_secret_part() {
    let token = BootstrapToken::from_parts("abcdef", "0123456789abcdef").unwrap();
    assert_eq!(format!("{token:?}"), "BootstrapToken(abcdef.<redacted>)");
}

#[test]
fn malformed_parts_are_rejected() {
    assert_eq!(BootstrapToken::from_parts("ABCDEF", "0123456789abcdef"), Err(TokenFormatError::Id));
    assert_eq!(BootstrapToken::from_parts("abcde", "0123456789abcdef"), Err(TokenFormatError::Id));
    assert_eq!(BootstrapToken::from_parts("abcdef", "0123456789abcde"), Err(TokenFormatError::Secret));
    assert_eq!(BootstrapToken::from_parts("abcdef", "0123456789abcde!"), Err(TokenFormatError::Secret));
}

#[test]
fn the_join_configuration_is_kubeadm_v1beta3_with_the_provider_id() {
    let token = BootstrapToken::from_parts("abcdef", "0123456789abcdef").unwrap();
    let join = guest_join("web", "ignite://host-1/web", &create_token(), &token);
    assert_eq!(join.config_path, "/etc/ignite/kubeadm-join.yaml");
    assert!(join.command.is_empty(), "ignite-init runs kubeadm join --config");
    assert_eq!(join.redact, ["abcdef.0123456789abcdef", "0123456789abcdef"]);
    let yaml: serde_yaml::Value = serde_yaml::from_str(&join.config).unwrap();
    assert_eq!(yaml["apiVersion"], "kubeadm.k8s.io/v1beta3");
    assert_eq!(yaml["kind"], "JoinConfiguration");
    let discovery = &yaml["discovery"]["bootstrapToken"];
    assert_eq!(discovery["apiServerEndpoint"], "10.61.0.1:6443");
    assert_eq!(discovery["token"], "abcdef.0123456789abcdef");
    assert_eq!(discovery["caCertHashes"][0], HASH);
    assert_eq!(yaml["nodeRegistration"]["name"], "web");
    assert_eq!(yaml["nodeRegistration"]["kubeletExtraArgs"]["provider-id"], "ignite://host-1/web");
}

#[tokio::test]
async fn create_token_posts_a_labelled_expiring_secret() {
    let (access, mut server) = mock::access();
    let client = tokio::spawn(async move { token_for(&access, "web", &create_token(), now()).await });
    let listed = expect(&mut server, "GET", SECRETS_PATH, 200, mock::list("SecretList", vec![])).await;
    assert!(listed.query.contains("labelSelector=ignite.dev/vm=web,ignite.dev/host=host-1"), "{}", listed.query);
    let (posted, send) = mock::next(&mut server).await;
    assert_eq!((posted.method.as_str(), posted.path.as_str()), ("POST", SECRETS_PATH));
    mock::respond(send, 201, posted.body.clone());
    let token = client.await.unwrap().unwrap();

    let body = &posted.body;
    assert_eq!(body["type"], "bootstrap.kubernetes.io/token");
    assert_eq!(body["metadata"]["name"], format!("bootstrap-token-{}", token.id()));
    assert_eq!(body["metadata"]["namespace"], "kube-system");
    assert_eq!(body["metadata"]["labels"], labels());
    let data = &body["data"];
    assert_eq!(unb64(&data["token-id"]), token.id());
    assert_eq!(unb64(&data["token-secret"]), token.secret());
    assert_eq!(unb64(&data["expiration"]), rfc3339(now() + Duration::from_secs(3600)));
    assert_eq!(unb64(&data["expiration"]), "2027-01-15T09:00:00Z");
    assert_eq!(unb64(&data["usage-bootstrap-authentication"]), "true");
    assert_eq!(unb64(&data["usage-bootstrap-signing"]), "true");
    assert_eq!(unb64(&data["auth-extra-groups"]), "system:bootstrappers:kubeadm:default-node-token");
    assert!(unb64(&data["description"]).contains("ignite VM web on host host-1"));
}

#[tokio::test]
async fn a_recreated_vm_reuses_its_fresh_token_and_deletes_stale_ones() {
    let (access, mut server) = mock::access();
    let client = tokio::spawn(async move { token_for(&access, "web", &create_token(), now()).await });
    let stale = token_secret_json("aaaaaa", "0123456789abcdef", Some(now() + Duration::from_secs(600)), labels());
    let fresh = token_secret_json("bbbbbb", "fedcba9876543210", Some(now() + Duration::from_secs(3000)), labels());
    expect(&mut server, "GET", SECRETS_PATH, 200, mock::list("SecretList", vec![stale, fresh])).await;
    let deleted =
        expect(&mut server, "DELETE", &format!("{SECRETS_PATH}/bootstrap-token-aaaaaa"), 200, json!({})).await;
    assert_eq!(deleted.method, "DELETE");
    let token = client.await.unwrap().unwrap();
    assert_eq!(token.expose(), "bbbbbb.fedcba9876543210");
}

#[tokio::test]
async fn expired_tokens_are_deleted_and_a_new_one_created() {
    let (access, mut server) = mock::access();
    let client = tokio::spawn(async move { token_for(&access, "web", &create_token(), now()).await });
    let expired = token_secret_json("aaaaaa", "0123456789abcdef", Some(now() - Duration::from_secs(1)), labels());
    expect(&mut server, "GET", SECRETS_PATH, 200, mock::list("SecretList", vec![expired])).await;
    // Already gone (another host's sweep, or a retry): 404 is fine.
    let gone = mock::status(404, "NotFound", "secrets \"bootstrap-token-aaaaaa\" not found");
    expect(&mut server, "DELETE", &format!("{SECRETS_PATH}/bootstrap-token-aaaaaa"), 404, gone).await;
    let (posted, send) = mock::next(&mut server).await;
    assert_eq!(posted.method, "POST");
    mock::respond(send, 201, posted.body.clone());
    let token = client.await.unwrap().unwrap();
    assert_ne!(token.id(), "aaaaaa");
}

#[tokio::test]
async fn rbac_denied_names_the_verb_and_the_resource_and_is_permanent() {
    let (access, mut server) = mock::access();
    let client = tokio::spawn(async move { token_for(&access, "web", &create_token(), now()).await });
    expect(&mut server, "GET", SECRETS_PATH, 200, mock::list("SecretList", vec![])).await;
    let denied = mock::status(
        403,
        "Forbidden",
        "secrets is forbidden: User \"system:serviceaccount:ignite:ignite\" cannot create resource \"secrets\" in API group \"\" in the namespace \"kube-system\"",
    );
    let (posted, send) = mock::next(&mut server).await;
    let token = unb64(&posted.body["data"]["token-secret"]);
    mock::respond(send, 403, denied);
    let err = client.await.unwrap().unwrap_err();
    assert!(err.is_permanent());
    let text = guest_api::error_chain(&err);
    assert!(text.starts_with("VM \"web\": bootstrap token: "), "{text}");
    assert!(text.contains("refused to let the daemon create secrets in namespace kube-system"), "{text}");
    assert!(!text.contains(&token), "the token never appears in errors: {text}");
}

#[tokio::test]
async fn an_api_server_that_is_gone_is_a_transient_error() {
    let (access, mut server) = mock::access();
    let client = tokio::spawn(async move { token_for(&access, "web", &create_token(), now()).await });
    let seen = mock::fail_connection(&mut server).await;
    assert_eq!(seen.path, SECRETS_PATH);
    let err = client.await.unwrap().unwrap_err();
    assert!(!err.is_permanent(), "{err:?}");
    let text = guest_api::error_chain(&err);
    assert!(
        text.contains("cannot list secrets in namespace kube-system: the Kubernetes API server is unreachable"),
        "{text}"
    );
}

#[tokio::test]
async fn a_referenced_secret_gives_its_token() {
    let (access, mut server) = mock::access();
    let client =
        tokio::spawn(async move { token_for(&access, "web", &token_ref("bootstrap-token-abcdef"), now()).await });
    let secret = token_secret_json("abcdef", "0123456789abcdef", Some(now() + Duration::from_secs(60)), json!({}));
    expect(&mut server, "GET", &format!("{SECRETS_PATH}/bootstrap-token-abcdef"), 200, secret).await;
    assert_eq!(client.await.unwrap().unwrap().expose(), "abcdef.0123456789abcdef");

    // No expiration key: the token never expires.
    let (access, mut server) = mock::access();
    let client =
        tokio::spawn(async move { token_for(&access, "web", &token_ref("bootstrap-token-abcdef"), now()).await });
    let secret = token_secret_json("abcdef", "0123456789abcdef", None, json!({}));
    expect(&mut server, "GET", &format!("{SECRETS_PATH}/bootstrap-token-abcdef"), 200, secret).await;
    assert_eq!(client.await.unwrap().unwrap().id(), "abcdef");
}

/// Runs `tokenSecretRef: bootstrap-token-abcdef` against a server answering `status` with `body`.
async fn referenced(status: u16, body: Value) -> BootstrapError {
    let (access, mut server) = mock::access();
    let client =
        tokio::spawn(async move { token_for(&access, "web", &token_ref("bootstrap-token-abcdef"), now()).await });
    expect(&mut server, "GET", &format!("{SECRETS_PATH}/bootstrap-token-abcdef"), status, body).await;
    client.await.unwrap().unwrap_err()
}

#[tokio::test]
async fn a_missing_referenced_secret_is_named() {
    let err = referenced(404, mock::status(404, "NotFound", "secrets \"bootstrap-token-abcdef\" not found")).await;
    assert!(matches!(err, BootstrapError::SecretMissing { .. }) && err.is_permanent(), "{err:?}");
    assert_eq!(
        err.to_string(),
        "VM \"web\": spec.bootstrap.kubernetes.tokenSecretRef: secret kube-system/bootstrap-token-abcdef does not exist"
    );
}

#[tokio::test]
async fn an_expired_referenced_secret_says_when() {
    let at = now() - Duration::from_secs(3600);
    let err = referenced(200, token_secret_json("abcdef", "0123456789abcdef", Some(at), json!({}))).await;
    assert!(matches!(err, BootstrapError::SecretExpired { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "VM \"web\": spec.bootstrap.kubernetes.tokenSecretRef: the token in secret kube-system/bootstrap-token-abcdef expired at 2027-01-15T07:00:00Z"
    );
}

#[tokio::test]
async fn malformed_referenced_secrets_name_the_key_at_fault_but_never_its_value() {
    let good = || token_secret_json("abcdef", "0123456789abcdef", None, json!({}));
    let cases: Vec<(Value, &str)> = vec![
        (
            {
                let mut s = good();
                s["data"]["token-secret"] = json!(b64("short"));
                s
            },
            "data.token-secret must be 16 characters of [a-z0-9]",
        ),
        (
            {
                let mut s = good();
                s["data"].as_object_mut().unwrap().remove("token-id");
                s
            },
            "data.token-id is missing",
        ),
        (
            {
                let mut s = good();
                s["type"] = json!("Opaque");
                s
            },
            "its type is \"Opaque\", the API server only honours type bootstrap.kubernetes.io/token",
        ),
        (
            {
                let mut s = good();
                s["data"]["expiration"] = json!(b64("tomorrow"));
                s
            },
            "data.expiration \"tomorrow\" is not an RFC 3339 time",
        ),
        (
            {
                let mut s = good();
                s["data"]["usage-bootstrap-authentication"] = json!(b64("false"));
                s
            },
            "data.usage-bootstrap-authentication must be \"true\" for kubeadm join",
        ),
        (
            {
                let mut s = good();
                s["data"]["token-id"] = json!(b64("zzzzzz"));
                s
            },
            "its name must be bootstrap-token-<token-id>, i.e. bootstrap-token-zzzzzz",
        ),
    ];
    for (secret, problem) in cases {
        let err = referenced(200, secret).await;
        assert!(matches!(err, BootstrapError::SecretMalformed { .. }) && err.is_permanent(), "{err:?}");
        let text = err.to_string();
        assert!(text.ends_with(problem), "{text}");
        assert!(text.starts_with("VM \"web\": spec.bootstrap.kubernetes.tokenSecretRef: secret kube-system/bootstrap-token-abcdef is not a bootstrap token: "), "{text}");
        assert!(!text.contains("0123456789abcdef"), "{text}");
    }
}

#[tokio::test]
async fn reading_a_referenced_secret_without_rbac_is_a_precise_error() {
    let denied = mock::status(403, "Forbidden", "secrets \"bootstrap-token-abcdef\" is forbidden");
    let err = referenced(403, denied).await;
    assert!(err.is_permanent());
    let text = guest_api::error_chain(&err);
    assert!(text.contains("refused to let the daemon get secrets in namespace kube-system"), "{text}");
}

#[tokio::test]
async fn delete_tokens_removes_every_token_of_the_vm() {
    let (access, mut server) = mock::access();
    let client = tokio::spawn(async move { delete_tokens(&access, "web").await });
    let a = token_secret_json("aaaaaa", "0123456789abcdef", None, labels());
    let b = token_secret_json("bbbbbb", "0123456789abcdef", None, labels());
    let listed = expect(&mut server, "GET", SECRETS_PATH, 200, mock::list("SecretList", vec![a, b])).await;
    assert!(listed.query.contains("labelSelector=ignite.dev/vm=web,ignite.dev/host=host-1"), "{}", listed.query);
    expect(&mut server, "DELETE", &format!("{SECRETS_PATH}/bootstrap-token-aaaaaa"), 200, json!({})).await;
    expect(&mut server, "DELETE", &format!("{SECRETS_PATH}/bootstrap-token-bbbbbb"), 200, json!({})).await;
    assert_eq!(client.await.unwrap().unwrap(), 2);
}
