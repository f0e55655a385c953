//! The per-VM control channel: a unix socket speaking JSON lines, served by a thread that forwards
//! each request to the loop owning the [`VmHandle`], plus the exit record a VMM process leaves behind.
//!
//! Requests ([`Request`]): `{"op":"status"}`, `{"op":"pause"}`, `{"op":"resume"}`,
//! `{"op":"stop","graceMs":N}`, `{"op":"kill"}`, `{"op":"snapshot","name":"N"}`. Replies: `{"ok":true,...}` with the fields of a
//! [`Reply`], or `{"ok":false,"error":"..."}`, one line each. [`request`] is the client (the
//! supervisor's), so both ends of the protocol live here.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{ExitReason, VmHandle};

/// One control request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase", deny_unknown_fields)]
pub enum Request {
    /// State, uptime and counters.
    Status,
    /// Park every vCPU.
    Pause,
    /// Let parked vCPUs run again.
    Resume,
    /// Ctrl-Alt-Del, then force after `grace_ms`.
    Stop {
        /// Milliseconds the guest gets to shut down.
        #[serde(rename = "graceMs", default)]
        grace_ms: u64,
    },
    /// Stop at once.
    Kill,
    /// Save the VM as `name` in its snapshot directory ([`crate::VmHandle::snapshot_named`]); the VM
    /// runs on (or stays paused).
    Snapshot {
        /// The snapshot's name.
        name: String,
    },
}

/// What a VM is doing, as a reply reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum VmState {
    /// The vCPUs run.
    Running,
    /// Every vCPU is parked.
    Paused,
    /// A stop or kill was accepted; the process is ending.
    Stopping,
}

/// The fields of a successful reply; `status` sets all of them, the other requests `state` only.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    /// The VM's state after the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
    /// Milliseconds since the VM started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// The VM's exit and device counters ([`crate::VmCounters`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<Value>,
    /// Bytes of guest memory a `snapshot` wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

impl Reply {
    fn state(state: VmState) -> Reply {
        Reply { state: Some(state), ..Reply::default() }
    }
}

/// A request received on the socket, with the channel its reply goes to.
pub struct Command {
    /// What was asked.
    pub request: Request,
    /// Where the reply goes: `Ok(reply)` becomes `{"ok":true,...}`, `Err(msg)` an error reply.
    pub reply: Sender<Result<Reply, String>>,
}

/// What the owner of the VM must do after answering a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Keep running.
    Continue,
    /// Stop gracefully within the grace period.
    Stop(Duration),
    /// Stop at once.
    Kill,
}

/// Answers `request` for `vm` and says what to do next.
pub fn apply(vm: &VmHandle, request: &Request) -> (Result<Reply, String>, Action) {
    match request {
        Request::Status => {
            let counters = vm.counters();
            let state = if vm.is_paused() { VmState::Paused } else { VmState::Running };
            let reply = Reply {
                state: Some(state),
                uptime_ms: Some(u64::try_from(counters.uptime.as_millis()).unwrap_or(u64::MAX)),
                counters: serde_json::to_value(counters).ok(),
                memory_bytes: None,
            };
            (Ok(reply), Action::Continue)
        }
        Request::Pause => match vm.pause() {
            Ok(()) => (Ok(Reply::state(VmState::Paused)), Action::Continue),
            Err(err) => (Err(err.to_string()), Action::Continue),
        },
        Request::Resume => match vm.resume() {
            Ok(()) => (Ok(Reply::state(VmState::Running)), Action::Continue),
            Err(err) => (Err(err.to_string()), Action::Continue),
        },
        Request::Stop { grace_ms } => {
            (Ok(Reply::state(VmState::Stopping)), Action::Stop(Duration::from_millis(*grace_ms)))
        }
        Request::Kill => (Ok(Reply::state(VmState::Stopping)), Action::Kill),
        Request::Snapshot { name } => match vm.snapshot_named(name) {
            Ok(bytes) => {
                let state = if vm.is_paused() { VmState::Paused } else { VmState::Running };
                (Ok(Reply { memory_bytes: Some(bytes), ..Reply::state(state) }), Action::Continue)
            }
            Err(err) => (Err(err.to_string()), Action::Continue),
        },
    }
}

/// Why a control request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached or the connection broke: the VMM is gone or stuck.
    #[error("control socket unreachable: {0}")]
    Unreachable(#[source] std::io::Error),
    /// The VMM answered with an error (or an answer that is not a reply).
    #[error("{0}")]
    Refused(String),
}

/// Sends `request` on the control socket at `socket` and returns the reply, waiting at most `timeout`
/// for it.
pub fn request(socket: &Path, request: &Request, timeout: Duration) -> Result<Reply, ClientError> {
    let stream = UnixStream::connect(socket).map_err(ClientError::Unreachable)?;
    stream.set_read_timeout(Some(timeout)).map_err(ClientError::Unreachable)?;
    let mut line = serde_json::to_string(request).map_err(|e| ClientError::Refused(e.to_string()))?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(ClientError::Unreachable)?;
    let mut answer = String::new();
    let read = BufReader::new(stream).read_line(&mut answer).map_err(ClientError::Unreachable)?;
    if read == 0 {
        return Err(ClientError::Unreachable(std::io::ErrorKind::UnexpectedEof.into()));
    }
    let wire: Wire = serde_json::from_str(&answer)
        .map_err(|err| ClientError::Refused(format!("unreadable reply {answer:?}: {err}")))?;
    match wire.ok {
        true => Ok(wire.reply),
        false => Err(ClientError::Refused(wire.error.unwrap_or_else(|| "unknown error".into()))),
    }
}

/// The control socket server. Dropping it stops the thread and removes the socket file (when the
/// process can still reach it).
pub struct ControlServer {
    path: PathBuf,
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A bound control socket not served yet: bound while the process can still reach its path, served
/// by a thread started once the process is jailed.
pub struct ControlListener {
    path: PathBuf,
    listener: UnixListener,
}

/// How long a connection waits for the VM loop to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the accept loop looks at the shutdown flag.
const ACCEPT_POLL: Duration = Duration::from_millis(200);

impl ControlListener {
    /// Binds `path`, replacing a stale socket file.
    pub fn bind(path: &Path) -> std::io::Result<ControlListener> {
        match std::fs::remove_file(path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        Ok(ControlListener { path: path.to_owned(), listener: UnixListener::bind(path)? })
    }

    /// Serves the socket on its own thread (which installs the control seccomp filter first);
    /// requests arrive on the receiver.
    pub fn serve(self) -> std::io::Result<(ControlServer, Receiver<Command>)> {
        let (tx, rx) = mpsc::channel();
        let shutdown = Arc::new(AtomicBool::new(false));
        let stop = shutdown.clone();
        let listener = self.listener;
        let thread = std::thread::Builder::new().name("vmm-control".into()).spawn(move || {
            if let Err(err) = crate::jail::seccomp::apply(crate::jail::seccomp::ThreadKind::Control) {
                tracing::error!(?err, "control thread not started");
                return;
            }
            accept_loop(listener, tx, stop)
        })?;
        Ok((ControlServer { path: self.path, shutdown, thread: Some(thread) }, rx))
    }
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket file) and serves it; requests arrive on the receiver.
    pub fn bind(path: &Path) -> std::io::Result<(ControlServer, Receiver<Command>)> {
        ControlListener::bind(path)?.serve()
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // The accept loop polls, so it sees the flag within ACCEPT_POLL.
        self.shutdown.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the control thread panicked");
            }
        }
        // A jailed VMM no longer sees the path (and may not unlink): the supervisor removes the file.
        if crate::jail::seccomp::enabled() {
            return;
        }
        match std::fs::remove_file(&self.path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(%err, path = %self.path.display(), "control socket not removed");
            }
            _ => {}
        }
    }
}

/// Waits up to `timeout` for `listener` to have a connection waiting.
fn readable(listener: &UnixListener, timeout: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut fd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, ms) > 0 }
}

fn accept_loop(listener: UnixListener, tx: Sender<Command>, shutdown: Arc<AtomicBool>) {
    while !shutdown.load(Ordering::SeqCst) {
        if !readable(&listener, ACCEPT_POLL) {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let tx = tx.clone();
                if let Err(err) = std::thread::Builder::new().name("vmm-control-conn".into()).spawn(move || {
                    if let Err(err) = serve(stream, &tx) {
                        tracing::debug!(%err, "control connection ended");
                    }
                }) {
                    tracing::warn!(%err, "cannot serve a control connection");
                }
            }
            Err(err) => tracing::warn!(%err, "control accept failed"),
        }
    }
}

fn serve(stream: UnixStream, tx: &Sender<Command>) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let result = match serde_json::from_str::<Request>(&line) {
            Err(err) => Err(format!("bad request: {err}")),
            Ok(request) => {
                let (reply_tx, reply_rx) = mpsc::channel();
                if tx.send(Command { request, reply: reply_tx }).is_err() {
                    Err("the vm is exiting".to_string())
                } else {
                    reply_rx.recv_timeout(REPLY_TIMEOUT).unwrap_or_else(|_| Err("the vm did not answer".to_string()))
                }
            }
        };
        let mut line = reply_json(result).to_string();
        line.push('\n');
        writer.write_all(line.as_bytes())?;
    }
    Ok(())
}

/// A reply line as sent and read: the [`Reply`]'s fields next to `ok` and, on failure, `error`.
#[derive(Serialize, Deserialize)]
struct Wire {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(flatten)]
    reply: Reply,
}

/// The wire form of a reply.
pub fn reply_json(result: Result<Reply, String>) -> Value {
    let wire = match result {
        Ok(reply) => Wire { ok: true, error: None, reply },
        Err(error) => Wire { ok: false, error: Some(error), reply: Reply::default() },
    };
    serde_json::to_value(wire).unwrap_or_default()
}

/// What a VMM process records about its end in its exit file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExitRecord {
    /// Why the VM ended.
    pub exit: ExitReason,
    /// The process's exit status.
    pub exit_code: i32,
}

impl ExitRecord {
    /// Writes the record to `path` atomically (a temporary file in the same directory, then rename).
    pub fn write_atomic(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(serde_json::to_string(self).map_err(std::io::Error::other)?.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ask(stream: &mut BufReader<UnixStream>, line: &str) -> Value {
        stream.get_mut().write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        stream.read_line(&mut reply).unwrap();
        serde_json::from_str(&reply).unwrap()
    }

    #[test]
    fn requests_reach_the_owner_and_replies_come_back_as_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let (server, rx) = ControlServer::bind(&path).unwrap();
        let owner = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for cmd in rx.iter().take(3) {
                let reply = match &cmd.request {
                    Request::Status => Ok(Reply::state(VmState::Running)),
                    Request::Pause => Err("cannot pause".to_string()),
                    _ => Ok(Reply::default()),
                };
                seen.push(cmd.request.clone());
                cmd.reply.send(reply).unwrap();
            }
            seen
        });
        let mut client = BufReader::new(UnixStream::connect(&path).unwrap());
        assert_eq!(ask(&mut client, r#"{"op":"status"}"#), json!({"ok": true, "state": "running"}));
        assert_eq!(ask(&mut client, r#"{"op":"pause"}"#), json!({"ok": false, "error": "cannot pause"}));
        let bad = ask(&mut client, r#"{"op":"explode"}"#);
        assert_eq!(bad["ok"], false);
        assert!(bad["error"].as_str().unwrap().contains("explode"), "{bad}");
        assert_eq!(ask(&mut client, r#"{"op":"stop","graceMs":250}"#), json!({"ok": true}));
        assert_eq!(owner.join().unwrap(), [Request::Status, Request::Pause, Request::Stop { grace_ms: 250 }]);
        drop(server);
        assert!(!path.exists(), "socket removed on drop");
    }

    #[test]
    fn the_client_gets_typed_replies_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let (_server, rx) = ControlServer::bind(&path).unwrap();
        let owner = std::thread::spawn(move || {
            for cmd in rx.iter().take(2) {
                let reply = match &cmd.request {
                    Request::Status => Ok(Reply {
                        state: Some(VmState::Paused),
                        uptime_ms: Some(42),
                        counters: Some(json!({"exits": 7})),
                        memory_bytes: None,
                    }),
                    _ => Err("cannot resume".to_string()),
                };
                cmd.reply.send(reply).unwrap();
            }
        });
        let timeout = Duration::from_secs(5);
        let status = request(&path, &Request::Status, timeout).unwrap();
        assert_eq!((status.state, status.uptime_ms), (Some(VmState::Paused), Some(42)));
        assert_eq!(status.counters.unwrap()["exits"], 7);
        let refused = request(&path, &Request::Resume, timeout).unwrap_err();
        assert!(matches!(&refused, ClientError::Refused(e) if e == "cannot resume"), "{refused:?}");
        owner.join().unwrap();
        let gone = request(&dir.path().join("nothing.sock"), &Request::Kill, timeout).unwrap_err();
        assert!(matches!(gone, ClientError::Unreachable(_)), "{gone:?}");
    }

    #[test]
    fn exit_records_round_trip_and_replace_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exit.json");
        let record = ExitRecord { exit: ExitReason::PowerOff { code: 7 }, exit_code: 7 };
        record.write_atomic(&path).unwrap();
        ExitRecord { exit: ExitReason::Stopped, exit_code: 130 }.write_atomic(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, r#"{"exit":{"reason":"stopped"},"exitCode":130}"#);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
        let back: ExitRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back.exit, ExitReason::Stopped);
        assert_ne!(back, record);
    }
}
