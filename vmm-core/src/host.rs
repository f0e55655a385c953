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
}
