//! One module per subcommand.

pub mod client;
pub mod daemon;
pub mod dashboard;
pub mod exec;
pub mod follow;
pub mod image;
pub mod kernel;
pub mod run;
pub mod snapshot;
pub mod table;
pub mod template;
pub mod vmm;
pub mod vms;

/// Exit statuses shared by every command that waits for a VM (`run`, `start -a`, `vmm run`): the
/// VMM process's own ([`vmm_core::process`]), also used when the CLI follows a VM through the daemon.
/// 125: ignite or the VMM failed (as Docker uses 125); 126: the guest crashed; 130: the VM was
/// stopped by the host, not ended by its command (Ctrl-C, or another client's `stop`, `kill`, `rm`).
pub use vmm_core::process::{EXIT_GUEST_CRASH, EXIT_STOPPED, EXIT_VMM_ERROR};

/// `outer: inner: innermost`, the way a user reads a cause.
pub fn error_chain(err: &anyhow::Error) -> String {
    err.chain().map(ToString::to_string).collect::<Vec<_>>().join(": ")
}

/// The value parser of `-e/--env NAME=VALUE` (`ignite run`, `create` and `exec`): a name that is
/// not empty, then `=`, then the value (which may be empty or contain `=`).
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("`{s}` is not NAME=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_flags_must_be_name_equals_value() {
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("novalue").is_err());
    }
}
