//! Test support shared by the controller's and the end-to-end tests (feature `test-utils`): real
//! git repositories and a `git daemon`, and running a test inside a network namespace it
//! creates. Panics on setup failures, as test helpers do.

pub mod git;
pub mod netns;
