//! The guest CPUID: what KVM supports, with the topology rewritten for this vCPU (APIC IDs
//! 0..count, one thread per core, one package) and, under an instruction emulator, the features
//! the emulator cannot execute hidden.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

use super::VcpuSetupError;
use crate::host::VirtMode;

/// Leaf 0 EBX of an AMD CPU ("Auth" of "AuthenticAMD").
const AMD_VENDOR_EBX: u32 = u32::from_le_bytes(*b"Auth");

/// A feature bit to clear: (leaf, sub-leaf or `None` for all, register, bit).
type Feature = (u32, Option<u32>, Reg, u8);

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// Features an emulated KVM cannot run (see PLATFORM.md): the XSAVE family, every VEX/EVEX
/// extension, and instructions its emulator does not decode (POPCNT, RDRAND/RDSEED, CLAC/STAC
/// through SMAP, FSGSBASE, INVPCID, ...). The guest may still see host CPUID on such hosts, so the
/// kernel arguments in [`crate::host::EMULATED_GUEST_ARGS`] remain the primary defence.
const EMULATED_UNSUPPORTED: &[Feature] = &[
    // Leaf 1 ECX: FMA, PCID, POPCNT, AES, XSAVE, OSXSAVE, AVX, F16C, RDRAND.
    (1, None, Reg::Ecx, 12),
    (1, None, Reg::Ecx, 17),
    (1, None, Reg::Ecx, 23),
    (1, None, Reg::Ecx, 25),
    (1, None, Reg::Ecx, 26),
    (1, None, Reg::Ecx, 27),
    (1, None, Reg::Ecx, 28),
    (1, None, Reg::Ecx, 29),
    (1, None, Reg::Ecx, 30),
    // Leaf 7.0 EBX: FSGSBASE, BMI1, AVX2, SMEP, BMI2, ERMS, INVPCID, AVX512F/DQ, RDSEED, ADX, SMAP,
    // AVX512_IFMA, CLFLUSHOPT, CLWB, AVX512PF/ER/CD, SHA, AVX512BW/VL.
    (7, Some(0), Reg::Ebx, 0),
    (7, Some(0), Reg::Ebx, 3),
    (7, Some(0), Reg::Ebx, 5),
    (7, Some(0), Reg::Ebx, 7),
    (7, Some(0), Reg::Ebx, 8),
    (7, Some(0), Reg::Ebx, 9),
    (7, Some(0), Reg::Ebx, 10),
    (7, Some(0), Reg::Ebx, 16),
    (7, Some(0), Reg::Ebx, 17),
    (7, Some(0), Reg::Ebx, 18),
    (7, Some(0), Reg::Ebx, 19),
    (7, Some(0), Reg::Ebx, 20),
    (7, Some(0), Reg::Ebx, 21),
    (7, Some(0), Reg::Ebx, 23),
    (7, Some(0), Reg::Ebx, 24),
    (7, Some(0), Reg::Ebx, 26),
    (7, Some(0), Reg::Ebx, 27),
    (7, Some(0), Reg::Ebx, 28),
    (7, Some(0), Reg::Ebx, 29),
    (7, Some(0), Reg::Ebx, 30),
    (7, Some(0), Reg::Ebx, 31),
    // Leaf 7.0 ECX: AVX512_VBMI, AVX512_VBMI2, GFNI, VAES, VPCLMULQDQ, AVX512_VNNI/BITALG/VPOPCNTDQ,
    // RDPID.
    (7, Some(0), Reg::Ecx, 1),
    (7, Some(0), Reg::Ecx, 6),
    (7, Some(0), Reg::Ecx, 8),
    (7, Some(0), Reg::Ecx, 9),
    (7, Some(0), Reg::Ecx, 10),
    (7, Some(0), Reg::Ecx, 11),
    (7, Some(0), Reg::Ecx, 12),
    (7, Some(0), Reg::Ecx, 14),
    (7, Some(0), Reg::Ecx, 22),
    // Leaf 7.0 EDX: AVX512_4VNNIW/4FMAPS, FSRM, AVX512_VP2INTERSECT, AVX512_FP16.
    (7, Some(0), Reg::Edx, 2),
    (7, Some(0), Reg::Edx, 3),
    (7, Some(0), Reg::Edx, 4),
    (7, Some(0), Reg::Edx, 8),
    (7, Some(0), Reg::Edx, 23),
    // Leaf 7.1 EAX: AVX_VNNI, AVX512_BF16.
    (7, Some(1), Reg::Eax, 4),
    (7, Some(1), Reg::Eax, 5),
    // Leaf 0xd.1 EAX: XSAVEOPT, XSAVEC, XGETBV1, XSAVES.
    (0xd, Some(1), Reg::Eax, 0),
    (0xd, Some(1), Reg::Eax, 1),
    (0xd, Some(1), Reg::Eax, 2),
    (0xd, Some(1), Reg::Eax, 3),
    // Leaf 0x8000_0001 ECX (AMD): XOP, FMA4.
    (0x8000_0001, None, Reg::Ecx, 11),
    (0x8000_0001, None, Reg::Ecx, 16),
];

/// Builds this vCPU's CPUID from what KVM supports and sets it.
pub fn setup_cpuid(kvm: &Kvm, vcpu: &VcpuFd, index: u8, count: u8, mode: VirtMode) -> Result<(), VcpuSetupError> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(VcpuSetupError::GetSupportedCpuid)?;
    add_topology_subleaves(&mut cpuid)?;
    normalize(cpuid.as_mut_slice(), index, count, mode);
    vcpu.set_cpuid2(&cpuid).map_err(VcpuSetupError::SetCpuid)
}

/// Leaf 0xb must describe both the SMT and the core level; KVM may report only sub-leaf 0.
fn add_topology_subleaves(cpuid: &mut CpuId) -> Result<(), VcpuSetupError> {
    if !cpuid.as_slice().iter().any(|e| e.function == 0xb) {
        return Ok(());
    }
    for subleaf in 0..2 {
        if !cpuid.as_slice().iter().any(|e| e.function == 0xb && e.index == subleaf) {
            let entry = kvm_cpuid_entry2 {
                function: 0xb,
                index: subleaf,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            };
            cpuid.push(entry).map_err(|_| VcpuSetupError::CpuidTableFull { leaf: 0xb, subleaf })?;
        }
    }
    Ok(())
}

/// Bits needed to number `count` CPUs (the x2APIC ID shift of the package level).
fn id_bits(count: u8) -> u32 {
    u32::from(count).next_power_of_two().trailing_zeros()
}

fn set_bit(value: &mut u32, bit: u8, on: bool) {
    if on {
        *value |= 1 << bit;
    } else {
        *value &= !(1 << bit);
    }
}

/// Sets `value[lo..=hi]` to `field` (truncated to the field width).
fn set_field(value: &mut u32, lo: u8, hi: u8, field: u32) {
    let mask = (u32::MAX >> (31 - (hi - lo))) << lo;
    *value = (*value & !mask) | ((field << lo) & mask);
}

/// Rewrites the topology leaves for vCPU `index` of `count`, sets the hypervisor bit and, in
/// [`VirtMode::Emulated`], clears the features the emulator cannot run.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8, mode: VirtMode) {
    let amd = entries.iter().any(|e| e.function == 0 && e.ebx == AMD_VENDOR_EBX);
    let id = u32::from(index);
    let count32 = u32::from(count.max(1));
    let id_space = count32.next_power_of_two();
    for entry in entries.iter_mut() {
        match entry.function {
            1 => {
                set_field(&mut entry.ebx, 16, 23, id_space);
                set_field(&mut entry.ebx, 24, 31, id);
                set_bit(&mut entry.ecx, 31, true);
                // HTT: the logical processor count in EBX[23:16] is meaningful.
                set_bit(&mut entry.edx, 28, count32 > 1);
            }
            4 if entry.eax & 0x1f != 0 => {
                let level = (entry.eax >> 5) & 0x7;
                // One thread per core: only the last level cache is shared, by every core.
                let sharing = if level >= 3 { id_space - 1 } else { 0 };
                set_field(&mut entry.eax, 14, 25, sharing);
                set_field(&mut entry.eax, 26, 31, id_space - 1);
            }
            0xb | 0x1f => {
                let (shift, cpus, level_type) = match entry.index {
                    0 => (0, 1, 1),
                    1 => (id_bits(count.max(1)), count32, 2),
                    _ => (0, 0, 0),
                };
                entry.eax = shift;
                entry.ebx = cpus;
                entry.ecx = (level_type << 8) | (entry.index & 0xff);
                entry.edx = id;
            }
            0x8000_0008 if amd => {
                set_field(&mut entry.ecx, 0, 7, count32 - 1);
                set_field(&mut entry.ecx, 12, 15, id_bits(count.max(1)));
            }
            0x8000_001e if amd => {
                entry.eax = id;
                // Compute unit = this vCPU, one thread per unit; one node.
                entry.ebx = (entry.ebx & !0xffff) | id;
                entry.ecx &= !0x7ff;
            }
            _ => {}
        }
    }
    if mode == VirtMode::Emulated {
        clear_features(entries, EMULATED_UNSUPPORTED);
    }
}

fn clear_features(entries: &mut [kvm_cpuid_entry2], features: &[Feature]) {
    for &(leaf, subleaf, reg, bit) in features {
        for entry in entries.iter_mut().filter(|e| e.function == leaf && subleaf.is_none_or(|s| s == e.index)) {
            let value = match reg {
                Reg::Eax => &mut entry.eax,
                Reg::Ebx => &mut entry.ebx,
                Reg::Ecx => &mut entry.ecx,
                Reg::Edx => &mut entry.edx,
            };
            set_bit(value, bit, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        let [eax, ebx, ecx, edx] = regs;
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries.iter().find(|e| e.function == function && e.index == index).unwrap()
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, [0x1f, AMD_VENDOR_EBX, 0, 0]),
            entry(1, 0, [0, 0xff00_0800, u32::MAX, u32::MAX]),
            entry(4, 0, [0x121, 0, 0, 0]),
            entry(4, 1, [0x163, 0, 0, 0]),
            entry(7, 0, [0, u32::MAX, u32::MAX, u32::MAX]),
            entry(0xb, 0, [1, 2, 0x100, 9]),
            entry(0xb, 1, [4, 16, 0x201, 9]),
            entry(0xb, 2, [0, 0, 2, 9]),
            entry(0x8000_0008, 0, [0, 0, 0xffff, 0]),
            entry(0x8000_001e, 0, [7, 0x107, 0x301, 0]),
        ]
    }

    #[test]
    fn topology_describes_this_vcpu() {
        let mut entries = sample();
        normalize(&mut entries, 2, 3, VirtMode::Hardware);
        let leaf1 = find(&entries, 1, 0);
        assert_eq!(leaf1.ebx, (2 << 24) | (4 << 16) | 0x0800);
        assert_ne!(leaf1.ecx & (1 << 31), 0);
        assert_ne!(leaf1.edx & (1 << 28), 0);
        // Features stay on hardware.
        assert_eq!(find(&entries, 7, 0).ebx, u32::MAX);
        assert_eq!(find(&entries, 4, 0).eax, 0x121 | (3 << 26));
        assert_eq!(find(&entries, 4, 1).eax, 0x163 | (3 << 14) | (3 << 26));
        let smt = find(&entries, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&entries, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let invalid = find(&entries, 0xb, 2);
        assert_eq!((invalid.eax, invalid.ebx, invalid.ecx, invalid.edx), (0, 0, 2, 2));
        assert_eq!(find(&entries, 0x8000_0008, 0).ecx, 0x2002 | 0xf00);
        let ext = find(&entries, 0x8000_001e, 0);
        assert_eq!((ext.eax, ext.ebx, ext.ecx), (2, 2, 0));
    }

    #[test]
    fn one_vcpu_has_no_htt() {
        let mut entries = sample();
        normalize(&mut entries, 0, 1, VirtMode::Hardware);
        assert_eq!(find(&entries, 1, 0).edx & (1 << 28), 0);
        assert_eq!(find(&entries, 0xb, 1).eax, 0);
    }

    #[test]
    fn emulated_mode_hides_what_the_emulator_cannot_run() {
        let mut entries = sample();
        normalize(&mut entries, 0, 1, VirtMode::Emulated);
        let leaf1 = find(&entries, 1, 0);
        for bit in [23, 26, 27, 28, 30] {
            assert_eq!(leaf1.ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        assert_ne!(leaf1.ecx & (1 << 31), 0, "the hypervisor bit stays");
        let leaf7 = find(&entries, 7, 0);
        for bit in [0, 5, 7, 9, 10, 18, 20] {
            assert_eq!(leaf7.ebx & (1 << bit), 0, "leaf 7 ebx bit {bit}");
        }
        assert_eq!(leaf7.ecx & (1 << 22), 0);
        assert_eq!(leaf7.edx & (1 << 4), 0);
        // Unrelated bits survive.
        assert_ne!(leaf7.ebx & (1 << 1), 0);
    }
}
