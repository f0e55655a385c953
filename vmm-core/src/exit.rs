//! How a VM ends: the first [`ExitReason`] reported wins, every vCPU is kicked out of `KVM_RUN`, and
//! whoever waits on the [`ExitSignal`] is woken.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::lock;
use crate::vcpu::Kicker;

/// Why a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", tag = "reason")]
pub enum ExitReason {
    /// The guest powered off through the power-control port; `code` is the byte it wrote (by
    /// `ignite-init`'s convention, the exit status of the guest's main process).
    PowerOff {
        /// The guest-reported exit code.
        code: u8,
    },
    /// The guest reset the machine (i8042 reset, `reboot`), which ends the VM as in Firecracker.
    Reset,
    /// The guest crashed: a triple fault, or an instruction the VMM cannot run or step over.
    Crash {
        /// What happened, for the user.
        detail: String,
    },
    /// The host stopped the VM by force (after a graceful stop timed out, or on request).
    Stopped,
    /// The VMM itself failed while running the VM (a KVM call failed).
    Error {
        /// What failed.
        detail: String,
    },
}

impl ExitReason {
    /// Whether the guest ended on its own terms (power-off or reset).
    pub fn is_clean(&self) -> bool {
        matches!(self, ExitReason::PowerOff { .. } | ExitReason::Reset)
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::PowerOff { code } => write!(f, "guest powered off (exit code {code})"),
            ExitReason::Reset => write!(f, "guest reset"),
            ExitReason::Crash { detail } => write!(f, "guest crashed: {detail}"),
            ExitReason::Stopped => write!(f, "stopped by the host"),
            ExitReason::Error { detail } => write!(f, "vmm error: {detail}"),
        }
    }
}

/// The VM-wide "it is over" latch.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    cond: Condvar,
    evt: EventFd,
    kicker: Mutex<Option<Kicker>>,
}

impl ExitSignal {
    /// A latch with nothing reported yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            cond: Condvar::new(),
            evt: EventFd::new(EFD_NONBLOCK)?,
            kicker: Mutex::new(None),
        })
    }

    /// Reports why the VM ends. Only the first report counts; later ones are logged and dropped.
    pub fn exit(&self, reason: ExitReason) {
        let mut current = lock(&self.reason);
        if let Some(first) = current.as_ref() {
            tracing::debug!(%reason, %first, "vm already exiting");
            return;
        }
        tracing::info!(%reason, "vm exiting");
        *current = Some(reason);
        // Kick while holding the lock: whoever is woken below may join the vCPU threads, and a
        // thread must not be signalled after it was joined.
        if let Some(kicker) = lock(&self.kicker).as_ref() {
            kicker.kick_all();
        }
        if let Err(err) = self.evt.write(1) {
            tracing::warn!(%err, "exit event could not be signalled");
        }
        self.cond.notify_all();
    }

    /// The reason, once there is one.
    pub fn reason(&self) -> Option<ExitReason> {
        lock(&self.reason).clone()
    }

    /// Whether an exit was reported.
    pub fn is_exiting(&self) -> bool {
        lock(&self.reason).is_some()
    }

    /// Blocks until there is a reason, or `timeout` passes.
    pub fn wait_timeout(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let guard = lock(&self.reason);
        let guard = match timeout {
            None => self.cond.wait_while(guard, |r| r.is_none()).unwrap_or_else(|e| e.into_inner()),
            Some(t) => self.cond.wait_timeout_while(guard, t, |r| r.is_none()).unwrap_or_else(|e| e.into_inner()).0,
        };
        guard.clone()
    }

    /// Readable once an exit is reported (for the event loop).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    pub(crate) fn set_kicker(&self, kicker: Kicker) {
        *lock(&self.kicker) = Some(kicker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn the_first_reason_wins_and_wakes_waiters() {
        let signal = Arc::new(ExitSignal::new().unwrap());
        assert_eq!(signal.wait_timeout(Some(Duration::from_millis(1))), None);
        let waiter = {
            let signal = signal.clone();
            std::thread::spawn(move || signal.wait_timeout(None))
        };
        signal.exit(ExitReason::Reset);
        signal.exit(ExitReason::Stopped);
        assert_eq!(waiter.join().unwrap(), Some(ExitReason::Reset));
        assert_eq!(signal.eventfd().read().unwrap(), 1);
        assert!(ExitReason::PowerOff { code: 3 }.is_clean());
        assert!(!ExitReason::Stopped.is_clean());
    }
}
