//! The API over TCP with mutual TLS: the real daemon with `tcp` set, certificates made by the
//! `openssl` command, and the real `ignite` CLI with `--host`. A client certificate from another
//! CA is refused, and so is a client without the TLS files.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use controller::daemon::{Daemon, TcpApi};
use controller::grpc::tls::ServerTls;
use support::fleet::daemon_config;
use support::tiny_guest;

const NAME: &str = "the_cli_reaches_a_daemon_over_tcp_with_mutual_tls_only";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

const EC: [&str; 5] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

/// A self-signed CA: `name.pem` and `name.key`.
fn ca(dir: &Path, name: &str) {
    let (key, pem, subject) = (format!("{name}.key"), format!("{name}.pem"), format!("/CN={name}"));
    let mut args = vec!["req", "-x509"];
    args.extend(EC);
    args.extend(["-keyout", &key, "-out", &pem, "-days", "1", "-subj", &subject]);
    openssl(dir, &args);
}

/// A certificate signed by CA `ca`, with the X.509v3 `extensions`: `name.pem` and `name.key`.
fn leaf(dir: &Path, name: &str, ca: &str, extensions: &str) {
    let ext = format!("{name}.ext");
    std::fs::write(dir.join(&ext), extensions).unwrap();
    let (key, csr, pem, subject) =
        (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("/CN={name}"));
    let mut args = vec!["req"];
    args.extend(EC);
    args.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
    openssl(dir, &args);
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    openssl(
        dir,
        &["x509", "-req", "-in", &csr, "-CA", &ca_pem, "-CAkey", &ca_key, "-CAcreateserial", "-out", &pem]
            .into_iter()
            .chain(["-days", "1", "-extfile", &ext])
            .collect::<Vec<_>>(),
    );
}

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
    ca(c, "daemon-ca");
    ca(c, "clients-ca");
    leaf(c, "daemon", "daemon-ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n");
    let client_ext = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n";
    leaf(c, "alice", "clients-ca", client_ext);
    leaf(c, "mallory", "daemon-ca", client_ext); // a valid certificate, from the wrong CA

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

    let out = ignite(c, &url, Some("mallory"), &["ps"]);
    assert!(!out.status.success(), "a certificate from another CA is refused: {}", text(&out.stdout));
    assert!(text(&out.stderr).contains("its --tls-client-ca must sign"), "{}", text(&out.stderr));
    let out = ignite(c, &url, None, &["ps"]);
    assert!(text(&out.stderr).contains("--tls-ca"), "--host asks for the TLS files: {}", text(&out.stderr));

    // Files of this machine are not sent to a daemon on another one.
    let out = ignite(c, &url, Some("alice"), &["image", "import", c.to_str().unwrap()]);
    assert!(text(&out.stderr).contains("runs on another machine"), "{}", text(&out.stderr));

    runtime.block_on(daemon.shutdown());
}
