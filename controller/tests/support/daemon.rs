//! The real `ignite daemon` binary as a child process, over a temporary root, following a git
//! repository; and checks of what is left on the host.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::tiny_guest;

/// A running `ignite daemon`; killed (SIGKILL) on drop if still running.
pub struct DaemonProcess {
    /// The child.
    pub child: Child,
    /// Its log (stderr).
    pub log: PathBuf,
}

impl DaemonProcess {
    /// Starts `ignite daemon` on `root` following `url` (path `vms`), with `extra` args and env; its
    /// API socket is `root/ignite.sock` unless `extra` gives `--socket`.
    pub fn start(root: &Path, url: &str, extra: &[&str], env: &[(&str, &str)]) -> DaemonProcess {
        Self::start_with_kernel(root, url, &tiny_guest::idle_guest().kernel, extra, env)
    }

    /// [`DaemonProcess::start`] with another default kernel (a tiny guest of [`tiny_guest`]).
    pub fn start_with_kernel(
        root: &Path,
        url: &str,
        kernel: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> DaemonProcess {
        let log = root.join(format!(
            "daemon-{}.log",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        let mut cmd = Command::new(tiny_guest::ignite_bin());
        cmd.arg("--root")
            .arg(root)
            // Tiny guests are no templates: the VMs boot cold, and no template build runs beside them.
            .args([
                "--log",
                "info",
                "daemon",
                "--no-warm-start",
                "--gitops",
                url,
                "--path",
                "vms",
                "--interval",
                "300ms",
            ])
            .arg("--kernel")
            .arg(kernel)
            .args(extra);
        // Each test daemon has its own API socket unless the test names one: tests run in parallel,
        // and a second daemon is refused the socket another one answers on.
        if !extra.contains(&"--socket") {
            cmd.arg("--socket").arg(root.join("ignite.sock"));
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        DaemonProcess { child: cmd.spawn().unwrap(), log }
    }

    /// Kills the daemon with SIGKILL and reaps it.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the daemon with SIGTERM and waits for it to exit.
    pub fn terminate(mut self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "daemon exited with {status}:\n{}", self.log_text());
    }

    /// Waits for the daemon to die on its own (a crash point); panics after `timeout`.
    pub fn wait_crash(mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(!status.success(), "the daemon was expected to crash:\n{}", self.log_text());
                return;
            }
            assert!(Instant::now() < deadline, "the daemon did not reach its crash point:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics with the log if the daemon died.
    pub fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the daemon died with {status}:\n{}", self.log_text());
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `cond` holds, panicking with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The live VMM process of `vm` under `root`, from its pid file.
pub fn pid_of(root: &Path, vm: &str) -> Option<i32> {
    let text = std::fs::read_to_string(root.join("vms").join(vm).join("pid")).ok()?;
    let pid: i32 = text.split_whitespace().next()?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // A zombie is not running.
    (!stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z')).then_some(pid)
}

/// Whether `vm` runs and its console shows the tiny guest's marker.
pub fn vm_up(root: &Path, vm: &str) -> bool {
    pid_of(root, vm).is_some()
        && std::fs::read_to_string(root.join("vms").join(vm).join("console.log"))
            .is_ok_and(|c| c.contains(tiny_guest::IDLE_MARKER))
}

/// Every VMM process whose command line mentions `root` (there must be none after a delete).
pub fn vmm_processes(root: &Path) -> Vec<i32> {
    let needle = root.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.contains("vmm\0run") && cmdline.contains(&needle)
        })
        .collect()
}

/// Files and directories a VM may own under `root`: its run and runtime directories and disks.
pub fn vm_files(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for dir in ["vms", "runtime", "snapshots/copy", "snapshots/reflink", "vm-snapshots"] {
        if let Ok(entries) = std::fs::read_dir(root.join(dir)) {
            found.extend(entries.flatten().map(|e| e.path()));
        }
    }
    found.sort();
    found
}

/// Kills every VMM process under a test root when dropped, so a failing test leaves no VM
/// running (VMs outlive their daemon by design).
pub struct KillVmsOnDrop<'a>(pub &'a Path);

impl Drop for KillVmsOnDrop<'_> {
    fn drop(&mut self) {
        for pid in vmm_processes(self.0) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}
