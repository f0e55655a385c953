//! The VM API: the `ignite.dev/v1alpha1` `VM` document shared by git manifests, `ignite apply`
//! and the Kubernetes custom resource, plus the status the controller keeps in its store.

pub mod quantity;
pub mod status;
pub mod types;

pub use quantity::{PortMapping, Protocol, Quantity, QuantityError};
pub use status::{Condition, ConditionStatus, ConditionType, Phase, VmStatus};
pub use types::*;
