//! The store after `kill -9` at arbitrary moments: a child process (this test binary, re-run)
//! writes objects, leases, statuses and events in a loop; the parent kills it after a varying
//! number of operations, reopens the store and checks its invariants. Twenty rounds.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use controller::store::{Event, EventKind, Store};

const CHILD_ENV: &str = "IGNITE_STORE_CRASH_CHILD";

fn vm(name: &str, memory_mib: u64) -> controller::api::Vm {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "ignite.dev/v1alpha1", "kind": "VM",
        "metadata": {"name": name},
        "spec": {"image": "busybox", "memory": format!("{memory_mib}Mi")},
    }))
    .unwrap()
}

/// The writer: loops forever over the store operations the daemon uses, reporting progress.
#[test]
fn store_crash_child_writer() {
    let Ok(root) = std::env::var(CHILD_ENV) else { return };
    let store = Store::open(std::path::Path::new(&root)).unwrap();
    let pool = || (2..250).map(|i| Ipv4Addr::new(10, 0, 0, i));
    for i in 0u64.. {
        let name = format!("vm{}", i % 17);
        store.put_vm(&vm(&name, 64 + i % 5), "git:fleet", false).unwrap();
        store.allocate_lease(&name, pool(), "02:00:00:00:00:01").unwrap();
        store.update_status(&name, |s| s.restarts += 1).unwrap();
        let event = Event {
            object: name.clone(),
            kind: EventKind::Normal,
            reason: "Tick".into(),
            message: i.to_string(),
            time: String::new(),
        };
        store.append_event(&event).unwrap();
        if i % 3 == 0 {
            store.remove_vm(&format!("vm{}", (i + 5) % 17)).unwrap();
        }
        println!("{i}");
    }
}

#[test]
fn the_store_is_consistent_after_kill_9_at_any_moment() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut last_seq = 0;
    for round in 0..20u64 {
        let mut child = Command::new(&exe)
            .args(["--exact", "store_crash_child_writer", "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let wanted = 5 + (round * 37) % 90;
        for _ in 0..wanted {
            lines.next().expect("the writer is alive").unwrap();
        }
        child.kill().unwrap();
        child.wait().unwrap();

        let store = Store::open(dir.path()).unwrap();
        let vms = store.list_vms().unwrap();
        let leases = store.list_leases().unwrap();
        for lease in &leases {
            assert!(
                vms.iter().any(|v| v.vm.metadata.name == lease.vm),
                "round {round}: lease of a missing VM {}",
                lease.vm
            );
        }
        let mut ips: Vec<_> = leases.iter().map(|l| l.ip).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), leases.len(), "round {round}: two VMs share an address");
        for v in &vms {
            assert!(v.generation >= 1);
        }
        let events = store.events_since(0, usize::MAX).unwrap();
        assert!(events.windows(2).all(|w| w[0].0 < w[1].0), "round {round}: event order");
        let newest = store.last_event_seq().unwrap();
        assert!(newest >= last_seq, "round {round}: sequence numbers went backwards ({newest} < {last_seq})");
        last_seq = newest;
    }
}
