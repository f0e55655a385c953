//! The children PID 1 starts besides the main process (`ignite exec` commands, `kubeadm join`, the
//! kubelet) and whose exits someone waits for.
//!
//! PID 1's reaper (`supervise`) reaps every child with `waitpid(-1)`, so nobody else may wait for
//! one. Instead each such child is started through [`CHILDREN`], which registers its pid while
//! holding the table's lock across the spawn; the reaper holds the same lock while it reaps and
//! records the exits of registered pids. Thus an exit is always recorded for whoever waits (never
//! mistaken for the main process's, never lost), and the reaper cannot reap a child that
//! `Command::spawn` itself still waits for after a failed exec. A signal is sent under the same
//! lock and only to a pid whose exit is not recorded yet: it has not been reaped, so it cannot have
//! been reused.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Condvar, Mutex, MutexGuard};

use ignite_init::sys::{self, Exit};

/// The registered children: pid to exit (`None` while it runs).
pub struct Registered {
    table: Mutex<BTreeMap<libc::pid_t, Option<Exit>>>,
    ended: Condvar,
}

/// The one table, shared by whoever starts children and the reaper.
pub static CHILDREN: Registered = Registered { table: Mutex::new(BTreeMap::new()), ended: Condvar::new() };

/// The table locked by the reaper: exits recorded through it wake the waiting threads.
pub struct Reaping<'a> {
    table: MutexGuard<'a, BTreeMap<libc::pid_t, Option<Exit>>>,
    recorded: bool,
}

impl Registered {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<libc::pid_t, Option<Exit>>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks the table for a round of reaping.
    pub fn reaping(&self) -> Reaping<'_> {
        Reaping { table: self.lock(), recorded: false }
    }

    /// Starts `cmd` and registers its pid, holding the table's lock so the reaper cannot reap it in
    /// between (nor while `spawn` itself still waits for a child whose exec failed).
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, libc::pid_t)> {
        let mut table = self.lock();
        let child = cmd.spawn()?;
        let pid = child.id() as libc::pid_t;
        table.insert(pid, None);
        Ok((child, pid))
    }

    /// Blocks until the reaper recorded `pid`'s exit, and forgets it.
    pub fn wait(&self, pid: libc::pid_t) -> Exit {
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

    /// Sends `signal` to the registered `pid` unless its exit is already recorded.
    pub fn signal(&self, pid: libc::pid_t, signal: libc::c_int) {
        let table = self.lock();
        if let Some(None) = table.get(&pid) {
            sys::kill(pid, signal);
        }
    }
}

impl Reaping<'_> {
    /// Records a reaped child's exit if it is registered (other orphans are just reaped).
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
            CHILDREN.ended.notify_all();
        }
    }
}

/// The node bootstrap's processes, started in PID 1's way (signals unblocked, own session) and
/// registered in [`CHILDREN`].
pub struct Reaped;

impl ignite_init::children::Children for Reaped {
    fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        // SAFETY: `in_child` only makes async-signal-safe calls (sigprocmask, setsid) between fork and exec.
        unsafe { cmd.pre_exec(sys::in_child) };
        CHILDREN.spawn(cmd).map(|(child, _)| child)
    }

    fn wait(&self, pid: u32) -> io::Result<ExitStatus> {
        let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
        Ok(match CHILDREN.wait(pid) {
            Exit::Status(code) => ExitStatus::from_raw((code & 0xff) << 8),
            Exit::Signal(signal) => ExitStatus::from_raw(signal & 0x7f),
        })
    }

    fn signal(&self, pid: u32, signal: libc::c_int) {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            CHILDREN.signal(pid, signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests reap, so they take turns (one would reap the other's children).
    static REAPING_TESTS: Mutex<()> = Mutex::new(());

    #[test]
    fn the_reaper_hands_a_registered_child_its_exit_and_just_reaps_other_children() {
        let _turn = REAPING_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let (_child, pid) = CHILDREN.spawn(std::process::Command::new("sh").args(["-c", "exit 3"])).unwrap();
        // Reaped by the reaper loop below, as PID 1 reaps orphans.
        #[allow(clippy::zombie_processes)]
        let other = std::process::Command::new("sh").args(["-c", "exit 9"]).spawn().unwrap();
        let other_pid = other.id() as libc::pid_t;
        let waiter = std::thread::spawn(move || CHILDREN.wait(pid));
        // The reaper's loop as in `supervise`, blocking here since no signal wakes this test.
        let mut reaped = Vec::new();
        while reaped.len() < 2 {
            let mut reaping = CHILDREN.reaping();
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
        assert!(CHILDREN.lock().is_empty(), "the other child is not recorded, the waited one forgotten");
    }

    #[test]
    fn exits_reach_the_bootstrap_as_exit_statuses_and_signals_only_reach_running_children() {
        use ignite_init::children::Children;
        let _turn = REAPING_TESTS.lock().unwrap_or_else(|p| p.into_inner());
        let sleeper = Reaped.spawn(Command::new("sleep").arg("600")).unwrap().id();
        Reaped.signal(sleeper, libc::SIGTERM);
        let waiter = std::thread::spawn(move || Reaped.wait(sleeper).unwrap());
        // The reaper's loop, for this one child.
        loop {
            let mut reaping = CHILDREN.reaping();
            if let Some((got, exit)) = sys::reap(-1, true) {
                reaping.record(got, exit);
                if got == sleeper as libc::pid_t {
                    break;
                }
            }
        }
        let status = waiter.join().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}");
        // Forgotten after the wait: a second signal goes nowhere.
        Reaped.signal(sleeper, libc::SIGKILL);
        assert!(!CHILDREN.lock().contains_key(&(sleeper as libc::pid_t)));
    }
}
