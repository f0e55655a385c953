//! Crash consistency of the whole controller: the real `ignite daemon` is killed with SIGKILL
//! while VMs run, aborts at chosen points inside create/start/delete, and VM processes are
//! killed while no daemon watches. After every restart the fleet converges, and once the fleet
//! is emptied nothing is left: no VMM process, run or runtime directory, disk or lease.

mod support;

use std::path::Path;
use std::time::Duration;

use controller::store::Store;
use support::daemon::{pid_of, vm_files, vm_up, vmm_processes, wait_for, DaemonProcess};
use support::fleet::{manifest, registry_with_image, unavailable};
use support::git::Repo;

const CONVERGE: Duration = Duration::from_secs(90);

fn memory_of(root: &Path, vm: &str) -> Option<u64> {
    let text = std::fs::read_to_string(root.join("vms").join(vm).join("config.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["memoryMib"].as_u64()
}

/// Empties the fleet with a fresh daemon and checks that nothing at all is left.
fn empty_and_check(root: &Path, repo: &Repo) {
    repo.commit(&[("vms/README.md", Some("empty\n"))], "empty the fleet");
    for f in std::fs::read_dir(repo.work.join("vms")).unwrap().flatten() {
        if f.path().extension().is_some_and(|e| e == "yaml") {
            std::fs::remove_file(f.path()).unwrap();
        }
    }
    repo.commit(&[], "remove every VM");
    let daemon = DaemonProcess::start(root, &repo.url(), &["--no-network"], &[]);
    wait_for("every VM removed", CONVERGE, || vm_files(root).is_empty() && vmm_processes(root).is_empty());
    daemon.terminate();
    let store = Store::open(root).unwrap();
    assert!(store.list_vms().unwrap().is_empty());
    assert!(store.list_leases().unwrap().is_empty(), "no lease left");
}

#[test]
fn sigkill_of_the_daemon_and_of_vms_while_it_is_down_converges() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP sigkill_of_the_daemon_and_of_vms_while_it_is_down_converges: {why}");
        return;
    }
    let (_registry, image) = registry_with_image();
    let repo = Repo::new();
    let files: Vec<(String, String)> =
        ["a", "b", "c"].iter().map(|n| (format!("vms/{n}.yaml"), manifest(n, &image, "64Mi", ""))).collect();
    let mut commit: Vec<(&str, Option<&str>)> = files.iter().map(|(p, t)| (p.as_str(), Some(t.as_str()))).collect();
    commit.push(("vms/README.md", Some("fleet\n")));
    repo.commit(&commit, "three VMs");
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let _guard = support::daemon::KillVmsOnDrop(r);

    let mut daemon = DaemonProcess::start(r, &repo.url(), &["--no-network"], &[]);
    wait_for("a, b and c up", CONVERGE, || {
        daemon.assert_alive();
        ["a", "b", "c"].iter().all(|n| vm_up(r, n))
    });
    let (a1, b1) = (pid_of(r, "a").unwrap(), pid_of(r, "b").unwrap());
    daemon.kill9();
    assert_eq!(pid_of(r, "a"), Some(a1), "VMs keep running without the daemon");

    // While no daemon runs: b's VMM dies, c is deleted from git, a gets more memory.
    rustix::process::kill_process(rustix::process::Pid::from_raw(b1).unwrap(), rustix::process::Signal::KILL).unwrap();
    repo.commit(&[("vms/c.yaml", None), ("vms/a.yaml", Some(&manifest("a", &image, "80Mi", "")))], "drop c, grow a");

    let mut daemon = DaemonProcess::start(r, &repo.url(), &["--no-network"], &[]);
    wait_for("a recreated, b restarted, c gone", CONVERGE, || {
        daemon.assert_alive();
        memory_of(r, "a") == Some(80)
            && vm_up(r, "a")
            && pid_of(r, "b").is_some_and(|p| p != b1)
            && vm_up(r, "b")
            && !r.join("vms/c").exists()
            && !r.join("runtime/c").exists()
    });
    assert!(pid_of(r, "a").is_some_and(|p| p != a1));
    daemon.terminate();
    assert!(vm_up(r, "a") && vm_up(r, "b"), "a clean daemon stop leaves VMs running");
    {
        let store = Store::open(r).unwrap();
        let b = store.get_vm("b").unwrap().unwrap();
        assert_eq!(b.status.restarts, 1, "the crash while the daemon was down counts as a restart");
        assert!(store.get_vm("c").unwrap().is_none());
    }
    empty_and_check(r, &repo);
}

#[test]
fn a_crash_at_every_point_of_create_start_and_delete_is_repaired() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP a_crash_at_every_point_of_create_start_and_delete_is_repaired: {why}");
        return;
    }
    let (_registry, image) = registry_with_image();
    for point in controller::failpoint::POINTS {
        let repo = Repo::new();
        repo.commit(
            &[("vms/README.md", Some("fleet\n")), ("vms/web.yaml", Some(&manifest("web", &image, "64Mi", "")))],
            "web",
        );
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let _guard = support::daemon::KillVmsOnDrop(r);
        let _guard = support::daemon::KillVmsOnDrop(r);
        if point.starts_with("delete:") {
            let daemon = DaemonProcess::start(r, &repo.url(), &["--no-network"], &[]);
            wait_for("web up", CONVERGE, || vm_up(r, "web"));
            daemon.terminate();
            repo.commit(&[("vms/web.yaml", None)], "delete web");
        }
        let crashing = DaemonProcess::start(r, &repo.url(), &["--no-network"], &[(controller::failpoint::ENV, point)]);
        crashing.wait_crash(CONVERGE);
        let daemon = DaemonProcess::start(r, &repo.url(), &["--no-network"], &[]);
        if point.starts_with("delete:") {
            wait_for(&format!("web removed after a crash at {point}"), CONVERGE, || {
                vm_files(r).is_empty() && vmm_processes(r).is_empty()
            });
            daemon.terminate();
        } else {
            wait_for(&format!("web up after a crash at {point}"), CONVERGE, || {
                vm_up(r, "web") && daemon.log_text().contains("reason=Running")
            });
            assert_eq!(vmm_processes(r).len(), 1, "exactly one VMM for web after a crash at {point}");
            daemon.terminate();
            let store = Store::open(r).unwrap();
            let status = store.get_vm("web").unwrap().unwrap().status;
            assert!(status.boot_time.is_some() && status.observed_generation == 1, "{point}: {status:?}");
            drop(store);
            empty_and_check(r, &repo);
        }
        eprintln!("crash at {point}: repaired");
    }
}
