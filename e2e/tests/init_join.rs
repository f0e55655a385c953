//! `kubeadm join` by the guest init for real: a busybox root filesystem whose `/usr/bin/kubeadm` is
//! a fake (a shell script that records its arguments and prints the bootstrap token on both
//! streams, as a verbose kubeadm might) boots on the guest kernel with a config drive carrying a
//! join configuration. `ignite-init`, as PID 1, writes the configuration 0600, runs the join
//! before the entrypoint and reports it on the console with the token removed.
//!
//! One boot (~90 s of emulated CPU on hosts without hardware virtualization).

use std::process::Command;
use std::time::Instant;

use ignite_e2e::{busybox_root, guest_kernel, ignite_bin, ignite_init_bin, kvm_unavailable};
use ignite_init::config::{write_config_drive, GuestConfig, JoinConfig};

const NAME: &str = "ignite_init_joins_with_kubeadm_before_the_entrypoint_and_hides_the_token";
const TOKEN: &str = "abcdef.0123456789abcdef";
const SECRET: &str = "0123456789abcdef";

#[test]
fn ignite_init_joins_with_kubeadm_before_the_entrypoint_and_hides_the_token() {
    if let Some(why) = kvm_unavailable() {
        eprintln!("SKIP {NAME}: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    busybox_root(&root, &["sh", "echo", "cat", "ls", "stat"]);
    std::fs::create_dir_all(root.join("sbin")).unwrap();
    std::fs::copy(ignite_init_bin(), root.join("sbin/ignite-init")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    let kubeadm = format!(
        "#!/bin/sh\necho \"$@\" > /kubeadm-args\necho \"FAKE-KUBEADM discovery with token {TOKEN}\"\n\
         echo \"FAKE-KUBEADM secret {SECRET}\" >&2\nexit 0\n"
    );
    std::fs::write(root.join("usr/bin/kubeadm"), kubeadm).unwrap();
    let executable = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(root.join("usr/bin/kubeadm"), executable).unwrap();
    let rootfs = dir.path().join("root.ext4");
    image_store::ext4::build_ext4(&root, &rootfs, "root").unwrap();

    // The entrypoint shows what the join left: the arguments and the configuration's mode.
    let script = "echo ENTRYPOINT-ARGS $(cat /kubeadm-args); echo ENTRYPOINT-MODE $(stat -c %a /etc/ignite/kubeadm-join.yaml); exit 0";
    let config = GuestConfig {
        hostname: "node-1".into(),
        command: Some(["/bin/sh", "-c", script].map(String::from).to_vec()),
        join: Some(JoinConfig {
            config_path: "/etc/ignite/kubeadm-join.yaml".into(),
            config: format!("apiVersion: kubeadm.k8s.io/v1beta3\nkind: JoinConfiguration\n# token: {TOKEN}\n"),
            command: vec![],
            redact: vec![TOKEN.into(), SECRET.into()],
        }),
        ..Default::default()
    };
    let drive = dir.path().join("config.img");
    write_config_drive(&drive, &config).unwrap();
    let console = dir.path().join("console.log");

    let started = Instant::now();
    let out = Command::new(ignite_bin())
        .args(["vmm", "run", "--memory", "128", "--kernel"])
        .arg(guest_kernel())
        .arg("--disk")
        .arg(&rootfs)
        .arg("--disk")
        .arg(format!("{},ro", drive.display()))
        .arg("--cmdline")
        .arg("console=ttyS0 reboot=k panic=-1 root=/dev/vda rw init=/sbin/ignite-init ignite.config=/dev/vdb")
        .arg("--console")
        .arg(&console)
        .output()
        .expect("run ignite vmm run");
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let context =
        format!("status {:?}\nstderr:\n{}\nconsole:\n{log}", out.status, String::from_utf8_lossy(&out.stderr));
    eprintln!("boot to exit took {:?}\n{context}", started.elapsed());

    assert!(log.contains("kubeadm: FAKE-KUBEADM discovery with token <redacted>"), "kubeadm's stdout: {context}");
    assert!(log.contains("kubeadm: FAKE-KUBEADM secret <redacted>"), "kubeadm's stderr: {context}");
    assert!(!log.contains(SECRET), "the token reached the console: {context}");
    assert!(log.contains("ignite-init: kubernetes: joined the cluster"), "{context}");
    let joined = log.find("joined the cluster").unwrap();
    let entry = log.find("ENTRYPOINT-ARGS join --config /etc/ignite/kubeadm-join.yaml");
    assert!(entry.is_some_and(|e| e > joined), "the entrypoint runs after the join, with its arguments: {context}");
    assert!(log.contains("ENTRYPOINT-MODE 600"), "the join configuration is private: {context}");
    assert!(log.contains("ignite-init: exit status=0"), "{context}");
}
