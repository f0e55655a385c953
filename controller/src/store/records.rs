//! The record types kept in the store.

use serde::{Deserialize, Serialize};

use crate::api::{Vm, VmStatus};

/// One VM object: what was declared, by whom, and what the controller observed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRecord {
    /// The declared object.
    pub vm: Vm,
    /// The source that owns it: `git:<source>`, `dir:<source>`, `api` or `kube`.
    pub owner: String,
    /// Bumped whenever metadata or spec change (1 for a new object).
    pub generation: u64,
    /// Observed state.
    #[serde(default)]
    pub status: VmStatus,
    /// The object is gone from its source; the reconciler removes the VM, then the record.
    #[serde(default)]
    pub deletion_requested: bool,
    /// When the object was first stored, RFC 3339.
    pub created_at: String,
    /// The store revision of the last write to this record (0 for records written before
    /// revisions were kept per record).
    #[serde(default)]
    pub revision: u64,
}

/// What [`super::Store::put_vm`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PutOutcome {
    /// The object's generation after the write.
    pub generation: u64,
    /// Metadata or spec changed (or the object is new).
    pub changed: bool,
    /// The object did not exist.
    pub created: bool,
}

/// One change to a VM record, as seen by a watcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmChange {
    /// The object.
    pub name: String,
    /// The record after the change; `None` when it was removed.
    pub record: Option<VmRecord>,
    /// The store revision of the change (for a removal read from its tombstone; 0 if unknown).
    pub revision: u64,
}

/// A blocking iterator over VM changes, from [`super::Store::watch_vms`].
pub struct VmChanges {
    pub(super) subscriber: sled::Subscriber,
    pub(super) tombstones: sled::Tree,
}

impl VmChanges {
    /// The next change, waiting without blocking a thread (for async watchers that must also
    /// notice their client going away); `None` when the store is closed.
    pub async fn next_change(&mut self) -> Option<VmChange> {
        loop {
            let event = (&mut self.subscriber).await?;
            if let Some(change) = self.decode(event) {
                return Some(change);
            }
        }
    }

    fn decode(&self, event: sled::Event) -> Option<VmChange> {
        let (key, value) = match event {
            sled::Event::Insert { key, value } => (key, Some(value)),
            sled::Event::Remove { key } => (key, None),
        };
        let name = String::from_utf8_lossy(&key).into_owned();
        match value.map(|v| serde_json::from_slice::<VmRecord>(&v)) {
            None => {
                let revision = super::tombstone_revision(&self.tombstones, &name);
                Some(VmChange { name, record: None, revision })
            }
            Some(Ok(record)) => Some(VmChange { name, revision: record.revision, record: Some(record) }),
            Some(Err(e)) => {
                tracing::warn!(vm = name, error = %e, "skipping an undecodable VM record");
                None
            }
        }
    }
}

impl Iterator for VmChanges {
    type Item = VmChange;

    fn next(&mut self) -> Option<VmChange> {
        loop {
            let event = self.subscriber.next()?;
            if let Some(change) = self.decode(event) {
                return Some(change);
            }
        }
    }
}
