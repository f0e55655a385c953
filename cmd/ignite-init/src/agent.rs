//! The guest agent's exec protocol, shared by `ignite-init` (the agent, in the guest) and the
//! controller (the client, on the host).
//!
//! The agent listens on AF_VSOCK port [`AGENT_PORT`]. The host reaches it through the VM's vsock unix
//! socket (`CONNECT 1024\n`, see vmm-core's vsock device). Per connection, one command:
//!
//! 1. The client sends one JSON line, an [`ExecRequest`] (at most [`MAX_REQUEST_LINE`] bytes).
//! 2. Then both sides send frames: a tag byte ([`Tag`]), a big-endian `u32` length, the payload
//!    (at most [`MAX_FRAME`] bytes). The client sends `Stdin` chunks and one `CloseStdin`; the agent
//!    sends `Stdout` and `Stderr` chunks, and last an `Exit` frame (a big-endian `i32`: the status,
//!    or 128 + the signal number), preceded by an `Error` frame (a UTF-8 message) when the command
//!    could not be started (status 127 not found, 126 otherwise).
//!
//! Pipes, not a pseudo-terminal: guest kernels have no devpts. The session logic ([`serve`]) is generic
//! over `Read`/`Write`, so it runs over a socketpair in tests and over AF_VSOCK in the guest.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// The vsock port the guest agent listens on (inside the guest; the host reaches it with
/// `CONNECT 1024` on the VM's vsock socket).
pub const AGENT_PORT: u32 = 1024;
/// The longest request line accepted.
pub const MAX_REQUEST_LINE: usize = 256 * 1024;
/// The largest frame payload accepted or sent.
pub const MAX_FRAME: usize = 64 * 1024;
/// `PATH` for commands when the image's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One command to run in the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Variables set on top of the main process's environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory (empty: the main process's).
    #[serde(default)]
    pub cwd: String,
    /// The user to run as, as in an image's `User` (`name`, `uid`, `name:group`, `uid:gid`; empty:
    /// the main process's).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
}

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    /// Client to agent: bytes for the command's standard input.
    Stdin = 0,
    /// Client to agent: no more standard input (the command's stdin is closed).
    CloseStdin = 1,
    /// Agent to client: bytes the command wrote to its standard output.
    Stdout = 2,
    /// Agent to client: bytes the command wrote to its standard error.
    Stderr = 3,
    /// Agent to client, last: the exit code, a big-endian `i32`.
    Exit = 4,
    /// Agent to client: why the command could not be started (UTF-8), followed by `Exit`.
    Error = 5,
}

impl Tag {
    fn from_byte(b: u8) -> Option<Tag> {
        Some(match b {
            0 => Tag::Stdin,
            1 => Tag::CloseStdin,
            2 => Tag::Stdout,
            3 => Tag::Stderr,
            4 => Tag::Exit,
            5 => Tag::Error,
            _ => return None,
        })
    }
}

/// A protocol violation or a transport failure.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Reading or writing the connection failed.
    #[error("agent connection")]
    Io(#[from] io::Error),
    /// The request line is not a valid [`ExecRequest`].
    #[error("invalid exec request: {0}")]
    BadRequest(String),
    /// A frame with an unknown tag.
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    /// A frame longer than [`MAX_FRAME`].
    #[error("frame of {0} bytes is longer than {MAX_FRAME}")]
    TooLong(u32),
    /// The stream ended inside a frame or before the request line ended.
    #[error("connection closed in the middle of a message")]
    Truncated,
}

/// Writes one frame (payloads longer than [`MAX_FRAME`] are split into several frames).
pub fn write_frame<W: Write + ?Sized>(w: &mut W, tag: Tag, payload: &[u8]) -> io::Result<()> {
    let mut chunks = payload.chunks(MAX_FRAME).peekable();
    if chunks.peek().is_none() {
        return w.write_all(&encode_header(tag, 0));
    }
    for chunk in chunks {
        let mut buf = Vec::with_capacity(5 + chunk.len());
        buf.extend_from_slice(&encode_header(tag, chunk.len()));
        buf.extend_from_slice(chunk);
        w.write_all(&buf)?;
    }
    Ok(())
}

fn encode_header(tag: Tag, len: usize) -> [u8; 5] {
    let len = u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes();
    [tag as u8, len[0], len[1], len[2], len[3]]
}

/// Reads one frame; `None` at a clean end of stream (between frames).
pub fn read_frame<R: Read + ?Sized>(r: &mut R) -> Result<Option<(Tag, Vec<u8>)>, ProtocolError> {
    let mut header = [0u8; 5];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let tag = Tag::from_byte(header[0]).ok_or(ProtocolError::UnknownTag(header[0]))?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len as usize > MAX_FRAME {
        return Err(ProtocolError::TooLong(len));
    }
    let mut payload = vec![0; len as usize];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => e.into(),
    })?;
    Ok(Some((tag, payload)))
}

/// Writes the request line.
pub fn write_request<W: Write + ?Sized>(w: &mut W, request: &ExecRequest) -> io::Result<()> {
    let mut line = serde_json::to_vec(request).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

/// Reads the request line byte by byte (nothing after it is consumed, so the frames that follow stay
/// in `r`).
pub fn read_request<R: Read + ?Sized>(r: &mut R) -> Result<ExecRequest, ProtocolError> {
    let mut line = Vec::new();
    let mut byte = [0u8];
    loop {
        match r.read(&mut byte) {
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
        if line.len() > MAX_REQUEST_LINE {
            return Err(ProtocolError::BadRequest(format!("request line longer than {MAX_REQUEST_LINE} bytes")));
        }
    }
    let request: ExecRequest = serde_json::from_slice(&line).map_err(|e| ProtocolError::BadRequest(e.to_string()))?;
    if request.argv.is_empty() || request.argv[0].is_empty() {
        return Err(ProtocolError::BadRequest("argv is empty".into()));
    }
    Ok(request)
}

/// Decodes an `Exit` frame's payload.
pub fn decode_exit(payload: &[u8]) -> Option<i32> {
    <[u8; 4]>::try_from(payload).ok().map(i32::from_be_bytes)
}

/// The base a command starts from: the main process's environment, working directory and user.
#[derive(Clone, Debug, Default)]
pub struct ExecDefaults {
    /// The main process's environment.
    pub env: Vec<(String, String)>,
    /// The main process's working directory.
    pub cwd: String,
    /// The main process's user as written (empty: root).
    pub user: String,
}

/// The guest's user database, read when a command starts (an image may add users at run time).
#[derive(Clone, Debug, Default)]
pub struct Accounts {
    /// The text of `/etc/passwd`.
    pub passwd: String,
    /// The text of `/etc/group`.
    pub group: String,
}

impl Accounts {
    /// Reads `/etc/passwd` and `/etc/group`; a missing file reads as empty (numeric users still work).
    pub fn read() -> Accounts {
        let read = |path| std::fs::read_to_string(path).unwrap_or_default();
        Accounts { passwd: read("/etc/passwd"), group: read("/etc/group") }
    }
}

/// Builds the command for `request` on top of `defaults`, with piped standard streams, running as
/// the request's user (else the main process's), resolved in `accounts`. `HOME` is that user's home
/// unless the environment sets it. An unknown user is an `InvalidInput` error naming it.
pub fn command(request: &ExecRequest, defaults: &ExecDefaults, accounts: &Accounts) -> io::Result<Command> {
    use std::os::unix::process::CommandExt;
    let user = [request.user.as_str(), defaults.user.as_str()].into_iter().find(|u| !u.is_empty());
    let user = crate::spec::resolve_user(user.unwrap_or("root"), &accounts.passwd, &accounts.group)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let mut cmd = Command::new(&request.argv[0]);
    cmd.args(&request.argv[1..]).env_clear();
    let has = |name: &str| defaults.env.iter().chain(&request.env).any(|(k, _)| k == name);
    if !has("PATH") {
        cmd.env("PATH", DEFAULT_PATH);
    }
    if !has("HOME") {
        cmd.env("HOME", &user.home);
    }
    cmd.envs(defaults.env.iter().map(|(k, v)| (k, v)));
    cmd.envs(request.env.iter().map(|(k, v)| (k, v)));
    let cwd = if request.cwd.is_empty() { defaults.cwd.as_str() } else { request.cwd.as_str() };
    cmd.current_dir(if cwd.is_empty() { "/" } else { cwd });
    // Only a change of identity is asked for: a non-root agent (a test) can still run as itself.
    if (user.uid, user.gid) != current_ids() {
        cmd.uid(user.uid).gid(user.gid);
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    Ok(cmd)
}

/// This process's effective user and group ids.
fn current_ids() -> (u32, u32) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    // SAFETY: getegid has no preconditions and cannot fail.
    let gid = unsafe { libc::getegid() };
    (uid, gid)
}

/// A started command: its pipes and how to wait for its exit code.
pub struct Spawned {
    /// The command's standard input.
    pub stdin: ChildStdin,
    /// The command's standard output.
    pub stdout: ChildStdout,
    /// The command's standard error.
    pub stderr: ChildStderr,
    /// Blocks until the command ended and returns its exit code (128 + signal for a signal).
    pub wait: Box<dyn FnOnce() -> i32 + Send>,
}

/// The exit code for a command that could not be started: 127 not found, 126 otherwise.
pub fn spawn_failure_code(e: &io::Error) -> i32 {
    if e.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}

/// Serves one session: reads the request from `reader`, starts it with `spawn`, forwards stdin frames
/// to the command and its output as frames to `writer`, and ends with the `Exit` frame. The stdin
/// forwarder keeps reading `reader` until the client closes stdin or the connection; it is not
/// waited for (the client closes the connection after the `Exit` frame).
pub fn serve<R, W, S>(mut reader: R, writer: W, spawn: S) -> Result<i32, ProtocolError>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
    S: FnOnce(&ExecRequest) -> io::Result<Spawned>,
{
    let writer = Arc::new(Mutex::new(writer));
    let send = |tag: Tag, payload: &[u8]| -> io::Result<()> {
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut *w, tag, payload)?;
        w.flush()
    };
    let request = match read_request(&mut reader) {
        Ok(request) => request,
        Err(e) => {
            let _ = send(Tag::Error, e.to_string().as_bytes());
            let _ = send(Tag::Exit, &126i32.to_be_bytes());
            return Err(e);
        }
    };
    let spawned = match spawn(&request) {
        Ok(spawned) => spawned,
        Err(e) => {
            let code = spawn_failure_code(&e);
            send(Tag::Error, format!("cannot execute {:?}: {e}", request.argv[0]).as_bytes())?;
            send(Tag::Exit, &code.to_be_bytes())?;
            return Ok(code);
        }
    };
    let Spawned { stdin, stdout, stderr, wait } = spawned;
    std::thread::Builder::new().name("agent-stdin".into()).spawn(move || forward_stdin(reader, stdin))?;
    let pump = |tag: Tag, mut from: Box<dyn Read + Send>| {
        let writer = writer.clone();
        std::thread::Builder::new().name("agent-output".into()).spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                        if write_frame(&mut *w, tag, &buf[..n]).and_then(|()| w.flush()).is_err() {
                            // The client is gone: keep draining so the command is not blocked on a pipe.
                            drop(w);
                            let _ = io::copy(&mut from, &mut io::sink());
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        })
    };
    let out = pump(Tag::Stdout, Box::new(stdout))?;
    let err = pump(Tag::Stderr, Box::new(stderr))?;
    let _ = out.join();
    let _ = err.join();
    let code = wait();
    send(Tag::Exit, &code.to_be_bytes())?;
    Ok(code)
}

/// Copies stdin frames to the command until `CloseStdin`, the end of the connection or a broken pipe.
fn forward_stdin<R: Read>(reader: R, mut stdin: ChildStdin) {
    let mut reader = BufReader::new(reader);
    while let Ok(Some((tag, payload))) = read_frame(&mut reader) {
        let broken = match tag {
            Tag::Stdin => stdin.write_all(&payload).is_err(),
            Tag::CloseStdin => true,
            _ => false,
        };
        if broken {
            break;
        }
    }
    // Dropping `stdin` here closes the command's standard input.
}

/// Everything a client got from one session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// The command's standard output.
    pub stdout: Vec<u8>,
    /// The command's standard error.
    pub stderr: Vec<u8>,
    /// The message of an `Error` frame.
    pub error: Option<String>,
    /// The exit code (`None`: the connection ended before the `Exit` frame).
    pub exit: Option<i32>,
}

/// Client side of a whole session with a given stdin: sends `request`, `stdin` and `CloseStdin`, and
/// collects everything until the `Exit` frame. For tests and simple callers; streaming clients use
/// [`write_request`], [`write_frame`] and [`read_frame`] directly.
pub fn run_to_end<S: Read + Write>(
    stream: &mut S,
    request: &ExecRequest,
    stdin: &[u8],
) -> Result<ExecOutput, ProtocolError> {
    write_request(stream, request)?;
    let input = (|| {
        if !stdin.is_empty() {
            write_frame(stream, Tag::Stdin, stdin)?;
        }
        write_frame(stream, Tag::CloseStdin, &[])?;
        stream.flush().map_err(ProtocolError::from)
    })();
    if let Err(e) = input {
        // The agent may answer and close before it reads the input (an unknown user, a missing
        // program): the answer is still there to read.
        let closed = |e: &io::Error| matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset);
        if !matches!(&e, ProtocolError::Io(io) if closed(io)) {
            return Err(e);
        }
    }
    let mut output = ExecOutput::default();
    while let Some((tag, payload)) = read_frame(stream)? {
        match tag {
            Tag::Stdout => output.stdout.extend_from_slice(&payload),
            Tag::Stderr => output.stderr.extend_from_slice(&payload),
            Tag::Error => output.error = Some(String::from_utf8_lossy(&payload).into_owned()),
            Tag::Exit => {
                output.exit = decode_exit(&payload);
                break;
            }
            Tag::Stdin | Tag::CloseStdin => {}
        }
    }
    Ok(output)
}

/// A listening AF_VSOCK stream socket on `cid` (`libc::VMADDR_CID_ANY`: any) and `port`.
pub fn listen(cid: u32, port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket has no memory effects; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created socket nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; every field is set below or meant to be zero.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes that outlives the call.
    let ret = unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_vm).cast(), len) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen has no memory effects.
    if unsafe { libc::listen(fd, 16) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned)
}

/// Accepts one connection (close-on-exec, so commands do not inherit it).
pub fn accept(listener: &OwnedFd) -> io::Result<File> {
    // SAFETY: null address pointers are allowed; the result is checked below.
    let fd =
        unsafe { libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly accepted socket nobody else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// An agent whose main process runs as the test itself (unless `defaults` names a user).
    fn agent(mut defaults: ExecDefaults) -> (UnixStream, std::thread::JoinHandle<Result<i32, ProtocolError>>) {
        if defaults.user.is_empty() {
            let (uid, gid) = current_ids();
            defaults.user = format!("{uid}:{gid}");
        }
        agent_with(defaults, Accounts { passwd: PASSWD.into(), group: GROUP.into() })
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    const GROUP: &str = "root:x:0:\nnogroup:x:65534:\nstaff:x:50:\n";

    /// Runs `serve` on one end of a socketpair with plain `Child::wait`, returns the other end.
    fn agent_with(
        defaults: ExecDefaults,
        accounts: Accounts,
    ) -> (UnixStream, std::thread::JoinHandle<Result<i32, ProtocolError>>) {
        let (client, server) = UnixStream::pair().unwrap();
        let handle = std::thread::spawn(move || {
            let reader = server.try_clone().unwrap();
            serve(reader, server, move |req| spawn_waited(req, &defaults, &accounts))
        });
        (client, handle)
    }

    /// Starts `req` with plain `Child::wait` (no PID 1 reaper in tests).
    fn spawn_waited(req: &ExecRequest, defaults: &ExecDefaults, accounts: &Accounts) -> io::Result<Spawned> {
        let mut child = command(req, defaults, accounts)?.spawn()?;
        let (stdin, stdout, stderr) =
            (child.stdin.take().unwrap(), child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let wait = Box::new(move || {
            use std::os::unix::process::ExitStatusExt;
            let status = child.wait().unwrap();
            status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
        });
        Ok(Spawned { stdin, stdout, stderr, wait })
    }

    fn req(argv: &[&str]) -> ExecRequest {
        ExecRequest { argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn frames_round_trip_and_long_payloads_are_split() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Tag::Stdout, b"hello").unwrap();
        write_frame(&mut buf, Tag::CloseStdin, &[]).unwrap();
        write_frame(&mut buf, Tag::Stderr, &vec![7u8; MAX_FRAME + 3]).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).unwrap(), Some((Tag::Stdout, b"hello".to_vec())));
        assert_eq!(read_frame(&mut r).unwrap(), Some((Tag::CloseStdin, vec![])));
        assert_eq!(read_frame(&mut r).unwrap().unwrap().1.len(), MAX_FRAME);
        assert_eq!(read_frame(&mut r).unwrap(), Some((Tag::Stderr, vec![7u8; 3])));
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn bad_frames_are_rejected() {
        assert!(matches!(read_frame(&mut &[9u8, 0, 0, 0, 0][..]), Err(ProtocolError::UnknownTag(9))));
        assert!(matches!(read_frame(&mut &[2u8, 0xff, 0, 0, 0][..]), Err(ProtocolError::TooLong(_))));
        assert!(matches!(read_frame(&mut &[2u8, 0, 0, 0, 4, b'a'][..]), Err(ProtocolError::Truncated)));
        assert!(matches!(read_frame(&mut &[2u8, 0][..]), Err(ProtocolError::Truncated)));
        assert!(matches!(read_request(&mut &b"{\"argv\":[]}\n"[..]), Err(ProtocolError::BadRequest(_))));
        assert!(matches!(read_request(&mut &b"{\"argv\":[\"ls\"]"[..]), Err(ProtocolError::Truncated)));
    }

    #[test]
    fn a_command_gets_stdin_and_its_output_and_exit_code_come_back() {
        let (mut client, handle) = agent(ExecDefaults::default());
        let request = req(&["sh", "-c", "tr a-z A-Z; echo oops >&2; exit 3"]);
        let out = run_to_end(&mut client, &request, b"hello\n").unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "HELLO\n");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
        assert_eq!(out.exit, Some(3));
        assert_eq!(handle.join().unwrap().unwrap(), 3);
    }

    #[test]
    fn environment_and_working_directory_come_from_defaults_then_the_request() {
        let dir = tempfile::tempdir().unwrap();
        let defaults = ExecDefaults {
            env: vec![("A".into(), "base".into()), ("B".into(), "base".into())],
            cwd: dir.path().display().to_string(),
            ..Default::default()
        };
        let (mut client, _handle) = agent(defaults);
        let mut request = req(&["sh", "-c", "echo $A $B $PATH; pwd"]);
        request.env = vec![("B".into(), "mine".into())];
        let out = run_to_end(&mut client, &request, b"").unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(text, format!("base mine {DEFAULT_PATH}\n{}\n", dir.path().display()), "{out:?}");
    }

    #[test]
    fn commands_run_as_the_requested_user_else_the_main_processs_with_that_users_home() {
        if current_ids().0 != 0 {
            eprintln!("skipping: changing to another user needs root (this test runs as uid {})", current_ids().0);
            return;
        }
        let script = req(&["sh", "-c", "echo $(id -u) $(id -g) $(id -G) $HOME"]);
        let run = |defaults_user: &str, request_user: &str| {
            let defaults = ExecDefaults { user: defaults_user.into(), cwd: "/".into(), ..Default::default() };
            let (mut client, _handle) = agent(defaults);
            let request = ExecRequest { user: request_user.into(), ..script.clone() };
            let out = run_to_end(&mut client, &request, b"").unwrap();
            assert_eq!(out.exit, Some(0), "{out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(run("nobody", ""), "65534 65534 65534 /nonexistent\n", "the main process's user");
        assert_eq!(run("nobody", "root:staff"), "0 50 50 /root\n", "the request's user and group");
        assert_eq!(run("nobody", "4321"), "4321 0 0 /\n", "a uid without a passwd entry, as runc");
        assert_eq!(run("root", ""), "0 0 0 /root\n");
    }

    #[test]
    fn an_unknown_user_is_refused_with_its_name_and_126() {
        for (defaults_user, request_user, named) in
            [("", "bob", "bob"), ("ghost", "", "ghost"), ("", "root:nogrp", "nogrp")]
        {
            let (mut client, handle) = agent(ExecDefaults { user: defaults_user.into(), ..Default::default() });
            let request = ExecRequest { user: request_user.into(), ..req(&["cat"]) };
            // More input than the socket buffers hold: the agent answers and closes while the
            // client is still writing it, and the answer must still arrive.
            let out = run_to_end(&mut client, &request, &vec![b'x'; 4 << 20]).unwrap();
            assert_eq!(out.exit, Some(126), "{out:?}");
            let error = out.error.unwrap_or_default();
            assert!(error.contains(&format!("{named:?} not found in /etc/")), "{error}");
            assert_eq!(handle.join().unwrap().unwrap(), 126);
        }
    }

    #[test]
    fn a_missing_program_reports_an_error_and_127() {
        let (mut client, handle) = agent(ExecDefaults::default());
        let out = run_to_end(&mut client, &req(&["/nonexistent/program"]), b"").unwrap();
        assert_eq!(out.exit, Some(127));
        assert!(out.error.as_deref().unwrap_or_default().contains("/nonexistent/program"), "{out:?}");
        assert_eq!(handle.join().unwrap().unwrap(), 127);
    }

    #[test]
    fn a_signal_ends_with_128_plus_the_signal() {
        let (mut client, _handle) = agent(ExecDefaults::default());
        let out = run_to_end(&mut client, &req(&["sh", "-c", "kill -9 $$"]), b"").unwrap();
        assert_eq!(out.exit, Some(128 + 9));
    }

    #[test]
    fn output_larger_than_a_frame_arrives_whole_while_stdin_streams() {
        let (mut client, _handle) = agent(ExecDefaults::default());
        let input = vec![b'x'; 3 * MAX_FRAME + 17];
        write_request(&mut client, &req(&["cat"])).unwrap();
        let mut writer = client.try_clone().unwrap();
        let sent = input.clone();
        let feeder = std::thread::spawn(move || {
            write_frame(&mut writer, Tag::Stdin, &sent).unwrap();
            write_frame(&mut writer, Tag::CloseStdin, &[]).unwrap();
        });
        let (mut stdout, mut exit) = (Vec::new(), None);
        while let Some((tag, payload)) = read_frame(&mut client).unwrap() {
            match tag {
                Tag::Stdout => stdout.extend_from_slice(&payload),
                Tag::Exit => exit = decode_exit(&payload),
                _ => {}
            }
            if exit.is_some() {
                break;
            }
        }
        feeder.join().unwrap();
        assert_eq!(stdout, input);
        assert_eq!(exit, Some(0));
    }

    /// Connects to `cid:port` over AF_VSOCK; `None` when nothing answers within a short while (no
    /// loopback transport).
    fn vsock_connect(cid: u32, port: u32) -> Option<File> {
        // SAFETY: socket has no memory effects; the result is checked.
        let fd =
            unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
        assert!(fd >= 0, "AF_VSOCK socket: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        // SAFETY: sockaddr_vm is plain data.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = cid;
        addr.svm_port = port;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
        let ret = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_vm).cast(), len) };
        if ret < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
            return None;
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
        // SAFETY: `pfd` is one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 3000) };
        let (mut err, mut err_len) = (0i32, std::mem::size_of::<i32>() as libc::socklen_t);
        // SAFETY: `err` and `err_len` are valid out-pointers of the sizes given.
        let got = unsafe {
            libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&mut err as *mut i32).cast(), &mut err_len)
        };
        if ready != 1 || got != 0 || err != 0 {
            return None;
        }
        // SAFETY: F_SETFL on an owned fd has no memory effects.
        unsafe { libc::fcntl(fd, libc::F_SETFL, 0) };
        Some(file)
    }

    #[test]
    fn the_agent_serves_over_a_real_af_vsock_listener() {
        let port = 20_000 + std::process::id() % 20_000;
        let listener = match listen(libc::VMADDR_CID_ANY, port) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("skipping: this host has no AF_VSOCK sockets ({e})");
                return;
            }
        };
        let server = std::thread::spawn(move || {
            let conn = accept(&listener).unwrap();
            let reader = conn.try_clone().unwrap();
            let (uid, gid) = current_ids();
            let defaults = ExecDefaults { user: format!("{uid}:{gid}"), ..Default::default() };
            serve(reader, conn, |req| spawn_waited(req, &defaults, &Accounts::default()))
        });
        // CID 1 is VMADDR_CID_LOCAL: the vsock_loopback transport.
        let Some(mut client) = vsock_connect(1, port) else {
            eprintln!(
                "skipping: connecting to vsock CID 1 (local) failed; the vsock_loopback module is not loaded and \
                 cannot be (`modprobe vsock_loopback`: no modprobe and no /lib/modules on this host). The real \
                 listener is exercised by the e2e Linux guest test instead"
            );
            return;
        };
        let out = run_to_end(&mut client, &req(&["sh", "-c", "cat; exit 5"]), b"over vsock").unwrap();
        assert_eq!(out.stdout, b"over vsock");
        assert_eq!(out.exit, Some(5));
        assert_eq!(server.join().unwrap().unwrap(), 5);
    }
}
