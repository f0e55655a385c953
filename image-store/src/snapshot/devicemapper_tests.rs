//! Logic tests of the devicemapper snapshotter through the recording host-ops fake: step order,
//! rollback after a failure at each step, idempotent removal, crash recovery.

use super::*;
use crate::snapshot::{HostCall, HostOp, RecordingHostOps};

const MIB: u64 = 1 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    paths: StorePaths,
    base: PathBuf,
    ops: Arc<RecordingHostOps>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let paths = StorePaths::new(dir.path());
        let base = dir.path().join("base.ext4");
        File::create(&base).unwrap().set_len(4 * MIB).unwrap();
        Fixture { _dir: dir, paths, base, ops: Arc::new(RecordingHostOps::with_dm()) }
    }

    fn snap(&self) -> DmSnapshotter {
        DmSnapshotter::new(&self.paths, self.ops.clone())
    }

    fn vm_dir(&self, vm: &str) -> PathBuf {
        self.paths.snapshots_dir("devicemapper").join(vm)
    }

    fn assert_nothing_left(&self, vm: &str) {
        assert!(self.ops.loops().is_empty(), "leaked loops: {:?}", self.ops.loops());
        assert!(self.ops.dm_names().is_empty(), "leaked dm devices: {:?}", self.ops.dm_names());
        assert!(!self.vm_dir(vm).exists(), "leaked state dir");
    }
}

#[test]
fn create_runs_steps_in_order() {
    let f = Fixture::new();
    let disk = f.snap().create("vm1", &f.base, 8 * MIB).unwrap();
    assert_eq!(disk.path, Path::new("/dev/mapper/ignite-vm1"));
    assert_eq!(disk.snapshotter, "devicemapper");
    let dir = f.vm_dir("vm1");
    let calls = f.ops.calls();
    let [HostCall::LoopAttach(base, true), HostCall::LoopAttach(cow, false), HostCall::DmCreate(origin, origin_table, true), HostCall::DmCreate(name, table, false), HostCall::Resize2fs(grown)] =
        calls.as_slice()
    else {
        panic!("unexpected calls: {calls:#?}");
    };
    assert_eq!((base, cow), (&dir.join("base.ext4"), &dir.join("cow")));
    assert_eq!(origin, "ignite-vm1+origin");
    assert_eq!(origin_table, "0 8192 linear /dev/loop0 0\n8192 8192 zero");
    assert_eq!(name, "ignite-vm1");
    assert_eq!(table, "0 16384 snapshot /dev/mapper/ignite-vm1+origin /dev/loop1 P 8");
    assert_eq!(grown, &disk.path);
    // The base is shared by a hard link, the COW is sparse and large enough.
    assert_eq!(fs::read(dir.join("base.ext4")).unwrap().len() as u64, 4 * MIB);
    assert!(fs::metadata(dir.join("cow")).unwrap().len() >= 8 * MIB);
    assert_eq!(f.snap().list().unwrap(), vec![disk]);
}

#[test]
fn same_size_needs_no_zero_target() {
    let f = Fixture::new();
    f.snap().create("vm1", &f.base, 4 * MIB).unwrap();
    assert!(f.ops.calls().contains(&HostCall::DmCreate(
        "ignite-vm1+origin".into(),
        "0 8192 linear /dev/loop0 0".into(),
        true
    )));
}

#[test]
fn failure_at_each_step_rolls_back_everything() {
    for (op, nth) in [
        (HostOp::LoopAttach, 1),
        (HostOp::LoopAttach, 2),
        (HostOp::DmCreate, 1),
        (HostOp::DmCreate, 2),
        (HostOp::Resize2fs, 1),
    ] {
        let f = Fixture::new();
        f.ops.fail_on(op, nth);
        let err = f.snap().create("vm1", &f.base, 8 * MIB).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, SnapshotError::Host { .. }) && text.contains("vm vm1"), "{op:?}#{nth}: {text}");
        f.assert_nothing_left("vm1");
        assert!(f.snap().list().unwrap().is_empty());
        // The VM can be created again afterwards.
        f.snap().create("vm1", &f.base, 8 * MIB).unwrap();
    }
}

#[test]
fn rollback_detaches_loops_even_if_dm_listing_fails() {
    let f = Fixture::new();
    f.ops.fail_on(HostOp::Resize2fs, 1);
    f.ops.fail_on(HostOp::DmList, 1);
    let e = f.snap().create("vm1", &f.base, 8 * MIB).unwrap_err();
    assert!(e.to_string().contains("growing ext4"), "the original error is returned: {e}");
    // The dm devices are still there (listing failed), so the loops they hold stay busy...
    assert_eq!(f.ops.dm_names().len(), 2);
    // ...and `remove` (or `recover`) finishes the job because the files were kept.
    assert!(f.vm_dir("vm1").exists());
    f.snap().remove("vm1").unwrap();
    f.assert_nothing_left("vm1");
}

#[test]
fn without_dm_teardown_skips_dmsetup() {
    let dir = tempfile::tempdir().unwrap();
    let ops = Arc::new(RecordingHostOps::without_dm());
    let vm_dir = dir.path().join("snapshots/devicemapper/vm1");
    fs::create_dir_all(&vm_dir).unwrap();
    ops.insert_loop(&vm_dir.join("cow"));
    let snap = DmSnapshotter::new(&StorePaths::new(dir.path()), ops.clone());
    assert_eq!(snap.recover().unwrap().removed, ["vm1"]);
    assert!(ops.loops().is_empty() && !vm_dir.exists());
    assert!(!ops.calls().contains(&HostCall::DmList));
}

#[test]
fn error_names_the_device() {
    let f = Fixture::new();
    f.ops.fail_on(HostOp::DmCreate, 2);
    let text = f.snap().create("web", &f.base, 8 * MIB).unwrap_err().to_string();
    assert!(text.contains("ignite-web") && text.contains("creating dm device"), "{text}");
}

#[test]
fn fsck_runs_only_when_resize_asks() {
    let f = Fixture::new();
    f.ops.require_fsck();
    f.snap().create("vm1", &f.base, 8 * MIB).unwrap();
    let tail: Vec<_> = f.ops.calls().into_iter().skip(4).collect();
    let dev = PathBuf::from("/dev/mapper/ignite-vm1");
    assert_eq!(tail, vec![HostCall::Resize2fs(dev.clone()), HostCall::E2fsck(dev.clone()), HostCall::Resize2fs(dev)]);
}

#[test]
fn size_and_duplicate_checks() {
    let f = Fixture::new();
    let e = f.snap().create("vm1", &f.base, MIB).unwrap_err();
    assert!(
        matches!(e, SnapshotError::SizeTooSmall { requested, base_size, .. } if requested == MIB && base_size == 4 * MIB)
    );
    assert!(f.ops.calls().is_empty());
    f.snap().create("vm1", &f.base, 4 * MIB).unwrap();
    let e = f.snap().create("vm1", &f.base, 4 * MIB).unwrap_err();
    assert!(matches!(e, SnapshotError::AlreadyExists { .. }), "{e}");
    assert_eq!(f.ops.dm_names().len(), 2, "a refused duplicate must not touch the existing disk");
}

#[test]
fn remove_is_idempotent_and_ordered() {
    let f = Fixture::new();
    f.snap().create("vm1", &f.base, 8 * MIB).unwrap();
    f.snap().create("vm2", &f.base, 8 * MIB).unwrap();
    f.ops.clear_calls();
    f.snap().remove("vm1").unwrap();
    let removes: Vec<_> =
        f.ops.calls().into_iter().filter(|c| !matches!(c, HostCall::DmList | HostCall::LoopList)).collect();
    assert_eq!(removes[..2], [HostCall::DmRemove("ignite-vm1".into()), HostCall::DmRemove("ignite-vm1+origin".into())]);
    assert_eq!(removes.len(), 4, "two dm removes and two loop detaches: {removes:?}");
    f.snap().remove("vm1").unwrap();
    f.snap().remove("never-made").unwrap();
    assert_eq!(f.snap().list().unwrap().len(), 1, "vm2 untouched");
    f.snap().remove("vm2").unwrap();
    f.assert_nothing_left("vm1");
    f.assert_nothing_left("vm2");
}

#[test]
fn busy_device_keeps_files_for_a_retry() {
    let f = Fixture::new();
    f.snap().create("vm1", &f.base, 8 * MIB).unwrap();
    f.ops.fail_on(HostOp::DmRemove, 1);
    let e = f.snap().remove("vm1").unwrap_err().to_string();
    assert!(e.contains("removing dm device") && e.contains("ignite-vm1"), "{e}");
    assert!(f.vm_dir("vm1").join("cow").exists());
    f.snap().remove("vm1").unwrap();
    f.assert_nothing_left("vm1");
}

#[test]
fn recover_removes_half_made_and_adopts_complete() {
    let f = Fixture::new();
    let done = f.snap().create("done", &f.base, 8 * MIB).unwrap();
    // A crash after the COW was attached and the origin created, before disk.json.
    let half = f.vm_dir("half");
    fs::create_dir_all(&half).unwrap();
    fs::write(half.join("cow"), b"").unwrap();
    let lo = f.ops.insert_loop(&half.join("cow"));
    f.ops.insert_dm("ignite-half+origin", &format!("0 8 linear {} 0", lo.display()));
    // A crash after attaching a file that was then deleted by hand: found by backing file only.
    f.ops.insert_loop(&f.vm_dir("orphan").join("cow"));
    // Another store's device: not ours to remove.
    f.ops.insert_dm("ignite-foreign", "0 8 zero");

    let report = f.snap().recover().unwrap();
    assert_eq!(report.adopted, vec![done.clone()]);
    assert_eq!(report.removed, vec!["half".to_string(), "orphan".to_string()]);
    assert!(!half.exists());
    assert_eq!(f.ops.dm_names(), vec!["ignite-done", "ignite-done+origin", "ignite-foreign"]);
    assert_eq!(f.ops.loops().len(), 2, "only done's loops remain");
    // Recovery is itself idempotent.
    let again = f.snap().recover().unwrap();
    assert_eq!((again.adopted, again.removed.len()), (vec![done], 0));
}

#[test]
fn recover_reassembles_after_reboot() {
    let f = Fixture::new();
    let disk = f.snap().create("vm1", &f.base, 8 * MIB).unwrap();
    // A reboot: the files survive, devices do not.
    let rebooted = Arc::new(RecordingHostOps::with_dm());
    let snap = DmSnapshotter::new(&f.paths, rebooted.clone());
    let report = snap.recover().unwrap();
    assert_eq!(report.adopted, vec![disk]);
    assert_eq!(rebooted.dm_names(), vec!["ignite-vm1", "ignite-vm1+origin"]);
    assert!(!rebooted.calls().iter().any(|c| matches!(c, HostCall::Resize2fs(_))), "no resize on re-assembly");
    snap.remove("vm1").unwrap();
    assert!(rebooted.loops().is_empty() && rebooted.dm_names().is_empty());
}

#[test]
fn invalid_vm_id_touches_nothing() {
    let f = Fixture::new();
    assert!(matches!(f.snap().create("../x", &f.base, 8 * MIB), Err(SnapshotError::InvalidVmId { .. })));
    assert!(matches!(f.snap().remove("a+origin"), Err(SnapshotError::InvalidVmId { .. })));
    assert!(f.ops.calls().is_empty());
}
