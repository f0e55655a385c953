//! Kubernetes: the `MicroVM` custom resource and the controller that runs the MicroVMs scheduled
//! to this host through the same store and reconciler as git (`ignite daemon --kube`).

pub mod access;
pub mod bootstrap;
pub mod client;
pub mod controller;
pub mod crd;
pub mod errors;
pub mod nodes;
pub mod scope;
pub mod select;
pub mod status;

pub use controller::{Context, DeletedVm, DeletionHook, KubeSettings};
pub use crd::{MicroVM, MicroVmSpec};
pub use errors::KubeError;
pub use select::LabelSelector;

#[cfg(test)]
pub(crate) mod mock;
