//! `spec.snapshots: {every, keep}`: running VMs are snapshotted on a schedule. Scheduled snapshots
//! are named `auto-YYYYMMDD-HHMMSS`; once a VM has more than `keep` of them, the oldest go.
//! Snapshots taken by hand are never pruned. A stopped VM takes none (its disk does not change).

use std::time::{Duration, SystemTime};

use super::snapshots::{name_at, SnapshotInfo, VmSnapshots};
use crate::store::{Event, EventKind, Store};

/// The prefix of scheduled snapshots' names.
pub const PREFIX: &str = "auto-";

/// How often the daemon looks at the schedules.
pub const TICK: Duration = Duration::from_secs(2);

fn taken_at(info: &SnapshotInfo) -> Option<SystemTime> {
    humantime::parse_rfc3339(&info.created).ok()
}

/// One look at every schedule at time `now`: snapshots the running VMs whose newest scheduled
/// snapshot is older than their interval (or that have none), and prunes the oldest beyond `keep`.
/// Returns the events to record (what was taken, pruned, or failed).
pub fn run_once(
    store: &Store,
    snapshots: &dyn VmSnapshots,
    is_running: &dyn Fn(&str) -> bool,
    now: SystemTime,
) -> Vec<Event> {
    let mut events = Vec::new();
    let time = humantime::format_rfc3339_seconds(now).to_string();
    let mut event = |vm: &str, kind, reason: &str, message: String| {
        events.push(Event { object: vm.into(), kind, reason: reason.into(), message, time: time.clone() })
    };
    let records = match store.list_vms() {
        Ok(records) => records,
        Err(e) => {
            tracing::warn!(error = %e, "snapshot schedules: cannot list the VMs");
            return events;
        }
    };
    for record in records.iter().filter(|r| !r.deletion_requested) {
        let vm = record.vm.name();
        let Some(schedule) = &record.vm.spec.snapshots else { continue };
        // Validated when the manifest was accepted.
        let Ok(every) = schedule.interval() else { continue };
        if !is_running(vm) {
            continue;
        }
        let mut scheduled: Vec<SnapshotInfo> = match snapshots.list_snapshots(Some(vm)) {
            Ok(list) => list.into_iter().filter(|s| s.name.starts_with(PREFIX)).collect(),
            Err(e) => {
                event(vm, EventKind::Warning, "SnapshotFailed", format!("scheduled snapshot: {e}"));
                continue;
            }
        };
        let due = scheduled
            .iter()
            .filter_map(taken_at)
            .max()
            .is_none_or(|newest| now.duration_since(newest).unwrap_or_default() >= every);
        if due {
            let name = format!("{PREFIX}{}", name_at(&time));
            match snapshots.create_snapshot(vm, Some(&name), false) {
                Ok(info) => {
                    let message = format!(
                        "scheduled snapshot {:?} ({}, every {})",
                        info.name,
                        info.kind.as_str(),
                        schedule.every
                    );
                    event(vm, EventKind::Normal, "SnapshotTaken", message);
                    scheduled.push(info);
                }
                Err(e) => event(vm, EventKind::Warning, "SnapshotFailed", format!("scheduled snapshot: {e}")),
            }
        }
        let excess = scheduled.len().saturating_sub(schedule.keep as usize);
        for old in scheduled.iter().take(excess) {
            match snapshots.remove_snapshot(vm, &old.name) {
                Ok(()) => event(
                    vm,
                    EventKind::Normal,
                    "SnapshotPruned",
                    format!("snapshot {:?} removed: spec.snapshots keeps {}", old.name, schedule.keep),
                ),
                Err(e) => event(vm, EventKind::Warning, "SnapshotFailed", format!("pruning {:?}: {e}", old.name)),
            }
        }
    }
    events
}
