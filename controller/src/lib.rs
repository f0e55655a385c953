//! The ignite controller: API types and validation, the sled store, desired-state sources (git,
//! directory, Kubernetes), the reconciler, the VM supervisor, host networking and the gRPC server.
//!
//! Not written yet (issue "controller"): this crate is empty on purpose and exports nothing.

#![forbid(unsafe_code)]
