//! The API from Python: the example client of `examples/python` (grpcio from PyPI, stubs generated
//! here from the checked-in proto) against the real daemon, over its unix socket with no client-side
//! option (grpc's C core sends the socket path as the HTTP/2 authority) and over TCP with mutual TLS:
//! Host.Info, Vms.List, Vms.Get of a missing VM (NOT_FOUND with the daemon's message), Vms.Watch
//! seeing an apply, the standard health check, and the services gRPC reflection lists.
//!
//! The Python environment is `scripts/python-grpc.sh`'s (cached outside the checkout); `$IGNITE_GRPC_PYTHON`
//! names an interpreter that already has the packages.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use controller::daemon::{Daemon, TcpApi};
use controller::grpc::proto::{self, vms_client::VmsClient};
use controller::grpc::tls::ServerTls;
use support::daemon::wait_for;
use support::fleet::{daemon_config, manifest};
use support::tls::daemon_and_client;

const NAME: &str = "a_python_grpcio_client_works_over_the_socket_and_over_tcp_with_tls";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The Python interpreter with grpcio: `$IGNITE_GRPC_PYTHON`, else what `scripts/python-grpc.sh` prints.
fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("IGNITE_GRPC_PYTHON") {
        return python.into();
    }
    let out = Command::new("bash").arg(repo().join("scripts/python-grpc.sh")).output().expect("run python-grpc.sh");
    assert!(out.status.success(), "scripts/python-grpc.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Generates the Python stubs of `manifests/proto/ignite.proto` into `dir`, as the example's README says.
fn generate_stubs(python: &Path, dir: &Path) {
    let proto = repo().join("manifests/proto");
    let out = Command::new(python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto)
        .arg(format!("--python_out={}", dir.display()))
        .arg(format!("--grpc_python_out={}", dir.display()))
        .arg(proto.join("ignite.proto"))
        .output()
        .unwrap();
    assert!(out.status.success(), "grpc_tools.protoc: {}", String::from_utf8_lossy(&out.stderr));
}

/// The example client with `target` (how to reach the daemon) and `args`.
struct Client {
    python: PathBuf,
    stubs: PathBuf,
    target: Vec<String>,
}

impl Client {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg(repo().join("examples/python/ignite_client.py"))
            .args(&self.target)
            .args(args)
            .env("PYTHONPATH", &self.stubs)
            .env_remove("GRPC_DEFAULT_AUTHORITY")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs a command that must succeed; returns its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{args:?} via {:?} failed ({}):\n{stdout}\n{stderr}", self.target, out.status);
        stdout
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every call the issue names, through one way of reaching the daemon; `apply` creates a VM the
/// watcher must see.
fn exercise(client: &Client, apply: impl FnOnce()) {
    assert!(client.ok(&["info"]).starts_with("ignite "), "Host.Info");
    assert!(client.ok(&["ls"]).contains("VMs at revision"), "Vms.List");
    let out = client.run(&["get", "ghost"]);
    assert_eq!(out.status.code(), Some(4), "Vms.Get of a missing VM: {}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("not found: no VM named \"ghost\""), "{}", text(&out.stdout));
    wait_for("the daemon's health check to say SERVING", Duration::from_secs(20), || {
        client.run(&["health"]).stdout.starts_with(b"SERVING")
    });
    let services = client.ok(&["services"]);
    for service in controller::grpc::standard::SERVICES.iter().chain(&["grpc.health.v1.Health"]) {
        assert!(services.lines().any(|l| l == *service), "reflection lists {service}:\n{services}");
    }

    // Watch: started first, it sees the VM the apply creates, and ends after that one event.
    let watcher =
        client.command(&["watch", "--events", "1"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    apply();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(watcher.wait_with_output()));
    let out = rx.recv_timeout(Duration::from_secs(60)).expect("the Python watcher saw no event within 60 s").unwrap();
    assert!(out.status.success(), "watch: {}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("UPSERT "), "watch: {}", text(&out.stdout));
}

#[test]
fn a_python_grpcio_client_works_over_the_socket_and_over_tcp_with_tls() {
    if let Some(why) = support::fleet::unavailable() {
        eprintln!("SKIP {NAME}: {why}");
        return;
    }
    let python = python();
    let stubs = tempfile::tempdir().unwrap();
    generate_stubs(&python, stubs.path());
    let certs = tempfile::tempdir().unwrap();
    let c = certs.path();
    daemon_and_client(c, "py");

    let root = tempfile::tempdir().unwrap();
    let mut config = daemon_config(root.path(), Vec::new(), None);
    let socket = config.socket.clone().unwrap();
    let tls = ServerTls { cert: c.join("daemon.pem"), key: c.join("daemon.key"), client_ca: c.join("clients-ca.pem") };
    config.tcp = Some(TcpApi { addr: "127.0.0.1:0".parse().unwrap(), tls });
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let daemon = runtime.block_on(Daemon::start(config)).unwrap();
    let port = daemon.tcp_addr().unwrap().port();

    // A VM whose image does not exist: the store takes it (an event), the reconciler reports the pull.
    let apply = |name: &str| {
        let text = manifest(name, "127.0.0.1:1/none/such:1", "64Mi", "");
        let request = proto::ApplyRequest {
            files: vec![proto::ManifestFile { path: format!("{name}.yaml"), text }],
            ..Default::default()
        };
        runtime.block_on(async {
            let channel = controller::grpc::connect(&socket).await.unwrap();
            VmsClient::new(channel).apply(request).await.unwrap();
        });
    };

    let over_socket = Client {
        python: python.clone(),
        stubs: stubs.path().into(),
        target: vec!["--socket".into(), socket.display().to_string()],
    };
    exercise(&over_socket, || apply("py-unix"));

    let file = |name: &str| c.join(name).display().to_string();
    let over_tcp = Client {
        python,
        stubs: stubs.path().into(),
        target: vec![
            "--host".into(),
            format!("localhost:{port}"),
            "--ca".into(),
            file("daemon-ca.pem"),
            "--cert".into(),
            file("py.pem"),
            "--key".into(),
            file("py.key"),
        ],
    };
    exercise(&over_tcp, || apply("py-tcp"));

    runtime.block_on(daemon.shutdown());
}
