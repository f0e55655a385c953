//! How the host starts `ignite-init` and what `ignite-init` tells the host on the console.

/// The kernel command line for a guest whose root disk is `/dev/vda` (ext4) and whose config drive is
/// `/dev/vdb`: the serial console, a reboot or panic ends the VM, and `ignite-init` as PID 1.
pub const KERNEL_ARGS: &str =
    "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw rootfstype=ext4 init=/sbin/ignite-init ignite.config=/dev/vdb";

/// The kernel command line parameter naming the config drive (see [`crate::config`]).
pub const CONFIG_PARAM: &str = "ignite.config=";

/// How `ignite-init` prefixes every console line it writes.
pub const CONSOLE_PREFIX: &str = "ignite-init: ";

/// What follows [`CONSOLE_PREFIX`] when the main process exited with a status.
const EXIT_STATUS: &str = "exit status=";

/// The console line (without [`CONSOLE_PREFIX`]) that reports the main process's exit status; the
/// host reads it back with [`exit_status`] when the guest rebooted rather than powered off.
pub fn exit_status_line(status: impl std::fmt::Display) -> String {
    format!("{EXIT_STATUS}{status}")
}

/// The exit status `ignite-init` reported in `console` (the last report wins), if any.
pub fn exit_status(console: &str) -> Option<i32> {
    let marker = format!("{CONSOLE_PREFIX}{EXIT_STATUS}");
    let at = console.rfind(&marker)?;
    let rest = &console[at + marker.len()..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_reported_status_wins_and_garbage_reports_none() {
        let line = |s: i32| format!("{CONSOLE_PREFIX}{}\n", exit_status_line(s));
        assert_eq!(exit_status(&format!("boot\n{}{}", line(3), line(0))), Some(0));
        assert_eq!(exit_status(&line(42)), Some(42));
        assert_eq!(exit_status("ignite-init: exit status=x\n"), None);
        assert_eq!(exit_status("nothing here"), None);
    }

    #[test]
    fn the_kernel_arguments_start_ignite_init_with_the_config_drive() {
        assert!(KERNEL_ARGS.contains(&format!("init=/{}", crate::image::INIT_PATH)));
        assert!(KERNEL_ARGS.contains(&format!("{CONFIG_PARAM}/dev/vdb")));
    }
}
