//! Where everything lives under the store root (default `/var/lib/ignite`).

use std::path::{Path, PathBuf};

use crate::Digest;

/// Paths of the image store under one root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorePaths {
    root: PathBuf,
}

impl StorePaths {
    /// The store rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StorePaths { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Verified blobs: `blobs/sha256/<hex>`.
    pub fn blob(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Downloads in progress and other temporary files (same filesystem as the store, so renames are atomic).
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Image records (one JSON file per image, named by manifest digest).
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Base root filesystems: `rootfs/<image digest hex>.ext4`.
    pub fn base_rootfs(&self, image: &Digest) -> PathBuf {
        self.root.join("rootfs").join(format!("{}.ext4", image.hex()))
    }

    /// Kernel records and files: `kernels/<name>/`.
    pub fn kernels_dir(&self) -> PathBuf {
        self.root.join("kernels")
    }

    /// Per-VM writable disks and snapshotter state: `snapshots/<snapshotter>/`.
    pub fn snapshots_dir(&self, snapshotter: &str) -> PathBuf {
        self.root.join("snapshots").join(snapshotter)
    }
}
