//! Test support shared by the controller's and the end-to-end tests (feature `test-utils`): real
//! git repositories and a `git daemon`, running a test inside a network namespace it creates, and
//! driving a command on a terminal in tmux. Panics on setup failures, as test helpers do.

pub mod git;
pub mod netns;
pub mod tmux;

/// A reconciler configuration for tests on the fake runtime: millisecond backoffs and grace, and
/// no resync or stability reset during a test (an hour), with `workers` workers.
pub fn fast_reconciler_config(workers: usize) -> crate::reconcile::ReconcilerConfig {
    use std::time::Duration;
    crate::reconcile::ReconcilerConfig {
        workers,
        stop_grace: Duration::from_millis(10),
        backoff_base: Duration::from_millis(5),
        backoff_max: Duration::from_millis(50),
        resync: Duration::from_secs(3600),
        stable_after: Duration::from_secs(3600),
    }
}
