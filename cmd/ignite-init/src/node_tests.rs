//! The bootstrap with fake programs in a temporary root: a fake `kubeadm` that refuses to run without
//! the container runtime's socket, writes what `kubelet-start` writes and then waits for the kubelet's
//! TLS bootstrap (`kubelet.conf`), and a fake `kubelet` that does that bootstrap on its first start,
//! exits, and stays up on the next.

use std::os::unix::fs::PermissionsExt;
use std::sync::mpsc::Receiver;

use super::*;
use crate::children::Direct;

const TOKEN: &str = "abcdef.0123456789abcdef";
const SECRET: &str = "0123456789abcdef";
const FLAGS: &str =
    "--container-runtime-endpoint=unix:///var/run/containerd/containerd.sock --provider-id=ignite://h/vm";

fn join() -> JoinConfig {
    JoinConfig {
        config_path: "/etc/ignite/kubeadm-join.yaml".into(),
        config: format!("token: {TOKEN}\n"),
        command: vec![],
        redact: vec![TOKEN.into(), SECRET.into()],
    }
}

fn script(root: &Path, name: &str, body: &str) {
    let bin = root.join("usr/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join(name), format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(bin.join(name), std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// kubeadm join as far as ignite-init is concerned (it runs in the root, so paths are relative).
fn fake_kubeadm(root: &Path) {
    fake_kubeadm_writing_flags(root, "");
}

/// [`fake_kubeadm`], running `before_flags` (shell) after it created the flags file and before it
/// writes it.
fn fake_kubeadm_writing_flags(root: &Path, before_flags: &str) {
    let body = format!(
        r#"echo "$@" > kubeadm-args
[ -e var/run/containerd/containerd.sock ] || {{ echo "[preflight] container runtime is not running" >&2; exit 1; }}
mkdir -p etc/kubernetes var/lib/kubelet
echo "token: {TOKEN}" > etc/kubernetes/bootstrap-kubelet.conf
echo "kind: KubeletConfiguration" > var/lib/kubelet/config.yaml
: > var/lib/kubelet/kubeadm-flags.env
{before_flags}
echo 'KUBELET_KUBEADM_ARGS="{FLAGS}"' > var/lib/kubelet/kubeadm-flags.env
echo "[kubelet-start] Starting the kubelet (token {TOKEN})"
i=0
while [ ! -e etc/kubernetes/kubelet.conf ]; do
  i=$((i+1)); [ $i -gt 1200 ] && {{ echo "timed out waiting for the kubelet's TLS bootstrap" >&2; exit 1; }}
  sleep 0.05
done
echo "This node has joined the cluster"
"#
    );
    script(root, "kubeadm", &body);
}

/// Records each start's argv (one argument a line, `---` after each start); with the drop-in's
/// flags it writes kubelet.conf and exits on its first start, and stays up afterwards, saying so
/// through the FIFO `up` (see [`until_up`]).
fn fake_kubelet(root: &Path) {
    assert!(std::process::Command::new("mkfifo").arg(root.join("up")).status().unwrap().success());
    let body = format!(
        r#"for a in "$@"; do printf '%s\n' "$a"; done >> kubelet-runs; echo --- >> kubelet-runs
echo "kubelet chatter {TOKEN}"
[ "$1 $2 $3" = "--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf --kubeconfig=/etc/kubernetes/kubelet.conf --config=/var/lib/kubelet/config.yaml" ] || exit 2
[ -e etc/kubernetes/kubelet.conf ] || {{ echo "kind: Config" > etc/kubernetes/kubelet.conf; exit 1; }}
echo up > up
exec sleep 600
"#
    );
    script(root, "kubelet", &body);
}

fn extra_args(root: &Path) {
    std::fs::create_dir_all(root.join("etc/default")).unwrap();
    std::fs::write(root.join("etc/default/kubelet"), "KUBELET_EXTRA_ARGS=\"--v=2 --node-labels='a=b,c=d'\"\n").unwrap();
}

fn options() -> NodeOptions {
    NodeOptions {
        poll: Duration::from_millis(20),
        cri_wait: Duration::from_secs(120),
        restart_delay: Duration::from_millis(10),
        kubelet_log_max: kubelet::KUBELET_LOG_MAX,
    }
}

fn start(root: &Path, options: NodeOptions) -> (Node, Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    let log: Log = Arc::new(move |line: &str| {
        let _ = tx.send(line.to_string());
    });
    (Node::start(root.to_path_buf(), join(), Arc::new(Direct), options, log).unwrap(), rx)
}

/// Console lines until `done` holds for them (a generous guard against a hang, not a timing check).
fn until(rx: &Receiver<String>, seen: &mut Vec<String>, done: impl Fn(&[String]) -> bool) {
    while !done(seen) {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => seen.push(line),
            Err(e) => panic!("{e} waiting; console so far:\n{}", seen.join("\n")),
        }
    }
}

/// Blocks until a fake kubelet that stays up recorded its start (so a stop cannot kill it before).
fn until_up(root: &Path) {
    let fifo = root.join("up");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(std::fs::read_to_string(fifo)));
    let got = rx.recv_timeout(Duration::from_secs(120)).expect("the kubelet never came up");
    assert_eq!(got.unwrap(), "up\n");
}

fn count(lines: &[String], what: &str) -> usize {
    lines.iter().filter(|l| l.contains(what)).count()
}

fn runs(root: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(root.join("kubelet-runs")).unwrap_or_default();
    text.split_terminator("---\n").map(|run| run.lines().map(String::from).collect()).collect()
}

fn expected_argv(kubeadm_flags: bool) -> Vec<String> {
    let mut argv: Vec<String> = [
        "--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf",
        "--kubeconfig=/etc/kubernetes/kubelet.conf",
        "--config=/var/lib/kubelet/config.yaml",
    ]
    .map(String::from)
    .to_vec();
    if kubeadm_flags {
        argv.extend(FLAGS.split(' ').map(String::from));
    }
    argv.extend(["--v=2", "--node-labels=a=b,c=d"].map(String::from));
    argv
}

#[test]
fn the_join_succeeds_once_the_runtime_is_up_and_the_kubelet_runs_with_the_drop_in_flags_and_restarts() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    fake_kubeadm(root);
    fake_kubelet(root);
    extra_args(root);
    let (node, rx) = start(root, options());
    let mut lines = Vec::new();
    until(&rx, &mut lines, |l| count(l, "kubernetes: waiting up to 120s for the container runtime's socket") == 1);
    // The runtime (the main process in the guest) comes up only now.
    std::fs::create_dir_all(root.join("var/run/containerd")).unwrap();
    let _runtime = std::os::unix::net::UnixListener::bind(root.join("var/run/containerd/containerd.sock")).unwrap();
    until(&rx, &mut lines, |l| count(l, "kubernetes: joined the cluster") == 1 && count(l, "kubelet: started") == 2);
    until_up(root);
    node.stop();
    let outcome = node.wait();
    lines.extend(rx.try_iter());
    let shown = lines.join("\n");
    assert_eq!(outcome, JoinOutcome::Joined, "{shown}");
    assert!(shown.contains("the container runtime's socket /var/run/containerd/containerd.sock is there"), "{shown}");
    let at = |what: &str| lines.iter().position(|l| l.contains(what)).unwrap();
    assert!(at("kubernetes: running kubeadm join --config") < at("kubelet: started"), "{shown}");
    assert!(shown.contains("kubeadm: This node has joined the cluster"), "{shown}");
    assert!(shown.contains("kubeadm: [kubelet-start] Starting the kubelet (token <redacted>)"), "{shown}");
    assert_eq!(count(&lines, "kubelet: exited (exit status: 1); starting it again in 0.01s"), 1, "{shown}");
    assert!(lines.last().unwrap().starts_with("kubelet: stopped (signal: 15"), "SIGTERM on stop: {shown}");
    assert!(!shown.contains(SECRET), "the token reached the console: {shown}");
    assert!(!shown.contains("chatter"), "the kubelet's output is not for the console: {shown}");
    assert_eq!(runs(root), [expected_argv(true), expected_argv(true)], "{shown}");
    let log = std::fs::read_to_string(root.join("var/log/kubelet.log")).unwrap();
    assert_eq!(count(&log.lines().map(String::from).collect::<Vec<_>>(), "kubelet chatter"), 2, "{log}");
    assert!(log.starts_with("--- ignite-init: kubelet start 1\n"), "{log}");
}

#[test]
fn the_kubelet_waits_for_a_flags_file_that_kubeadm_created_but_has_not_written_yet() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    // Many polls (20 ms) between the file's creation and its content, as a slow guest can have.
    fake_kubeadm_writing_flags(root, "sleep 0.5");
    fake_kubelet(root);
    extra_args(root);
    std::fs::create_dir_all(root.join("var/run/containerd")).unwrap();
    std::fs::write(root.join("var/run/containerd/containerd.sock"), "").unwrap();
    let (node, rx) = start(root, options());
    let mut lines = Vec::new();
    until(&rx, &mut lines, |l| count(l, "kubernetes: joined the cluster") == 1 && count(l, "kubelet: started") == 2);
    until_up(root);
    node.stop();
    assert_eq!(node.wait(), JoinOutcome::Joined);
    assert_eq!(runs(root), [expected_argv(true), expected_argv(true)], "{}", lines.join("\n"));
}

#[test]
fn without_the_runtimes_socket_kubeadm_runs_after_the_wait_and_its_preflight_fails() {
    let root = tempfile::tempdir().unwrap();
    fake_kubeadm(root.path());
    fake_kubelet(root.path());
    let (node, rx) = start(root.path(), NodeOptions { cri_wait: Duration::from_millis(50), ..options() });
    let outcome = node.wait();
    let shown = rx.try_iter().collect::<Vec<_>>().join("\n");
    assert!(matches!(&outcome, JoinOutcome::Failed(m) if m.contains("exit status: 1")), "{outcome:?} {shown}");
    assert!(shown.contains("no container runtime socket appeared: running kubeadm join anyway"), "{shown}");
    assert!(shown.contains("kubeadm: [preflight] container runtime is not running"), "{shown}");
    assert!(
        shown.contains("kubelet: no /var/lib/kubelet/config.yaml and /var/lib/kubelet/kubeadm-flags.env"),
        "{shown}"
    );
    assert!(runs(root.path()).is_empty(), "no kubelet without its configuration");
}

#[test]
fn a_node_that_joined_before_starts_the_kubelet_without_kubeadm() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    fake_kubeadm(root);
    fake_kubelet(root);
    extra_args(root);
    for (path, text) in
        [("etc/kubernetes/kubelet.conf", "kind: Config\n"), ("var/lib/kubelet/config.yaml", "kind: x\n")]
    {
        std::fs::create_dir_all(root.join(path).parent().unwrap()).unwrap();
        std::fs::write(root.join(path), text).unwrap();
    }
    // A log cap smaller than the kubelet's first two lines: the second starts kubelet.log anew.
    let (node, rx) = start(root, NodeOptions { kubelet_log_max: 64, ..options() });
    let mut lines = Vec::new();
    until(&rx, &mut lines, |l| count(l, "kubelet: started") == 1);
    until_up(root);
    node.stop();
    assert_eq!(node.wait(), JoinOutcome::AlreadyJoined);
    let log = |name: &str| std::fs::read_to_string(root.join("var/log").join(name)).unwrap();
    assert_eq!(log("kubelet.log.1"), "--- ignite-init: kubelet start 1\n");
    assert_eq!(log("kubelet.log"), format!("kubelet chatter {TOKEN}\n"), "complete once the exit is told");
    lines.extend(rx.try_iter());
    let shown = lines.join("\n");
    assert!(!root.join("kubeadm-args").exists(), "kubeadm must not run: {shown}");
    assert!(!shown.contains("container runtime"), "no wait for a join that does not run: {shown}");
    assert_eq!(
        runs(root),
        [expected_argv(false)],
        "no kubeadm-flags.env: the drop-in's and the administrator's: {shown}"
    );
    assert!(lines.last().unwrap().starts_with("kubelet: stopped"), "{shown}");
}

#[test]
fn without_a_kubelet_one_line_says_so_and_the_join_runs_as_before() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("var/run")).unwrap();
    std::fs::write(root.path().join("var/run/crio.sock"), "").unwrap();
    // A configured socket is the only one looked for.
    let mut join = join();
    join.config.push_str("nodeRegistration:\n  criSocket: \"unix:///var/run/crio.sock\"\n");
    let (tx, rx) = mpsc::channel();
    let log: Log = Arc::new(move |line: &str| {
        let _ = tx.send(line.to_string());
    });
    // Today's outcome without a kubelet: kubeadm's wait for the TLS bootstrap times out.
    let timeout = "[ -e etc/kubernetes/kubelet.conf ] || { echo timed out >&2; exit 1; }\n";
    script(root.path(), "kubeadm", &format!("mkdir -p var/lib/kubelet; touch var/lib/kubelet/config.yaml\n{timeout}"));
    let node = Node::start(root.path().to_path_buf(), join, Arc::new(Direct), options(), log).unwrap();
    let outcome = node.wait();
    let lines: Vec<String> = rx.try_iter().collect();
    let shown = lines.join("\n");
    assert!(matches!(&outcome, JoinOutcome::Failed(_)), "{outcome:?} {shown}");
    assert_eq!(count(&lines, "the image has no kubelet (looked in /usr/bin, /usr/local/bin, /bin)"), 1, "{shown}");
    assert_eq!(count(&lines, "kubelet:"), 1, "nothing else about a kubelet: {shown}");
    assert!(shown.contains("kubeadm: timed out"), "{shown}");
    assert!(!shown.contains("waiting up to"), "the configured socket exists: {shown}");
}

#[test]
fn the_configured_cri_socket_is_read_from_the_join_configuration() {
    let config = "kind: JoinConfiguration\nnodeRegistration:\n  criSocket: unix:///run/containerd/containerd.sock\n";
    assert_eq!(configured_cri_socket(config).as_deref(), Some("/run/containerd/containerd.sock"));
    assert_eq!(
        configured_cri_socket("  criSocket: '/var/run/crio/crio.sock'").as_deref(),
        Some("/var/run/crio/crio.sock")
    );
    assert_eq!(configured_cri_socket("kind: JoinConfiguration\n"), None);
    assert_eq!(configured_cri_socket("criSocket: npipe:////./pipe/x"), None);
}

#[test]
fn a_malformed_flags_file_is_a_console_line_and_the_next_start_reads_it_again() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    fake_kubelet(root);
    extra_args(root);
    for (path, text) in [
        ("etc/kubernetes/kubelet.conf", "kind: Config\n"),
        ("var/lib/kubelet/config.yaml", "kind: x\n"),
        ("var/lib/kubelet/kubeadm-flags.env", "KUBELET_KUBEADM_ARGS=\"--provider-id=x\n"),
    ] {
        std::fs::create_dir_all(root.join(path).parent().unwrap()).unwrap();
        std::fs::write(root.join(path), text).unwrap();
    }
    let (node, rx) = start(root, options());
    let mut lines = Vec::new();
    until(&rx, &mut lines, |l| count(l, "kubelet: cannot start it") == 1);
    assert_eq!(
        lines.last().unwrap(),
        "kubelet: cannot start it: /var/lib/kubelet/kubeadm-flags.env: line 1: unterminated double quote; \
         starting it again in 0.01s"
    );
    std::fs::write(root.join("var/lib/kubelet/kubeadm-flags.env"), format!("KUBELET_KUBEADM_ARGS=\"{FLAGS}\"\n"))
        .unwrap();
    until(&rx, &mut lines, |l| count(l, "kubelet: started") == 1);
    until_up(root);
    node.stop();
    assert_eq!(node.wait(), JoinOutcome::AlreadyJoined);
    assert_eq!(runs(root), [expected_argv(true)], "{}", lines.join("\n"));
}
