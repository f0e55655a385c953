//! How a VM's last process ended, kept as `ROOT/runtime/<vm>/exit.json` so it survives a daemon
//! restart until the reconciler has acted on it (restart policy).

use std::path::Path;

use vmm_core::ExitReason;

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

fn file(dir: &Path) -> std::path::PathBuf {
    dir.join("exit.json")
}

/// Records `exit` in the VM's runtime directory `dir` (if the directory exists).
pub fn save(dir: &Path, exit: &Exit) -> std::io::Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    let tmp = dir.join("exit.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(exit).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, file(dir))
}

/// The recorded exit, if any.
pub fn load(dir: &Path) -> Option<Exit> {
    std::fs::read(file(dir)).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

/// Forgets the recorded exit (a new start, or a deliberate stop).
pub fn clear(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(file(dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
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
        let dir = tempfile::tempdir().unwrap();
        let exit = Exit { code: Some(1), crashed: false, detail: "exit status 1".into() };
        save(dir.path(), &exit).unwrap();
        assert_eq!(load(dir.path()), Some(exit));
        clear(dir.path()).unwrap();
        clear(dir.path()).unwrap();
        assert_eq!(load(dir.path()), None);
        save(&dir.path().join("missing"), &Exit::default()).unwrap();
    }
}
