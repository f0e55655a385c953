//! Local APIC wiring: LINT0 receives the legacy PIC's output as ExtINT and LINT1 receives NMIs,
//! the virtual-wire setup a BIOS leaves behind and the MP table describes.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

use super::VcpuSetupError;

/// Offset of the LVT LINT0 register in the APIC page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register in the APIC page.
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery mode NMI.
pub const APIC_MODE_NMI: u32 = 0x4;
/// LVT delivery mode ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;

/// Reads the 32-bit APIC register at `offset`.
pub fn get_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

/// Writes the 32-bit APIC register at `offset`.
pub fn set_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = byte as _;
    }
}

/// Replaces the delivery mode (bits 8..11) of an LVT entry.
pub fn with_delivery_mode(lvt: u32, mode: u32) -> u32 {
    (lvt & !0x700) | (mode << 8)
}

/// Sets LINT0 to ExtINT and LINT1 to NMI. Needs the in-kernel irqchip.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), VcpuSetupError> {
    let mut lapic = vcpu.get_lapic().map_err(VcpuSetupError::GetLapic)?;
    let lint0 = get_reg(&lapic, APIC_LVT0);
    set_reg(&mut lapic, APIC_LVT0, with_delivery_mode(lint0, APIC_MODE_EXTINT));
    let lint1 = get_reg(&lapic, APIC_LVT1);
    set_reg(&mut lapic, APIC_LVT1, with_delivery_mode(lint1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic).map_err(VcpuSetupError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_round_trip_and_keep_other_bits() {
        let mut lapic = kvm_lapic_state::default();
        set_reg(&mut lapic, APIC_LVT0, 0x0001_0000);
        assert_eq!(get_reg(&lapic, APIC_LVT0), 0x0001_0000);
        let lvt = with_delivery_mode(get_reg(&lapic, APIC_LVT0), APIC_MODE_EXTINT);
        assert_eq!(lvt, 0x0001_0700);
        assert_eq!(with_delivery_mode(0xffff_ffff, APIC_MODE_NMI), 0xffff_fcff);
    }
}
