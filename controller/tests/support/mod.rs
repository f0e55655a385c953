//! Shared support for the controller's integration tests.
#![allow(dead_code, unused_imports)]

pub mod daemon;
pub mod fleet;
pub mod supervised;
pub use controller::testing::{git, netns};
pub mod tiny_guest;
pub mod tls;
