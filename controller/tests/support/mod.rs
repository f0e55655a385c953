//! Shared support for the controller's integration tests.
#![allow(dead_code)]

pub mod daemon;
pub mod git;
pub mod netns;
pub mod tiny_guest;
