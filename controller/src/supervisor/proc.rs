//! Process identity from `/proc`: a pid plus its start time names one process for good, so a pid
//! recycled by an unrelated process is never mistaken for a VM.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// What the `pid` file of a VM records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInfo {
    /// The VMM process id.
    pub pid: i32,
    /// Its start time (clock ticks after boot, field 22 of `/proc/<pid>/stat`).
    pub started_at: u64,
}

/// What `/proc` says about a live (or zombie) process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// The state letter (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Start time in clock ticks after boot.
    pub started_at: u64,
}

/// Parses the text of `/proc/<pid>/stat`; `None` when it is malformed.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    // The command name may contain spaces and parentheses: the fields start after the last `)`.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let started_at = fields.get(19)?.parse().ok()?;
    Some(ProcStat { state, started_at })
}

/// The state and start time of `pid`, or `None` when there is no such process.
pub(crate) fn stat(pid: i32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The arguments of `pid` (empty for a zombie).
pub(crate) fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
        })
        .unwrap_or_default()
}

/// Whether `args` are those of an `ignite vmm run` serving `socket`.
pub(crate) fn is_vmm_for(args: &[String], socket: &Path) -> bool {
    let socket = socket.to_string_lossy();
    args.windows(2).any(|w| w[0] == "vmm" && w[1] == "run")
        && args.windows(2).any(|w| w[0] == "--control-socket" && w[1] == socket)
}

/// The socket path an `ignite vmm run` process was given, if `args` are those of one.
pub(crate) fn control_socket_of(args: &[String]) -> Option<&str> {
    if !args.windows(2).any(|w| w[0] == "vmm" && w[1] == "run") {
        return None;
    }
    args.windows(2).find(|w| w[0] == "--control-socket").map(|w| w[1].as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        let line = "42 (we ird) (x) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat(line), Some(ProcStat { state: 'S', started_at: 987654 }));
        assert_eq!(parse_stat("42 (x) S 1"), None);
        let me = stat(std::process::id() as i32).unwrap();
        assert!(me.started_at > 0 && me.state != 'Z');
    }

    #[test]
    fn vmm_command_lines_are_recognized_by_their_socket() {
        let args: Vec<String> = ["ignite", "vmm", "run", "--config", "c.json", "--control-socket", "/r/a/control.sock"]
            .map(String::from)
            .into();
        assert!(is_vmm_for(&args, Path::new("/r/a/control.sock")));
        assert!(!is_vmm_for(&args, Path::new("/r/b/control.sock")));
        assert_eq!(control_socket_of(&args), Some("/r/a/control.sock"));
        assert_eq!(control_socket_of(&["sleep".to_string(), "9".to_string()]), None);
    }
}
