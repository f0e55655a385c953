//! `ignite-init`'s library: the per-VM config drive format shared with the controller.

pub mod config;
