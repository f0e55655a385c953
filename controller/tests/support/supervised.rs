//! Waiting on VMs run by a real `Supervisor`: shared by the supervisor and jail tests.

use std::time::{Duration, Instant};

use controller::supervisor::{Supervisor, VmExit};
use tokio::sync::mpsc::UnboundedReceiver;

/// Polls `cond` every 20 ms; fails the test after `guard` (a hang guard, not a time budget).
pub fn wait_for(guard: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < guard, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The next VM exit report, waiting at most `guard`.
pub fn next_exit(rx: &mut UnboundedReceiver<VmExit>, guard: Duration) -> VmExit {
    let mut exit = None;
    wait_for(guard, "a vm exit report", || {
        exit = rx.try_recv().ok();
        exit.is_some()
    });
    exit.unwrap()
}

/// VM `name`'s console log so far.
pub fn console(sup: &Supervisor, name: &str) -> String {
    std::fs::read_to_string(sup.vm_dir(name).console_log()).unwrap_or_default()
}

/// The process state letter, or `None` once the process is gone (reaped).
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().next()?.chars().next()
}
