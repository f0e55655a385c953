//! Host files named by manifests, against an in-process daemon running tiny guests: a manifest
//! reads a host file only under `--allow-host-path`, never through a symlink leading out, and
//! whatever it names outside is refused with file, line and field, before anything is applied.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use controller::api::HostPaths;
use controller::daemon::Daemon;
use controller::grpc::proto::{self, sources_client::SourcesClient, vms_client::VmsClient};
use support::daemon::{vm_up, wait_for, KillVmsOnDrop};
use support::fleet::{daemon_config, local_dir, manifest, registry_with_image, unavailable};

const NAME: &str = "host_paths";

fn copy_files(entries: &[(&str, &Path)]) -> String {
    let mut text = "  copyFiles:\n".to_string();
    for (destination, source) in entries {
        text.push_str(&format!("    - source: {}\n      destination: {destination}\n", source.display()));
    }
    text
}

fn drive(root: &Path, vm: &str) -> guest_api::config::GuestConfig {
    let file = std::fs::File::open(controller::layout::RootLayout::new(root).runtime(vm).config_drive()).unwrap();
    guest_api::config::read_config_drive(file).unwrap()
}

#[test]
fn manifests_read_host_files_only_where_the_operator_allowed() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP {NAME}: {why}");
        return;
    }
    let (_registry, image) = registry_with_image();
    // What the operator allows, with a file in it and a symlink pointing out of it.
    let allowed = tempfile::tempdir().unwrap();
    let motd = allowed.path().join("motd");
    std::fs::write(&motd, "hello from the host\n").unwrap();
    std::fs::set_permissions(&motd, std::fs::Permissions::from_mode(0o640)).unwrap();
    let sneaky = allowed.path().join("sneaky");
    std::os::unix::fs::symlink("/etc/shadow", &sneaky).unwrap();

    let fleet = tempfile::tempdir().unwrap();
    let good = manifest("good", &image, "64Mi", &copy_files(&[("/etc/motd", &motd)]));
    std::fs::write(fleet.path().join("fleet.yaml"), &good).unwrap();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let _guard = KillVmsOnDrop(r);
    let sources = local_dir(fleet.path());
    let mut config = daemon_config(r, sources, None);
    config.host.policy.paths = HostPaths::allow([allowed.path().to_path_buf()]).unwrap();
    let socket = config.socket.clone().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let daemon = runtime.block_on(Daemon::start(config)).unwrap();
    wait_for("good up", Duration::from_secs(60), || vm_up(r, "good"));
    let copied = drive(r, "good").files;
    assert_eq!(copied.len(), 1);
    assert_eq!((copied[0].path.as_str(), copied[0].mode), ("/etc/motd", 0o640));
    assert_eq!(copied[0].content, guest_api::config::encode_content(b"hello from the host\n"));

    runtime.block_on(async {
        let channel = controller::grpc::connect(&socket).await.unwrap();
        let mut vms = VmsClient::new(channel.clone());
        // Through the API: a host file outside the allowed directory is refused with its place.
        let text = manifest("thief", &image, "64Mi", &copy_files(&[("/root/shadow", Path::new("/etc/shadow"))]));
        let file = proto::ManifestFile { path: "thief.yaml".into(), text };
        let err = vms.apply(proto::ApplyRequest { files: vec![file], force: false }).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let message = err.message();
        assert!(message.contains("thief.yaml:10") && message.contains("spec.copyFiles[0].source"), "{message}");
        assert!(message.contains("/etc/shadow is not under a directory this host lets manifests read"), "{message}");
        assert!(vms.get(proto::VmName { name: "thief".into() }).await.is_err(), "nothing applied");

        // A symlink inside the allowed directory that leads out: accepted as a name, never read.
        let text = manifest("linked", &image, "64Mi", &copy_files(&[("/root/shadow", &sneaky)]));
        let file = proto::ManifestFile { path: "linked.yaml".into(), text };
        vms.apply(proto::ApplyRequest { files: vec![file], force: false }).await.unwrap();
        let mut failed = String::new();
        for _ in 0..300 {
            let vm = vms.get(proto::VmName { name: "linked".into() }).await.unwrap().into_inner();
            let conditions = vm.status.map(|s| s.conditions).unwrap_or_default();
            if let Some(c) = conditions.iter().find(|c| c.reason == "CopyFileFailed") {
                failed = c.message.clone();
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(failed.contains("spec.copyFiles[0].source") && failed.contains("cannot open"), "{failed:?}");
        assert!(!r.join("runtime/linked/config.img").exists(), "no config drive for a refused VM");
    });

    // A git or directory revision reaching out changes nothing; the source says where.
    let mut bad = good.clone();
    bad.push_str("---\n");
    bad.push_str(&manifest("other", &image, "64Mi", &copy_files(&[("/x", Path::new("/etc/passwd"))])));
    std::fs::write(fleet.path().join("fleet.yaml"), &bad).unwrap();
    let last_error = || {
        runtime.block_on(async {
            let mut sources = SourcesClient::new(controller::grpc::connect(&socket).await.unwrap());
            sources.list(proto::Empty {}).await.unwrap().into_inner().sources[0].last_error.clone()
        })
    };
    wait_for("the revision refused", Duration::from_secs(30), || !last_error().is_empty());
    let error = last_error();
    assert!(error.contains("fleet.yaml:22") && error.contains("spec.copyFiles[0].source"), "{error}");
    assert!(error.contains("/etc/passwd"), "{error}");
    assert!(vm_up(r, "good"), "the fleet is untouched");
    runtime.block_on(daemon.shutdown());
}
