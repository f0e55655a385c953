//! Crash points for crash-consistency tests: when `IGNITE_CRASH_AT` names a point, the process
//! aborts there (like `kill -9`: no destructors, no cleanup), so tests can prove that the next
//! daemon repairs whatever the crash left. Unset in normal use; checking costs one env lookup.

/// The environment variable naming the crash point.
pub const ENV: &str = "IGNITE_CRASH_AT";

/// Every crash point, in the order a VM's life reaches them.
pub const POINTS: &[&str] = &[
    "create:after-disk",
    "create:after-network",
    "create:after-config-drive",
    "start:after-spawn",
    "delete:after-process",
    "delete:after-disk",
];

/// The crash points of taking a VM snapshot (reached only when one is asked for).
pub const SNAPSHOT_POINTS: &[&str] = &["snapshot:after-memory", "snapshot:before-publish"];

/// Aborts the process if `IGNITE_CRASH_AT` is `point`.
pub fn hit(point: &str) {
    debug_assert!(POINTS.contains(&point) || SNAPSHOT_POINTS.contains(&point), "unknown crash point {point}");
    if std::env::var(ENV).is_ok_and(|p| p == point) {
        eprintln!("ignite: crashing at {point} ({ENV})");
        std::process::abort();
    }
}
