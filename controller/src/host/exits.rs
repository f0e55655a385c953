//! How a VM's last process ended, kept as `ROOT/runtime/<vm>/last-exit.json`
//! ([`RuntimeDir::last_exit`]) so it survives a daemon restart until the reconciler has acted on it
//! (restart policy).
//!
//! An exit is translated here, once: the supervisor reports the VMM's own record ([`VmExit`]: the
//! engine's `ExitReason`, the process status, the console's tail); [`exit_of`] turns it into the
//! [`Exit`] the reconciler judges restarts by and the status shows (as `api::LastExit`).

use vmm_core::ExitReason;

use crate::layout::RuntimeDir;
use crate::reconcile::Exit;
use crate::supervisor::VmExit;

/// Turns a supervisor report into what the reconciler judges restarts by.
pub fn exit_of(exit: &VmExit) -> Exit {
    match &exit.reason {
        ExitReason::PowerOff { code } => {
            Exit { code: Some(i32::from(*code)), crashed: false, detail: format!("exit status {code}") }
        }
        ExitReason::Reset => {
            // The guest rebooted: ignite-init reports its main process's status before that.
            let code = guest_api::boot::exit_status(&exit.console_tail);
            let detail = match code {
                Some(c) => format!("exit status {c}"),
                None => "the guest rebooted".to_string(),
            };
            Exit { code: Some(code.unwrap_or(0)), crashed: false, detail }
        }
        ExitReason::Crash { detail } => Exit { code: exit.code, crashed: true, detail: detail.clone() },
        ExitReason::Error { detail } => Exit { code: exit.code, crashed: true, detail: format!("vmm error: {detail}") },
        ExitReason::Stopped => Exit { code: None, crashed: false, detail: "stopped by the host".into() },
    }
}

/// Records `exit` in the VM's runtime directory (if the directory exists).
pub fn save(dir: &RuntimeDir, exit: &Exit) -> std::io::Result<()> {
    if !dir.path().is_dir() {
        return Ok(());
    }
    crate::private::write_json_atomic(&dir.last_exit(), exit)
}

/// The recorded exit, if any (also from the file name releases before `last-exit.json` used).
pub fn load(dir: &RuntimeDir) -> Option<Exit> {
    [dir.last_exit(), dir.legacy_last_exit()]
        .iter()
        .find_map(|file| std::fs::read(file).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Forgets the recorded exit (a new start, or a deliberate stop).
pub fn clear(dir: &RuntimeDir) -> std::io::Result<()> {
    for file in [dir.last_exit(), dir.legacy_last_exit()] {
        match std::fs::remove_file(file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_exit(reason: ExitReason, tail: &str) -> VmExit {
        VmExit { name: "web".into(), reason, code: None, signal: None, console_tail: tail.into() }
    }

    #[test]
    fn exits_map_to_codes_and_crashes() {
        assert_eq!(exit_of(&vm_exit(ExitReason::PowerOff { code: 3 }, "")).code, Some(3));
        let reset =
            exit_of(&vm_exit(ExitReason::Reset, "x\nignite-init: exit status=7\r\nreboot: Restarting system\n"));
        assert_eq!((reset.code, reset.crashed), (Some(7), false));
        assert!(exit_of(&vm_exit(ExitReason::Reset, "")).succeeded());
        assert!(exit_of(&vm_exit(ExitReason::Crash { detail: "triple fault".into() }, "")).crashed);
        assert!(!exit_of(&vm_exit(ExitReason::Stopped, "")).succeeded());
    }

    #[test]
    fn saved_exits_load_and_clear() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = RuntimeDir::new(tmp.path(), "web");
        std::fs::create_dir(dir.path()).unwrap();
        let exit = Exit { code: Some(1), crashed: false, detail: "exit status 1".into() };
        save(&dir, &exit).unwrap();
        assert_eq!(load(&dir), Some(exit.clone()));
        clear(&dir).unwrap();
        clear(&dir).unwrap();
        assert_eq!(load(&dir), None);
        save(&RuntimeDir::new(tmp.path(), "missing"), &Exit::default()).unwrap();
        // A record an older release wrote under the old name is still read, and cleared.
        std::fs::write(dir.legacy_last_exit(), serde_json::to_vec(&exit).unwrap()).unwrap();
        assert_eq!(load(&dir), Some(exit));
        clear(&dir).unwrap();
        assert_eq!(load(&dir), None);
    }
}
