//! Snapshots through the real `ignite vmm run` process, jailed when run as root: a tiny guest that
//! counts with virtio-blk writes is saved by a `snapshot` control request into the jail's snapshot
//! directory, the VMM is killed, and a new `ignite vmm run --restore` process (with a copy of the disk
//! as it was at the snapshot) counts on from the saved value to the end. Then the same with a Linux
//! guest (the cached guest kernel, a busybox initramfs counting once a second onto its disk, vsock
//! and rng attached): it counts on after the restore without booting again. One Linux boot: a minute
//! or two on hosts whose KVM emulates guests.

#[path = "../../vmm-core/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ignite_e2e::{counting_initramfs, ignite_bin, kvm_unavailable, linux_counts};
use vmm_core::control::{self, Request};
use vmm_core::snapshot;

const NAME: &str = "a_snapshot_taken_through_the_control_socket_restores_in_a_new_vmm_process";
const LIMIT: u64 = 0x40;
const SECTOR: usize = 512;
/// The used ring index of `virtio_blk_counter.S`.
const BLK_USED_IDX: usize = 0x202002;
const TIMEOUT: Duration = Duration::from_secs(180);

fn counts(console: &str) -> Vec<u64> {
    console.lines().filter_map(|l| l.strip_prefix("count ")).filter_map(|n| u64::from_str_radix(n, 16).ok()).collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn vmm(console: &Path, disk: &Path) -> Command {
    let mut cmd = Command::new(ignite_bin());
    cmd.args(["vmm", "run", "--memory", "64", "--no-rng", "--stop-timeout", "0", "--console"])
        .arg(console)
        .arg("--disk")
        .arg(disk)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

#[test]
fn a_snapshot_taken_through_the_control_socket_restores_in_a_new_vmm_process() {
    if let Some(reason) = kvm_unavailable() {
        eprintln!("SKIP {NAME}: {reason}");
        return;
    }
    let jailed = vmm_core::jail::is_root();
    if !jailed {
        eprintln!("{NAME}: not root, so the vmm runs without a jail (the jailed path is not exercised)");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let source =
        format!(".equ LIMIT, {LIMIT:#x}\n{}", include_str!("../../vmm-core/tests/guests/virtio_blk_counter.S"));
    let kernel = common::assemble(d, "blk-counter", &source);
    let disk = d.join("disk.img");
    std::fs::write(&disk, vec![0u8; (LIMIT as usize + 1) * SECTOR]).unwrap();
    let (socket, snapshots) = (d.join("control.sock"), d.join("snapshots"));
    let original = vmm(&d.join("original.log"), &disk)
        .arg("--kernel")
        .arg(kernel)
        .arg("--control-socket")
        .arg(&socket)
        .arg("--snapshot-dir")
        .arg(&snapshots)
        .spawn()
        .unwrap();
    let started = Instant::now();
    while counts(&read(&d.join("original.log"))).last().is_none_or(|&c| c < 3) {
        assert!(started.elapsed() < TIMEOUT, "the guest did not count:\n{}", read(&d.join("original.log")));
        std::thread::sleep(Duration::from_millis(50));
    }

    let ask = |request: &Request| control::request(&socket, request, Duration::from_secs(60));
    let reply = ask(&Request::Snapshot { name: "first".into() }).expect("snapshot");
    assert_eq!(reply.memory_bytes, Some(64 << 20), "{reply:?}");
    let saved = snapshots.join("first");
    assert!(saved.join(snapshot::STATE_FILE).is_file() && saved.join(snapshot::MEMORY_FILE).is_file());
    if jailed {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&snapshots).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700, "the snapshot directory is the VM's alone");
        assert_ne!(std::fs::metadata(saved.join(snapshot::STATE_FILE)).unwrap().uid(), 0, "written by the jail's uid");
    }
    // Hostile or repeated names are refused; nothing is written outside the directory.
    for (name, expected) in
        [("../escape", "is not a snapshot name"), ("first", "exists already"), (".hidden", "is not")]
    {
        let err = ask(&Request::Snapshot { name: name.into() }).expect_err(name);
        assert!(err.to_string().contains(expected), "{name}: {err}");
    }
    assert!(!d.join("escape").exists());
    ask(&Request::Kill).expect("kill");
    let out = original.wait_with_output().unwrap();
    assert!(out.status.code().is_some(), "the vmm ended: {:?}", out.status);

    // The restored VMM gets the disk as it was at the snapshot (later sectors wiped).
    let memory = std::fs::read(saved.join(snapshot::MEMORY_FILE)).unwrap();
    let used = usize::from(u16::from_le_bytes([memory[BLK_USED_IDX], memory[BLK_USED_IDX + 1]]));
    let mut image = std::fs::read(&disk).unwrap();
    image[(used + 1) * SECTOR..].fill(0);
    let restored_disk = d.join("restored.img");
    std::fs::write(&restored_disk, &image).unwrap();
    let restored = vmm(&d.join("restored.log"), &restored_disk).arg("--restore").arg(&saved).output().unwrap();
    let console = read(&d.join("restored.log"));
    assert_eq!(
        restored.status.code(),
        Some(0),
        "the restored guest powers off with 0 (20: no completion)\nconsole:\n{console}\nstderr:\n{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    let after = counts(&console);
    assert!(!after.is_empty() && after[0] as usize >= used && after[0] as usize <= used + 2, "{after:?} after {used}");
    assert_eq!(after, (after[0]..=LIMIT).collect::<Vec<_>>(), "counted on without a gap:\n{console}");
    let image = std::fs::read(&restored_disk).unwrap();
    for n in 1..=LIMIT as usize {
        assert_eq!(u64::from_le_bytes(image[n * SECTOR..][..8].try_into().unwrap()), n as u64, "sector {n}");
    }
}

const LINUX_NAME: &str = "a_linux_guest_restored_from_a_snapshot_keeps_counting_with_its_timers_disk_and_vsock";

#[test]
fn a_linux_guest_restored_from_a_snapshot_keeps_counting_with_its_timers_disk_and_vsock() {
    if let Some(reason) = kvm_unavailable() {
        eprintln!("SKIP {LINUX_NAME}: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kernel = ignite_e2e::guest_kernel();
    ignite_e2e::unless_the_host_faults(LINUX_NAME, d, || linux_restore(d, &kernel));
}

fn linux_restore(d: &Path, kernel: &Path) {
    let initrd = counting_initramfs(d);
    let disk = d.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let (socket, snapshots) = (d.join("control.sock"), d.join("snapshots"));
    let linux = |console: &Path, disk: &Path, vsock: &str| {
        let mut cmd = Command::new(ignite_bin());
        cmd.args(["vmm", "run", "--memory", "128", "--stop-timeout", "0", "--console"])
            .arg(console)
            .arg("--disk")
            .arg(disk)
            .arg("--vsock")
            .arg(format!("3:{}", d.join(vsock).display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    };
    let original = linux(&d.join("original.log"), &disk, "original.vsock")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", "console=ttyS0 reboot=k panic=-1 rdinit=/init"])
        .arg("--control-socket")
        .arg(&socket)
        .arg("--snapshot-dir")
        .arg(&snapshots)
        .spawn()
        .unwrap();
    let boot = Duration::from_secs(600);
    let started = Instant::now();
    while linux_counts(&read(&d.join("original.log"))).last().is_none_or(|&c| c < 3) {
        assert!(started.elapsed() < boot, "the guest did not count:\n{}", read(&d.join("original.log")));
        std::thread::sleep(Duration::from_millis(200));
    }
    let boot_time = started.elapsed();
    eprintln!("{LINUX_NAME}: booted and counting after {boot_time:.1?}");
    let ask = |request: &Request| control::request(&socket, request, Duration::from_secs(120));
    ask(&Request::Pause).expect("pause");
    let at_snapshot = *linux_counts(&read(&d.join("original.log"))).last().unwrap();
    let taken = Instant::now();
    ask(&Request::Snapshot { name: "counting".into() }).expect("snapshot");
    eprintln!("{LINUX_NAME}: 128 MiB snapshot of a paused guest in {:.1?}", taken.elapsed());
    ask(&Request::Kill).expect("kill");
    let _ = original.wait_with_output();
    // The disk as it was at the snapshot: the guest was paused, so nothing was written after it.
    let restored_disk = d.join("restored.img");
    std::fs::copy(&disk, &restored_disk).unwrap();

    let restoring = Instant::now();
    let mut restored = linux(&d.join("restored.log"), &restored_disk, "restored.vsock")
        .arg("--restore")
        .arg(snapshots.join("counting"))
        .spawn()
        .unwrap();
    let target = at_snapshot + 3;
    let mut first_count = None;
    while linux_counts(&read(&d.join("restored.log"))).last().is_none_or(|&c| c < target) {
        if first_count.is_none() && !linux_counts(&read(&d.join("restored.log"))).is_empty() {
            first_count = Some(restoring.elapsed());
        }
        if restored.try_wait().unwrap().is_some() || restoring.elapsed() > Duration::from_secs(300) {
            let _ = restored.kill();
            let err = restored.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned());
            panic!("the restored guest did not count to {target}:\n{}\nstderr: {err:?}", read(&d.join("restored.log")));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "{LINUX_NAME}: restore to the first count {:.1?} (a cold boot took {boot_time:.1?}), 3 counts further after {:.1?}",
        first_count.unwrap_or_default(),
        restoring.elapsed()
    );
    let _ = restored.kill();
    let _ = restored.wait();
    let console = read(&d.join("restored.log"));
    let after = linux_counts(&console);
    assert_eq!(after[0], at_snapshot + 1, "no boot again, no count lost or repeated:\n{console}");
    assert_eq!(after, (after[0]..=after[after.len() - 1]).collect::<Vec<_>>(), "{console}");
    assert!(!console.contains("Linux version"), "the restored guest did not boot again:\n{console}");
    for bad in ["Oops", "BUG:", "stall", "panic"] {
        assert!(!console.contains(bad), "{bad} after the restore:\n{console}");
    }
    let written = std::fs::read(&restored_disk).unwrap();
    let on_disk: u64 = String::from_utf8_lossy(&written[..16]).split_whitespace().next().unwrap().parse().unwrap();
    assert!(on_disk >= after[0], "the restored guest wrote its disk: {on_disk}");
}
