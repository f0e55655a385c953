//! The ignite image store: OCI pull and content store, layer unpacking, ext4 root disks, kernel
//! images and snapshotters (devicemapper, reflink, copy).
//!
//! On-disk layout under the store root ([`StorePaths`]); every file is written to a temporary name
//! and renamed into place, so a crash never leaves a half-written entry under its final name.

#![forbid(unsafe_code)]

pub mod digest;
pub mod image;
pub mod paths;

pub use digest::{Digest, DigestError};
pub use image::{GuestImageConfig, ImageRecord, Layer};
pub use paths::StorePaths;
