//! Kernel images, stored under a name with their digest: `kernels/<name>/vmlinux`, optional
//! `kernels/<name>/modules/` and the record `kernels/<name>/kernel.json`.
//!
//! A kernel directory is assembled under [`StorePaths::tmp_dir`] and renamed into place whole, so
//! a crash never leaves a half-imported kernel under its name.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tracing::info;

use crate::unpack::{self, UnpackError};
use crate::whiteout;
use crate::{Digest, ImageRecord, StorePaths};

const RECORD_FILE: &str = "kernel.json";
const KERNEL_FILE: &str = "vmlinux";
const MODULES_DIR: &str = "modules";

/// One stored kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KernelRecord {
    /// The name it is stored and looked up under.
    pub name: String,
    /// Digest of the kernel file.
    pub digest: Digest,
    /// Size of the kernel file in bytes.
    pub size: u64,
    /// Where it came from: a local path or an image reference/digest.
    pub source: String,
    /// When it was imported, in seconds since the Unix epoch.
    pub created: u64,
    /// Whether `/lib/modules` was imported alongside (only from images).
    pub has_modules: bool,
    /// Path of the kernel file in the store.
    pub path: PathBuf,
}

/// A kernel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The name is empty, contains `/`, or is `.`/`..`.
    #[error("invalid kernel name `{0}` (must be non-empty, without `/`, not `.` or `..`)")]
    InvalidName(String),
    /// No kernel is stored under this name.
    #[error("kernel `{0}` not found")]
    NotFound(String),
    /// A kernel is already stored under this name.
    #[error("kernel `{0}` already exists (remove it first)")]
    AlreadyExists(String),
    /// The file is neither an ELF nor a bzImage.
    #[error("kernel `{name}`: {path} is not a kernel image (neither ELF nor bzImage)")]
    NotAKernel {
        /// Kernel name.
        name: String,
        /// Offending file.
        path: PathBuf,
    },
    /// The image has no `/boot/vmlinux`.
    #[error("kernel `{name}`: image {image} has no /boot/vmlinux")]
    NoKernelInImage {
        /// Kernel name.
        name: String,
        /// Image manifest digest.
        image: Digest,
    },
    /// The image's layers could not be unpacked.
    #[error("kernel `{name}`: cannot unpack image {image}")]
    Unpack {
        /// Kernel name.
        name: String,
        /// Image manifest digest.
        image: Digest,
        /// Cause.
        #[source]
        source: Box<UnpackError>,
    },
    /// A record is unreadable.
    #[error("kernel `{name}`: corrupt record {path}")]
    BadRecord {
        /// Kernel name.
        name: String,
        /// Record path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// A file system operation failed.
    #[error("kernel `{name}`: cannot {action} {path}")]
    Io {
        /// Kernel name.
        name: String,
        /// What we were doing.
        action: &'static str,
        /// Path involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(name: &str, action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> KernelError {
    let (name, path) = (name.to_string(), path.to_path_buf());
    move |source| KernelError::Io { name, action, path, source }
}

/// Checks a kernel name: it becomes a directory name in the store.
pub fn validate_name(name: &str) -> Result<(), KernelError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." || name.contains('\0') {
        return Err(KernelError::InvalidName(name.to_string()));
    }
    Ok(())
}

/// Whether `path` starts like an ELF (`\x7fELF`) or a bzImage (`HdrS` at 0x202).
pub fn is_kernel_image(path: &Path) -> io::Result<bool> {
    let mut head = Vec::with_capacity(0x206);
    std::fs::File::open(path)?.take(0x206).read_to_end(&mut head)?;
    Ok(head.starts_with(b"\x7fELF") || head.get(0x202..0x206) == Some(b"HdrS"))
}

/// Imports the local kernel file `path` as `name`.
pub fn import_file(paths: &StorePaths, path: &Path, name: &str) -> Result<KernelRecord, KernelError> {
    validate_name(name)?;
    check_free(paths, name)?;
    let work = work_dir(paths, name)?;
    let record = stage(paths, name, path, &path.display().to_string(), work.path(), false)?;
    commit(paths, name, work.path())?;
    Ok(record)
}

/// Imports `/boot/vmlinux` (and `/lib/modules/` if present) from `image` as `name`. The layers are
/// applied in order with whiteouts, so the topmost layer's kernel wins.
pub fn import_from_image(paths: &StorePaths, image: &ImageRecord, name: &str) -> Result<KernelRecord, KernelError> {
    validate_name(name)?;
    check_free(paths, name)?;
    let work = work_dir(paths, name)?;
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).map_err(io_err(name, "create", &tree))?;
    unpack::unpack_layers(paths, &image.layers, &tree).map_err(|source| KernelError::Unpack {
        name: name.to_string(),
        image: image.manifest_digest.clone(),
        source: Box::new(source),
    })?;
    let vmlinux = whiteout::resolve_in_root(&tree, Path::new("boot/vmlinux"), true).map_err(io_err(
        name,
        "resolve /boot/vmlinux in",
        &tree,
    ))?;
    if !vmlinux.is_file() {
        return Err(KernelError::NoKernelInImage { name: name.to_string(), image: image.manifest_digest.clone() });
    }
    let staged = work.path().join("kernel");
    std::fs::create_dir(&staged).map_err(io_err(name, "create", &staged))?;
    let modules = whiteout::resolve_in_root(&tree, Path::new("lib/modules"), true).map_err(io_err(
        name,
        "resolve /lib/modules in",
        &tree,
    ))?;
    let has_modules = modules.is_dir();
    if has_modules {
        let dst = staged.join(MODULES_DIR);
        // A rename within tmp/ is enough: the tree is thrown away afterwards.
        std::fs::rename(&modules, &dst).map_err(io_err(name, "move modules to", &dst))?;
    }
    let source = image.references.first().cloned().unwrap_or_else(|| image.manifest_digest.to_string());
    let record = stage(paths, name, &vmlinux, &source, &staged, has_modules)?;
    commit(paths, name, &staged)?;
    Ok(record)
}

/// All stored kernels, sorted by name. Entries that are not kernel directories are skipped.
pub fn list(paths: &StorePaths) -> Result<Vec<KernelRecord>, KernelError> {
    let dir = paths.kernels_dir();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("*", "list", &dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("*", "list", &dir))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
        if validate_name(&name).is_ok() && entry.path().join(RECORD_FILE).is_file() {
            out.push(get(paths, &name)?);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The kernel stored as `name`.
pub fn get(paths: &StorePaths, name: &str) -> Result<KernelRecord, KernelError> {
    validate_name(name)?;
    let path = paths.kernels_dir().join(name).join(RECORD_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(KernelError::NotFound(name.to_string())),
        Err(e) => return Err(io_err(name, "read", &path)(e)),
    };
    serde_json::from_slice(&bytes).map_err(|source| KernelError::BadRecord { name: name.to_string(), path, source })
}

/// Removes the kernel stored as `name` (its file, modules and record).
pub fn remove(paths: &StorePaths, name: &str) -> Result<(), KernelError> {
    validate_name(name)?;
    let dir = paths.kernels_dir().join(name);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {
            info!(kernel = name, "removed kernel");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(KernelError::NotFound(name.to_string())),
        Err(e) => Err(io_err(name, "remove", &dir)(e)),
    }
}

fn check_free(paths: &StorePaths, name: &str) -> Result<(), KernelError> {
    if paths.kernels_dir().join(name).exists() {
        return Err(KernelError::AlreadyExists(name.to_string()));
    }
    Ok(())
}

fn work_dir(paths: &StorePaths, name: &str) -> Result<tempfile::TempDir, KernelError> {
    let tmp = paths.tmp_dir();
    crate::content::work_dir(paths, "kernel").map_err(io_err(name, "create a work directory in", &tmp))
}

/// Checks and copies `kernel` into directory `staged` and writes the record there.
fn stage(
    paths: &StorePaths,
    name: &str,
    kernel: &Path,
    source: &str,
    staged: &Path,
    has_modules: bool,
) -> Result<KernelRecord, KernelError> {
    if !is_kernel_image(kernel).map_err(io_err(name, "read", kernel))? {
        return Err(KernelError::NotAKernel { name: name.to_string(), path: kernel.to_path_buf() });
    }
    let dst = staged.join(KERNEL_FILE);
    let size = std::fs::copy(kernel, &dst).map_err(io_err(name, "copy", kernel))?;
    let digest = Digest::of_file(&dst).map_err(io_err(name, "hash", &dst))?;
    let created = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let record = KernelRecord {
        name: name.to_string(),
        digest,
        size,
        source: source.to_string(),
        created,
        has_modules,
        path: paths.kernels_dir().join(name).join(KERNEL_FILE),
    };
    let json = serde_json::to_vec_pretty(&record).expect("record serializes");
    let rec = staged.join(RECORD_FILE);
    std::fs::write(&rec, json).map_err(io_err(name, "write", &rec))?;
    Ok(record)
}

/// Renames the staged kernel directory into place; fails if the name was taken meanwhile.
fn commit(paths: &StorePaths, name: &str, staged: &Path) -> Result<(), KernelError> {
    let dir = paths.kernels_dir();
    std::fs::create_dir_all(&dir).map_err(io_err(name, "create", &dir))?;
    let target = dir.join(name);
    // rename(2) onto an existing non-empty directory fails, so a concurrent import cannot be clobbered.
    std::fs::rename(staged, &target).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists | io::ErrorKind::DirectoryNotEmpty => KernelError::AlreadyExists(name.to_string()),
        _ => io_err(name, "move the kernel to", &target)(e),
    })?;
    info!(kernel = name, "imported kernel");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_names_and_magic() {
        for bad in ["", "a/b", "..", ".", "x\0"] {
            assert!(matches!(validate_name(bad), Err(KernelError::InvalidName(_))), "{bad:?}");
        }
        validate_name("6.1-lts").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let elf = dir.path().join("elf");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01rest").unwrap();
        assert!(is_kernel_image(&elf).unwrap());
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let bzimage = dir.path().join("bz");
        std::fs::write(&bzimage, bz).unwrap();
        assert!(is_kernel_image(&bzimage).unwrap());
        let text = dir.path().join("text");
        std::fs::write(&text, b"#!/bin/sh\n").unwrap();
        assert!(!is_kernel_image(&text).unwrap());
    }
}
