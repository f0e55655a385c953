//! `ignite run` as `docker run`, with the real `ignite` binary against an in-process daemon running
//! tiny guests (a boot takes milliseconds): the guest's exit status becomes the CLI's and the VM is
//! left stopped, `ignite start` runs it again, `--rm` removes it, `--restart on-failure:N` gives up
//! after N restarts, Ctrl-C stops the VM, and another client's `ignite rm` or `ignite stop` ends a
//! waiting `ignite run` with a message. The same with a real Linux guest: e2e/tests/run_boot.rs.

mod support;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use controller::api::{DesiredState, Phase, VmStatus};
use controller::daemon::Daemon;
use support::daemon::{pid_of, vm_up, wait_for, KillVmsOnDrop};
use support::fleet::{daemon_config, registry_with_image, unavailable};
use support::tiny_guest::{self, EXIT_CODE, EXIT_MARKER, IDLE_MARKER};

const NAME: &str = "ignite_run_follows_its_vm_to_the_end";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn ignite_cmd(socket: &Path) -> Command {
    let mut cmd = Command::new(tiny_guest::ignite_bin());
    cmd.arg("--socket").arg(socket).env("IGNITE_AUTOSTART", "0");
    cmd
}

fn ignite(socket: &Path, args: &[&str]) -> Output {
    ignite_cmd(socket).args(args).output().unwrap()
}

/// `ignite ARGS` in the background, its output into files under `dir` (read by [`finish`]).
fn spawn(socket: &Path, dir: &Path, args: &[&str]) -> Child {
    let file = |n: &str| std::fs::File::create(dir.join(n)).unwrap();
    ignite_cmd(socket).args(args).stdout(file("out")).stderr(file("err")).stdin(Stdio::null()).spawn().unwrap()
}

/// Waits for a background `ignite` to exit (panics after `timeout`): its exit code and stderr.
fn finish(mut child: Child, dir: &Path, timeout: Duration) -> (Option<i32>, String) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code(), std::fs::read_to_string(dir.join("err")).unwrap_or_default());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let err = std::fs::read_to_string(dir.join("err")).unwrap_or_default();
            panic!("ignite did not exit within {timeout:?}; its stderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn sigint(child: &Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
}

#[test]
fn ignite_run_follows_its_vm_to_the_end() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP {NAME}: {why}");
        return;
    }
    let (_registry, image) = registry_with_image();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let _guard = KillVmsOnDrop(r);
    let config = daemon_config(r, Vec::new(), None);
    let socket = config.socket.clone().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let daemon = runtime.block_on(Daemon::start(config)).unwrap();
    let store = daemon.store().clone();
    let status = |name: &str| -> Option<(DesiredState, VmStatus)> {
        store.get_vm(name).unwrap().map(|rec| (rec.vm.spec.state, rec.status))
    };
    let started = |name: &str| -> usize {
        let events = store.events_since(0, 10_000).unwrap();
        events.iter().filter(|(_, e)| e.object == name && e.reason == "Started").count()
    };
    // The exit-code guest prints its marker and powers off with EXIT_CODE (42).
    let exit_kernel = tiny_guest::exit_code_guest().kernel;
    let exit_kernel = exit_kernel.to_str().unwrap();
    let run = |name: &str, extra: &[&str]| -> Vec<String> {
        let args = ["run", &image, "--name", name, "--memory", "64Mi", "--size", "64Mi"];
        args.iter().chain(extra).map(|s| s.to_string()).collect()
    };

    // 1. The guest's exit status is ignite run's, the console reached stdout, and the VM is left
    // stopped: desired state Stopped, its exit in the status, nothing restarting it.
    let out = ignite(&socket, &strs(&run("job", &["--kernel", exit_kernel])));
    assert_eq!(out.status.code(), Some(EXIT_CODE), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains(EXIT_MARKER), "the console went to stdout: {}", text(&out.stdout));
    let (state, s) = status("job").expect("the VM stays declared");
    assert_eq!(state, DesiredState::Stopped);
    let last = s.last_exit.expect("status.lastExit");
    assert_eq!((last.code, last.crashed, last.message.as_str()), (Some(EXIT_CODE), false, "exit status 42"));
    wait_for("job settled as stopped", Duration::from_secs(30), || {
        status("job").is_some_and(|(_, s)| s.phase == Phase::Stopped)
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!((started("job"), status("job").unwrap().1.restarts), (1, 0), "never restarted");
    assert!(pid_of(r, "job").is_none());
    // `ignite start` runs it again: the exit it had was forgotten when it was left stopped.
    assert!(ignite(&socket, &["start", "job"]).status.success());
    wait_for("job to run again and end", Duration::from_secs(30), || {
        started("job") == 2 && status("job").is_some_and(|(_, s)| s.last_exit.is_some())
    });
    assert!(ignite(&socket, &["rm", "job"]).status.success());

    // 2. --rm: the same exit status, then nothing is left of the VM.
    let out = ignite(&socket, &strs(&run("gone", &["--kernel", exit_kernel, "--rm"])));
    assert_eq!(out.status.code(), Some(EXIT_CODE), "stderr: {}", text(&out.stderr));
    assert!(status("gone").is_none(), "removed before ignite run returned");
    assert!(!r.join("runtime/gone").exists() && !r.join("vms/gone").exists());
    let out = ignite(&socket, &strs(&run("never", &["--rm", "--restart", "always"])));
    assert!(text(&out.stderr).contains("--rm and --restart always conflict"), "{}", text(&out.stderr));
    assert!(status("never").is_none(), "nothing declared");

    // 3. on-failure:2 restarts a failing guest twice, then ends with its status.
    let out = ignite(&socket, &strs(&run("flaky", &["--kernel", exit_kernel, "--restart", "on-failure:2"])));
    assert_eq!(out.status.code(), Some(EXIT_CODE), "stderr: {}", text(&out.stderr));
    assert_eq!(status("flaky").unwrap().1.restarts, 2);
    let markers = text(&out.stdout).matches(EXIT_MARKER).count();
    assert!(markers >= 1, "{}", text(&out.stdout));
    let restarted = store.events_since(0, 10_000).unwrap();
    let restarted = restarted.iter().filter(|(_, e)| e.object == "flaky" && e.reason == "Restarted").count();
    assert_eq!(restarted, 2, "on-failure:2 restarts twice");
    assert!(ignite(&socket, &["rm", "flaky"]).status.success());

    // 4. Another client's rm ends a waiting ignite run (idle guests, the daemon's default kernel).
    let dir = tempfile::tempdir().unwrap();
    let child = spawn(&socket, dir.path(), &strs(&run("idle1", &[])));
    // Its console reached the waiting client (the process being up is not enough: the guest
    // prints a moment later, and the client polls the log).
    wait_for("idle1's console in ignite run's output", Duration::from_secs(60), || {
        std::fs::read_to_string(dir.path().join("out")).is_ok_and(|out| out.contains(IDLE_MARKER))
    });
    assert!(ignite(&socket, &["rm", "idle1"]).status.success());
    let (code, err) = finish(child, dir.path(), Duration::from_secs(30));
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("VM \"idle1\" was removed by another client (ignite rm)"), "{err}");

    // 5. ... and so does another client's stop.
    let child = spawn(&socket, dir.path(), &strs(&run("idle2", &[])));
    wait_for("idle2 up", Duration::from_secs(60), || vm_up(r, "idle2"));
    assert!(ignite(&socket, &["stop", "idle2"]).status.success());
    let (code, err) = finish(child, dir.path(), Duration::from_secs(30));
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("VM \"idle2\" was stopped by another client"), "{err}");
    assert!(ignite(&socket, &["rm", "idle2"]).status.success());

    // 6. Ctrl-C stops the VM and exits with 130; with --rm the VM is removed too.
    let child = spawn(&socket, dir.path(), &strs(&run("idle3", &["--rm"])));
    wait_for("idle3 up", Duration::from_secs(60), || vm_up(r, "idle3"));
    sigint(&child);
    let (code, err) = finish(child, dir.path(), Duration::from_secs(30));
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("stopping VM \"idle3\" (Ctrl-C again kills it)"), "{err}");
    assert!(status("idle3").is_none() && pid_of(r, "idle3").is_none(), "stopped and removed");
    // A second Ctrl-C kills it; the VM stays, stopped.
    let child = spawn(&socket, dir.path(), &strs(&run("idle4", &[])));
    wait_for("idle4 up", Duration::from_secs(60), || vm_up(r, "idle4"));
    sigint(&child);
    std::thread::sleep(Duration::from_millis(20));
    sigint(&child);
    let (code, err) = finish(child, dir.path(), Duration::from_secs(30));
    assert_eq!(code, Some(130), "{err}");
    assert!(pid_of(r, "idle4").is_none());
    let (state, s) = status("idle4").unwrap();
    assert_eq!((state, s.phase), (DesiredState::Stopped, Phase::Stopped), "{err}");
    runtime.block_on(daemon.shutdown());
}
