//! The ignite controller: API types and validation, the sled store, desired-state sources (git,
//! directory, Kubernetes), the reconciler, the VM supervisor, host networking and the gRPC server.

#![forbid(unsafe_code)]

pub mod api;
