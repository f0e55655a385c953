//! The reconciler: level-triggered, idempotent convergence of the store's desired VMs with what
//! runs on the host. [`decide`] is the pure decision, [`Reconciler`] runs it on worker threads
//! with backoff. (Desired state comes in through [`crate::source::apply`].)

pub mod decide;
#[cfg(any(test, feature = "test-utils"))]
pub mod fake;
pub mod queue;
pub mod reconciler;
pub mod runtime;

pub use decide::{decide, DesiredView, Settled, Step};
pub use queue::{Backoff, WorkQueue};
pub use reconciler::{Outcome, ReconcileError, Reconciler, ReconcilerConfig};
pub use runtime::{Actual, Exit, Prepared, Runtime, RuntimeError, Started};
