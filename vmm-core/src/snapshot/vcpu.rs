//! One vCPU's state: what KVM holds for it, saved on its own thread and restored before it first runs.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// `IA32_TSC_DEADLINE`: restored after `IA32_TSC`, or the deadline is taken against the old TSC.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// The most CPUID entries a vCPU is read back with.
const MAX_CPUID_ENTRIES: usize = 256;

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID table the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Running, halted, or waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87, SSE and AVX state (XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// The TSC frequency the guest sees, in kHz (`None` when KVM does not tell).
    pub tsc_khz: Option<u32>,
    /// Model-specific registers: KVM's list of the MSRs it saves, with their values.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
}

/// Reads the state of `vcpu` (`index` names it in errors). Runs on the vCPU's own thread while it is
/// parked: one `KVM_RUN` with `immediate_exit` first completes an I/O read the last exit left open.
pub(crate) fn save_vcpu(vcpu: &mut VcpuFd, index: u8, msr_list: &[u32]) -> Result<VcpuState, SnapshotError> {
    let what = |call: &str| format!("vcpu {index}: {call}");
    vcpu.set_kvm_immediate_exit(1);
    let flushed = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match flushed {
        Err(err) if err.errno() == libc::EINTR || err.errno() == libc::EAGAIN => {}
        Err(err) => return Err(SnapshotError::Kvm { what: what("complete pending i/o"), source: err }),
        Ok(()) => tracing::debug!(index, "vcpu exited while completing pending i/o before its snapshot"),
    }
    let cpuid = vcpu.get_cpuid2(MAX_CPUID_ENTRIES).map_err(SnapshotError::kvm(what("get cpuid")))?;
    // mp_state first: reading it lets the local APIC accept pending INIT/SIPI events.
    let mp_state = vcpu.get_mp_state().map_err(SnapshotError::kvm(what("get mp_state")))?;
    let regs = vcpu.get_regs().map_err(SnapshotError::kvm(what("get regs")))?;
    let sregs = vcpu.get_sregs().map_err(SnapshotError::kvm(what("get sregs")))?;
    let xsave = vcpu.get_xsave().map_err(SnapshotError::kvm(what("get xsave")))?;
    let xcrs = vcpu.get_xcrs().map_err(SnapshotError::kvm(what("get xcrs")))?;
    let debug_regs = vcpu.get_debug_regs().map_err(SnapshotError::kvm(what("get debug registers")))?;
    let lapic = vcpu.get_lapic().map_err(SnapshotError::kvm(what("get lapic")))?;
    let tsc_khz = vcpu.get_tsc_khz().ok();
    let msrs = read_msrs(vcpu, msr_list)
        .map_err(|(msr, source)| SnapshotError::Kvm { what: what(&format!("get msr {msr:#x}")), source })?;
    // Last: the reads above may still change what is pending.
    let events = vcpu.get_vcpu_events().map_err(SnapshotError::kvm(what("get vcpu events")))?;
    Ok(VcpuState {
        cpuid: cpuid.as_slice().to_vec(),
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        tsc_khz,
        msrs,
        events,
    })
}

/// Fails unless this host's XSAVE area fits the legacy 4 KiB `kvm_xsave` (hosts with AMX state need
/// `KVM_GET_XSAVE2`, which snapshots do not use yet).
pub(crate) fn xsave_fits(kvm: &Kvm) -> Result<(), SnapshotError> {
    let size = kvm.check_extension_int(Cap::Xsave2);
    if usize::try_from(size).unwrap_or(usize::MAX) > std::mem::size_of::<kvm_xsave>() {
        return Err(SnapshotError::Unsupported { device: format!("an XSAVE area of {size} bytes (AMX)") });
    }
    Ok(())
}

/// Reads the MSRs in `list`, with the TSC deadline last so that a restore writes it after the TSC.
fn read_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>, (u32, kvm_ioctls::Error)> {
    let mut indices: Vec<u32> = list.iter().copied().filter(|&i| i != MSR_IA32_TSC_DEADLINE).collect();
    if list.contains(&MSR_IA32_TSC_DEADLINE) {
        indices.push(MSR_IA32_TSC_DEADLINE);
    }
    let entries: Vec<kvm_msr_entry> =
        indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| (0, kvm_ioctls::Error::new(libc::E2BIG)))?;
    let read = vcpu.get_msrs(&mut msrs).map_err(|e| (0, e))?;
    if read < indices.len() {
        // KVM stops at the first MSR it cannot read.
        return Err((indices[read], kvm_ioctls::Error::new(libc::EINVAL)));
    }
    Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect())
}

/// Writes `state` into `vcpu`, which has not run yet, in the order KVM needs.
pub(crate) fn restore_vcpu(kvm: &Kvm, vcpu: &VcpuFd, index: usize, state: &VcpuState) -> Result<(), SnapshotError> {
    let what = |call: &str| format!("vcpu {index}: {call}");
    xsave_fits(kvm)?;
    if let Some(khz) = state.tsc_khz {
        if vcpu.get_tsc_khz().ok() != Some(khz) {
            vcpu.set_tsc_khz(khz).map_err(SnapshotError::kvm(what(&format!("set the TSC frequency to {khz} kHz"))))?;
        }
    }
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| SnapshotError::Kvm {
        what: what(&format!("{} cpuid entries", state.cpuid.len())),
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(SnapshotError::kvm(what("set cpuid")))?;
    vcpu.set_mp_state(state.mp_state).map_err(SnapshotError::kvm(what("set mp_state")))?;
    vcpu.set_regs(&state.regs).map_err(SnapshotError::kvm(what("set regs")))?;
    vcpu.set_sregs(&state.sregs).map_err(SnapshotError::kvm(what("set sregs")))?;
    // SAFETY: `xsave_fits` checked above that this host's XSAVE area fits the 4 KiB `kvm_xsave` KVM reads
    // from, and the buffer is a whole `kvm_xsave`.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(SnapshotError::kvm(what("set xsave")))?;
    vcpu.set_xcrs(&state.xcrs).map_err(SnapshotError::kvm(what("set xcrs")))?;
    vcpu.set_debug_regs(&state.debug_regs).map_err(SnapshotError::kvm(what("set debug registers")))?;
    vcpu.set_lapic(&state.lapic).map_err(SnapshotError::kvm(what("set lapic")))?;
    let entries: Vec<kvm_msr_entry> =
        state.msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| SnapshotError::Kvm {
        what: what(&format!("{} msrs", entries.len())),
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let written = vcpu.set_msrs(&msrs).map_err(SnapshotError::kvm(what("set msrs")))?;
    if written < entries.len() {
        return Err(SnapshotError::Kvm {
            what: what(&format!("set msr {:#x}", entries[written].index)),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    vcpu.set_vcpu_events(&state.events).map_err(SnapshotError::kvm(what("set vcpu events")))
}
