//! Segment descriptors for the boot GDT, and the matching `kvm_segment` values: KVM does not read
//! the GDT when the vCPU starts, so the hidden part of each segment register must be given
//! explicitly and agree with what the guest will later reload from memory.

use kvm_bindings::kvm_segment;

/// One GDT entry, described by its access/flags word (the kernel's `GDT_ENTRY` layout: access byte
/// in bits 0..8, flags nibble G/DB/L/AVL in bits 12..16), base and 20-bit limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Access byte and flags nibble, e.g. `0xa09b` for 64-bit code.
    pub flags: u16,
    /// Segment base.
    pub base: u32,
    /// Segment limit in units of the granularity (20 bits).
    pub limit: u32,
}

impl Descriptor {
    /// The null descriptor.
    pub const NULL: Descriptor = Descriptor { flags: 0, base: 0, limit: 0 };

    /// A descriptor with the given flags, base and limit.
    pub const fn new(flags: u16, base: u32, limit: u32) -> Self {
        Descriptor { flags, base, limit }
    }

    /// The 8-byte in-memory encoding.
    pub fn encode(&self) -> u64 {
        let base = u64::from(self.base);
        let limit = u64::from(self.limit);
        let flags = u64::from(self.flags);
        (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | ((flags & 0xff) << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((flags >> 12) & 0xf) << 52)
            | (((base >> 24) & 0xff) << 56)
    }

    fn bit(&self, n: u16) -> u8 {
        ((self.flags >> n) & 1) as u8
    }

    /// The segment register value for this descriptor at GDT slot `index`.
    pub fn to_kvm_segment(&self, index: u16) -> kvm_segment {
        let granular = self.bit(15) == 1;
        // KVM takes the limit in bytes; with 4 KiB granularity the low 12 bits read as ones.
        let limit = if granular { (self.limit << 12) | 0xfff } else { self.limit };
        let present = self.bit(7);
        kvm_segment {
            base: u64::from(self.base),
            limit,
            selector: index * 8,
            type_: (self.flags & 0xf) as u8,
            present,
            dpl: ((self.flags >> 5) & 3) as u8,
            db: self.bit(14),
            s: self.bit(4),
            l: self.bit(13),
            g: self.bit(15),
            avl: self.bit(12),
            unusable: u8::from(present == 0),
            padding: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_the_kernel_gdt_entry_macro() {
        assert_eq!(Descriptor::new(0xa09b, 0, 0xfffff).encode(), 0x00af_9b00_0000_ffff);
        assert_eq!(Descriptor::new(0xc093, 0, 0xfffff).encode(), 0x00cf_9300_0000_ffff);
        assert_eq!(Descriptor::new(0x808b, 0, 0xfffff).encode(), 0x008f_8b00_0000_ffff);
        assert_eq!(Descriptor::new(0x8b, 0x1234_5678, 0x67).encode(), 0x1200_8b34_5678_0067);
    }

    #[test]
    fn kvm_segment_matches_the_flags() {
        let code = Descriptor::new(0xa09b, 0, 0xfffff).to_kvm_segment(1);
        assert_eq!((code.selector, code.type_, code.l, code.db, code.g, code.s), (8, 0xb, 1, 0, 1, 1));
        assert_eq!((code.present, code.unusable, code.limit), (1, 0, 0xffff_ffff));
        let code32 = Descriptor::new(0xc09b, 0, 0xfffff).to_kvm_segment(1);
        assert_eq!((code32.l, code32.db), (0, 1));
        assert_eq!(Descriptor::NULL.to_kvm_segment(0).unusable, 1);
    }
}
