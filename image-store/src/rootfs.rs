//! Base root filesystems: one read-only ext4 per image manifest digest, shared by every VM of
//! that image (snapshotters give each VM its own writable copy).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tracing::info;

use crate::ext4::{self, Ext4Error};
use crate::unpack::{self, UnpackError};
use crate::whiteout;
use crate::{Digest, ImageRecord, StorePaths};

pub use guest_api::image::{IMAGE_CONFIG_PATH as CONFIG_PATH, INIT_PATH};
/// Mount points the guest init needs, created when the image lacks them.
const MOUNT_POINTS: [&str; 5] = ["dev", "proc", "sys", "run", "tmp"];

/// Building or removing a base root filesystem failed.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A layer could not be unpacked.
    #[error("cannot unpack image {image}")]
    Unpack {
        /// Image manifest digest.
        image: Digest,
        /// Cause.
        #[source]
        source: Box<UnpackError>,
    },
    /// The ext4 image could not be built.
    #[error("cannot build the root filesystem of image {image}")]
    Ext4 {
        /// Image manifest digest.
        image: Digest,
        /// Cause.
        #[source]
        source: Box<Ext4Error>,
    },
    /// A file system operation on the store failed.
    #[error("cannot {action} {path}")]
    Io {
        /// What we were doing.
        action: &'static str,
        /// Path involved.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RootfsError {
    let path = path.to_path_buf();
    move |source| RootfsError::Io { action, path, source }
}

/// Returns the base ext4 of `image`, building it if needed: layers unpacked in order, the init
/// binary (if given) at `/sbin/ignite-init` (0755), the guest config at `/etc/ignite/image.json`,
/// and mount points `/dev /proc /sys /run /tmp`. Idempotent: an existing base is reused. The
/// build happens in a temporary directory under [`StorePaths::tmp_dir`] and the finished image
/// is renamed into place last, so a crash never leaves a half-built base under its final name.
pub fn build_base_rootfs(paths: &StorePaths, image: &ImageRecord, init: Option<&Path>) -> Result<PathBuf, RootfsError> {
    let target = paths.base_rootfs(&image.manifest_digest);
    if target.is_file() {
        return Ok(target);
    }
    let tmp_root = paths.tmp_dir();
    // Dropped (and removed) on every error path; a crash leaves it in tmp/ for the next sweep.
    let work = crate::content::work_dir(paths, "rootfs").map_err(io_err("create a work directory in", &tmp_root))?;
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).map_err(io_err("create", &tree))?;
    unpack::unpack_layers(paths, &image.layers, &tree)
        .map_err(|source| RootfsError::Unpack { image: image.manifest_digest.clone(), source: Box::new(source) })?;
    add_guest_files(&tree, image, init)?;
    let staged = work.path().join("rootfs.ext4");
    ext4::build_ext4(&tree, &staged, "ignite-root")
        .map_err(|source| RootfsError::Ext4 { image: image.manifest_digest.clone(), source: Box::new(source) })?;
    let dir = target.parent().expect("base rootfs path has a parent");
    std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    std::fs::rename(&staged, &target).map_err(io_err("move the built image to", &target))?;
    info!(image = %image.manifest_digest, path = %target.display(), "built base root filesystem");
    Ok(target)
}

/// Removes the base ext4 of image `image`. Returns false if there was none (idempotent).
pub fn remove_base_rootfs(paths: &StorePaths, image: &Digest) -> Result<bool, RootfsError> {
    let path = paths.base_rootfs(image);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("remove", &path)(e)),
    }
}

/// Adds what the guest needs on top of the image's own files. Paths are resolved inside the
/// tree, since the image may have made e.g. `/sbin` a symlink.
fn add_guest_files(tree: &Path, image: &ImageRecord, init: Option<&Path>) -> Result<(), RootfsError> {
    for dir in MOUNT_POINTS {
        let path = whiteout::resolve_in_root(tree, Path::new(dir), true).map_err(io_err("resolve", tree))?;
        if !path.exists() {
            make_dirs(&path)?;
            if dir == "tmp" {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o1777))
                    .map_err(io_err("chmod", &path))?;
            }
        }
    }
    if let Some(init) = init {
        let dst = place(tree, INIT_PATH)?;
        std::fs::copy(init, &dst).map_err(io_err("copy the init binary from", init))?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", &dst))?;
    }
    let dst = place(tree, CONFIG_PATH)?;
    let json = serde_json::to_vec_pretty(&image.config).expect("config serializes");
    std::fs::write(&dst, json).map_err(io_err("write", &dst))?;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644)).map_err(io_err("chmod", &dst))?;
    Ok(())
}

/// Creates `dir` and its missing ancestors with mode 0755 whatever the umask, so the image does
/// not depend on the environment of the process that built it.
fn make_dirs(dir: &Path) -> Result<(), RootfsError> {
    let missing: Vec<&Path> = dir.ancestors().take_while(|p| std::fs::symlink_metadata(p).is_err()).collect();
    for path in missing.into_iter().rev() {
        std::fs::create_dir(path).map_err(io_err("create", path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", path))?;
    }
    Ok(())
}

/// Resolves `rel` in the tree, creates its parent, and clears whatever the image had there.
fn place(tree: &Path, rel: &str) -> Result<PathBuf, RootfsError> {
    let dst = whiteout::resolve_in_root(tree, Path::new(rel), false).map_err(io_err("resolve", tree))?;
    let parent = dst.parent().expect("resolved path is below the tree");
    make_dirs(parent)?;
    whiteout::remove_any(&dst).map_err(io_err("replace", &dst))?;
    Ok(dst)
}
