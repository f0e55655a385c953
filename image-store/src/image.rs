//! What the store knows about a pulled or imported image: the shared record every part reads.

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
    pub config: GuestImageConfig,
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

/// The parts of the OCI image configuration the guest's init applies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GuestImageConfig {
    /// `Entrypoint`.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=value`.
    #[serde(default)]
    pub env: Vec<String>,
    /// `WorkingDir`.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `User` (`name`, `uid`, `uid:gid`).
    #[serde(default)]
    pub user: Option<String>,
}
