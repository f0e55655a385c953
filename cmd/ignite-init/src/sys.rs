//! The system calls ignite-init needs, each wrapped once: mounts, hostname, signals, reaping, power-off
//! (PID 1's), loopback, rlimits, pseudo-terminals, the exec agent's AF_VSOCK sockets and ids, and what a
//! warm start applies (root switch, wall clock, entropy, block device caches, `eth0`'s address and the
//! default route). Every `unsafe` of the guest init that is not about spawning children lives here.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

/// Converts a `-1` return into the current `errno`.
fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Mounts `fstype` at `target` (created if missing) with `data` options; `EBUSY` (already mounted, e.g. the
/// kernel's devtmpfs automount) counts as success.
pub fn mount(fstype: &str, target: &str, flags: libc::c_ulong, data: &str) -> io::Result<()> {
    match mount_source(fstype, target, fstype, flags, data) {
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        other => other,
    }
}

/// Mounts `source` (a block device such as `/dev/vda`, or a name for a pseudo filesystem) as `fstype` at
/// `target` (created if missing) with `flags` and `data` options.
pub fn mount_source(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    let source = CString::new(source)?;
    let target = CString::new(target)?;
    let fstype = CString::new(fstype)?;
    let data = CString::new(data)?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    check(unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) })
}

/// Detaches the mount at `target` (`MNT_DETACH`: at once, even while something still uses it).
pub fn unmount(target: &str) -> io::Result<()> {
    let target = CString::new(target)?;
    // SAFETY: `target` is a valid NUL-terminated string that outlives the call.
    check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) })
}

/// Moves the mount at `source` onto `target` (`MS_MOVE`), as a root switch moves the new root onto `/`.
pub fn move_mount(source: &str, target: &str) -> io::Result<()> {
    let source = CString::new(source)?;
    let target = CString::new(target)?;
    // SAFETY: `source` and `target` are valid NUL-terminated strings that outlive the call; MS_MOVE reads
    // neither the filesystem type nor the data, which may be null.
    check(unsafe { libc::mount(source.as_ptr(), target.as_ptr(), std::ptr::null(), libc::MS_MOVE, std::ptr::null()) })
}

/// Makes `path` this process's root directory (the working directory is left where it is).
pub fn chroot(path: &str) -> io::Result<()> {
    let path = CString::new(path)?;
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    check(unsafe { libc::chroot(path.as_ptr()) })
}

/// The `timespec` of `unix_ns` nanoseconds since the Unix epoch.
fn unix_ns_timespec(unix_ns: u64) -> libc::timespec {
    let seconds = unix_ns / 1_000_000_000;
    libc::timespec {
        tv_sec: libc::time_t::try_from(seconds).unwrap_or(libc::time_t::MAX),
        tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
    }
}

/// Sets the wall clock (`CLOCK_REALTIME`) to `unix_ns` nanoseconds since the Unix epoch.
pub fn set_realtime_clock(unix_ns: u64) -> io::Result<()> {
    let time = unix_ns_timespec(unix_ns);
    // SAFETY: clock_settime reads one timespec, which `time` is and which outlives the call.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) })
}

/// An ioctl request number as the kernel's `_IOC(dir, type, nr, size)` builds it (x86's layout: number in
/// bits 0-7, type 8-15, argument size 16-29, direction 30-31).
const fn ioc(dir: libc::Ioctl, kind: u8, nr: u8, size: usize) -> libc::Ioctl {
    (dir << 30) | ((size as libc::Ioctl) << 16) | ((kind as libc::Ioctl) << 8) | nr as libc::Ioctl
}

/// `_IOC_NONE`: the ioctl takes no argument.
const IOC_NONE: libc::Ioctl = 0;
/// `_IOC_WRITE`: the ioctl reads its argument from user memory.
const IOC_WRITE: libc::Ioctl = 1;
/// `RNDADDENTROPY` (`linux/random.h`): `_IOW('R', 0x03, int[2])`, a `struct rand_pool_info`.
const RNDADDENTROPY: libc::Ioctl = ioc(IOC_WRITE, b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>());
/// `RNDRESEEDCRNG` (`linux/random.h`, Linux 4.17+): `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::Ioctl = ioc(IOC_NONE, b'R', 0x07, 0);
/// `BLKFLSBUF` (`linux/fs.h`): `_IO(0x12, 97)`.
const BLKFLSBUF: libc::Ioctl = ioc(IOC_NONE, 0x12, 97, 0);

/// The `struct rand_pool_info` `RNDADDENTROPY` reads, as the 32-bit words it is made of (its `buf` is a
/// `__u32[]`): the entropy credited in bits (8 per byte), the buffer's size in bytes, then `bytes`.
fn rand_pool_info(bytes: &[u8]) -> io::Result<Vec<u32>> {
    let bits = bytes.len().checked_mul(8).and_then(|b| i32::try_from(b).ok());
    let Some(bits) = bits else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} bytes of entropy is too many", bytes.len()),
        ));
    };
    let mut words = Vec::with_capacity(2 + bytes.len().div_ceil(4));
    words.push(bits as u32);
    words.push(bytes.len() as u32);
    for chunk in bytes.chunks(4) {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        words.push(u32::from_ne_bytes(word));
    }
    Ok(words)
}

/// Mixes `bytes` into the kernel's entropy pool through `random` (an open `/dev/urandom`), crediting
/// 8 bits of entropy per byte (`RNDADDENTROPY`; needs CAP_SYS_ADMIN).
pub fn add_entropy(random: &impl AsRawFd, bytes: &[u8]) -> io::Result<()> {
    let info = rand_pool_info(bytes)?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info: two ints, then `buf_size` bytes; `info` holds exactly
    // that, suitably aligned, and outlives the call.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) })
}

/// Makes the kernel's random number generator reseed from its pool now (`RNDRESEEDCRNG` on `random`, an
/// open `/dev/urandom`): `ENODATA` while it is not initialized, `EINVAL`/`ENOTTY` before Linux 4.17.
pub fn reseed_crng(random: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: RNDRESEEDCRNG takes no argument and has no memory effects on this process.
    check(unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) })
}

/// Writes back and drops the cached pages of the block device open as `device` (`BLKFLSBUF`; needs
/// CAP_SYS_ADMIN), so the next reads come from the disk.
pub fn flush_block_device(device: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: BLKFLSBUF takes no argument and has no memory effects on this process.
    check(unsafe { libc::ioctl(device.as_raw_fd(), BLKFLSBUF) })
}

/// Makes reads on `socket` fail with `EAGAIN` once `timeout` passed without data (`SO_RCVTIMEO`).
pub fn set_receive_timeout(socket: &impl AsRawFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: timeout.subsec_micros().into(),
    };
    let len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
    // SAFETY: SO_RCVTIMEO reads one timeval of `len` bytes, which `tv` is and which outlives the call.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            len,
        )
    };
    check(ret)
}

/// Sets the kernel's hostname.
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

/// The signals init handles synchronously (all blocked, read with [`wait_signal`]).
pub const HANDLED: [libc::c_int; 7] =
    [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2, libc::SIGQUIT];

/// The set of [`HANDLED`] signals.
pub fn handled_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in HANDLED {
        // SAFETY: `set` is a valid, initialized sigset_t and `sig` a valid signal number.
        unsafe { libc::sigaddset(&mut set, sig) };
    }
    set
}

/// Blocks (`block == true`) or unblocks the [`HANDLED`] signals for the calling thread.
pub fn mask_handled(block: bool) -> io::Result<()> {
    let set = handled_set();
    let how = if block { libc::SIG_BLOCK } else { libc::SIG_UNBLOCK };
    // SAFETY: `set` is a valid sigset_t; a null old-set pointer is allowed.
    check(unsafe { libc::sigprocmask(how, &set, std::ptr::null_mut()) })
}

/// Runs in the main process between fork and exec: unblocks the signals init blocked and starts a new
/// session, so the program starts like one launched from a shell.
pub fn in_child() -> io::Result<()> {
    mask_handled(false)?;
    // SAFETY: setsid has no memory effects; it fails only if already a group leader, which is harmless.
    unsafe { libc::setsid() };
    Ok(())
}

/// Waits for one of the blocked [`HANDLED`] signals, at most `timeout`; `None` on timeout or interruption.
pub fn wait_signal(timeout: Option<Duration>) -> Option<libc::c_int> {
    let set = handled_set();
    let ts = timeout.map(|t| libc::timespec { tv_sec: t.as_secs() as libc::time_t, tv_nsec: t.subsec_nanos().into() });
    let ts_ptr = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `set` is valid, `ts_ptr` is null or points at `ts`, and a null siginfo pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), ts_ptr) };
    (sig > 0).then_some(sig)
}

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// It called exit with this status.
    Status(i32),
    /// A signal killed it.
    Signal(i32),
}

impl Exit {
    /// The byte reported to the host: the status, or 128 + the signal number (shell convention).
    pub fn code(self) -> u8 {
        match self {
            Exit::Status(s) => s as u8,
            Exit::Signal(s) => (128 + s) as u8,
        }
    }
}

/// Reaps one exited child without blocking (`pid == -1`: any child); `None` when none is waiting.
pub fn reap(pid: libc::pid_t, block: bool) -> Option<(libc::pid_t, Exit)> {
    let mut status = 0;
    let flags = if block { 0 } else { libc::WNOHANG };
    // SAFETY: `status` is a valid out-pointer.
    let got = unsafe { libc::waitpid(pid, &mut status, flags) };
    if got <= 0 {
        return None;
    }
    let exit = if libc::WIFSIGNALED(status) {
        Exit::Signal(libc::WTERMSIG(status))
    } else {
        Exit::Status(libc::WEXITSTATUS(status))
    };
    Some((got, exit))
}

/// Sends `sig` to `pid`, ignoring a process that is already gone.
pub fn kill(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: kill has no memory effects; a failure (ESRCH) is harmless here.
    unsafe { libc::kill(pid, sig) };
}

/// Makes Ctrl-Alt-Del send SIGINT to init instead of rebooting at once (the VMM's graceful stop).
pub fn disable_ctrl_alt_del() -> io::Result<()> {
    // SAFETY: reboot with RB_DISABLE_CAD only changes the kernel's CAD behaviour.
    check(unsafe { libc::reboot(libc::RB_DISABLE_CAD) })
}

/// Flushes every filesystem.
pub fn sync() {
    // SAFETY: sync has no arguments and no failure mode.
    unsafe { libc::sync() };
}

/// The ignite power port: the VMM ends the VM with the byte written here as its exit status.
const POWER_PORT: u16 = 0xf4;

/// Ends the VM reporting `code`: writes it to the power port from a forked child (user-mode port I/O may
/// fault under an instruction emulator, and must not take PID 1 down with it), then falls back to a reset,
/// which the VMM also treats as the end of the VM. Returns the child's fate if even the reset failed.
pub fn power_off(code: u8) -> io::Error {
    // SAFETY: the child only makes async-signal-safe calls (ioperm, port I/O, _exit) after fork, so the
    // agent's threads (gone in the child) cannot leave it a lock it needs.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: ioperm only changes this process's I/O permission bitmap.
        let ok = unsafe { libc::ioperm(POWER_PORT.into(), 1, 1) } == 0;
        if ok {
            // SAFETY: port 0xf4 is granted above; the write has no effect on this process's memory.
            unsafe { std::arch::asm!("out dx, al", in("dx") POWER_PORT, in("al") code, options(nomem, nostack)) };
        }
        // SAFETY: _exit is always safe to call in the forked child.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    if pid > 0 {
        match reap(pid, true) {
            Some((_, exit)) => eprintln!("ignite-init: power port write did not end the VM ({exit:?}); resetting"),
            None => eprintln!("ignite-init: power port child lost; resetting"),
        }
    }
    // SAFETY: reboot(RB_AUTOBOOT) restarts the machine; the VMM ends the VM on reset.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    io::Error::last_os_error()
}

/// This process's effective user and group ids.
pub fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    // SAFETY: getegid has no preconditions and cannot fail.
    let gid = unsafe { libc::getegid() };
    (uid, gid)
}

/// A fresh AF_VSOCK stream socket (close-on-exec, plus `extra` type flags).
fn vsock_socket(extra: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket has no memory effects; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | extra, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created socket nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The address `cid:port`.
fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; every field is set below or meant to be zero.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

const VSOCK_ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// A listening AF_VSOCK stream socket on `cid` (`libc::VMADDR_CID_ANY`: any) and `port`.
pub fn vsock_listen(cid: u32, port: u32) -> io::Result<OwnedFd> {
    let owned = vsock_socket(0)?;
    let addr = vsock_addr(cid, port);
    // SAFETY: `addr` is a valid sockaddr_vm of VSOCK_ADDR_LEN bytes that outlives the call.
    let ret = unsafe { libc::bind(owned.as_raw_fd(), (&addr as *const libc::sockaddr_vm).cast(), VSOCK_ADDR_LEN) };
    check(ret)?;
    // SAFETY: listen has no memory effects.
    check(unsafe { libc::listen(owned.as_raw_fd(), 16) })?;
    Ok(owned)
}

/// Accepts one connection (close-on-exec, so commands do not inherit it).
pub fn vsock_accept(listener: &OwnedFd) -> io::Result<File> {
    // SAFETY: null address pointers are allowed; the result is checked below.
    let fd =
        unsafe { libc::accept4(listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly accepted socket nobody else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Connects to `cid:port` over AF_VSOCK, waiting at most `timeout`; `None` when nothing answers in time
/// or the connection is refused (e.g. no loopback transport on this host).
pub fn vsock_connect(cid: u32, port: u32, timeout: Duration) -> io::Result<Option<File>> {
    let file = File::from(vsock_socket(libc::SOCK_NONBLOCK)?);
    let fd = file.as_raw_fd();
    let addr = vsock_addr(cid, port);
    // SAFETY: `addr` is a valid sockaddr_vm of VSOCK_ADDR_LEN bytes that outlives the call.
    let ret = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_vm).cast(), VSOCK_ADDR_LEN) };
    if ret < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
        return Ok(None);
    }
    let mut pfd = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfd` is one valid pollfd.
    let ready = unsafe { libc::poll(&mut pfd, 1, millis) };
    let (mut err, mut err_len) = (0i32, std::mem::size_of::<i32>() as libc::socklen_t);
    // SAFETY: `err` and `err_len` are valid out-pointers of the sizes given.
    let got =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&mut err as *mut i32).cast(), &mut err_len) };
    if ready != 1 || got != 0 || err != 0 {
        return Ok(None);
    }
    // SAFETY: F_SETFL on an owned fd has no memory effects.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, 0) })?;
    Ok(Some(file))
}

/// Opens a new pseudo-terminal pair (`/dev/ptmx`, granted and unlocked): its master and its slave,
/// both close-on-exec and neither becoming this process's controlling terminal.
pub fn open_pty() -> io::Result<(File, File)> {
    // SAFETY: posix_openpt has no memory effects; the result is checked below.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly opened master nobody else owns.
    let master = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: grantpt only acts on the open master `fd`.
    check(unsafe { libc::grantpt(master.as_raw_fd()) })?;
    // SAFETY: unlockpt only acts on the open master `fd`.
    check(unsafe { libc::unlockpt(master.as_raw_fd()) })?;
    let mut name = [0u8; 64];
    // SAFETY: `name` is writable for the length given; ptsname_r NUL-terminates within it.
    let ret = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr().cast(), name.len()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let path = std::str::from_utf8(&name[..end]).map_err(io::Error::other)?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot open the pseudo-terminal {path}: {e}")))?;
    Ok((master, slave))
}

/// Sets the window size of the terminal `tty` (either side of a pseudo-terminal); the foreground
/// process group gets SIGWINCH.
pub fn set_window_size(tty: &impl AsRawFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one `winsize`, which `size` is and which outlives the call.
    check(unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &size) })
}

/// The window size of the terminal `tty`: (rows, columns).
pub fn window_size(tty: &impl AsRawFd) -> io::Result<(u16, u16)> {
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one `winsize` into `size`, which is valid and writable.
    check(unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCGWINSZ, &mut size) })?;
    Ok((size.ws_row, size.ws_col))
}

/// Between fork and exec: a new session whose controlling terminal is standard input (the
/// pseudo-terminal's slave), as a login shell has.
fn take_controlling_tty() -> io::Result<()> {
    // SAFETY: setsid has no memory effects; it fails only for a group leader, which a fresh child is not.
    unsafe { libc::setsid() };
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal another session's terminal).
    check(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) })
}

/// Makes `cmd`'s child a session leader with its standard input, a terminal, as its controlling
/// terminal (so job control, Ctrl-C and SIGWINCH reach it).
pub fn controlling_tty_on_exec(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: `take_controlling_tty` only makes async-signal-safe system calls (setsid, ioctl)
    // and allocates nothing, as required between fork and exec.
    unsafe { cmd.pre_exec(take_controlling_tty) };
}

/// Brings the network interface `name` (e.g. `lo`) up: SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP.
/// Returns whether it was down before.
pub fn interface_up(name: &str) -> io::Result<bool> {
    let socket = inet_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS reads the name in and writes the flags into `req`, a valid ifreq.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let up = libc::IFF_UP as libc::c_short;
    if flags & up != 0 {
        return Ok(false);
    }
    req.ifr_ifru.ifru_flags = flags | up;
    // SAFETY: SIOCSIFFLAGS reads the name and flags from `req`, a valid ifreq.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
    Ok(true)
}

/// Whether the network interface `name` is up (SIOCGIFFLAGS).
pub fn interface_is_up(name: &str) -> io::Result<bool> {
    let socket = inet_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS reads the name in and writes the flags into `req`, a valid ifreq.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    Ok(unsafe { req.ifr_ifru.ifru_flags } & libc::IFF_UP as libc::c_short != 0)
}

/// Sets and clears `IFF_*` flags of the network interface `name` (SIOCGIFFLAGS, then SIOCSIFFLAGS when
/// they change). Returns the flags it had.
pub fn change_interface_flags(name: &str, set: libc::c_int, clear: libc::c_int) -> io::Result<libc::c_int> {
    let socket = inet_socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS reads the name in and writes the flags into `req`, a valid ifreq.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    let old = unsafe { req.ifr_ifru.ifru_flags };
    let new = (old | set as libc::c_short) & !(clear as libc::c_short);
    if new != old {
        req.ifr_ifru.ifru_flags = new;
        // SAFETY: SIOCSIFFLAGS reads the name and flags from `req`, a valid ifreq.
        check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
    }
    // `ifru_flags` is a C short holding bit flags: widen its bits, not its sign.
    Ok(libc::c_int::from(old as u16))
}

/// Sets the Ethernet address of the network interface `name` (SIOCSIFHWADDR); many drivers refuse it
/// (`EBUSY`) while the interface is up.
pub fn set_interface_mac(name: &str, mac: [u8; 6]) -> io::Result<()> {
    let socket = inet_socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_hwaddr = ethernet_sockaddr(mac);
    // SAFETY: SIOCSIFHWADDR reads the name and the hardware address from `req`, a valid ifreq.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFHWADDR, &req) })
}

/// Sets the IPv4 address of the network interface `name` (SIOCSIFADDR; the kernel derives a classful
/// netmask, which [`set_interface_netmask`] then replaces).
pub fn set_interface_address(name: &str, address: Ipv4Addr) -> io::Result<()> {
    let socket = inet_socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = ipv4_sockaddr(address);
    // SAFETY: SIOCSIFADDR reads the name and the address from `req`, a valid ifreq.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFADDR, &req) })
}

/// Sets the IPv4 netmask of the network interface `name` (SIOCSIFNETMASK; after its address).
pub fn set_interface_netmask(name: &str, netmask: Ipv4Addr) -> io::Result<()> {
    let socket = inet_socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_netmask = ipv4_sockaddr(netmask);
    // SAFETY: SIOCSIFNETMASK reads the name and the netmask from `req`, a valid ifreq.
    check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFNETMASK, &req) })
}

/// Adds the IPv4 default route via `gateway` out of the network interface `name` (SIOCADDRT; the
/// interface must be up and `gateway` in its subnet). A default route that exists already (`EEXIST`)
/// counts as success.
pub fn add_default_route(name: &str, gateway: Ipv4Addr) -> io::Result<()> {
    ifreq(name)?;
    let dev = CString::new(name)?;
    let socket = inet_socket()?;
    let route = default_route(gateway, &dev);
    // SAFETY: SIOCADDRT reads one rtentry, which `route` is; its `rt_dev` points at `dev`, a
    // NUL-terminated name that outlives the call.
    match check(unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCADDRT, &route) }) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// The `rtentry` SIOCADDRT takes for the default route (destination and mask 0.0.0.0) via `gateway` out
/// of the interface `dev`, which the entry points at.
fn default_route(gateway: Ipv4Addr, dev: &CStr) -> libc::rtentry {
    // SAFETY: rtentry is plain data (addresses, integers, a pointer); all zeroes is a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = ipv4_sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = ipv4_sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = ipv4_sockaddr(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // The kernel only reads the name (the pointer is `char *` in C).
    route.rt_dev = dev.as_ptr().cast_mut();
    route
}

/// An IPv4 address (port 0) as the generic `sockaddr` the interface and route ioctls take.
fn ipv4_sockaddr(address: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        // The octets in network order, as they stand in memory.
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(address.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are plain data of the same size (transmute checks it); the kernel
    // reads a sockaddr of family AF_INET as a sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// An Ethernet hardware address as the `sockaddr` SIOCSIFHWADDR takes: family `ARPHRD_ETHER`, the six
/// bytes first in `sa_data`.
fn ethernet_sockaddr(mac: [u8; 6]) -> libc::sockaddr {
    let mut data = [0 as libc::c_char; 14];
    for (dst, src) in data.iter_mut().zip(mac) {
        *dst = src as libc::c_char;
    }
    libc::sockaddr { sa_family: libc::ARPHRD_ETHER, sa_data: data }
}

/// An AF_INET datagram socket, the handle interface ioctls go through.
fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket has no memory effects; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created socket nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `ifreq` naming interface `name` (at most IFNAMSIZ - 1 bytes, no NUL).
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid interface name {name:?}")));
    }
    // SAFETY: ifreq is plain data (a name and a union of integers); all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// Sets resource limit `resource` of this process (inherited by its children) to `soft` and `hard`
/// (`libc::RLIM_INFINITY`: unlimited).
pub fn set_rlimit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> io::Result<()> {
    let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: setrlimit reads one rlimit, which `limit` is and which outlives the call.
    check(unsafe { libc::setrlimit(resource, &limit) })
}

/// The resource limit `resource` of this process: (soft, hard).
pub fn rlimit(resource: libc::__rlimit_resource_t) -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into `limit`, which is valid and writable.
    check(unsafe { libc::getrlimit(resource, &mut limit) })?;
    Ok((limit.rlim_cur, limit.rlim_max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_pseudo_terminal_pair_carries_bytes_and_a_window_size() {
        let (mut master, mut slave) = match open_pty() {
            Ok(pair) => pair,
            Err(e) => {
                eprintln!("skipping: this host cannot open a pseudo-terminal ({e})");
                return;
            }
        };
        set_window_size(&master, 33, 77).unwrap();
        assert_eq!(window_size(&slave).unwrap(), (33, 77));
        slave.write_all(b"hi\n").unwrap();
        let mut buf = [0u8; 16];
        let n = master.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hi\r\n", "the line discipline maps NL to CR NL");
    }

    #[test]
    fn interface_names_are_bounded() {
        assert!(ifreq("lo").is_ok());
        assert_eq!(ifreq("").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(ifreq("sixteen-chars-xx").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(ifreq("a\0b").unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn loopback_comes_up_in_a_fresh_network_namespace() {
        // A new network namespace for this thread only (namespaces belong to tasks): its `lo` is down.
        let result = std::thread::spawn(|| {
            // SAFETY: unshare only changes this thread's namespaces; it has no memory effects.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let before = interface_is_up("lo").unwrap();
            let changed = interface_up("lo").unwrap();
            let again = interface_up("lo").unwrap();
            Ok((before, changed, interface_is_up("lo").unwrap(), again))
        })
        .join()
        .unwrap();
        match result {
            Err(e) => eprintln!("skipping: a new network namespace needs CAP_SYS_ADMIN (unshare: {e})"),
            Ok(got) => assert_eq!(got, (false, true, true, false), "down, brought up, up, already up"),
        }
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        assert_eq!(RNDRESEEDCRNG, 0x5207);
        assert_eq!(BLKFLSBUF, 0x1261);
        // A number libc spells out, built the same way: TUNSETIFF is _IOW('T', 202, int).
        assert_eq!(ioc(IOC_WRITE, b'T', 202, std::mem::size_of::<libc::c_int>()), libc::TUNSETIFF as libc::Ioctl);
    }

    #[test]
    fn rand_pool_info_holds_the_bits_the_size_and_the_bytes() {
        let info = rand_pool_info(&[1, 2, 3, 4, 5]).unwrap();
        assert_eq!(info[..2], [40, 5], "entropy_count in bits, buf_size in bytes");
        let bytes: Vec<u8> = info[2..].iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, [1, 2, 3, 4, 5, 0, 0, 0]);
        assert_eq!(rand_pool_info(&[]).unwrap(), [0, 0]);
    }

    #[test]
    fn unix_nanoseconds_split_into_seconds_and_nanoseconds() {
        let t = unix_ns_timespec(1_800_000_000_123_456_789);
        assert_eq!((t.tv_sec, t.tv_nsec), (1_800_000_000, 123_456_789));
        let t = unix_ns_timespec(u64::MAX);
        assert_eq!((t.tv_sec, t.tv_nsec), (18_446_744_073, 709_551_615));
    }

    #[test]
    fn addresses_and_routes_are_laid_out_as_the_kernel_reads_them() {
        let sa = ipv4_sockaddr(Ipv4Addr::new(10, 61, 0, 5));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        let data: Vec<u8> = sa.sa_data.iter().map(|&b| b as u8).collect();
        assert_eq!(data, [0, 0, 10, 61, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0], "port 0, the address in network order");

        let hw = ethernet_sockaddr([0x02, 0, 0x0a, 0x3d, 0, 0xff]);
        assert_eq!(hw.sa_family, libc::ARPHRD_ETHER);
        let data: Vec<u8> = hw.sa_data.iter().map(|&b| b as u8).collect();
        assert_eq!(data[..6], [0x02, 0, 0x0a, 0x3d, 0, 0xff]);

        let dev = CString::new("eth0").unwrap();
        let route = default_route(Ipv4Addr::new(10, 61, 0, 1), &dev);
        assert_eq!(route.rt_flags, libc::RTF_UP | libc::RTF_GATEWAY);
        assert_eq!(route.rt_gateway.sa_data[2..6].iter().map(|&b| b as u8).collect::<Vec<_>>(), [10, 61, 0, 1]);
        assert_eq!(route.rt_dst.sa_family, libc::AF_INET as libc::sa_family_t);
        assert!(route.rt_dst.sa_data.iter().chain(&route.rt_genmask.sa_data).all(|&b| b == 0), "0.0.0.0/0");
        assert_eq!(route.rt_dev.cast_const(), dev.as_ptr());
    }

    #[test]
    fn an_address_a_netmask_and_a_default_route_take_effect_in_a_fresh_network_namespace() {
        // `lo` in a new network namespace of this thread stands in for eth0 (it has no MAC to set).
        let result = std::thread::spawn(|| {
            // SAFETY: unshare only changes this thread's namespaces; it has no memory effects.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let before = change_interface_flags("lo", libc::IFF_UP | libc::IFF_RUNNING, 0).unwrap();
            set_interface_address("lo", Ipv4Addr::new(10, 61, 0, 5)).unwrap();
            set_interface_netmask("lo", Ipv4Addr::new(255, 255, 255, 0)).unwrap();
            add_default_route("lo", Ipv4Addr::new(10, 61, 0, 1)).unwrap();
            add_default_route("lo", Ipv4Addr::new(10, 61, 0, 1)).expect("an existing route counts as added");
            let routes = std::fs::read_to_string("/proc/thread-self/net/route").unwrap();
            let fib = std::fs::read_to_string("/proc/thread-self/net/fib_trie").unwrap();
            let up = change_interface_flags("lo", 0, libc::IFF_UP).unwrap();
            let down = change_interface_flags("lo", 0, 0).unwrap();
            Ok((before, routes, fib, up, down))
        })
        .join()
        .unwrap();
        let (before, routes, fib, up, down) = match result {
            Ok(got) => got,
            Err(e) => return eprintln!("skipping: a new network namespace needs CAP_SYS_ADMIN (unshare: {e})"),
        };
        assert_eq!(before & libc::IFF_UP, 0, "a new namespace's lo starts down");
        assert_ne!(up & libc::IFF_UP, 0, "it was brought up");
        assert_eq!(down & libc::IFF_UP, 0, "and taken down again");
        assert!(
            routes.lines().any(|l| l.starts_with("lo\t00000000\t01003D0A\t0003")),
            "default via 10.61.0.1:\n{routes}"
        );
        // The /24's broadcast address: the netmask replaced the classful /8 of SIOCSIFADDR.
        assert!(fib.contains("10.61.0.255") && !fib.contains("10.255.255.255"), "{fib}");
    }

    #[test]
    fn rlimits_read_back() {
        let (soft, hard) = rlimit(libc::RLIMIT_CORE).unwrap();
        set_rlimit(libc::RLIMIT_CORE, soft, hard).unwrap();
        assert_eq!(rlimit(libc::RLIMIT_CORE).unwrap(), (soft, hard));
    }
}
