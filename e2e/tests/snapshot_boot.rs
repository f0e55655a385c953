//! `ignite snapshot` and `ignite rollback` with a real Linux guest: the real `ignite daemon` (inside
//! a network namespace this test creates), a busybox image from a real registry, ignite-init as PID 1 and the patched guest kernel
//! on /dev/kvm. A busybox loop counts on its console and in a file on its root disk; the VM is
//! snapshotted while it runs, counts on, and is rolled back: the console goes on from the
//! snapshot's count in a new VMM (no reboot), the file holds the snapshot's value, and `ignite exec`
//! reaches the guest agent again, and its web server answers through its port forward again.
//!
//! One Linux boot (a minute or two where KVM emulates guests) and one restore (seconds).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ignite_e2e::{http_get, ignite_cmd, ignite_output, linux_test_in_netns, wait_for, Daemon, KillVmsOnDrop};

const NAME: &str = "a_linux_vm_rolled_back_to_a_snapshot_counts_on_from_it";
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);
/// The guest's loop: a count on the console and in /count (synced to the disk), every second.
/// The file is replaced by a rename, so a reader never sees it truncated and not yet written
/// (`echo > /count` is open-truncate, then write). The guest serves its /www with busybox httpd
/// beside the loop.
const COUNTER: &str =
    "httpd -p 80 -h /www; i=0; while :; do i=$((i+1)); echo $i > /count.new; busybox mv /count.new /count; \
                       sync; echo SNAP-COUNT $i; sleep 1; done";

fn counts(console: &str) -> Vec<u64> {
    console.lines().filter_map(|l| l.split("SNAP-COUNT ").nth(1)?.trim().parse().ok()).collect()
}

#[test]
fn a_linux_vm_rolled_back_to_a_snapshot_counts_on_from_it() {
    linux_test_in_netns(NAME, "ignite-e2e-snapshot", rollback);
}

fn rollback(r: &Path, kernel: &Path, image: &str) {
    let image = image.to_string();
    let _vms = KillVmsOnDrop(r);
    let _daemon = Daemon::start(r, kernel, &["--bridge", "ignbr-e2e-snap", "--subnet", "10.98.0.0/24"]);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let console = || read(&r.join("vms/counter/console.log"));
    let pid = || read(&r.join("vms/counter/pid")).split_whitespace().next().unwrap_or_default().to_string();
    let context = || format!("console:\n{}\ndaemon log:\n{}", console(), read(&r.join("daemon.log")));
    let highest = || counts(&console()).last().copied().unwrap_or(0);

    let args = ["run", "-d", &image, "--name", "counter", "--memory", "128Mi", "--size", "256Mi", "-p", "8081:80"];
    let (ok, _, err) = ignite_output(r, &[&args[..], &["--", "/bin/sh", "-c", COUNTER]].concat());
    assert!(ok, "{err}");
    let started = Instant::now();
    wait_for("the guest counting", BOOT_TIMEOUT, &context, || highest() >= 3);
    eprintln!("booted and counting after {:?}", started.elapsed());

    let before = highest();
    let taken = Instant::now();
    let (ok, out, err) = ignite_output(r, &["snapshot", "create", "counter", "s1"]);
    assert!(ok, "{err}\n{}", context());
    let after = highest();
    eprintln!("snapshot taken in {:?}: {}", taken.elapsed(), out.trim());
    assert!(out.contains("counter/s1: memory (128.0 MiB)"), "{out}");
    // Far enough past the snapshot that its count and the current one cannot be confused.
    wait_for("the guest counting on after the snapshot", Duration::from_secs(120), &context, || {
        highest() >= after + 15
    });

    let old_pid = pid();
    let reached = highest();
    let rolled = Instant::now();
    let (ok, out, err) = ignite_output(r, &["rollback", "counter", "s1"]);
    assert!(ok, "{err}\n{}", context());
    assert!(out.contains("resumes from snapshot s1"), "{out}");
    wait_for("the guest counting again in a new VMM", Duration::from_secs(120), &context, || {
        !pid().is_empty() && pid() != old_pid && !counts(&console()).is_empty()
    });
    let resumed = counts(&console());
    eprintln!(
        "rollback to the first count in {:?}: {resumed:?} (snapshot between {before} and {after}, reached {reached})",
        rolled.elapsed()
    );
    assert!(
        resumed[0] > before && resumed[0] <= after + 1,
        "the count resumes from the snapshot's ({before}..={after}), not from {reached}:\n{}",
        context()
    );
    assert!(!console().contains("Linux version"), "no reboot: the guest resumed:\n{}", context());

    // The agent answers through the reset vsock, and the file follows the count that went on from
    // the snapshot (the disk bytes themselves are checked by `controller --test vm_snapshots`).
    let mut file = None;
    for attempt in 0..2 {
        let out = ignite_cmd(r).args(["exec", "counter", "--", "cat", "/count"]).stdin(Stdio::null()).output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            file = Some(stdout.trim().parse::<u64>().unwrap_or_else(|_| panic!("cat /count said {stdout:?}")));
            break;
        }
        eprintln!("exec attempt {attempt} failed ({}): {stdout:?} {stderr:?}", out.status);
    }
    let file = file.unwrap_or_else(|| panic!("ignite exec failed after the rollback:\n{}", context()));
    let now = highest();
    assert!(
        file + 1 >= resumed[0] && file <= now + 1,
        "/count holds {file}: the count that went on from the snapshot ({}..={now}):\n{}",
        resumed[0],
        context()
    );
    // The network too: the restored guest's virtio-net device, on the same tap, serves again.
    let mut answer = String::new();
    wait_for("the guest's web server through the host port", Duration::from_secs(60), &context, || {
        answer = http_get(8081).unwrap_or_default();
        answer.contains("hello from an ignite microVM")
    });
    let (_, events, _) = ignite_output(r, &["events"]);
    assert!(events.contains("SnapshotTaken") && events.contains("RollingBack"), "{events}");

    let (ok, _, err) = ignite_output(r, &["rm", "counter"]);
    assert!(ok, "{err}");
    wait_for("counter and its snapshots removed", Duration::from_secs(60), &context, || {
        !r.join("vms/counter").exists() && !r.join("vm-snapshots/counter").exists()
    });
}
