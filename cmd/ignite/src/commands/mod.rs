//! One module per subcommand.

pub mod client;
pub mod daemon;
pub mod dashboard;
pub mod exec;
pub mod follow;
pub mod image;
pub mod kernel;
pub mod run;
pub mod table;
pub mod vmm;
pub mod vms;

/// Exit status when ignite itself failed (bad arguments, files, KVM): as Docker uses 125.
pub const EXIT_VMM_ERROR: u8 = 125;
/// Exit status when the guest crashed (triple fault, an instruction that cannot be run).
pub const EXIT_GUEST_CRASH: u8 = 126;
/// Exit status when the VM was stopped by the host, not ended by its command: Ctrl-C (then the
/// grace period ran out, for `ignite vmm run`), or another client's `ignite stop`, `kill` or `rm`
/// while `ignite run` followed the VM.
pub const EXIT_STOPPED: u8 = 130;

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
