//! bench-image: ignite's image store side by side with the by-hand pipeline (skopeo + umoci +
//! mkfs.ext4, cp + resize2fs) in the same run, on the same fixture image and the same local registry.
//!
//! Measures (medians over `--runs`):
//! - image to base root disk, cold (empty store) and warm (blobs present, base rebuilt): ignite's
//!   `pull_blocking` + `build_base_rootfs` against `skopeo copy` + `umoci unpack` + `mkfs.ext4 -d`
//!   (with the same image size ignite chose); plus ignite with everything cached;
//! - per-VM 2 GiB disk creation from that base, per snapshotter: `copy` against
//!   `cp --sparse=always` + `truncate` + `resize2fs`, `reflink` on a loop-mounted xfs against
//!   `cp --reflink=always` + `truncate` + `resize2fs`, and devicemapper where the kernel has it.
//!
//! Needs root, Debian's `docker-registry`, `skopeo`, `umoci`, e2fsprogs and xfsprogs. Everything it
//! makes (registry process, mount, loop device, temp dirs) is removed at the end, also on panic.
//! Prints a table of figures and ratios. Not a test: it asserts nothing about time.
//!
//! Usage: bench-image [--runs N]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ignite_e2e::bench::{median, print_table, Row};
use image_store::pull::{pull_blocking, PullOptions};
use image_store::snapshot::{DmSnapshotter, FileSnapshotter, HostOps, LinuxHostOps, Snapshotter};
use image_store::testing::mount::LoopMount;
use image_store::{build_base_rootfs, remove_base_rootfs, ImageRecord, PullProgress, StorePaths};

/// Per-VM disk size.
const DISK_BYTES: u64 = 2 << 30;
/// Size of the sparse file holding the xfs for the reflink figures.
const XFS_BYTES: u64 = 4 << 30;
/// Fixture layers: (files, bytes per file) of pseudo-random data; about 20, 20 and 10 MB.
const LAYERS: [(usize, usize); 3] = [(80, 256 << 10), (40, 512 << 10), (160, 64 << 10)];
/// The VM id used for every disk creation.
const VM: &str = "bench-vm";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3);
    // Drop order is the reverse of declaration: the mount and the registry go before the temp dir.
    let dir = tempfile::Builder::new().prefix("bench-image-").tempdir().expect("temp dir");
    let registry = Registry::start(dir.path());
    let reference = format!("127.0.0.1:{}/bench:latest", registry.port);
    let fixture_bytes = build_fixture(dir.path(), &reference);
    println!(
        "bench-image: {runs} runs per figure, fixture {:.1} MB in {} layers (+ small files), registry 127.0.0.1:{}",
        fixture_bytes as f64 / 1e6,
        LAYERS.len(),
        registry.port
    );

    let mut rows = Vec::new();
    let (store, _record, base) = image_rows(dir.path(), &reference, runs, &mut rows);
    let base_bytes = std::fs::metadata(&base).expect("base size").len();
    println!(
        "bench-image: ignite's base rootfs {} is {:.1} MiB (apparent), {:.1} MiB allocated",
        base.display(),
        base_bytes as f64 / (1 << 20) as f64,
        allocated_bytes(&base) as f64 / (1 << 20) as f64
    );
    disk_rows(dir.path(), &store, &base, runs, &mut rows);
    print_table("by hand", &rows);
}

/// One line of the result table: ignite's median and the by-hand median, in `unit`.
fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// Runs a command, panicking with its stderr if it fails.
fn check(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bytes actually allocated to a file (it may be sparse).
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

// ---------------------------------------------------------------------------------------------
// Registry

/// Debian's docker-registry on 127.0.0.1, killed on drop.
struct Registry {
    child: Child,
    port: u16,
}

impl Registry {
    /// Starts a registry storing under `dir`/registry and waits until `/v2/` answers.
    fn start(dir: &Path) -> Registry {
        let port = TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
        let storage = dir.join("registry");
        std::fs::create_dir_all(&storage).expect("registry dir");
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )
        .expect("registry config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn docker-registry (apt-get install docker-registry)");
        let mut registry = Registry { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = registry.child.try_wait() {
                panic!("docker-registry exited at start-up: {status}");
            }
            if http_status(port, "/v2/") == Some(200) {
                return registry;
            }
            assert!(Instant::now() < deadline, "docker-registry did not answer on 127.0.0.1:{port}/v2/ within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The HTTP status of a plain GET, or None if nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").ok()?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).ok()?;
    std::str::from_utf8(&head[..n]).ok()?.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Fixture image

/// splitmix64: a tiny seeded PRNG; its output does not compress.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Builds the fixture as an OCI layout with umoci (one repack per layer) and pushes it to the
/// registry as `reference`. Returns the bytes of file content written.
fn build_fixture(dir: &Path, reference: &str) -> u64 {
    let layout = dir.join("fixture-oci");
    let image = format!("{}:bench", layout.display());
    check(Command::new("umoci").args(["init", "--layout"]).arg(&layout));
    check(Command::new("umoci").args(["new", "--image", &image]));
    check(Command::new("umoci").args(["config", "--image", &image, "--config.cmd", "/bin/sh"]));
    let mut rng = Rng(0x1917_2026);
    let mut total = 0u64;
    for (layer, &(files, size)) in LAYERS.iter().enumerate() {
        let bundle = dir.join(format!("fixture-bundle-{layer}"));
        check(Command::new("umoci").args(["unpack", "--image", &image]).arg(&bundle));
        let data = bundle.join("rootfs").join(format!("data/layer{layer}"));
        std::fs::create_dir_all(&data).expect("fixture dir");
        let mut buf = vec![0u8; size];
        for i in 0..files {
            rng.fill(&mut buf);
            std::fs::write(data.join(format!("blob-{i:04}.bin")), &buf).expect("fixture file");
            total += size as u64;
        }
        let etc = bundle.join("rootfs/etc");
        std::fs::create_dir_all(&etc).expect("fixture etc");
        let text = format!("bench-image fixture, layer {layer}\n");
        std::fs::write(etc.join(format!("layer{layer}.txt")), &text).expect("fixture text");
        std::fs::write(etc.join("hostname"), "bench\n").expect("fixture text");
        std::fs::write(etc.join("motd"), text.repeat(20)).expect("fixture text");
        total += text.len() as u64 * 22 + 6;
        check(Command::new("umoci").args(["repack", "--image", &image]).arg(&bundle));
        std::fs::remove_dir_all(&bundle).expect("remove fixture bundle");
    }
    check(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "-q",
        "--dest-tls-verify=false",
        &format!("oci:{image}"),
        &format!("docker://{reference}"),
    ]));
    std::fs::remove_dir_all(&layout).expect("remove fixture layout");
    total
}

// ---------------------------------------------------------------------------------------------
// Image to base root disk

/// Times of one image-to-rootfs run, in milliseconds.
#[derive(Clone, Copy)]
struct Run {
    fetch: f64,
    rootfs: f64,
    /// By hand only: the `umoci unpack` part of `rootfs`.
    unpack: f64,
    downloaded: u64,
}

impl Run {
    fn total(&self) -> f64 {
        self.fetch + self.rootfs
    }
}

/// ignite: pull + build base; returns the times, the record and the base path.
fn ignite_run(paths: &StorePaths, reference: &str) -> (Run, ImageRecord, PathBuf) {
    let last = Arc::new(Mutex::new(PullProgress::default()));
    let sink = last.clone();
    let options = PullOptions {
        insecure: true,
        auth_config: None,
        progress: Some(Arc::new(move |p| *sink.lock().unwrap_or_else(|e| e.into_inner()) = p)),
        ..Default::default()
    };
    let start = Instant::now();
    let record = pull_blocking(paths, reference, &options).unwrap_or_else(|e| panic!("pull {reference}: {e:?}"));
    let fetch = ms_since(start);
    let start = Instant::now();
    let base = build_base_rootfs(paths, &record, None).unwrap_or_else(|e| panic!("build base rootfs: {e:?}"));
    let rootfs = ms_since(start);
    let downloaded = last.lock().unwrap_or_else(|e| e.into_inner()).bytes_downloaded;
    (Run { fetch, rootfs, unpack: 0.0, downloaded }, record, base)
}

/// By hand: skopeo copy into `layout` + umoci unpack + mkfs.ext4 -d of `size` bytes.
fn hand_run(work: &Path, reference: &str, size: u64) -> Run {
    let layout = work.join("oci");
    let bundle = work.join("bundle");
    let image = work.join("rootfs.ext4");
    let _ = std::fs::remove_dir_all(&bundle);
    let _ = std::fs::remove_file(&image);
    let start = Instant::now();
    check(Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "-q",
        "--src-tls-verify=false",
        &format!("docker://{reference}"),
        &format!("oci:{}:bench", layout.display()),
    ]));
    let fetch = ms_since(start);
    let start = Instant::now();
    check(Command::new("umoci").args(["unpack", "--image", &format!("{}:bench", layout.display())]).arg(&bundle));
    let unpack = ms_since(start);
    check(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(bundle.join("rootfs"))
            .arg(&image)
            .arg(format!("{}k", size.div_ceil(1024))),
    );
    let rootfs = ms_since(start);
    Run { fetch, rootfs, unpack, downloaded: 0 }
}

/// Pushes the cold, warm and all-cached rows; returns the warm store, the record and its base.
fn image_rows(dir: &Path, reference: &str, runs: usize, rows: &mut Vec<Row>) -> (StorePaths, ImageRecord, PathBuf) {
    // ignite cold: a fresh store each time; the last one is kept for the warm runs.
    let mut cold = Vec::new();
    let mut kept = None;
    for i in 0..runs {
        let root = dir.join(format!("ignite-store-{i}"));
        let paths = StorePaths::new(&root);
        let (run, record, base) = ignite_run(&paths, reference);
        cold.push(run);
        if let Some((old, _, _)) = kept.replace((paths, record, base)) {
            let old: StorePaths = old;
            std::fs::remove_dir_all(old.root()).expect("remove cold store");
        }
    }
    let (paths, record, base) = kept.expect("at least one run");
    let size = std::fs::metadata(&base).expect("base size").len();
    println!(
        "bench-image: ignite cold pull downloaded {:.1} MB",
        median(cold.iter().map(|r| r.downloaded as f64).collect()).unwrap_or(0.0) / 1e6
    );

    // ignite warm: blobs present, base removed and rebuilt.
    let mut warm = Vec::new();
    for _ in 0..runs {
        remove_base_rootfs(&paths, &record.manifest_digest).expect("remove base rootfs");
        warm.push(ignite_run(&paths, reference).0);
    }
    let warm_downloaded = warm.iter().map(|r| r.downloaded).max().unwrap_or(0);
    println!("bench-image: ignite warm pulls downloaded at most {warm_downloaded} blob bytes (blobs already stored)");
    // ignite all cached: blobs and base present.
    let cached: Vec<Run> = (0..runs).map(|_| ignite_run(&paths, reference).0).collect();

    // By hand, cold: a fresh directory each time; the last one is kept for the warm runs.
    let mut hand_cold = Vec::new();
    for i in 0..runs {
        let work = dir.join(format!("hand-{i}"));
        std::fs::create_dir_all(&work).expect("hand dir");
        hand_cold.push(hand_run(&work, reference, size));
        if i + 1 < runs {
            std::fs::remove_dir_all(&work).expect("remove hand dir");
        }
    }
    let work = dir.join(format!("hand-{}", runs - 1));
    let hand_warm: Vec<Run> = (0..runs).map(|_| hand_run(&work, reference, size)).collect();
    std::fs::remove_dir_all(&work).expect("remove hand dir");

    let med = |v: &[Run], f: fn(&Run) -> f64| median(v.iter().map(f).collect());
    println!(
        "bench-image: by-hand rootfs split (cold medians): umoci unpack {:.1} ms, mkfs.ext4 -d {:.1} ms",
        med(&hand_cold, |r| r.unpack).unwrap_or(0.0),
        med(&hand_cold, |r| r.rootfs - r.unpack).unwrap_or(0.0)
    );
    for (label, ours, theirs) in [("cold", &cold, &hand_cold), ("warm, rootfs rebuilt", &warm, &hand_warm)] {
        rows.push(Row::ms(
            &format!("{label}: fetch (pull / skopeo copy)"),
            med(ours, |r| r.fetch),
            med(theirs, |r| r.fetch),
        ));
        rows.push(Row::ms(
            &format!("{label}: rootfs (build / unpack+mkfs)"),
            med(ours, |r| r.rootfs),
            med(theirs, |r| r.rootfs),
        ));
        rows.push(Row::ms(&format!("{label}: total"), med(ours, Run::total), med(theirs, Run::total)));
    }
    rows.push(Row::ms("all cached: pull + build (ignite only)", med(&cached, Run::total), None));
    (paths, record, base)
}

// ---------------------------------------------------------------------------------------------
// Per-VM disks

/// Times `runs` creations of a VM disk by `snapshotter` (each removed after).
fn time_snapshotter(snapshotter: &dyn Snapshotter, base: &Path, runs: usize) -> Option<f64> {
    let mut times = Vec::new();
    for _ in 0..runs {
        snapshotter.remove(VM).expect("remove leftover disk");
        let start = Instant::now();
        let disk =
            snapshotter.create(VM, base, DISK_BYTES).unwrap_or_else(|e| panic!("{} create: {e:?}", snapshotter.name()));
        times.push(ms_since(start));
        assert!(disk.path.exists(), "{} made no disk at {}", snapshotter.name(), disk.path.display());
        snapshotter.remove(VM).expect("remove disk");
    }
    median(times)
}

/// Times `runs` by-hand creations: `cp <cp_flag> BASE DISK && truncate -s 2G DISK && resize2fs DISK`.
fn time_by_hand(cp_flag: &str, base: &Path, disk: &Path, runs: usize) -> Option<f64> {
    let mut times = Vec::new();
    for _ in 0..runs {
        let _ = std::fs::remove_file(disk);
        let start = Instant::now();
        check(Command::new("cp").arg(cp_flag).arg(base).arg(disk));
        check(Command::new("truncate").args(["-s", &DISK_BYTES.to_string()]).arg(disk));
        check(Command::new("resize2fs").arg(disk).stderr(Stdio::piped()));
        times.push(ms_since(start));
        std::fs::remove_file(disk).expect("remove by-hand disk");
    }
    median(times)
}

/// Pushes the per-snapshotter disk creation rows.
fn disk_rows(dir: &Path, store: &StorePaths, base: &Path, runs: usize, rows: &mut Vec<Row>) {
    let ops: Arc<dyn HostOps> = Arc::new(LinuxHostOps);

    // copy: the store's own filesystem (the temp dir's).
    let copy = FileSnapshotter::copy(store, ops.clone());
    let ours = time_snapshotter(&copy, base, runs);
    let theirs = time_by_hand("--sparse=always", base, &dir.join("hand-disk.ext4"), runs);
    rows.push(Row::ms("2 GiB disk: copy (cp --sparse + resize2fs)", ours, theirs));

    // reflink: a store on a loop-mounted xfs with reflink=1, holding its own copy of the base.
    {
        let xfs = LoopMount::new(dir, XFS_BYTES, &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"]);
        let xfs_store = StorePaths::new(xfs.mountpoint.join("store"));
        let xfs_base = xfs.mountpoint.join("base.ext4");
        check(Command::new("cp").arg("--sparse=always").arg(base).arg(&xfs_base));
        let reflink = FileSnapshotter::reflink(&xfs_store, ops.clone());
        let ours = time_snapshotter(&reflink, &xfs_base, runs);
        let theirs = time_by_hand("--reflink=always", &xfs_base, &xfs.mountpoint.join("hand-disk.ext4"), runs);
        rows.push(Row::ms("2 GiB disk: reflink on xfs (cp --reflink + resize2fs)", ours, theirs));
    }

    // devicemapper: only where the driver answers.
    let name = "2 GiB disk: devicemapper (no by-hand peer)";
    if ops.dm_available() {
        let dm = DmSnapshotter::new(store, Default::default(), ops.clone());
        let ours = time_snapshotter(&dm, base, runs);
        // The pool outlives its VMs by design; the benchmark's store goes, so its devices go too.
        if let Err(e) = dm.deactivate() {
            eprintln!("bench-image: could not take the thin pool down: {e}");
        }
        rows.push(Row::ms(name, ours, None));
    } else {
        rows.push(Row {
            name: name.into(),
            unit: "ms",
            ours: None,
            theirs: None,
            note: Some("n/a (no device-mapper here)".into()),
        });
    }
}
