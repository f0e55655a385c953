//! The guest init must be a static executable: it runs in images with no or an incompatible C library.

/// Reads the program headers of a 64-bit little-endian ELF and returns their types.
fn program_header_types(elf: &[u8]) -> Vec<u32> {
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not a 64-bit ELF");
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).map(|i| u32::from_le_bytes(elf[phoff + i * phentsize..][..4].try_into().unwrap())).collect()
}

#[test]
fn built_binary_has_no_interpreter_and_no_dynamic_section() {
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    let path = env!("CARGO_BIN_EXE_ignite-init");
    let elf = std::fs::read(path).unwrap();
    let types = program_header_types(&elf);
    assert!(!types.is_empty(), "{path} has no program headers");
    assert!(!types.contains(&PT_INTERP), "{path} needs a dynamic loader (PT_INTERP)");
    assert!(!types.contains(&PT_DYNAMIC), "{path} links shared libraries (PT_DYNAMIC)");
}

#[test]
fn refuses_to_run_outside_pid_1() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ignite-init")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ignite-init: must run as PID 1"));
}
