//! How the node bootstrap ([`crate::node`]) starts, waits for and signals its processes.
//!
//! In the guest, PID 1's reaper reaps every child (`waitpid(-1)`), so a child's exit can only be
//! learnt from the reaper: `ignite-init` implements [`Children`] with a table the reaper records
//! exits in (the same one `ignite exec` commands use). Anywhere else (tests) [`Direct`] waits for
//! the pid itself.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus};

/// Starts child processes and learns how they ended.
pub trait Children: Send + Sync {
    /// Starts `cmd`. The caller takes the pipes it asked for from the returned [`Child`] but never
    /// waits on it: it calls [`Children::wait`] with its pid.
    fn spawn(&self, cmd: &mut Command) -> io::Result<Child>;
    /// Blocks until the child `pid` (started by [`Children::spawn`]) ended, and returns how.
    fn wait(&self, pid: u32) -> io::Result<ExitStatus>;
    /// Sends `signal` to the child `pid` if it has not ended yet.
    fn signal(&self, pid: u32, signal: libc::c_int);
}

/// For a process that is not PID 1 with a reaper (tests, tools): waits for each pid itself. A signal
/// sent after the wait may reach a process that reused the pid; PID 1's implementation has no such gap.
pub struct Direct;

impl Children for Direct {
    fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        cmd.spawn()
    }

    fn wait(&self, pid: u32) -> io::Result<ExitStatus> {
        let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
        let mut status = 0;
        loop {
            // SAFETY: `status` is a valid out-pointer for the duration of the call.
            let got = unsafe { libc::waitpid(pid, &mut status, 0) };
            if got == pid {
                return Ok(ExitStatus::from_raw(status));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    fn signal(&self, pid: u32, signal: libc::c_int) {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: kill has no memory effects; a child that is already gone makes it fail harmlessly.
            unsafe { libc::kill(pid, signal) };
        }
    }
}
