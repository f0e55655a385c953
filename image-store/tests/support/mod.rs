//! Shared support for the registry integration tests: a real `docker-registry` and fixture images.
#![allow(dead_code)]

pub use image_store::testing::{fixtures, registry};

/// The error and all its sources, joined with ": " (what the CLI prints).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Files left in a directory (missing directory = none).
pub fn count_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}
