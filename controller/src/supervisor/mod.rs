//! The VM process supervisor: one `ignite vmm run` process per VM, watched through its pidfd, with a
//! per-VM run directory ([`VmDir`]: its configuration, console and VMM logs, sockets, exit record,
//! pid, jail record with the VM's uid, and the empty mount point of the jail's root). The directory stays root's: the jailed VMM opens what
//! it needs there before it drops its privileges and cannot reach the directory afterwards.
//!
//! The supervisor only reports exits (on [`Supervisor::exits`]); the reconciler decides about restarts.
//! VM processes live in their own process group and survive the daemon: a new supervisor on the same
//! run directory re-adopts them with [`Supervisor::adopt`], checking the recorded start time and the
//! command line so a recycled pid is never adopted.

mod jail;
mod proc;
mod watch;

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};
use serde_json::Value;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use vmm_core::control::{self, ClientError, Reply, Request, VmState};
use vmm_core::{ConsoleConfig, ExitReason, VmConfig};

use crate::layout::VmDir;

pub use jail::{JailPolicy, DEFAULT_UIDS};
pub use proc::ProcInfo;
pub use vmm_core::jail::cgroup::{CgroupVersion, Cgroups};

/// Where the supervisor keeps its state and which binary it runs.
#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    /// The directory holding one sub-directory per VM (`<root>/vms`).
    pub run_dir: PathBuf,
    /// The `ignite` binary whose `vmm run` subcommand runs a VM.
    pub ignite_bin: PathBuf,
    /// How VMMs are jailed; `None` runs them unjailed as the daemon's user (`--no-jail`, debugging only).
    pub jail: Option<JailPolicy>,
    /// The cap on each VM's `console.log` and `vmm.log` (each rotated keeping one old file).
    pub log_max_bytes: u64,
}

impl SupervisorConfig {
    /// A supervisor over `run_dir` running `ignite_bin`, jailing VMMs with the default policy.
    pub fn new(run_dir: PathBuf, ignite_bin: PathBuf) -> SupervisorConfig {
        SupervisorConfig {
            run_dir,
            ignite_bin,
            jail: Some(JailPolicy::default()),
            log_max_bytes: DEFAULT_LOG_MAX_BYTES,
        }
    }
}

/// The default cap on a VM's console and VMM logs.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 16 << 20;

/// How a VM process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmExit {
    /// The VM's name.
    pub name: String,
    /// Why: from the VMM's exit file, or [`ExitReason::Crash`] when the VMM process died without one.
    pub reason: ExitReason,
    /// The VMM process's exit status, when known.
    pub code: Option<i32>,
    /// The signal that killed the VMM process, when known.
    pub signal: Option<i32>,
    /// The end of the console log.
    pub console_tail: String,
}

/// What [`Supervisor::adopt`] found in the run directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdoptReport {
    /// VMs whose process is alive and now supervised.
    pub adopted: Vec<String>,
    /// VMs that ended while no supervisor watched them.
    pub exited: Vec<VmExit>,
    /// Run directories with neither a live process nor an exit record.
    pub stale: Vec<String>,
}

/// Things under the run directory, or VMM processes, that the store does not know.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Orphans {
    /// Run directories of unknown VMs.
    pub dirs: Vec<String>,
    /// Live VMM processes serving a socket under the run directory, for unknown VMs: (pid, name).
    pub processes: Vec<(i32, String)>,
}

/// The answer to a status request.
#[derive(Clone, Debug, PartialEq)]
pub struct VmStatus {
    /// Running or paused.
    pub state: VmState,
    /// Milliseconds since the VM started.
    pub uptime_ms: u64,
    /// The engine's counters, as the VMM reported them.
    pub counters: Value,
}

/// A supervisor failure, naming the VM or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A file or directory operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The VMM process could not be started.
    #[error("cannot start the vmm process for vm {name} ({})", bin.display())]
    Spawn {
        /// The VM.
        name: String,
        /// The binary.
        bin: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A pidfd or signal operation failed.
    #[error("cannot {action} the vmm process of vm {name}")]
    Process {
        /// The VM.
        name: String,
        /// What was attempted.
        action: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The VM has a live process already.
    #[error("vm {0} is already running")]
    AlreadyRunning(String),
    /// The VM has no live supervised process.
    #[error("vm {0} is not running")]
    NotRunning(String),
    /// The VM's process is still alive.
    #[error("vm {0} still has a live process")]
    StillRunning(String),
    /// A VM's jail could not be prepared.
    #[error("cannot jail the vmm: {0}")]
    Jail(String),
    /// The VMM refused a control request or could not be reached.
    #[error("vm {name} control request {op} failed: {error}")]
    Control {
        /// The VM.
        name: String,
        /// The request.
        op: &'static str,
        /// The VMM's error message.
        error: String,
    },
}

type Result<T> = std::result::Result<T, SupervisorError>;

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SupervisorError {
    let path = path.to_owned();
    move |source| SupervisorError::Io { action, path, source }
}

struct Tracked {
    info: ProcInfo,
    pidfd: Arc<OwnedFd>,
}

/// How long a control request may take beyond its own grace period.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a VMM may take to write a snapshot (guest memory of up to tens of GiB to disk).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs and watches VM processes. Dropping it leaves the VMs running.
pub struct Supervisor {
    config: SupervisorConfig,
    cgroups: Option<Cgroups>,
    /// Serializes uid allocation.
    jail_lock: Mutex<()>,
    vms: Mutex<HashMap<String, Tracked>>,
    exits_tx: UnboundedSender<VmExit>,
    exits_rx: Mutex<Option<UnboundedReceiver<VmExit>>>,
    // Watchers poll the peer: dropping this end tells them to stop without reaping.
    _shutdown: UnixStream,
    shutdown_peer: UnixStream,
}

/// The cgroup scope of the VMs under `run_dir`: a short hash of the path, so two daemons with
/// different roots never share a VM's cgroup.
fn cgroup_scope(run_dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same path gives the same scope in every process and release.
    #[allow(deprecated)]
    let mut hasher = std::hash::SipHasher::new();
    run_dir.hash(&mut hasher);
    format!("{:08x}", hasher.finish() as u32)
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Supervisor {
    /// A supervisor over `config.run_dir` (created if missing). Call [`Supervisor::adopt`] next.
    pub fn new(config: SupervisorConfig) -> Result<Supervisor> {
        std::fs::create_dir_all(&config.run_dir).map_err(io_err("create", &config.run_dir))?;
        let (shutdown, shutdown_peer) =
            UnixStream::pair().map_err(io_err("create a socket pair for", &config.run_dir))?;
        let (exits_tx, exits_rx) = unbounded_channel();
        let cgroups = if config.jail.is_some() { Cgroups::detect(&cgroup_scope(&config.run_dir)) } else { None };
        if config.jail.is_some() && cgroups.is_none() {
            tracing::warn!("no usable cgroups (v2 with memory, cpu and pids, or those v1 hierarchies): VMs run without cgroup limits");
        }
        Ok(Supervisor {
            config,
            cgroups,
            jail_lock: Mutex::new(()),
            vms: Mutex::new(HashMap::new()),
            exits_tx,
            exits_rx: Mutex::new(Some(exits_rx)),
            _shutdown: shutdown,
            shutdown_peer,
        })
    }

    /// The stream of VM process exits (only the first call gets it).
    pub fn exits(&self) -> Option<UnboundedReceiver<VmExit>> {
        locked(&self.exits_rx).take()
    }

    /// The run directory of VM `name`.
    pub fn vm_dir(&self, name: &str) -> VmDir {
        VmDir::new(&self.config.run_dir, name)
    }

    /// Starts VM `name` from `config` in its own process group. Its console is forced to its run
    /// directory's console log and socket, its vsock device (if any) to its vsock socket ([`VmDir`]).
    pub fn spawn(&self, name: &str, config: &VmConfig) -> Result<ProcInfo> {
        if self.is_running(name) {
            return Err(SupervisorError::AlreadyRunning(name.to_string()));
        }
        let dir = self.vm_dir(name);
        std::fs::create_dir_all(dir.path()).map_err(io_err("create", dir.path()))?;
        let [control, console, vsock] = dir.sockets();
        for path in [dir.exit_record(), dir.pid(), control, console, vsock] {
            match std::fs::remove_file(&path) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(io_err("remove", &path)(err)),
                _ => {}
            }
        }
        let mut config = config.clone();
        config.console = ConsoleConfig::File(dir.console_log());
        config.console_socket = Some(dir.console_socket());
        config.console_max_bytes = Some(self.config.log_max_bytes);
        if let Some(vsock) = &mut config.vsock {
            vsock.uds_path = dir.vsock_socket();
        }
        config.jail = match &self.config.jail {
            Some(policy) => {
                let _lock = locked(&self.jail_lock);
                Some(jail::prepare(&self.config.run_dir, name, &config, policy, self.cgroups.as_ref())?)
            }
            None => None,
        };
        if let Some(snapshots) = &config.snapshot_dir {
            // The VMM saves there, jailed as the VM's uid: the directory is the VM's alone.
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(snapshots)
                .map_err(io_err("create", snapshots))?;
            if let Some(jail) = &config.jail {
                std::os::unix::fs::chown(snapshots, Some(jail.uid), Some(jail.gid))
                    .map_err(io_err("give the jail", snapshots))?;
            }
        }
        let config_path = dir.config();
        let text = serde_json::to_string_pretty(&config).map_err(|e| io_err("serialize", &config_path)(e.into()))?;
        std::fs::write(&config_path, text).map_err(io_err("write", &config_path))?;
        let log_path = dir.vmm_log();
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .truncate(false)
            .open(&log_path)
            .and_then(|f| f.set_len(0).map(|()| f))
            .map_err(io_err("create", &log_path))?;
        let mut args: Vec<OsString> = vec![
            "vmm".into(),
            "run".into(),
            "--config".into(),
            config_path.into(),
            "--control-socket".into(),
            dir.control_socket().into(),
            "--exit-file".into(),
            dir.exit_record().into(),
            "--log-file".into(),
            log_path.into(),
        ];
        if config.jail.is_none() {
            args.push("--no-jail".into());
        }
        let env = vmm_core::jail::vmm_environment();
        let spec = vmm_core::jail::SpawnSpec {
            program: &self.config.ignite_bin,
            args: &args,
            env: &env,
            stdout: Some(log.as_fd()),
            stderr: Some(log.as_fd()),
            namespaces: config.jail.is_some(),
            // Its own process group: a Ctrl-C to the daemon's terminal never reaches the VM.
            process_group: true,
            // No lifeline: a VMM outlives a daemon restart, which adopts it.
            fd3: None,
        };
        let (pid, pidfd) = vmm_core::jail::spawn(&spec).map_err(|source| SupervisorError::Spawn {
            name: name.into(),
            bin: self.config.ignite_bin.clone(),
            source,
        })?;
        // The child is reaped by its watcher through the pidfd.
        // A child that already exited is a zombie with the same start time: still its identity.
        let started_at = proc::stat(pid).map(|s| s.started_at).unwrap_or(0);
        let info = ProcInfo { pid, started_at };
        let pid_path = dir.pid();
        let tmp = pid_path.with_extension("tmp");
        std::fs::write(&tmp, format!("{pid} {started_at}\n")).map_err(io_err("write", &tmp))?;
        std::fs::rename(&tmp, &pid_path).map_err(io_err("write", &pid_path))?;
        tracing::info!(vm = name, pid, "vm process started");
        self.track(name, info, pidfd)?;
        Ok(info)
    }

    fn track(&self, name: &str, info: ProcInfo, pidfd: OwnedFd) -> Result<()> {
        let pidfd = Arc::new(pidfd);
        let shutdown = self.shutdown_peer.try_clone().map_err(|source| SupervisorError::Process {
            name: name.into(),
            action: "watch",
            source,
        })?;
        let (vm, dir, fd, tx) = (name.to_string(), self.vm_dir(name), pidfd.clone(), self.exits_tx.clone());
        std::thread::Builder::new()
            .name(format!("watch-{name}"))
            .spawn(move || watch::watch(vm, &dir, fd, shutdown, tx))
            .map_err(|source| SupervisorError::Process { name: name.into(), action: "watch", source })?;
        locked(&self.vms).insert(name.to_string(), Tracked { info, pidfd });
        Ok(())
    }

    /// Re-adopts the VM processes of a previous supervisor and reports those that ended meanwhile.
    pub fn adopt(&self) -> Result<AdoptReport> {
        let mut report = AdoptReport::default();
        for name in self.dir_names()? {
            if locked(&self.vms).contains_key(&name) {
                continue;
            }
            let dir = self.vm_dir(&name);
            let recorded = std::fs::read_to_string(dir.pid()).ok().and_then(|t| parse_pid_file(&t));
            let live = recorded.and_then(|info| proc::stat(info.pid).filter(|s| s.started_at == info.started_at));
            match (recorded, live) {
                (Some(info), Some(stat)) if stat.state != 'Z' => {
                    if !proc::is_vmm_for(&proc::cmdline(info.pid), &dir.control_socket()) {
                        tracing::warn!(vm = %name, pid = info.pid, "pid file names another program");
                        report.stale.push(name);
                        continue;
                    }
                    let pidfd = open_pidfd(&name, info.pid)?;
                    self.track(&name, info, pidfd)?;
                    tracing::info!(vm = %name, pid = info.pid, "vm process adopted");
                    report.adopted.push(name);
                }
                (Some(info), Some(_zombie)) => {
                    // Our own child that ended: reap it and report it.
                    let status = open_pidfd(&name, info.pid).ok().and_then(|fd| watch::reap(&fd));
                    report.exited.push(watch::exit_report(name, &dir, status));
                }
                _ if dir.exit_record().exists() => report.exited.push(watch::exit_report(name, &dir, None)),
                _ => report.stale.push(name),
            }
        }
        Ok(report)
    }

    /// The host's cgroups as VMs use them (`None`: not detected, or VMs are not jailed).
    pub fn cgroups(&self) -> Option<&Cgroups> {
        self.cgroups.as_ref()
    }

    /// Whether VMMs run jailed.
    pub fn jailed(&self) -> bool {
        self.config.jail.is_some()
    }

    /// Whether VM `name` has a live supervised process.
    pub fn is_running(&self, name: &str) -> bool {
        locked(&self.vms).get(name).is_some_and(|t| !watch::has_ended(&t.pidfd))
    }

    /// The process of VM `name`, when supervised.
    pub fn proc_info(&self, name: &str) -> Option<ProcInfo> {
        locked(&self.vms).get(name).map(|t| t.info)
    }

    fn live_pidfd(&self, name: &str) -> Result<Arc<OwnedFd>> {
        locked(&self.vms)
            .get(name)
            .filter(|t| !watch::has_ended(&t.pidfd))
            .map(|t| t.pidfd.clone())
            .ok_or_else(|| SupervisorError::NotRunning(name.to_string()))
    }

    fn signal(&self, name: &str, pidfd: &OwnedFd, signal: Signal) -> Result<()> {
        match pidfd_send_signal(pidfd, signal) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(err) => Err(SupervisorError::Process { name: name.into(), action: "signal", source: err.into() }),
        }
    }

    fn control(&self, name: &str, op: &'static str, request: Request, timeout: Duration) -> Result<Option<Reply>> {
        match control::request(&self.vm_dir(name).control_socket(), &request, timeout) {
            Ok(reply) => Ok(Some(reply)),
            Err(ClientError::Refused(error)) => Err(SupervisorError::Control { name: name.into(), op, error }),
            Err(ClientError::Unreachable(err)) => {
                tracing::warn!(vm = name, op, %err, "control socket unreachable; using signals");
                Ok(None)
            }
        }
    }

    /// Stops VM `name`: Ctrl-Alt-Del, then force after `grace` (SIGTERM/SIGKILL when the control socket
    /// is dead). Returns once the process has ended; the exit is reported on [`Supervisor::exits`].
    pub fn stop(&self, name: &str, grace: Duration) -> Result<()> {
        let pidfd = self.live_pidfd(name)?;
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        if self.control(name, "stop", Request::Stop { grace_ms }, CONTROL_TIMEOUT)?.is_none() {
            self.signal(name, &pidfd, Signal::TERM)?;
        }
        if !watch::wait_ended(&pidfd, grace + CONTROL_TIMEOUT) {
            tracing::warn!(vm = name, "vm process did not stop; killing it");
            self.signal(name, &pidfd, Signal::KILL)?;
            watch::wait_ended(&pidfd, CONTROL_TIMEOUT);
        }
        Ok(())
    }

    /// Stops VM `name` at once (SIGKILL when the control socket is dead) and waits for the process to end.
    pub fn kill(&self, name: &str) -> Result<()> {
        let pidfd = self.live_pidfd(name)?;
        if self.control(name, "kill", Request::Kill, CONTROL_TIMEOUT)?.is_none() {
            self.signal(name, &pidfd, Signal::KILL)?;
        }
        if !watch::wait_ended(&pidfd, CONTROL_TIMEOUT) {
            self.signal(name, &pidfd, Signal::KILL)?;
            watch::wait_ended(&pidfd, CONTROL_TIMEOUT);
        }
        Ok(())
    }

    /// Pauses VM `name`'s vCPUs (SIGSTOP to the process when the control socket is dead).
    pub fn pause(&self, name: &str) -> Result<()> {
        let pidfd = self.live_pidfd(name)?;
        if self.control(name, "pause", Request::Pause, CONTROL_TIMEOUT)?.is_none() {
            self.signal(name, &pidfd, Signal::STOP)?;
        }
        Ok(())
    }

    /// Resumes VM `name` (SIGCONT when the control socket is dead).
    pub fn resume(&self, name: &str) -> Result<()> {
        let pidfd = self.live_pidfd(name)?;
        if self.control(name, "resume", Request::Resume, CONTROL_TIMEOUT)?.is_none() {
            self.signal(name, &pidfd, Signal::CONT)?;
        }
        Ok(())
    }

    /// Has VM `name`'s VMM save its machine state and memory as `snapshot` in its snapshot
    /// directory (the VM runs on, or stays paused). Returns the bytes of memory saved.
    pub fn snapshot(&self, name: &str, snapshot: &str) -> Result<u64> {
        self.live_pidfd(name)?;
        let request = Request::Snapshot { name: snapshot.to_string() };
        let reply = self.control(name, "snapshot", request, SNAPSHOT_TIMEOUT)?.ok_or_else(|| {
            SupervisorError::Control { name: name.into(), op: "snapshot", error: "control socket unreachable".into() }
        })?;
        Ok(reply.memory_bytes.unwrap_or_default())
    }

    /// The state, uptime and counters of VM `name`, from its VMM.
    pub fn status(&self, name: &str) -> Result<VmStatus> {
        self.live_pidfd(name)?;
        let reply = self.control(name, "status", Request::Status, CONTROL_TIMEOUT)?.ok_or_else(|| {
            SupervisorError::Control { name: name.into(), op: "status", error: "control socket unreachable".into() }
        })?;
        Ok(VmStatus {
            state: reply.state.unwrap_or(VmState::Running),
            uptime_ms: reply.uptime_ms.unwrap_or_default(),
            counters: reply.counters.unwrap_or_default(),
        })
    }

    /// Removes VM `name`'s run directory once its process is gone (a no-op when there is none).
    pub fn cleanup(&self, name: &str) -> Result<()> {
        if self.is_running(name) {
            return Err(SupervisorError::StillRunning(name.to_string()));
        }
        locked(&self.vms).remove(name);
        if let Some(cgroups) = &self.cgroups {
            cgroups.remove(name).map_err(|e| SupervisorError::Jail(format!("vm {name}: {e}: {}", e.source)))?;
        }
        let dir = self.vm_dir(name);
        match std::fs::remove_dir_all(dir.path()) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", dir.path())(err)),
            _ => Ok(()),
        }
    }

    /// Run directories and live VMM processes (under this run directory) whose VM is not in `known`.
    pub fn list_orphans(&self, known: &[String]) -> Result<Orphans> {
        let mut orphans = Orphans {
            dirs: self.dir_names()?.into_iter().filter(|n| !known.contains(n)).collect(),
            ..Orphans::default()
        };
        let proc_dir = Path::new("/proc");
        for entry in std::fs::read_dir(proc_dir).map_err(io_err("list", proc_dir))?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            let args = proc::cmdline(pid);
            let Some(socket) = proc::control_socket_of(&args).map(Path::new) else { continue };
            let (Some(parent), Some(vm)) = (socket.parent(), socket.parent().and_then(Path::file_name)) else {
                continue;
            };
            let vm = vm.to_string_lossy().into_owned();
            if parent.parent() == Some(self.config.run_dir.as_path()) && !known.contains(&vm) {
                orphans.processes.push((pid, vm));
            }
        }
        // Cgroups of VMs whose run directory is gone already (a crash between the two removals).
        let cgroups = self.cgroups.as_ref().map(Cgroups::names).unwrap_or_default();
        orphans.dirs.extend(cgroups.into_iter().filter(|n| !known.contains(n)));
        orphans.dirs.sort();
        orphans.dirs.dedup();
        orphans.processes.sort();
        Ok(orphans)
    }

    fn dir_names(&self) -> Result<Vec<String>> {
        let run_dir = &self.config.run_dir;
        let mut names = Vec::new();
        for entry in std::fs::read_dir(run_dir).map_err(io_err("list", run_dir))? {
            let entry = entry.map_err(io_err("list", run_dir))?;
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }
}

fn open_pidfd(name: &str, pid: i32) -> Result<OwnedFd> {
    let not_found = || std::io::Error::from(std::io::ErrorKind::NotFound);
    let pid = Pid::from_raw(pid).ok_or_else(|| SupervisorError::Process {
        name: name.into(),
        action: "open a pidfd for",
        source: not_found(),
    })?;
    pidfd_open(pid, PidfdFlags::empty()).map_err(|err| SupervisorError::Process {
        name: name.into(),
        action: "open a pidfd for",
        source: err.into(),
    })
}

fn parse_pid_file(text: &str) -> Option<ProcInfo> {
    let mut fields = text.split_whitespace();
    let pid = fields.next()?.parse().ok()?;
    let started_at = fields.next()?.parse().ok()?;
    Some(ProcInfo { pid, started_at })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_files_need_both_fields() {
        assert_eq!(parse_pid_file("12 345\n"), Some(ProcInfo { pid: 12, started_at: 345 }));
        assert_eq!(parse_pid_file("12\n"), None);
        assert_eq!(parse_pid_file("x 1"), None);
    }

    #[test]
    fn an_empty_run_dir_has_nothing_to_adopt_and_unknown_dirs_are_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::new(SupervisorConfig::new(dir.path().join("vms"), "/bin/false".into())).unwrap();
        assert_eq!(sup.adopt().unwrap(), AdoptReport::default());
        std::fs::create_dir(sup.vm_dir("ghost").path()).unwrap();
        assert_eq!(sup.adopt().unwrap().stale, ["ghost"]);
        assert_eq!(sup.list_orphans(&[]).unwrap().dirs, ["ghost"]);
        assert!(sup.list_orphans(&["ghost".into()]).unwrap().dirs.is_empty());
        assert!(matches!(sup.stop("ghost", Duration::ZERO), Err(SupervisorError::NotRunning(_))));
        sup.cleanup("ghost").unwrap();
        sup.cleanup("ghost").unwrap();
        assert!(!sup.vm_dir("ghost").path().exists());
    }
}
