//! IP/MAC leases: one per VM, kept across restarts, never two VMs on one address.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::Transactional;

use super::{decode, encode, Store, StoreError, LEASES_BY_VM};

/// A VM's network identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    /// The VM.
    pub vm: String,
    /// Its IPv4 address.
    pub ip: Ipv4Addr,
    /// Its MAC address.
    pub mac: String,
}

/// Removes `vm`'s lease from both indexes inside a transaction.
pub(super) fn release_in(
    by_vm: &TransactionalTree,
    by_ip: &TransactionalTree,
    vm: &str,
) -> Result<(), ConflictableTransactionError<StoreError>> {
    if let Some(v) = by_vm.remove(vm.as_bytes())? {
        match decode::<Lease>(LEASES_BY_VM, vm.as_bytes(), &v) {
            Ok(lease) => {
                by_ip.remove(lease.ip.to_string().as_bytes())?;
            }
            Err(e) => return Err(ConflictableTransactionError::Abort(e)),
        }
    }
    Ok(())
}

impl Store {
    /// The lease of `vm`: the existing one if it has one, else the first of `candidates` nobody
    /// holds, with `mac`. Atomic: two VMs never get the same address. Durable on return.
    pub fn allocate_lease(
        &self,
        vm: &str,
        candidates: impl IntoIterator<Item = Ipv4Addr>,
        mac: &str,
    ) -> Result<Lease, StoreError> {
        if let Some(v) = self.leases_by_vm.get(vm.as_bytes())? {
            return decode(LEASES_BY_VM, vm.as_bytes(), &v);
        }
        for ip in candidates {
            let lease = Lease { vm: vm.to_string(), ip, mac: mac.to_string() };
            let taken = (&self.leases_by_vm, &self.leases_by_ip).transaction(|(by_vm, by_ip)| {
                if let Some(v) = by_vm.get(vm.as_bytes())? {
                    return Ok(Err(v)); // allocated concurrently for this VM
                }
                let key = ip.to_string();
                if by_ip.get(key.as_bytes())?.is_some() {
                    return Ok(Ok(false));
                }
                by_ip.insert(key.as_bytes(), vm.as_bytes())?;
                by_vm.insert(vm.as_bytes(), encode(&lease))?;
                Ok(Ok(true))
            })?;
            match taken {
                Ok(true) => {
                    self.flush()?;
                    return Ok(lease);
                }
                Ok(false) => continue,
                Err(existing) => return decode(LEASES_BY_VM, vm.as_bytes(), &existing),
            }
        }
        Err(StoreError::PoolExhausted { vm: vm.to_string() })
    }

    /// Frees `vm`'s lease (missing is fine). Durable on return.
    pub fn release_lease(&self, vm: &str) -> Result<(), StoreError> {
        (&self.leases_by_vm, &self.leases_by_ip).transaction(|(by_vm, by_ip)| release_in(by_vm, by_ip, vm))?;
        self.flush()
    }

    /// Every lease, sorted by VM name.
    pub fn list_leases(&self) -> Result<Vec<Lease>, StoreError> {
        self.leases_by_vm
            .iter()
            .map(|kv| kv.map_err(StoreError::from).and_then(|(k, v)| decode(LEASES_BY_VM, &k, &v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn pool(n: u8) -> impl Iterator<Item = Ipv4Addr> + Clone {
        (2..2 + n).map(|i| Ipv4Addr::new(10, 61, 0, i))
    }

    #[test]
    fn a_vm_keeps_its_lease_and_freed_addresses_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store.allocate_lease("a", pool(3), "02:aa").unwrap();
        let b = store.allocate_lease("b", pool(3), "02:bb").unwrap();
        assert_eq!((a.ip, b.ip), (Ipv4Addr::new(10, 61, 0, 2), Ipv4Addr::new(10, 61, 0, 3)));
        assert_eq!(store.allocate_lease("a", pool(3), "ignored").unwrap(), a);
        store.release_lease("a").unwrap();
        assert_eq!(store.allocate_lease("c", pool(3), "02:cc").unwrap().ip, a.ip);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.allocate_lease("b", pool(3), "x").unwrap(), b, "kept across a restart");
        store.allocate_lease("d", pool(3), "02:dd").unwrap();
        let err = store.allocate_lease("e", pool(3), "02:ee").unwrap_err();
        assert!(matches!(err, StoreError::PoolExhausted { ref vm } if vm == "e"), "{err}");
    }

    #[test]
    fn concurrent_allocations_never_share_an_address() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    (0..10)
                        .map(|i| store.allocate_lease(&format!("vm-{t}-{i}"), pool(200), "02:00").unwrap().ip)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<Ipv4Addr> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        let unique: HashSet<_> = all.iter().collect();
        assert_eq!(unique.len(), 80, "every VM has its own address");
        assert_eq!(store.list_leases().unwrap().len(), 80);
    }
}
