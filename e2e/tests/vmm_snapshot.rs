//! Snapshots through the real `ignite vmm run` process, jailed when run as root: a tiny guest that
//! counts with virtio-blk writes is saved by a `snapshot` control request into the jail's snapshot
//! directory, the VMM is killed, and a new `ignite vmm run --restore` process (with a copy of the disk
//! as it was at the snapshot) counts on from the saved value to the end.

#[path = "../../vmm-core/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ignite_e2e::{ignite_bin, kvm_unavailable};
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
        .arg(&kernel)
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
