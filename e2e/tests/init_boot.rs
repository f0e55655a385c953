//! The guest init for real: a busybox root filesystem with the static `ignite-init` at `/sbin/ignite-init`
//! boots on the guest kernel through `ignite vmm run`, reads its config drive (`/dev/vdb`), runs the
//! overridden command with the drive's environment, files, ssh key and hostname, reports the exit status
//! on the console and ends the VM.
//!
//! One boot (~90 s of emulated CPU on hosts without hardware virtualization).

use std::path::Path;
use std::time::Instant;

use guest_api::config::{encode_content, write_config_drive, CopiedFile, GuestConfig};
use ignite_e2e::{busybox_root, ignite_init_bin, ignite_init_vm, kvm_unavailable, unless_the_host_faults};

#[test]
fn ignite_init_runs_the_configured_command_and_reports_its_exit() {
    if let Some(why) = kvm_unavailable() {
        eprintln!("SKIP ignite_init_runs_the_configured_command_and_reports_its_exit: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    unless_the_host_faults("ignite_init_runs_the_configured_command_and_reports_its_exit", dir.path(), || {
        boot(dir.path())
    });
}

fn boot(dir: &Path) {
    let root = dir.join("root");
    busybox_root(&root, &["sh", "echo", "cat", "hostname"]);
    std::fs::create_dir_all(root.join("sbin")).unwrap();
    std::fs::copy(ignite_init_bin(), root.join("sbin/ignite-init")).unwrap();
    std::fs::create_dir_all(root.join("etc/ignite")).unwrap();
    let image = r#"{"entrypoint":["/bin/echo"],"cmd":["IMAGE-CMD-MUST-NOT-RUN"],"env":["FOO=from-image"]}"#;
    std::fs::write(root.join("etc/ignite/image.json"), image).unwrap();
    let rootfs = dir.join("root.ext4");
    image_store::ext4::build_ext4(&root, &rootfs, "root").unwrap();

    let script = "echo IGNITE-INIT-HELLO $FOO; cat /etc/copied; cat /root/.ssh/authorized_keys; \
                  echo HOST=$(hostname); exit 7";
    let config = GuestConfig {
        hostname: "init-e2e".into(),
        command: Some(["/bin/sh", "-c", script].map(String::from).to_vec()),
        env: [("FOO".to_string(), "from-drive".to_string())].into(),
        authorized_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE2e2e e2e@ignite".into()],
        files: vec![CopiedFile {
            path: "/etc/copied".into(),
            mode: 0o600,
            content: encode_content(b"COPIED-FILE-CONTENT\n"),
        }],
        ..Default::default()
    };
    let drive = dir.join("config.img");
    write_config_drive(&drive, &config).unwrap();
    let console = dir.join("console.log");

    let started = Instant::now();
    let out = ignite_init_vm(&rootfs, &drive, &console).arg("--timings").output().expect("run ignite vmm run");
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let context = format!("status {:?}\nstderr:\n{stderr}\nconsole:\n{log}", out.status);
    eprintln!("boot to exit took {:?}\n{context}", started.elapsed());

    assert!(log.contains("IGNITE-INIT-HELLO from-drive"), "the command or its env is wrong: {context}");
    assert!(!log.contains("IMAGE-CMD-MUST-NOT-RUN"), "the command override did not drop the image cmd: {context}");
    assert!(log.contains("COPIED-FILE-CONTENT"), "the copied file is missing: {context}");
    assert!(log.contains("AAAAC3NzaC1lZDI1NTE5AAAAIE2e2e e2e@ignite"), "the ssh key is missing: {context}");
    assert!(log.contains("HOST=init-e2e"), "the hostname was not set: {context}");
    assert!(log.contains("ignite-init: exit status=7"), "init did not report the exit: {context}");
    let timings: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap_or("{}")).unwrap();
    // Port 0xf4 from guest user mode ends the VM with the status; if the emulator faults the write, init
    // falls back to a reset (exit 0). Either way the VM must have ended by itself.
    match out.status.code() {
        Some(7) => eprintln!("power port 0xf4 from guest user mode: worked (vm exit code 7)"),
        Some(0) => {
            assert_eq!(timings["exit"]["reason"], "reset", "{context}");
            eprintln!("power port 0xf4 from guest user mode: did not work, init fell back to a reset");
        }
        other => panic!("the vm did not end through ignite-init (exit {other:?}): {context}"),
    }
}
