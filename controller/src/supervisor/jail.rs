//! Jailing the VMM processes the supervisor starts: one unprivileged uid per VM from a configured
//! range (recorded in the VM's run directory, which only root can read, so it survives a daemon
//! restart and is freed with the directory), one cgroup per VM, and the jail's mount point.

use std::ops::RangeInclusive;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vmm_core::jail::cgroup::{CgroupLimits, Cgroups};
use vmm_core::jail::JailConfig;
use vmm_core::VmConfig;

use super::{io_err, Result, SupervisorError};
use crate::layout::VmDir;

/// How the supervisor jails VMMs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailPolicy {
    /// The uids (and equal gids) VMs get, one per VM.
    pub uids: RangeInclusive<u32>,
    /// Memory a VMM may use beyond its guest's.
    pub vmm_memory_allowance: u64,
}

impl Default for JailPolicy {
    fn default() -> Self {
        JailPolicy { uids: DEFAULT_UIDS, vmm_memory_allowance: vmm_core::jail::DEFAULT_VMM_ALLOWANCE }
    }
}

impl JailPolicy {
    /// Splits the last `n` uids off the range for a second supervisor (the warm-start template
    /// builds), so the two never hand out the same uid: (this policy without them, the other's).
    /// `None` when the range has no more than `n` uids.
    pub fn split_off(&self, n: u32) -> Option<(JailPolicy, JailPolicy)> {
        let (start, end) = (*self.uids.start(), *self.uids.end());
        let first = end.checked_sub(n.checked_sub(1)?)?;
        if first <= start {
            return None;
        }
        let mine = JailPolicy { uids: start..=first - 1, ..self.clone() };
        Some((mine, JailPolicy { uids: first..=end, ..self.clone() }))
    }
}

/// The default uid range: above the usual subordinate-uid ranges of ordinary users.
pub const DEFAULT_UIDS: RangeInclusive<u32> = 3_000_000..=3_065_535;

/// What a VM's run directory records about its jail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JailRecord {
    pub uid: u32,
}

fn read_record(dir: &VmDir) -> Option<JailRecord> {
    serde_json::from_slice(&std::fs::read(dir.jail_record()).ok()?).ok()
}

/// VM `name`'s uid: the one it had, else the lowest one in `policy.uids` no other run directory
/// under `run_dir` holds. The caller serializes calls (the supervisor's lock).
pub(crate) fn allocate_uid(run_dir: &Path, name: &str, policy: &JailPolicy) -> Result<u32> {
    let dir = VmDir::new(run_dir, name);
    if let Some(record) = read_record(&dir).filter(|r| policy.uids.contains(&r.uid)) {
        return Ok(record.uid);
    }
    let mut taken = Vec::new();
    for entry in std::fs::read_dir(run_dir).map_err(io_err("list", run_dir))?.flatten() {
        if entry.file_name() != name {
            taken.extend(read_record(&VmDir::new(run_dir, &entry.file_name().to_string_lossy())).map(|r| r.uid));
        }
    }
    taken.sort_unstable();
    let uid = policy.uids.clone().find(|uid| taken.binary_search(uid).is_err()).ok_or_else(|| {
        SupervisorError::Jail(format!(
            "no free uid left in the jail range {}-{} ({} VMs hold one)",
            policy.uids.start(),
            policy.uids.end(),
            taken.len()
        ))
    })?;
    let path = dir.jail_record();
    crate::private::write_json_atomic(&path, &JailRecord { uid }).map_err(io_err("write", &path))?;
    Ok(uid)
}

/// The jail for VM `name` (its uid, cgroup and mount point), creating what it needs on the host.
pub(crate) fn prepare(
    run_dir: &Path,
    name: &str,
    config: &VmConfig,
    policy: &JailPolicy,
    cgroups: Option<&Cgroups>,
) -> Result<JailConfig> {
    let uid = allocate_uid(run_dir, name, policy)?;
    let limits: CgroupLimits = vmm_core::jail::limits_for(config, policy.vmm_memory_allowance);
    let dirs = match cgroups {
        Some(cgroups) => {
            cgroups.create(name, limits).map_err(|e| SupervisorError::Jail(format!("vm {name}: {e}: {}", e.source)))?
        }
        None => Vec::new(),
    };
    let root = VmDir::new(run_dir, name).jail_root();
    std::fs::create_dir_all(&root).map_err(io_err("create", &root))?;
    Ok(JailConfig::for_vm(config, uid, uid, root, dirs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_policy_hands_out_disjoint_uids() {
        let policy = JailPolicy { uids: 5000..=5009, ..JailPolicy::default() };
        let (vms, templates) = policy.split_off(4).unwrap();
        assert_eq!((vms.uids, templates.uids), (5000..=5005, 5006..=5009));
        assert!(policy.split_off(10).is_none());
        assert!(policy.split_off(0).is_none());
    }

    #[test]
    fn uids_are_unique_per_vm_kept_across_calls_and_freed_with_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let policy = JailPolicy { uids: 5000..=5002, ..JailPolicy::default() };
        for vm in ["a", "b", "c", "d"] {
            std::fs::create_dir(dir.path().join(vm)).unwrap();
        }
        assert_eq!(allocate_uid(dir.path(), "a", &policy).unwrap(), 5000);
        assert_eq!(allocate_uid(dir.path(), "b", &policy).unwrap(), 5001);
        assert_eq!(allocate_uid(dir.path(), "a", &policy).unwrap(), 5000, "a VM keeps its uid");
        assert_eq!(allocate_uid(dir.path(), "c", &policy).unwrap(), 5002);
        let err = allocate_uid(dir.path(), "d", &policy).unwrap_err().to_string();
        assert!(err.contains("no free uid left in the jail range 5000-5002"), "{err}");
        std::fs::remove_dir_all(dir.path().join("b")).unwrap();
        assert_eq!(allocate_uid(dir.path(), "d", &policy).unwrap(), 5001, "a deleted VM's uid is free again");
    }
}
