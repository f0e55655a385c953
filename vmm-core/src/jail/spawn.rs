//! Starting a VMM process in its own namespaces: `clone3` with a pidfd, then `execve` with a clean
//! environment and only stdin (`/dev/null`), stdout and stderr open (and, when asked, one more
//! descriptor as fd 3: the parent's lifeline, see [`crate::process`]).

use std::ffi::{CString, OsString};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What to start.
pub struct SpawnSpec<'a> {
    /// The program (an absolute path: no `PATH` search).
    pub program: &'a Path,
    /// Its arguments, without the program name.
    pub args: &'a [OsString],
    /// The whole environment it gets.
    pub env: &'a [(OsString, OsString)],
    /// Its standard output and error (inherited when `None`).
    pub stdout: Option<BorrowedFd<'a>>,
    /// Its standard error (inherited when `None`).
    pub stderr: Option<BorrowedFd<'a>>,
    /// New mount, PID, IPC and UTS namespaces (the process is PID 1 of its own).
    pub namespaces: bool,
    /// Its own process group, so a Ctrl-C to the caller's terminal never reaches it.
    pub process_group: bool,
    /// A descriptor the child gets as fd 3 (all others but 0-2 are closed).
    pub fd3: Option<BorrowedFd<'a>>,
}

fn cstr(bytes: &[u8]) -> std::io::Result<CString> {
    CString::new(bytes).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL byte in an argument"))
}

/// The kernel's `struct clone_args` (the fields up to `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Starts `spec` and returns its pid (in the caller's namespace) and a pidfd for it. An `execve`
/// failure is reported here, not as an exit status.
pub fn spawn(spec: &SpawnSpec<'_>) -> std::io::Result<(i32, OwnedFd)> {
    // Everything the child needs is prepared here: between clone and exec it may only make system
    // calls (the parent may be multi-threaded, so no allocation and no locks).
    let program = cstr(spec.program.as_os_str().as_bytes())?;
    let mut argv_owned = vec![program.clone()];
    for arg in spec.args {
        argv_owned.push(cstr(arg.as_bytes())?);
    }
    let env_owned = spec
        .env
        .iter()
        .map(|(k, v)| cstr(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<std::io::Result<Vec<_>>>()?;
    let argv: Vec<*const libc::c_char> =
        argv_owned.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let envp: Vec<*const libc::c_char> =
        env_owned.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
    let null = std::fs::File::open("/dev/null")?;
    // The child reports an exec failure as its errno on this pipe; a successful exec closes it.
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned this descriptor, owned by nobody else.
    let reader = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let pipe_writer = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    // Every descriptor the child moves is first copied above the standard ones, so no dup2 onto 0-2
    // can clobber one still to be moved (a daemon may run with some of 0-2 closed).
    // (Above 3, too, so the dup2 onto fd 3 cannot clobber one either.)
    let high = |fd: BorrowedFd<'_>| -> std::io::Result<OwnedFd> {
        // SAFETY: F_DUPFD_CLOEXEC on a valid descriptor returns a new one or -1.
        let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 4) };
        if new == -1 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fcntl just returned this descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(new) })
    };
    // SAFETY: 1 is the caller's own standard output, borrowed only for this call.
    let own_out = unsafe { BorrowedFd::borrow_raw(1) };
    // SAFETY: 2 likewise.
    let own_err = unsafe { BorrowedFd::borrow_raw(2) };
    let stdin = high(null.as_fd())?;
    let stdout = high(spec.stdout.unwrap_or(own_out))?;
    let stderr = high(spec.stderr.unwrap_or(own_err))?;
    let fd3 = spec.fd3.map(high).transpose()?;
    let writer = high(pipe_writer.as_fd())?;
    // Only the child may hold the write end, or the read below never sees the end of the pipe.
    drop(pipe_writer);
    let child = ChildFds {
        stdin: stdin.as_raw_fd(),
        stdout: stdout.as_raw_fd(),
        stderr: stderr.as_raw_fd(),
        fd3: fd3.as_ref().map(AsRawFd::as_raw_fd),
        error_pipe: writer.as_raw_fd(),
        process_group: spec.process_group,
    };
    let mut pidfd: libc::c_int = -1;
    let mut flags = libc::CLONE_PIDFD as u64;
    if spec.namespaces {
        flags |= (libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) as u64;
    }
    let args = CloneArgs {
        flags,
        pidfd: std::ptr::addr_of_mut!(pidfd) as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    // SAFETY: a valid clone_args of the size given; without CLONE_VM the child gets its own copy of
    // the address space, and the child branch below only makes system calls before exec or _exit.
    let pid = unsafe { libc::syscall(libc::SYS_clone3, &args, std::mem::size_of::<CloneArgs>()) };
    if pid == -1 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        exec_child(&child, &argv, &envp);
    }
    drop((writer, stdin, stdout, stderr, fd3));
    // SAFETY: clone3 wrote a new pidfd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let pid = i32::try_from(pid).unwrap_or(i32::MAX);
    let mut errno = [0u8; 4];
    let mut reader = std::fs::File::from(reader);
    match reader.read(&mut errno) {
        Ok(4) => {
            // The child is a zombie by now; reap it so it does not linger.
            // SAFETY: waiting for our own child by pid, with no status wanted.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            Err(std::io::Error::from_raw_os_error(i32::from_ne_bytes(errno)))
        }
        _ => Ok((pid, pidfd)),
    }
}

/// The descriptors the child arranges before exec.
struct ChildFds {
    stdin: libc::c_int,
    stdout: libc::c_int,
    stderr: libc::c_int,
    fd3: Option<libc::c_int>,
    error_pipe: libc::c_int,
    process_group: bool,
}

/// The child between clone and exec: only async-signal-safe system calls on the descriptors and
/// strings prepared before the clone (`argv` and `envp` are NULL-terminated). Never returns.
fn exec_child(fds: &ChildFds, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> ! {
    let fail = || -> ! {
        // SAFETY: returns this thread's errno location, which is always valid.
        let location = unsafe { libc::__errno_location() };
        // SAFETY: see above.
        let errno = unsafe { *location };
        // SAFETY: writes 4 bytes from a local.
        unsafe { libc::write(fds.error_pipe, errno.to_ne_bytes().as_ptr().cast(), 4) };
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(127) }
    };
    // SAFETY: an all-zero sigset_t is a valid (empty) set.
    let set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: unblocks every signal: the daemon's mask must not leak into the VMM.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) };
    // SAFETY: restores the default disposition the Rust runtime changed.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // All sources are above 2 (see `spawn`), and dup2 clears close-on-exec on the copies.
    for (from, to) in [(fds.stdin, 0), (fds.stdout, 1), (fds.stderr, 2)] {
        // SAFETY: both are descriptor numbers; dup2 validates them.
        if unsafe { libc::dup2(from, to) } == -1 {
            fail();
        }
    }
    // SAFETY: as above; the source is above 3 (see `spawn`).
    if fds.fd3.is_some_and(|from| unsafe { libc::dup2(from, 3) } == -1) {
        fail();
    }
    let first_closed = if fds.fd3.is_some() { 4 } else { 3 };
    // SAFETY: puts the child in a new process group of its own.
    if fds.process_group && unsafe { libc::setpgid(0, 0) } == -1 {
        fail();
    }
    // Every other descriptor is closed except the error pipe (close-on-exec: exec closes it).
    if fds.error_pipe > first_closed {
        // SAFETY: closes a range of this child's descriptors.
        unsafe { libc::syscall(libc::SYS_close_range, first_closed as u32, (fds.error_pipe - 1) as u32, 0u32) };
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, (fds.error_pipe + 1) as u32, u32::MAX, 0u32) };
    // SAFETY: NULL-terminated arrays of NUL-terminated strings prepared before the clone.
    unsafe { libc::execve(argv[0], argv.as_ptr(), envp.as_ptr()) };
    fail()
}
