//! Shared support for the controller's integration tests.
#![allow(dead_code)]

pub mod netns;
