//! One thread per vCPU: the `KVM_RUN` loop, exit dispatch to the buses, pause/resume, and stepping
//! over the instructions a software-emulated KVM cannot run.
//!
//! Kicking: a vCPU inside `KVM_RUN` is interrupted with a real-time signal whose handler sets the
//! thread's `kvm_run.immediate_exit`, so a kick that lands just before `KVM_RUN` is not lost.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex, Once};
use std::time::Instant;

use kvm_bindings::{kvm_run, KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::bus::{lock, Bus};
use crate::exit::{ExitReason, ExitSignal};
use crate::host::VirtMode;
use crate::snapshot::{SnapshotError, VcpuState};

thread_local! {
    /// The running vCPU's `kvm_run` mapping, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN_PTR.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is set by this thread's vCPU loop to its own `kvm_run` mapping and cleared
        // before the `VcpuFd` (and so the mapping) is dropped; a byte store is async-signal-safe.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the kick handler once per process.
pub(crate) fn install_kick_handler() -> std::io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result =
            register_signal_handler(kick_signal(), on_kick).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    });
    result
}

/// Signals every vCPU thread of a VM.
#[derive(Clone, Debug)]
pub struct Kicker {
    threads: Vec<libc::pthread_t>,
}

impl Kicker {
    pub(crate) fn new(threads: Vec<libc::pthread_t>) -> Self {
        Kicker { threads }
    }

    /// Interrupts `KVM_RUN` on every vCPU thread.
    pub fn kick_all(&self) {
        for &thread in &self.threads {
            // SAFETY: the ids come from live `JoinHandle`s of this VM, which are joined only after the
            // VM's exit was reported under the lock that also guards every kick.
            let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
            if rc != 0 {
                tracing::debug!(rc, "vcpu kick failed (thread already gone)");
            }
        }
    }
}

/// Whether vCPUs should run or wait.
#[derive(Default)]
pub(crate) struct RunControl {
    state: Mutex<RunState>,
    cond: Condvar,
}

#[derive(Default)]
struct RunState {
    paused: bool,
    parked: usize,
    /// While a snapshot is taken: one slot per vCPU, filled by the vCPU itself while parked.
    saves: Option<Vec<Option<Result<VcpuState, SnapshotError>>>>,
}

impl RunControl {
    pub(crate) fn set_paused(&self, paused: bool) {
        lock(&self.state).paused = paused;
        self.cond.notify_all();
    }

    /// Whether the VM is paused (or being paused).
    pub(crate) fn is_paused(&self) -> bool {
        lock(&self.state).paused
    }

    /// Waits until `count` vCPUs are parked (or the VM exits). Returns whether they all parked.
    pub(crate) fn wait_parked(&self, count: usize, exit: &ExitSignal) -> bool {
        let mut state = lock(&self.state);
        while state.parked < count && !exit.is_exiting() {
            state = self
                .cond
                .wait_timeout(state, std::time::Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.parked >= count
    }

    /// Asks every parked vCPU (all `count` must be parked) to save its state and waits for them;
    /// `None` when the VM exits first.
    pub(crate) fn save_vcpus(&self, count: usize, exit: &ExitSignal) -> Option<Vec<Result<VcpuState, SnapshotError>>> {
        let mut state = lock(&self.state);
        state.saves = Some((0..count).map(|_| None).collect());
        self.cond.notify_all();
        loop {
            if state.saves.as_ref().is_some_and(|saves| saves.iter().all(Option::is_some)) {
                return state.saves.take().map(|saves| saves.into_iter().flatten().collect());
            }
            if exit.is_exiting() {
                state.saves = None;
                return None;
            }
            state = self
                .cond
                .wait_timeout(state, std::time::Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Parks the calling vCPU (`index`) while the VM is paused; while parked it runs `save` when a
    /// snapshot asks for its state.
    fn park_while_paused(
        &self,
        exit: &ExitSignal,
        index: u8,
        save: &mut dyn FnMut() -> Result<VcpuState, SnapshotError>,
    ) {
        let mut state = lock(&self.state);
        if !state.paused {
            return;
        }
        state.parked += 1;
        self.cond.notify_all();
        while state.paused && !exit.is_exiting() {
            let slot = state.saves.as_mut().and_then(|saves| saves.get_mut(usize::from(index)));
            if let Some(slot @ None) = slot {
                *slot = Some(save());
                self.cond.notify_all();
                continue;
            }
            state = self
                .cond
                .wait_timeout(state, std::time::Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        state.parked -= 1;
    }
}

/// Counters a VM exposes through its handle.
#[derive(Debug, Default)]
pub struct Counters {
    /// All `KVM_RUN` returns.
    pub exits: AtomicU64,
    /// Port-I/O exits.
    pub io_exits: AtomicU64,
    /// MMIO exits.
    pub mmio_exits: AtomicU64,
    /// Instructions stepped over for the emulator (INT3, CLAC, STAC).
    pub emulation_fixups: AtomicU64,
    /// Nanoseconds from `Vm::start` to the first `KVM_RUN` (0 until then).
    pub first_run_ns: AtomicU64,
}

/// What a vCPU thread shares with the rest of the VM.
pub(crate) struct VcpuContext {
    pub exit: Arc<ExitSignal>,
    pub control: Arc<RunControl>,
    pub mmio: Arc<Bus>,
    pub pio: Arc<Bus>,
    pub counters: Arc<Counters>,
    pub mode: VirtMode,
    pub started: Instant,
    /// The MSRs a snapshot saves (KVM's index list).
    pub msr_list: Arc<Vec<u32>>,
}

/// The body of a vCPU thread.
pub(crate) fn run(mut vcpu: VcpuFd, index: u8, ctx: VcpuContext, start: Arc<Barrier>) {
    let run_ptr: *mut kvm_run = vcpu.get_kvm_run();
    KVM_RUN_PTR.with(|p| p.set(run_ptr));
    // The filter is in place before the first KVM_RUN, i.e. before any guest code runs.
    if let Err(err) = crate::jail::seccomp::apply(crate::jail::seccomp::ThreadKind::Vcpu) {
        ctx.exit
            .exit(ExitReason::Error { detail: format!("vcpu {index}: {err}: {:?}", std::error::Error::source(&err)) });
    }
    start.wait();
    let span = tracing::debug_span!("vcpu", index);
    let _enter = span.enter();
    while !ctx.exit.is_exiting() {
        ctx.control
            .park_while_paused(&ctx.exit, index, &mut || crate::snapshot::save_vcpu(&mut vcpu, index, &ctx.msr_list));
        if ctx.exit.is_exiting() {
            break;
        }
        if index == 0 && ctx.counters.first_run_ns.load(Ordering::Relaxed) == 0 {
            let ns = u64::try_from(ctx.started.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1);
            ctx.counters.first_run_ns.store(ns, Ordering::Relaxed);
        }
        let outcome = match vcpu.run() {
            Ok(exit) => handle_exit(exit, &ctx),
            Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                Outcome::Continue
            }
            Err(err) => Outcome::Exit(ExitReason::Error { detail: format!("KVM_RUN failed on vcpu {index}: {err}") }),
        };
        ctx.counters.exits.fetch_add(1, Ordering::Relaxed);
        let outcome = match outcome {
            Outcome::InternalError => step_over_emulation_failure(&mut vcpu, ctx.mode, &ctx.counters).map_or_else(
                |detail| Outcome::Exit(ExitReason::Crash { detail: format!("vcpu {index}: {detail}") }),
                |()| Outcome::Continue,
            ),
            other => other,
        };
        if let Outcome::Exit(reason) = outcome {
            ctx.exit.exit(reason);
        }
    }
    KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
}

enum Outcome {
    Continue,
    InternalError,
    Exit(ExitReason),
}

fn handle_exit(exit: VcpuExit<'_>, ctx: &VcpuContext) -> Outcome {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ctx.counters.io_exits.fetch_add(1, Ordering::Relaxed);
            // Unclaimed ports read as all ones, as on real hardware with nothing on the bus.
            if !ctx.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            ctx.counters.io_exits.fetch_add(1, Ordering::Relaxed);
            ctx.pio.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.counters.mmio_exits.fetch_add(1, Ordering::Relaxed);
            if !ctx.mmio.read(addr, data) {
                tracing::trace!(addr, "read from unmapped mmio");
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.counters.mmio_exits.fetch_add(1, Ordering::Relaxed);
            if !ctx.mmio.write(addr, data) {
                tracing::trace!(addr, "write to unmapped mmio");
            }
        }
        VcpuExit::Hlt => {}
        VcpuExit::Shutdown => return Outcome::Exit(ExitReason::Crash { detail: "triple fault".into() }),
        VcpuExit::SystemEvent(kind, _) => {
            return Outcome::Exit(match kind {
                KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                KVM_SYSTEM_EVENT_CRASH => ExitReason::Crash { detail: "guest reported a crash".into() },
                _ => ExitReason::PowerOff { code: 0 },
            })
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Outcome::Exit(ExitReason::Crash {
                detail: format!("vm entry failed (hardware reason {reason:#x}, cpu {cpu})"),
            })
        }
        VcpuExit::InternalError => return Outcome::InternalError,
        other => tracing::debug!(exit = ?other, "unhandled vcpu exit"),
    }
    Outcome::Continue
}

/// An instruction the emulator could not run that the VMM performs on its behalf.
#[derive(Debug, PartialEq, Eq)]
enum Fixup {
    /// `INT3`: advance past it and inject #BP, as the CPU would.
    Int3,
    /// `CLAC`: clear RFLAGS.AC.
    Clac,
    /// `STAC`: set RFLAGS.AC.
    Stac,
    /// `FWAIT`: waits for pending unmasked x87 exceptions; with them masked (as Linux leaves the FPU) it
    /// does nothing. Linux runs it in `fpu__drop()` whenever a task that used the FPU exits.
    Fwait,
}

const RFLAGS_AC: u64 = 1 << 18;
const BP_VECTOR: u8 = 3;

/// Decodes the instruction bytes of a `KVM_INTERNAL_ERROR_EMULATION` exit: `data[0]` is the flags word,
/// then byte 0 of `data[1]` is the instruction length and the bytes follow.
fn emulation_failure_bytes(ndata: u32, data: &[u64; 16]) -> Vec<u8> {
    let raw: Vec<u8> = data[1..].iter().take(ndata.saturating_sub(1) as usize).flat_map(|w| w.to_le_bytes()).collect();
    let Some((&len, bytes)) = raw.split_first() else { return Vec::new() };
    bytes[..bytes.len().min(usize::from(len))].to_vec()
}

fn fixup_for(bytes: &[u8]) -> Option<(Fixup, u64)> {
    match bytes {
        [0xCC, ..] => Some((Fixup::Int3, 1)),
        [0x0F, 0x01, 0xCA, ..] => Some((Fixup::Clac, 3)),
        [0x0F, 0x01, 0xCB, ..] => Some((Fixup::Stac, 3)),
        [0x9B, ..] => Some((Fixup::Fwait, 1)),
        _ => None,
    }
}

/// Handles `KVM_EXIT_INTERNAL_ERROR`: on emulated hosts, steps over the instructions listed in
/// PLATFORM.md (and FWAIT, found by booting busybox); anything else is a crash described by its instruction bytes and RIP.
fn step_over_emulation_failure(vcpu: &mut VcpuFd, mode: VirtMode, counters: &Counters) -> Result<(), String> {
    let run = vcpu.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so KVM filled the `internal` member of the union.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    if internal.suberror != KVM_INTERNAL_ERROR_EMULATION {
        return Err(format!("kvm internal error (suberror {})", internal.suberror));
    }
    let bytes = emulation_failure_bytes(internal.ndata, &internal.data);
    let mut regs = vcpu.get_regs().map_err(|e| format!("get_regs after emulation failure: {e}"))?;
    let fixup = match (mode, fixup_for(&bytes)) {
        (VirtMode::Emulated, Some(fixup)) => fixup,
        _ => return Err(format!("instruction the emulator cannot run at rip {:#x}: bytes {:02x?}", regs.rip, bytes)),
    };
    tracing::trace!(?fixup, rip = regs.rip, "stepping over an instruction for the emulator");
    let (kind, len) = fixup;
    regs.rip += len;
    match kind {
        Fixup::Clac => regs.rflags &= !RFLAGS_AC,
        Fixup::Stac => regs.rflags |= RFLAGS_AC,
        Fixup::Int3 | Fixup::Fwait => {}
    }
    vcpu.set_regs(&regs).map_err(|e| format!("set_regs: {e}"))?;
    if kind == Fixup::Int3 {
        let mut events = vcpu.get_vcpu_events().map_err(|e| format!("get_vcpu_events: {e}"))?;
        events.exception.injected = 1;
        events.exception.nr = BP_VECTOR;
        events.exception.has_error_code = 0;
        vcpu.set_vcpu_events(&events).map_err(|e| format!("set_vcpu_events: {e}"))?;
    }
    counters.emulation_fixups.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_instruction_bytes_from_the_internal_error_data() {
        let mut data = [0u64; 16];
        data[0] = 1; // flags: instruction bytes valid
        data[1] = u64::from_le_bytes([3, 0x0F, 0x01, 0xCA, 0x90, 0x90, 0x90, 0x90]);
        assert_eq!(emulation_failure_bytes(4, &data), vec![0x0F, 0x01, 0xCA]);
        assert_eq!(emulation_failure_bytes(0, &data), Vec::<u8>::new());
        data[1] = u64::from_le_bytes([10, 1, 2, 3, 4, 5, 6, 7]);
        data[2] = u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(emulation_failure_bytes(4, &data), (1..=10).collect::<Vec<u8>>());
    }

    #[test]
    fn only_the_known_instructions_are_stepped_over() {
        assert_eq!(fixup_for(&[0xCC]), Some((Fixup::Int3, 1)));
        assert_eq!(fixup_for(&[0x0F, 0x01, 0xCA]), Some((Fixup::Clac, 3)));
        assert_eq!(fixup_for(&[0x0F, 0x01, 0xCB, 0x90]), Some((Fixup::Stac, 3)));
        assert_eq!(fixup_for(&[0x9B, 0x65, 0x48]), Some((Fixup::Fwait, 1)));
        assert_eq!(fixup_for(&[0x0F, 0xAE, 0x2F]), None); // xrstor
        assert_eq!(fixup_for(&[]), None);
    }
}
