//! Applying one revision of a source to the store, all or nothing: every file is parsed and
//! validated, names are checked for duplicates and for objects owned by another source, and only
//! then is anything written. Objects the source owned and no longer declares are marked for
//! deletion (a source prunes only what it owns).

use std::collections::BTreeSet;

use tracing::info;

use crate::api::{self, ManifestErrors, Vm};
use crate::store::{Store, StoreError};

/// What applying a revision changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// The applied revision.
    pub revision: String,
    /// Objects that did not exist before.
    pub created: Vec<String>,
    /// Objects whose metadata or spec changed.
    pub updated: Vec<String>,
    /// Objects declared again without a change.
    pub unchanged: Vec<String>,
    /// Objects this source owned and no longer declares: marked for deletion.
    pub pruned: Vec<String>,
}

impl ApplyReport {
    /// Every object whose desired state changed: these need a reconcile.
    pub fn touched(&self) -> impl Iterator<Item = &String> {
        self.created.iter().chain(&self.updated).chain(&self.pruned)
    }
}

/// Why a revision was not applied. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A file does not parse or validate.
    #[error("revision {revision} is invalid and was not applied:\n{errors}")]
    Invalid {
        /// The rejected revision.
        revision: String,
        /// Every problem, with file, line and field.
        errors: ManifestErrors,
    },
    /// The revision declares an object another source owns.
    #[error("revision {revision}: VM {name:?} (declared in {file}) is owned by {owner}, not {requested}; remove it there first or rename it")]
    OwnerConflict {
        /// The rejected revision.
        revision: String,
        /// The object.
        name: String,
        /// The file declaring it.
        file: String,
        /// Its current owner.
        owner: String,
        /// The source applying this revision.
        requested: String,
    },
    /// The store failed.
    #[error("store")]
    Store(#[from] StoreError),
}

/// Parses and validates every `(file, text)` of a revision without touching the store; host
/// paths must be ones `host_paths` allows.
pub fn parse_revision<'a>(
    revision: &str,
    files: impl IntoIterator<Item = (&'a str, &'a str)>,
    host_paths: &api::HostPaths,
) -> Result<Vec<(String, Vm)>, ApplyError> {
    let mut docs = Vec::new();
    let mut errors = ManifestErrors::default();
    for (file, text) in files {
        match api::load::parse_manifests_for_host(file, text, host_paths) {
            Ok(vms) => docs.extend(vms.into_iter().map(|vm| (file.to_string(), vm))),
            Err(e) => errors.extend(e),
        }
    }
    if errors.is_empty() {
        if let Err(e) = api::check_unique_names(&docs) {
            errors.extend(e);
        }
    }
    if !errors.is_empty() {
        return Err(ApplyError::Invalid { revision: revision.to_string(), errors });
    }
    Ok(docs)
}

/// Applies a parsed revision for `owner` (e.g. `git:fleet`). See the module docs.
pub fn apply_revision(
    store: &Store,
    owner: &str,
    revision: &str,
    docs: &[(String, Vm)],
) -> Result<ApplyReport, ApplyError> {
    for (file, vm) in docs {
        if let Some(existing) = store.get_vm(&vm.metadata.name)? {
            if existing.owner != owner {
                return Err(ApplyError::OwnerConflict {
                    revision: revision.to_string(),
                    name: vm.metadata.name.clone(),
                    file: file.clone(),
                    owner: existing.owner,
                    requested: owner.to_string(),
                });
            }
        }
    }
    let mut report = ApplyReport { revision: revision.to_string(), ..Default::default() };
    let declared: BTreeSet<&str> = docs.iter().map(|(_, vm)| vm.metadata.name.as_str()).collect();
    for (_, vm) in docs {
        let name = vm.metadata.name.clone();
        let outcome = store.put_vm(vm, owner, false)?;
        store.update_status(&name, |s| s.source_revision = Some(revision.to_string()))?;
        match (outcome.created, outcome.changed) {
            (true, _) => report.created.push(name),
            (false, true) => report.updated.push(name),
            (false, false) => report.unchanged.push(name),
        }
    }
    for record in store.vms_owned_by(owner)? {
        let name = record.vm.metadata.name;
        if !declared.contains(name.as_str()) && !record.deletion_requested {
            store.mark_deletion(&name)?;
            report.pruned.push(name);
        }
    }
    info!(
        owner,
        revision,
        created = report.created.len(),
        updated = report.updated.len(),
        pruned = report.pruned.len(),
        "applied revision"
    );
    Ok(report)
}

/// Stores objects applied through the API for `owner` without pruning anything (like
/// `kubectl apply`). Ownership is checked for every object before anything is written; `force`
/// takes objects over from another owner.
pub fn apply_objects(
    store: &Store,
    owner: &str,
    docs: &[(String, Vm)],
    force: bool,
) -> Result<ApplyReport, ApplyError> {
    if !force {
        for (file, vm) in docs {
            if let Some(existing) = store.get_vm(&vm.metadata.name)? {
                if existing.owner != owner {
                    return Err(ApplyError::OwnerConflict {
                        revision: "api".into(),
                        name: vm.metadata.name.clone(),
                        file: file.clone(),
                        owner: existing.owner,
                        requested: owner.to_string(),
                    });
                }
            }
        }
    }
    let mut report = ApplyReport { revision: owner.to_string(), ..Default::default() };
    for (_, vm) in docs {
        let name = vm.metadata.name.clone();
        let outcome = store.put_vm(vm, owner, force)?;
        match (outcome.created, outcome.changed) {
            (true, _) => report.created.push(name),
            (false, true) => report.updated.push(name),
            (false, false) => report.unchanged.push(name),
        }
    }
    Ok(report)
}
