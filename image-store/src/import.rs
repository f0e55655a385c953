//! Import without a registry: an OCI image layout directory or a `docker save` tarball.
//!
//! Also holds the manifest handling shared with [`mod@crate::pull`]: parsing manifests and indexes,
//! choosing linux/amd64, rejecting unsupported layer types and building the [`ImageRecord`].

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::content::{ContentError, ContentStore};
use crate::images::{ImageIndex, ImageIndexError};
use crate::reference::ImageReference;
use guest_api::image::ImageConfig;

use crate::{Digest, ImageRecord, Layer, StorePaths};

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest (schema 2) media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker uncompressed layer media type (what `docker save` holds).
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Layer media types the unpacker handles: plain tar and gzip-compressed tar.
pub const SUPPORTED_LAYERS: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    DOCKER_LAYER_TAR,
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// A manifest, index or image config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not valid JSON of the expected shape.
    #[error("manifest {digest} is not valid")]
    Parse {
        /// The document's digest.
        digest: Digest,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// An image config that is not valid JSON.
    #[error("image config {digest} is not valid")]
    Config {
        /// The config's digest.
        digest: Digest,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A descriptor whose digest is not sha256.
    #[error("manifest {manifest} refers to unsupported digest `{digest}`")]
    BadDigest {
        /// The manifest.
        manifest: Digest,
        /// The bad digest string.
        digest: String,
    },
    /// A manifest without config or layers.
    #[error("manifest {0} is not an image manifest (no config)")]
    NotAnImage(Digest),
    /// A layer media type we cannot unpack.
    #[error("layer {digest} has unsupported media type {media_type} (only tar and tar+gzip layers are supported)")]
    UnsupportedLayer {
        /// The layer.
        digest: Digest,
        /// Its media type.
        media_type: String,
    },
    /// An index without a linux/amd64 image.
    #[error("image index {0} has no linux/amd64 manifest")]
    NoAmd64(Digest),
}

#[derive(Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub media_type: Option<String>,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

#[derive(Deserialize, Debug, Clone)]
pub(crate) struct Platform {
    pub architecture: String,
    pub os: String,
}

/// An image manifest or an index (which has `manifests`).
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ManifestDoc {
    #[serde(default)]
    pub media_type: Option<String>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
}

impl ManifestDoc {
    pub(crate) fn parse(bytes: &[u8], digest: &Digest) -> Result<Self, ManifestError> {
        serde_json::from_slice(bytes).map_err(|source| ManifestError::Parse { digest: digest.clone(), source })
    }

    pub(crate) fn is_index(&self) -> bool {
        self.manifests.is_some() || matches!(self.media_type.as_deref(), Some(OCI_INDEX) | Some(DOCKER_MANIFEST_LIST))
    }

    /// The linux/amd64 entry of an index; a single entry without platform is taken as it is.
    pub(crate) fn select_amd64(&self, digest: &Digest) -> Result<(Digest, u64), ManifestError> {
        let entries = self.manifests.as_deref().unwrap_or_default();
        let chosen = entries
            .iter()
            .find(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64"))
            .or_else(|| match entries {
                [only] if only.platform.is_none() => Some(only),
                _ => None,
            })
            .ok_or_else(|| ManifestError::NoAmd64(digest.clone()))?;
        Ok((descriptor_digest(chosen, digest)?, chosen.size))
    }

    /// Config digest and layers of an image manifest, rejecting layer types we cannot unpack.
    pub(crate) fn image_parts(&self, digest: &Digest) -> Result<(Digest, Vec<Layer>), ManifestError> {
        let config = self.config.as_ref().ok_or_else(|| ManifestError::NotAnImage(digest.clone()))?;
        let config_digest = descriptor_digest(config, digest)?;
        let mut layers = Vec::new();
        for l in &self.layers {
            let layer_digest = descriptor_digest(l, digest)?;
            let media_type = l.media_type.clone().unwrap_or_default();
            if !SUPPORTED_LAYERS.contains(&media_type.as_str()) {
                return Err(ManifestError::UnsupportedLayer { digest: layer_digest, media_type });
            }
            layers.push(Layer { digest: layer_digest, media_type, size: l.size });
        }
        Ok((config_digest, layers))
    }
}

fn descriptor_digest(d: &Descriptor, manifest: &Digest) -> Result<Digest, ManifestError> {
    d.digest.parse().map_err(|_| ManifestError::BadDigest { manifest: manifest.clone(), digest: d.digest.clone() })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ConfigBody {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize, Default)]
struct ImageConfigJson {
    #[serde(default)]
    config: Option<ConfigBody>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize, Default)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// The guest-relevant parts of an image configuration blob.
pub(crate) fn guest_config(bytes: &[u8], digest: &Digest) -> Result<ImageConfig, ManifestError> {
    let parsed: ImageConfigJson =
        serde_json::from_slice(bytes).map_err(|source| ManifestError::Config { digest: digest.clone(), source })?;
    let c = parsed.config.unwrap_or_default();
    Ok(ImageConfig {
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        env: c.env.unwrap_or_default(),
        working_dir: c.working_dir.filter(|w| !w.is_empty()),
        user: c.user.filter(|u| !u.is_empty()),
    })
}

/// Builds the record once manifest, config and layers are all in `store`.
pub(crate) fn build_record(
    store: &ContentStore,
    references: Vec<String>,
    manifest_digest: Digest,
    config_digest: Digest,
    layers: Vec<Layer>,
) -> Result<ImageRecord, ImportError> {
    let config_bytes = store.read(&config_digest)?;
    let config = guest_config(&config_bytes, &config_digest)?;
    let size = layers.iter().map(|l| l.size).sum();
    Ok(ImageRecord { references, manifest_digest, config_digest, layers, config, size })
}

/// An import failure.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The source is not an OCI layout or a docker-save tarball.
    #[error("{path} is not an OCI image layout or docker-save tarball: {reason}")]
    NotAnImage {
        /// The source.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// A file of the source cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A metadata file is not valid JSON.
    #[error("{path} is not valid")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A docker-save layer does not match the config's diff_id.
    #[error("layer {name} in {path} has digest {actual}, expected {expected}")]
    LayerMismatch {
        /// The tarball.
        path: PathBuf,
        /// The layer's file name in the tarball.
        name: String,
        /// What the config says.
        expected: String,
        /// What the bytes hash to.
        actual: Digest,
    },
    /// A reference given for the image is invalid.
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
    /// A manifest or config is unusable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Storing a blob failed (includes digest mismatches).
    #[error(transparent)]
    Content(#[from] ContentError),
    /// Writing the record failed.
    #[error(transparent)]
    Index(#[from] ImageIndexError),
}

fn read_file(path: &Path) -> Result<Vec<u8>, ImportError> {
    std::fs::read(path).map_err(|source| ImportError::Read { path: path.to_path_buf(), source })
}

/// Imports an OCI image layout directory, or a `docker save` tarball when `source` is a file.
/// `reference` names the image; otherwise the layout's ref annotation or the tarball's RepoTags are used.
pub fn import(paths: &StorePaths, source: &Path, reference: Option<&str>) -> Result<ImageRecord, ImportError> {
    if source.is_dir() {
        import_oci_layout(paths, source, reference)
    } else {
        import_docker_archive(paths, source, reference)
    }
}

/// Copies an OCI layout blob into the store, verifying its digest and size.
fn copy_layout_blob(store: &ContentStore, dir: &Path, digest: &Digest, size: Option<u64>) -> Result<(), ImportError> {
    if store.has(digest) {
        return Ok(());
    }
    let path = dir.join("blobs/sha256").join(digest.hex());
    let file = File::open(&path).map_err(|source| ImportError::Read { path: path.clone(), source })?;
    store.put_reader(file, Some(digest.clone()), size)?;
    Ok(())
}

/// Imports an OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/...`).
pub fn import_oci_layout(paths: &StorePaths, dir: &Path, reference: Option<&str>) -> Result<ImageRecord, ImportError> {
    let index_path = dir.join("index.json");
    if !dir.join("oci-layout").is_file() || !index_path.is_file() {
        return Err(ImportError::NotAnImage { path: dir.to_path_buf(), reason: "no oci-layout or index.json".into() });
    }
    let store = ContentStore::open(paths)?;
    let index_bytes = read_file(&index_path)?;
    let mut doc_digest = Digest::of_bytes(&index_bytes);
    let mut doc = ManifestDoc::parse(&index_bytes, &doc_digest)?;
    let mut ref_name = None;
    // Follow indexes (the top-level index.json, then any nested index) down to one amd64 manifest.
    let manifest_bytes = loop {
        if let Some([only]) = doc.manifests.as_deref() {
            ref_name = ref_name.or_else(|| only.annotations.get("org.opencontainers.image.ref.name").cloned());
        }
        let (digest, size) = doc.select_amd64(&doc_digest)?;
        copy_layout_blob(&store, dir, &digest, Some(size))?;
        let bytes = store.read(&digest)?;
        doc = ManifestDoc::parse(&bytes, &digest)?;
        doc_digest = digest;
        if !doc.is_index() {
            break bytes;
        }
    };
    let manifest_digest = doc_digest;
    let (config_digest, layers) = doc.image_parts(&manifest_digest)?;
    let config_size = doc.config.as_ref().map(|c| c.size);
    copy_layout_blob(&store, dir, &config_digest, config_size)?;
    for layer in &layers {
        copy_layout_blob(&store, dir, &layer.digest, Some(layer.size))?;
    }
    debug_assert_eq!(Digest::of_bytes(&manifest_bytes), manifest_digest);
    // A ref annotation is often just a tag; only a full name (with a '/') names the image.
    let reference = match reference {
        Some(r) => Some(ImageReference::parse(r)?.to_string()),
        None => {
            ref_name.filter(|r| r.contains('/')).and_then(|r| ImageReference::parse(&r).ok()).map(|r| r.to_string())
        }
    };
    let record = build_record(&store, reference.into_iter().collect(), manifest_digest, config_digest, layers)?;
    save_merged(paths, record)
}

/// Serialises find-merge-save so two concurrent pulls of one image keep both references.
static MERGE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Saves `record`, keeping references an existing record of the same image already has.
pub(crate) fn save_merged(paths: &StorePaths, mut record: ImageRecord) -> Result<ImageRecord, ImportError> {
    let _guard = MERGE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let index = ImageIndex::open(paths)?;
    if let Ok(existing) = index.find(record.manifest_digest.as_str()) {
        for r in existing.references {
            if !record.references.contains(&r) {
                record.references.push(r);
            }
        }
    }
    index.save(&record)?;
    index.find(record.manifest_digest.as_str()).map_err(Into::into)
}

/// Reads everything from `r` into memory; for the small JSON files of an archive.
pub(crate) fn read_small(mut r: impl Read, path: &Path) -> Result<Vec<u8>, ImportError> {
    let mut buf = Vec::new();
    r.read_to_end(&mut buf).map_err(|source| ImportError::Read { path: path.to_path_buf(), source })?;
    Ok(buf)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// The digest a file name in a docker-save archive claims (`<hex>.json`, `blobs/sha256/<hex>`), if any.
/// Old-style `<id>/layer.tar` names carry no content digest.
fn claimed_digest(name: &str) -> Option<Digest> {
    let hex = name.strip_prefix("blobs/sha256/").or_else(|| name.strip_suffix(".json"))?;
    format!("sha256:{hex}").parse().ok()
}

/// Imports the first image of a `docker save` tarball (`manifest.json`, config JSON, layer tars).
///
/// Every file is streamed into the content store under its own digest; layers are then checked against
/// the config's `rootfs.diff_ids` (docker saves uncompressed layers, so the two are equal), and a manifest
/// is synthesised so the image has a manifest digest like a pulled one.
pub fn import_docker_archive(
    paths: &StorePaths,
    tarball: &Path,
    reference: Option<&str>,
) -> Result<ImageRecord, ImportError> {
    let store = ContentStore::open(paths)?;
    let read_err = |source| ImportError::Read { path: tarball.to_path_buf(), source };
    let file = File::open(tarball).map_err(read_err)?;
    let mut archive = tar::Archive::new(file);
    let mut files: HashMap<String, (Digest, u64)> = HashMap::new();
    let mut manifest_json = None;
    for entry in archive.entries().map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map_err(read_err)?.to_string_lossy().trim_start_matches("./").to_string();
        if name == "manifest.json" {
            manifest_json = Some(read_small(entry, tarball)?);
            continue;
        }
        let size = entry.size();
        let digest = store.put_reader(entry, None, Some(size))?;
        files.insert(name, (digest, size));
    }
    let not_image = |reason: &str| ImportError::NotAnImage { path: tarball.to_path_buf(), reason: reason.into() };
    let manifest_json = manifest_json.ok_or_else(|| not_image("no manifest.json"))?;
    let entries: Vec<SaveEntry> = serde_json::from_slice(&manifest_json)
        .map_err(|source| ImportError::Json { path: tarball.join("manifest.json"), source })?;
    let entry = entries.into_iter().next().ok_or_else(|| not_image("manifest.json lists no image"))?;
    let lookup = |name: &str| -> Result<(Digest, u64), ImportError> {
        let (digest, size) = files.get(name).cloned().ok_or_else(|| not_image(&format!("{name} is missing")))?;
        match claimed_digest(name) {
            Some(claimed) if claimed != digest => {
                Err(ContentError::DigestMismatch { expected: claimed, actual: digest }.into())
            }
            _ => Ok((digest, size)),
        }
    };
    let (config_digest, config_size) = lookup(&entry.config)?;
    let config_bytes = store.read(&config_digest)?;
    let parsed: ImageConfigJson = serde_json::from_slice(&config_bytes)
        .map_err(|source| ManifestError::Config { digest: config_digest.clone(), source })?;
    let diff_ids = parsed.rootfs.unwrap_or_default().diff_ids;
    let mut layers = Vec::new();
    for (i, name) in entry.layers.iter().enumerate() {
        let (digest, size) = lookup(name)?;
        let mut magic = [0u8; 2];
        let gzip = store.open_blob(&digest)?.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
        let media_type = if gzip { "application/vnd.docker.image.rootfs.diff.tar.gzip" } else { DOCKER_LAYER_TAR };
        // diff_ids hash the uncompressed tar, so only uncompressed layers can be checked directly.
        let expected = diff_ids.get(i).cloned().unwrap_or_default();
        if !gzip && expected != digest.as_str() {
            return Err(ImportError::LayerMismatch {
                path: tarball.to_path_buf(),
                name: name.clone(),
                expected,
                actual: digest,
            });
        }
        layers.push(Layer { digest, media_type: media_type.to_string(), size });
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": config_size,
            "digest": config_digest,
        },
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": l.media_type, "size": l.size, "digest": l.digest,
        })).collect::<Vec<_>>(),
    });
    let manifest_digest = store.put_bytes(&serde_json::to_vec(&manifest).expect("json"), None)?;
    let references = match reference {
        Some(r) => vec![ImageReference::parse(r)?.to_string()],
        None => entry
            .repo_tags
            .unwrap_or_default()
            .iter()
            .filter_map(|t| ImageReference::parse(t).ok())
            .map(|r| r.to_string())
            .collect(),
    };
    let record = build_record(&store, references, manifest_digest, config_digest, layers)?;
    save_merged(paths, record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_amd64_and_rejects_zstd() {
        let d = Digest::of_bytes(b"i");
        let a = Digest::of_bytes(b"a");
        let idx = format!(
            r#"{{"manifests":[{{"digest":"{d}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}},
            {{"digest":"{a}","size":2,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        let doc = ManifestDoc::parse(idx.as_bytes(), &d).unwrap();
        assert!(doc.is_index());
        assert_eq!(doc.select_amd64(&d).unwrap(), (a.clone(), 2));
        let only_arm =
            r#"{"manifests":[{"digest":"sha256:00","size":1,"platform":{"os":"linux","architecture":"arm64"}}]}"#;
        let e = ManifestDoc::parse(only_arm.as_bytes(), &d).unwrap().select_amd64(&d).unwrap_err();
        assert!(e.to_string().contains("linux/amd64"), "{e}");
        let zstd = format!(
            r#"{{"config":{{"digest":"{a}","size":1}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"{a}","size":1}}]}}"#
        );
        let e = ManifestDoc::parse(zstd.as_bytes(), &d).unwrap().image_parts(&d).unwrap_err();
        assert!(e.to_string().contains("tar+zstd") && e.to_string().contains(a.as_str()), "{e}");
        let cfg = br#"{"config":{"Entrypoint":["/bin/sh"],"Env":["A=b"],"WorkingDir":"","User":"1:2"}}"#;
        let g = guest_config(cfg, &d).unwrap();
        assert_eq!(g.entrypoint, vec!["/bin/sh"]);
        assert_eq!(g.working_dir, None);
        assert_eq!(g.user.as_deref(), Some("1:2"));
    }
}
