//! One watcher thread per VM process: it waits for the process's pidfd to become readable (which
//! works for adopted processes that are not our children), reaps it when it is our child, and
//! reports how it ended.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;

use rustix::event::{poll, PollFd, PollFlags};
use rustix::process::{waitid, WaitId, WaitIdOptions, WaitIdStatus};
use tokio::sync::mpsc::UnboundedSender;
use vmm_core::control::ExitRecord;
use vmm_core::ExitReason;

use super::VmExit;
use crate::layout::VmDir;

/// How much of the end of the console log an exit report carries.
const CONSOLE_TAIL_BYTES: u64 = 4096;

/// Whether the process behind `pidfd` has ended (without blocking).
pub(crate) fn has_ended(pidfd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    matches!(poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
}

/// Waits up to `timeout` for the process behind `pidfd` to end; true when it did.
pub(crate) fn wait_ended(pidfd: &OwnedFd, timeout: std::time::Duration) -> bool {
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    let limit = rustix::event::Timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    loop {
        match poll(&mut fds, Some(&limit)) {
            Ok(n) => return n > 0,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return has_ended(pidfd),
        }
    }
}

/// Reaps the process if it is our child and has ended; `None` when it is not our child.
pub(crate) fn reap(pidfd: &OwnedFd) -> Option<WaitIdStatus> {
    waitid(WaitId::PidFd(pidfd.as_fd()), WaitIdOptions::EXITED | WaitIdOptions::NOHANG).ok().flatten()
}

/// Runs until the process ends (then reports it) or `shutdown`'s peer is closed (then returns quietly,
/// leaving the process to the next supervisor).
pub(crate) fn watch(name: String, dir: &VmDir, pidfd: Arc<OwnedFd>, shutdown: UnixStream, tx: UnboundedSender<VmExit>) {
    let ended = {
        let mut fds = [PollFd::new(&*pidfd, PollFlags::IN), PollFd::new(&shutdown, PollFlags::IN)];
        loop {
            match poll(&mut fds, None) {
                // A closed supervisor wins even when the process ended too: the next one reports it.
                Ok(_) => break fds[1].revents().is_empty() && !fds[0].revents().is_empty(),
                Err(rustix::io::Errno::INTR) => continue,
                Err(err) => {
                    tracing::error!(vm = %name, %err, "cannot watch the vm process");
                    return;
                }
            }
        }
    };
    if !ended {
        return;
    }
    let status = reap(&pidfd);
    remove_sockets(dir);
    let exit = exit_report(name, dir, status);
    tracing::info!(vm = %exit.name, reason = %exit.reason, code = ?exit.code, "vm process ended");
    // Nobody listening (the supervisor is gone) is fine: the VMM's exit record still tells the next one.
    let _ = tx.send(exit);
}

/// Removes the sockets an ended VMM leaves in its run directory (a jailed one cannot reach them).
pub(crate) fn remove_sockets(dir: &VmDir) {
    use std::os::unix::fs::FileTypeExt;
    for path in dir.sockets() {
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
            if let Err(err) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), %err, "socket of an ended vmm not removed");
            }
        }
    }
}

/// How the VM in `dir` ended: from its exit file when there is one, else from the wait status.
pub(crate) fn exit_report(name: String, dir: &VmDir, status: Option<WaitIdStatus>) -> VmExit {
    let console_tail = tail(&dir.console_log());
    let record =
        std::fs::read_to_string(dir.exit_record()).ok().and_then(|text| serde_json::from_str::<ExitRecord>(&text).ok());
    if let Some(record) = record {
        return VmExit { name, reason: record.exit, code: Some(record.exit_code), signal: None, console_tail };
    }
    let signal = status.and_then(|s| s.terminating_signal());
    let code = status.and_then(|s| s.exit_status());
    let detail = match (signal, code) {
        // The VMM's SIGSYS handler logged which call and which thread broke its seccomp filter.
        (Some(sig), _) if sig == libc_sigsys() => match seccomp_report(&tail(&dir.vmm_log())) {
            Some(report) => format!("the vmm process was killed by seccomp: {report}"),
            None => format!("the vmm process was killed by signal {sig} (SIGSYS) before recording an exit"),
        },
        (Some(sig), _) => format!("the vmm process was killed by signal {sig} before recording an exit"),
        (None, Some(code)) => format!(
            "the vmm process exited with status {code} without recording an exit: {}",
            tail(&dir.vmm_log()).trim()
        ),
        (None, None) => "the vmm process ended without recording an exit".to_string(),
    };
    VmExit { name, reason: ExitReason::Crash { detail }, code, signal, console_tail }
}

/// `SIGSYS`, the signal a seccomp violation kills the VMM with.
fn libc_sigsys() -> i32 {
    rustix::process::Signal::SYS.as_raw()
}

/// The last seccomp report in a VMM log tail (`syscall N (name) by the T thread`).
fn seccomp_report(log: &str) -> Option<String> {
    log.lines().rev().find_map(vmm_core::jail::seccomp::parse_report).map(str::to_string)
}

/// The last few KiB of a log file, lossily decoded; empty when it cannot be read.
pub(crate) fn tail(path: &Path) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(len.saturating_sub(CONSOLE_TAIL_BYTES))).is_err()
        || file.read_to_end(&mut buf).is_err()
    {
        return String::new();
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_file_wins_and_its_absence_is_a_crash() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = VmDir::new(tmp.path(), "a");
        std::fs::create_dir(dir.path()).unwrap();
        std::fs::write(dir.console_log(), "x".repeat(5000) + "END").unwrap();
        let exit = exit_report("a".into(), &dir, None);
        assert!(matches!(exit.reason, ExitReason::Crash { .. }), "{exit:?}");
        assert_eq!(exit.console_tail.len(), 4096);
        assert!(exit.console_tail.ends_with("END"));
        ExitRecord { exit: ExitReason::PowerOff { code: 3 }, exit_code: 3 }.write_atomic(&dir.exit_record()).unwrap();
        let exit = exit_report("a".into(), &dir, None);
        assert_eq!((exit.reason, exit.code), (ExitReason::PowerOff { code: 3 }, Some(3)));
    }
}
