//! `ignite-init`'s library: the exec agent's server ([`agent`], its protocol is `guest_api::agent`), the
//! system calls it makes ([`sys`]), and the pure logic the guest init applies (image config + overrides merge, user resolution: [`spec`]), and the
//! Kubernetes node bootstrap run alongside the entrypoint ([`node`]: `kubeadm join` ([`join`]) and the
//! kubelet ([`kubelet`], its environment files: [`envfile`], its size-capped log: [`logfile`]),
//! relative to a root directory so it is testable, its processes started through [`children`]).
//!
//! The binary (`src/main.rs`) is PID 1 in every guest; only it mounts, signals and powers off.

pub mod agent;
pub mod children;
pub mod envfile;
pub mod join;
pub mod kubelet;
pub mod logfile;
pub mod node;
pub mod spec;
pub mod sys;

pub use guest_api::error_chain;
