//! bench-gitops: how fast a git commit becomes running VMs, and how long planning takes.
//!
//! Measures, in one run on this host:
//! - commit to VMM process started, for 1 VM and for 50 VMs (tiny guests, a real registry, a
//!   real git repository, the real `ignite daemon` polling every `--interval`);
//! - reconcile planning for 1,000 settled objects (the real store, the fake runtime: the cost
//!   of deciding, not of booting).
//!
//! The peer is Weave Ignite's published behaviour: its GitOps mode polls every 30 s (a commit
//! waits 15 s on average) and `ignite run` takes about 2 s per VM, one after another.
//! Not a test: it asserts nothing about time.
//!
//! Usage: bench-gitops [--interval 1s] [--skip-fleet]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use controller::reconcile::fake::FakeRuntime;
use controller::reconcile::{Reconciler, ReconcilerConfig};
use controller::source::{apply_revision, parse_revision};
use controller::store::Store;
use controller::testing::git::git;
use ignite_e2e::bench::{print_table, Row};
use ignite_e2e::{assemble_pvh, ignite_bin};
use image_store::testing::{fixtures, registry::Registry};

/// Weave Ignite's default GitOps poll period, and the average wait it implies.
const IGNITE_POLL_S: f64 = 30.0;
/// Weave Ignite's published time per `ignite run`.
const IGNITE_RUN_S: f64 = 2.0;

fn manifest(name: &str, image: &str) -> String {
    format!("apiVersion: ignite.dev/v1alpha1\nkind: VM\nmetadata:\n  name: {name}\nspec:\n  image: {image}\n  memory: 32Mi\n  diskSize: 64Mi\n")
}

fn running(root: &Path, name: &str) -> bool {
    std::fs::read_to_string(root.join("vms").join(name).join("pid"))
        .ok()
        .and_then(|t| t.split_whitespace().next().map(String::from))
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

struct Fleet {
    work: std::path::PathBuf,
    image: String,
    root: tempfile::TempDir,
    daemon: Child,
}

impl Fleet {
    /// Commits `n` VMs and returns (first started, all started) since the push.
    fn commit_and_wait(&self, n: usize, round: usize) -> (f64, f64) {
        let vms = self.work.join("vms");
        for f in std::fs::read_dir(&vms).unwrap().flatten() {
            if f.path().extension().is_some_and(|e| e == "yaml") {
                std::fs::remove_file(f.path()).unwrap();
            }
        }
        let names: Vec<String> = (0..n).map(|i| format!("r{round}-vm{i}")).collect();
        for name in &names {
            std::fs::write(vms.join(format!("{name}.yaml")), manifest(name, &self.image)).unwrap();
        }
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", "fleet"]);
        let start = Instant::now();
        git(&self.work, &["push", "-q", "origin", "HEAD:main"]);
        let mut first = None;
        loop {
            let up = names.iter().filter(|n| running(self.root.path(), n)).count();
            if up > 0 && first.is_none() {
                first = Some(start.elapsed().as_secs_f64() * 1000.0);
            }
            if up == n {
                return (first.unwrap_or(0.0), start.elapsed().as_secs_f64() * 1000.0);
            }
            assert!(start.elapsed() < Duration::from_secs(600), "only {up}/{n} VMs started");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn fleet_rows(interval: &str) -> Vec<Row> {
    let dir = tempfile::tempdir().unwrap();
    let kernel = assemble_pvh(dir.path(), "idle", true);
    let registry = Registry::start(None).expect("docker-registry");
    fixtures::push_image(&registry.host(), "bench/tiny", "1", &fixtures::whiteout_image(), None);
    let image = format!("{}/bench/tiny:1", registry.host());
    let (work, remote) = (dir.path().join("work"), dir.path().join("remote.git"));
    std::fs::create_dir_all(work.join("vms")).unwrap();
    git(dir.path(), &["init", "-q", "--bare", remote.to_str().unwrap()]);
    git(&work, &["init", "-q"]);
    std::fs::write(work.join("vms/README.md"), "bench fleet\n").unwrap();
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "empty fleet"]);
    git(&work, &["remote", "add", "origin", remote.to_str().unwrap()]);
    git(&work, &["push", "-q", "origin", "HEAD:main"]);
    let root = tempfile::tempdir().unwrap();
    let url = format!("file://{}", remote.display());
    let daemon = Command::new(ignite_bin())
        .arg("--root")
        .arg(root.path())
        .args([
            "daemon",
            "--no-network",
            "--no-warm-start",
            "--workers",
            "8",
            "--gitops",
            &url,
            "--path",
            "vms",
            "--interval",
            interval,
        ])
        .arg("--kernel")
        .arg(&kernel)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ignite daemon");
    let mut fleet = Fleet { work, image, root, daemon };
    let (one_first, _) = fleet.commit_and_wait(1, 0);
    let (fifty_first, fifty_all) = fleet.commit_and_wait(50, 1);
    fleet.commit_and_wait(0, 2); // empties the fleet
    let cleanup = Instant::now();
    while std::fs::read_dir(fleet.root.path().join("vms")).map(|d| d.count()).unwrap_or(0) > 0 {
        assert!(cleanup.elapsed() < Duration::from_secs(300), "fleet not removed");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = fleet.daemon.kill();
    let _ = fleet.daemon.wait();
    let poll_ms = IGNITE_POLL_S / 2.0 * 1000.0;
    vec![
        Row::ms(
            &format!("commit -> 1 VM started (poll {interval})"),
            Some(one_first),
            Some(poll_ms + IGNITE_RUN_S * 1000.0),
        ),
        Row::ms("commit -> first of 50 VMs started", Some(fifty_first), Some(poll_ms + IGNITE_RUN_S * 1000.0)),
        Row::ms("commit -> all 50 VMs started", Some(fifty_all), Some(poll_ms + 50.0 * IGNITE_RUN_S * 1000.0)),
    ]
}

fn planning_rows() -> Vec<Row> {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let texts: Vec<(String, String)> =
        (0..1000).map(|i| (format!("vm{i}.yaml"), manifest(&format!("vm{i}"), "busybox"))).collect();
    let files = texts.iter().map(|(f, t)| (f.as_str(), t.as_str()));
    let parse = Instant::now();
    let docs = parse_revision("bench", files, &Default::default()).unwrap();
    let parse_ms = parse.elapsed().as_secs_f64() * 1000.0;
    let apply = Instant::now();
    apply_revision(&store, "git:bench", "bench", &docs).unwrap();
    let apply_ms = apply.elapsed().as_secs_f64() * 1000.0;
    let runtime = Arc::new(FakeRuntime::new());
    let reconciler = Reconciler::new(store, runtime, ReconcilerConfig::default());
    for (_, vm) in &docs {
        reconciler.reconcile(&vm.metadata.name).unwrap(); // create + start on the fake host
    }
    let plan = Instant::now();
    for (_, vm) in &docs {
        reconciler.reconcile(&vm.metadata.name).unwrap(); // settled: read, decide, nothing to do
    }
    let plan_ms = plan.elapsed().as_secs_f64() * 1000.0;
    vec![
        Row::ms("1,000 manifests: parse and validate", Some(parse_ms), None),
        Row::ms("1,000 manifests: apply to the store", Some(apply_ms), None),
        Row::ms("1,000 settled VMs: one reconcile pass (plan)", Some(plan_ms), None),
    ]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let interval = args.iter().position(|a| a == "--interval").and_then(|i| args.get(i + 1)).cloned();
    let interval = interval.unwrap_or_else(|| "1s".into());
    let mut rows = Vec::new();
    if !args.iter().any(|a| a == "--skip-fleet") {
        rows.extend(fleet_rows(&interval));
    }
    rows.extend(planning_rows());
    print_table("weave-ignite", &rows);
    println!(
        "\nweave-ignite figures are its published behaviour (30 s poll, ~2 s per `ignite run`), not measured here."
    );
}
