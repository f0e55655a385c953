//! Host networking through the whole controller, inside a network namespace this test creates:
//! a VM declared with a port gets a lease, a tap on the bridge and its port forward; changing
//! the port moves the forward; deleting the VM removes tap, rules and lease.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use controller::api::Phase;
use controller::daemon::Daemon;
use controller::net::{tap_name, NetConfig};
use support::daemon::{vm_up, wait_for};
use support::fleet::{daemon_config, local_dir, manifest, registry_with_image, unavailable};
use support::netns::run_inside;

const NAME: &str = "vms_get_taps_leases_and_port_forwards_that_go_with_them";

fn web(port: &str, image: &str) -> String {
    manifest("web", image, "64Mi", &format!("  network:\n    ports: [\"{port}\"]\n"))
}

fn nat_rules() -> String {
    let out = Command::new("iptables").args(["-w", "-t", "nat", "-S", "IGNITE-DNAT"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn vms_get_taps_leases_and_port_forwards_that_go_with_them() {
    if let Some(why) = unavailable() {
        eprintln!("SKIP {NAME}: {why}");
        return;
    }
    if !run_inside("ignite-test-daemon-net", NAME) {
        return;
    }
    let (_registry, image) = registry_with_image();
    let fleet = tempfile::tempdir().unwrap();
    std::fs::write(fleet.path().join("web.yaml"), web("8080:80", &image)).unwrap();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let _guard = support::daemon::KillVmsOnDrop(r);
    let net = NetConfig { bridge: "ignbr-e2e".into(), subnet: "10.98.0.0/24".parse().unwrap(), masquerade: false };
    let sources = local_dir(fleet.path());
    let config = daemon_config(r, sources, Some(net));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let daemon = runtime.block_on(Daemon::start(config)).unwrap();
    let store = daemon.store().clone();
    let tap = tap_name("web");
    wait_for("web up with a tap on the bridge", Duration::from_secs(60), || {
        vm_up(r, "web") && store.get_vm("web").unwrap().is_some_and(|v| v.status.phase == Phase::Running)
    });
    let status = store.get_vm("web").unwrap().unwrap().status;
    assert_eq!(status.ip.as_deref(), Some("10.98.0.2"), "first address after the gateway");
    assert_eq!(status.mac.as_deref(), Some(controller::net::mac_for("web").as_str()));
    let master = std::fs::read_link(format!("/sys/class/net/{tap}/master")).unwrap();
    assert!(master.ends_with("ignbr-e2e"), "{master:?}");
    let cmdline = std::fs::read_to_string(r.join("vms/web/config.json")).unwrap();
    assert!(cmdline.contains("ip=10.98.0.2::10.98.0.1:255.255.255.0:web:eth0:off"), "guest IP set at boot: {cmdline}");
    assert!(cmdline.contains(&tap), "the VM's NIC is its tap: {cmdline}");
    let rules = nat_rules();
    let forward = rules.lines().find(|l| l.contains("--dport 8080")).unwrap_or_else(|| panic!("no forward: {rules}"));
    assert!(forward.contains("ignite:web") && forward.ends_with("--to-destination 10.98.0.2:80"), "{forward}");

    // A new port recreates the VM with the same address and moves the forward.
    std::fs::write(fleet.path().join("web.yaml"), web("9090:90", &image)).unwrap();
    wait_for("the forward moved", Duration::from_secs(60), || {
        let rules = nat_rules();
        rules.contains("--dport 9090") && !rules.contains("--dport 8080") && vm_up(r, "web")
    });
    assert_eq!(store.get_vm("web").unwrap().unwrap().status.ip.as_deref(), Some("10.98.0.2"), "the lease is kept");

    // Deleting the VM removes its tap, its rules and its lease.
    std::fs::remove_file(fleet.path().join("web.yaml")).unwrap();
    wait_for("web gone", Duration::from_secs(60), || store.get_vm("web").unwrap().is_none());
    assert!(!Path::new(&format!("/sys/class/net/{tap}")).exists(), "tap removed");
    assert!(!nat_rules().contains("ignite:"), "rules removed: {}", nat_rules());
    assert!(store.list_leases().unwrap().is_empty(), "lease released");
    runtime.block_on(daemon.shutdown());
}
