//! The guest agent: a thread listening on AF_VSOCK port [`AGENT_PORT`] that runs `ignite exec`
//! commands (protocol: `ignite_init::agent`), one thread per connection.
//!
//! PID 1's reaper (`supervise`) reaps every child, the agent's too. So the agent never waits for its
//! children itself: it registers each pid in [`EXEC_CHILDREN`] while holding the table's lock across
//! the spawn, and the reaper holds the same lock while it reaps. Thus a command's exit is always
//! recorded for the agent (never mistaken for the main process's, never lost), and the reaper cannot
//! reap a child that `Command::spawn` itself still waits for after a failed exec.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::sync::{Condvar, Mutex, MutexGuard};

use ignite_init::agent::{self, accept, listen, ExecDefaults, Spawned, AGENT_PORT};

use crate::log;
use crate::sys::{self, Exit};

/// The agent's running commands: pid to exit (`None` while it runs).
pub struct ExecChildren {
    table: Mutex<BTreeMap<libc::pid_t, Option<Exit>>>,
    ended: Condvar,
}

/// The one table, shared by the agent threads and the reaper.
pub static EXEC_CHILDREN: ExecChildren = ExecChildren { table: Mutex::new(BTreeMap::new()), ended: Condvar::new() };

/// The table locked by the reaper: exits recorded through it wake the waiting agent threads.
pub struct Reaping<'a> {
    table: MutexGuard<'a, BTreeMap<libc::pid_t, Option<Exit>>>,
    recorded: bool,
}

impl ExecChildren {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<libc::pid_t, Option<Exit>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks the table for a round of reaping.
    pub fn reaping(&self) -> Reaping<'_> {
        Reaping { table: self.lock(), recorded: false }
    }

    /// Starts `cmd` and registers its pid, holding the table's lock so the reaper cannot reap it in
    /// between (nor while `spawn` itself still waits for a child whose exec failed).
    fn spawn(&self, cmd: &mut std::process::Command) -> io::Result<(std::process::Child, libc::pid_t)> {
        let mut table = self.lock();
        let child = cmd.spawn()?;
        let pid = child.id() as libc::pid_t;
        table.insert(pid, None);
        Ok((child, pid))
    }

    /// Blocks until the reaper recorded `pid`'s exit, and forgets it.
    fn wait(&self, pid: libc::pid_t) -> Exit {
        let mut table = self.lock();
        loop {
            if let Some(Some(exit)) = table.get(&pid) {
                let exit = *exit;
                table.remove(&pid);
                return exit;
            }
            table = self.ended.wait(table).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Reaping<'_> {
    /// Records a reaped child's exit if it is one of the agent's (other orphans are just reaped).
    pub fn record(&mut self, pid: libc::pid_t, exit: Exit) {
        if let Some(slot) = self.table.get_mut(&pid) {
            *slot = Some(exit);
            self.recorded = true;
        }
    }
}

impl Drop for Reaping<'_> {
    fn drop(&mut self) {
        if self.recorded {
            EXEC_CHILDREN.ended.notify_all();
        }
    }
}

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
        let mut cmd = agent::command(request, defaults);
        // SAFETY: `in_child` only makes async-signal-safe calls (sigprocmask, setsid) between fork and exec.
        unsafe { cmd.pre_exec(sys::in_child) };
        let (mut child, pid) = EXEC_CHILDREN.spawn(&mut cmd)?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(io::Error::other("command started without its pipes"));
        };
        // `child` is dropped without waiting: PID 1's reaper reaps it and records its exit.
        Ok(Spawned { stdin, stdout, stderr, wait: Box::new(move || i32::from(EXEC_CHILDREN.wait(pid).code())) })
    });
    if let Err(e) = result {
        log(&format!("guest agent: session failed: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reaper_hands_an_agent_command_its_exit_and_just_reaps_other_children() {
        let (_child, pid) = EXEC_CHILDREN.spawn(std::process::Command::new("sh").args(["-c", "exit 3"])).unwrap();
        // Reaped by the reaper loop below, as PID 1 reaps orphans.
        #[allow(clippy::zombie_processes)]
        let other = std::process::Command::new("sh").args(["-c", "exit 9"]).spawn().unwrap();
        let other_pid = other.id() as libc::pid_t;
        let waiter = std::thread::spawn(move || EXEC_CHILDREN.wait(pid));
        // The reaper's loop as in `supervise`, blocking here since no signal wakes this test.
        let mut reaped = Vec::new();
        while reaped.len() < 2 {
            let mut reaping = EXEC_CHILDREN.reaping();
            if let Some((got, exit)) = sys::reap(-1, true) {
                reaping.record(got, exit);
                reaped.push(got);
            }
        }
        reaped.sort();
        let mut expected = vec![pid, other_pid];
        expected.sort();
        assert_eq!(reaped, expected);
        assert_eq!(waiter.join().unwrap(), Exit::Status(3));
        assert!(EXEC_CHILDREN.lock().is_empty(), "the other child is not recorded, the waited one forgotten");
    }
}
