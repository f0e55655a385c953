//! Polling a source: on an interval and on demand, emitting only what changed (a new revision,
//! a new error, an error cleared), with backoff while syncs fail.

use std::time::Duration;

use tokio::sync::mpsc;
use tracing::debug;

use super::{Snapshot, Source, SourceError};

/// What a poll found.
#[derive(Debug)]
pub enum SyncOutcome {
    /// A revision not seen before (or the first one).
    Changed(Snapshot),
    /// The sync failed; the previous revision stays applied.
    Failed(SourceError),
}

/// Polls `source` every `interval` (and whenever `trigger` receives), on a blocking thread.
/// The returned channel gets a [`SyncOutcome`] when the revision changes or a sync fails (a
/// repeated identical failure is reported once). Ends when the receiver is dropped.
pub fn spawn_poller(
    source: Box<dyn Source>,
    interval: Duration,
    trigger: mpsc::Receiver<()>,
) -> mpsc::Receiver<SyncOutcome> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let source = std::sync::Arc::new(std::sync::Mutex::new(source));
        let mut last_revision: Option<String> = None;
        let mut last_error: Option<String> = None;
        let mut failures = 0u32;
        let mut trigger = Some(trigger);
        loop {
            let s = source.clone();
            let result = tokio::task::spawn_blocking(move || s.lock().unwrap_or_else(|p| p.into_inner()).sync()).await;
            let outcome = match result {
                Ok(Ok(snapshot)) => {
                    failures = 0;
                    last_error = None;
                    if last_revision.as_deref() == Some(snapshot.revision.as_str()) {
                        None
                    } else {
                        last_revision = Some(snapshot.revision.clone());
                        Some(SyncOutcome::Changed(snapshot))
                    }
                }
                Ok(Err(e)) => {
                    failures += 1;
                    let text = guest_api::error_chain(&e);
                    if last_error.as_deref() == Some(text.as_str()) {
                        None
                    } else {
                        last_error = Some(text);
                        // An error then a recovery to the same revision must re-announce it.
                        last_revision = None;
                        Some(SyncOutcome::Failed(e))
                    }
                }
                Err(join) => {
                    tracing::error!(error = %join, "source sync panicked");
                    None
                }
            };
            if let Some(outcome) = outcome {
                if tx.send(outcome).await.is_err() {
                    return;
                }
            }
            let wait =
                if failures == 0 { interval } else { (interval / 4).max(Duration::from_secs(1)) * failures.min(4) };
            match trigger.as_mut() {
                Some(t) => tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    got = t.recv() => if got.is_none() {
                        debug!("trigger channel closed; polling on the interval only");
                        trigger = None;
                    }
                },
                None => tokio::time::sleep(wait).await,
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}
