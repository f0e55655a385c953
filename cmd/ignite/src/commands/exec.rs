//! `ignite exec` (a command in a running VM, through its guest agent) and `ignite attach` (the VM's
//! serial console, live).

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use clap::Args;
use controller::grpc::proto::{self, attach_input, exec_input, exec_output};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::client::{self, Ctx};

/// `ignite exec`.
#[derive(Args)]
#[command(after_help = "\
The command runs in the VM as the main process's user (-u for another), started by the guest \
agent of ignite-init (vsock port 1024), with the main process's environment and working directory. \
It gets pipes, or with -t a pseudo-terminal in the guest (its controlling terminal, sized like \
yours and resized with it, TERM=xterm unless set; stdout and stderr then come merged). With -it \
your terminal is put in raw mode, so keys like Ctrl-C go to the command: an interactive shell. \
`ignite attach` is the VM's console instead. The exit code of the command becomes ignite's own \
(128+N when signal N ended it; 127 not found, 126 not executable or an unknown user).

Examples:
  ignite exec -it web -- sh
  ignite exec web -- cat /etc/hostname
  ignite exec web -- sh -c 'ps; df -h /'
  echo hello | ignite exec -i web -- tr a-z A-Z
  ignite exec -u root web -- id
  ignite exec -e DEBUG=1 -w /www web -- ls -l; echo \"exit code $?\"")]
pub struct ExecArgs {
    /// Forward this standard input to the command, like `docker exec -i` (without it the command's
    /// standard input is empty).
    #[arg(short, long)]
    interactive: bool,
    /// A pseudo-terminal for the command, like `docker exec -t` (with -i, standard input must be a
    /// terminal: it is put in raw mode until the command ends).
    #[arg(short, long)]
    tty: bool,
    /// A variable set on top of the VM's environment. Repeatable.
    #[arg(short, long = "env", value_name = "NAME=VALUE", value_parser = super::parse_env)]
    env: Vec<(String, String)>,
    /// Working directory in the guest (default: the main process's).
    #[arg(short, long, value_name = "DIR")]
    workdir: Option<String>,
    /// Run as this user: NAME, UID, NAME:GROUP or UID:GID, resolved in the guest's /etc/passwd and
    /// /etc/group (default: the main process's user, the VM's `user` or else the image's).
    #[arg(short, long, value_name = "USER[:GROUP]")]
    user: Option<String>,
    /// The VM.
    name: String,
    /// The command and its arguments; put them after `--` when they start with `-`.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// Reads standard input on a thread and hands it over in chunks; `None` ends it (end of input).
fn stdin_chunks() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(8);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
    rx
}

/// What docker says for `-it` when standard input is not a terminal.
pub const NOT_A_TTY: &str = "the input device is not a TTY";

/// The local terminal's size (stdin's or stdout's must be a terminal; crossterm asks /dev/tty first,
/// else stdout, with TIOCGWINSZ); `None` without one.
fn local_window_size() -> Option<proto::WindowSize> {
    if !std::io::stdin().is_terminal() && !std::io::stdout().is_terminal() {
        return None;
    }
    let size = ratatui::crossterm::terminal::window_size().ok()?;
    Some(proto::WindowSize { rows: size.rows.into(), cols: size.columns.into() })
}

/// Runs a command in a VM; the command's exit code is the result.
pub fn exec(args: ExecArgs, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let stdin_tty = std::io::stdin().is_terminal();
    if args.tty && args.interactive && !stdin_tty {
        anyhow::bail!("{NOT_A_TTY}: -it needs a terminal on standard input (drop -t to pipe input to the command)");
    }
    client::runtime()?.block_on(async {
        let mut c = client::vms(ctx).await?;
        let (tx, rx) = mpsc::channel(8);
        let window = if args.tty { local_window_size() } else { None };
        let start = proto::ExecStart {
            name: args.name.clone(),
            argv: args.command.clone(),
            env: args.env.iter().cloned().collect(),
            working_dir: args.workdir.clone().unwrap_or_default(),
            tty: args.tty,
            user: args.user.clone().unwrap_or_default(),
            window,
        };
        let input = |i| proto::ExecInput { input: Some(i) };
        tx.send(input(exec_input::Input::Start(start))).await?;
        if args.tty && window.is_some() {
            // SIGWINCH: the terminal changed size; the command's terminal follows.
            let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while winch.recv().await.is_some() {
                    let Some(size) = local_window_size() else { continue };
                    if tx.send(input(exec_input::Input::Resize(size))).await.is_err() {
                        return;
                    }
                }
            });
        }
        let interactive = args.interactive;
        tokio::spawn(async move {
            if interactive {
                let mut chunks = stdin_chunks();
                while let Some(chunk) = chunks.recv().await {
                    if tx.send(input(exec_input::Input::Stdin(chunk))).await.is_err() {
                        return;
                    }
                }
            }
            let _ = tx.send(input(exec_input::Input::CloseStdin(true))).await;
            // Keep the request stream open until the server ends the call.
            tx.closed().await;
        });
        let mut output = c.exec(ReceiverStream::new(rx)).await.map_err(client::status)?.into_inner();
        // Keys go to the command's terminal as typed (Ctrl-C included) until the command ends.
        let raw = if args.tty && args.interactive { Some(RawMode::enable()?) } else { None };
        let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
        while let Some(message) = output.message().await.map_err(client::status)? {
            match message.output {
                Some(exec_output::Output::Stdout(data)) => {
                    stdout.write_all(&data)?;
                    stdout.flush()?;
                }
                Some(exec_output::Output::Stderr(data)) => {
                    stderr.write_all(&data)?;
                }
                Some(exec_output::Output::Error(message)) => {
                    // In raw mode a newline does not return the cursor.
                    let end = if raw.is_some() { "\r\n" } else { "\n" };
                    eprint!("error: {message}{end}");
                }
                Some(exec_output::Output::ExitCode(code)) => {
                    drop(raw);
                    return Ok(ExitCode::from(code as u8));
                }
                None => {}
            }
        }
        anyhow::bail!("the daemon ended the exec without the command's exit code")
    })
}

/// `ignite attach`.
#[derive(Args)]
#[command(after_help = "\
Shows the VM's serial console from now on (`ignite logs` shows what came before) and sends what you \
type to it. When standard input is a terminal it is put in raw mode, so keys like Ctrl-C go to the \
guest. Detach with Ctrl-P Ctrl-Q, like docker; the VM keeps running. Without a terminal, input is \
forwarded until its end and output shown until the VM ends.

Examples:
  ignite attach web
  printf 'reboot\\n' | ignite attach web")]
pub struct AttachArgs {
    /// The VM.
    name: String,
}

/// Ctrl-P.
const CTRL_P: u8 = 0x10;
/// Ctrl-Q.
const CTRL_Q: u8 = 0x11;

/// Finds the Ctrl-P Ctrl-Q detach sequence in typed input, across chunk boundaries.
#[derive(Default)]
struct DetachKeys {
    /// A Ctrl-P ended the previous chunk: held back until the next byte decides.
    held: bool,
}

impl DetachKeys {
    /// The bytes to forward from `input`, and whether the user detached (nothing after the sequence
    /// is forwarded). A Ctrl-P not followed by Ctrl-Q is forwarded as typed.
    fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len() + 1);
        for &byte in input {
            if self.held {
                self.held = false;
                if byte == CTRL_Q {
                    return (out, true);
                }
                out.push(CTRL_P);
            }
            if byte == CTRL_P {
                self.held = true;
            } else {
                out.push(byte);
            }
        }
        (out, false)
    }
}

/// Restores the terminal when dropped.
struct RawMode;

impl RawMode {
    fn enable() -> anyhow::Result<RawMode> {
        ratatui::crossterm::terminal::enable_raw_mode()?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = ratatui::crossterm::terminal::disable_raw_mode();
    }
}

/// Attaches to a VM's console until detached or the VM ends.
pub fn attach(args: AttachArgs, ctx: &Ctx) -> anyhow::Result<()> {
    client::runtime()?.block_on(async {
        let mut c = client::vms(ctx).await?;
        let (tx, rx) = mpsc::channel(8);
        let input = |i| proto::AttachInput { input: Some(i) };
        tx.send(input(attach_input::Input::Name(args.name.clone()))).await?;
        let mut output = c.attach(ReceiverStream::new(rx)).await.map_err(client::status)?.into_inner();
        let tty = std::io::stdin().is_terminal();
        if tty {
            eprintln!("attached to {}: Ctrl-P Ctrl-Q detaches", args.name);
        }
        let raw = if tty { Some(RawMode::enable()?) } else { None };
        let (detached_tx, mut detached) = mpsc::channel::<()>(1);
        tokio::spawn(async move {
            let mut keys = DetachKeys::default();
            let mut chunks = stdin_chunks();
            while let Some(chunk) = chunks.recv().await {
                let (forward, detach) = keys.feed(&chunk);
                if !forward.is_empty() && tx.send(input(attach_input::Input::Stdin(forward))).await.is_err() {
                    return;
                }
                if detach {
                    let _ = detached_tx.send(()).await;
                    return;
                }
            }
            // End of input: keep showing output until the VM ends.
            tx.closed().await;
        });
        let mut stdout = std::io::stdout();
        let ended = loop {
            tokio::select! {
                message = output.message() => match message {
                    Ok(Some(chunk)) => {
                        stdout.write_all(&chunk.data)?;
                        stdout.flush()?;
                    }
                    Ok(None) => break format!("the console of {} closed (the VM ended)", args.name),
                    Err(status) => break format!("error: {}", status.message()),
                },
                _ = detached.recv() => break format!("detached from {}", args.name),
            }
        };
        drop(raw);
        eprintln!("\n{ended}");
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_p_ctrl_q_detaches_even_across_chunks_and_a_lone_ctrl_p_is_typed() {
        let mut keys = DetachKeys::default();
        assert_eq!(keys.feed(b"ls\r"), (b"ls\r".to_vec(), false));
        assert_eq!(keys.feed(&[b'a', CTRL_P, b'b']), (vec![b'a', CTRL_P, b'b'], false));
        assert_eq!(keys.feed(&[b'x', CTRL_P]), (vec![b'x'], false), "Ctrl-P is held back");
        assert_eq!(keys.feed(&[CTRL_P]), (vec![CTRL_P], false), "the held one was typed, the new one held");
        assert_eq!(keys.feed(&[CTRL_Q, b'z']), (vec![], true), "detached; nothing after is sent");
        let mut keys = DetachKeys::default();
        assert_eq!(keys.feed(&[b'q', CTRL_P, CTRL_Q, b'w']), (vec![b'q'], true));
    }
}
