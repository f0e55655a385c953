//! A test hook, compiled into debug builds only: when [`ENV`] is set, the device thread tries to
//! escape its jail right after installing its seccomp filter, so tests can check that the attempt is
//! refused or kills the VMM with `SIGSYS` (and that the host reports it).

/// The environment variable naming the attempt: `open` (`/etc/shadow`), `exec` (`/bin/sh`) or
/// `ptrace` (attach to PID 1 of its namespace, i.e. itself; the call is what matters).
pub const ENV: &str = "IGNITE_VMM_ESCAPE_TEST";

/// Makes the attempt [`ENV`] names, in debug builds; does nothing otherwise.
pub fn attempt() {
    if !cfg!(debug_assertions) {
        return;
    }
    let Some(what) = std::env::var_os(ENV) else {
        return;
    };
    match what.to_str() {
        Some("open") => {
            let opened = std::fs::File::open("/etc/shadow");
            eprintln!("escape test: open /etc/shadow: {:?}", opened.map(|_| "opened"));
        }
        Some("exec") => {
            let sh = c"/bin/sh";
            let argv = [sh.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null::<libc::c_char>()];
            // SAFETY: NULL-terminated argument and environment arrays of NUL-terminated strings.
            let ret = unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            eprintln!("escape test: execve /bin/sh returned {ret}: {}", std::io::Error::last_os_error());
        }
        Some("ptrace") => {
            // SAFETY: PTRACE_ATTACH takes a pid and ignores the other arguments.
            let ret = unsafe {
                libc::ptrace(
                    libc::PTRACE_ATTACH,
                    1,
                    std::ptr::null_mut::<libc::c_void>(),
                    std::ptr::null_mut::<libc::c_void>(),
                )
            };
            eprintln!("escape test: ptrace attach returned {ret}: {}", std::io::Error::last_os_error());
        }
        _ => eprintln!("escape test: unknown attempt {what:?}"),
    }
}
