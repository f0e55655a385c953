//! The one real Linux boot: the guest kernel from `e2e/guest-kernel.sh` boots an initramfs whose
//! `/init` (a tiny static program, `guests/init.S`) prints a marker, reads a virtio-blk disk and
//! reboots, through the real `ignite vmm run`.
//!
//! This holds on hosts whose KVM runs guests through an instruction emulator too (see PLATFORM.md):
//! there guest user mode works because the guest kernel carries
//! `guest-kernel-patches/0001-complete-syscalls-left-at-cpl3-by-kvm-pvm.patch`.

use std::process::Command;
use std::time::Instant;

use ignite_e2e::{guest_kernel, ignite_bin, kvm_unavailable, tiny_initramfs};

#[test]
fn guest_kernel_boots_to_init_with_a_virtio_disk() {
    if let Some(why) = kvm_unavailable() {
        eprintln!("SKIP guest_kernel_boots_to_init_with_a_virtio_disk: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = guest_kernel();
    let initrd = tiny_initramfs(dir.path());
    let disk = dir.path().join("disk.img");
    let mut data = b"IGNITE-DISK-DATA".to_vec();
    data.resize(1 << 20, 0);
    std::fs::write(&disk, data).unwrap();
    let console = dir.path().join("console.log");

    let started = Instant::now();
    let out = Command::new(ignite_bin())
        .args(["vmm", "run", "--memory", "128", "--timings"])
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--disk")
        .arg(format!("{},ro", disk.display()))
        .arg("--console")
        .arg(&console)
        .output()
        .expect("run ignite vmm run");
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("guest boot took {:?}; ignite stderr: {stderr}", started.elapsed());
    let context = format!("status {:?}\nstderr:\n{stderr}\nconsole:\n{log}", out.status);

    let tail: Vec<&str> = log.lines().rev().take(12).collect();
    eprintln!("console tail:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    assert!(out.status.success(), "the vm did not end cleanly: {context}");
    assert!(log.contains("Run /init as init process"), "the kernel did not reach /init: {context}");
    assert!(log.contains("[vda] 2048 512-byte logical blocks"), "virtio-blk was not probed: {context}");
    assert!(log.contains("IGNITE-INIT-MARKER"), "/init did not run in user mode: {context}");
    assert!(log.contains("IGNITE-DISK-DATA"), "/init could not read the virtio disk: {context}");
    let timings: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap_or("{}")).unwrap();
    assert_eq!(timings["exit"]["reason"], "reset", "/init reboots, which ends the vm as a reset: {context}");
}

/// A bzImage goes through linux-loader's bzImage path and the 64-bit boot protocol; its decompressor
/// announcing itself on the serial console proves the kernel's own code runs. (Decompressing takes
/// minutes on an emulated host, so the test stops there.)
#[test]
fn guest_bzimage_starts_its_decompressor() {
    if let Some(why) = kvm_unavailable() {
        eprintln!("SKIP guest_bzimage_starts_its_decompressor: {why}");
        return;
    }
    let bzimage = guest_kernel().with_file_name("bzImage");
    assert!(bzimage.exists(), "{} is missing: e2e/guest-kernel.sh builds it", bzimage.display());
    let dir = tempfile::tempdir().unwrap();
    let console = dir.path().join("console.log");
    let mut config = vmm_core::VmConfig::new(&bzimage);
    config.cmdline = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1".into();
    config.console = vmm_core::ConsoleConfig::File(console.clone());
    let handle = vmm_core::Vm::start(&config).expect("the bzImage loads");
    let deadline = Instant::now() + std::time::Duration::from_secs(300);
    let mut log = String::new();
    while Instant::now() < deadline && !log.contains("Decompressing Linux") && handle.exit_reason().is_none() {
        std::thread::sleep(std::time::Duration::from_millis(200));
        log = std::fs::read_to_string(&console).unwrap_or_default();
    }
    let exit = handle.kill();
    assert!(log.contains("Decompressing Linux"), "no decompressor output; exit {:?}; console:\n{log}", exit.reason);
}
