//! A registry that trickles bytes cannot hold the fleet: with one reconcile worker, a VM whose
//! image comes from a registry sending a byte every 100 ms (never silent long enough for the read
//! timeout) fails with a clear error once the whole-pull bound passes, and the VM queued behind
//! it on the same worker comes up.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use controller::daemon::Daemon;
use image_store::testing::registry::trickling_registry;
use support::daemon::{vm_up, wait_for, KillVmsOnDrop};
use support::fleet::{daemon_config, local_dir, manifest, registry_with_image, unavailable};

#[test]
fn a_trickling_registry_fails_its_vm_and_the_fleet_goes_on() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP a_trickling_registry_fails_its_vm_and_the_fleet_goes_on: {why}");
        return;
    }
    let (_registry, image) = registry_with_image();
    let (trickle, accepted) = trickling_registry();
    let fleet = tempfile::tempdir().unwrap();
    std::fs::write(fleet.path().join("slow.yaml"), manifest("slow", &format!("{trickle}/slow:v1"), "64Mi", ""))
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let _guard = KillVmsOnDrop(r);
    let sources = local_dir(fleet.path());
    let mut config = daemon_config(r, sources, None);
    config.reconciler.workers = 1;
    config.host.pull_timeouts.total = Duration::from_secs(3);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let daemon = runtime.block_on(Daemon::start(config)).unwrap();
    let store = daemon.store().clone();

    // The only worker is inside slow's pull; then fast is declared and queues behind it.
    wait_for("the trickling registry reached", Duration::from_secs(30), || accepted.load(Ordering::SeqCst) > 0);
    std::fs::write(fleet.path().join("fast.yaml"), manifest("fast", &image, "64Mi", "")).unwrap();
    wait_for("fast up", Duration::from_secs(90), || vm_up(r, "fast"));

    let message = |c: &controller::api::Condition| c.message.clone();
    let mut seen = String::new();
    wait_for("slow's pull error recorded", Duration::from_secs(30), || {
        let status = store.get_vm("slow").unwrap().map(|rec| rec.status).unwrap_or_default();
        seen = status.conditions.iter().map(message).collect::<Vec<_>>().join(" | ");
        seen.contains("did not finish within 3s")
    });
    assert!(seen.contains(&format!("{trickle}/slow:v1")) && seen.contains("--image-pull-timeout"), "{seen}");
    runtime.block_on(daemon.shutdown());
}
