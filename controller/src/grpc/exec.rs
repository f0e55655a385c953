//! `Vms.Exec` and `Vms.Attach`: a command run by the guest agent over the VM's vsock socket, and the
//! VM's live serial console over its console socket (both in the VM's run directory).

use std::path::Path;
use std::time::Duration;

use guest_api::agent::{self, ExecRequest, Tag, WindowSize, AGENT_PORT, MAX_FRAME};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::proto::{self, attach_input, exec_input, exec_output};
use super::server::{stream_from, ApiState, Stream_};
use crate::api::Phase;
use crate::layout::VmDir;
use guest_api::error_chain;

/// How long the guest gets to accept a connection to its agent. A guest kernel refuses a port nobody
/// listens on at once; this bounds guests that never answer (no vsock driver, hung kernel).
pub const AGENT_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// The message of UNAVAILABLE when the agent does not answer.
pub const AGENT_UNAVAILABLE: &str = "the guest agent did not answer; is the VM's image started by ignite-init?";

/// The run directory of VM `name` if it is running: NOT_FOUND for an unknown VM, FAILED_PRECONDITION
/// for one that is not running.
fn running_vm_dir(state: &ApiState, name: &str) -> Result<VmDir, Status> {
    let record = state.store.get_vm(name).map_err(|e| Status::internal(error_chain(&e)))?;
    let Some(record) = record else {
        return Err(Status::not_found(format!("no VM named {name:?} (see `ignite ps -a`)")));
    };
    if record.status.phase != Phase::Running {
        // Only the API's own VMs can be started from the CLI; a source's follow their manifest.
        let how = if record.owner == "api" {
            format!("start it with `ignite start {name}`")
        } else {
            format!("it belongs to {}: its manifest's `state` and `restartPolicy` decide when it runs", record.owner)
        };
        return Err(Status::failed_precondition(format!(
            "VM {name:?} is not running (phase {:?}); {how}",
            record.status.phase
        )));
    }
    Ok(state.layout().vm(name))
}

/// Connects to the guest's vsock `port` through the VM's vsock socket (`CONNECT <port>\n`, answered
/// `OK <n>\n`). UNAVAILABLE when the socket is missing or the guest refuses or does not answer.
pub async fn connect_vsock(socket: &Path, port: u32, timeout: Duration) -> Result<UnixStream, Status> {
    let unavailable = |detail: String| Status::unavailable(format!("{AGENT_UNAVAILABLE} ({detail})"));
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| unavailable(format!("cannot connect to {}: {e}", socket.display())))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(|e| unavailable(e.to_string()))?;
    // Read the answer byte by byte: what follows it is the stream.
    let answer = tokio::time::timeout(timeout, async {
        let mut line = Vec::new();
        let mut byte = [0u8];
        while line.len() < 64 {
            match stream.read(&mut byte).await {
                Ok(0) | Err(_) => break,
                Ok(_) if byte[0] == b'\n' => return Some(line),
                Ok(_) => line.push(byte[0]),
            }
        }
        None
    })
    .await;
    match answer {
        Ok(Some(line)) if line.starts_with(b"OK ") => Ok(stream),
        Ok(_) => Err(unavailable(format!("nothing listens on vsock port {port} in the guest"))),
        Err(_) => Err(unavailable(format!("no answer on vsock port {port} within {timeout:?}"))),
    }
}

fn frame(tag: Tag, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(payload.len() + 5);
    // Writing to a Vec cannot fail.
    let _ = agent::write_frame(&mut buf, tag, payload);
    buf
}

/// Reads one agent frame; `None` at the end of the stream.
async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut header = [0u8; 5];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::other(format!("agent frame of {len} bytes")));
    }
    let mut payload = vec![0; len];
    r.read_exact(&mut payload).await?;
    Ok(Some((header[0], payload)))
}

/// A window size from the API: each side at most 65535 (`struct winsize` holds `u16`s).
fn window_size(size: &proto::WindowSize) -> Result<WindowSize, Status> {
    match (u16::try_from(size.rows), u16::try_from(size.cols)) {
        (Ok(rows), Ok(cols)) => Ok(WindowSize { rows, cols }),
        _ => Err(Status::invalid_argument(format!(
            "window size {}x{} (rows x columns) is out of range: each side is at most 65535",
            size.rows, size.cols
        ))),
    }
}

/// The agent's `Error` message for the client; an agent that predates terminals refuses `tty` as an
/// unknown field, which is said plainly.
fn agent_error(message: String, tty: bool) -> String {
    if tty && message.contains("unknown field `tty`") {
        return format!(
            "the guest's ignite-init predates terminals (recreate the VM to get the current one), or use exec \
             without -t ({message})"
        );
    }
    message
}

/// Serves `Vms.Exec` (see the proto).
pub(super) async fn exec(
    state: &ApiState,
    mut inbound: Streaming<proto::ExecInput>,
) -> Result<Stream_<proto::ExecOutput>, Status> {
    let first = inbound.message().await?.and_then(|m| m.input);
    let Some(exec_input::Input::Start(start)) = first else {
        return Err(Status::invalid_argument("the first Exec message must be an ExecStart"));
    };
    if start.argv.first().is_none_or(String::is_empty) {
        return Err(Status::invalid_argument("no command to run: argv is empty"));
    }
    let window = start.window.as_ref().map(window_size).transpose()?;
    let tty = start.tty;
    let dir = running_vm_dir(state, &start.name)?;
    let stream = connect_vsock(&dir.vsock_socket(), AGENT_PORT, AGENT_ANSWER_TIMEOUT).await?;
    let (read_half, mut write_half) = stream.into_split();
    let mut env: Vec<(String, String)> = start.env.into_iter().collect();
    env.sort();
    let request = ExecRequest {
        argv: start.argv,
        env,
        cwd: start.working_dir,
        user: start.user,
        tty,
        window: if tty { window } else { None },
    };
    let mut line = serde_json::to_vec(&request).map_err(|e| Status::internal(e.to_string()))?;
    line.push(b'\n');
    write_half.write_all(&line).await.map_err(|e| Status::unavailable(format!("{AGENT_UNAVAILABLE} ({e})")))?;
    tracing::info!(vm = start.name, argv = ?request.argv, user = request.user, tty, "exec");

    let input = tokio::spawn(async move {
        let mut closed = false;
        while let Ok(Some(message)) = inbound.message().await {
            let bytes = match message.input {
                Some(exec_input::Input::Stdin(data)) if !data.is_empty() && !closed => frame(Tag::Stdin, &data),
                Some(exec_input::Input::CloseStdin(true)) if !closed => {
                    closed = true;
                    frame(Tag::CloseStdin, &[])
                }
                // Resizes go to terminals only; one out of range is dropped (the next may fit).
                Some(exec_input::Input::Resize(size)) if tty => match window_size(&size) {
                    Ok(size) => frame(Tag::Resize, &size.encode()),
                    Err(_) => continue,
                },
                _ => continue,
            };
            if write_half.write_all(&bytes).await.is_err() {
                return;
            }
            // A terminal keeps taking resizes after the end of input.
            if closed && !tty {
                break;
            }
        }
        // The client went away: the command sees the end of its input.
        if !closed {
            let _ = write_half.write_all(&frame(Tag::CloseStdin, &[])).await;
        }
        // Keep the write half open until the session ends (dropping it would shut the socket down).
        std::future::pending::<()>().await;
    });
    let (tx, rx) = mpsc::channel(32);
    tokio::spawn(async move {
        let mut reader = BufReader::new(read_half);
        let ended = loop {
            let frame = tokio::select! {
                frame = read_frame(&mut reader) => frame,
                // The client went away: close the connection (the command's stdin ends) at once.
                _ = tx.closed() => break Err("the client went away".into()),
            };
            let output = match frame {
                Ok(Some((tag, payload))) if tag == Tag::Stdout as u8 => exec_output::Output::Stdout(payload),
                Ok(Some((tag, payload))) if tag == Tag::Stderr as u8 => exec_output::Output::Stderr(payload),
                Ok(Some((tag, payload))) if tag == Tag::Error as u8 => {
                    exec_output::Output::Error(agent_error(String::from_utf8_lossy(&payload).into_owned(), tty))
                }
                Ok(Some((tag, payload))) if tag == Tag::Exit as u8 => match agent::decode_exit(&payload) {
                    Some(code) => break Ok(code),
                    None => break Err("an invalid exit frame".to_string()),
                },
                Ok(Some(_)) => continue,
                Ok(None) => break Err("the connection closed before the command ended (did the VM stop?)".into()),
                Err(e) => break Err(e.to_string()),
            };
            if tx.send(Ok(proto::ExecOutput { output: Some(output) })).await.is_err() {
                break Err("the client went away".into());
            }
        };
        input.abort();
        let last = match ended {
            Ok(code) => Ok(proto::ExecOutput { output: Some(exec_output::Output::ExitCode(code)) }),
            Err(detail) => Err(Status::unavailable(format!("guest agent: {detail}"))),
        };
        let _ = tx.send(last).await;
    });
    Ok(stream_from(rx))
}

/// Serves `Vms.Attach` (see the proto).
pub(super) async fn attach(
    state: &ApiState,
    mut inbound: Streaming<proto::AttachInput>,
) -> Result<Stream_<proto::AttachOutput>, Status> {
    let first = inbound.message().await?.and_then(|m| m.input);
    let Some(attach_input::Input::Name(name)) = first else {
        return Err(Status::invalid_argument("the first Attach message must name the VM"));
    };
    let dir = running_vm_dir(state, &name)?;
    let socket = dir.console_socket();
    let stream = UnixStream::connect(&socket).await.map_err(|e| {
        Status::unavailable(format!("VM {name:?}: cannot connect to its console {}: {e}", socket.display()))
    })?;
    tracing::info!(vm = name, "attach");
    let (mut read_half, mut write_half) = stream.into_split();
    let input = tokio::spawn(async move {
        while let Ok(Some(message)) = inbound.message().await {
            if let Some(attach_input::Input::Stdin(data)) = message.input {
                if write_half.write_all(&data).await.is_err() {
                    return;
                }
            }
        }
        // The end of the client's input is not the end of the attach: output keeps coming.
        std::future::pending::<()>().await;
    });
    let (tx, rx) = mpsc::channel(32);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // A client that went away frees its console connection at once, even on a quiet console.
            let n = tokio::select! {
                read = read_half.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
                _ = tx.closed() => break,
            };
            if tx.send(Ok(proto::AttachOutput { data: buf[..n].to_vec() })).await.is_err() {
                break;
            }
        }
        input.abort();
    });
    Ok(stream_from(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_sizes_are_bounded_by_winsize() {
        let size = |rows, cols| window_size(&proto::WindowSize { rows, cols });
        assert_eq!(size(33, 132).unwrap(), WindowSize { rows: 33, cols: 132 });
        assert_eq!(size(65535, 0).unwrap(), WindowSize { rows: 65535, cols: 0 });
        let err = size(24, 65536).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("24x65536"), "{}", err.message());
    }

    #[test]
    fn an_agent_that_predates_terminals_is_named() {
        let old = "invalid exec request: unknown field `tty`, expected one of `argv`, `env`, `cwd`, `user`".to_string();
        assert!(agent_error(old.clone(), true).contains("predates terminals"));
        assert_eq!(agent_error(old.clone(), false), old);
        assert_eq!(agent_error("cannot execute \"x\"".into(), true), "cannot execute \"x\"");
    }
}
