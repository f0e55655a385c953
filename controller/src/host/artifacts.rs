//! Resolving what a VM boots from: its image (local first, else pulled; pull policy IfNotPresent)
//! with the base ext4 built from it, and its kernel (a file, a stored kernel, or the default).

use std::path::{Path, PathBuf};

use image_store::{ImageIndex, ImageRecord, ImageReference, PullError, PullOptions, StorePaths};

use crate::api::KernelSpec;
use crate::reconcile::RuntimeError;

/// Where the kernel comes from when a VM names none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DefaultKernel {
    /// No default: every VM must name its kernel.
    #[default]
    None,
    /// A kernel file on the host.
    Path(PathBuf),
    /// A kernel stored under this name (`ignite kernel import`).
    Stored(String),
}

/// Registries on a loopback address are reached over plain HTTP, as Docker does.
pub fn is_loopback_registry(reference: &str) -> bool {
    let Ok(r) = ImageReference::parse(reference) else { return false };
    let host = r.registry.rsplit_once(':').map_or(r.registry.as_str(), |(h, _)| h);
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

/// The image record for `reference`: the local one if present, else pulled.
pub fn resolve_image(paths: &StorePaths, reference: &str, insecure: bool) -> Result<ImageRecord, RuntimeError> {
    let index = ImageIndex::open(paths)
        .map_err(|e| RuntimeError::transient("ImageStoreFailed", format!("image store: {e}")))?;
    if let Ok(record) = index.find(reference) {
        return Ok(record);
    }
    let options = PullOptions { insecure: insecure || is_loopback_registry(reference), ..Default::default() };
    image_store::pull_blocking(paths, reference, &options).map_err(|e| {
        let message = format!("pulling image {reference}: {}", crate::reconcile::error_chain(&e));
        match e {
            PullError::Reference(_) | PullError::ManifestUnknown { .. } => {
                RuntimeError::permanent("ImageNotFound", message)
            }
            PullError::Unreachable { .. } => RuntimeError::transient("RegistryUnreachable", message),
            _ => RuntimeError::transient("ImagePullFailed", message),
        }
    })
}

/// The image's base ext4 with `init` injected.
pub fn base_rootfs(paths: &StorePaths, image: &ImageRecord, init: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    image_store::build_base_rootfs(paths, image, init).map_err(|e| {
        let message =
            format!("building the root filesystem of {}: {}", image.manifest_digest, crate::reconcile::error_chain(&e));
        RuntimeError::transient("RootfsFailed", message)
    })
}

/// The kernel file for a VM.
pub fn resolve_kernel(paths: &StorePaths, spec: &KernelSpec, default: &DefaultKernel) -> Result<PathBuf, RuntimeError> {
    let stored = |name: &str| {
        image_store::kernel::get(paths, name).map(|k| k.path).map_err(|e| {
            RuntimeError::permanent(
                "KernelNotFound",
                format!("kernel {name:?}: {e} (import it with `ignite kernel import PATH --name {name}`)"),
            )
        })
    };
    let path = match (&spec.path, &spec.image, default) {
        (Some(path), _, _) => path.clone(),
        (None, Some(name), _) => stored(name)?,
        (None, None, DefaultKernel::Path(path)) => path.clone(),
        (None, None, DefaultKernel::Stored(name)) => stored(name)?,
        (None, None, DefaultKernel::None) => {
            return Err(RuntimeError::permanent(
                "KernelNotFound",
                "spec.kernel names no kernel and the daemon has no default kernel (--kernel)",
            ))
        }
    };
    if !path.is_file() {
        return Err(RuntimeError::permanent(
            "KernelNotFound",
            format!("kernel file {} does not exist", path.display()),
        ));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_insecure() {
        assert!(is_loopback_registry("127.0.0.1:5000/busybox:1"));
        assert!(is_loopback_registry("localhost:5000/a/b"));
        assert!(!is_loopback_registry("docker.io/library/busybox"));
        assert!(!is_loopback_registry("busybox"));
        assert!(!is_loopback_registry("::bad::"));
    }

    #[test]
    fn kernel_resolution_names_what_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = StorePaths::new(tmp.path());
        let none = resolve_kernel(&paths, &KernelSpec::default(), &DefaultKernel::None).unwrap_err();
        assert!(none.permanent && none.message.contains("--kernel"), "{none}");
        let missing = KernelSpec { path: Some("/nonexistent/vmlinux".into()), ..Default::default() };
        let err = resolve_kernel(&paths, &missing, &DefaultKernel::None).unwrap_err();
        assert!(err.message.contains("/nonexistent/vmlinux"), "{err}");
        let stored = KernelSpec { image: Some("k1".into()), ..Default::default() };
        let err = resolve_kernel(&paths, &stored, &DefaultKernel::None).unwrap_err();
        assert!(err.message.contains("ignite kernel import"), "{err}");
        let file = tmp.path().join("vmlinux");
        std::fs::write(&file, b"x").unwrap();
        let ok = resolve_kernel(&paths, &KernelSpec::default(), &DefaultKernel::Path(file.clone())).unwrap();
        assert_eq!(ok, file);
    }
}
