//! What the store knows about a pulled or imported image: the shared record every part reads.

use guest_api::image::ImageConfig;
use serde::{Deserialize, Serialize};

use crate::Digest;

/// One image in the store, written by pull/import and read by the rootfs builder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ImageRecord {
    /// The references that name this image (e.g. `127.0.0.1:5000/busybox:latest`).
    pub references: Vec<String>,
    /// Digest of the linux/amd64 image manifest: the image's identity.
    pub manifest_digest: Digest,
    /// Digest of the image configuration blob.
    pub config_digest: Digest,
    /// Layers, bottom first; every blob is in the content store.
    pub layers: Vec<Layer>,
    /// What the guest init needs from the image configuration.
    pub config: ImageConfig,
    /// Total compressed size of the layers in bytes.
    pub size: u64,
}

/// One layer blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Layer {
    /// Blob digest (of the compressed bytes, as in the manifest).
    pub digest: Digest,
    /// OCI or Docker media type: tar, tar+gzip (tar+zstd is rejected with a clear error).
    pub media_type: String,
    /// Compressed size in bytes.
    pub size: u64,
}
