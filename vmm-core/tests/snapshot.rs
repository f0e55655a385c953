//! Snapshots on the real `/dev/kvm` with tiny guests that count: a VM is saved while it counts, the
//! original is killed and dropped, and a new VM built from the snapshot files alone counts on from
//! the saved value, in its register and in its memory; a virtio-blk request in flight at the
//! snapshot completes exactly once.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use vmm_core::snapshot::{self, SnapshotError};
use vmm_core::{ConsoleConfig, DiskConfig, ExitReason, Vm, VmConfig, VmError};

const TIMEOUT: Duration = Duration::from_secs(180);
/// Where the guest keeps its count in memory.
const COUNTER_ADDR: u64 = 0x6000;
/// The count at which the guest powers off with code 0.
const LIMIT: u64 = 0x40;

/// Counts in `r12` and at 0x6000, checking before each step that both agree (exit 3 if not), prints
/// `count N` (hex) each step, and powers off at `LIMIT`. With `smp`, vCPU 1 counts at 0x5004 in real
/// mode and vCPU 0 checks that it keeps counting (exit 4 if it stopped).
fn counter_source(smp: bool) -> String {
    let wake_ap = if smp {
        r#"
    lea rsi, [rip + ap_start]
    mov rdi, 0x8000
    mov ecx, ap_end - ap_start
    rep movsb
    mov ebx, 0xfee00300
    mov dword ptr [rbx + 0x10], 1 << 24
    mov dword ptr [rbx], 0x4500
    mov ecx, 100000
1:  loop 1b
    mov dword ptr [rbx + 0x10], 1 << 24
    mov dword ptr [rbx], 0x4608
2:  cmp dword ptr [0x5004], 0
    je 2b
    mov r13d, dword ptr [0x5004]
"#
    } else {
        ""
    };
    // vCPU 1 may not be scheduled during one step on a loaded host: eight steps without progress fail.
    let check_ap = if smp {
        r#"
    mov eax, dword ptr [0x5004]
    cmp eax, r13d
    jne 7f
    inc r14
    cmp r14, 8
    jae ap_stuck
    jmp 8f
7:  mov r13d, eax
    xor r14, r14
8:
"#
    } else {
        ""
    };
    format!(
        r#"
.global _start
_start:
    mov dword ptr [0x5004], 0
    {wake_ap}
    xor r12, r12
    xor r14, r14
    mov qword ptr [{COUNTER_ADDR:#x}], 0
next:
    cmp qword ptr [{COUNTER_ADDR:#x}], r12
    jne mismatch
    inc r12
    mov qword ptr [{COUNTER_ADDR:#x}], r12
    print prefix
    mov rbx, r12
    mov ecx, 16
3:  rol rbx, 4
    mov al, bl
    and al, 0xf
    add al, '0'
    cmp al, '9'
    jbe 4f
    add al, 7
4:  out dx, al
    dec ecx
    jnz 3b
    mov al, 10
    out dx, al
    mov ecx, 150000
5:  loop 5b
    {check_ap}
    cmp r12, {LIMIT:#x}
    jne next
    power_off 0
mismatch:
    power_off 3
ap_stuck:
    power_off 4
prefix: .asciz "count "

.code16
ap_start:
    xor ax, ax
    mov ds, ax
6:  inc dword ptr [0x5004]
    jmp 6b
ap_end:
.code64
"#
    )
}

fn counter_config(dir: &Path, smp: bool, console: &str) -> VmConfig {
    let name = if smp { "counter-smp" } else { "counter" };
    let kernel = common::assemble(dir, name, &counter_source(smp));
    let mut config = common::tiny_config(dir, kernel);
    config.vcpus = if smp { 2 } else { 1 };
    config.console = ConsoleConfig::File(dir.join(console));
    config
}

/// The counts printed on a console, in order.
fn counts(console: &str) -> Vec<u64> {
    console.lines().filter_map(|l| l.strip_prefix("count ")).filter_map(|n| u64::from_str_radix(n, 16).ok()).collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until the console at `path` shows `count` (or fails after `TIMEOUT`).
fn wait_for_count(path: &Path, count: u64) {
    let started = Instant::now();
    while counts(&read(path)).last().is_none_or(|&c| c < count) {
        assert!(started.elapsed() < TIMEOUT, "the guest never counted to {count}:\n{}", read(path));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the counter, saves it at a count of at least 3, kills the original, restores a new VM from
/// the files and checks that it counts on from the saved value to the end.
fn saved_and_restored(smp: bool) {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let original = counter_config(dir.path(), smp, "original.log");
    let handle = Vm::start(&original).expect("vm starts");
    wait_for_count(&dir.path().join("original.log"), 3);
    let written = handle.snapshot(&snap).expect("snapshot");
    assert_eq!(written, 64 << 20, "all of guest memory is written");
    // The original runs on after its snapshot: it was resumed.
    let at_snapshot = counts(&read(&dir.path().join("original.log"))).last().copied().unwrap();
    wait_for_count(&dir.path().join("original.log"), at_snapshot + 2);
    drop(handle.kill());

    let saved = snapshot::load(&snap).unwrap();
    let register = saved.state.vcpus[0].regs.r12;
    let memory = std::fs::read(snap.join(snapshot::MEMORY_FILE)).unwrap();
    let in_memory = u64::from_le_bytes(memory[COUNTER_ADDR as usize..][..8].try_into().unwrap());
    assert!((3..LIMIT).contains(&register), "the register held the count: {register}");
    assert!(in_memory == register || in_memory + 1 == register, "memory {in_memory} vs register {register}");

    let mut restored = counter_config(dir.path(), smp, "restored.log");
    restored.restore_from = Some(snap.clone());
    let (reason, console) = common::run_to_exit(&restored, TIMEOUT);
    assert_eq!(
        reason,
        ExitReason::PowerOff { code: 0 },
        "3: memory and register disagree, 4: vCPU 1 stopped\n{console}"
    );
    let after = counts(&console);
    // The restored guest prints only what it counted after the snapshot: it did not boot again.
    assert!(
        !after.is_empty() && (after[0] == register || after[0] == register + 1),
        "first count {after:?} after a saved {register}"
    );
    let expected: Vec<u64> = (after[0]..=LIMIT).collect();
    assert_eq!(after, expected, "the restored guest counted on without a gap:\n{console}");
}

#[test]
fn a_restored_vm_counts_on_from_its_snapshot_in_register_and_memory() {
    require_kvm!();
    saved_and_restored(false);
}

#[test]
fn both_vcpus_of_a_restored_smp_vm_run_on_from_the_snapshot() {
    require_kvm!();
    saved_and_restored(true);
}

#[test]
fn a_snapshot_restores_only_into_a_vm_of_its_shape_and_leaves_the_original_untouched() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snap");
    let config = counter_config(dir.path(), false, "original.log");
    let handle = Vm::start(&config).expect("vm starts");
    wait_for_count(&dir.path().join("original.log"), 2);
    handle.snapshot(&snap).expect("snapshot");

    let mut bigger = config.clone();
    bigger.memory_mib = 128;
    match Vm::restore(&bigger, &snap) {
        Err(VmError::Snapshot(err @ SnapshotError::Shape { .. })) => {
            assert!(err.to_string().contains("memory MiB 64") && err.to_string().contains("128"), "{err}")
        }
        other => panic!("expected a shape error, got {:?}", other.err()),
    }
    let mut with_disk = config.clone();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    with_disk.disks.push(DiskConfig { path: disk.clone(), read_only: false });
    let err = Vm::restore(&with_disk, &snap).err().expect("refused");
    assert!(matches!(err, VmError::Snapshot(SnapshotError::Shape { what: "virtio devices", .. })), "{err}");

    // A damaged memory file (cut short) is refused before the VM exists; the original runs on.
    let memory = snap.join(snapshot::MEMORY_FILE);
    std::fs::OpenOptions::new().write(true).open(&memory).unwrap().set_len(4096).unwrap();
    let err = Vm::restore(&config, &snap).err().expect("refused");
    assert!(matches!(err, VmError::Snapshot(SnapshotError::MemorySize { .. })), "{err}");
    let before = counts(&read(&dir.path().join("original.log"))).last().copied().unwrap();
    wait_for_count(&dir.path().join("original.log"), before + 1);
    assert_eq!(handle.exit_reason(), None, "the original still runs");
    drop(handle.kill());
}

/// The used ring index of the virtio-blk counter guest (`USED + 2` in `virtio_blk_counter.S`).
const BLK_USED_IDX: usize = 0x202002;
const SECTOR: usize = 512;

#[test]
fn a_virtio_blk_request_in_flight_at_the_snapshot_completes_exactly_once_after_restore() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let source = format!(".equ LIMIT, {LIMIT:#x}\n{}", include_str!("guests/virtio_blk_counter.S"));
    let kernel = common::assemble(dir.path(), "blk-counter", &source);
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; (LIMIT as usize + 1) * SECTOR]).unwrap();
    let mut config = common::tiny_config(dir.path(), kernel);
    config.console = ConsoleConfig::File(dir.path().join("original.log"));
    config.disks.push(DiskConfig { path: disk.clone(), read_only: false });

    let handle = Vm::start(&config).expect("vm starts");
    wait_for_count(&dir.path().join("original.log"), 3);
    let snap = dir.path().join("snap");
    handle.snapshot(&snap).expect("snapshot");
    drop(handle.kill());

    // The restored VM gets the disk as it was at the snapshot: what the original wrote after it is
    // wiped, so every later sector must be written by the restored guest.
    let memory = std::fs::read(snap.join(snapshot::MEMORY_FILE)).unwrap();
    let used = u64::from(u16::from_le_bytes([memory[BLK_USED_IDX], memory[BLK_USED_IDX + 1]]));
    let register = snapshot::load(&snap).unwrap().state.vcpus[0].regs.r12;
    assert!(used == register || used + 1 == register, "used ring {used}, count {register}");
    let mut image = std::fs::read(&disk).unwrap();
    image[(used as usize + 1) * SECTOR..].fill(0);
    let restored_disk = dir.path().join("restored.img");
    std::fs::write(&restored_disk, &image).unwrap();

    let mut restored = config.clone();
    restored.console = ConsoleConfig::File(dir.path().join("restored.log"));
    restored.disks[0].path = restored_disk.clone();
    restored.restore_from = Some(snap.clone());
    let (reason, console) = common::run_to_exit(&restored, TIMEOUT);
    // 20: the used ring never reached the count (a request served twice overshoots it).
    assert_eq!(reason, ExitReason::PowerOff { code: 0 }, "{console}");
    let after = counts(&console);
    assert!(!after.is_empty() && (after[0] == register || after[0] == register + 1), "{after:?} after {register}");
    assert_eq!(after, (after[0]..=LIMIT).collect::<Vec<_>>(), "counted on without a gap:\n{console}");
    let image = std::fs::read(&restored_disk).unwrap();
    for n in 1..=LIMIT as usize {
        let value = u64::from_le_bytes(image[n * SECTOR..][..8].try_into().unwrap());
        assert_eq!(value, n as u64, "sector {n}");
    }
}

#[test]
fn a_restored_vsock_device_tells_the_driver_its_connections_were_reset() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let source = format!(".equ LIMIT, {LIMIT:#x}\n{}", include_str!("guests/virtio_vsock_event.S"));
    let kernel = common::assemble(dir.path(), "vsock-event", &source);
    let mut config = common::tiny_config(dir.path(), kernel);
    config.console = ConsoleConfig::File(dir.path().join("original.log"));
    config.vsock = Some(vmm_core::VsockConfig { guest_cid: 3, uds_path: dir.path().join("original.vsock") });
    let handle = Vm::start(&config).expect("vm starts");
    wait_for_count(&dir.path().join("original.log"), 3);
    let snap = dir.path().join("snap");
    handle.snapshot(&snap).expect("snapshot");
    let at_snapshot = counts(&read(&dir.path().join("original.log"))).last().copied().unwrap();
    wait_for_count(&dir.path().join("original.log"), at_snapshot + 2);
    drop(handle.kill());
    assert!(!read(&dir.path().join("original.log")).contains("reset"), "the original's connections were not reset");

    let mut restored = config.clone();
    restored.console = ConsoleConfig::File(dir.path().join("restored.log"));
    restored.vsock = Some(vmm_core::VsockConfig { guest_cid: 3, uds_path: dir.path().join("restored.vsock") });
    restored.restore_from = Some(snap.clone());
    let (reason, console) = common::run_to_exit(&restored, TIMEOUT);
    // 5: an event other than a transport reset; 6: no event at all.
    assert_eq!(reason, ExitReason::PowerOff { code: 0 }, "{console}");
    assert!(console.ends_with("transport reset\n"), "{console}");
}
