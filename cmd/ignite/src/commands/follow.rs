//! `ignite run` in the foreground: the VM's console streams to stdout until its main process ends
//! for good, and that end decides ignite's exit status, as with `docker run`. The daemon's VM
//! watch tells how the VM ended (`status.lastExit`, written once the restart policy leaves the VM
//! stopped), whether someone else stopped or removed it, or whether it cannot run at all.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use controller::grpc::proto::{self, vm_event::Kind, vms_client::VmsClient};
use tonic::transport::Channel;
use tonic::Streaming;

use super::client;
use super::{EXIT_GUEST_CRASH, EXIT_STOPPED, EXIT_VMM_ERROR};

/// After the VM ended, console output is drained until none came for this long: the daemon polls
/// the console log every 200 ms, and the log is complete once the VM's process is gone.
const DRAIN_QUIET: Duration = Duration::from_secs(1);
/// The longest drain, for a console that keeps growing (another process of the same name).
const DRAIN_MAX: Duration = Duration::from_secs(10);
/// How long `--rm` waits for the daemon to finish removing the VM.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(120);

/// How a followed VM ended.
#[derive(Clone, Debug, PartialEq)]
pub enum End {
    /// Its main process ended and the restart policy left it stopped.
    Exited(proto::LastExit),
    /// It stopped after this client's Ctrl-C.
    Interrupted,
    /// Someone else asked for it to be stopped (`ignite stop`, `ignite kill`).
    StoppedByOther,
    /// Someone else removed it (`ignite rm`), or it is being removed.
    Removed,
    /// The daemon cannot run it without a change (bad image, missing kernel...): reason and message.
    CannotRun(String),
}

impl End {
    /// Ignite's exit status for this end, and what to tell the user on stderr (if anything).
    pub fn exit(&self, name: &str) -> (u8, Option<String>) {
        match self {
            End::Exited(exit) => match exit.code {
                Some(code) if !exit.crashed => match u8::try_from(code) {
                    Ok(code) => (code, None),
                    Err(_) => {
                        (EXIT_VMM_ERROR, Some(format!("VM {name:?} ended with exit status {code}, outside 0-255")))
                    }
                },
                _ if exit.crashed => (EXIT_GUEST_CRASH, Some(format!("VM {name:?} crashed: {}", exit.message))),
                _ => (EXIT_VMM_ERROR, Some(format!("VM {name:?} ended without an exit status: {}", exit.message))),
            },
            End::Interrupted => (EXIT_STOPPED, Some(format!("VM {name:?} stopped"))),
            End::StoppedByOther => (
                EXIT_STOPPED,
                Some(format!(
                    "VM {name:?} was stopped by another client (ignite stop or kill) before its command ended"
                )),
            ),
            End::Removed => (
                EXIT_STOPPED,
                Some(format!("VM {name:?} was removed by another client (ignite rm) before its command ended")),
            ),
            End::CannotRun(why) => {
                (EXIT_VMM_ERROR, Some(format!("VM {name:?} cannot run: {why} (it stays declared: ignite rm {name})")))
            }
        }
    }
}

/// What one watch event of the followed VM says: `Some` when following is over. `interrupted`:
/// this client asked for the stop (Ctrl-C), so a desired state `Stopped` is its own.
pub fn judge(event: &proto::VmEvent, interrupted: bool) -> Option<End> {
    if event.kind == Kind::Delete as i32 {
        return Some(End::Removed);
    }
    if event.kind != Kind::Upsert as i32 {
        return None;
    }
    let vm = event.vm.as_ref()?;
    if vm.deletion_requested {
        return Some(End::Removed);
    }
    let status = vm.status.clone().unwrap_or_default();
    if let Some(exit) = status.last_exit {
        return Some(End::Exited(exit));
    }
    if vm.state == "Stopped" {
        return match interrupted {
            false => Some(End::StoppedByOther),
            true if status.phase == "Stopped" => Some(End::Interrupted),
            true => None,
        };
    }
    // Stalled for another reason than its command's exit: the daemon gave up running it.
    let stalled = status.conditions.iter().find(|c| c.r#type == "Stalled" && c.status == "True");
    stalled.filter(|c| c.reason != "Exited").map(|c| End::CannotRun(format!("{}: {}", c.reason, c.message)))
}

/// Follows VM `name`: `watch` must have been opened before the VM was declared, so no change is
/// missed. Streams its console to stdout; the first Ctrl-C stops the VM gracefully, the second
/// kills it. Once it ended: the VM is left stopped (desired state `Stopped`), removed if
/// `remove`, and the exit status is the guest command's (see [`End::exit`]).
pub async fn follow(
    c: &mut VmsClient<Channel>,
    mut watch: Streaming<proto::VmEvent>,
    name: &str,
    remove: bool,
) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigint = signal(SignalKind::interrupt()).context("installing the Ctrl-C (SIGINT) handler")?;
    let request = proto::LogsRequest { name: name.to_string(), follow: true, tail_bytes: 0 };
    let mut logs = c.logs(request).await.map_err(client::status)?.into_inner();
    let mut logs_open = true;
    let mut interrupts = 0u32;
    let end = loop {
        tokio::select! {
            _ = sigint.recv() => {
                interrupts += 1;
                interrupt(c, name, interrupts).await?;
            }
            chunk = logs.message(), if logs_open => match chunk {
                Ok(Some(chunk)) => write_out(&chunk.data)?,
                Ok(None) | Err(_) => logs_open = false,
            },
            event = watch.message() => match event.map_err(client::status).context("watching the VM")? {
                Some(event) if event.name == name => {
                    if let Some(end) = judge(&event, interrupts > 0) {
                        break end;
                    }
                }
                Some(_) => {}
                None => anyhow::bail!("the daemon ended the watch of VM {name:?}: is it shutting down?"),
            },
        }
    };
    if logs_open {
        drain(&mut logs).await?;
    }
    let (code, message) = end.exit(name);
    if let Some(message) = message {
        eprintln!("ignite: {message}");
    }
    if matches!(end, End::Exited(_)) {
        // Nothing restarts it now; `Stopped` makes that explicit, and `ignite start` runs it anew.
        let request = proto::SetStateRequest { name: name.to_string(), state: "Stopped".into() };
        c.set_state(request).await.map_err(client::status).with_context(|| format!("leaving VM {name:?} stopped"))?;
    }
    if remove && end != End::Removed {
        remove_vm(c, &mut watch, name).await?;
    }
    Ok(ExitCode::from(code))
}

/// Ctrl-C number `n`: the first stops the VM gracefully, the second kills it, later ones wait.
async fn interrupt(c: &mut VmsClient<Channel>, name: &str, n: u32) -> anyhow::Result<()> {
    match n {
        1 => {
            eprintln!("ignite: stopping VM {name:?} (Ctrl-C again kills it)");
            let request = proto::SetStateRequest { name: name.to_string(), state: "Stopped".into() };
            c.set_state(request).await.map_err(client::status).with_context(|| format!("stopping VM {name:?}"))?;
        }
        2 => {
            eprintln!("ignite: killing VM {name:?}");
            let request = proto::VmName { name: name.to_string() };
            c.kill(request).await.map_err(client::status).with_context(|| format!("killing VM {name:?}"))?;
        }
        _ => eprintln!("ignite: waiting for VM {name:?} to stop"),
    }
    Ok(())
}

fn write_out(data: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(data).context("writing the console to stdout")?;
    out.flush().context("writing the console to stdout")
}

/// Writes what is left of the console: until it has been quiet for [`DRAIN_QUIET`].
async fn drain(logs: &mut Streaming<proto::LogChunk>) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + DRAIN_MAX;
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(DRAIN_QUIET, logs.message()).await {
            Ok(Ok(Some(chunk))) => write_out(&chunk.data)?,
            _ => break,
        }
    }
    Ok(())
}

/// `--rm`: deletes the VM and waits until the daemon has removed it and everything it owned.
async fn remove_vm(
    c: &mut VmsClient<Channel>,
    watch: &mut Streaming<proto::VmEvent>,
    name: &str,
) -> anyhow::Result<()> {
    let request = proto::DeleteVmRequest { name: name.to_string(), force: false };
    c.delete(request).await.map_err(client::status).with_context(|| format!("removing VM {name:?} (--rm)"))?;
    let gone = async {
        while let Some(event) = watch.message().await.map_err(client::status)? {
            if event.name == name && event.kind == Kind::Delete as i32 {
                return Ok(());
            }
        }
        anyhow::bail!("the daemon ended the watch before VM {name:?} was removed")
    };
    match tokio::time::timeout(REMOVE_TIMEOUT, gone).await {
        Ok(result) => result.with_context(|| format!("removing VM {name:?} (--rm)")),
        Err(_) => anyhow::bail!(
            "VM {name:?} is still being removed after {}s (--rm): see `ignite events`",
            REMOVE_TIMEOUT.as_secs()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upsert(state: &str, phase: &str, f: impl FnOnce(&mut proto::Vm)) -> proto::VmEvent {
        let mut vm = proto::Vm {
            name: "job".into(),
            state: state.into(),
            status: Some(proto::VmStatus { phase: phase.into(), ..Default::default() }),
            ..Default::default()
        };
        f(&mut vm);
        proto::VmEvent { kind: Kind::Upsert as i32, name: "job".into(), vm: Some(vm), revision: 1 }
    }

    fn exited(code: Option<i32>, crashed: bool) -> proto::LastExit {
        proto::LastExit { code, crashed, message: "exit status 3".into(), finished_at: String::new() }
    }

    #[test]
    fn the_watch_tells_when_following_ends() {
        assert_eq!(judge(&upsert("Running", "Creating", |_| {}), false), None);
        assert_eq!(judge(&upsert("Running", "Running", |_| {}), false), None);
        let done =
            upsert("Running", "Failed", |vm| vm.status.as_mut().unwrap().last_exit = Some(exited(Some(3), false)));
        assert_eq!(judge(&done, false), Some(End::Exited(exited(Some(3), false))));
        assert_eq!(judge(&upsert("Stopped", "Running", |_| {}), false), Some(End::StoppedByOther));
        assert_eq!(judge(&upsert("Stopped", "Running", |_| {}), true), None, "our own stop, not done yet");
        assert_eq!(judge(&upsert("Stopped", "Stopped", |_| {}), true), Some(End::Interrupted));
        assert_eq!(judge(&upsert("Running", "Running", |vm| vm.deletion_requested = true), false), Some(End::Removed));
        let delete = proto::VmEvent { kind: Kind::Delete as i32, name: "job".into(), vm: None, revision: 2 };
        assert_eq!(judge(&delete, false), Some(End::Removed));
        let resync = proto::VmEvent { kind: Kind::Resync as i32, ..Default::default() };
        assert_eq!(judge(&resync, false), None);
        let stalled = |reason: &str| {
            upsert("Running", "Failed", |vm| {
                vm.status.as_mut().unwrap().conditions.push(proto::Condition {
                    r#type: "Stalled".into(),
                    status: "True".into(),
                    reason: reason.into(),
                    message: "no such image".into(),
                    last_transition_time: String::new(),
                })
            })
        };
        assert_eq!(
            judge(&stalled("ImagePullFailed"), false),
            Some(End::CannotRun("ImagePullFailed: no such image".into()))
        );
        assert_eq!(judge(&stalled("Exited"), false), None, "an exit is judged by lastExit");
    }

    #[test]
    fn the_exit_status_is_the_guest_commands() {
        assert_eq!(End::Exited(exited(Some(3), false)).exit("job"), (3, None));
        assert_eq!(End::Exited(exited(Some(0), false)).exit("job"), (0, None));
        let (code, message) = End::Exited(exited(None, true)).exit("job");
        assert_eq!(code, EXIT_GUEST_CRASH);
        assert!(message.unwrap().contains("VM \"job\" crashed"));
        assert_eq!(End::Exited(exited(Some(300), false)).exit("job").0, EXIT_VMM_ERROR);
        assert_eq!(End::Interrupted.exit("job").0, 130);
        let (code, message) = End::Removed.exit("job");
        assert!(code != 0 && message.unwrap().contains("removed by another client (ignite rm)"));
        let (code, message) = End::StoppedByOther.exit("job");
        assert!(code != 0 && message.unwrap().contains("stopped by another client"));
        let (code, message) = End::CannotRun("ImagePullFailed: x".into()).exit("job");
        assert!(code == EXIT_VMM_ERROR && message.unwrap().contains("ignite rm job"));
    }
}
