//! Shared support for the registry integration tests: a real `docker-registry` and fixture images.
#![allow(dead_code)]

pub use image_store::testing::{fixtures, registry};

/// The error and all its sources, joined with ": " (what the CLI prints).
pub use guest_api::error_chain as chain;

/// Files left in a directory (missing directory = none).
pub fn count_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}
