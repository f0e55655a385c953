//! Test support shared by every crate's integration tests (feature `test-utils`): a real
//! `docker-registry` on 127.0.0.1, fixture images built in Rust, and loop-mounted filesystems. Panics on setup failures,
//! as test helpers do.

pub mod fixtures;
pub mod mount;
pub mod registry;
