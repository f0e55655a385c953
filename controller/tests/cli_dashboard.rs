//! The CLI as a user meets it: `ignite dashboard` driven in tmux and read off the screen while the
//! fleet changes under it (git commits, a daemon killed and restarted), and the CLI starting a
//! daemon when none answers.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use controller::testing::git::Repo;
use controller::testing::tmux::{tmux_missing, Tmux};
use support::daemon::{vm_up, wait_for, DaemonProcess, KillVmsOnDrop};
use support::fleet::{manifest, registry_with_image, unavailable};
use support::tiny_guest;

/// The row of the VM table that starts with `name`, if shown.
fn vm_row<'a>(screen: &'a str, name: &str) -> Option<&'a str> {
    screen.lines().find(|l| l.trim_start_matches('│').starts_with(&format!("{name} ")))
}

#[test]
fn the_dashboard_follows_the_fleet_live_and_across_a_daemon_restart() {
    const NAME: &str = "the_dashboard_follows_the_fleet_live_and_across_a_daemon_restart";
    if let Some(why) = unavailable() {
        eprintln!("SKIP {NAME}: {why}");
        return;
    }
    if tmux_missing() {
        eprintln!("SKIP {NAME}: tmux is not installed (scripts/install-deps.sh installs it)");
        return;
    }
    let (_registry, image) = registry_with_image();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let _guard = KillVmsOnDrop(r);
    let repo = Repo::new();
    repo.commit(&[("vms/alpha.yaml", Some(&manifest("alpha", &image, "64Mi", "")))], "alpha");
    let socket = r.join("ignite.sock");
    let flags = ["--no-network", "--socket", socket.to_str().unwrap()];
    let daemon = DaemonProcess::start(r, &repo.url(), &flags, &[]);
    wait_for("alpha up", Duration::from_secs(60), || vm_up(r, "alpha"));

    let command = format!(
        "IGNITE_AUTOSTART=0 {} --root {} --socket {} dashboard",
        tiny_guest::ignite_bin().display(),
        r.display(),
        socket.display()
    );
    let tmux = Tmux::start("ignite-test-dashboard", &command);
    let screen = tmux.wait("alpha Running, its source and its events", Duration::from_secs(30), |s| {
        vm_row(s, "alpha").is_some_and(|row| row.contains("Running") && row.contains(&image[..20]))
            && s.contains("gitops")
            && s.contains("Started")
    });
    assert!(screen.contains("1 VMs, 1 running"), "{screen}");

    // A commit shows up without any key pressed.
    repo.commit(&[("vms/beta.yaml", Some(&manifest("beta", &image, "64Mi", "")))], "beta");
    tmux.wait("beta Running", Duration::from_secs(60), |s| vm_row(s, "beta").is_some_and(|r| r.contains("Running")));
    // Selecting a VM shows its conditions and console.
    tmux.keys("Down");
    tmux.wait("beta's details", Duration::from_secs(10), |s| {
        s.contains("beta  generation 1") && s.contains(tiny_guest::IDLE_MARKER)
    });

    // The daemon goes away: the dashboard says so and keeps the last view.
    daemon.kill9();
    let screen = tmux.wait("the disconnection", Duration::from_secs(15), |s| s.contains("DISCONNECTED"));
    assert!(vm_row(&screen, "alpha").is_some(), "the last view stays:\n{screen}");
    // While it is away the fleet changes in git; the restarted daemon applies it and the
    // dashboard resumes its watch from the last revision it saw.
    repo.commit(&[("vms/alpha.yaml", None)], "remove alpha");
    let _daemon = DaemonProcess::start(r, &repo.url(), &flags, &[]);
    tmux.wait("alpha gone, beta still Running, connected again", Duration::from_secs(60), |s| {
        vm_row(s, "alpha").is_none()
            && vm_row(s, "beta").is_some_and(|r| r.contains("Running"))
            && !s.contains("DISCONNECTED")
    });

    tmux.keys("q");
    wait_for("the dashboard to quit on q", Duration::from_secs(10), || !tmux.alive());
}

fn ignite(root: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(tiny_guest::ignite_bin());
    cmd.arg("--root").arg(root).arg("--socket").arg(root.join("s.sock")).args(args).env_remove("IGNITE_AUTOSTART");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn the_cli_starts_a_daemon_when_none_answers() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let out = ignite(r, &[("IGNITE_AUTOSTART", "0")], &["ps"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("IGNITE_AUTOSTART=0"), "{stderr}");
    let out = ignite(r, &[], &["version"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("no daemon answers"), "version never starts one");

    let out = ignite(r, &[("IGNITE_NO_NETWORK", "true")], &["ps", "-a"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("started `ignite daemon`"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("NAME"));
    let pid: i32 = stderr.split("(pid ").nth(1).and_then(|s| s.split(',').next()).unwrap().parse().unwrap();
    let stop = || {
        let _ =
            rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), rustix::process::Signal::TERM);
    };
    // The second command finds it; `version` reports it.
    let out = ignite(r, &[], &["version"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    stop_on_panic(stop, || {
        assert!(stdout.contains("(daemon on") && stdout.contains("0 VMs"), "{stdout}");
        assert!(r.join("daemon.log").exists());
    });
    stop();
    wait_for("the started daemon to stop", Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
    });
}

/// Runs `f`; if it panics, runs `cleanup` first, then panics on.
fn stop_on_panic(cleanup: impl Fn(), f: impl FnOnce() + std::panic::UnwindSafe) {
    if let Err(e) = std::panic::catch_unwind(f) {
        cleanup();
        std::panic::resume_unwind(e);
    }
}
