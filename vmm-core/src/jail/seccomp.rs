//! One seccomp allow-list per VMM thread kind (`seccompiler`), installed by each thread before it
//! serves guest or client input.
//!
//! A call outside the list traps: the `SIGSYS` handler writes `seccomp: syscall N (name) by the
//! THREAD thread` to standard error (the VMM's log, which the supervisor reads for the VM's status),
//! then adds a filter that kills the whole process with `SIGSYS` at its next call. Filters stack, so a thread started by
//! a filtered thread is bounded by both lists.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::syscalls::SYSCALL_NAMES;
use super::JailError;

/// The kinds of VMM threads, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread: waits for the VM, applies control requests, writes the exit record.
    Main,
    /// A vCPU thread: `KVM_RUN` and the port-I/O and MMIO devices it calls (serial console included).
    Vcpu,
    /// The device event loop: virtio queues, disk and tap I/O, the console and vsock sockets.
    Devices,
    /// The control socket's accept thread and its per-connection threads.
    Control,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 4] = [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Devices, ThreadKind::Control];

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Devices => "devices",
            ThreadKind::Control => "control",
        }
    }
}

/// Each kind's filters, installed in order.
static FILTERS: OnceLock<BTreeMap<ThreadKind, Vec<BpfProgram>>> = OnceLock::new();

/// What every thread needs: memory, futexes, time, signals, its own exit, reading and writing the
/// descriptors it already holds.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    // The SIGSYS report resets its own handler before the default action kills the process.
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
];

/// `clone` only for threads (`CLONE_THREAD` set); `clone3`, whose flags a filter cannot read,
/// fails with `ENOSYS` (see [`no_clone3`]), so the C library falls back to `clone`.
fn thread_rules() -> Result<Vec<(i64, Vec<SeccompRule>)>, BackendError> {
    let thread = libc::CLONE_THREAD as u64;
    let only_threads = SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(thread),
        thread,
    )?])?;
    Ok(vec![(libc::SYS_clone, vec![only_threads]), (libc::SYS_clone3, Vec::new())])
}

/// A filter answering `clone3` with `ENOSYS` and allowing everything else (stacked under an
/// allow-list that lets `clone3` through, the error wins).
fn no_clone3() -> Result<BpfProgram, BackendError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    let filter =
        SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), TargetArch::x86_64)?;
    BpfProgram::try_from(filter)
}

/// Serving unix sockets that are already listening.
const SOCKETS: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
];

/// Disk I/O and the capped console log (rotation copies and truncates pre-opened files).
const FILES: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_copy_file_range,
];

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
}

/// The KVM requests a running vCPU makes: `KVM_RUN`, the registers and pending events for stepping
/// over an instruction a software-emulated KVM cannot run (`vcpu::step_over_emulation_failure`), and
/// the reads of its own state for a snapshot (`snapshot::save_vcpu`); no other `SET`.
fn vcpu_ioctls() -> Vec<u64> {
    use kvm_bindings::{
        kvm_cpuid2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_regs, kvm_sregs, kvm_vcpu_events,
        kvm_xcrs, kvm_xsave,
    };
    use std::mem::size_of;
    let (regs, events) = (size_of::<kvm_regs>(), size_of::<kvm_vcpu_events>());
    vec![
        ioc(0, 0x80, 0),                            // KVM_RUN
        ioc(2, 0x81, regs),                         // KVM_GET_REGS
        ioc(1, 0x82, regs),                         // KVM_SET_REGS
        ioc(2, 0x83, size_of::<kvm_sregs>()),       // KVM_GET_SREGS
        ioc(2, 0x9f, events),                       // KVM_GET_VCPU_EVENTS
        ioc(1, 0xa0, events),                       // KVM_SET_VCPU_EVENTS
        ioc(3, 0x88, size_of::<kvm_msrs>()),        // KVM_GET_MSRS
        ioc(2, 0x8e, size_of::<kvm_lapic_state>()), // KVM_GET_LAPIC
        ioc(3, 0x91, size_of::<kvm_cpuid2>()),      // KVM_GET_CPUID2
        ioc(2, 0x98, size_of::<kvm_mp_state>()),    // KVM_GET_MP_STATE
        ioc(2, 0xa1, size_of::<kvm_debugregs>()),   // KVM_GET_DEBUGREGS
        ioc(0, 0xa3, 0),                            // KVM_GET_TSC_KHZ
        ioc(2, 0xa4, size_of::<kvm_xsave>()),       // KVM_GET_XSAVE
        ioc(2, 0xa6, size_of::<kvm_xcrs>()),        // KVM_GET_XCRS
    ]
}

/// The VM-wide reads of a snapshot, made by the main thread (`snapshot::VmState::save`).
fn vm_snapshot_ioctls() -> Vec<u64> {
    use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
    use std::mem::size_of;
    vec![
        ioc(3, 0x62, size_of::<kvm_irqchip>()),    // KVM_GET_IRQCHIP
        ioc(2, 0x7c, size_of::<kvm_clock_data>()), // KVM_GET_CLOCK
        ioc(2, 0x9f, size_of::<kvm_pit_state2>()), // KVM_GET_PIT2
    ]
}

/// Saving a snapshot: the main thread creates, syncs and renames files. In a jail the only writable
/// place is the snapshot directory (the root is a read-only tmpfs of device nodes).
const SNAPSHOT_FILES: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// One rule per allowed `ioctl` request number.
fn ioctl_rules(requests: Vec<u64>) -> Result<Vec<SeccompRule>, BackendError> {
    requests
        .into_iter()
        .map(|request| {
            SeccompRule::new(vec![SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, request)?])
        })
        .collect()
}

/// What a vCPU thread sends: the UART's output to attached console clients (`ignite attach`),
/// written in the port write that produced it. Rust's `UnixStream::write` is
/// `sendto(fd, buf, len, MSG_NOSIGNAL, NULL, 0)`: those flags and no address, so no datagram can be
/// aimed anywhere.
fn console_send_rule() -> Result<SeccompRule, BackendError> {
    SeccompRule::new(vec![
        SeccompCondition::new(3, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::MSG_NOSIGNAL as u64)?,
        SeccompCondition::new(4, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0)?,
    ])
}

/// `prctl` only to read the thread's name (the `SIGSYS` report) or set it (thread start).
fn prctl_rules() -> Result<Vec<SeccompRule>, BackendError> {
    [libc::PR_GET_NAME, libc::PR_SET_NAME]
        .into_iter()
        .map(|op| {
            SeccompRule::new(vec![SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, op as u64)?])
        })
        .collect()
}

/// `kind`'s allow-list; with `snapshots` (the VMM has a snapshot directory) the main thread may also
/// create files and read the VM-wide KVM state, to save the VM.
fn rules(kind: ThreadKind, snapshots: bool) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut allow = |calls: &[i64]| {
        for call in calls {
            rules.insert(*call, Vec::new());
        }
    };
    allow(COMMON);
    match kind {
        ThreadKind::Main => {
            allow(SOCKETS);
            allow(FILES);
            if snapshots {
                allow(SNAPSHOT_FILES);
                rules.insert(libc::SYS_ioctl, ioctl_rules(vm_snapshot_ioctls())?);
            }
        }
        ThreadKind::Vcpu => {
            allow(FILES);
            rules.insert(libc::SYS_ioctl, ioctl_rules(vcpu_ioctls())?);
            rules.insert(libc::SYS_sendto, vec![console_send_rule()?]);
        }
        ThreadKind::Devices => {
            allow(SOCKETS);
            allow(FILES);
            // Guest-initiated vsock connections go to `<uds_path>_<port>`.
            allow(&[libc::SYS_socket, libc::SYS_connect]);
            // Accepted console and vsock clients are made non-blocking.
            let fionbio = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::FIONBIO)?;
            rules.insert(libc::SYS_ioctl, vec![SeccompRule::new(vec![fionbio])?]);
        }
        ThreadKind::Control => {
            allow(SOCKETS);
        }
    }
    if matches!(kind, ThreadKind::Main | ThreadKind::Control) {
        rules.extend(thread_rules()?);
    }
    rules.insert(libc::SYS_prctl, prctl_rules()?);
    // Adding a filter only ever restricts the thread further: the SIGSYS report kills with one.
    let add_filter =
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::SECCOMP_SET_MODE_FILTER.into())?;
    rules.insert(libc::SYS_seccomp, vec![SeccompRule::new(vec![add_filter])?]);
    Ok(rules)
}

fn compile(kind: ThreadKind, snapshots: bool) -> Result<Vec<BpfProgram>, JailError> {
    let seccomp = |e| JailError::Seccomp { thread: kind.name(), source: seccompiler::Error::Backend(e) };
    let rules = rules(kind, snapshots).map_err(seccomp)?;
    let filter =
        SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64).map_err(seccomp)?;
    let mut programs = Vec::new();
    // First: installing a filter needs prctl and seccomp, which the allow-list then forbids.
    if matches!(kind, ThreadKind::Main | ThreadKind::Control) {
        programs.push(no_clone3().map_err(seccomp)?);
    }
    programs.push(BpfProgram::try_from(filter).map_err(seccomp)?);
    Ok(programs)
}

/// Compiles every thread kind's filter and installs the `SIGSYS` reporter. Called by
/// [`super::enter`]; until then [`apply`] does nothing.
pub fn prepare(snapshots: bool) -> Result<(), JailError> {
    if FILTERS.get().is_some() {
        return Ok(());
    }
    let filters = ThreadKind::ALL
        .into_iter()
        .map(|kind| Ok((kind, compile(kind, snapshots)?)))
        .collect::<Result<BTreeMap<_, _>, JailError>>()?;
    install_sigsys_reporter();
    // A race between two callers would compile the same filters twice; either result is the same.
    let _ = FILTERS.set(filters);
    Ok(())
}

/// Installs `kind`'s filter on the calling thread, when the process is jailed with seccomp on.
pub fn apply(kind: ThreadKind) -> Result<(), JailError> {
    let Some(programs) = FILTERS.get().and_then(|f| f.get(&kind)) else {
        return Ok(());
    };
    for program in programs {
        seccompiler::apply_filter(program).map_err(|source| JailError::Seccomp { thread: kind.name(), source })?;
    }
    Ok(())
}

/// Whether the filters are prepared (the process is jailed with seccomp on).
pub fn enabled() -> bool {
    FILTERS.get().is_some()
}

fn install_sigsys_reporter() {
    // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags) to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: a valid sigaction with a SA_SIGINFO handler of the right signature.
    unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
}

/// A fixed-size line buffer: the handler may not allocate.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_hex(&mut self, n: u64) {
        let digits = 16 - (n.leading_zeros() as usize / 4).min(15);
        for i in (0..digits).rev() {
            self.push(&[b"0123456789abcdef"[((n >> (i * 4)) & 0xf) as usize]]);
        }
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The report line for syscall `nr` (with its `ioctl` request, which says which device call it was)
/// on the thread named `thread` (`ignite-` is dropped from it).
fn report(nr: i32, request: Option<u64>, thread: &[u8]) -> Line {
    let mut line = Line { buf: [0; 160], len: 0 };
    line.push(b"seccomp: syscall ");
    line.push_number(u64::try_from(nr).unwrap_or(u64::MAX));
    line.push(b" (");
    let name = usize::try_from(nr).ok().and_then(|n| SYSCALL_NAMES.get(n)).copied().unwrap_or("");
    line.push(if name.is_empty() { b"?" } else { name.as_bytes() });
    line.push(b")");
    if let Some(request) = request {
        line.push(b" with request 0x");
        line.push_hex(request);
    }
    line.push(b" by the ");
    let end = thread.iter().position(|&b| b == 0).unwrap_or(thread.len());
    let thread = &thread[..end];
    line.push(thread.strip_prefix(b"ignite-").unwrap_or(thread));
    line.push(b" thread\n");
    line
}

/// Which thread name a report says, from the line (for the supervisor: `None` if `line` is not one).
pub fn parse_report(line: &str) -> Option<&str> {
    line.trim().strip_prefix("seccomp: ").filter(|rest| rest.starts_with("syscall "))
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // The SIGSYS siginfo (SYS_SECCOMP) holds the call address, then the syscall number.
    #[repr(C)]
    struct SigsysInfo {
        signo: libc::c_int,
        errno: libc::c_int,
        code: libc::c_int,
        _pad: libc::c_int,
        call_addr: *mut libc::c_void,
        syscall: libc::c_int,
        arch: libc::c_uint,
    }
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler, laid out as above for
    // SIGSYS.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    // The trapped call's second argument is still in RSI.
    // SAFETY: the kernel passes the interrupted thread's ucontext as the third argument.
    let rsi = unsafe { (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RSI as usize] };
    let request = (i64::from(nr) == libc::SYS_ioctl).then_some(rsi as u64);
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let line = report(nr, request, &name);
    // The VMM is PID 1 of its namespace, which ignores a SIGSYS it sends itself with the default
    // action: instead, one more filter kills the process (with SIGSYS) at its next system call.
    let kill = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: libc::SECCOMP_RET_KILL_PROCESS,
    }];
    let program = libc::sock_fprog { len: 1, filter: kill.as_ptr().cast_mut() };
    // SAFETY: writes `line.len` bytes from a local buffer.
    unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };
    // SAFETY: a one-instruction filter from a local program (no_new_privs is set).
    unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &program) };
    // SAFETY: getpid has no preconditions; this call is the one the new filter kills.
    unsafe { libc::syscall(libc::SYS_getpid) };
    // SAFETY: only reached if the filter could not be added: end the process without unwinding.
    unsafe { libc::_exit(128 + libc::SIGSYS) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_name_the_call_and_the_thread() {
        let line = report(59, None, b"ignite-vcpu0\0\0\0\0");
        let text = std::str::from_utf8(&line.buf[..line.len]).unwrap();
        assert_eq!(text, "seccomp: syscall 59 (execve) by the vcpu0 thread\n");
        assert_eq!(parse_report(text), Some("syscall 59 (execve) by the vcpu0 thread"));
        let line = report(100_000, None, b"vmm-control");
        assert_eq!(
            std::str::from_utf8(&line.buf[..line.len]).unwrap(),
            "seccomp: syscall 100000 (?) by the vmm-control thread\n"
        );
        assert_eq!(parse_report("something else"), None);
        let line = report(16, Some(0xc008_ae67), b"ignite-vcpu1");
        assert_eq!(
            std::str::from_utf8(&line.buf[..line.len]).unwrap(),
            "seccomp: syscall 16 (ioctl) with request 0xc008ae67 by the vcpu1 thread\n"
        );
    }

    #[test]
    fn every_kind_compiles_and_the_vcpu_list_is_the_narrowest() {
        for kind in ThreadKind::ALL {
            compile(kind, false).unwrap();
            compile(kind, true).unwrap();
        }
        let vcpu = rules(ThreadKind::Vcpu, true).unwrap();
        for forbidden in
            [libc::SYS_execve, libc::SYS_openat, libc::SYS_ptrace, libc::SYS_socket, libc::SYS_clone3, libc::SYS_clone]
        {
            assert!(!vcpu.contains_key(&forbidden), "{}", SYSCALL_NAMES[forbidden as usize]);
        }
        // KVM_RUN, four register and event calls for the emulator, and eight reads for a snapshot.
        assert_eq!(vcpu[&libc::SYS_ioctl].len(), 14);
        assert_eq!(rules(ThreadKind::Main, false).unwrap()[&libc::SYS_clone].len(), 1, "clone only for threads");
        // Only a VMM with a snapshot directory may create files, and only on its main thread.
        let main = rules(ThreadKind::Main, true).unwrap();
        assert!(main.contains_key(&libc::SYS_openat) && main[&libc::SYS_ioctl].len() == 3);
        for kind in [ThreadKind::Vcpu, ThreadKind::Devices, ThreadKind::Control] {
            assert!(!rules(kind, true).unwrap().contains_key(&libc::SYS_openat), "{} may not open", kind.name());
        }
        for kind in ThreadKind::ALL {
            let rules = rules(kind, false).unwrap();
            for forbidden in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_openat,
                libc::SYS_open,
                libc::SYS_fork,
                libc::SYS_vfork,
            ] {
                assert!(
                    !rules.contains_key(&forbidden),
                    "{} allows {}",
                    kind.name(),
                    SYSCALL_NAMES[forbidden as usize]
                );
            }
        }
    }
}
