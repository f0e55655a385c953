//! Resolving what a VM boots from: its image (local first, else pulled; pull policy IfNotPresent)
//! with the base ext4 built from it, and its kernel (a file, a stored kernel, or the default).

use std::path::{Path, PathBuf};

use image_store::{ImageIndex, ImageRecord, ImageReference, PullError, PullOptions, StorePaths};

use std::io::Read;

use crate::api::host_paths::MAX_KERNEL_FILE_BYTES;
use crate::api::{HostPaths, VmSpec};
use crate::reconcile::RuntimeError;

use super::HostConfig;

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
/// The pull is bounded by `timeouts` (the whole of it, too: a registry trickling bytes must not
/// hold this reconcile worker, and every VM queued behind it, forever).
pub fn resolve_image(
    paths: &StorePaths,
    reference: &str,
    insecure: bool,
    timeouts: image_store::pull::PullTimeouts,
) -> Result<ImageRecord, RuntimeError> {
    let index = ImageIndex::open(paths)
        .map_err(|e| RuntimeError::transient("ImageStoreFailed", format!("image store: {e}")))?;
    if let Ok(record) = index.find(reference) {
        return Ok(record);
    }
    let options = PullOptions { insecure: insecure || is_loopback_registry(reference), timeouts, ..Default::default() };
    image_store::pull_blocking(paths, reference, &options).map_err(|e| {
        let message = format!("pulling image {reference}: {}", guest_api::error_chain(&e));
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
            format!("building the root filesystem of {}: {}", image.manifest_digest, guest_api::error_chain(&e));
        RuntimeError::transient("RootfsFailed", message)
    })
}

/// The kernel file for a VM. A `kernel.path` from the manifest is read through the host's
/// allow-list and copied into the VM's private directory `dir`, so the VMM boots exactly the
/// file that was checked.
pub fn resolve_kernel(
    paths: &StorePaths,
    spec: &VmSpec,
    host: &HostConfig,
    dir: &Path,
) -> Result<PathBuf, RuntimeError> {
    let stored = |name: &str| {
        image_store::kernel::get(paths, name).map(|k| k.path).map_err(|e| {
            RuntimeError::permanent(
                "KernelNotFound",
                format!("kernel {name:?}: {e} (import it with `ignite kernel import PATH --name {name}`)"),
            )
        })
    };
    let path = match (&spec.kernel.path, &spec.kernel.image, &host.default_kernel) {
        (Some(path), _, _) => return copy_host_kernel(&host.policy.paths, path, &dir.join("vmlinux")),
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

/// Copies the manifest's `kernel.path` to `to` (mode 0600) through the allow-list.
fn copy_host_kernel(host_paths: &HostPaths, path: &Path, to: &Path) -> Result<PathBuf, RuntimeError> {
    use std::os::unix::fs::OpenOptionsExt;
    let refused = |e: &dyn std::error::Error| {
        RuntimeError::permanent("KernelNotFound", format!("spec.kernel.path: {}", guest_api::error_chain(e)))
    };
    let (file, _, _) = host_paths.open(path, MAX_KERNEL_FILE_BYTES).map_err(|e| refused(&e))?;
    let copy = || -> std::io::Result<()> {
        let mut out = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(to)?;
        std::io::copy(&mut file.take(MAX_KERNEL_FILE_BYTES), &mut out)?;
        out.sync_all()
    };
    copy().map_err(|e| {
        RuntimeError::transient("KernelCopyFailed", format!("copying {} to {}: {e}", path.display(), to.display()))
    })?;
    Ok(to.to_path_buf())
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

    fn spec(kernel: &str) -> VmSpec {
        let doc = format!(
            "apiVersion: ignite.dev/v1alpha1\nkind: VM\nmetadata: {{name: a}}\nspec:\n  image: busybox\n  kernel: {kernel}\n"
        );
        serde_yaml::from_str::<crate::api::Vm>(&doc).unwrap().spec
    }

    fn host(default_kernel: DefaultKernel, paths: HostPaths) -> HostConfig {
        HostConfig {
            init_bin: None,
            default_kernel,
            net: None,
            insecure_registries: false,
            virt_mode: Default::default(),
            policy: crate::api::HostPolicy { paths, ..Default::default() },
            pull_timeouts: Default::default(),
            warm_start: false,
            dm_pool: Default::default(),
        }
    }

    #[test]
    fn kernel_resolution_names_what_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let (paths, dir) = (StorePaths::new(tmp.path()), tmp.path());
        let none = resolve_kernel(&paths, &spec("{}"), &host(DefaultKernel::None, HostPaths::default()), dir);
        let none = none.unwrap_err();
        assert!(none.permanent && none.message.contains("--kernel"), "{none}");
        let stored =
            resolve_kernel(&paths, &spec("{image: k1}"), &host(DefaultKernel::None, HostPaths::default()), dir);
        let err = stored.unwrap_err();
        assert!(err.message.contains("ignite kernel import"), "{err}");
        let file = tmp.path().join("vmlinux-default");
        std::fs::write(&file, b"x").unwrap();
        let default = host(DefaultKernel::Path(file.clone()), HostPaths::default());
        assert_eq!(resolve_kernel(&paths, &spec("{}"), &default, dir).unwrap(), file);
    }

    #[test]
    fn a_manifest_kernel_path_is_read_only_from_allowed_directories_and_copied() {
        let tmp = tempfile::tempdir().unwrap();
        let allowed = tmp.path().join("kernels");
        let vm_dir = tmp.path().join("vm");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&vm_dir).unwrap();
        std::fs::write(allowed.join("vmlinux"), b"kernel bytes").unwrap();
        let paths = StorePaths::new(tmp.path());
        let manifest = spec(&format!("{{path: {}}}", allowed.join("vmlinux").display()));
        let closed = host(DefaultKernel::None, HostPaths::default());
        let err = resolve_kernel(&paths, &manifest, &closed, &vm_dir).unwrap_err();
        assert!(err.permanent && err.message.contains("--allow-host-path"), "{err}");
        let open = host(DefaultKernel::None, HostPaths::allow([allowed.clone()]).unwrap());
        let copied = resolve_kernel(&paths, &manifest, &open, &vm_dir).unwrap();
        assert_eq!(copied, vm_dir.join("vmlinux"));
        assert_eq!(std::fs::read(&copied).unwrap(), b"kernel bytes");
        let outside = spec("{path: /etc/hostname}");
        assert!(resolve_kernel(&paths, &outside, &open, &vm_dir).unwrap_err().message.contains("not under"));
    }
}
