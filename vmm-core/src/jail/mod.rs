//! The jail every VMM process runs in, set up by the process itself before any guest code runs.
//!
//! The order is what makes it safe:
//! 1. [`spawn`] starts `ignite vmm run` in new mount, PID, IPC and UTS namespaces with a clean
//!    environment and only stdin/stdout/stderr open (the daemon and a root user running it by hand
//!    share that function).
//! 2. The process moves itself into its cgroups ([`join_cgroups`]) before it allocates guest memory,
//!    so every page is charged to the VM.
//! 3. It opens everything the VM needs while it still can: `/dev/kvm`, disks, kernel, initrd, taps,
//!    console log, exit file and its sockets.
//! 4. [`enter`], on the only thread: `pivot_root` into a small read-only tmpfs holding just a few
//!    device nodes, rlimits, an empty capability bounding set, the VM's own unprivileged uid and gid,
//!    no capabilities at all, and `no_new_privs`.
//! 5. Every thread then installs its own seccomp allow-list ([`seccomp::apply`]) before it serves
//!    guest or client input; a forbidden call kills the process with `SIGSYS` and says which.

pub mod cgroup;
pub mod escape_test;
pub mod seccomp;
mod spawn;
mod syscalls;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use spawn::{spawn, SpawnSpec};

/// Device nodes a jail offers (those the host has), bind-mounted at the same path.
pub const JAIL_DEVICES: [&str; 4] = ["/dev/kvm", "/dev/net/tun", "/dev/urandom", "/dev/null"];

/// Where a jailed VMM sees its snapshot directory ([`crate::VmConfig::snapshot_dir`], bind-mounted
/// read-write; the only writable place in the jail).
pub const JAIL_SNAPSHOTS: &str = "/snapshots";

/// The size of the jail's root tmpfs: it only holds empty mount points.
const JAIL_ROOT_TMPFS: &str = "size=64k,nr_inodes=64,mode=0755";

/// How a VMM process is jailed (part of its [`crate::VmConfig`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JailConfig {
    /// The unprivileged user the VMM runs as (never 0, never shared by two live VMs).
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// An existing directory owned by root where the jail's root (a tiny tmpfs) is mounted inside the
    /// VMM's own mount namespace; nothing is written to it on the host.
    pub root: PathBuf,
    /// cgroup directories (one per v1 hierarchy, or one cgroup v2 directory) the process moves itself
    /// into before it allocates guest memory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroups: Vec<PathBuf>,
    /// `RLIMIT_NOFILE`.
    pub max_open_files: u64,
    /// `RLIMIT_FSIZE`: no write may reach past this offset (at least the largest disk).
    pub max_file_size: u64,
    /// Whether each thread installs its seccomp allow-list (off only to debug a filter).
    #[serde(default = "enabled")]
    pub seccomp: bool,
}

fn enabled() -> bool {
    true
}

/// What a VMM process needs beyond guest memory: its threads' stacks, device buffers, the kernel image
/// read at start-up (bzImage decompression included), page cache for its disks.
pub const DEFAULT_VMM_ALLOWANCE: u64 = 96 << 20;
/// Open descriptors a VMM may hold: KVM, vCPUs, eventfds, disks, taps, sockets and their clients.
pub const VMM_MAX_OPEN_FILES: u64 = 1024;
/// Threads beyond the vCPUs: main, device loop, control accept and its connections.
pub const VMM_EXTRA_THREADS: u64 = 32;

impl JailConfig {
    /// A jail for `config` as `uid`:`gid`, mounting its root on `root`, joining `cgroups`.
    pub fn for_vm(config: &crate::VmConfig, uid: u32, gid: u32, root: PathBuf, cgroups: Vec<PathBuf>) -> JailConfig {
        let largest_disk = config.disks.iter().filter_map(|d| std::fs::metadata(&d.path).ok()).map(|m| m.len()).max();
        let console = config.console_max_bytes.unwrap_or(0).saturating_mul(2);
        // A snapshot's memory file holds all of guest memory.
        let snapshot = config.snapshot_dir.as_ref().map_or(0, |_| u64::from(config.memory_mib) << 20);
        JailConfig {
            uid,
            gid,
            root,
            cgroups,
            max_open_files: VMM_MAX_OPEN_FILES,
            // Writes are checked against their offset: every disk must stay writable to its end.
            max_file_size: largest_disk.unwrap_or(0).max(console).max(snapshot).max(64 << 20),
            seccomp: true,
        }
    }
}

/// The cgroup limits for `config`'s VMM: guest memory plus `allowance`, its vCPUs' worth of CPU
/// time, and its threads.
pub fn limits_for(config: &crate::VmConfig, allowance: u64) -> cgroup::CgroupLimits {
    cgroup::CgroupLimits {
        memory_bytes: (u64::from(config.memory_mib) << 20) + allowance,
        cpus: u32::from(config.vcpus),
        pids: u64::from(config.vcpus) + VMM_EXTRA_THREADS,
    }
}

/// The whole environment a VMM process gets: only the log filter (and, in debug builds, the escape
/// test hook); nothing of the daemon's (no git key, kubeconfig or proxy settings).
pub fn vmm_environment() -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    let mut keep = vec!["RUST_LOG", "RUST_BACKTRACE"];
    if cfg!(debug_assertions) {
        keep.push(escape_test::ENV);
    }
    keep.into_iter().filter_map(|k| std::env::var_os(k).map(|v| (k.into(), v))).collect()
}

/// Whether the process runs as root (and so can jail a VMM).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// How a child process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildStatus {
    /// It exited with this status.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
}

/// Reaps child `pid` if it has ended.
pub fn try_wait(pid: i32) -> std::io::Result<Option<ChildStatus>> {
    let mut status = 0;
    // SAFETY: waitpid on our own child with a valid status pointer.
    let ret = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if ret == -1 {
        return Err(std::io::Error::last_os_error());
    }
    if ret == 0 {
        return Ok(None);
    }
    Ok(Some(if libc::WIFSIGNALED(status) {
        ChildStatus::Signaled(libc::WTERMSIG(status))
    } else {
        ChildStatus::Exited(libc::WEXITSTATUS(status))
    }))
}

/// Sends `signal` to the process behind `pidfd` (errors, e.g. it already ended, are ignored).
pub fn send_signal(pidfd: &std::os::fd::OwnedFd, signal: i32) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid pidfd, a signal number and no siginfo.
    unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), signal, std::ptr::null::<u8>(), 0) };
}

/// A jail that could not be set up (the VM does not start).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The process was not started by [`spawn`] in its own PID namespace.
    #[error("the jail must be entered by a process spawned in its own pid namespace (pid is {0}, not 1)")]
    NotNamespaced(i32),
    /// Threads were already running, so their credentials would not all change.
    #[error("the jail must be entered before any thread starts ({0} threads are running)")]
    Threads(usize),
    /// A uid or gid of 0 was asked for.
    #[error("a jail needs an unprivileged uid and gid, got {uid}:{gid}")]
    Privileged {
        /// The uid.
        uid: u32,
        /// The gid.
        gid: u32,
    },
    /// A step of the set-up failed.
    #[error("jail set-up failed: cannot {step} {}", path.display())]
    Step {
        /// What was being done.
        step: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A seccomp filter could not be built or installed.
    #[error("seccomp filter for the {thread} thread")]
    Seccomp {
        /// Which thread kind.
        thread: &'static str,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
}

fn step(step: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> JailError {
    let path = path.into();
    move |source| JailError::Step { step, path, source }
}

/// Checks the return value of a libc call: `-1` becomes the thread's `errno`.
fn check(ret: libc::c_int) -> std::io::Result<()> {
    if ret == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn cstring(path: &Path) -> CString {
    // Paths from the config cannot hold NUL bytes (they came through JSON strings and `Path`), but a
    // NUL would only make the call fail with ENOENT.
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> std::io::Result<()> {
    let source = source.map(cstring);
    let target = cstring(target);
    let fstype = fstype.map(|s| CString::new(s).unwrap_or_default());
    let data = data.map(|s| CString::new(s).unwrap_or_default());
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null where mount(2)
    // accepts null.
    check(unsafe { libc::mount(ptr(&source), target.as_ptr(), ptr(&fstype), flags, ptr(&data).cast::<libc::c_void>()) })
}

/// Moves the calling process into each cgroup of `config` (before it allocates guest memory).
pub fn join_cgroups(config: &JailConfig) -> Result<(), JailError> {
    for dir in &config.cgroups {
        let procs = dir.join("cgroup.procs");
        // "0" is the writing process itself.
        std::fs::write(&procs, "0").map_err(step("join cgroup", procs))?;
    }
    Ok(())
}

/// Counts the calling process's threads (from procfs, which is only reachable before the jail).
fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map(|d| d.count()).unwrap_or(1)
}

/// Jails the calling process as `config` says. Call it once, on the main thread, after everything the
/// VM needs is open and before any other thread starts; afterwards the process sees only the jail's
/// root and holds no privilege. [`seccomp::prepare`] is called too, so threads started later install
/// their filters.
pub fn enter(config: &JailConfig, snapshots: Option<&Path>) -> Result<(), JailError> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    if pid != 1 {
        return Err(JailError::NotNamespaced(pid));
    }
    if config.uid == 0 || config.gid == 0 {
        return Err(JailError::Privileged { uid: config.uid, gid: config.gid });
    }
    let threads = thread_count();
    if threads > 1 {
        return Err(JailError::Threads(threads));
    }
    if config.seccomp {
        seccomp::prepare(snapshots.is_some())?;
    }
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
        .unwrap_or(63);
    build_root(&config.root, snapshots)?;
    limit(config)?;
    drop_privileges(config, last_cap)
}

/// Mounts the jail's root and pivots into it: afterwards `/` holds only [`JAIL_DEVICES`], and the
/// host directory `snapshots` at [`JAIL_SNAPSHOTS`] when given.
fn build_root(root: &Path, snapshots: Option<&Path>) -> Result<(), JailError> {
    // Nothing mounted from here on may propagate back to the host.
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None).map_err(step("make private", "/"))?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(Some(Path::new("tmpfs")), root, Some("tmpfs"), flags, Some(JAIL_ROOT_TMPFS))
        .map_err(step("mount a tmpfs on", root))?;
    for device in JAIL_DEVICES.iter().map(Path::new).filter(|d| d.exists()) {
        let target = root.join(device.strip_prefix("/").unwrap_or(device));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(step("create", parent))?;
        }
        std::fs::File::create(&target).map_err(step("create", &target))?;
        mount(Some(device), &target, None, libc::MS_BIND, None).map_err(step("bind-mount", device))?;
    }
    if let Some(dir) = snapshots {
        let target = root.join(JAIL_SNAPSHOTS.trim_start_matches('/'));
        std::fs::create_dir(&target).map_err(step("create", &target))?;
        mount(Some(dir), &target, None, libc::MS_BIND, None).map_err(step("bind-mount", dir))?;
        mount(None, &target, None, libc::MS_REMOUNT | libc::MS_BIND | flags, None)
            .map_err(step("remount nosuid,nodev,noexec", &target))?;
    }
    let old = root.join(".old-root");
    std::fs::create_dir(&old).map_err(step("create", &old))?;
    let (new_c, old_c) = (cstring(root), cstring(&old));
    // SAFETY: both pointers are NUL-terminated strings that outlive the call.
    check(unsafe { libc::syscall(libc::SYS_pivot_root, new_c.as_ptr(), old_c.as_ptr()) as libc::c_int })
        .map_err(step("pivot_root into", root))?;
    std::env::set_current_dir("/").map_err(step("change directory to", "/"))?;
    let old = Path::new("/.old-root");
    let old_c = cstring(old);
    // SAFETY: a NUL-terminated string that outlives the call.
    check(unsafe { libc::umount2(old_c.as_ptr(), libc::MNT_DETACH) }).map_err(step("detach", old))?;
    std::fs::remove_dir(old).map_err(step("remove", old))?;
    // The root itself becomes read-only (the device nodes are their own mounts).
    mount(None, Path::new("/"), None, libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | flags, None)
        .map_err(step("remount read-only", "/"))
}

fn set_rlimit(resource: libc::__rlimit_resource_t, name: &'static str, value: u64) -> Result<(), JailError> {
    let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
    // SAFETY: a valid rlimit structure passed by reference.
    check(unsafe { libc::setrlimit(resource, &limit) }).map_err(step("set", name))
}

fn limit(config: &JailConfig) -> Result<(), JailError> {
    set_rlimit(libc::RLIMIT_NOFILE, "RLIMIT_NOFILE", config.max_open_files)?;
    set_rlimit(libc::RLIMIT_FSIZE, "RLIMIT_FSIZE", config.max_file_size)?;
    set_rlimit(libc::RLIMIT_CORE, "RLIMIT_CORE", 0)?;
    // A write past RLIMIT_FSIZE fails with EFBIG instead of killing the VM.
    // SAFETY: SIG_IGN is a valid disposition for SIGXFSZ.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    Ok(())
}

fn drop_privileges(config: &JailConfig, last_cap: libc::c_ulong) -> Result<(), JailError> {
    for cap in 0..=last_cap {
        // SAFETY: PR_CAPBSET_DROP takes a capability number; unknown ones fail with EINVAL.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if ret == -1 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(step("drop from the bounding set capability", format!("{cap}"))(
                std::io::Error::last_os_error(),
            ));
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointer.
    check(unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) })
        .map_err(step("clear", "ambient capabilities"))?;
    // SAFETY: an empty list of supplementary groups.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }).map_err(step("clear", "supplementary groups"))?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresgid(config.gid, config.gid, config.gid) })
        .map_err(step("switch to gid", format!("{}", config.gid)))?;
    // Leaving uid 0 clears the permitted and effective capabilities (keep-caps is off).
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresuid(config.uid, config.uid, config.uid) })
        .map_err(step("switch to uid", format!("{}", config.uid)))?;
    clear_capabilities()?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes an integer.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }).map_err(step("set", "no_new_privs"))?;
    // Not dumpable: no other process of this uid may ptrace it or read its memory.
    // SAFETY: PR_SET_DUMPABLE takes an integer.
    check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) }).map_err(step("set", "not dumpable"))
}

/// `capset` with every set empty (the inheritable set is not cleared by the uid change).
fn clear_capabilities() -> Result<(), JailError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [Data::default(); 2];
    // SAFETY: a version-3 header and the two data words that version expects.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as libc::c_int })
        .map_err(step("clear", "capabilities"))
}
