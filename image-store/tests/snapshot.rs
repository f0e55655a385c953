//! Real snapshotter tests: ext4 bases made with `mkfs.ext4 -d`, copies on the test's filesystem,
//! reflinks on loop-mounted xfs and btrfs (root only). The devicemapper snapshotter's real-device tests
//! are `tests/devicemapper_real.rs`, run inside our own guests (`e2e/tests/devicemapper_guest.rs`).
//! Every test that attaches loop devices checks that none backed by its files is left afterwards.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use image_store::snapshot::{choose, FileSnapshotter, HostOps, LinuxHostOps, SnapshotError, Snapshotter};
use image_store::testing::mount::LoopMount;
use image_store::StorePaths;

const MIB: u64 = 1 << 20;

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A 16 MiB base ext4 holding `/marker`.
fn make_base(dir: &Path) -> PathBuf {
    let content = dir.join("content");
    fs::create_dir_all(&content).unwrap();
    fs::write(content.join("marker"), "hello from the base\n").unwrap();
    let base = dir.join("base.ext4");
    run("mkfs.ext4", &["-F", "-q", "-d", s(&content), s(&base), "16M"]);
    base
}

fn cat(image: &Path, file: &str) -> String {
    run("debugfs", &["-R", &format!("cat {file}"), s(image)])
}

/// Filesystem size in bytes from the superblock.
fn fs_bytes(image: &Path) -> u64 {
    let out = run("dumpe2fs", &["-h", s(image)]);
    let field = |name: &str| -> u64 {
        let line = out.lines().find(|l| l.starts_with(name)).unwrap();
        line.split(':').nth(1).unwrap().trim().parse().unwrap()
    };
    field("Block count:") * field("Block size:")
}

/// Writes a new file into the ext4 image, as a guest writing to its disk would.
fn write_into(image: &Path, name: &str, scratch: &Path) {
    let src = scratch.join(format!("{name}.src"));
    fs::write(&src, format!("written to {name}\n")).unwrap();
    run("debugfs", &["-w", "-R", &format!("write {} /{name}", s(&src)), s(image)]);
}

fn fsck_clean(image: &Path) {
    let st = Command::new("e2fsck").args(["-fn", s(image)]).output().unwrap();
    assert!(st.status.success(), "fs not clean: {}", String::from_utf8_lossy(&st.stdout));
}

/// Loop devices backed by files under `dir`.
fn loops_under(dir: &Path) -> Vec<PathBuf> {
    let canon = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    LinuxHostOps
        .loop_list()
        .unwrap()
        .into_iter()
        .filter(|l| l.backing_file.starts_with(dir) || l.backing_file.starts_with(&canon))
        .map(|l| l.device)
        .collect()
}

fn is_root() -> bool {
    run("id", &["-u"]).trim() == "0"
}

/// Checks the behaviour every file snapshotter shares on a store whose filesystem supports it.
fn exercise(snap: &dyn Snapshotter, base: &Path, scratch: &Path) {
    let base_before = fs::read(base).unwrap();
    let d1 = snap.create("vm1", base, 64 * MIB).unwrap();
    let d2 = snap.create("vm2", base, 64 * MIB).unwrap();
    assert_eq!(d1.snapshotter, snap.name());
    let meta = fs::metadata(&d1.path).unwrap();
    assert_eq!(meta.len(), 64 * MIB);
    assert!(fs_bytes(&d1.path) >= 63 * MIB, "ext4 not grown: {} bytes", fs_bytes(&d1.path));
    fsck_clean(&d1.path);
    assert_eq!(cat(&d1.path, "/marker"), "hello from the base\n");

    write_into(&d1.path, "only-vm1", scratch);
    assert_eq!(cat(&d1.path, "/only-vm1"), "written to only-vm1\n");
    assert!(cat(&d2.path, "/only-vm1").is_empty(), "vm2 sees vm1's write");
    assert!(cat(base, "/only-vm1").is_empty(), "base sees vm1's write");
    assert!(fs::read(base).unwrap() == base_before, "base bytes changed");

    // A point-in-time copy of vm1's disk, then more writes, then the copy put back.
    let saved = scratch.join("vm1-saved.ext4");
    snap.save_disk("vm1", &saved).unwrap();
    write_into(&d1.path, "after-save", scratch);
    snap.restore_disk("vm1", &saved).unwrap();
    assert_eq!(cat(&d1.path, "/only-vm1"), "written to only-vm1\n", "the saved write is back");
    assert!(cat(&d1.path, "/after-save").is_empty(), "the write after the save is gone");
    assert!(cat(&d2.path, "/after-save").is_empty() && cat(base, "/only-vm1").is_empty());
    fsck_clean(&d1.path);
    fs::remove_file(&saved).unwrap();
    let e = snap.save_disk("vm9", &saved).unwrap_err();
    assert!(matches!(e, SnapshotError::NoDisk { .. }) && e.to_string().contains("vm9"), "{e}");
    assert!(!saved.exists());

    let names: Vec<_> = snap.list().unwrap().into_iter().map(|d| d.vm_id).collect();
    assert_eq!(names, ["vm1", "vm2"]);
    let e = snap.create("vm1", base, 64 * MIB).unwrap_err();
    assert!(matches!(e, SnapshotError::AlreadyExists { .. }), "{e}");
    let e = snap.create("small", base, 8 * MIB).unwrap_err().to_string();
    assert!(e.contains("8388608") && e.contains("16777216") && e.contains("small"), "{e}");

    snap.remove("vm1").unwrap();
    assert!(!d1.path.exists());
    snap.remove("vm1").unwrap();
    snap.remove("vm2").unwrap();
    assert!(snap.list().unwrap().is_empty());
    let dir = d2.path.parent().unwrap();
    assert_eq!(fs::read_dir(dir).unwrap().count(), 0, "files left in {}", dir.display());
}

#[test]
fn copy_disks_are_sparse_grown_and_independent() {
    let tmp = tempfile::tempdir().unwrap();
    let base = make_base(tmp.path());
    let paths = StorePaths::new(tmp.path().join("store"));
    let snap = FileSnapshotter::copy(&paths, Arc::new(LinuxHostOps));
    let disk = snap.create("sparse", &base, 64 * MIB).unwrap();
    let allocated = fs::metadata(&disk.path).unwrap().blocks() * 512;
    assert!(allocated < 16 * MIB, "copy not sparse: {allocated} bytes allocated for a 64 MiB disk");
    snap.remove("sparse").unwrap();
    exercise(&snap, &base, tmp.path());
}

#[test]
fn copy_recover_removes_interrupted_creations() {
    let tmp = tempfile::tempdir().unwrap();
    let base = make_base(tmp.path());
    let paths = StorePaths::new(tmp.path().join("store"));
    let snap = FileSnapshotter::copy(&paths, Arc::new(LinuxHostOps));
    let kept = snap.create("kept", &base, 32 * MIB).unwrap();
    let stale = paths.snapshots_dir("copy").join(".crashed.ext4.tmp");
    fs::write(&stale, b"half").unwrap();
    let report = snap.recover().unwrap();
    assert_eq!(report.adopted, vec![kept]);
    assert_eq!(report.removed, ["crashed"]);
    assert!(!stale.exists());
}

/// On a filesystem without FICLONE: reflink fails clearly, leaves nothing, and `choose` picks copy.
fn reflink_refused_on(store_root: &Path) {
    let base = make_base(store_root);
    let paths = StorePaths::new(store_root.join("store"));
    let snap = FileSnapshotter::reflink(&paths, Arc::new(LinuxHostOps));
    match snap.create("vm1", &base, 32 * MIB) {
        Err(e @ SnapshotError::ReflinkUnsupported { .. }) => {
            let text = e.to_string();
            assert!(text.contains("vm1") && text.contains("FICLONE"), "{text}");
        }
        Ok(_) => {
            println!("skipping: {} supports reflink", store_root.display());
            return;
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
    assert_eq!(fs::read_dir(paths.snapshots_dir("reflink")).unwrap().count(), 0, "temp files left");
    let chosen = choose(&paths, None, &Default::default()).unwrap();
    let expected = if LinuxHostOps.dm_available() { "devicemapper" } else { "copy" };
    assert_eq!(chosen.name(), expected);
}

#[test]
fn reflink_refused_on_ext4_or_tmpfs_falls_back_to_copy() {
    let tmp = tempfile::tempdir().unwrap();
    reflink_refused_on(tmp.path());
    if Path::new("/dev/shm").is_dir() {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        reflink_refused_on(shm.path());
    }
}

fn reflink_on(fs_name: &str, mkfs: &[&str]) {
    if !is_root() {
        println!("skipping: reflink on {fs_name} needs root to loop-mount a filesystem");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    {
        let mnt = LoopMount::new(tmp.path(), 300 * MIB, mkfs);
        let store = mnt.mountpoint.join("store");
        let base = make_base(&mnt.mountpoint);
        let paths = StorePaths::new(&store);
        if !LinuxHostOps.dm_available() {
            assert_eq!(choose(&paths, None, &Default::default()).unwrap().name(), "reflink", "choose on {fs_name}");
        }
        let snap = FileSnapshotter::reflink(&paths, Arc::new(LinuxHostOps));
        let disk = snap.create("shared", &base, 64 * MIB).unwrap();
        let frag = run("filefrag", &["-v", s(&disk.path)]);
        assert!(frag.contains("shared"), "clone on {fs_name} shares no extent with the base:\n{frag}");
        snap.remove("shared").unwrap();
        exercise(&snap, &base, tmp.path());
    }
    assert!(loops_under(tmp.path()).is_empty(), "leaked loop devices: {:?}", loops_under(tmp.path()));
}

#[test]
fn reflink_on_xfs() {
    reflink_on("xfs", &["mkfs.xfs", "-q", "-m", "reflink=1"]);
}

#[test]
fn reflink_on_btrfs() {
    if Command::new("mkfs.btrfs").arg("--version").output().is_err() {
        println!("skipping: mkfs.btrfs not installed");
        return;
    }
    reflink_on("btrfs", &["mkfs.btrfs", "-q", "-f"]);
}

#[test]
fn host_errors_carry_the_command_and_its_stderr() {
    let e = LinuxHostOps.loop_detach(Path::new("/dev/loop-does-not-exist")).unwrap_err().to_string();
    assert!(e.contains("losetup --detach /dev/loop-does-not-exist"), "{e}");
    assert!(e.contains("failed (exit status"), "{e}");
    let e = LinuxHostOps.resize2fs(Path::new("/nonexistent/disk.ext4")).unwrap_err().to_string();
    assert!(e.contains("resize2fs /nonexistent/disk.ext4") && e.contains("No such file"), "{e}");
}
