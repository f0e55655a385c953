//! Pull progress, reported through a callback the CLI and the gRPC API can both use.

use std::sync::{Arc, Mutex};

/// A snapshot of a pull's progress. Layers already in the store count as done at once, so
/// `bytes_downloaded` (network bytes of this pull) can be smaller than `bytes_done`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PullProgress {
    /// Layer bytes present so far (already stored or downloaded).
    pub bytes_done: u64,
    /// Total compressed size of the image's layers.
    pub bytes_total: u64,
    /// Bytes fetched from the registry by this pull (layers and config).
    pub bytes_downloaded: u64,
    /// Layers present so far.
    pub layers_done: usize,
    /// Number of layers.
    pub layers_total: usize,
}

/// The callback type: called often (per received chunk), so it must be cheap.
pub type ProgressFn = Arc<dyn Fn(PullProgress) + Send + Sync>;

/// Shared progress of one pull, updated by concurrent downloads.
#[derive(Clone, Default)]
pub(crate) struct ProgressTracker {
    state: Arc<Mutex<PullProgress>>,
    callback: Option<ProgressFn>,
}

impl ProgressTracker {
    pub(crate) fn new(callback: Option<ProgressFn>, bytes_total: u64, layers_total: usize) -> Self {
        let state = PullProgress { bytes_total, layers_total, ..Default::default() };
        ProgressTracker { state: Arc::new(Mutex::new(state)), callback }
    }

    /// Applies `f` and reports the new state.
    pub(crate) fn update(&self, f: impl FnOnce(&mut PullProgress)) {
        let snapshot = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut s);
            *s
        };
        if let Some(cb) = &self.callback {
            cb(snapshot);
        }
    }

    /// The current state.
    pub(crate) fn get(&self) -> PullProgress {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
