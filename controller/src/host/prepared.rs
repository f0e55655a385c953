//! The per-VM record of what `create` prepared, kept as `ROOT/runtime/<vm>/prepared.json`
//! (written last, atomically, so its presence means "prepared completely").

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::layout::RuntimeDir;

/// What exists on the host for one prepared VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PreparedVm {
    /// Fingerprint of the spec it was built from.
    pub fingerprint: String,
    /// Digest of the image.
    pub image_digest: String,
    /// The writable root disk.
    pub disk: PathBuf,
    /// The read-only config drive.
    pub config_drive: PathBuf,
    /// The kernel file.
    pub kernel: PathBuf,
    /// Full kernel command line.
    pub cmdline: String,
    /// Host tap device, when networking is on.
    pub tap: Option<String>,
    /// Guest MAC address.
    pub mac: Option<String>,
    /// Guest IPv4 address.
    pub ip: Option<String>,
    /// The guest joins Kubernetes (`spec.bootstrap.kubernetes`): its Node goes with it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kubernetes_node: bool,
}

/// The directory holding one VM's prepared state.
pub fn dir(runtime_dir: &Path, vm: &str) -> RuntimeDir {
    RuntimeDir::new(runtime_dir, vm)
}

fn file(runtime_dir: &Path, vm: &str) -> PathBuf {
    dir(runtime_dir, vm).prepared()
}

/// Reads the record; `None` if the VM is not (completely) prepared.
pub fn load(runtime_dir: &Path, vm: &str) -> io::Result<Option<PreparedVm>> {
    match fs::read(file(runtime_dir, vm)) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(io::Error::other),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes the record atomically (temp file, fsync, rename).
pub fn save(runtime_dir: &Path, vm: &str, prepared: &PreparedVm) -> io::Result<()> {
    crate::private::write_json_atomic(&file(runtime_dir, vm), prepared)
}

/// Removes the VM's runtime directory (record and config drive). Missing is fine.
pub fn remove(runtime_dir: &Path, vm: &str) -> io::Result<()> {
    match fs::remove_dir_all(dir(runtime_dir, vm).path()) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Names of every VM with a runtime directory.
pub fn list(runtime_dir: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    match fs::read_dir(runtime_dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    names.push(entry.file_name().to_string_lossy().into_owned());
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_list_remove() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(load(tmp.path(), "web").unwrap(), None);
        fs::create_dir_all(dir(tmp.path(), "web").path()).unwrap();
        let p = PreparedVm {
            fingerprint: "f".into(),
            image_digest: "sha256:00".into(),
            disk: "/d".into(),
            config_drive: "/c".into(),
            kernel: "/k".into(),
            cmdline: "console=ttyS0".into(),
            tap: None,
            mac: None,
            ip: None,
            kubernetes_node: true,
        };
        save(tmp.path(), "web", &p).unwrap();
        assert_eq!(load(tmp.path(), "web").unwrap(), Some(p));
        assert_eq!(list(tmp.path()).unwrap(), ["web"]);
        remove(tmp.path(), "web").unwrap();
        remove(tmp.path(), "web").unwrap();
        assert!(list(tmp.path()).unwrap().is_empty());
    }
}
