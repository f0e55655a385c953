//! The guest agent's server side, in the guest: runs one command per connection with the protocol of
//! [`guest_api::agent`] (the controller is the client). The session logic ([`serve`]) is generic over
//! `Read`/`Write`, so it runs over a socketpair in tests and over AF_VSOCK in the guest ([`crate::sys`]).
//! A command gets pipes, or with `tty` a pseudo-terminal from the guest's devpts.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use guest_api::agent::{
    decode_exit, read_frame, read_request, write_frame, write_request, ExecRequest, ProtocolError, Tag, WindowSize,
};

use crate::spec::DEFAULT_PATH;

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

/// How long a terminal session's output may still come after its command ended: a background process
/// that keeps the terminal open must not hold the session (and the client) forever.
pub const TTY_DRAIN: Duration = Duration::from_secs(1);

/// The `TERM` a terminal session gets unless the environment sets one (docker's choice).
pub const DEFAULT_TERM: &str = "xterm";

/// A command ready to start, and with a terminal the master side of its pseudo-terminal.
pub struct Prepared {
    /// The command (its standard streams set).
    pub cmd: Command,
    /// With `tty`: the pseudo-terminal's master; the command's stdin, stdout and stderr are the slave.
    pub pty: Option<File>,
}

/// Builds the command for `request` on top of `defaults`, running as the request's user (else the
/// main process's), resolved in `accounts`. `HOME` is that user's home unless the environment sets
/// it. Its standard streams are pipes, or with `tty` a new pseudo-terminal (sized as the request
/// says, its controlling terminal, `TERM` defaulting to [`DEFAULT_TERM`]). An unknown user is an
/// `InvalidInput` error naming it.
pub fn command(request: &ExecRequest, defaults: &ExecDefaults, accounts: &Accounts) -> io::Result<Prepared> {
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
    if request.tty && !has("TERM") {
        cmd.env("TERM", DEFAULT_TERM);
    }
    cmd.envs(defaults.env.iter().map(|(k, v)| (k, v)));
    cmd.envs(request.env.iter().map(|(k, v)| (k, v)));
    let cwd = if request.cwd.is_empty() { defaults.cwd.as_str() } else { request.cwd.as_str() };
    cmd.current_dir(if cwd.is_empty() { "/" } else { cwd });
    // Only a change of identity is asked for: a non-root agent (a test) can still run as itself.
    if (user.uid, user.gid) != crate::sys::effective_ids() {
        cmd.uid(user.uid).gid(user.gid);
    }
    if !request.tty {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        return Ok(Prepared { cmd, pty: None });
    }
    // Not `NotFound` (127, "command not found") when the guest has no /dev/ptmx: 126 and a reason.
    let no_pty = |e| io::Error::other(format!("no pseudo-terminal (a guest kernel with UNIX98 ptys and devpts?): {e}"));
    let (master, slave) = crate::sys::open_pty().map_err(no_pty)?;
    if let Some(size) = request.window {
        crate::sys::set_window_size(&master, size.rows, size.cols)?;
    }
    cmd.stdin(slave.try_clone()?).stdout(slave.try_clone()?).stderr(slave);
    crate::sys::controlling_tty_on_exec(&mut cmd);
    Ok(Prepared { cmd, pty: Some(master) })
}

/// A started command: its streams, how to resize its terminal, and how to wait for its exit code.
pub struct Spawned {
    /// The command's standard input (with a terminal: the master side).
    pub stdin: Box<dyn Write + Send>,
    /// The command's standard output (with a terminal: the master side, stdout and stderr merged).
    pub stdout: Box<dyn Read + Send>,
    /// The command's standard error (none with a terminal).
    pub stderr: Option<Box<dyn Read + Send>>,
    /// Resizes the command's terminal (none without one).
    pub resize: Option<Box<dyn FnMut(WindowSize) + Send>>,
    /// Blocks until the command ended and returns its exit code (128 + signal for a signal).
    pub wait: Box<dyn FnOnce() -> i32 + Send>,
}

impl Spawned {
    /// The streams of `child`, started from a [`Prepared`] whose `pty` is given here: the master side
    /// of its terminal, else its pipes. The `Prepared` command must be dropped by now, or its copies
    /// of the terminal's slave keep the output open after the command ended.
    pub fn new(child: &mut Child, pty: Option<File>, wait: Box<dyn FnOnce() -> i32 + Send>) -> io::Result<Spawned> {
        if let Some(master) = pty {
            let resizer = master.try_clone()?;
            let resize = move |size: WindowSize| {
                // A terminal that is already gone has no size to set.
                let _ = crate::sys::set_window_size(&resizer, size.rows, size.cols);
            };
            return Ok(Spawned {
                stdin: Box::new(master.try_clone()?),
                stdout: Box::new(master),
                stderr: None,
                resize: Some(Box::new(resize)),
                wait,
            });
        }
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(io::Error::other("command started without its pipes"));
        };
        Ok(Spawned {
            stdin: Box::new(stdin),
            stdout: Box::new(stdout),
            stderr: Some(Box::new(stderr)),
            resize: None,
            wait,
        })
    }
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
/// waited for (the client closes the connection after the `Exit` frame). With pipes the `Exit` frame
/// follows the end of both outputs; with a terminal it follows the command's end and at most
/// [`TTY_DRAIN`] of output after it (a background process may keep the terminal open).
pub fn serve<R, W, S>(mut reader: R, writer: W, spawn: S) -> Result<i32, ProtocolError>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
    S: FnOnce(&ExecRequest) -> io::Result<Spawned>,
{
    let writer = Arc::new(Mutex::new(writer));
    // Set (under the writer's lock) once the `Exit` frame is sent: nothing may follow it.
    let ended = Arc::new(AtomicBool::new(false));
    let send = |tag: Tag, payload: &[u8]| -> io::Result<()> {
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut *w, tag, payload)?;
        if tag == Tag::Exit {
            ended.store(true, Ordering::SeqCst);
        }
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
    let Spawned { stdin, stdout, stderr, resize, wait } = spawned;
    std::thread::Builder::new().name("agent-stdin".into()).spawn(move || forward_stdin(reader, stdin, resize))?;
    let (done_tx, done) = mpsc::channel::<()>();
    let pump = |tag: Tag, mut from: Box<dyn Read + Send>| {
        let writer = writer.clone();
        let ended = ended.clone();
        let done_tx = done_tx.clone();
        std::thread::Builder::new().name("agent-output".into()).spawn(move || {
            let _done = done_tx;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match from.read(&mut buf) {
                    // A terminal's master reads EIO once every slave is closed: its end of output.
                    Ok(0) => return,
                    Ok(n) => {
                        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                        let sent = !ended.load(Ordering::SeqCst)
                            && write_frame(&mut *w, tag, &buf[..n]).and_then(|()| w.flush()).is_ok();
                        if !sent {
                            // The client is gone or the session ended: keep draining so nothing blocks
                            // on a full pipe or terminal.
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
    let tty = stderr.is_none();
    let out = pump(Tag::Stdout, stdout)?;
    let err = stderr.map(|stderr| pump(Tag::Stderr, stderr)).transpose()?;
    drop(done_tx);
    let code = if tty {
        let code = wait();
        // Output written just before the end is still in the terminal: read it, within a bound.
        let _ = done.recv_timeout(TTY_DRAIN);
        code
    } else {
        let _ = out.join();
        if let Some(err) = err {
            let _ = err.join();
        }
        wait()
    };
    send(Tag::Exit, &code.to_be_bytes())?;
    Ok(code)
}

/// Copies stdin frames to the command and applies `Resize` frames to its terminal until `CloseStdin`
/// (without a terminal; a terminal stays open, as docker's), the end of the connection or a broken
/// pipe.
fn forward_stdin<R: Read>(
    reader: R,
    mut stdin: Box<dyn Write + Send>,
    mut resize: Option<Box<dyn FnMut(WindowSize) + Send>>,
) {
    let mut reader = BufReader::new(reader);
    let mut stdin_open = true;
    while let Ok(Some((tag, payload))) = read_frame(&mut reader) {
        match tag {
            // A broken pipe: the command closed its input.
            Tag::Stdin if stdin_open && stdin.write_all(&payload).is_err() => break,
            Tag::CloseStdin if resize.is_some() => stdin_open = false,
            Tag::CloseStdin => break,
            Tag::Resize => {
                if let (Some(resize), Some(size)) = (resize.as_mut(), WindowSize::decode(&payload)) {
                    resize(size);
                }
            }
            _ => {}
        }
    }
    // Dropping `stdin` here closes the command's standard input (a terminal's master stays open).
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
            Tag::Stdin | Tag::CloseStdin | Tag::Resize => {}
        }
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use guest_api::agent::MAX_FRAME;

    /// An agent whose main process runs as the test itself (unless `defaults` names a user).
    fn agent(mut defaults: ExecDefaults) -> (UnixStream, std::thread::JoinHandle<Result<i32, ProtocolError>>) {
        if defaults.user.is_empty() {
            let (uid, gid) = crate::sys::effective_ids();
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
        let Prepared { mut cmd, pty } = command(req, defaults, accounts)?;
        let mut child = cmd.spawn()?;
        drop(cmd);
        let mut spawned = Spawned::new(&mut child, pty, Box::new(|| unreachable!("replaced below")))?;
        spawned.wait = Box::new(move || {
            use std::os::unix::process::ExitStatusExt;
            let status = child.wait().unwrap();
            status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
        });
        Ok(spawned)
    }

    fn req(argv: &[&str]) -> ExecRequest {
        ExecRequest { argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() }
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
        if crate::sys::effective_ids().0 != 0 {
            eprintln!(
                "skipping: changing to another user needs root (this test runs as uid {})",
                crate::sys::effective_ids().0
            );
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

    /// Reads frames until the exit frame: the stdout they carried and the exit status.
    fn stdout_until_exit(client: &mut UnixStream) -> (Vec<u8>, Option<i32>) {
        let (mut stdout, mut exit) = (Vec::new(), None);
        while let Some((tag, payload)) = read_frame(client).unwrap() {
            match tag {
                Tag::Stdout => stdout.extend_from_slice(&payload),
                Tag::Exit => exit = decode_exit(&payload),
                _ => {}
            }
            if exit.is_some() {
                break;
            }
        }
        (stdout, exit)
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
        let (stdout, exit) = stdout_until_exit(&mut client);
        feeder.join().unwrap();
        assert_eq!(stdout, input);
        assert_eq!(exit, Some(0));
    }

    /// A terminal request for `script` with `window`; `None` (and a printed reason) when this host
    /// cannot open pseudo-terminals.
    fn tty_req(script: &str, window: Option<WindowSize>) -> Option<ExecRequest> {
        if let Err(e) = crate::sys::open_pty() {
            eprintln!("skipping: this host cannot open a pseudo-terminal ({e})");
            return None;
        }
        Some(ExecRequest { tty: true, window, ..req(&["sh", "-c", script]) })
    }

    #[test]
    fn with_tty_the_command_gets_a_sized_controlling_terminal_and_merged_output() {
        let window = Some(WindowSize { rows: 33, cols: 77 });
        let script = "tty; stty size; echo to-stderr >&2; echo TERM=$TERM; [ -t 0 ] && echo stdin-is-a-tty; \
                      ps -o tty= -p $$ 2>/dev/null | grep -q pts && echo controlling; exit 4";
        let Some(request) = tty_req(script, window) else { return };
        let (mut client, handle) = agent(ExecDefaults::default());
        let out = run_to_end(&mut client, &request, b"").unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert!(lines[0].starts_with("/dev/pts/"), "{text:?}");
        assert_eq!(lines[1..5], ["33 77", "to-stderr", "TERM=xterm", "stdin-is-a-tty"], "{text:?}");
        assert!(out.stderr.is_empty(), "stderr comes through the terminal: {out:?}");
        assert_eq!(out.exit, Some(4));
        assert_eq!(handle.join().unwrap().unwrap(), 4);
        let with_ps = std::process::Command::new("ps").arg("-o").arg("tty=").arg("-p").arg("1").output();
        if with_ps.is_ok_and(|o| o.status.success()) {
            assert_eq!(lines.get(5), Some(&"controlling"), "the terminal is the session's: {text:?}");
        }
    }

    #[test]
    fn without_tty_the_command_has_no_terminal() {
        let (mut client, _handle) = agent(ExecDefaults::default());
        let out = run_to_end(&mut client, &req(&["sh", "-c", "tty; echo TERM=$TERM"]), b"").unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "not a tty\nTERM=\n", "{out:?}");
    }

    #[test]
    fn resize_frames_reach_the_terminal_and_typed_input_is_echoed() {
        let Some(request) = tty_req("read line; echo got-$line; stty size", None) else { return };
        let (mut client, _handle) = agent(ExecDefaults::default());
        write_request(&mut client, &request).unwrap();
        write_frame(&mut client, Tag::Resize, &WindowSize { rows: 40, cols: 100 }.encode()).unwrap();
        write_frame(&mut client, Tag::Resize, &[1, 2, 3]).unwrap(); // malformed: ignored
        write_frame(&mut client, Tag::Stdin, b"hello\n").unwrap();
        let (stdout, exit) = stdout_until_exit(&mut client);
        assert_eq!(String::from_utf8_lossy(&stdout), "hello\r\ngot-hello\r\n40 100\r\n");
        assert_eq!(exit, Some(0));
    }

    #[test]
    fn a_background_process_holding_the_terminal_does_not_hold_the_session() {
        let Some(request) = tty_req("trap '' HUP; sleep 5 & echo started", None) else { return };
        let (mut client, _handle) = agent(ExecDefaults::default());
        let started = std::time::Instant::now();
        let out = run_to_end(&mut client, &request, b"").unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "started\r\n");
        assert_eq!(out.exit, Some(0));
        assert!(started.elapsed() < Duration::from_secs(4), "the session ended after {:?}", started.elapsed());
    }

    #[test]
    fn the_agent_serves_over_a_real_af_vsock_listener() {
        let port = 20_000 + std::process::id() % 20_000;
        let listener = match crate::sys::vsock_listen(libc::VMADDR_CID_ANY, port) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("skipping: this host has no AF_VSOCK sockets ({e})");
                return;
            }
        };
        let server = std::thread::spawn(move || {
            let conn = crate::sys::vsock_accept(&listener).unwrap();
            let reader = conn.try_clone().unwrap();
            let (uid, gid) = crate::sys::effective_ids();
            let defaults = ExecDefaults { user: format!("{uid}:{gid}"), ..Default::default() };
            serve(reader, conn, |req| spawn_waited(req, &defaults, &Accounts::default()))
        });
        // CID 1 is VMADDR_CID_LOCAL: the vsock_loopback transport.
        let Some(mut client) = crate::sys::vsock_connect(1, port, Duration::from_secs(3)).unwrap() else {
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
