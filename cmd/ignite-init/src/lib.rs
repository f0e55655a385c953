//! `ignite-init`'s library: the per-VM config drive format shared with the controller ([`config`]), and the
//! pure logic the guest init applies (image config + overrides merge, user resolution: [`spec`]).
//!
//! The binary (`src/main.rs`) is PID 1 in every guest; only it touches the system.

pub mod config;
pub mod spec;
