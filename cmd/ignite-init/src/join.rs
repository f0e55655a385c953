//! Joining a Kubernetes cluster (alongside the main process and the kubelet, see [`crate::node`]):
//! when the config drive carries a [`JoinConfig`] and the image has `kubeadm`, run
//! `kubeadm join --config FILE` once.
//!
//! Everything is relative to a root directory (`/` in the guest, a temporary directory in tests), and
//! the outcome comes back as console lines with the bootstrap token already removed: the console log
//! is readable on the host (`ignite logs`), so the token must never reach it.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::children::Children;
use crate::spec::DEFAULT_PATH;
use guest_api::config::JoinConfig;

/// Where `kubeadm` is looked for in the image, in order.
pub const KUBEADM_DIRS: [&str; 3] = ["/usr/bin", "/usr/local/bin", "/bin"];
/// The file a successful `kubeadm join` leaves: present, the node already joined (a restart of the
/// same disk), and joining again would fail kubeadm's preflight checks.
pub const JOINED_MARKER: &str = "/etc/kubernetes/kubelet.conf";
/// What replaces a secret in the join command's output.
pub const REDACTED: &str = "<redacted>";

/// How the join went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinOutcome {
    /// The join command ran and succeeded.
    Joined,
    /// The node joined on an earlier boot ([`JOINED_MARKER`] exists): nothing ran.
    AlreadyJoined,
    /// The image has no such program: nothing ran.
    NoKubeadm(String),
    /// The join command failed (could not start, or ended with an error).
    Failed(String),
}

/// The outcome and the console lines that describe it (the command's output included), redacted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinReport {
    /// How it went.
    pub outcome: JoinOutcome,
    /// Lines for the console, without any of [`JoinConfig::redact`].
    pub lines: Vec<String>,
}

/// `path` (absolute in the guest) under `root`.
pub fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds `program` under `root`: a path containing `/` as it is, a bare name in [`KUBEADM_DIRS`].
pub fn find_program(root: &Path, program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let path = under(root, program);
        return is_executable(&path).then_some(path);
    }
    KUBEADM_DIRS.iter().map(|dir| under(root, &format!("{dir}/{program}"))).find(|p| is_executable(p))
}

/// The join command's argv: [`JoinConfig::command`], or `kubeadm join --config CONFIG_PATH` when empty.
pub fn command_line(join: &JoinConfig) -> Vec<String> {
    if join.command.is_empty() {
        vec!["kubeadm".into(), "join".into(), "--config".into(), join.config_path.clone()]
    } else {
        join.command.clone()
    }
}

/// `text` with every non-empty string of `secrets` replaced by [`REDACTED`].
pub fn redact(text: &str, secrets: &[String]) -> String {
    secrets.iter().filter(|s| !s.is_empty()).fold(text.to_string(), |t, s| t.replace(s.as_str(), REDACTED))
}

/// Runs the join under `root` unless the node already joined or the program is missing. The
/// configuration file must already be written (`setup::write_files`). The command is started and
/// waited for through `children` (in the guest, PID 1's reaper); `started` gets the line saying so
/// at once (the command's output comes in the report when it ends). Arguments naming guest paths
/// are rewritten under `root`, so tests can run it in a temporary directory.
pub fn run(root: &Path, join: &JoinConfig, children: &dyn Children, started: &dyn Fn(&str)) -> JoinReport {
    let report = |outcome, lines| JoinReport { outcome, lines };
    if under(root, JOINED_MARKER).exists() {
        let line = format!("kubernetes: {JOINED_MARKER} exists, the node joined on an earlier boot: not joining again");
        return report(JoinOutcome::AlreadyJoined, vec![line]);
    }
    let argv = command_line(join);
    let Some(program) = find_program(root, &argv[0]) else {
        let line = format!(
            "kubernetes: the image has no {} (looked in {}): not joining the cluster",
            argv[0],
            KUBEADM_DIRS.join(", ")
        );
        return report(JoinOutcome::NoKubeadm(argv[0].clone()), vec![line]);
    };
    let args: Vec<String> = argv[1..]
        .iter()
        .map(|a| {
            if a.starts_with('/') && root != Path::new("/") {
                under(root, a).display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    started(&redact(&format!("kubernetes: running {}", argv.join(" ")), &join.redact));
    let mut lines = Vec::new();
    let mut cmd = Command::new(&program);
    cmd.args(&args).env_clear().env("PATH", DEFAULT_PATH).env("HOME", "/root").current_dir(root);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let failed = |mut lines: Vec<String>, msg: String| {
        lines.push(format!("kubernetes: join failed: {msg}"));
        report(JoinOutcome::Failed(msg), lines)
    };
    let (stdout, stderr, status) = match children.spawn(&mut cmd) {
        Ok(mut child) => {
            let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
            let reader = std::thread::spawn(move || read_all(err.as_mut()));
            let stdout = read_all(out.as_mut());
            let stderr = reader.join().unwrap_or_default();
            (stdout, stderr, children.wait(child.id()))
        }
        Err(e) => return failed(lines, format!("cannot start {}: {e}", argv[0])),
    };
    for stream in [&stdout, &stderr] {
        let text = redact(&String::from_utf8_lossy(stream), &join.redact);
        lines.extend(text.lines().filter(|l| !l.trim().is_empty()).map(|l| format!("kubeadm: {l}")));
    }
    match status {
        Ok(status) if status.success() => {
            lines.push("kubernetes: joined the cluster".into());
            report(JoinOutcome::Joined, lines)
        }
        Ok(status) => failed(lines, format!("{} ended with {status}", argv[0])),
        Err(e) => failed(lines, format!("cannot learn how {} ended: {e}", argv[0])),
    }
}

/// Everything `from` has until its end (nothing for a missing pipe or a read error).
fn read_all(from: Option<&mut impl Read>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(from) = from {
        let _ = from.read_to_end(&mut buf);
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::children::Direct;

    /// [`Direct`], recording the programs it starts.
    #[derive(Default)]
    struct Recording(std::sync::Mutex<Vec<PathBuf>>);

    impl Children for Recording {
        fn spawn(&self, cmd: &mut Command) -> std::io::Result<std::process::Child> {
            self.0.lock().unwrap().push(PathBuf::from(cmd.get_program()));
            Direct.spawn(cmd)
        }
        fn wait(&self, pid: u32) -> std::io::Result<std::process::ExitStatus> {
            Direct.wait(pid)
        }
        fn signal(&self, pid: u32, signal: libc::c_int) {
            Direct.signal(pid, signal)
        }
    }

    const TOKEN: &str = "abcdef.0123456789abcdef";

    fn join() -> JoinConfig {
        JoinConfig {
            config_path: "/etc/ignite/kubeadm-join.yaml".into(),
            config: format!("token: {TOKEN}\n"),
            command: vec![],
            redact: vec![TOKEN.into(), "0123456789abcdef".into()],
        }
    }

    /// A fake kubeadm under `root/usr/bin` that records its arguments, prints the token on both
    /// streams (as a verbose kubeadm might) and exits with `code`.
    fn fake_kubeadm(root: &Path, dir: &str, code: i32) {
        let bin = under(root, dir);
        std::fs::create_dir_all(&bin).unwrap();
        let args = root.join("args");
        let script = format!(
            "#!/bin/sh\necho \"$@\" > {}\necho \"discovery with token {TOKEN}\"\necho \"secret 0123456789abcdef\" >&2\nexit {code}\n",
            args.display()
        );
        std::fs::write(bin.join("kubeadm"), script).unwrap();
        std::fs::set_permissions(bin.join("kubeadm"), std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn all(report: &JoinReport) -> String {
        report.lines.join("\n")
    }

    #[test]
    fn runs_kubeadm_join_with_the_config_and_hides_the_token() {
        let root = tempfile::tempdir().unwrap();
        fake_kubeadm(root.path(), "/usr/local/bin", 0);
        let report = run(root.path(), &join(), &Direct, &|_| {});
        assert_eq!(report.outcome, JoinOutcome::Joined, "{}", all(&report));
        let args = std::fs::read_to_string(root.path().join("args")).unwrap();
        let config = root.path().join("etc/ignite/kubeadm-join.yaml");
        assert_eq!(args.trim(), format!("join --config {}", config.display()));
        let shown = all(&report);
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        assert!(shown.contains("kubeadm: discovery with token <redacted>"), "{shown}");
        assert!(shown.contains("kubeadm: secret <redacted>"), "stderr too: {shown}");
        assert!(shown.ends_with("kubernetes: joined the cluster"), "{shown}");
    }

    #[test]
    fn a_failing_join_is_reported_without_the_token() {
        let root = tempfile::tempdir().unwrap();
        fake_kubeadm(root.path(), "/usr/bin", 3);
        let report = run(root.path(), &join(), &Direct, &|_| {});
        assert!(matches!(&report.outcome, JoinOutcome::Failed(m) if m.contains("exit status: 3")), "{report:?}");
        assert!(!all(&report).contains("0123456789abcdef"), "{}", all(&report));
        assert!(all(&report).contains("join failed"), "{}", all(&report));
    }

    #[test]
    fn missing_kubeadm_is_a_clear_line_and_nothing_runs() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
        // Not executable: does not count.
        std::fs::write(root.path().join("usr/bin/kubeadm"), "#!/bin/sh\n").unwrap();
        let report = run(root.path(), &join(), &Direct, &|_| {});
        assert_eq!(report.outcome, JoinOutcome::NoKubeadm("kubeadm".into()));
        assert!(all(&report).contains("the image has no kubeadm (looked in /usr/bin, /usr/local/bin, /bin)"));
    }

    #[test]
    fn a_node_that_joined_on_an_earlier_boot_does_not_join_again() {
        let root = tempfile::tempdir().unwrap();
        fake_kubeadm(root.path(), "/bin", 0);
        std::fs::create_dir_all(root.path().join("etc/kubernetes")).unwrap();
        std::fs::write(root.path().join("etc/kubernetes/kubelet.conf"), "").unwrap();
        let report = run(root.path(), &join(), &Direct, &|_| {});
        assert_eq!(report.outcome, JoinOutcome::AlreadyJoined);
        assert!(!root.path().join("args").exists(), "kubeadm must not run");
    }

    #[test]
    fn children_start_the_command_and_an_explicit_command_is_used() {
        let root = tempfile::tempdir().unwrap();
        fake_kubeadm(root.path(), "/usr/bin", 0);
        let mut join = join();
        join.command = vec!["/usr/bin/kubeadm".into(), "join".into(), "--v=1".into()];
        let children = Recording::default();
        let report = run(root.path(), &join, &children, &|_| {});
        assert_eq!(report.outcome, JoinOutcome::Joined);
        assert_eq!(*children.0.lock().unwrap(), [root.path().join("usr/bin/kubeadm")]);
        assert_eq!(std::fs::read_to_string(root.path().join("args")).unwrap().trim(), "join --v=1");
    }

    #[test]
    fn redact_replaces_every_secret_and_ignores_empty_ones() {
        assert_eq!(
            redact("a s1 b s2 s1", &["s1".into(), "".into(), "s2".into()]),
            "a <redacted> b <redacted> <redacted>"
        );
    }
}
