//! The state file format and the memory file, without KVM: what is refused, and that nothing is
//! refused that should load.

use super::*;

fn state() -> MachineState {
    MachineState {
        host_cpu: HostCpu::current(),
        memory_mib: 1,
        vcpus: Vec::new(),
        vm: VmState {
            pic_master: kvm_irqchip { chip_id: PIC_MASTER, ..Default::default() },
            pic_slave: kvm_irqchip { chip_id: PIC_SLAVE, ..Default::default() },
            ioapic: kvm_irqchip { chip_id: IOAPIC, ..Default::default() },
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data { clock: 12345, ..Default::default() },
        },
        serial: SerialState { scratch: 0x5a, in_buffer: b"typed".to_vec(), ..Default::default() },
        i8042: I8042State { ctr: 0x47, out: vec![0xfa], ..Default::default() },
        virtio: Vec::new(),
    }
}

const MIB: usize = 1 << 20;

/// A saved snapshot of one MiB of memory whose bytes are their offset modulo 251.
fn saved(dir: &Path) -> MachineState {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MIB)]).unwrap();
    let pattern: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(0)).unwrap();
    let state = state();
    assert_eq!(save(dir, &state, &mem).unwrap(), MIB as u64);
    state
}

#[test]
fn a_saved_snapshot_loads_and_its_memory_maps_privately() {
    let dir = tempfile::tempdir().unwrap();
    let state = saved(dir.path());
    let names: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 2, "only the state and memory files, no temporary ones: {names:?}");

    let loaded = load(dir.path()).unwrap();
    assert_eq!(loaded.state.serial, state.serial);
    assert_eq!(loaded.state.i8042, state.i8042);
    assert_eq!(loaded.state.vm.clock.clock, 12345);
    let mem = map_memory(&loaded.memory, &loaded.memory_path, &[(GuestAddress(0), MIB)]).unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(1000)).unwrap(), (1000 % 251) as u8);
    // Copy on write: the guest's writes never reach the snapshot.
    mem.write_obj(0xffu8, GuestAddress(1000)).unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(1000)).unwrap(), 0xff);
    assert_eq!(std::fs::read(dir.path().join(MEMORY_FILE)).unwrap()[1000], (1000 % 251) as u8);
}

#[test]
fn a_damaged_state_file_is_refused_by_its_checksum() {
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path());
    let path = dir.path().join(STATE_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let err = load(dir.path()).err().expect("refused");
    assert!(matches!(err, SnapshotError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains("is damaged") && err.to_string().contains(&path.display().to_string()), "{err}");

    bytes.truncate(HEADER_LEN + 10);
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(load(dir.path()), Err(SnapshotError::Checksum { .. })), "a cut payload");
}

#[test]
fn another_format_version_is_refused_with_both_versions_named() {
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path());
    let path = dir.path().join(STATE_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = load(dir.path()).err().expect("refused");
    assert!(matches!(err, SnapshotError::Version { found, .. } if found == FORMAT_VERSION + 1), "{err}");
    assert!(err.to_string().contains(&format!("reads version {FORMAT_VERSION} only")), "{err}");
}

#[test]
fn files_that_are_not_snapshots_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path());
    let path = dir.path().join(STATE_FILE);
    std::fs::write(&path, b"{\"hello\": 1}\n").unwrap();
    assert!(matches!(load(dir.path()), Err(SnapshotError::NotASnapshot { .. })));
    let mut huge = MAGIC.to_vec();
    huge.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    huge.extend_from_slice(&u64::MAX.to_le_bytes());
    huge.extend_from_slice(&[0; 32]);
    std::fs::write(&path, &huge).unwrap();
    let err = load(dir.path()).err().expect("refused");
    assert!(matches!(err, SnapshotError::NotASnapshot { .. }), "a payload length from a hostile file: {err}");
}

#[test]
fn another_cpu_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MIB)]).unwrap();
    let mut state = state();
    state.host_cpu.signature ^= 0x10; // another model
    save(dir.path(), &state, &mem).unwrap();
    let err = load(dir.path()).err().expect("refused");
    assert!(matches!(err, SnapshotError::HostCpu { .. }), "{err}");
    assert!(err.to_string().contains("same CPU model"), "{err}");
}

#[test]
fn a_missing_or_short_memory_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    saved(dir.path());
    let memory = dir.path().join(MEMORY_FILE);
    let file = std::fs::OpenOptions::new().write(true).open(&memory).unwrap();
    file.set_len(MIB as u64 / 2).unwrap();
    let loaded = load(dir.path()).unwrap();
    let err = map_memory(&loaded.memory, &loaded.memory_path, &[(GuestAddress(0), MIB)]).expect_err("refused");
    assert!(matches!(err, SnapshotError::MemorySize { found, .. } if found == MIB as u64 / 2), "{err}");

    std::fs::remove_file(&memory).unwrap();
    let err = load(dir.path()).err().expect("refused");
    assert!(matches!(err, SnapshotError::Io { ref path, .. } if path == &memory), "{err}");
}

#[test]
fn snapshot_names_are_one_plain_path_component() {
    for good in ["a", "before-upgrade", "2026-12-03T06.30_ok", &"x".repeat(64)] {
        assert!(check_name(good).is_ok(), "{good}");
    }
    for bad in ["", ".", "..", ".hidden", "a/b", "../escape", "/abs", "sp ace", "nul\0", "é", &"x".repeat(65)] {
        assert!(matches!(check_name(bad), Err(SnapshotError::Name { .. })), "{bad:?}");
    }
}

#[test]
fn an_interrupted_save_leaves_no_state_file() {
    let dir = tempfile::tempdir().unwrap();
    // The memory cannot be written (the temporary name is taken by a directory): the save fails
    // before any state file exists, so the directory is not a snapshot.
    std::fs::create_dir(dir.path().join(format!(".{MEMORY_FILE}.tmp"))).unwrap();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MIB)]).unwrap();
    assert!(save(dir.path(), &state(), &mem).is_err());
    assert!(!dir.path().join(STATE_FILE).exists());
    assert!(matches!(load(dir.path()), Err(SnapshotError::Io { .. })));
}
