//! The controller's state in `sled` under `ROOT/state/`: VM objects with their status, IP/MAC
//! leases, events and source states, plus a schema version. (Image and kernel records stay as
//! JSON files in the image store, which stays usable without the controller.)
//!
//! # Consistency and durability
//! - Every write that touches more than one key (a VM and its lease, a record and the store
//!   revision, a lease's two indexes) is one sled transaction: after a crash either all of it or
//!   none of it is there.
//! - Writes that the fleet depends on (objects, deletions, leases, source revisions) are flushed
//!   to disk before the call returns, so they survive `kill -9` of the daemon. Status updates and
//!   events are flushed by sled's background flusher (every 200 ms) or the next flushed write: a
//!   crash may lose the last few of them, and the reconciler recomputes status on its next pass.

mod events;
mod leases;
mod records;
mod sources;
mod vms;

use crate::layout::RootLayout;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use events::{Event, EventKind, DEFAULT_EVENT_RETENTION};
pub use leases::Lease;
pub use records::{PutOutcome, VmChange, VmChanges, VmRecord};
pub use sources::SourceState;

/// The schema this code reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

const META: &str = "meta";
const VMS: &str = "vms";
const LEASES_BY_VM: &str = "leases_by_vm";
const LEASES_BY_IP: &str = "leases_by_ip";
const EVENTS: &str = "events";
const SOURCES: &str = "sources";
const TOMBSTONES: &str = "vm_tombstones";
const KEY_TOMBSTONE_HORIZON: &[u8] = b"tombstone_horizon";
/// Removals remembered for watchers resuming from a revision.
const MAX_TOMBSTONES: usize = 1024;
const KEY_SCHEMA: &[u8] = b"schema_version";
const KEY_REVISION: &[u8] = b"revision";

/// A store failure, naming what was being read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the database's lock.
    #[error("the state store at {path} is locked by another process: is another ignite daemon running on this root? (stop it, or give this one its own --root)")]
    Locked {
        /// The database directory.
        path: PathBuf,
    },
    /// The database could not be opened.
    #[error("cannot open the state store at {path}")]
    Open {
        /// The database directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: sled::Error,
    },
    /// The on-disk schema is newer than this binary.
    #[error("the state store at {path} has schema version {found}, this ignite understands up to {SCHEMA_VERSION}: upgrade ignite")]
    SchemaTooNew {
        /// The database directory.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// A stored value cannot be decoded.
    #[error("corrupt entry {key:?} in {tree}: {detail}")]
    Corrupt {
        /// The tree.
        tree: &'static str,
        /// The key.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// The object belongs to another source.
    #[error("VM {name:?} is owned by {owner}, not {requested}")]
    OwnerConflict {
        /// The object.
        name: String,
        /// Its owner.
        owner: String,
        /// Who tried to write it.
        requested: String,
    },
    /// No such object.
    #[error("VM {name:?} not found")]
    NotFound {
        /// The object.
        name: String,
    },
    /// Every candidate address is leased.
    #[error("no free IP address left for VM {vm:?}: every address of the subnet is leased")]
    PoolExhausted {
        /// The VM asking.
        vm: String,
    },
    /// sled failed.
    #[error("state store I/O")]
    Sled(#[from] sled::Error),
}

impl From<sled::transaction::TransactionError<StoreError>> for StoreError {
    fn from(e: sled::transaction::TransactionError<StoreError>) -> Self {
        match e {
            sled::transaction::TransactionError::Abort(e) => e,
            sled::transaction::TransactionError::Storage(e) => StoreError::Sled(e),
        }
    }
}

/// The state store. Cheap to clone; safe to share between threads.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    vms: sled::Tree,
    leases_by_vm: sled::Tree,
    leases_by_ip: sled::Tree,
    events: sled::Tree,
    sources: sled::Tree,
    tombstones: sled::Tree,
    event_retention: usize,
}

impl Store {
    /// Opens (or creates) the store under `root` ([`RootLayout::state_db`]), checking the schema version.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let path = RootLayout::new(root).state_db();
        let db = open_db(&path)?;
        let store = Store {
            meta: db.open_tree(META)?,
            vms: db.open_tree(VMS)?,
            leases_by_vm: db.open_tree(LEASES_BY_VM)?,
            leases_by_ip: db.open_tree(LEASES_BY_IP)?,
            events: db.open_tree(EVENTS)?,
            sources: db.open_tree(SOURCES)?,
            tombstones: db.open_tree(TOMBSTONES)?,
            db,
            event_retention: DEFAULT_EVENT_RETENTION,
        };
        store.check_schema(&path)?;
        Ok(store)
    }

    /// Keeps at most `n` events (the newest).
    pub fn with_event_retention(mut self, n: usize) -> Self {
        self.event_retention = n.max(1);
        self
    }

    fn check_schema(&self, path: &Path) -> Result<(), StoreError> {
        match self.meta.get(KEY_SCHEMA)? {
            None => {
                self.meta.insert(KEY_SCHEMA, &SCHEMA_VERSION.to_be_bytes())?;
                self.flush()?;
            }
            Some(v) => {
                let found = decode_u64(META, KEY_SCHEMA, &v)? as u32;
                if found > SCHEMA_VERSION {
                    return Err(StoreError::SchemaTooNew { path: path.to_path_buf(), found });
                }
                // Older schemas are migrated here, one version at a time (none exist yet).
            }
        }
        Ok(())
    }

    /// Writes everything to disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// The store revision: bumped by every write to a VM record, which records it
    /// ([`VmRecord::revision`]; removals in a tombstone).
    pub fn revision(&self) -> Result<u64, StoreError> {
        match self.meta.get(KEY_REVISION)? {
            Some(v) => decode_u64(META, KEY_REVISION, &v),
            None => Ok(0),
        }
    }
}

/// How long [`Store::open`] waits for a lock that a just-closed store still holds.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Opens the sled database, waiting up to [`LOCK_WAIT`] for its file lock: a store
/// dropped a moment ago keeps the lock until sled's flusher thread has finished, so
/// an immediate reopen in the same process (a restart, a test) would otherwise fail.
fn open_db(path: &Path) -> Result<sled::Db, StoreError> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new().path(path).flush_every_ms(Some(200)).open() {
            Ok(db) => return Ok(db),
            Err(e) if is_lock_error(&e) => {
                if Instant::now() >= deadline {
                    return Err(StoreError::Locked { path: path.to_path_buf() });
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            Err(source) => return Err(StoreError::Open { path: path.to_path_buf(), source }),
        }
    }
}

/// sled reports a held lock as an `Other` I/O error with this text (sled 0.34, config.rs).
fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock"))
}

/// The revision of the removal of `name`, 0 if no tombstone is kept.
fn tombstone_revision(tombstones: &sled::Tree, name: &str) -> u64 {
    match tombstones.get(name.as_bytes()) {
        Ok(Some(v)) => decode_u64(TOMBSTONES, name.as_bytes(), &v).unwrap_or(0),
        _ => 0,
    }
}

fn decode_u64(tree: &'static str, key: &[u8], v: &[u8]) -> Result<u64, StoreError> {
    match v.len() {
        4 => Ok(u64::from(u32::from_be_bytes(v.try_into().expect("4 bytes")))),
        8 => Ok(u64::from_be_bytes(v.try_into().expect("8 bytes"))),
        n => Err(StoreError::Corrupt {
            tree,
            key: String::from_utf8_lossy(key).into_owned(),
            detail: format!("expected a 4 or 8 byte number, found {n} bytes"),
        }),
    }
}

fn decode<T: serde::de::DeserializeOwned>(tree: &'static str, key: &[u8], v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        detail: e.to_string(),
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("store records serialize to JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_version_is_written_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.revision().unwrap(), 0);
            store.meta.insert(KEY_SCHEMA, &(SCHEMA_VERSION + 1).to_be_bytes()).unwrap();
            store.flush().unwrap();
        }
        let err = Store::open(dir.path()).err().expect("newer schema refused").to_string();
        assert!(err.contains("schema version 2") && err.contains("upgrade"), "{err}");
    }

    #[test]
    fn a_store_held_open_is_refused_as_locked_and_a_dropped_one_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let held = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().expect("second open refused");
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        assert!(err.to_string().contains("another ignite daemon"), "{err}");
        drop(held);
        // sled's flusher may still hold the lock for a moment; open waits for it.
        for _ in 0..5 {
            drop(Store::open(dir.path()).unwrap());
        }
    }
}
