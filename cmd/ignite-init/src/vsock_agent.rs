//! The guest agent: a thread listening on AF_VSOCK port [`AGENT_PORT`] that runs `ignite exec`
//! commands (protocol: `guest_api::agent`), one thread per connection.
//!
//! PID 1's reaper (`supervise`) reaps every child, the agent's too. So the agent never waits for its
//! children itself: it starts them through [`CHILDREN`], the table the reaper records exits in.

use std::fs::File;
use std::os::unix::process::CommandExt;

use guest_api::agent::AGENT_PORT;
use ignite_init::agent::{self, Accounts, ExecDefaults, Prepared, Spawned};
use ignite_init::sys::{self, vsock_accept as accept, vsock_listen as listen};

use crate::log;
use crate::registered::CHILDREN;

/// Starts the agent thread on port [`AGENT_PORT`]; commands start from `defaults`. Failing to listen
/// (no vsock device) is logged, not fatal: the VM runs without `ignite exec`.
pub fn start(defaults: ExecDefaults) {
    let listener = match listen(libc::VMADDR_CID_ANY, AGENT_PORT) {
        Ok(fd) => fd,
        Err(e) => {
            log(&format!("guest agent disabled: cannot listen on vsock port {AGENT_PORT}: {e}"));
            return;
        }
    };
    let spawned = std::thread::Builder::new().name("agent".into()).spawn(move || loop {
        match accept(&listener) {
            Ok(conn) => {
                let defaults = defaults.clone();
                let _ =
                    std::thread::Builder::new().name("agent-session".into()).spawn(move || session(conn, &defaults));
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => {
                log(&format!("guest agent: accept failed: {e}"));
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    });
    if let Err(e) = spawned {
        log(&format!("guest agent disabled: cannot start its thread: {e}"));
    }
}

fn session(conn: File, defaults: &ExecDefaults) {
    let reader = match conn.try_clone() {
        Ok(r) => r,
        Err(e) => return log(&format!("guest agent: {e}")),
    };
    let result = agent::serve(reader, conn, |request| {
        let Prepared { mut cmd, pty } = agent::command(request, defaults, &Accounts::read())?;
        // SAFETY: `in_child` only makes async-signal-safe calls (sigprocmask, setsid) between fork and exec.
        unsafe { cmd.pre_exec(sys::in_child) };
        let (mut child, pid) = CHILDREN.spawn(&mut cmd)?;
        // Close our copies of a terminal's slave: the output ends when the command's copies close.
        drop(cmd);
        // `child` is dropped without waiting: PID 1's reaper reaps it and records its exit.
        Spawned::new(&mut child, pty, Box::new(move || i32::from(CHILDREN.wait(pid).code())))
    });
    if let Err(e) = result {
        log(&format!("guest agent: session failed: {e}"));
    }
}
