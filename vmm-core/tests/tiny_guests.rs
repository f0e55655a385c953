//! The engine on the real `/dev/kvm` with tiny hand-assembled guests: each proves one path end to end
//! (ELF loading, vCPU set-up, port I/O, MMIO, the virtio-mmio transport, virtio-blk, exits).

mod common;

use std::time::Duration;

use vmm_core::{DiskConfig, ExitReason, Vm, VmError};

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn serial_output_reaches_the_console_and_power_off_carries_the_exit_code() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let source = r#"
.global _start
_start:
    print msg
    power_off 7
msg: .asciz "hello from the guest\n"
"#;
    let config = common::tiny_config(dir.path(), common::assemble(dir.path(), "serial", source));
    let (reason, console) = common::run_to_exit(&config, TIMEOUT);
    assert_eq!(reason, ExitReason::PowerOff { code: 7 });
    assert_eq!(console, "hello from the guest\n");
}

#[test]
fn i8042_reset_ends_the_vm_as_a_reset() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let source = "
.global _start
_start:
    mov al, 0xfe
    out 0x64, al
1:  hlt
    jmp 1b
";
    let config = common::tiny_config(dir.path(), common::assemble(dir.path(), "reset", source));
    assert_eq!(common::run_to_exit(&config, TIMEOUT).0, ExitReason::Reset);
}

#[test]
fn a_triple_fault_is_reported_as_a_crash() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    // An empty IDT: the #UD cannot be delivered, nor the #DF, so the CPU shuts down.
    let source = "
.global _start
_start:
    lidt [rip + empty_idt]
    ud2
empty_idt: .word 0
    .quad 0
";
    let config = common::tiny_config(dir.path(), common::assemble(dir.path(), "triple", source));
    match common::run_to_exit(&config, TIMEOUT).0 {
        ExitReason::Crash { detail } => assert!(detail.contains("triple fault"), "{detail}"),
        other => panic!("expected a crash, got {other:?}"),
    }
}

#[test]
fn a_second_vcpu_starts_through_init_and_sipi() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    // The boot vCPU copies a real-mode trampoline to 0x8000 and wakes vCPU 1 (APIC ID 1) with
    // INIT-SIPI-SIPI through its local APIC; the AP sets a flag at 0x5000 that the BSP waits for.
    let source = r#"
.equ ICR_LOW, 0xfee00300
.equ ICR_HIGH, 0xfee00310
.global _start
_start:
    mov byte ptr [0x5000], 0
    lea rsi, [rip + ap_start]
    mov rdi, 0x8000
    mov ecx, ap_end - ap_start
    rep movsb
    mov ebx, ICR_LOW          /* above 2 GiB: not encodable as a 64-bit-mode displacement */
    mov dword ptr [rbx + ICR_HIGH - ICR_LOW], 1 << 24
    mov dword ptr [rbx], 0x4500
    mov ecx, 100000
1:  loop 1b
    mov dword ptr [rbx + ICR_HIGH - ICR_LOW], 1 << 24
    mov dword ptr [rbx], 0x4608
    mov ecx, 20000000
2:  cmp byte ptr [0x5000], 0x42
    je 3f
    dec ecx
    jnz 2b
    power_off 2
3:  print msg
    power_off 0
msg: .asciz "vcpu 1 is up\n"

.code16
ap_start:
    xor ax, ax
    mov ds, ax
    mov byte ptr [0x5000], 0x42
4:  cli
    hlt
    jmp 4b
ap_end:
.code64
"#;
    let mut config = common::tiny_config(dir.path(), common::assemble(dir.path(), "smp", source));
    config.vcpus = 2;
    let (reason, console) = common::run_to_exit(&config, TIMEOUT);
    assert_eq!(reason, ExitReason::PowerOff { code: 0 }, "console: {console}");
    assert_eq!(console, "vcpu 1 is up\n");
}

#[test]
fn virtio_blk_round_trip_through_the_mmio_transport() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let kernel = common::assemble(dir.path(), "blk", include_str!("guests/virtio_blk.S"));
    let mut config = common::tiny_config(dir.path(), kernel);
    config.disks.push(DiskConfig { path: disk.clone(), read_only: false });
    let (reason, console) = common::run_to_exit(&config, TIMEOUT);
    assert_eq!(reason, ExitReason::PowerOff { code: 0 }, "the guest driver failed; console: {console}");
    assert_eq!(console, "virtio-blk round trip ok\n");
    // The guest's write landed in sector 1 of the backing file, and nothing else changed.
    let data = std::fs::read(&disk).unwrap();
    let expected: Vec<u8> = (0..512u32).map(|i| (i * 7 + 1) as u8).collect();
    assert_eq!(&data[512..1024], expected.as_slice());
    assert!(data[..512].iter().chain(&data[1024..]).all(|&b| b == 0));
}

#[test]
fn fwait_runs_or_is_stepped_over() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    // A software-emulated KVM cannot run FWAIT; the VMM steps over it there (Linux runs it whenever a
    // task that used the FPU exits). On hardware it simply runs.
    let source = "
.global _start
_start:
    fninit
    fwait
    power_off 9
";
    let config = common::tiny_config(dir.path(), common::assemble(dir.path(), "fwait", source));
    let handle = Vm::start(&config).unwrap();
    assert!(handle.wait_timeout(TIMEOUT).is_some(), "the guest did not finish");
    let exit = handle.wait();
    assert_eq!(exit.reason, ExitReason::PowerOff { code: 9 });
    if vmm_core::VirtMode::detect() == vmm_core::VirtMode::Emulated {
        assert_eq!(exit.counters.emulation_fixups, 1, "FWAIT was stepped over once");
    }
}

#[test]
fn a_file_that_is_not_a_kernel_is_rejected_with_its_path() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("not-a-kernel");
    std::fs::write(&bogus, b"#!/bin/sh\necho this is not a kernel\n").unwrap();
    let err = Vm::start(&common::tiny_config(dir.path(), bogus.clone())).err().expect("must fail");
    assert!(matches!(err, VmError::Boot(_)), "{err:?}");
    let chain = format!("{err}: {}", std::error::Error::source(&err).map(|s| s.to_string()).unwrap_or_default());
    assert!(chain.contains(&bogus.display().to_string()), "{chain}");

    let missing = dir.path().join("missing-vmlinux");
    let err = Vm::start(&common::tiny_config(dir.path(), missing.clone())).err().expect("must fail");
    let chain = format!("{err}: {}", std::error::Error::source(&err).map(|s| s.to_string()).unwrap_or_default());
    assert!(chain.contains(&missing.display().to_string()), "{chain}");
}

#[test]
fn pause_resume_and_forced_stop() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    // Spins forever printing nothing: only the host can end it.
    let source = "
.global _start
_start:
1:  inc rax
    jmp 1b
";
    let config = common::tiny_config(dir.path(), common::assemble(dir.path(), "spin", source));
    let handle = Vm::start(&config).unwrap();
    assert!(!handle.is_paused());
    handle.pause().unwrap();
    assert!(handle.is_paused());
    let paused_exits = handle.counters().exits;
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(handle.counters().exits, paused_exits, "no vcpu runs while paused");
    handle.resume().unwrap();
    assert!(!handle.is_paused());
    assert_eq!(handle.wait_timeout(Duration::from_millis(50)), None);
    // No guest OS to honour Ctrl-Alt-Del: the graceful stop times out and the VM is stopped by force.
    let exit = handle.stop(Duration::from_millis(200));
    assert_eq!(exit.reason, ExitReason::Stopped);
    assert!(exit.counters.time_to_first_run.is_some());
}

#[test]
fn console_socket_input_reaches_the_guest_uart_and_its_output_comes_back() {
    use std::io::{Read, Write};
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    // Polls the line status register, reads each byte, echoes it plus one; `q` powers off with 42.
    let source = r#"
.global _start
_start:
    mov dx, 0x3fd
1:  in al, dx
    test al, 1
    jz 1b
    mov dx, 0x3f8
    in al, dx
    cmp al, 'q'
    je 2f
    inc al
    out dx, al
    jmp _start
2:  power_off 42
"#;
    let mut config = common::tiny_config(dir.path(), common::assemble(dir.path(), "echo", source));
    let socket = dir.path().join("console.sock");
    config.console_socket = Some(socket.clone());
    let handle = Vm::start(&config).expect("vm starts");
    let mut client = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    // More than the UART's 64-byte FIFO and than one read, so the input waits for the guest.
    let input: Vec<u8> = (0..300u32).map(|i| b'a' + (i % 16) as u8).collect();
    client.write_all(&input).unwrap();
    client.write_all(b"q").unwrap();
    let expected: Vec<u8> = input.iter().map(|b| b + 1).collect();
    let mut echoed = vec![0u8; expected.len()];
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    client.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, expected);
    assert_eq!(handle.wait_timeout(TIMEOUT), Some(ExitReason::PowerOff { code: 42 }));
    drop(handle);
    assert_eq!(std::fs::read(dir.path().join("console.log")).unwrap(), expected, "the log gets the output too");
    assert!(!socket.exists(), "the socket is removed with the VM");
}
