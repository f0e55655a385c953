//! The whole controller for real: a git repository of manifests (commits, a broken commit, a
//! deleted file), a real registry serving the image, real root disks, and VM processes on
//! /dev/kvm running tiny guests. The daemon runs in this process so the test can read its store.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use controller::api::Phase;
use controller::daemon::Daemon;
use controller::source::{GitRef, GitSpec, SourceKind, SourceSpec};
use support::daemon::wait_for;
use support::fleet::{daemon_config, manifest, registry_with_image, unavailable};
use support::git::Repo;
use support::tiny_guest;

fn pid_of(root: &Path, vm: &str) -> Option<i32> {
    let text = std::fs::read_to_string(root.join("vms").join(vm).join("pid")).ok()?;
    let pid: i32 = text.split_whitespace().next()?.parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

fn console(root: &Path, vm: &str) -> String {
    std::fs::read_to_string(root.join("vms").join(vm).join("console.log")).unwrap_or_default()
}

fn leftovers(root: &Path, vm: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for dir in ["vms", "runtime"] {
        let p = root.join(dir).join(vm);
        if p.exists() {
            found.push(p);
        }
    }
    for snapshotter in ["copy", "reflink"] {
        if let Ok(entries) = std::fs::read_dir(root.join("snapshots").join(snapshotter)) {
            found.extend(entries.flatten().map(|e| e.path()).filter(|p| p.file_stem().is_some_and(|s| s == vm)));
        }
    }
    found
}

#[test]
fn git_commits_drive_real_vm_processes() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP git_commits_drive_real_vm_processes: {why}");
        return;
    }
    let (_registry, image) = registry_with_image();
    let repo = Repo::new();
    // The README keeps vms/ in the tree once the last manifest is deleted (a path that vanishes
    // entirely is an error, not an order to delete the fleet).
    let c1 = repo.commit(
        &[("vms/a.yaml", Some(&manifest("a", &image, "64Mi", ""))), ("vms/README.md", Some("fleet\n"))],
        "add a",
    );
    let root = tempfile::tempdir().unwrap();
    let spec = SourceSpec {
        name: "fleet".into(),
        kind: SourceKind::Git(GitSpec {
            url: repo.url(),
            reference: GitRef::Branch("main".into()),
            path: "vms".into(),
            interval: Duration::from_millis(300),
            credentials: None,
        }),
    };
    let config = daemon_config(root.path(), vec![spec], None);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let daemon = runtime.block_on(Daemon::start(config)).unwrap();
    let store = daemon.store().clone();
    let r = root.path();
    let _guard = support::daemon::KillVmsOnDrop(r);
    let status = |name: &str| store.get_vm(name).unwrap().map(|rec| rec.status);

    // Commit a VM: it runs, its console shows the guest, its status names the commit.
    wait_for("VM a running", Duration::from_secs(60), || {
        status("a").is_some_and(|s| s.phase == Phase::Running) && console(r, "a").contains(tiny_guest::IDLE_MARKER)
    });
    let first_pid = pid_of(r, "a").expect("a VMM process");
    assert_eq!(status("a").unwrap().observed_revision.as_deref(), Some(c1.as_str()));

    // Change its memory: it is recreated (a new process) from the new commit.
    let c2 = repo.commit(&[("vms/a.yaml", Some(&manifest("a", &image, "96Mi", "")))], "more memory");
    wait_for("VM a recreated", Duration::from_secs(60), || {
        status("a").is_some_and(|s| s.observed_revision.as_deref() == Some(c2.as_str()) && s.phase == Phase::Running)
    });
    let second_pid = pid_of(r, "a").expect("a new VMM process");
    assert_ne!(first_pid, second_pid);
    assert!(!Path::new(&format!("/proc/{first_pid}")).exists(), "the old process is gone");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.join("vms/a/config.json")).unwrap()).unwrap();
    assert_eq!(config["memoryMib"], 96);

    // A broken commit changes nothing and the error is recorded on the source.
    let bad = repo.commit(
        &[
            (
                "vms/a.yaml",
                Some(
                    "apiVersion: ignite.dev/v1alpha1\nkind: VM\nmetadata: {name: a}\nspec: {image: x, memory: lots}\n",
                ),
            ),
            ("vms/b.yaml", Some(&manifest("b", &image, "64Mi", ""))),
        ],
        "broken",
    );
    wait_for("the broken revision reported", Duration::from_secs(30), || {
        store.get_source_state("fleet").unwrap().and_then(|s| s.last_error).is_some_and(|e| e.contains(&bad))
    });
    let error = store.get_source_state("fleet").unwrap().unwrap().last_error.unwrap();
    assert!(error.contains("vms/a.yaml:4") && error.contains("spec.memory"), "{error}");
    assert!(store.get_vm("b").unwrap().is_none(), "nothing of the broken revision is applied");
    assert_eq!(pid_of(r, "a"), Some(second_pid), "the running VM is untouched");

    // Fix it and delete a: a and everything it owned are gone, b runs.
    repo.commit(&[("vms/a.yaml", None)], "delete a; b stays");
    wait_for("a deleted and b running", Duration::from_secs(60), || {
        store.get_vm("a").unwrap().is_none() && status("b").is_some_and(|s| s.phase == Phase::Running)
    });
    assert!(!Path::new(&format!("/proc/{second_pid}")).exists(), "a's process is gone");
    assert_eq!(leftovers(r, "a"), Vec::<PathBuf>::new(), "nothing of a is left");
    assert!(store.get_source_state("fleet").unwrap().unwrap().last_error.is_none());

    // Kill b's VMM behind the daemon's back: the restart policy (Always) brings it back.
    let b_pid = pid_of(r, "b").unwrap();
    rustix::process::kill_process(rustix::process::Pid::from_raw(b_pid).unwrap(), rustix::process::Signal::KILL)
        .unwrap();
    wait_for("b restarted", Duration::from_secs(60), || {
        status("b").is_some_and(|s| s.restarts == 1 && s.phase == Phase::Running)
            && pid_of(r, "b").is_some_and(|p| p != b_pid)
    });
    let reasons: Vec<String> = store.events_since(0, 1000).unwrap().into_iter().map(|(_, e)| e.reason).collect();
    for expected in ["Created", "Started", "Recreating", "SyncFailed", "Deleted", "Exited", "Restarted"] {
        assert!(reasons.iter().any(|r| r == expected), "no {expected} event in {reasons:?}");
    }

    // Remove everything; the daemon stops and leaves nothing behind.
    repo.commit(&[("vms/b.yaml", None)], "empty fleet");
    wait_for("fleet empty", Duration::from_secs(60), || store.list_vms().unwrap().is_empty());
    assert!(pid_of(r, "b").is_none());
    assert_eq!(leftovers(r, "b"), Vec::<PathBuf>::new());
    assert!(store.list_leases().unwrap().is_empty());
    runtime.block_on(daemon.shutdown());
}
