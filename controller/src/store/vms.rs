//! VM records: put (with ownership and generations), status updates, deletion.

use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::Transactional;

use crate::api::conditions::now_rfc3339;
use crate::api::conditions::{self, Summary};
use crate::api::{ConditionType, Vm, VmStatus};

use super::records::{PutOutcome, VmChange, VmChanges, VmRecord};
use super::{decode, decode_u64, encode, Store, StoreError, KEY_REVISION, META, VMS};

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn bump_revision(meta: &TransactionalTree) -> TxResult<u64> {
    let current = match meta.get(KEY_REVISION)? {
        Some(v) => match decode_u64(META, KEY_REVISION, &v) {
            Ok(n) => n,
            Err(e) => return abort(e),
        },
        None => 0,
    };
    meta.insert(KEY_REVISION, &(current + 1).to_be_bytes())?;
    Ok(current + 1)
}

/// Marks `status` `Reconciling/Progressing`: the record is at `generation`, which the host has not
/// applied yet.
fn progressing(status: &mut VmStatus, generation: u64) {
    let message = format!("generation {generation} is declared; the host is applying it");
    let summary = Summary::new(status.phase, ConditionType::Reconciling, "Progressing", message);
    conditions::apply(status, &summary, &now_rfc3339());
}

/// A Ready status is about the record's generation: one the host reflects only for an older
/// generation (a reconciler pass that settled a spec replaced meanwhile) is still progressing.
fn ready_only_when_observed(record: &mut VmRecord) {
    let ready = conditions::current(&record.status).is_some_and(|(kind, _)| kind == ConditionType::Ready);
    if ready && record.status.observed_generation < record.generation {
        progressing(&mut record.status, record.generation);
    }
}

fn read(vms: &TransactionalTree, name: &str) -> TxResult<Option<VmRecord>> {
    match vms.get(name.as_bytes())? {
        Some(v) => match decode(VMS, name.as_bytes(), &v) {
            Ok(r) => Ok(Some(r)),
            Err(e) => abort(e),
        },
        None => Ok(None),
    }
}

impl Store {
    /// Stores the declared `vm` for `owner`. The generation moves only when metadata or spec
    /// change; status is kept, except that a new generation makes a looked-at status
    /// `Reconciling/Progressing` until the reconciler settles it. Refuses an object owned by
    /// another source unless `force_owner`. Durable on return.
    pub fn put_vm(&self, vm: &Vm, owner: &str, force_owner: bool) -> Result<PutOutcome, StoreError> {
        let name = vm.metadata.name.as_str();
        let outcome = (&self.vms, &self.meta).transaction(|(vms, meta)| {
            let existing = read(vms, name)?;
            let (mut record, outcome) = match existing {
                Some(old) if old.owner != owner && !force_owner => {
                    return abort(StoreError::OwnerConflict {
                        name: name.to_string(),
                        owner: old.owner,
                        requested: owner.to_string(),
                    })
                }
                Some(mut old) => {
                    let changed = old.vm != *vm || old.deletion_requested || old.owner != owner;
                    let generation = if old.vm != *vm { old.generation + 1 } else { old.generation };
                    if generation != old.generation && !old.status.conditions.is_empty() {
                        // What the status says (Ready, or a failure) is about the previous spec.
                        progressing(&mut old.status, generation);
                    }
                    let record = VmRecord {
                        vm: vm.clone(),
                        owner: owner.to_string(),
                        generation,
                        deletion_requested: false,
                        ..old
                    };
                    (record, PutOutcome { generation, changed, created: false })
                }
                None => {
                    let record = VmRecord {
                        vm: vm.clone(),
                        owner: owner.to_string(),
                        generation: 1,
                        status: VmStatus::default(),
                        deletion_requested: false,
                        created_at: now_rfc3339(),
                        revision: 0,
                    };
                    (record, PutOutcome { generation: 1, changed: true, created: true })
                }
            };
            if outcome.changed {
                record.revision = bump_revision(meta)?;
                vms.insert(name.as_bytes(), encode(&record))?;
            }
            Ok(outcome)
        })?;
        if outcome.changed {
            self.flush()?;
        }
        Ok(outcome)
    }

    /// The record of `name`, if any.
    pub fn get_vm(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        match self.vms.get(name.as_bytes())? {
            Some(v) => decode(VMS, name.as_bytes(), &v).map(Some),
            None => Ok(None),
        }
    }

    /// Every record, sorted by name.
    pub fn list_vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.vms.iter().map(|kv| kv.map_err(StoreError::from).and_then(|(k, v)| decode(VMS, &k, &v))).collect()
    }

    /// The records owned by `owner`.
    pub fn vms_owned_by(&self, owner: &str) -> Result<Vec<VmRecord>, StoreError> {
        Ok(self.list_vms()?.into_iter().filter(|r| r.owner == owner).collect())
    }

    /// Changes the status of `name` with `update` (re-run on a concurrent write, so no update is
    /// lost). A `Ready` for a generation older than the record's stays `Reconciling/Progressing`.
    /// Returns the new record.
    pub fn update_status(&self, name: &str, update: impl FnMut(&mut VmStatus)) -> Result<VmRecord, StoreError> {
        // sled may run the transaction closure again on a conflict, and wants an `Fn`.
        let update = std::cell::RefCell::new(update);
        let record = (&self.vms, &self.meta).transaction(|(vms, meta)| {
            let Some(mut record) = read(vms, name)? else {
                return abort(StoreError::NotFound { name: name.to_string() });
            };
            let before = record.status.clone();
            (update.borrow_mut())(&mut record.status);
            ready_only_when_observed(&mut record);
            if record.status != before {
                record.revision = bump_revision(meta)?;
                vms.insert(name.as_bytes(), encode(&record))?;
            }
            Ok(record)
        })?;
        Ok(record)
    }

    /// Marks `name` for deletion (its source no longer declares it). Durable on return.
    pub fn mark_deletion(&self, name: &str) -> Result<(), StoreError> {
        (&self.vms, &self.meta).transaction(|(vms, meta)| {
            let Some(mut record) = read(vms, name)? else {
                return abort(StoreError::NotFound { name: name.to_string() });
            };
            if !record.deletion_requested {
                record.deletion_requested = true;
                record.revision = bump_revision(meta)?;
                vms.insert(name.as_bytes(), encode(&record))?;
            }
            Ok(())
        })?;
        self.flush()
    }

    /// Removes the record of `name` and its lease, in one transaction. Missing is fine.
    /// Durable on return.
    pub fn remove_vm(&self, name: &str) -> Result<(), StoreError> {
        let trees = (&self.vms, &self.meta, &self.leases_by_vm, &self.leases_by_ip, &self.tombstones);
        trees.transaction(|(vms, meta, by_vm, by_ip, tombstones)| {
            // The tombstone goes in first, so a watcher that sees the removal can read its revision.
            if vms.get(name.as_bytes())?.is_some() {
                let revision = bump_revision(meta)?;
                tombstones.insert(name.as_bytes(), &revision.to_be_bytes())?;
                vms.remove(name.as_bytes())?;
            }
            super::leases::release_in(by_vm, by_ip, name)?;
            Ok(())
        })?;
        self.prune_tombstones()?;
        self.flush()
    }

    /// Every later change to VM records (blocking iterator; see [`Store::changes_since`] to
    /// resume after a reconnect).
    pub fn watch_vms(&self) -> VmChanges {
        VmChanges { subscriber: self.vms.watch_prefix(b""), tombstones: self.tombstones.clone() }
    }

    /// What changed after store revision `after`, oldest first: records written since (as they
    /// are now) and removals (from their tombstones). `None` when `after` cannot be resumed from:
    /// older than the oldest tombstone kept, or newer than the store (another store): the caller
    /// starts over from a full list.
    pub fn changes_since(&self, after: u64) -> Result<Option<Vec<VmChange>>, StoreError> {
        if after < self.tombstone_horizon()? || after > self.revision()? {
            return Ok(None);
        }
        let mut changes: Vec<VmChange> = self
            .list_vms()?
            .into_iter()
            .filter(|r| r.revision > after)
            .map(|r| VmChange { name: r.vm.metadata.name.clone(), revision: r.revision, record: Some(r) })
            .collect();
        for entry in self.tombstones.iter() {
            let (key, value) = entry?;
            let revision = decode_u64(super::TOMBSTONES, &key, &value)?;
            if revision > after {
                changes.push(VmChange { name: String::from_utf8_lossy(&key).into_owned(), record: None, revision });
            }
        }
        changes.sort_by_key(|c| c.revision);
        Ok(Some(changes))
    }

    /// Resuming from revisions below this one is impossible: tombstones up to it were pruned.
    fn tombstone_horizon(&self) -> Result<u64, StoreError> {
        match self.meta.get(super::KEY_TOMBSTONE_HORIZON)? {
            Some(v) => decode_u64(META, super::KEY_TOMBSTONE_HORIZON, &v),
            None => Ok(0),
        }
    }

    /// Keeps the newest [`super::MAX_TOMBSTONES`] tombstones. The horizon moves first, so a crash
    /// in between only makes a resume start over, never miss a removal.
    fn prune_tombstones(&self) -> Result<(), StoreError> {
        if self.tombstones.len() <= super::MAX_TOMBSTONES {
            return Ok(());
        }
        let mut all = Vec::new();
        for entry in self.tombstones.iter() {
            let (key, value) = entry?;
            all.push((decode_u64(super::TOMBSTONES, &key, &value)?, key));
        }
        all.sort();
        let excess = all.len() - super::MAX_TOMBSTONES;
        let horizon = all[excess - 1].0;
        self.meta.insert(super::KEY_TOMBSTONE_HORIZON, &horizon.to_be_bytes())?;
        for (_, key) in &all[..excess] {
            self.tombstones.remove(key)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Phase;

    fn vm(name: &str, memory: &str) -> Vm {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "ignite.dev/v1alpha1",
            "kind": "VM",
            "metadata": {"name": name},
            "spec": {"image": "busybox", "memory": memory},
        }))
        .unwrap()
    }

    #[test]
    fn generations_move_only_on_change_and_status_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let created = store.put_vm(&vm("web", "64Mi"), "git:a", false).unwrap();
        assert_eq!(created, PutOutcome { generation: 1, changed: true, created: true });
        store.update_status("web", |s| s.phase = Phase::Running).unwrap();
        let same = store.put_vm(&vm("web", "64Mi"), "git:a", false).unwrap();
        assert_eq!(same, PutOutcome { generation: 1, changed: false, created: false });
        let changed = store.put_vm(&vm("web", "128Mi"), "git:a", false).unwrap();
        assert_eq!(changed, PutOutcome { generation: 2, changed: true, created: false });
        let record = store.get_vm("web").unwrap().unwrap();
        assert_eq!(record.status.phase, Phase::Running);
        assert_eq!(record.generation, 2);
    }

    #[test]
    fn a_new_spec_turns_a_settled_status_into_progressing_until_the_host_reflects_that_generation() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_vm(&vm("web", "64Mi"), "git:a", false).unwrap();
        assert!(store.get_vm("web").unwrap().unwrap().status.conditions.is_empty(), "never looked at: no conditions");
        let ready = Summary::new(Phase::Running, ConditionType::Ready, "Running", "");
        // As the reconciler settles: the generation it applied, then Ready.
        let settle = |store: &Store, generation: u64| {
            store
                .update_status("web", |s| {
                    s.observed_generation = generation;
                    conditions::apply(s, &ready, "t1");
                })
                .unwrap()
        };
        settle(&store, 1);

        store.put_vm(&vm("web", "64Mi"), "git:a", false).unwrap();
        let current = |store: &Store| conditions::current(&store.get_vm("web").unwrap().unwrap().status);
        assert_eq!(current(&store), Some((ConditionType::Ready, "Running".into())), "same spec: still Ready");

        store.put_vm(&vm("web", "128Mi"), "git:a", false).unwrap();
        let record = store.get_vm("web").unwrap().unwrap();
        assert_eq!(current(&store), Some((ConditionType::Reconciling, "Progressing".into())));
        assert_eq!(record.status.phase, Phase::Running, "the old VM still runs");
        let progressing = record.status.conditions.iter().find(|c| c.type_ == ConditionType::Reconciling).unwrap();
        assert!(progressing.message.contains("generation 2"), "{progressing:?}");

        // A pass that started before the change settles generation 1: not Ready for generation 2.
        let stale = settle(&store, 1);
        assert_eq!(conditions::current(&stale.status), Some((ConditionType::Reconciling, "Progressing".into())));
        assert_eq!(stale.status.phase, Phase::Running);
        // A failure is shown as it is, whichever generation it is about.
        let exited = Summary::new(Phase::Failed, ConditionType::Stalled, "Exited", "exit 3");
        let failed = store.update_status("web", |s| _ = conditions::apply(s, &exited, "t2")).unwrap();
        assert_eq!(conditions::current(&failed.status), Some((ConditionType::Stalled, "Exited".into())));
        let settled = settle(&store, 2);
        assert_eq!(conditions::current(&settled.status), Some((ConditionType::Ready, "Running".into())));
    }

    #[test]
    fn ownership_is_enforced_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_vm(&vm("web", "64Mi"), "git:a", false).unwrap();
        let err = store.put_vm(&vm("web", "64Mi"), "api", false).unwrap_err();
        assert!(matches!(err, StoreError::OwnerConflict { ref owner, .. } if owner == "git:a"), "{err}");
        store.put_vm(&vm("web", "64Mi"), "api", true).unwrap();
        assert_eq!(store.get_vm("web").unwrap().unwrap().owner, "api");
        assert_eq!(store.vms_owned_by("api").unwrap().len(), 1);
        assert!(store.vms_owned_by("git:a").unwrap().is_empty());
    }

    #[test]
    fn deletion_is_marked_then_removal_takes_the_lease_too() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_vm(&vm("web", "64Mi"), "git:a", false).unwrap();
        store.allocate_lease("web", ["10.0.0.2".parse().unwrap()], "02:00:00:00:00:02").unwrap();
        store.mark_deletion("web").unwrap();
        assert!(store.get_vm("web").unwrap().unwrap().deletion_requested);
        let revision = store.revision().unwrap();
        store.remove_vm("web").unwrap();
        assert!(store.get_vm("web").unwrap().is_none());
        assert!(store.list_leases().unwrap().is_empty());
        assert!(store.revision().unwrap() > revision);
        store.remove_vm("web").unwrap();
        assert!(matches!(store.update_status("web", |_| {}), Err(StoreError::NotFound { .. })));
    }

    #[test]
    fn concurrent_status_updates_are_never_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_vm(&vm("web", "64Mi"), "git:a", false).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        store.update_status("web", |s| s.restarts += 1).unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(store.get_vm("web").unwrap().unwrap().status.restarts, 400);
    }

    #[test]
    fn watchers_see_writes_and_removals() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut changes = store.watch_vms();
        store.put_vm(&vm("web", "64Mi"), "git:a", false).unwrap();
        store.remove_vm("web").unwrap();
        let first = changes.next().unwrap();
        assert_eq!((first.name.as_str(), first.record.map(|r| r.generation)), ("web", Some(1)));
        assert_eq!(changes.next().unwrap().record, None);
    }

    #[test]
    fn a_watcher_resumes_from_a_revision_with_removals_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_vm(&vm("a", "64Mi"), "api", false).unwrap();
        store.put_vm(&vm("b", "64Mi"), "api", false).unwrap();
        let seen = store.revision().unwrap();
        assert_eq!(store.changes_since(seen).unwrap(), Some(vec![]), "nothing after the current revision");
        store.update_status("a", |s| s.phase = Phase::Running).unwrap();
        store.remove_vm("b").unwrap();
        store.put_vm(&vm("b", "96Mi"), "api", false).unwrap();
        store.put_vm(&vm("c", "64Mi"), "api", false).unwrap();
        let changes = store.changes_since(seen).unwrap().unwrap();
        let summary: Vec<(&str, bool)> = changes.iter().map(|c| (c.name.as_str(), c.record.is_some())).collect();
        assert_eq!(summary, [("a", true), ("b", false), ("b", true), ("c", true)], "in revision order");
        assert!(changes.windows(2).all(|w| w[0].revision < w[1].revision));
        assert_eq!(changes.last().unwrap().revision, store.revision().unwrap());
        // A live watcher sees the removal's revision too.
        let mut live = store.watch_vms();
        store.remove_vm("c").unwrap();
        let removal = live.next().unwrap();
        assert_eq!((removal.record, removal.revision), (None, store.revision().unwrap()));
        // A revision this store never reached (another store) cannot be resumed from.
        assert_eq!(store.changes_since(store.revision().unwrap() + 1).unwrap(), None);
    }

    #[test]
    fn old_tombstones_are_pruned_and_resuming_before_them_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in 0..super::super::MAX_TOMBSTONES + 5 {
            let name = format!("vm{i}");
            store.put_vm(&vm(&name, "64Mi"), "api", false).unwrap();
            store.remove_vm(&name).unwrap();
        }
        assert_eq!(store.tombstones.len(), super::super::MAX_TOMBSTONES);
        assert_eq!(store.changes_since(1).unwrap(), None, "removals before the horizon are forgotten");
        let recent = store.revision().unwrap() - 4;
        assert_eq!(
            store.changes_since(recent).unwrap().unwrap().len(),
            2,
            "the last two removals (their records are gone)"
        );
    }
}
