//! The devicemapper snapshotter on real device-mapper: thin pool, image volume, VM snapshots,
//! reattachment, crash recovery, a full pool, and the disk-creation benchmark.
//!
//! CI's hosts have no device-mapper, so `e2e/tests/devicemapper_guest.rs` runs this program inside
//! a guest of our own engine, booted twice with the same disks:
//! - `IGNITE_DM_PHASE=first`, then `IGNITE_DM_PHASE=reattach`: what the first boot left (a pool and
//!   its volumes, deactivated as at shutdown) must be found again by the second; or
//!   `IGNITE_DM_PHASE=bench`: the disk-creation benchmark alone;
//! - `IGNITE_DM_BASE`: a block device holding the base ext4 of a real image (busybox from a registry);
//! - `IGNITE_DM_POOL_DATA`, `IGNITE_DM_POOL_METADATA`: spare block devices for a device-backed pool;
//! - `IGNITE_DM_SCRATCH`: a mounted xfs (with reflink) for file-backed pools and the benchmark.
//!
//! On a host with device-mapper and no such variables, both phases run one after the other in a
//! temporary directory (the device-backed pool is skipped, saying so). Without device-mapper every
//! test prints why it skips. Needs root.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use image_store::snapshot::{
    CrashPoint, DmPoolConfig, DmSnapshotter, FileSnapshotter, LinuxHostOps, SnapshotError, Snapshotter,
};
use image_store::StorePaths;

const MIB: u64 = 1 << 20;
/// The file the busybox fixture image carries, and its content.
const IMAGE_FILE: (&str, &str) = ("www/index.html", "hello from an ignite microVM\n");

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Why these tests cannot run here, or `None`. Also starts the snapshotter's log on stderr, with
/// the time since boot, when `RUST_LOG` asks for it (where each step's time goes).
fn unavailable() -> Option<String> {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .try_init();
    }
    use std::os::unix::fs::MetadataExt;
    if fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) != 0 {
        return Some("needs root".into());
    }
    if let Err(e) = devicemapper::DM::new() {
        return Some(format!("no device-mapper on this host (/dev/mapper/control: {e})"));
    }
    None
}

/// Whether test `name` runs here (`first_phase_only`: not in the reattach boot); prints why not.
fn runs(name: &str, first_phase_only: bool) -> bool {
    let phases = phases();
    let why = unavailable()
        .or_else(|| (phases == ["bench"]).then(|| "the benchmark's boot runs the benchmark only".into()))
        .or_else(|| (first_phase_only && phases == ["reattach"]).then(|| "runs in the first phase only".into()));
    match why {
        Some(why) => {
            println!("SKIP {name}: {why}");
            false
        }
        None => true,
    }
}

/// The phases to run in this process.
fn phases() -> Vec<String> {
    match std::env::var("IGNITE_DM_PHASE") {
        Ok(phase) => vec![phase],
        Err(_) => vec!["first".into(), "reattach".into()],
    }
}

/// The scratch directory (the guest's xfs, or a temporary directory kept for the process).
fn scratch() -> PathBuf {
    if let Some(dir) = std::env::var_os("IGNITE_DM_SCRATCH") {
        return dir.into();
    }
    static TMP: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    TMP.get_or_init(|| tempfile::tempdir().unwrap()).path().to_path_buf()
}

/// The base ext4 as a file: a copy of the `IGNITE_DM_BASE` device, or a small one made here.
fn base() -> PathBuf {
    let path = scratch().join("base.ext4");
    if !path.exists() {
        match std::env::var("IGNITE_DM_BASE") {
            Ok(device) => {
                run("dd", &[&format!("if={device}"), &format!("of={}.tmp", s(&path)), "bs=1M"]);
            }
            Err(_) => {
                let content = scratch().join("content");
                fs::create_dir_all(content.join("www")).unwrap();
                fs::write(content.join(IMAGE_FILE.0), IMAGE_FILE.1).unwrap();
                run("mkfs.ext4", &["-F", "-q", "-d", s(&content), &format!("{}.tmp", s(&path)), "16M"]);
            }
        }
        fs::rename(format!("{}.tmp", s(&path)), &path).unwrap();
    }
    path
}

/// Runs `f` with `device`'s ext4 mounted; unmounts even when `f` panics.
fn mounted<T>(device: &Path, f: impl FnOnce(&Path) -> T) -> T {
    let dir = tempfile::tempdir().unwrap();
    run("mount", &["-t", "ext4", s(device), s(dir.path())]);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(dir.path())));
    run("umount", &[s(dir.path())]);
    result.unwrap_or_else(|p| std::panic::resume_unwind(p))
}

fn read_in(device: &Path, file: &str) -> Option<String> {
    mounted(device, |root| fs::read_to_string(root.join(file)).ok())
}

fn write_in(device: &Path, file: &str, content: &str) {
    mounted(device, |root| fs::write(root.join(file), content).unwrap());
}

/// The ext4's size in bytes (from its superblock).
fn fs_bytes(device: &Path) -> u64 {
    let out = run("dumpe2fs", &["-h", s(device)]);
    let field = |name: &str| -> u64 {
        let line = out.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {out}"));
        line.split(':').nth(1).unwrap().trim().parse().unwrap()
    };
    field("Block count:") * field("Block size:")
}

/// Loop devices backed by files under `dir`.
fn loops_under(dir: &Path) -> Vec<PathBuf> {
    use image_store::snapshot::HostOps;
    LinuxHostOps
        .loop_list()
        .unwrap()
        .into_iter()
        .filter(|l| l.backing_file.starts_with(dir))
        .map(|l| l.device)
        .collect()
}

/// The main pool: on the spare block devices (`--dm-pool-data`/`--dm-pool-metadata`) in a guest, on
/// sparse files in the scratch directory on a host.
fn main_pool() -> DmSnapshotter {
    let paths = StorePaths::new(scratch().join("main-pool"));
    let config = match (std::env::var("IGNITE_DM_POOL_DATA"), std::env::var("IGNITE_DM_POOL_METADATA")) {
        (Ok(data), Ok(metadata)) => DmPoolConfig {
            data_device: Some(data.into()),
            metadata_device: Some(metadata.into()),
            ..Default::default()
        },
        _ => DmPoolConfig { data_file_bytes: 4 << 30, metadata_file_bytes: 64 * MIB, ..Default::default() },
    };
    DmSnapshotter::new(&paths, config, Arc::new(LinuxHostOps))
}

fn vm_ids(snap: &dyn Snapshotter) -> Vec<String> {
    snap.list().unwrap().into_iter().map(|d| d.vm_id).collect()
}

/// A creation killed at each step leaves nothing that recovery does not remove: no device, no
/// record, no thin volume holding pool space. (Runs first: it also makes the main pool and writes
/// the image's volume, which the next test reuses.)
#[test]
fn a_crash_at_every_step_is_recovered() {
    if !runs("a_crash_at_every_step_is_recovered", true) {
        return;
    }
    let base = base();
    let snap = main_pool();
    snap.create("keep", &base, 32 * MIB).unwrap();
    let before = snap.usage().unwrap();
    for point in [CrashPoint::AfterIntent, CrashPoint::AfterThin, CrashPoint::AfterGrow] {
        let crashed = {
            let snap = main_pool();
            snap.crash_at(Some(point));
            snap.create("victim", &base, 64 * MIB).unwrap_err()
        };
        assert!(format!("{crashed:?}").contains("simulated crash"), "{point:?}: {crashed:?}");
        // The restarted daemon.
        let snap = main_pool();
        assert!(!vm_ids(&snap).contains(&"victim".to_string()), "{point:?}: a half-made disk is listed");
        let report = snap.recover().unwrap();
        assert_eq!(report.removed, ["victim"], "{point:?}");
        assert!(!snap.devices().unwrap().iter().any(|d| d.ends_with("-vm-victim")), "{point:?}: device left");
        let after = snap.usage().unwrap();
        assert_eq!(after.used_bytes, before.used_bytes, "{point:?}: the crashed volume still holds pool space");
    }
    let disk = snap.create("victim", &base, 64 * MIB).unwrap();
    assert_eq!(read_in(&disk.path, IMAGE_FILE.0).as_deref(), Some(IMAGE_FILE.1));
    snap.remove("victim").unwrap();
    snap.remove("keep").unwrap();
    assert!(vm_ids(&snap).is_empty());
}

/// Ten VMs from one image; their writes are their own; five are removed; the rest survive the
/// reboot between the phases (every dm device gone), and a daemon configured with other pool
/// devices is refused rather than formatting a new pool.
#[test]
fn b_ten_vms_survive_a_reboot() {
    if !runs("b_ten_vms_survive_a_reboot", false) {
        return;
    }
    for phase in phases() {
        let snap = main_pool();
        if phase == "first" {
            let base = base();
            let started = Instant::now();
            let disks: Vec<_> = (0..10).map(|i| snap.create(&format!("vm{i}"), &base, 64 * MIB).unwrap()).collect();
            println!("BENCH ten 64 MiB thin snapshots of one image: {:.1} s", started.elapsed().as_secs_f64());
            assert_eq!(vm_ids(&snap), (0..10).map(|i| format!("vm{i}")).collect::<Vec<_>>());
            assert!(fs_bytes(&disks[0].path) >= 63 * MIB, "ext4 not grown: {}", fs_bytes(&disks[0].path));
            assert_eq!(read_in(&disks[9].path, IMAGE_FILE.0).as_deref(), Some(IMAGE_FILE.1));
            write_in(&disks[3].path, "only-vm3", "mine\n");
            assert_eq!(read_in(&disks[3].path, "only-vm3").as_deref(), Some("mine\n"));
            assert_eq!(read_in(&disks[4].path, "only-vm3"), None, "vm4 sees vm3's write");
            // A VM made after the write starts from the untouched image volume.
            let late = snap.create("late", &base, 64 * MIB).unwrap();
            assert_eq!(read_in(&late.path, "only-vm3"), None, "the image volume took vm3's write");
            let usage = snap.usage().unwrap();
            let base_bytes = fs::metadata(&base).unwrap().len();
            println!(
                "BENCH pool data used by 11 VMs of one {} MiB image: {:.1} MiB",
                base_bytes / MIB,
                usage.used_bytes as f64 / MIB as f64
            );
            assert!(usage.used_bytes < 3 * base_bytes, "snapshots copied the image: {usage:?}");
            let e = snap.create("vm3", &base, 64 * MIB).unwrap_err();
            assert!(matches!(e, SnapshotError::AlreadyExists { .. }), "{e}");
            for i in [0, 1, 2, 8, 9] {
                snap.remove(&format!("vm{i}")).unwrap();
                snap.remove(&format!("vm{i}")).unwrap();
            }
            snap.remove("late").unwrap();
            let report = snap.recover().unwrap();
            assert_eq!(report.adopted.len(), 5, "{report:?}");
            // As at shutdown: every device of the store goes; the next boot starts without them.
            snap.deactivate().unwrap();
            assert_eq!(snap.devices().unwrap(), Vec::<String>::new());
        } else {
            let report = snap.recover().unwrap();
            let adopted: Vec<_> = report.adopted.iter().map(|d| d.vm_id.as_str()).collect();
            assert_eq!(adopted, ["vm3", "vm4", "vm5", "vm6", "vm7"], "{report:?}");
            let vm3 = snap.disk_of("vm3").unwrap();
            assert_eq!(read_in(&vm3.path, "only-vm3").as_deref(), Some("mine\n"), "vm3's write was lost");
            assert_eq!(read_in(&snap.disk_of("vm7").unwrap().path, IMAGE_FILE.0).as_deref(), Some(IMAGE_FILE.1));
            // The image volume is reused, not written again.
            let again = snap.create("again", &base(), 64 * MIB).unwrap();
            assert_eq!(read_in(&again.path, IMAGE_FILE.0).as_deref(), Some(IMAGE_FILE.1));
            if std::env::var_os("IGNITE_DM_POOL_DATA").is_some() {
                let paths = StorePaths::new(scratch().join("main-pool"));
                let files = DmSnapshotter::new(&paths, DmPoolConfig::default(), Arc::new(LinuxHostOps));
                let e = files.create("other", &base(), 32 * MIB).unwrap_err();
                assert!(matches!(e, SnapshotError::PoolMismatch { .. }), "{e}");
                assert!(e.to_string().contains("--dm-pool-data"), "{e}");
            }
            for vm in vm_ids(&snap) {
                snap.remove(&vm).unwrap();
            }
            snap.deactivate().unwrap();
            assert_eq!(snap.devices().unwrap(), Vec::<String>::new(), "dm devices left");
        }
    }
}

/// A small pool on loop-attached sparse files: below its low-water mark it refuses new disks with a
/// clear error while the running guest can still write; after the reboot its loop devices are
/// attached again and the pool still refuses; removing the VM makes room.
#[test]
fn c_full_pool_refuses_new_disks() {
    if !runs("c_full_pool_refuses_new_disks", false) {
        return;
    }
    let root = scratch().join("small-pool");
    let base = base();
    let base_bytes = fs::metadata(&base).unwrap().len();
    // Just room for the image (a tenth is the low-water mark), so little has to be written to fill it.
    let data = (base_bytes * 10 / 9 + 4 * MIB).next_multiple_of(MIB);
    let config = DmPoolConfig { data_file_bytes: data, metadata_file_bytes: 16 * MIB, ..Default::default() };
    let snap = DmSnapshotter::new(&StorePaths::new(&root), config, Arc::new(LinuxHostOps));
    let refused = |snap: &DmSnapshotter| {
        let e = snap.create("one-too-many", &base, base_bytes + MIB).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, SnapshotError::PoolFull { .. }) && text.contains("full"), "{text}");
        assert!(text.contains("one-too-many") && text.contains("remove VMs or grow the pool"), "{text}");
        assert!(!vm_ids(snap).contains(&"one-too-many".to_string()));
    };
    for phase in phases() {
        if phase == "first" {
            let disk = snap.create("filler", &base, base_bytes + 64 * MIB).unwrap();
            let usage = snap.usage().unwrap();
            // The guest fills its disk past the image's end (free blocks of its grown ext4), with
            // direct writes: the page cache of an emulated guest kernel is slow.
            let fill = (usage.total_bytes - usage.used_bytes - usage.low_water_bytes / 2).div_ceil(MIB);
            write_direct(&disk.path, base_bytes.next_multiple_of(MIB), fill);
            refused(&snap);
            // The guest can still write: the mark keeps room for it.
            write_in(&disk.path, "still-writable", "yes\n");
            snap.deactivate().unwrap();
            assert!(loops_under(&root).is_empty(), "deactivate left loop devices");
        } else {
            assert_eq!(snap.recover().unwrap().adopted.len(), 1);
            assert_eq!(loops_under(&root).len(), 2, "the pool's files are attached again");
            assert_eq!(read_in(&snap.disk_of("filler").unwrap().path, "still-writable").as_deref(), Some("yes\n"));
            refused(&snap);
            snap.remove("filler").unwrap();
            let disk = snap.create("fits-now", &base, base_bytes + MIB).unwrap();
            assert_eq!(read_in(&disk.path, IMAGE_FILE.0).as_deref(), Some(IMAGE_FILE.1));
            snap.remove("fits-now").unwrap();
            snap.deactivate().unwrap();
            assert!(loops_under(&root).is_empty(), "loop devices left");
            assert_eq!(snap.devices().unwrap(), Vec::<String>::new(), "dm devices left");
        }
    }
}

/// Writes `mib` MiB of ones to `device` from byte `offset` with O_DIRECT, synced.
fn write_direct(device: &Path, offset: u64, mib: u64) {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::OpenOptionsExt;
    const O_DIRECT: i32 = 0o40000;
    let mut file = fs::OpenOptions::new().write(true).custom_flags(O_DIRECT).open(device).unwrap();
    // O_DIRECT wants an aligned buffer: take the 4 KiB-aligned MiB inside a larger allocation.
    let mut raw = vec![1u8; (MIB + 4096) as usize];
    let skip = raw.as_ptr().align_offset(4096);
    let buf = &mut raw[skip..skip + MIB as usize];
    file.seek(SeekFrom::Start(offset)).unwrap();
    for _ in 0..mib {
        file.write_all(buf).unwrap();
    }
    file.sync_all().unwrap();
}

/// Per-VM creation of a 2 GiB disk, thin snapshot against a sparse copy and an xfs reflink, and the
/// space ten such disks of one image take in each (`df` of the scratch filesystem, which holds the
/// thin pool's files, the copies and the clones alike).
#[test]
fn zz_bench_disk_creation() {
    if let Some(why) = unavailable() {
        println!("SKIP zz_bench_disk_creation: {why}");
        return;
    }
    if phases() != ["bench"] {
        println!(
            "SKIP zz_bench_disk_creation: the benchmark has a boot of its own \
             (IGNITE_DM_BENCH=1 cargo test -p ignite-e2e --test devicemapper_guest)"
        );
        return;
    }
    let disks: usize = std::env::var("IGNITE_DM_BENCH_DISKS").ok().and_then(|n| n.parse().ok()).unwrap_or(10);
    let base = base();
    let scratch = scratch();
    let used = || -> u64 {
        run("sync", &[]);
        let out = run("df", &["-k", s(&scratch)]);
        let line = out.lines().nth(1).unwrap();
        line.split_whitespace().nth(2).unwrap().parse::<u64>().unwrap() * 1024
    };
    let paths = StorePaths::new(scratch.join("bench"));
    let ops = Arc::new(LinuxHostOps);
    let thin = DmSnapshotter::new(
        &paths,
        DmPoolConfig { data_file_bytes: 8 << 30, metadata_file_bytes: 64 * MIB, ..Default::default() },
        ops.clone(),
    );
    // The pool and the image volume exist before timing, as on a host that has run a VM of it.
    thin.create("warmup", &base, 2 << 30).unwrap();
    thin.remove("warmup").unwrap();
    let snapshotters: [(&str, Box<dyn Snapshotter>); 3] = [
        ("thin snapshot", Box::new(thin)),
        ("sparse copy", Box::new(FileSnapshotter::copy(&paths, ops.clone()))),
        ("xfs reflink", Box::new(FileSnapshotter::reflink(&paths, ops))),
    ];
    let mut figures = Vec::new();
    for (name, snap) in &snapshotters {
        let before = used();
        let mut first = None;
        let started = Instant::now();
        for i in 0..disks {
            let t = Instant::now();
            snap.create(&format!("bench{i}"), &base, 2 << 30).unwrap();
            first.get_or_insert(t.elapsed());
        }
        let all = started.elapsed();
        let space = used().saturating_sub(before);
        println!(
            "BENCH 2 GiB disk, {name}: first {:.0} ms, mean of {disks} {:.0} ms, {disks} disks use {:.1} MiB",
            first.unwrap().as_secs_f64() * 1e3,
            all.as_secs_f64() * 1e3 / disks as f64,
            space as f64 / MIB as f64
        );
        for i in 0..disks {
            snap.remove(&format!("bench{i}")).unwrap();
        }
        figures.push((all.as_secs_f64() / disks as f64, space));
    }
    let (thin_time, thin_space) = figures[0];
    for (i, (name, _)) in snapshotters.iter().enumerate().skip(1) {
        let (time, space) = figures[i];
        println!(
            "BENCH thin snapshot against {name}: {:.1}x faster per disk, {:.1}x less space for {disks} disks",
            time / thin_time,
            space as f64 / thin_space.max(1) as f64
        );
    }
    let (_, snap) = snapshotters.into_iter().next().unwrap();
    drop(snap);
    DmSnapshotter::new(&paths, DmPoolConfig::default(), Arc::new(LinuxHostOps)).deactivate().unwrap();
    fs::remove_dir_all(scratch.join("bench")).unwrap();
}
