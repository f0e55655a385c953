//! Hand-built kernel images for the loader tests: a minimal ELF64 (optionally with a Xen PVH
//! note) and a minimal bzImage setup header followed by a payload.

/// What the test ELF contains.
pub(crate) struct ElfImage {
    /// `e_entry`.
    pub entry: u64,
    /// `e_machine`.
    pub machine: u16,
    /// Physical load address of the single PT_LOAD segment.
    pub paddr: u64,
    /// The segment's file bytes.
    pub code: Vec<u8>,
    /// The segment's memory size (>= code length; the rest is bss).
    pub memsz: u64,
    /// The XEN_ELFNOTE_PHYS32_ENTRY value, if the ELF has the PVH note.
    pub pvh_entry: Option<u32>,
}

impl ElfImage {
    /// A 64-bit-entry ELF with a `hlt` at 1 MiB.
    pub fn new() -> Self {
        ElfImage { entry: 0x10_0000, machine: 62, paddr: 0x10_0000, code: vec![0xf4], memsz: 0x3000, pvh_entry: None }
    }

    /// The ELF file bytes.
    pub fn build(&self) -> Vec<u8> {
        const EHDR: usize = 64;
        const PHDR: usize = 56;
        let notes = self.pvh_entry.map(notes).unwrap_or_default();
        let phnum = 1 + usize::from(!notes.is_empty());
        let notes_off = EHDR + phnum * PHDR;
        let code_off = (notes_off + notes.len()).next_multiple_of(16);

        let mut f = Vec::new();
        f.extend_from_slice(b"\x7fELF\x02\x01\x01");
        f.resize(16, 0);
        push16(&mut f, 2); // ET_EXEC
        push16(&mut f, self.machine);
        push32(&mut f, 1);
        push64(&mut f, self.entry);
        push64(&mut f, EHDR as u64); // e_phoff
        push64(&mut f, 0); // e_shoff
        push32(&mut f, 0); // e_flags
        for v in [EHDR as u16, PHDR as u16, phnum as u16, 64, 0, 0] {
            push16(&mut f, v);
        }
        let code_len = self.code.len() as u64;
        phdr(&mut f, 1, code_off as u64, self.paddr, code_len, self.memsz);
        if !notes.is_empty() {
            phdr(&mut f, 4, notes_off as u64, 0, notes.len() as u64, notes.len() as u64);
        }
        f.extend_from_slice(&notes);
        f.resize(code_off, 0);
        f.extend_from_slice(&self.code);
        f
    }
}

fn push16(f: &mut Vec<u8>, v: u16) {
    f.extend_from_slice(&v.to_le_bytes());
}

fn push32(f: &mut Vec<u8>, v: u32) {
    f.extend_from_slice(&v.to_le_bytes());
}

fn push64(f: &mut Vec<u8>, v: u64) {
    f.extend_from_slice(&v.to_le_bytes());
}

fn phdr(f: &mut Vec<u8>, kind: u32, offset: u64, paddr: u64, filesz: u64, memsz: u64) {
    push32(f, kind);
    push32(f, 5); // R+X
    for v in [offset, paddr, paddr, filesz, memsz, 0x1000] {
        push64(f, v);
    }
}

/// A GNU build-id style note the loader must skip, then the Xen PHYS32_ENTRY note.
fn notes(pvh_entry: u32) -> Vec<u8> {
    let mut n = Vec::new();
    for v in [4, 8, 3] {
        push32(&mut n, v);
    }
    n.extend_from_slice(b"GNU\0");
    n.extend_from_slice(&[0x5a; 8]);
    for v in [4, 8, 18] {
        push32(&mut n, v);
    }
    n.extend_from_slice(b"Xen\0");
    // Linux emits a pointer-sized descriptor; the entry is its low 32 bits.
    push64(&mut n, u64::from(pvh_entry));
    n
}

/// What the test bzImage's setup header says.
pub(crate) struct BzImage {
    /// Boot protocol version.
    pub version: u16,
    /// `xloadflags`.
    pub xloadflags: u16,
    /// `init_size`.
    pub init_size: u32,
    /// `pref_address`.
    pub pref_address: u64,
    /// `initrd_addr_max`.
    pub initrd_addr_max: u32,
    /// The protected-mode kernel bytes.
    pub payload: Vec<u8>,
}

impl BzImage {
    /// A 2.15 protocol, 64-bit capable image with a 16 KiB payload.
    pub fn new() -> Self {
        BzImage {
            version: 0x020f,
            xloadflags: 1,
            init_size: 0x40_0000,
            pref_address: 0x100_0000,
            initrd_addr_max: 0x7fff_ffff,
            payload: vec![0xab; 0x4000],
        }
    }

    /// The bzImage file bytes: one setup sector after the boot sector, then the payload.
    pub fn build(&self) -> Vec<u8> {
        let mut f = vec![0u8; 1024];
        let mut put = |at: usize, bytes: &[u8]| f[at..at + bytes.len()].copy_from_slice(bytes);
        put(0x1f1, &[1]); // setup_sects
        put(0x1fe, &0xaa55u16.to_le_bytes());
        put(0x202, b"HdrS");
        put(0x206, &self.version.to_le_bytes());
        put(0x211, &[1]); // loadflags: LOADED_HIGH
        put(0x214, &0x10_0000u32.to_le_bytes()); // code32_start
        put(0x22c, &self.initrd_addr_max.to_le_bytes());
        put(0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
        put(0x234, &[1]); // relocatable_kernel
        put(0x236, &self.xloadflags.to_le_bytes());
        put(0x258, &self.pref_address.to_le_bytes());
        put(0x260, &self.init_size.to_le_bytes());
        f.extend_from_slice(&self.payload);
        f
    }
}
