//! The VMM process's lifecycle: what one `ignite vmm run` process promises whoever started it (the
//! daemon's supervisor, or a user at a terminal). The binary only parses its arguments and calls
//! [`run`]; everything the parent relies on is here:
//!
//! - **signals**: the first SIGINT or SIGTERM asks the guest to shut down (Ctrl-Alt-Del) and gives
//!   it [`RunOptions::stop_timeout`]; a second one stops it at once;
//! - **control requests** on [`RunOptions::control_socket`] ([`crate::control`]): status, pause,
//!   resume, stop with a grace period, kill. The socket keeps answering while a graceful stop runs,
//!   so a later `kill` or a shorter stop takes effect;
//! - **the lifeline** ([`RunOptions::lifeline`]): a pipe whose other end only the parent holds; when
//!   the parent dies (even by SIGKILL) the VM is stopped as if by SIGTERM, so a killed launcher never
//!   leaves a VMM behind;
//! - **the exit file** ([`RunOptions::exit_file`]): one [`ExitRecord`] (why the VM ended and the
//!   process's exit status), written before the process exits, also when the VM could not start;
//! - **exit statuses** ([`exit_code`]): the guest's own code when it powered off through the ignite
//!   power port, 0 on a reset, [`EXIT_VMM_ERROR`], [`EXIT_GUEST_CRASH`] or [`EXIT_STOPPED`].

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::{self, Action, ControlListener, ExitRecord};
use crate::{ExitReason, Vm, VmConfig, VmCounters, VmError};

/// Exit status: the VM could not be built or the VMM failed (bad kernel, missing file, no /dev/kvm).
pub const EXIT_VMM_ERROR: u8 = 125;
/// Exit status: the guest crashed (triple fault, an instruction the engine cannot run).
pub const EXIT_GUEST_CRASH: u8 = 126;
/// Exit status: the VM was stopped from outside (Ctrl-C, SIGTERM, a control request, its parent gone).
pub const EXIT_STOPPED: u8 = 130;

/// The exit status a VMM process ending for `reason` exits with.
pub fn exit_code(reason: &ExitReason) -> u8 {
    match reason {
        ExitReason::PowerOff { code } => *code,
        ExitReason::Reset => 0,
        ExitReason::Stopped => EXIT_STOPPED,
        ExitReason::Crash { .. } => EXIT_GUEST_CRASH,
        ExitReason::Error { .. } => EXIT_VMM_ERROR,
    }
}

/// How [`run`] runs one VM.
#[derive(Debug)]
pub struct RunOptions {
    /// Serve the control protocol on this unix socket.
    pub control_socket: Option<PathBuf>,
    /// Write the [`ExitRecord`] here before returning.
    pub exit_file: Option<PathBuf>,
    /// How long a stop by signal waits for the guest to shut down.
    pub stop_timeout: Duration,
    /// The read end of the parent's lifeline pipe: its end of file means the parent is gone.
    pub lifeline: Option<OwnedFd>,
    /// When the process started (for [`Finished::process_to_vm_start`]).
    pub process_start: Instant,
}

/// How the VM ended, once [`run`] returns.
#[derive(Clone, Debug)]
pub struct Finished {
    /// What was written to the exit file.
    pub record: ExitRecord,
    /// The engine's counters at the end.
    pub counters: VmCounters,
    /// From the process's start to [`Vm::start`].
    pub process_to_vm_start: Duration,
}

impl Finished {
    /// The start-up timings and exit counters as one JSON object (what `--timings` prints).
    pub fn timings(&self) -> serde_json::Value {
        let first_run = self.counters.time_to_first_run.map(|t| (self.process_to_vm_start + t).as_secs_f64() * 1e3);
        serde_json::json!({
            "exit": self.record.exit,
            "processToVmStartMs": self.process_to_vm_start.as_secs_f64() * 1e3,
            "processToFirstKvmRunMs": first_run,
            "counters": self.counters,
        })
    }
}

/// Why [`run`] could not run the VM (the exit file says so too, with [`EXIT_VMM_ERROR`]).
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The exit file could not be opened before the jail.
    #[error("cannot open the exit file {path}")]
    ExitFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The signal handlers could not be installed.
    #[error("cannot install the signal handlers")]
    Signals(#[source] std::io::Error),
    /// The control socket could not be bound or served.
    #[error("cannot serve the control socket {path}")]
    ControlSocket {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VM could not be built.
    #[error("cannot start a vm {}", start_what(.kernel, .snapshot.as_deref()))]
    Start {
        /// The kernel it was to boot.
        kernel: PathBuf,
        /// The snapshot it was to resume from instead ([`VmConfig::restore_from`]).
        snapshot: Option<PathBuf>,
        /// Why.
        #[source]
        source: VmError,
    },
    /// The main thread's seccomp filter could not be installed.
    #[error("cannot confine the vmm's main thread")]
    Seccomp(#[source] crate::jail::JailError),
}

/// What [`ProcessError::Start`] was starting: a boot of `kernel`, or a resume from `snapshot`.
fn start_what(kernel: &std::path::Path, snapshot: Option<&std::path::Path>) -> String {
    match snapshot {
        Some(dir) => format!("from the snapshot {}", dir.display()),
        None => format!("with kernel {}", kernel.display()),
    }
}

/// Runs the VM `config` describes until it ends, with the lifecycle described in the module
/// documentation, and records how it ended in the exit file. On an error the VM is gone and the exit
/// file says why.
pub fn run(config: &VmConfig, options: RunOptions) -> Result<Finished, ProcessError> {
    // A jailed VMM opens its exit file now: its path is out of reach once the jail is entered.
    let mut exit_file = ExitFile::new(options.exit_file.as_deref(), config.jail.is_some())?;
    let result = run_vm(config, options);
    match &result {
        Ok(finished) => exit_file.write(&finished.record),
        Err(err) => exit_file.write(&error_record(err)),
    }
    result
}

/// The record of a VMM that failed with `err`.
pub fn error_record(err: &dyn std::error::Error) -> ExitRecord {
    let causes = std::iter::successors(Some(err), |e| e.source());
    let detail = causes.map(ToString::to_string).collect::<Vec<_>>().join(": ");
    ExitRecord { exit: ExitReason::Error { detail }, exit_code: i32::from(EXIT_VMM_ERROR) }
}

fn run_vm(config: &VmConfig, options: RunOptions) -> Result<Finished, ProcessError> {
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, interrupted.clone()).map_err(ProcessError::Signals)?;
    }
    let socket_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ProcessError::ControlSocket { path, source }
    };
    // Bound while the path is reachable; served once the process is jailed.
    let listener = match options.control_socket.as_deref() {
        Some(path) => Some((path, ControlListener::bind(path).map_err(socket_err(path))?)),
        None => None,
    };
    let mut lifeline = options.lifeline.map(Lifeline::new);
    let process_to_vm_start = options.process_start.elapsed();
    let handle = Vm::start(config).map_err(|source| ProcessError::Start {
        kernel: config.kernel.clone(),
        snapshot: config.restore_from.clone(),
        source,
    })?;
    // From here on an error must end the VM before it is reported.
    let control = match listener.map(|(path, l)| l.serve().map_err(socket_err(path))) {
        Some(Err(err)) => {
            tracing::debug!(reason = %handle.kill().reason, "vm stopped");
            return Err(err);
        }
        served => served.transpose().unwrap_or(None),
    };
    if let Err(err) = crate::jail::seccomp::apply(crate::jail::seccomp::ThreadKind::Main) {
        tracing::debug!(reason = %handle.kill().reason, "vm stopped");
        return Err(ProcessError::Seccomp(err));
    }
    // When a graceful stop was asked for: the moment to stop by force.
    let mut deadline: Option<Instant> = None;
    // Wait in short steps so signals, control requests, the lifeline and the deadline are noticed.
    while handle.exit_reason().is_none() {
        let mut action = Action::Continue;
        if interrupted.swap(false, Ordering::Relaxed) || lifeline.as_mut().is_some_and(Lifeline::broken) {
            if deadline.is_none() {
                eprintln!(
                    "ignite: stopping the guest (waiting up to {}s; interrupt again to stop it at once)",
                    options.stop_timeout.as_secs()
                );
                action = Action::Stop(options.stop_timeout);
            } else {
                eprintln!("ignite: stopping the guest at once");
                action = Action::Kill;
            }
        } else if let Some((_, requests)) = &control {
            if let Ok(cmd) = requests.recv_timeout(Duration::from_millis(100)) {
                let (reply, next) = control::apply(&handle, &cmd.request);
                // The requester may have gone away; the VM does not care.
                let _ = cmd.reply.send(reply);
                action = next;
            }
        } else {
            handle.wait_timeout(Duration::from_millis(100));
        }
        match action {
            Action::Continue => {}
            Action::Stop(grace) => {
                if deadline.is_none() {
                    handle.request_shutdown();
                }
                let asked = Instant::now() + grace;
                deadline = Some(deadline.map_or(asked, |d| d.min(asked)));
            }
            Action::Kill => handle.force_stop(),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) && handle.exit_reason().is_none() {
            tracing::info!("guest did not shut down in time; stopping it");
            handle.force_stop();
        }
    }
    let exit = handle.wait();
    drop(control);
    let exit_code = i32::from(exit_code(&exit.reason));
    Ok(Finished { record: ExitRecord { exit: exit.reason, exit_code }, counters: exit.counters, process_to_vm_start })
}

/// A close-on-exec pipe for [`RunOptions::lifeline`]: (read end for the child, write end the parent
/// keeps for as long as it lives).
pub fn lifeline_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned this descriptor, owned by nobody else.
    let read = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let write = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    Ok((read, write))
}

/// The read end of the parent's lifeline pipe, non-blocking.
struct Lifeline {
    pipe: std::fs::File,
    broken: bool,
}

impl Lifeline {
    fn new(fd: OwnedFd) -> Lifeline {
        use std::os::fd::AsRawFd;
        // SAFETY: F_GETFL on a descriptor this value owns.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags != -1 {
            // SAFETY: F_SETFL on the same descriptor.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
        }
        Lifeline { pipe: std::fs::File::from(fd), broken: false }
    }

    /// True once, when the parent's end has closed (the parent exited or was killed).
    fn broken(&mut self) -> bool {
        if self.broken {
            return false;
        }
        let mut byte = [0u8; 1];
        self.broken = match self.pipe.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(err) => err.kind() != std::io::ErrorKind::WouldBlock && err.kind() != std::io::ErrorKind::Interrupted,
        };
        if self.broken {
            eprintln!("ignite: the process that started this vmm is gone");
        }
        self.broken
    }
}

/// Where the exit record goes: written atomically by path, or into a file opened before the jail
/// (read only after this process is gone, so it needs no rename).
enum ExitFile {
    None,
    Path(PathBuf),
    Opened(std::fs::File),
}

impl ExitFile {
    fn new(path: Option<&Path>, jailed: bool) -> Result<ExitFile, ProcessError> {
        use std::os::unix::fs::OpenOptionsExt;
        Ok(match path {
            None => ExitFile::None,
            Some(path) if jailed => ExitFile::Opened(
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|source| ProcessError::ExitFile { path: path.to_owned(), source })?,
            ),
            Some(path) => ExitFile::Path(path.to_owned()),
        })
    }

    fn write(&mut self, record: &ExitRecord) {
        use std::io::Write;
        let result = match self {
            ExitFile::None => Ok(()),
            ExitFile::Path(path) => record.write_atomic(path),
            ExitFile::Opened(file) => serde_json::to_vec(record)
                .map_err(std::io::Error::other)
                .and_then(|bytes| file.write_all(&bytes))
                .and_then(|()| file.sync_all()),
        };
        if let Err(err) = result {
            eprintln!("error: cannot write the exit file: {err}");
        }
    }
}

/// Writes `record` to the exit file at `path` (for failures before [`run`], e.g. an unreadable config).
pub fn write_exit_file(path: &Path, record: &ExitRecord) {
    ExitFile::Path(path.to_owned()).write(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_reason() {
        assert_eq!(exit_code(&ExitReason::PowerOff { code: 3 }), 3);
        assert_eq!(exit_code(&ExitReason::Reset), 0);
        assert_eq!(exit_code(&ExitReason::Stopped), EXIT_STOPPED);
        assert_eq!(exit_code(&ExitReason::Crash { detail: "x".into() }), EXIT_GUEST_CRASH);
        assert_eq!(exit_code(&ExitReason::Error { detail: "x".into() }), EXIT_VMM_ERROR);
    }

    #[test]
    fn a_vm_that_cannot_start_leaves_an_error_record() {
        let dir = tempfile::tempdir().unwrap();
        let exit_file = dir.path().join("exit.json");
        let options = RunOptions {
            control_socket: None,
            exit_file: Some(exit_file.clone()),
            stop_timeout: Duration::from_secs(1),
            lifeline: None,
            process_start: Instant::now(),
        };
        let missing = dir.path().join("no-such-kernel");
        let err = run(&VmConfig::new(&missing), options).unwrap_err();
        assert!(matches!(err, ProcessError::Start { .. }), "{err:?}");
        assert!(err.to_string().contains("with kernel") && err.to_string().contains("no-such-kernel"), "{err}");
        let record: ExitRecord = serde_json::from_slice(&std::fs::read(&exit_file).unwrap()).unwrap();
        assert_eq!(record.exit_code, i32::from(EXIT_VMM_ERROR));
        let ExitReason::Error { detail } = record.exit else { panic!("{record:?}") };
        assert!(detail.contains("no-such-kernel"), "{detail}");

        // A resume names the snapshot it could not resume from, not an empty kernel path.
        let mut restore = VmConfig::new("");
        restore.restore_from = Some(dir.path().join("no-such-snapshot"));
        let options = RunOptions {
            control_socket: None,
            exit_file: None,
            stop_timeout: Duration::from_secs(1),
            lifeline: None,
            process_start: Instant::now(),
        };
        let err = run(&restore, options).unwrap_err().to_string();
        assert!(err.contains("from the snapshot") && err.contains("no-such-snapshot"), "{err}");
    }

    #[test]
    fn the_lifeline_breaks_when_the_write_end_closes() {
        let (read, write) = lifeline_pipe().unwrap();
        let mut lifeline = Lifeline::new(read);
        assert!(!lifeline.broken(), "the parent is alive");
        drop(write);
        assert!(lifeline.broken());
        assert!(!lifeline.broken(), "reported once");
    }
}
