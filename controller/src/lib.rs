//! The ignite controller: API types and validation, the sled store, desired-state sources (git,
//! directory, Kubernetes MicroVMs), the reconciler, the VM supervisor, host networking and the
//! daemon that ties them together.

#![forbid(unsafe_code)]

pub mod api;
pub mod daemon;
pub mod failpoint;
pub mod grpc;
pub mod host;
pub mod kube;
pub mod layout;
pub mod net;
pub mod private;
pub mod reconcile;
pub mod source;
pub mod store;
pub mod supervisor;
#[cfg(feature = "test-utils")]
pub mod testing;
