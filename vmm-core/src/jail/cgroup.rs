//! Per-VM cgroups: memory, CPU quota and pids limits, on cgroup v1 (one directory per controller
//! hierarchy) or cgroup v2 (one directory in the unified hierarchy).
//!
//! VM cgroups live in `ignite/<scope>/<vm>`: on v1 under the cgroup the daemon itself is in (so the
//! VMs stay inside whatever limits the daemon was given), on v2 at the top of the hierarchy (a cgroup
//! with processes cannot enable controllers for its children). The scope keeps two daemons with
//! different roots (or a hand-started VMM) from ever sharing a VM's cgroup.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The directory holding the VMs' cgroups.
const IGNITE_DIR: &str = "ignite";
/// The v1 controllers a VM is limited by.
const V1_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// The CPU quota period, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Which cgroup interface the host offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// Separate memory, cpu and pids hierarchies.
    V1,
    /// The unified hierarchy with the memory, cpu and pids controllers.
    V2,
}

impl std::fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        })
    }
}

/// What one VM may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLimits {
    /// Guest memory plus the VMM's allowance, in bytes.
    pub memory_bytes: u64,
    /// CPUs' worth of time per period (the VM's vCPU count).
    pub cpus: u32,
    /// Threads (vCPUs, device loop, control connections).
    pub pids: u64,
}

/// A cgroup operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("cgroup: cannot {action} {}", path.display())]
pub struct CgroupError {
    /// What was being done.
    pub action: &'static str,
    /// On which file or directory.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

fn err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError {
    let path = path.to_owned();
    move |source| CgroupError { action, path, source }
}

/// The host's cgroups: the version and where VM cgroups go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroups {
    /// v1 or v2.
    pub version: CgroupVersion,
    /// Per controller (v1) or the single unified one (v2): the directory holding VM cgroups.
    parents: Vec<PathBuf>,
}

impl Cgroups {
    /// Detects the host's cgroups under [`CGROUP_ROOT`], with VM cgroups in `ignite/<scope>`; `None`
    /// when neither v2 with the needed controllers nor the v1 memory, cpu and pids hierarchies are there.
    pub fn detect(scope: &str) -> Option<Cgroups> {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        Self::detect_at(Path::new(CGROUP_ROOT), &own, scope)
    }

    /// The version of the host's cgroups, if usable.
    pub fn host_version() -> Option<CgroupVersion> {
        Self::detect("").map(|c| c.version)
    }

    fn detect_at(root: &Path, self_cgroup: &str, scope: &str) -> Option<Cgroups> {
        if is_cgroup2(root) {
            let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
            return (has("memory") && has("cpu") && has("pids"))
                .then(|| Cgroups { version: CgroupVersion::V2, parents: vec![root.join(IGNITE_DIR).join(scope)] });
        }
        let mut parents = Vec::new();
        for controller in V1_CONTROLLERS {
            let mount = root.join(controller);
            if !mount.join("cgroup.procs").exists() {
                return None;
            }
            // This process's cgroup in that hierarchy ("4:memory:/a/b").
            let own = self_cgroup
                .lines()
                .filter_map(|l| l.split(':').nth(1).zip(l.splitn(3, ':').nth(2)))
                .find(|(names, _)| names.split(',').any(|n| n == controller))
                .map_or("/", |(_, path)| path);
            parents.push(mount.join(own.trim_start_matches('/')).join(IGNITE_DIR).join(scope));
        }
        Some(Cgroups { version: CgroupVersion::V1, parents })
    }

    /// The directories of VM `name`'s cgroup (one per v1 controller, or one).
    pub fn dirs(&self, name: &str) -> Vec<PathBuf> {
        self.parents.iter().map(|p| p.join(name)).collect()
    }

    /// Creates VM `name`'s cgroup with `limits` (replacing the limits of one left from before).
    pub fn create(&self, name: &str, limits: CgroupLimits) -> Result<Vec<PathBuf>, CgroupError> {
        let quota = format!("{} {CPU_PERIOD_US}", u64::from(limits.cpus.max(1)) * CPU_PERIOD_US);
        for parent in &self.parents {
            std::fs::create_dir_all(parent).map_err(err("create", parent))?;
            if self.version == CgroupVersion::V2 {
                // The top, ignite and the scope directory all pass the controllers down.
                let ignite = parent.parent().unwrap_or(parent);
                for dir in [ignite.parent().unwrap_or(ignite), ignite, parent.as_path()] {
                    let control = dir.join("cgroup.subtree_control");
                    std::fs::write(&control, "+memory +cpu +pids").map_err(err("enable controllers in", &control))?;
                }
            }
        }
        let dirs = self.dirs(name);
        for dir in &dirs {
            match std::fs::create_dir(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(err("create", dir)(e)),
                _ => {}
            }
        }
        let memory = limits.memory_bytes.to_string();
        let files: Vec<(PathBuf, String)> = match self.version {
            CgroupVersion::V2 => vec![
                (dirs[0].join("memory.max"), memory),
                (dirs[0].join("memory.swap.max"), "0".into()),
                (dirs[0].join("cpu.max"), quota),
                (dirs[0].join("pids.max"), limits.pids.to_string()),
            ],
            CgroupVersion::V1 => {
                let (cpu_quota, cpu_period) = quota.split_once(' ').unwrap_or(("max", "100000"));
                let mut files = vec![
                    (dirs[0].join("memory.limit_in_bytes"), memory.clone()),
                    (dirs[1].join("cpu.cfs_period_us"), cpu_period.to_string()),
                    (dirs[1].join("cpu.cfs_quota_us"), cpu_quota.to_string()),
                    (dirs[2].join("pids.max"), limits.pids.to_string()),
                ];
                // Without swap accounting this file is absent; with it, swap counts too.
                let memsw = dirs[0].join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    files.push((memsw, memory));
                }
                files
            }
        };
        for (file, value) in files {
            // memory.swap.max is absent when the host has no swap accounting.
            if file.ends_with("memory.swap.max") && !file.exists() {
                continue;
            }
            std::fs::write(&file, &value).map_err(err("write", &file))?;
        }
        Ok(dirs)
    }

    /// Removes VM `name`'s cgroup (idempotent). Fails while a process is still in it.
    pub fn remove(&self, name: &str) -> Result<(), CgroupError> {
        for dir in self.dirs(name) {
            match std::fs::remove_dir(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(err("remove", &dir)(e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// The names of all VM cgroups (to sweep those of VMs that no longer exist).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .parents
            .iter()
            .filter_map(|p| std::fs::read_dir(p).ok())
            .flat_map(|d| d.flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The memory limit actually set on VM `name`'s cgroup, in bytes (`None` for none or unreadable).
    pub fn memory_limit(&self, name: &str) -> Option<u64> {
        let file = match self.version {
            CgroupVersion::V2 => "memory.max",
            CgroupVersion::V1 => "memory.limit_in_bytes",
        };
        std::fs::read_to_string(self.dirs(name).first()?.join(file)).ok()?.trim().parse().ok()
    }

    /// The pids limit actually set on VM `name`'s cgroup.
    pub fn pids_limit(&self, name: &str) -> Option<u64> {
        std::fs::read_to_string(self.dirs(name).last()?.join("pids.max")).ok()?.trim().parse().ok()
    }
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a zeroed statfs buffer filled by the call; the path is NUL-terminated.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and buffer pointers.
    let ok = unsafe { libc::statfs(c.as_ptr(), &mut buf) } == 0;
    ok && buf.f_type == CGROUP2_SUPER_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_parents_follow_the_processs_own_cgroup_per_controller() {
        let dir = tempfile::tempdir().unwrap();
        for c in V1_CONTROLLERS {
            std::fs::create_dir_all(dir.path().join(c)).unwrap();
            std::fs::write(dir.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        let own = "9:name=systemd:/\n8:pids:/\n4:memory:/api/x\n1:cpu,cpuacct:/\n0::/\n";
        let cgroups = Cgroups::detect_at(dir.path(), own, "s1").unwrap();
        assert_eq!(cgroups.version, CgroupVersion::V1);
        assert_eq!(
            cgroups.dirs("web"),
            vec![
                dir.path().join("memory/api/x/ignite/s1/web"),
                dir.path().join("cpu/ignite/s1/web"),
                dir.path().join("pids/ignite/s1/web")
            ]
        );
        std::fs::remove_file(dir.path().join("pids/cgroup.procs")).unwrap();
        assert_eq!(Cgroups::detect_at(dir.path(), own, "s1"), None, "a missing controller means no cgroups");
    }
}
