//! The contract between the host and every ignite guest, in one place. Both sides link this crate:
//! `ignite-init` (PID 1 in the guest) and the host side (the image store writes the image config, the
//! controller writes the config drive, boots with [`boot::KERNEL_ARGS`], reads console lines and talks
//! to the exec agent). A change here is a change of the guest ABI: an older `ignite-init` in an image
//! must keep working with a newer host, so fields are added with defaults, never renamed.
//!
//! - [`config`]: the per-VM config drive (`ignite.config=/dev/vdb`): format, codec, limits.
//! - [`image`]: the image configuration the store places at [`image::IMAGE_CONFIG_PATH`] in the root
//!   filesystem, next to `ignite-init` at [`image::INIT_PATH`].
//! - [`boot`]: the kernel command line that starts `ignite-init`, and the console lines it prints that
//!   the host parses (how the main process ended).
//! - [`agent`]: the exec agent's wire protocol on vsock port [`agent::AGENT_PORT`].
//! - [`warm`]: warm start: the template's boot and the identity a restored guest gets on vsock port
//!   [`warm::IDENTITY_PORT`].
//! - [`error_chain`]: how an error and its causes are rendered on one line, the same on both sides (console
//!   lines from the guest, statuses and events on the host).

pub mod agent;
pub mod boot;
pub mod config;
pub mod image;
pub mod warm;

/// An error and its sources on one line, joined with `: ` (`a: b: c`): how both sides render errors for
/// console lines, VM statuses, events and the CLI.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_chain_joins_every_source_in_order() {
        let inner = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let outer = std::io::Error::other(ErrorWithSource("reading /etc/x", inner));
        assert_eq!(super::error_chain(&outer), "reading /etc/x: no such file");
    }

    #[derive(Debug)]
    struct ErrorWithSource(&'static str, std::io::Error);
    impl std::fmt::Display for ErrorWithSource {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for ErrorWithSource {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.1)
        }
    }
}
