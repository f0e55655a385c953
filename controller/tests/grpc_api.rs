//! The daemon's gRPC API and the CLI on top of it, against an in-process daemon running tiny
//! guests: list/get with secrets redacted, apply (all or nothing, ownership), delete, logs,
//! events, sources and host info, the status codes of exec and attach; then the real `ignite`
//! binary's ps/apply/inspect/logs/rm/exec/attach.

mod support;

use std::process::Command;
use std::time::Duration;

use controller::daemon::Daemon;
use controller::grpc::proto::{
    self, events_client::EventsClient, host_client::HostClient, sources_client::SourcesClient, vms_client::VmsClient,
};
use support::daemon::{vm_up, wait_for, KillVmsOnDrop};
use support::fleet::{daemon_config, local_dir, manifest, registry_with_image, unavailable};
use support::tiny_guest;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `create`, `kill`, `ps -q`, a refused revision shown by `ps`, and images and kernels through the API.
fn create_kill_and_the_image_store(
    socket: &std::path::Path,
    r: &std::path::Path,
    image: &str,
    fleet: &std::path::Path,
) {
    let out = ignite(socket, &["create", image, "--name", "k1", "--memory", "64Mi", "--size", "64Mi"]);
    assert_eq!(text(&out.stdout).trim(), "k1", "{}", text(&out.stderr));
    let out = ignite(socket, &["create", image, "--name", "k1"]);
    assert!(text(&out.stderr).contains("already exists"), "create never changes an existing VM");
    let phase = |name: &str| -> String {
        let out = ignite(socket, &["inspect", name, "-o", "json"]);
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        doc["status"]["phase"].as_str().unwrap_or_default().to_string()
    };
    wait_for("k1 created, not started", Duration::from_secs(60), || phase("k1") == "Stopped");
    assert!(support::daemon::pid_of(r, "k1").is_none());
    assert!(ignite(socket, &["start", "k1"]).status.success());
    wait_for("k1 up", Duration::from_secs(60), || vm_up(r, "k1"));
    let out = ignite(socket, &["ps", "-q"]);
    assert!(text(&out.stdout).lines().any(|l| l == "k1"), "{}", text(&out.stdout));
    let out = ignite(socket, &["kill", "k1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_for("k1 killed and stopped", Duration::from_secs(30), || {
        support::daemon::pid_of(r, "k1").is_none() && phase("k1") == "Stopped"
    });
    let out = ignite(socket, &["kill", "fromdir"]);
    assert!(text(&out.stderr).contains("owned by dir:local"), "{}", text(&out.stderr));
    assert!(ignite(socket, &["rm", "k1"]).status.success());

    // A refused revision: the fleet keeps running the last good one, and `ps` says why.
    let bad = fleet.join("broken.yaml");
    std::fs::write(
        &bad,
        "apiVersion: ignite.dev/v1alpha1\nkind: VM\nmetadata: {name: broken}\nspec: {image: x, memory: lots}\n",
    )
    .unwrap();
    wait_for("ps to show the refused revision", Duration::from_secs(30), || {
        let err = text(&ignite(socket, &["ps"]).stderr);
        err.contains("warning: source local") && err.contains("broken.yaml") && err.contains("spec.memory")
    });
    std::fs::remove_file(&bad).unwrap();

    // Images and kernels through the daemon.
    let out = ignite(socket, &["image", "pull", image]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("sha256:") && text(&out.stderr).contains("100%"), "{}", text(&out.stderr));
    let out = ignite(socket, &["image", "ls"]);
    assert!(text(&out.stdout).contains(image), "{}", text(&out.stdout));
    let kernel = tiny_guest::idle_guest().kernel;
    let out = ignite(socket, &["kernel", "import", kernel.to_str().unwrap(), "--name", "tiny"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(r.join("kernels").exists() || text(&ignite(socket, &["kernel", "ls"]).stdout).contains("tiny"));
    let out = ignite(socket, &["kernel", "import", kernel.to_str().unwrap(), "--name", "tiny"]);
    assert!(text(&out.stderr).contains("already exists"), "{}", text(&out.stderr));
    assert!(ignite(socket, &["kernel", "rm", "tiny"]).status.success());
    let out = ignite(socket, &["kernel", "rm", "tiny"]);
    assert!(text(&out.stderr).contains("not found"), "{}", text(&out.stderr));
    let out = ignite(socket, &["image", "rm", "sha256:ffff"]);
    assert!(text(&out.stderr).contains("no image matches"), "{}", text(&out.stderr));
}

/// A watch resumed from a revision gets exactly what changed after it; one from a revision this
/// store never had starts over with RESYNC and a full snapshot.
fn watch_resumes_from_a_revision(
    runtime: &tokio::runtime::Runtime,
    socket: &std::path::Path,
    image: &str,
    daemon: &Daemon,
) {
    use proto::vm_event::Kind;
    runtime.block_on(async {
        let mut vms = VmsClient::new(controller::grpc::connect(socket).await.unwrap());
        let from = vms.list(proto::ListVmsRequest {}).await.unwrap().into_inner().revision;
        let file =
            proto::ManifestFile { path: "w.yaml".into(), text: manifest("w1", image, "64Mi", "  state: Stopped\n") };
        vms.apply(proto::ApplyRequest { files: vec![file], force: false }).await.unwrap();
        vms.delete(proto::DeleteVmRequest { name: "w1".into(), force: false }).await.unwrap();
        let store = daemon.store().clone();
        tokio::task::spawn_blocking(move || {
            wait_for("w1 removed", Duration::from_secs(60), || store.get_vm("w1").unwrap().is_none())
        })
        .await
        .unwrap();
        let request = proto::WatchVmsRequest { snapshot: false, from_revision: from };
        let mut stream = vms.watch(request).await.unwrap().into_inner();
        let mut seen = Vec::new();
        let mut last = from;
        while let Some(e) = stream.message().await.unwrap() {
            assert!(e.revision > last, "revisions increase: {} after {last}", e.revision);
            last = e.revision;
            let done = e.name == "w1" && e.kind == Kind::Delete as i32;
            seen.push((e.name, e.kind));
            if done {
                break;
            }
        }
        // Resuming replays the net change, not the history: w1 came and went, so it is a removal.
        assert_eq!(seen, [("w1".to_string(), Kind::Delete as i32)], "only what changed after the revision");

        let request = proto::WatchVmsRequest { snapshot: false, from_revision: last + 1_000_000 };
        let mut stream = vms.watch(request).await.unwrap().into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.kind, Kind::Resync as i32);
        let second = stream.message().await.unwrap().unwrap();
        assert_eq!((second.kind, second.name.as_str()), (Kind::Upsert as i32, "fromdir"), "a full snapshot follows");
    });
}

const NAME: &str = "the_api_and_the_cli_drive_the_fleet";

fn ignite(socket: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(tiny_guest::ignite_bin());
    cmd.arg("--socket").arg(socket).args(args).env("IGNITE_AUTOSTART", "0").output().unwrap()
}

/// Exec and Attach answer with typed codes: unknown VM, VM not running, a guest without an agent
/// (the tiny guests have no vsock driver), and requests Exec cannot serve; the CLI says the same.
fn exec_and_attach_status_codes(
    runtime: &tokio::runtime::Runtime,
    socket: &std::path::Path,
    image: &str,
    daemon: &Daemon,
) {
    use proto::{attach_input, exec_input};
    let start = |name: &str, argv: &[&str], tty: bool| proto::ExecInput {
        input: Some(exec_input::Input::Start(proto::ExecStart {
            name: name.into(),
            argv: argv.iter().map(|a| a.to_string()).collect(),
            tty,
            ..Default::default()
        })),
    };
    let name = |name: &str| proto::AttachInput { input: Some(attach_input::Input::Name(name.into())) };
    runtime.block_on(async {
        let mut vms = VmsClient::new(controller::grpc::connect(socket).await.unwrap());
        let file =
            proto::ManifestFile { path: "s.yaml".into(), text: manifest("idle", image, "64Mi", "  state: Stopped\n") };
        vms.apply(proto::ApplyRequest { files: vec![file], force: false }).await.unwrap();
        let store = daemon.store().clone();
        tokio::task::spawn_blocking(move || {
            wait_for("idle declared stopped", Duration::from_secs(60), || {
                store.get_vm("idle").unwrap().is_some_and(|v| v.status.phase == controller::api::Phase::Stopped)
            })
        })
        .await
        .unwrap();
        let exec = |input: proto::ExecInput| {
            let mut vms = vms.clone();
            async move { vms.exec(tokio_stream::iter(vec![input])).await.expect_err("exec refused") }
        };
        let err = exec(start("nope", &["true"], false)).await;
        assert_eq!(err.code(), tonic::Code::NotFound, "{}", err.message());
        let err = exec(start("idle", &["true"], false)).await;
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{}", err.message());
        assert!(err.message().contains("not running"), "{}", err.message());
        assert!(
            err.message().contains("`ignite start idle`"),
            "the API's own VM is started from the CLI: {}",
            err.message()
        );
        let mut huge = start("fromdir", &["sh"], true);
        if let Some(exec_input::Input::Start(s)) = huge.input.as_mut() {
            s.window = Some(proto::WindowSize { rows: 70_000, cols: 80 });
        }
        let err = exec(huge).await;
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{}", err.message());
        assert!(err.message().contains("window size 70000x80"), "{}", err.message());
        let err = exec(start("fromdir", &[], false)).await;
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{}", err.message());
        let err = exec(proto::ExecInput { input: Some(exec_input::Input::Stdin(b"x".to_vec())) }).await;
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{}", err.message());
        for tty in [false, true] {
            let err = exec(start("fromdir", &["true"], tty)).await;
            assert_eq!(err.code(), tonic::Code::Unavailable, "tty {tty}: {}", err.message());
            assert!(err.message().contains(controller::grpc::exec::AGENT_UNAVAILABLE), "{}", err.message());
        }

        let err = vms.attach(tokio_stream::iter(vec![name("nope")])).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{}", err.message());
        let err = vms.attach(tokio_stream::iter(vec![name("idle")])).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{}", err.message());
        // A running VM's console socket answers.
        vms.attach(tokio_stream::iter(vec![name("fromdir")])).await.unwrap();
        vms.delete(proto::DeleteVmRequest { name: "idle".into(), force: false }).await.unwrap();
    });
    let out = ignite(socket, &["exec", "fromdir", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out.stderr).contains("the guest agent did not answer"), "{}", text(&out.stderr));
    let out = ignite(socket, &["exec", "-it", "fromdir", "sh"]);
    assert!(text(&out.stderr).contains("the input device is not a TTY"), "docker's words: {}", text(&out.stderr));
    let out = ignite(socket, &["attach", "nope"]);
    assert!(!out.status.success() && text(&out.stderr).contains("no VM named \"nope\""), "{}", text(&out.stderr));
}

#[test]
fn the_api_and_the_cli_drive_the_fleet() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP {NAME}: {why}");
        return;
    }
    let (_registry, image) = registry_with_image();
    let fleet = tempfile::tempdir().unwrap();
    let secret = "  env: [{name: TOKEN, value: s3cret-value}]\n";
    std::fs::write(fleet.path().join("git.yaml"), manifest("fromdir", &image, "64Mi", secret)).unwrap();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let _guard = KillVmsOnDrop(r);
    let sources = local_dir(fleet.path());
    let config = daemon_config(r, sources, None);
    let socket = config.socket.clone().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let daemon = runtime.block_on(Daemon::start(config)).unwrap();
    wait_for("fromdir up", Duration::from_secs(60), || vm_up(r, "fromdir"));

    runtime.block_on(async {
        let channel = controller::grpc::connect(&socket).await.unwrap();
        let mut vms = VmsClient::new(channel.clone());
        let listed = vms.list(proto::ListVmsRequest {}).await.unwrap().into_inner();
        assert_eq!(listed.vms.len(), 1);
        let got = vms.get(proto::VmName { name: "fromdir".into() }).await.unwrap().into_inner();
        assert_eq!(got.owner, "dir:local");
        assert!(got.manifest_yaml.contains("TOKEN") && !got.manifest_yaml.contains("s3cret"), "{}", got.manifest_yaml);
        let missing = vms.get(proto::VmName { name: "nope".into() }).await.unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound);

        // Apply: an invalid document refuses the whole request and names file, line and field.
        let good = proto::ManifestFile { path: "api.yaml".into(), text: manifest("api1", &image, "64Mi", "") };
        let bad = proto::ManifestFile { path: "bad.yaml".into(), text: manifest("api2", &image, "lots", "") };
        let err = vms.apply(proto::ApplyRequest { files: vec![good.clone(), bad], force: false }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("bad.yaml:7") && err.message().contains("spec.memory"), "{}", err.message());
        assert_eq!(vms.list(proto::ListVmsRequest {}).await.unwrap().into_inner().vms.len(), 1, "nothing applied");
        let applied = vms.apply(proto::ApplyRequest { files: vec![good], force: false }).await.unwrap().into_inner();
        assert_eq!(applied.created, ["api1"]);
        // An object a source owns is refused unless forced; so is deleting it.
        let takeover = proto::ManifestFile { path: "t.yaml".into(), text: manifest("fromdir", &image, "96Mi", "") };
        let err = vms.apply(proto::ApplyRequest { files: vec![takeover], force: false }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{}", err.message());
        let err = vms.delete(proto::DeleteVmRequest { name: "fromdir".into(), force: false }).await.unwrap_err();
        assert!(err.message().contains("owned by dir:local"), "{}", err.message());

        // Logs stream the console; events replay what happened; sources and host answer.
        let mut logs = vms
            .logs(proto::LogsRequest { name: "fromdir".into(), follow: false, tail_bytes: 0 })
            .await
            .unwrap()
            .into_inner();
        let mut console = Vec::new();
        while let Some(chunk) = logs.message().await.unwrap() {
            console.extend(chunk.data);
        }
        assert!(String::from_utf8_lossy(&console).contains(tiny_guest::IDLE_MARKER));
        let mut events = EventsClient::new(channel.clone());
        let mut stream =
            events.watch(proto::WatchEventsRequest { after_seq: 0, follow: false }).await.unwrap().into_inner();
        let mut reasons = Vec::new();
        while let Some(e) = stream.message().await.unwrap() {
            reasons.push(e.reason);
        }
        assert!(reasons.iter().any(|r| r == "Started"), "{reasons:?}");
        let mut sources = SourcesClient::new(channel.clone());
        let listed = sources.list(proto::Empty {}).await.unwrap().into_inner().sources;
        assert_eq!(listed[0].name, "local");
        sources.sync(proto::SourceName { name: "local".into() }).await.unwrap();
        assert_eq!(
            sources.sync(proto::SourceName { name: "x".into() }).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
        let info = HostClient::new(channel).info(proto::Empty {}).await.unwrap().into_inner();
        assert_eq!(info.vms, 2);
    });
    wait_for("api1 up", Duration::from_secs(60), || vm_up(r, "api1"));

    // The CLI is a client of the same API.
    let out = ignite(&socket, &["ps"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.starts_with("NAME") && table.contains("api1") && table.contains("fromdir"), "{table}");
    let cli_file = fleet.path().join("cli.yaml.txt");
    std::fs::write(&cli_file, manifest("cli1", &image, "64Mi", "")).unwrap();
    let out = ignite(&socket, &["apply", "-f", cli_file.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "vm/cli1 created",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ignite(&socket, &["inspect", "fromdir", "-o", "json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["status"]["phase"], "Running");
    assert_eq!(doc["manifest"]["spec"]["env"][0]["value"], "<redacted>");
    let out = ignite(&socket, &["logs", "fromdir"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(tiny_guest::IDLE_MARKER));
    // run -d declares and starts a VM; stop and start change its desired state in place.
    let out = ignite(&socket, &["run", &image, "--name", "run1", "--memory", "64Mi", "--size", "64Mi", "-d"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "run1", "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("run1 up", Duration::from_secs(60), || vm_up(r, "run1"));
    let out = ignite(&socket, &["stop", "run1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_for("run1 stopped", Duration::from_secs(60), || {
        support::daemon::pid_of(r, "run1").is_none()
            && daemon.store().get_vm("run1").unwrap().is_some_and(|v| v.status.phase == controller::api::Phase::Stopped)
    });
    assert!(
        controller::layout::RootLayout::new(r).runtime("run1").prepared().exists(),
        "a stopped VM keeps its disk and address"
    );
    assert!(ignite(&socket, &["start", "run1"]).status.success());
    wait_for("run1 up again", Duration::from_secs(60), || vm_up(r, "run1"));
    let out = ignite(&socket, &["stop", "fromdir"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("owned by dir:local"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ignite(&socket, &["rm", "api1", "cli1", "run1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = ignite(&socket, &["rm", "nope"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no VM named \"nope\""));
    wait_for("api1, cli1 and run1 removed", Duration::from_secs(60), || {
        ["api1", "cli1", "run1"].iter().all(|n| daemon.store().get_vm(n).unwrap().is_none())
    });
    create_kill_and_the_image_store(&socket, r, &image, fleet.path());
    watch_resumes_from_a_revision(&runtime, &socket, &image, &daemon);
    exec_and_attach_status_codes(&runtime, &socket, &image, &daemon);

    let nobody = r.join("nobody.sock");
    let out = ignite(&nobody, &["ps"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no ignite daemon answers"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    runtime.block_on(daemon.shutdown());
}
