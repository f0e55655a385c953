//! VM snapshots through the real `ignite daemon` and CLI, on tiny guests that count in a register
//! and in memory: `ignite snapshot create` while the VM runs (jailed), `ignite rollback` to it (the
//! count goes on from the snapshot's, the disk holds the snapshot's bytes), the refusals that leave
//! the VM running (a damaged state file, a missing memory file, a taken or bad name, an unknown VM
//! or snapshot), disk-only snapshots, removal with the VM; and a daemon crash at every point of a
//! snapshot, after which the VM runs on and no half snapshot is left.

mod support;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use support::daemon::{pid_of, vm_files, vmm_processes, wait_for, DaemonProcess, KillVmsOnDrop};
use support::fleet::{manifest, registry_with_image, unavailable};
use support::git::Repo;
use support::tiny_guest::{self, counts};

const CONVERGE: Duration = Duration::from_secs(90);

fn ignite(r: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(tiny_guest::ignite_bin());
    cmd.arg("--socket").arg(r.join("ignite.sock")).args(args).env("IGNITE_AUTOSTART", "0").output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs the CLI and expects success; returns stdout.
fn ok(r: &Path, args: &[&str]) -> String {
    let out = ignite(r, args);
    assert!(out.status.success(), "ignite {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// Runs the CLI and expects a failure; returns stderr.
fn refused(r: &Path, args: &[&str]) -> String {
    let out = ignite(r, args);
    assert!(!out.status.success(), "ignite {args:?} was expected to fail: {}", text(&out.stdout));
    text(&out.stderr)
}

fn console_counts(r: &Path, vm: &str) -> Vec<u64> {
    counts(&std::fs::read_to_string(r.join("vms").join(vm).join("console.log")).unwrap_or_default())
}

fn highest(r: &Path, vm: &str) -> u64 {
    console_counts(r, vm).last().copied().unwrap_or(0)
}

/// The VM's disk file, whichever file snapshotter made it.
fn disk_of(r: &Path, vm: &str) -> PathBuf {
    ["copy", "reflink"]
        .iter()
        .map(|s| r.join("snapshots").join(s).join(format!("{vm}.ext4")))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no disk for {vm} under {}", r.display()))
}

/// Where the tests write into the disk, as a guest would: past the tiny image's ext4 data.
const DISK_OFFSET: u64 = 60 << 20;

fn write_disk(path: &Path, bytes: &[u8]) {
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.seek(SeekFrom::Start(DISK_OFFSET)).unwrap();
    file.write_all(bytes).unwrap();
}

fn read_disk(path: &Path, len: usize) -> Vec<u8> {
    let mut file = std::fs::File::open(path).unwrap();
    file.seek(SeekFrom::Start(DISK_OFFSET)).unwrap();
    let mut buf = vec![0; len];
    file.read_exact(&mut buf).unwrap();
    buf
}

fn one_vm_repo(image: &str) -> Repo {
    let repo = Repo::new();
    repo.commit(
        &[("vms/README.md", Some("fleet\n")), ("vms/web.yaml", Some(&manifest("web", image, "64Mi", "")))],
        "web",
    );
    repo
}

fn start_daemon(r: &Path, repo: &Repo, env: &[(&str, &str)]) -> DaemonProcess {
    let kernel = tiny_guest::counter_guest().kernel;
    DaemonProcess::start_with_kernel(r, &repo.url(), &kernel, &["--no-network"], env)
}

fn wait_counting(r: &Path, above: u64) {
    wait_for(&format!("web counting past {above}"), CONVERGE, || highest(r, "web") > above);
}

#[test]
fn a_running_vm_is_snapshotted_and_rolled_back_in_memory_and_disk() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP a_running_vm_is_snapshotted_and_rolled_back_in_memory_and_disk: {why}");
        return;
    }
    let (_registry, image) = registry_with_image();
    let repo = one_vm_repo(&image);
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let _guard = KillVmsOnDrop(r);
    let mut daemon = start_daemon(r, &repo, &[]);
    wait_counting(r, 3);
    daemon.assert_alive();
    let disk = disk_of(r, "web");
    write_disk(&disk, b"BEFORE");

    // 1. A full snapshot of the running VM: it keeps counting.
    let before = highest(r, "web");
    let out = ok(r, &["snapshot", "create", "web", "s1"]);
    let after = highest(r, "web");
    assert!(out.contains("web/s1: memory (64.0 MiB") && out.contains("and disk"), "{out}");
    write_disk(&disk, b"AFTER!");
    wait_counting(r, after + 5);
    let listed = ok(r, &["snapshot", "ls", "web"]);
    assert!(listed.lines().any(|l| l.contains("s1") && l.contains("full")), "{listed}");
    let inspect: serde_json::Value = serde_json::from_str(&ok(r, &["inspect", "web", "-o", "json"])).unwrap();
    assert_eq!(inspect["snapshots"][0]["name"], "s1", "{inspect}");
    let published = r.join("vm-snapshots/web/s1");
    for file in ["state", "memory", "disk", "snapshot.json"] {
        let meta = std::fs::metadata(published.join(file)).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0, "{file} is root's once published");
    }

    // 2. Rollback: a new VMM resumes the count from the snapshot's, and the disk is the snapshot's.
    let old_pid = pid_of(r, "web").unwrap();
    let reached = highest(r, "web");
    let out = ok(r, &["rollback", "web", "s1"]);
    assert!(out.contains("resumes from snapshot s1"), "{out}");
    wait_for("web resumed from s1 in a new VMM", CONVERGE, || {
        pid_of(r, "web").is_some_and(|p| p != old_pid) && console_counts(r, "web").len() >= 3
    });
    let resumed = console_counts(r, "web");
    let first = resumed[0];
    assert!(
        first > before && first <= after + 1 && first < reached,
        "the count resumes from the snapshot's ({before}..={after}), not from 1 or from {reached}: {resumed:?}"
    );
    assert!(resumed.windows(2).all(|w| w[1] == w[0] + 1), "the count goes on without a gap: {resumed:?}");
    let console = std::fs::read_to_string(r.join("vms/web/console.log")).unwrap();
    assert!(!console.contains("COUNT-MISMATCH"), "register and memory restored from one point:\n{console}");
    assert_eq!(read_disk(&disk_of(r, "web"), 6), b"BEFORE", "the disk is the snapshot's");
    assert!(!r.join("runtime/web/restore.json").exists(), "the rollback is done");

    // 3. Refusals, each leaving the running VM alone.
    let pid = pid_of(r, "web").unwrap();
    assert!(refused(r, &["snapshot", "create", "web", "s1"]).contains("has a snapshot named \"s1\" already"));
    assert!(refused(r, &["snapshot", "create", "web", "../x"]).contains("is not a snapshot name"));
    assert!(refused(r, &["snapshot", "create", "ghost"]).contains("no VM named \"ghost\""));
    // A VM name is never a path: nothing outside the VM's own snapshots is read or removed.
    let outside = r.join("outside/s1");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::copy(published.join("snapshot.json"), outside.join("snapshot.json")).unwrap();
    for args in [
        &["snapshot", "rm", "../outside", "s1"][..],
        &["snapshot", "ls", "../outside"],
        &["rollback", "../outside", "s1"],
    ] {
        assert!(refused(r, args).contains("no VM named"), "{args:?}");
    }
    assert!(outside.join("snapshot.json").exists());
    assert!(refused(r, &["rollback", "web", "nope"]).contains("no snapshot named \"nope\""));
    ok(r, &["snapshot", "create", "web", "damaged"]);
    let state = r.join("vm-snapshots/web/damaged/state");
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x55;
    std::fs::write(&state, bytes).unwrap();
    let err = refused(r, &["rollback", "web", "damaged"]);
    assert!(err.contains("cannot be restored") && err.contains("damaged"), "{err}");
    ok(r, &["snapshot", "create", "web", "no-memory"]);
    std::fs::remove_file(r.join("vm-snapshots/web/no-memory/memory")).unwrap();
    let err = refused(r, &["rollback", "web", "no-memory"]);
    assert!(err.contains("cannot be restored") && err.contains("memory"), "{err}");
    let now = highest(r, "web");
    wait_counting(r, now + 3);
    assert_eq!(pid_of(r, "web"), Some(pid), "refused rollbacks leave the VM running");
    ok(r, &["snapshot", "rm", "web", "no-memory"]);
    assert!(refused(r, &["snapshot", "rm", "web", "no-memory"]).contains("no snapshot named"));
    assert!(!r.join("vm-snapshots/web/no-memory").exists());

    // 4. A disk-only snapshot: the rollback boots the VM from that disk.
    write_disk(&disk_of(r, "web"), b"DISK-1");
    let out = ok(r, &["snapshot", "create", "web", "d1", "--disk-only"]);
    assert!(out.contains("web/d1: disk only"), "{out}");
    write_disk(&disk_of(r, "web"), b"DISK-2");
    ok(r, &["rollback", "web", "d1"]);
    wait_for("web booted again from d1's disk", CONVERGE, || {
        pid_of(r, "web").is_some_and(|p| p != pid) && highest(r, "web") >= 2
    });
    assert_eq!(console_counts(r, "web")[0], 1, "a disk-only rollback boots afresh");
    assert_eq!(read_disk(&disk_of(r, "web"), 6), b"DISK-1");
    let events = ok(r, &["events"]);
    for reason in ["SnapshotTaken", "RollingBack", "RollbackRefused", "SnapshotDeleted"] {
        assert!(events.contains(reason), "no {reason} event:\n{events}");
    }

    // 5. The snapshots go with the VM.
    repo.commit(&[("vms/web.yaml", None)], "delete web");
    wait_for("web and its snapshots removed", CONVERGE, || vm_files(r).is_empty() && vmm_processes(r).is_empty());
    assert!(!r.join("vm-snapshots/web").exists());
    daemon.terminate();
}

#[test]
fn a_daemon_crash_during_a_snapshot_leaves_the_vm_running_and_no_half_snapshot() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP a_daemon_crash_during_a_snapshot_leaves_the_vm_running_and_no_half_snapshot: {why}");
        return;
    }
    let (_registry, image) = registry_with_image();
    for point in controller::failpoint::SNAPSHOT_POINTS {
        let repo = one_vm_repo(&image);
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let _guard = KillVmsOnDrop(r);
        let crashing = start_daemon(r, &repo, &[(controller::failpoint::ENV, point)]);
        wait_counting(r, 2);
        let pid = pid_of(r, "web").unwrap();
        let err = refused(r, &["snapshot", "create", "web", "s1"]);
        eprintln!("crash at {point}: the CLI said {}", err.trim());
        crashing.wait_crash(CONVERGE);
        // The daemon died with the VM paused: it is stuck until the next daemon.
        let daemon = start_daemon(r, &repo, &[]);
        let stuck = highest(r, "web");
        wait_counting(r, stuck + 3);
        assert_eq!(pid_of(r, "web"), Some(pid), "{point}: the VM was resumed, not restarted");
        let listed = ok(r, &["snapshot", "ls", "web"]);
        assert!(!listed.contains("s1"), "{point}: a half snapshot is listed:\n{listed}");
        let left: Vec<_> =
            std::fs::read_dir(r.join("vm-snapshots/web")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, ["incoming"], "{point}: half snapshots left");
        assert_eq!(std::fs::read_dir(r.join("vm-snapshots/web/incoming")).unwrap().count(), 0, "{point}");
        // The name is free again.
        ok(r, &["snapshot", "create", "web", "s1"]);
        repo.commit(&[("vms/web.yaml", None)], "delete web");
        wait_for("web removed", CONVERGE, || vm_files(r).is_empty() && vmm_processes(r).is_empty());
        daemon.terminate();
        eprintln!("crash at {point}: repaired");
    }
}

#[test]
fn a_schedule_snapshots_a_running_vm_and_keeps_the_newest() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP a_schedule_snapshots_a_running_vm_and_keeps_the_newest: {why}");
        return;
    }
    let (_registry, image) = registry_with_image();
    let repo = Repo::new();
    let scheduled =
        |keep: u32| manifest("web", &image, "64Mi", &format!("  snapshots: {{every: 10s, keep: {keep}}}\n"));
    repo.commit(&[("vms/README.md", Some("fleet\n")), ("vms/web.yaml", Some(&scheduled(2)))], "web");
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let _guard = KillVmsOnDrop(r);
    let daemon = start_daemon(r, &repo, &[]);
    wait_counting(r, 1);
    ok(r, &["snapshot", "create", "web", "mine"]);
    let pid = pid_of(r, "web").unwrap();
    let auto = || -> Vec<String> {
        ok(r, &["snapshot", "ls", "web"])
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1).filter(|n| n.starts_with("auto-")).map(str::to_string))
            .collect()
    };
    let events = || ok(r, &["events"]);
    wait_for("three scheduled snapshots, the oldest pruned", Duration::from_secs(120), || {
        let e = events();
        e.matches("scheduled snapshot").count() >= 3 && e.contains("SnapshotPruned")
    });
    assert_eq!(auto().len(), 2, "keep: 2 keeps two: {:?}\n{}", auto(), events());
    assert!(ok(r, &["snapshot", "ls", "web"]).contains("mine"), "snapshots taken by hand are never pruned");

    // A new schedule is not a new machine: the VM runs on, and the schedule prunes to its keep.
    repo.commit(&[("vms/web.yaml", Some(&scheduled(1)))], "keep one");
    wait_for("one scheduled snapshot kept", Duration::from_secs(60), || auto().len() == 1);
    assert_eq!(pid_of(r, "web"), Some(pid), "a schedule change does not recreate the VM");
    repo.commit(&[("vms/web.yaml", None)], "delete web");
    wait_for("web removed", CONVERGE, || vm_files(r).is_empty() && vmm_processes(r).is_empty());
    daemon.terminate();
}
