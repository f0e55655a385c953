//! The ignite image store: OCI pull and content store, layer unpacking, ext4 root disks, kernel
//! images and snapshotters (devicemapper, reflink, copy).
//!
//! Not written yet (issue "image-store"): this crate is empty on purpose and exports nothing.

#![forbid(unsafe_code)]
