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
    /// Two VMs forward the same host port and protocol.
    #[error("revision {revision}: VM {:?} (declared in {}) forwards host port {}, which VM {:?} (owned by {}) already forwards; pick another host port or remove it there first", clash.name, clash.file, clash.port, clash.other, clash.other_owner)]
    PortConflict {
        /// The rejected revision.
        revision: String,
        /// The two VMs.
        clash: Box<PortClash>,
    },
    /// The store failed.
    #[error("store")]
    Store(#[from] StoreError),
}

/// Two VMs that would forward one host port (see [`ApplyError::PortConflict`]).
#[derive(Debug)]
pub struct PortClash {
    /// The VM asking for the port.
    pub name: String,
    /// The file declaring it.
    pub file: String,
    /// The port, `PORT/PROTOCOL`.
    pub port: String,
    /// The VM that has it.
    pub other: String,
    /// That VM's owner.
    pub other_owner: String,
}

/// Refuses `docs` if two VMs would forward one host port and protocol: two of `docs`, or one of
/// `docs` and a stored VM that stays (`stays` says which records this apply leaves in place).
fn check_host_ports(
    store: &Store,
    revision: &str,
    docs: &[(String, Vm)],
    stays: impl Fn(&crate::store::VmRecord) -> bool,
) -> Result<(), ApplyError> {
    use std::collections::HashMap;
    let declared: BTreeSet<&str> = docs.iter().map(|(_, vm)| vm.metadata.name.as_str()).collect();
    let mut taken: HashMap<(u16, api::Protocol), (String, String)> = HashMap::new();
    for record in store.list_vms()? {
        if !declared.contains(record.vm.metadata.name.as_str()) && stays(&record) {
            for port in &record.vm.spec.network.ports {
                taken.insert((port.host_port, port.protocol), (record.vm.metadata.name.clone(), record.owner.clone()));
            }
        }
    }
    for (file, vm) in docs {
        for port in &vm.spec.network.ports {
            let mine = (vm.metadata.name.clone(), "this revision".to_string());
            if let Some((other, other_owner)) = taken.insert((port.host_port, port.protocol), mine) {
                let protocol = if port.protocol == api::Protocol::Udp { "udp" } else { "tcp" };
                let clash = PortClash {
                    name: vm.metadata.name.clone(),
                    file: file.clone(),
                    port: format!("{}/{protocol}", port.host_port),
                    other,
                    other_owner,
                };
                return Err(ApplyError::PortConflict { revision: revision.to_string(), clash: Box::new(clash) });
            }
        }
    }
    Ok(())
}

/// Parses and validates every `(file, text)` of a revision without touching the store; host
/// paths and ports must be ones `policy` allows.
pub fn parse_revision<'a>(
    revision: &str,
    files: impl IntoIterator<Item = (&'a str, &'a str)>,
    policy: &api::HostPolicy,
) -> Result<Vec<(String, Vm)>, ApplyError> {
    let mut docs = Vec::new();
    let mut errors = ManifestErrors::default();
    for (file, text) in files {
        match api::load::parse_manifests_for_host(file, text, policy) {
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
    // What this owner no longer declares is pruned, so only other owners' VMs keep their ports.
    check_host_ports(store, revision, docs, |record| record.owner != owner)?;
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
    check_host_ports(store, "api", docs, |_| true)?;
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
