//! A Kubernetes node's bootstrap by the guest init for real: a busybox root filesystem with a fake
//! `/usr/bin/kubeadm` and a fake `/usr/bin/kubelet` boots on the guest kernel with a config drive
//! carrying a join configuration. The entrypoint plays the container runtime (it creates the CRI
//! socket, then runs on). `ignite-init`, as PID 1, starts it first, writes the configuration 0600,
//! waits for the socket, runs the join, starts the kubelet once kubeadm wrote its configuration and
//! flags (kubeadm then sees the TLS bootstrap done and succeeds), restarts it after it exits, and
//! sends it SIGTERM on the host's graceful stop; the token never reaches the console.
//!
//! One boot (~90 s of emulated CPU on hosts without hardware virtualization, plus the kubelet's 10 s
//! restart delay).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guest_api::config::{write_config_drive, GuestConfig, JoinConfig};
use ignite_e2e::{busybox_root, ignite_init_bin, ignite_init_vm, kvm_unavailable, unless_the_host_faults};

const NAME: &str = "ignite_init_bootstraps_a_node_with_kubeadm_and_the_kubelet_and_hides_the_token";
const TOKEN: &str = "abcdef.0123456789abcdef";
const SECRET: &str = "0123456789abcdef";
const SOCKET: &str = "/var/run/containerd/containerd.sock";

/// Records its arguments, refuses to run without the runtime's socket, writes what kubeadm's
/// kubelet-start phase writes (printing the token, as a verbose kubeadm might), then waits for the
/// kubelet's TLS bootstrap.
fn kubeadm() -> String {
    format!(
        r#"#!/bin/sh
echo "$@" > /kubeadm-args
[ -S {SOCKET} ] || [ -e {SOCKET} ] || {{ echo "FAKE-KUBEADM [preflight] no container runtime" >&2; exit 1; }}
mkdir -p /etc/kubernetes /var/lib/kubelet
echo "token: {TOKEN}" > /etc/kubernetes/bootstrap-kubelet.conf
echo "kind: KubeletConfiguration" > /var/lib/kubelet/config.yaml
echo 'KUBELET_KUBEADM_ARGS="--container-runtime-endpoint=unix://{SOCKET} --provider-id=ignite://h/node-1"' > /var/lib/kubelet/kubeadm-flags.env
echo "FAKE-KUBEADM discovery with token {TOKEN}"
echo "FAKE-KUBEADM secret {SECRET}" >&2
i=0
while [ ! -e /etc/kubernetes/kubelet.conf ]; do
  i=$((i+1)); [ $i -gt 240 ] && {{ echo "FAKE-KUBEADM timed out waiting for the kubelet" >&2; exit 1; }}
  sleep 1
done
echo "FAKE-KUBEADM This node has joined the cluster"
"#
    )
}

/// Records its arguments; the first start does the TLS bootstrap and exits, later ones stay up.
fn kubelet() -> String {
    format!(
        r#"#!/bin/sh
echo "$@" >> /kubelet-args
echo "FAKE-KUBELET chatter {TOKEN}"
if [ ! -e /etc/kubernetes/kubelet.conf ]; then echo "kind: Config" > /etc/kubernetes/kubelet.conf; exit 1; fi
exec sleep 1000
"#
    )
}

#[test]
fn ignite_init_bootstraps_a_node_with_kubeadm_and_the_kubelet_and_hides_the_token() {
    if let Some(why) = kvm_unavailable() {
        eprintln!("SKIP {NAME}: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    unless_the_host_faults(NAME, dir.path(), || join(dir.path()));
}

fn join(dir: &Path) {
    let root = dir.join("root");
    busybox_root(&root, &["sh", "echo", "cat", "ls", "stat", "mkdir", "touch", "sleep"]);
    std::fs::create_dir_all(root.join("sbin")).unwrap();
    std::fs::copy(ignite_init_bin(), root.join("sbin/ignite-init")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::create_dir_all(root.join("etc/default")).unwrap();
    std::fs::write(root.join("etc/default/kubelet"), "KUBELET_EXTRA_ARGS=\"--node-labels='role=edge'\"\n").unwrap();
    for (name, script) in [("kubeadm", kubeadm()), ("kubelet", kubelet())] {
        std::fs::write(root.join("usr/bin").join(name), script).unwrap();
        let executable = std::os::unix::fs::PermissionsExt::from_mode(0o755);
        std::fs::set_permissions(root.join("usr/bin").join(name), executable).unwrap();
    }
    let rootfs = dir.join("root.ext4");
    image_store::ext4::build_ext4(&root, &rootfs, "root").unwrap();

    // The "container runtime": creates its socket, shows what the join left once the kubelet's
    // TLS bootstrap is done, and runs until stopped.
    let script = format!(
        "mkdir -p /var/run/containerd; touch {SOCKET}; echo RUNTIME-UP; \
         while [ ! -e /etc/kubernetes/kubelet.conf ]; do sleep 1; done; \
         echo ENTRYPOINT-MODE $(stat -c %a /etc/ignite/kubeadm-join.yaml); exec sleep 1000"
    );
    let config = GuestConfig {
        hostname: "node-1".into(),
        command: Some(vec!["/bin/sh".into(), "-c".into(), script]),
        join: Some(JoinConfig {
            config_path: "/etc/ignite/kubeadm-join.yaml".into(),
            config: format!("apiVersion: kubeadm.k8s.io/v1beta3\nkind: JoinConfiguration\n# token: {TOKEN}\n"),
            command: vec![],
            redact: vec![TOKEN.into(), SECRET.into()],
        }),
        ..Default::default()
    };
    let drive = dir.join("config.img");
    write_config_drive(&drive, &config).unwrap();
    let console = dir.join("console.log");

    let started = Instant::now();
    let mut vmm = ignite_init_vm(&rootfs, &drive, &console)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ignite vmm run");
    // Until the kubelet's second start (after its first exit), then the host's graceful stop. The
    // deadline only keeps a broken guest from hanging the test.
    let deadline = started + Duration::from_secs(600);
    let read = || std::fs::read_to_string(&console).unwrap_or_default();
    while read().matches("ignite-init: kubelet: started").count() < 2
        || !read().contains("ignite-init: kubernetes: joined the cluster")
    {
        if Instant::now() > deadline || vmm.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = Command::new("kill").arg("-TERM").arg(vmm.id().to_string()).status();
    let out = vmm.wait_with_output().unwrap();
    let log = read();
    let context =
        format!("status {:?}\nstderr:\n{}\nconsole:\n{log}", out.status, String::from_utf8_lossy(&out.stderr));
    eprintln!("boot to exit took {:?}\n{context}", started.elapsed());

    let at = |what: &str| log.find(what).unwrap_or_else(|| panic!("no {what:?} on the console: {context}"));
    assert!(
        at("RUNTIME-UP") < at("ignite-init: kubelet: started"),
        "the entrypoint runs before the kubelet: {context}"
    );
    assert!(log.contains("kubeadm: FAKE-KUBEADM discovery with token <redacted>"), "kubeadm's stdout: {context}");
    assert!(log.contains("kubeadm: FAKE-KUBEADM secret <redacted>"), "kubeadm's stderr: {context}");
    assert!(log.contains("kubeadm: FAKE-KUBEADM This node has joined the cluster"), "{context}");
    assert!(log.contains("ignite-init: kubernetes: joined the cluster"), "{context}");
    assert!(!log.contains(SECRET), "the token reached the console: {context}");
    assert!(!log.contains("FAKE-KUBELET"), "the kubelet's output goes to its log file: {context}");
    let argv = "/usr/bin/kubelet --bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf \
                --kubeconfig=/etc/kubernetes/kubelet.conf --config=/var/lib/kubelet/config.yaml \
                --container-runtime-endpoint=unix:///var/run/containerd/containerd.sock \
                --provider-id=ignite://h/node-1 --node-labels=role=edge";
    assert!(log.contains(&format!("start 1, output in /var/log/kubelet.log): {argv}")), "{context}");
    assert!(log.contains("ignite-init: kubelet: exited (exit status: 1); starting it again in 10s"), "{context}");
    assert!(log.contains(&format!("start 2, output in /var/log/kubelet.log): {argv}")), "{context}");
    assert!(log.contains("ENTRYPOINT-MODE 600"), "the join configuration is private: {context}");
    assert!(log.contains("ignite-init: stop requested: SIGTERM to the kubelet"), "{context}");
    assert!(log.contains("ignite-init: exit signal=15"), "the runtime stopped by the graceful stop: {context}");
}
