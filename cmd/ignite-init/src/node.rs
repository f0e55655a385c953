//! A Kubernetes node's bootstrap without systemd: what kubeadm expects an init system to do,
//! done by `ignite-init` alongside the main process (the image's entrypoint, typically the
//! container runtime, which therefore starts first).
//!
//! In one thread ([`Node::start`]):
//! 1. If `kubeadm join` is going to run, wait (at most [`NodeOptions::cri_wait`]) for the container
//!    runtime's socket, since kubeadm's preflight checks connect to it: the one the join
//!    configuration names (`criSocket`), else any of [`KNOWN_CRI_SOCKETS`] (kubeadm's autodetection).
//! 2. Run the join ([`crate::join::run`]). Meanwhile, when the image has a `kubelet`, poll for the
//!    files kubeadm's `kubelet-start` phase writes ([`KUBELET_CONFIG`] and [`KUBEADM_FLAGS`]) and
//!    start the kubelet once they are written (not empty, unchanged over one poll), which is when
//!    kubeadm would (re)start the systemd unit and then wait for the kubelet's TLS bootstrap. On a
//!    disk that joined on an earlier boot, no join runs and the kubelet starts at once (when
//!    [`KUBELET_CONFIG`] exists).
//! 3. Keep the kubelet running, as `Restart=always` with `RestartSec=10` would: each exit is
//!    logged and followed by a new start after [`NodeOptions::restart_delay`] (the environment
//!    files are read again). [`Node::stop`] sends it SIGTERM and ends the restarts.
//!
//! Processes are started and waited for through [`Children`] (PID 1's reaper in the guest). Every
//! console line goes through the join configuration's redaction.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::children::Children;
use crate::error_chain as chain;
use crate::join::{self, command_line, find_program, redact, under, JoinOutcome, JOINED_MARKER, KUBEADM_DIRS};
use crate::kubelet::{self, KUBEADM_FLAGS, KUBELET_CONFIG, KUBELET_LOG};
use guest_api::config::JoinConfig;

/// The sockets kubeadm autodetects a container runtime by (containerd, CRI-O, cri-dockerd).
pub const KNOWN_CRI_SOCKETS: [&str; 3] =
    ["/var/run/containerd/containerd.sock", "/var/run/crio/crio.sock", "/var/run/cri-dockerd.sock"];

/// How long the kubelet's log may take to receive its last output after it exited.
const LOG_DRAIN: Duration = Duration::from_secs(1);

/// Timing of the bootstrap; [`Default`] is what the guest uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeOptions {
    /// How often files (the CRI socket, the kubelet's configuration) are looked for.
    pub poll: Duration,
    /// How long `kubeadm join` waits for the container runtime's socket before it runs anyway.
    pub cri_wait: Duration,
    /// The pause between the kubelet's exit and its next start.
    pub restart_delay: Duration,
    /// The size at which the kubelet's log is rotated ([`kubelet::KUBELET_LOG_MAX`] in the guest).
    pub kubelet_log_max: u64,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            poll: Duration::from_millis(200),
            cri_wait: Duration::from_secs(60),
            restart_delay: Duration::from_secs(10),
            kubelet_log_max: kubelet::KUBELET_LOG_MAX,
        }
    }
}

/// A line for the console (without the `ignite-init: ` prefix), already redacted.
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// The bootstrap running in its thread.
pub struct Node {
    shared: Arc<Shared>,
    thread: JoinHandle<JoinOutcome>,
}

/// What [`Node::stop`] and the kubelet's supervision share.
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    children: Arc<dyn Children>,
}

#[derive(Default)]
struct State {
    stopping: bool,
    /// The running kubelet.
    kubelet: Option<u32>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps `time` unless a stop comes first; true when stopping.
    fn pause(&self, time: Duration) -> bool {
        let state = self.lock();
        let (state, _) =
            self.changed.wait_timeout_while(state, time, |s| !s.stopping).unwrap_or_else(|p| p.into_inner());
        state.stopping
    }
}

impl Node {
    /// Starts the bootstrap of `join` under `root` in a new thread (see the module documentation).
    pub fn start(
        root: PathBuf,
        join: JoinConfig,
        children: Arc<dyn Children>,
        options: NodeOptions,
        log: Log,
    ) -> std::io::Result<Node> {
        let shared = Arc::new(Shared { state: Mutex::default(), changed: Condvar::new(), children });
        let secrets = join.redact.clone();
        let log: Log = Arc::new(move |line: &str| log(&redact(line, &secrets)));
        let in_thread = shared.clone();
        let thread = std::thread::Builder::new()
            .name("node".into())
            .spawn(move || bootstrap(&root, &join, &in_thread, options, &log))?;
        Ok(Node { shared, thread })
    }

    /// Sends the kubelet SIGTERM and starts it no more (returns at once).
    pub fn stop(&self) {
        let mut state = self.shared.lock();
        state.stopping = true;
        if let Some(pid) = state.kubelet {
            self.shared.children.signal(pid, libc::SIGTERM);
        }
        self.shared.changed.notify_all();
    }

    /// Waits for the bootstrap to end (after [`Node::stop`], or when the join failed before the
    /// kubelet could start) and returns how the join went.
    pub fn wait(self) -> JoinOutcome {
        self.thread.join().unwrap_or_else(|_| JoinOutcome::Failed("the node bootstrap thread panicked".into()))
    }
}

fn bootstrap(root: &Path, join: &JoinConfig, shared: &Arc<Shared>, options: NodeOptions, log: &Log) -> JoinOutcome {
    let already = under(root, JOINED_MARKER).exists();
    let kubelet = find_program(root, "kubelet");
    if kubelet.is_none() {
        let consequence = if already { "" } else { " (kubeadm join waits for one until its timeout)" };
        log(&format!(
            "kubelet: the image has no kubelet (looked in {}): not starting it{consequence}",
            KUBEADM_DIRS.join(", ")
        ));
    }
    if !already && find_program(root, &command_line(join)[0]).is_some() {
        wait_for_cri(root, join, shared, options, log);
    }
    let (joined, join_done) = mpsc::channel::<()>();
    let watcher = kubelet.map(|program| {
        let (root, shared, log) = (root.to_path_buf(), shared.clone(), log.clone());
        std::thread::spawn(move || {
            let needed: &[&str] = if already { &[KUBELET_CONFIG] } else { &[KUBELET_CONFIG, KUBEADM_FLAGS] };
            if wait_for_files(&root, needed, &join_done, &shared, options.poll, &log) {
                supervise(&root, &program, &shared, &options, &log);
            }
        })
    });
    let report = join::run(root, join, &*shared.children, &|line| log(line));
    report.lines.iter().for_each(|line| log(line));
    drop(joined);
    if let Some(watcher) = watcher {
        let _ = watcher.join();
    }
    report.outcome
}

/// The CRI socket `config` (a kubeadm configuration) names: `criSocket: unix:///path`.
fn configured_cri_socket(config: &str) -> Option<String> {
    let value = config.lines().find_map(|l| l.trim().strip_prefix("criSocket:"))?;
    let value = value.trim().trim_matches(|c| c == '"' || c == '\'');
    let path = value.strip_prefix("unix://").unwrap_or(value);
    path.starts_with('/').then(|| path.to_string())
}

fn wait_for_cri(root: &Path, join: &JoinConfig, shared: &Shared, options: NodeOptions, log: &Log) {
    let sockets = configured_cri_socket(&join.config)
        .map_or_else(|| KNOWN_CRI_SOCKETS.iter().map(|s| s.to_string()).collect(), |s| vec![s]);
    let found = || sockets.iter().find(|s| under(root, s).exists());
    if found().is_some() {
        return;
    }
    log(&format!(
        "kubernetes: waiting up to {}s for the container runtime's socket ({}) before kubeadm join",
        options.cri_wait.as_secs(),
        sockets.join(" or ")
    ));
    let deadline = Instant::now() + options.cri_wait;
    loop {
        if shared.pause(options.poll) {
            return;
        }
        if let Some(socket) = found() {
            return log(&format!("kubernetes: the container runtime's socket {socket} is there"));
        }
        if Instant::now() >= deadline {
            return log("kubernetes: no container runtime socket appeared: running kubeadm join anyway");
        }
    }
}

/// Polls for `needed` until they are all written (true), the join ended without them or a stop
/// (false). While the join runs, written means not empty and unchanged over one poll: kubeadm
/// creates a file before it writes it, and a kubelet started in between would miss its flags.
fn wait_for_files(
    root: &Path,
    needed: &[&str],
    join_done: &mpsc::Receiver<()>,
    shared: &Shared,
    poll: Duration,
    log: &Log,
) -> bool {
    let exist = || needed.iter().all(|p| under(root, p).exists());
    let sizes_and_times = || {
        let file = |p: &&str| std::fs::metadata(under(root, p)).ok().filter(|m| m.len() > 0);
        needed.iter().map(|p| file(p).map(|m| (m.len(), m.modified().ok()))).collect::<Option<Vec<_>>>()
    };
    let mut last = None;
    loop {
        if shared.lock().stopping {
            return false;
        }
        let now = sizes_and_times();
        if now.is_some() && now == last {
            return true;
        }
        last = now;
        match join_done.recv_timeout(poll) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                // kubeadm has ended: what it wrote is complete.
                if exist() {
                    return true;
                }
                log(&format!(
                    "kubelet: no {} (kubeadm join did not write it): not starting the kubelet",
                    needed.join(" and ")
                ));
                return false;
            }
        }
    }
}

/// Runs the kubelet until a stop, starting it again `restart_delay` after each exit.
fn supervise(root: &Path, program: &Path, shared: &Shared, options: &NodeOptions, log: &Log) {
    let restart_delay = options.restart_delay;
    let shown = Path::new("/").join(program.strip_prefix(root).unwrap_or(program));
    let again = format!("starting it again in {}s", restart_delay.as_secs_f32());
    for start in 1.. {
        let mut state = shared.lock();
        if state.stopping {
            return;
        }
        let spawned = kubelet::args(root).and_then(|args| {
            let (cmd, copy) = kubelet::command(root, program, &args, start, options.kubelet_log_max)?;
            Ok((args, cmd, copy))
        });
        // The spawn happens under the lock, so a stop either comes first or sees the pid.
        let started = spawned.map_err(|e| chain(&e)).and_then(|(args, mut cmd, copy)| {
            let child =
                shared.children.spawn(&mut cmd).map_err(|e| format!("cannot start {}: {e}", shown.display()))?;
            state.kubelet = Some(child.id());
            Ok((args, child.id(), copy))
        });
        drop(state);
        let (pid, copy) = match started {
            Ok((args, pid, copy)) => {
                let line = format!("{} {}", shown.display(), args.args.join(" "));
                log(&format!("kubelet: started (pid {pid}, start {start}, output in {KUBELET_LOG}): {line}"));
                (pid, copy)
            }
            Err(e) => {
                log(&format!("kubelet: cannot start it: {e}; {again}"));
                if shared.pause(restart_delay) {
                    return;
                }
                continue;
            }
        };
        let status = shared.children.wait(pid);
        // Its last words reach the log before the exit is told (unless a process it left behind
        // still holds the output).
        let drained = Instant::now() + LOG_DRAIN;
        while !copy.is_finished() && Instant::now() < drained {
            std::thread::sleep(Duration::from_millis(10));
        }
        let stopping = {
            let mut state = shared.lock();
            state.kubelet = None;
            state.stopping
        };
        let how = match status {
            Ok(status) => status.to_string(),
            Err(e) => format!("its exit could not be learnt: {e}"),
        };
        if stopping {
            return log(&format!("kubelet: stopped ({how})"));
        }
        log(&format!("kubelet: exited ({how}); {again}"));
        if shared.pause(restart_delay) {
            return;
        }
    }
}

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;
