//! `ignite-init`'s library: the per-VM config drive format shared with the controller ([`config`]), and the
//! pure logic the guest init applies (image config + overrides merge, user resolution: [`spec`]), and the
//! Kubernetes join run before the entrypoint ([`join`], relative to a root directory so it is testable).
//!
//! The binary (`src/main.rs`) is PID 1 in every guest; only it mounts, signals and powers off.

pub mod agent;
pub mod config;
pub mod join;
pub mod spec;
