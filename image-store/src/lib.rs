//! The ignite image store: OCI pull and content store, layer unpacking, ext4 root disks, kernel
//! images and snapshotters (devicemapper, reflink, copy).
//!
//! On-disk layout under the store root ([`StorePaths`]); every file is written to a temporary name
//! and renamed into place, so a crash never leaves a half-written entry under its final name.

#![forbid(unsafe_code)]

pub mod auth;
pub mod content;
pub mod digest;
pub mod ext4;
pub mod image;
pub mod images;
pub mod import;
pub mod initramfs;
pub mod kernel;
pub mod paths;
pub mod progress;
pub mod pull;
pub mod reference;
pub mod rootfs;
pub mod snapshot;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod unpack;
pub mod whiteout;

pub use content::{ContentError, ContentStore};
pub use digest::{Digest, DigestError};
pub use ext4::{build_ext4, Ext4Error};
pub use image::{ImageRecord, Layer};
pub use images::{ImageIndex, ImageIndexError, Removal};
pub use import::{import, import_docker_archive, import_oci_layout, ImportError, ManifestError};
pub use kernel::{KernelError, KernelRecord};
pub use paths::StorePaths;
pub use progress::{ProgressFn, PullProgress};
pub use pull::{pull, pull_blocking, PullError, PullOptions};
pub use reference::{ImageReference, ReferenceError};
pub use rootfs::{build_base_rootfs, remove_base_rootfs, RootfsError};
pub use snapshot::{
    choose as choose_snapshotter, Disk, DmPoolConfig, HostOps, LinuxHostOps, SnapshotError, Snapshotter,
};
pub use unpack::{apply_layer, unpack_layers, UnpackError};
