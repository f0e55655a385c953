//! Facts about the host that change how a VM is set up.

use crate::config::VirtModeConfig;

/// How the host's KVM runs guest instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum VirtMode {
    /// The CPU has VT-x or AMD-V: guests run natively.
    Hardware,
    /// No hardware virtualization: KVM (e.g. the `kvm_pvm` module) runs non-PVM guests through its
    /// instruction emulator. The guest needs extra kernel arguments and the VMM must step over
    /// instructions the emulator cannot run (see PLATFORM.md).
    Emulated,
}

/// Kernel arguments that keep a Linux guest away from instructions the emulator cannot run
/// (XSAVE family, SMAP/SMEP, POPCNT, AVX, ...) and from the paravirtual paths that spin under it.
pub const EMULATED_GUEST_ARGS: &str = "noxsave nopv clearcpuid=smap,smep,popcnt,fsgsbase,rdpid,invpcid,pcid,\
clflushopt,clwb,xsaves,xsavec,xsaveopt,avx,avx2,bmi1,bmi2,erms,fsrm,rdrand,rdseed";

/// Kernel arguments that give an emulated guest a working clocksource: the TSC at the frequency KVM
/// reports for the vCPU (`KVM_GET_TSC_KHZ`), trusted without a watchdog.
///
/// Without them Linux cannot calibrate the TSC here (the PIT loop runs too slowly under the emulator,
/// and there is no HPET or ACPI PM timer; `nopv` hides kvm-clock), marks it unstable and falls back
/// to the jiffies clocksource. Jiffies cannot drive one-shot timers, so `NO_HZ_IDLE` never stops the
/// tick and an idle guest still takes 100 timer interrupts a second, each one emulated instruction by
/// instruction: about a quarter of a host core per idle VM. With the TSC the tick stops while idle.
/// The TSC is the host's (constant and non-stop on the hosts this applies to), so it is reliable.
pub fn emulated_clock_args(tsc_khz: u32) -> String {
    format!("tsc_early_khz={tsc_khz} tsc=reliable")
}

impl VirtMode {
    /// Detects the mode from `/proc/cpuinfo`: hardware when any CPU advertises `vmx` or `svm`.
    pub fn detect() -> VirtMode {
        match std::fs::read_to_string("/proc/cpuinfo") {
            Ok(cpuinfo) => Self::from_cpuinfo(&cpuinfo),
            // Without cpuinfo, the safe choice is the one that boots everywhere.
            Err(_) => VirtMode::Emulated,
        }
    }

    /// Parses the `flags` lines of a `/proc/cpuinfo` text.
    pub fn from_cpuinfo(cpuinfo: &str) -> VirtMode {
        let hardware = cpuinfo
            .lines()
            .filter(|line| line.starts_with("flags"))
            .any(|line| line.split_whitespace().any(|flag| flag == "vmx" || flag == "svm"));
        if hardware {
            VirtMode::Hardware
        } else {
            VirtMode::Emulated
        }
    }

    /// Resolves a configured mode, detecting it when the configuration says `auto`.
    pub fn resolve(config: VirtModeConfig) -> VirtMode {
        match config {
            VirtModeConfig::Auto => Self::detect(),
            VirtModeConfig::Hardware => VirtMode::Hardware,
            VirtModeConfig::Emulated => VirtMode::Emulated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_flags_decide_the_mode() {
        assert_eq!(VirtMode::from_cpuinfo("flags\t\t: fpu vme vmx sse\n"), VirtMode::Hardware);
        assert_eq!(VirtMode::from_cpuinfo("flags\t\t: fpu svm\n"), VirtMode::Hardware);
        assert_eq!(VirtMode::from_cpuinfo("flags\t\t: fpu vmxnope sse\nmodel name: vmx\n"), VirtMode::Emulated);
        assert_eq!(VirtMode::resolve(VirtModeConfig::Emulated), VirtMode::Emulated);
    }

    #[test]
    fn the_emulated_clock_is_the_tsc_at_kvms_frequency() {
        assert_eq!(emulated_clock_args(2_445_402), "tsc_early_khz=2445402 tsc=reliable");
    }
}
