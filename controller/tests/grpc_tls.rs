//! The API over TCP with mutual TLS: the real daemon with `tcp` set, certificates made by the
//! `openssl` command, and the real `ignite` CLI with `--host`. A client certificate from another
//! CA is refused, and so is a client without the TLS files.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use controller::daemon::{Daemon, TcpApi};
use controller::grpc::tls::{ClientTls, ServerTls};
use support::fleet::daemon_config;
use support::tiny_guest;
use support::tls::{daemon_and_client, leaf, CLIENT_EXTENSIONS};

const NAME: &str = "the_cli_reaches_a_daemon_over_tcp_with_mutual_tls_only";

/// `ignite --host URL` with the TLS files of `client` (none: no TLS flags), never the socket.
fn ignite(dir: &Path, url: &str, client: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(tiny_guest::ignite_bin());
    cmd.arg("--socket").arg(dir.join("no.sock")).args(["--host", url]).env("IGNITE_AUTOSTART", "0");
    if let Some(client) = client {
        cmd.arg("--tls-ca").arg(dir.join("daemon-ca.pem"));
        cmd.arg("--tls-cert").arg(dir.join(format!("{client}.pem")));
        cmd.arg("--tls-key").arg(dir.join(format!("{client}.key")));
    }
    cmd.args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_cli_reaches_a_daemon_over_tcp_with_mutual_tls_only() {
    if let Some(why) = support::fleet::unavailable() {
        eprintln!("SKIP {NAME}: {why}");
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let c = certs.path();
    daemon_and_client(c, "alice");
    leaf(c, "mallory", "daemon-ca", CLIENT_EXTENSIONS); // a valid certificate, from the wrong CA

    let root = tempfile::tempdir().unwrap();
    let mut config = daemon_config(root.path(), Vec::new(), None);
    let tls = ServerTls { cert: c.join("daemon.pem"), key: c.join("daemon.key"), client_ca: c.join("clients-ca.pem") };
    config.tcp = Some(TcpApi { addr: "127.0.0.1:0".parse().unwrap(), tls });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let daemon = runtime.block_on(Daemon::start(config)).unwrap();
    let url = format!("https://127.0.0.1:{}", daemon.tcp_addr().unwrap().port());

    let out = ignite(c, &url, Some("alice"), &["ps", "-a"]);
    assert!(out.status.success() && text(&out.stdout).starts_with("NAME"), "{}", text(&out.stderr));
    let out = ignite(c, &url, Some("alice"), &["version"]);
    assert!(text(&out.stdout).contains(&format!("(daemon on {url})")), "{}", text(&out.stdout));
    // The standard services answer over TCP too: health, and reflection listing ignite's services.
    support::daemon::wait_for("the daemon's health to be SERVING", std::time::Duration::from_secs(20), || {
        text(&ignite(c, &url, Some("alice"), &["version"]).stdout).contains("health (grpc.health.v1): SERVING")
    });
    let stdout = text(&ignite(c, &url, Some("alice"), &["version"]).stdout);
    for service in ["ignite.v1alpha1.Vms", "ignite.v1alpha1.Host", "grpc.health.v1.Health"] {
        assert!(stdout.contains(service), "reflection does not list {service}: {stdout}");
    }

    let out = ignite(c, &url, Some("mallory"), &["ps"]);
    assert!(!out.status.success(), "a certificate from another CA is refused: {}", text(&out.stdout));
    assert!(text(&out.stderr).contains("its --tls-client-ca must sign"), "{}", text(&out.stderr));
    let out = ignite(c, &url, None, &["ps"]);
    assert!(text(&out.stderr).contains("--tls-ca"), "--host asks for the TLS files: {}", text(&out.stderr));

    // Files of this machine are not sent to a daemon on another one.
    let out = ignite(c, &url, Some("alice"), &["image", "import", c.to_str().unwrap()]);
    assert!(text(&out.stderr).contains("runs on another machine"), "{}", text(&out.stderr));

    // And a remote client cannot make the daemon read one of its own files: paths outside
    // --allow-host-path (none here) are refused, a relative one is not even looked up.
    runtime.block_on(async {
        use controller::grpc::proto::{images_client::ImagesClient, kernels_client::KernelsClient, *};
        let tls = ClientTls { ca: c.join("daemon-ca.pem"), cert: c.join("alice.pem"), key: c.join("alice.key") };
        let channel = controller::grpc::tls::connect_tcp(&url, &tls).await.unwrap();
        let err = ImagesClient::new(channel.clone())
            .import(ImportImageRequest { path: "/etc".into(), tag: "stolen:1".into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{}", err.message());
        assert!(err.message().contains("--allow-host-path"), "{}", err.message());
        let mut kernels = KernelsClient::new(channel);
        let err = kernels.import(ImportKernelRequest { source: "/etc/shadow".into(), name: "k".into() }).await;
        assert_eq!(err.unwrap_err().code(), tonic::Code::PermissionDenied);
        let err = kernels.import(ImportKernelRequest { source: "etc/shadow".into(), name: "k".into() }).await;
        assert_eq!(err.unwrap_err().code(), tonic::Code::NotFound, "an image name, never a file");
    });

    runtime.block_on(daemon.shutdown());
}
