//! Running the main process as PID 1: spawn it, reap every child, forward signals, stop it gracefully.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use ignite_init::spec::{ProcessSpec, User};

use crate::log;
use ignite_init::sys::{self, Exit};

/// How long the main process gets between SIGTERM and SIGKILL on a graceful stop.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Starts the main process; on failure returns the message and the status to report (127 not found,
/// 126 not executable or other).
pub fn spawn(spec: &ProcessSpec, user: &User) -> Result<libc::pid_t, (String, u8)> {
    if let Err(e) = std::fs::create_dir_all(&spec.working_dir) {
        return Err((format!("cannot create working directory {}: {e}", spec.working_dir), 126));
    }
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..]).env_clear().envs(&spec.env).current_dir(&spec.working_dir);
    if !spec.env.contains_key("HOME") {
        cmd.env("HOME", &user.home);
    }
    cmd.uid(user.uid).gid(user.gid);
    // SAFETY: `in_child` only makes async-signal-safe calls (sigprocmask, setsid) between fork and exec.
    unsafe { cmd.pre_exec(sys::in_child) };
    match cmd.spawn() {
        Ok(child) => Ok(child.id() as libc::pid_t),
        Err(e) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
            Err((format!("cannot execute {:?}: {e}", spec.argv[0]), code))
        }
    }
}

/// Waits for the main process `main` to end while reaping every other child and forwarding signals.
/// SIGINT (Ctrl-Alt-Del from the VMM) and SIGTERM start a graceful stop: `on_stop` (the other
/// services get their SIGTERM), SIGTERM to the main process, then SIGKILL after [`STOP_GRACE`].
pub fn supervise(main: libc::pid_t, on_stop: &dyn Fn()) -> Exit {
    let mut kill_at: Option<Instant> = None;
    loop {
        let timeout = kill_at.map(|at| at.saturating_duration_since(Instant::now()));
        match sys::wait_signal(timeout) {
            Some(libc::SIGCHLD) | None => {}
            Some(sig @ (libc::SIGINT | libc::SIGTERM)) => {
                log(&format!("stop requested (signal {sig}): SIGTERM to the main process"));
                on_stop();
                sys::kill(main, libc::SIGTERM);
                kill_at.get_or_insert_with(|| Instant::now() + STOP_GRACE);
            }
            Some(sig) => sys::kill(main, sig),
        }
        if kill_at.is_some_and(|at| Instant::now() >= at) {
            log("grace period over: SIGKILL to the main process");
            sys::kill(main, libc::SIGKILL);
            kill_at = None;
        }
        // The agent's commands and the node's processes are reaped here too; their exits go to whoever
        // waits for them (see `registered`).
        let mut reaping = crate::registered::CHILDREN.reaping();
        while let Some((pid, exit)) = sys::reap(-1, false) {
            if pid == main {
                return exit;
            }
            reaping.record(pid, exit);
        }
    }
}
