//! `ignite run` as `docker run` with real Linux guests: the real `ignite daemon` (no network), a
//! busybox image pulled from a real registry, ignite-init as PID 1 and the patched guest kernel on
//! /dev/kvm. Three VMs boot side by side (one boot's time): `ignite run IMG -- sh -c '...; exit 3'`
//! returns 3 and leaves its VM stopped, not rebooting; `--rm` leaves nothing of its VM; a waiting
//! `ignite run` ends with a message when another client removes its VM with `ignite rm`.
//!
//! Three Linux boots at once: two to four minutes on hosts whose KVM emulates guests.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ignite_e2e::{busybox_registry, guest_kernel, ignite_cmd, unless_the_host_faults, Daemon, KillVmsOnDrop};

const NAME: &str = "ignite_run_returns_the_guest_commands_status_and_leaves_no_vm_running";
/// How long three guests booting at once on an emulating KVM may take.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// A background `ignite run`: stdout and stderr go to `<root>/<vm>.out` and `.err`.
struct Run {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Run {
    fn start(root: &Path, image: &str, vm: &str, extra: &[&str], command: &str) -> Run {
        let (out, err) = (root.join(format!("{vm}.out")), root.join(format!("{vm}.err")));
        let child = ignite_cmd(root)
            .args(["run", image, "--name", vm, "--memory", "128Mi", "--size", "256Mi"])
            .args(extra)
            .args(["--", "/bin/sh", "-c", command])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Run { child, out, err }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Its exit code once it has exited, `None` while it runs.
    fn exited(&mut self) -> Option<Option<i32>> {
        self.child.try_wait().unwrap().map(|s| s.code())
    }

    /// Waits for it to exit (panics after `timeout`, showing `context`): its exit code.
    fn wait(&mut self, timeout: Duration, context: &dyn Fn(&Run) -> String) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(code) = self.exited() {
                return code;
            }
            assert!(Instant::now() < deadline, "ignite run did not end within {timeout:?}\n{}", context(self));
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(what: &str, timeout: Duration, context: &dyn Fn() -> String, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}\n{}", context());
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `ignite inspect VM -o json`, or `None` when the VM is unknown.
fn inspect(root: &Path, vm: &str) -> Option<serde_json::Value> {
    let out = ignite_cmd(root).args(["inspect", vm, "-o", "json"]).output().unwrap();
    out.status.success().then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// The reasons of the daemon's events about `vm`, in order.
fn events(root: &Path, vm: &str) -> Vec<String> {
    let out = ignite_cmd(root).arg("events").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines().filter(|l| l.split_whitespace().any(|w| w == vm)).map(str::to_string).collect()
}

#[test]
fn ignite_run_returns_the_guest_commands_status_and_leaves_no_vm_running() {
    let Some((_registry, image)) = busybox_registry(NAME) else { return };
    let kernel = guest_kernel();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    unless_the_host_faults(NAME, r, || runs(r, &kernel, &image));
}

fn runs(r: &Path, kernel: &Path, image: &str) {
    let image = image.to_string();
    let _vms = KillVmsOnDrop(r);
    let _daemon = Daemon::start(r, kernel, &["--no-network"]);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let daemon_log = r.join("daemon.log");

    // Three VMs at once: each boot costs over a minute here.
    let mut job = Run::start(r, &image, "job", &[], "echo RUN-E2E-JOB $(hostname); exit 3");
    let mut gone = Run::start(r, &image, "gone", &["--rm"], "echo RUN-E2E-GONE");
    let mut waiter = Run::start(r, &image, "waiter", &[], "echo RUN-E2E-WAITING; exec sleep 3600");
    let context =
        |run: &Run| format!("stderr:\n{}\nstdout:\n{}\ndaemon log:\n{}", run.stderr(), run.stdout(), read(&daemon_log));
    let started = Instant::now();

    // The waiter: once its command runs, another client removes the VM; its ignite run ends with
    // a message and a non-zero status, and nothing of the VM is left.
    wait_for("the waiter's command to run", BOOT_TIMEOUT, &|| context(&waiter), || {
        waiter.stdout().contains("RUN-E2E-WAITING")
    });
    eprintln!("waiter up after {:?}", started.elapsed());
    assert_eq!(waiter.exited(), None, "still following: {}", context(&waiter));
    let out = ignite_cmd(r).args(["rm", "waiter"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let code = waiter.wait(Duration::from_secs(60), &context);
    assert_eq!(code, Some(130), "{}", context(&waiter));
    assert!(
        waiter.stderr().contains("VM \"waiter\" was removed by another client (ignite rm)"),
        "{}",
        context(&waiter)
    );

    // job: its command's status is ignite run's, and the VM is left stopped, not rebooting.
    let code = job.wait(BOOT_TIMEOUT, &context);
    eprintln!("job ended after {:?}", started.elapsed());
    assert_eq!(code, Some(3), "{}", context(&job));
    let console = job.stdout();
    assert!(console.contains("RUN-E2E-JOB job"), "the console streamed to stdout: {}", context(&job));
    assert_eq!(console.matches("ignite-init: exit status=3").count(), 1, "{}", context(&job));
    let doc = inspect(r, "job").expect("job stays declared");
    assert_eq!(doc["manifest"]["spec"]["state"], "Stopped", "{doc}");
    assert_eq!(doc["manifest"]["spec"]["restartPolicy"], "Never", "{doc}");
    assert_eq!(doc["status"]["lastExit"]["code"], 3, "{doc}");
    wait_for("job settled as Stopped", Duration::from_secs(30), &|| context(&job), || {
        inspect(r, "job").is_some_and(|d| d["status"]["phase"] == "Stopped")
    });
    std::thread::sleep(Duration::from_secs(5));
    let pid = read(&r.join("vms/job/pid"));
    let pid = pid.split_whitespace().next().unwrap_or_default();
    assert!(pid.is_empty() || !Path::new(&format!("/proc/{pid}")).exists(), "no VMM process runs for job ({pid})");
    let job_events = events(r, "job");
    assert_eq!(job_events.iter().filter(|l| l.contains("Started")).count(), 1, "{job_events:#?}");
    assert!(!job_events.iter().any(|l| l.contains("Restart")), "never restarted: {job_events:#?}");
    let logs = ignite_cmd(r).args(["logs", "job"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&logs.stdout).matches("Linux version").count(), 1, "booted once");

    // gone (--rm): its status, then nothing left of it.
    let code = gone.wait(BOOT_TIMEOUT, &context);
    assert_eq!(code, Some(0), "{}", context(&gone));
    assert!(gone.stdout().contains("RUN-E2E-GONE"), "{}", context(&gone));
    assert!(inspect(r, "gone").is_none(), "--rm removed the VM");
    for vm in ["gone", "waiter"] {
        for dir in ["vms", "runtime", "snapshots"] {
            let left: Vec<_> = std::fs::read_dir(r.join(dir))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains(vm))
                .map(|e| e.path())
                .collect();
            assert!(left.is_empty(), "{vm}: {left:?} left behind");
        }
    }
    let ps = ignite_cmd(r).args(["ps", "-a", "-q"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&ps.stdout).trim(), "job", "only job is left, stopped");
    let out = ignite_cmd(r).args(["rm", "job"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
