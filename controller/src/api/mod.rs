//! The VM API: the `ignite.dev/v1alpha1` `VM` document shared by git manifests, `ignite apply`
//! and the Kubernetes custom resource, plus the status the controller keeps in its store.

pub mod bounds;
pub mod conditions;
pub mod errors;
pub mod host_paths;
pub mod host_policy;
mod lines;
pub mod load;
pub mod quantity;
pub mod schema;
pub mod status;
pub mod types;
pub mod validate;

pub use errors::{ManifestError, ManifestErrors};
pub use host_paths::{HostPathError, HostPaths};
pub use host_policy::{HostPolicy, PortPolicy};
pub use load::{check_unique_names, parse_manifests};
pub use quantity::{PortMapping, Protocol, Quantity, QuantityError};
pub use status::{BootStatus, Condition, ConditionStatus, ConditionType, LastExit, Phase, VmStatus};
pub use types::*;
