//! Git credentials never show: the real `ignite daemon` follows a repository served over smart
//! HTTP that wants a password. A URL with the password in it is refused (without echoing it), so
//! is a credentials file others can read; with `--git-credentials-file` (mode 0600) the fleet runs,
//! and the password is in no process's command line, not in the daemon's log, and not in what the
//! API says about VMs, sources and events.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::daemon::{vm_up, wait_for, DaemonProcess, KillVmsOnDrop};
use support::fleet::{manifest, registry_with_image, unavailable};
use support::git::{GitHttpServer, Repo};
use support::tiny_guest;

const PASSWORD: &str = "tok3n-8c41e07f-do-not-leak";

/// Every process's command line that mentions `needle`.
fn command_lines_with(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

/// What the CLI prints for `args`, through the daemon's API on `root`.
fn cli(root: &Path, args: &[&str]) -> String {
    let out = Command::new(tiny_guest::ignite_bin())
        .arg("--root")
        .arg(root)
        .arg("--socket")
        .arg(root.join("ignite.sock"))
        .args(args)
        .env("IGNITE_AUTOSTART", "0")
        .output()
        .unwrap();
    assert!(out.status.success(), "ignite {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn git_credentials_come_from_a_private_file_and_never_show() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP git_credentials_come_from_a_private_file_and_never_show: {why}");
        return;
    }
    let (_registry, image) = registry_with_image();
    let repo = Repo::new();
    repo.commit(
        &[("vms/vault.yaml", Some(&manifest("vault", &image, "64Mi", ""))), ("vms/README.md", Some("fleet\n"))],
        "a VM",
    );
    let server = GitHttpServer::start(repo.dir.path(), "alice", PASSWORD);
    let url = format!("http://127.0.0.1:{}/remote.git", server.port);
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let _guard = KillVmsOnDrop(r);

    // Credentials in the URL: refused at once, and the error does not repeat them.
    let in_url = format!("http://alice:{PASSWORD}@127.0.0.1:{}/remote.git", server.port);
    let refused = DaemonProcess::start(r, &in_url, &["--no-network"], &[]);
    let log = refused.log.clone();
    refused.wait_crash(Duration::from_secs(30));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("--git-credentials-file") && text.contains("has credentials in it"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
    std::fs::remove_file(&log).unwrap();

    // A credentials file other users can read: refused, saying how to fix it.
    let secrets = tempfile::tempdir().unwrap();
    let file = secrets.path().join("git-credentials");
    std::fs::write(&file, format!("alice:{PASSWORD}\n")).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let flag = ["--no-network", "--git-credentials-file", file.to_str().unwrap()];
    let open = DaemonProcess::start(r, &url, &flag, &[]);
    let log = open.log.clone();
    open.wait_crash(Duration::from_secs(30));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("readable or writable by other users") && text.contains("chmod 600"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
    std::fs::remove_file(&log).unwrap();

    // The file made private: the daemon authenticates and the fleet runs.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut daemon = DaemonProcess::start(r, &url, &flag, &[]);
    wait_for("vault up", Duration::from_secs(90), || {
        daemon.assert_alive();
        vm_up(r, "vault")
    });
    assert!(server.refused.load(std::sync::atomic::Ordering::SeqCst) > 0, "the remote asked for credentials");
    assert!(server.authorized.load(std::sync::atomic::Ordering::SeqCst) > 0, "and got them");
    assert_eq!(command_lines_with(PASSWORD), Vec::<String>::new(), "no command line carries the password");
    let api = [cli(r, &["ps", "-a"]), cli(r, &["inspect", "vault"]), cli(r, &["sources", "ls"]), cli(r, &["events"])]
        .join("\n");
    assert!(api.contains("vault") && api.contains(&format!("127.0.0.1:{}", server.port)), "{api}");
    assert!(!api.contains(PASSWORD), "{api}");
    daemon.terminate();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let logs: String = std::fs::read_dir(r)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(!logs.contains(PASSWORD) && !text.contains(PASSWORD), "the daemon's log carries the password");
    assert!(logs.contains("ignite daemon: running"), "{logs}");
}
