//! The image index: one `ImageRecord` JSON file per image in `images/<manifest hex>.json`.
//!
//! Records are written last by pull and import, through a temp file and a rename, so a record only ever
//! exists once all its blobs do. Removing a record frees no blobs; that is [`ContentStore::gc`]'s job.
//!
//! [`ContentStore::gc`]: crate::content::ContentStore::gc

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::reference::ImageReference;
use crate::{Digest, ImageRecord, StorePaths};

/// An image index failure.
#[derive(Debug, thiserror::Error)]
pub enum ImageIndexError {
    /// No image matches.
    #[error("no image matches `{0}`")]
    NotFound(String),
    /// A digest prefix matches several images.
    #[error("`{query}` matches {count} images; give more digits")]
    Ambiguous {
        /// The query.
        query: String,
        /// How many images it matches.
        count: usize,
    },
    /// A reference to tag with is not valid.
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
    /// A record file is not valid JSON.
    #[error("image record {path} is corrupt")]
    Corrupt {
        /// The record file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A file operation failed.
    #[error("image index i/o on {path}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageIndexError + '_ {
    move |source| ImageIndexError::Io { path: path.to_path_buf(), source }
}

/// Normalises a reference for comparison; strings that do not parse are compared as given.
fn normalise(reference: &str) -> String {
    ImageReference::parse(reference).map(|r| r.to_string()).unwrap_or_else(|_| reference.to_string())
}

/// Serialises [`ImageIndex::save`] within the process.
static SAVE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// What [`ImageIndex::remove`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removal {
    /// Only the reference went; the image (shown as it is now) keeps its other references.
    Untagged(ImageRecord),
    /// The whole record went.
    Removed(ImageRecord),
}

/// The image records of one store.
#[derive(Clone, Debug)]
pub struct ImageIndex {
    dir: PathBuf,
    tmp: PathBuf,
}

impl ImageIndex {
    /// Opens the index (creating its directory).
    pub fn open(paths: &StorePaths) -> Result<Self, ImageIndexError> {
        let index = ImageIndex { dir: paths.images_dir(), tmp: paths.tmp_dir() };
        fs::create_dir_all(&index.dir).map_err(io_err(&index.dir))?;
        fs::create_dir_all(&index.tmp).map_err(io_err(&index.tmp))?;
        Ok(index)
    }

    fn record_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.json", digest.hex()))
    }

    /// Writes (or replaces) a record atomically. Its references are moved off any other image.
    ///
    /// Saves within one process are serialised (moving references is a read-modify-write of several
    /// records); concurrent saves from several processes can still lose a reference move.
    pub fn save(&self, record: &ImageRecord) -> Result<(), ImageIndexError> {
        let _guard = SAVE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let mut record = record.clone();
        record.references = dedup(record.references.iter().map(|r| normalise(r)));
        let refs: HashSet<&String> = record.references.iter().collect();
        for mut other in self.list()? {
            if other.manifest_digest == record.manifest_digest {
                continue;
            }
            let before = other.references.len();
            other.references.retain(|r| !refs.contains(r));
            if other.references.len() != before {
                self.write(&other)?;
            }
        }
        self.write(&record)
    }

    fn write(&self, record: &ImageRecord) -> Result<(), ImageIndexError> {
        let path = self.record_path(&record.manifest_digest);
        let tmp = crate::content::temp_path(&self.tmp, "image");
        let json = serde_json::to_vec_pretty(record).expect("records serialize");
        let result = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(io_err(&path))
    }

    /// Every record, sorted by first reference then digest.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageIndexError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let path = entry.map_err(io_err(&self.dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                // Removed concurrently: not an error for a listing.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ImageIndexError::Io { path, source: e }),
            };
            let record = serde_json::from_slice(&bytes).map_err(|source| ImageIndexError::Corrupt { path, source })?;
            out.push(record);
        }
        out.sort_by(|a: &ImageRecord, b: &ImageRecord| {
            (a.references.first(), &a.manifest_digest).cmp(&(b.references.first(), &b.manifest_digest))
        });
        Ok(out)
    }

    /// Finds one image by reference (normalised: `busybox` = `docker.io/library/busybox:latest`),
    /// by manifest digest, or by a unique prefix of the digest's hex (with or without `sha256:`).
    pub fn find(&self, query: &str) -> Result<ImageRecord, ImageIndexError> {
        let all = self.list()?;
        let wanted = normalise(query);
        if let Some(r) = all.iter().find(|r| r.references.contains(&wanted)) {
            return Ok(r.clone());
        }
        if let Some(r) = all.iter().find(|r| r.manifest_digest.as_str() == query) {
            return Ok(r.clone());
        }
        let prefix = query.strip_prefix("sha256:").unwrap_or(query);
        let is_hex = !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_hexdigit());
        let matches: Vec<_> = if is_hex {
            all.into_iter().filter(|r| r.manifest_digest.hex().starts_with(&prefix.to_ascii_lowercase())).collect()
        } else {
            Vec::new()
        };
        match matches.len() {
            0 => Err(ImageIndexError::NotFound(query.to_string())),
            1 => Ok(matches.into_iter().next().expect("one match")),
            count => Err(ImageIndexError::Ambiguous { query: query.to_string(), count }),
        }
    }

    /// Removes what `query` names, as `docker rmi` does: a reference of an image that has other
    /// references is only untagged; otherwise (or for a digest) the record goes. Blobs stay until
    /// [`ContentStore::gc`].
    ///
    /// [`ContentStore::gc`]: crate::content::ContentStore::gc
    pub fn remove(&self, query: &str) -> Result<Removal, ImageIndexError> {
        let mut record = self.find(query)?;
        let wanted = normalise(query);
        if record.references.len() > 1 && record.references.contains(&wanted) {
            record.references.retain(|r| *r != wanted);
            self.save(&record)?;
            return Ok(Removal::Untagged(record));
        }
        let path = self.record_path(&record.manifest_digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(Removal::Removed(record)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ImageIndexError::NotFound(query.to_string())),
            Err(e) => Err(ImageIndexError::Io { path, source: e }),
        }
    }

    /// Adds `reference` to the image `query` names, moving it off any other image.
    pub fn tag(&self, query: &str, reference: &str) -> Result<ImageRecord, ImageIndexError> {
        let reference = ImageReference::parse(reference)?.to_string();
        let mut record = self.find(query)?;
        if !record.references.contains(&reference) {
            record.references.push(reference);
        }
        self.save(&record)?;
        Ok(record)
    }

    /// Every blob the records reference (manifest, config, layers): the roots for garbage collection.
    pub fn referenced_blobs(&self) -> Result<HashSet<Digest>, ImageIndexError> {
        let mut out = HashSet::new();
        for r in self.list()? {
            out.insert(r.manifest_digest.clone());
            out.insert(r.config_digest.clone());
            out.extend(r.layers.iter().map(|l| l.digest.clone()));
        }
        Ok(out)
    }
}

fn dedup(refs: impl Iterator<Item = String>) -> Vec<String> {
    let mut seen = HashSet::new();
    refs.filter(|r| seen.insert(r.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_api::image::ImageConfig;

    fn record(refs: &[&str], seed: &[u8]) -> ImageRecord {
        ImageRecord {
            references: refs.iter().map(|s| s.to_string()).collect(),
            manifest_digest: Digest::of_bytes(seed),
            config_digest: Digest::of_bytes(b"config"),
            layers: vec![],
            config: ImageConfig::default(),
            size: 0,
        }
    }

    #[test]
    fn save_find_tag_remove() {
        let dir = tempfile::tempdir().unwrap();
        let index = ImageIndex::open(&StorePaths::new(dir.path())).unwrap();
        let a = record(&["busybox"], b"a");
        let b = record(&["127.0.0.1:5000/x:1"], b"b");
        index.save(&a).unwrap();
        index.save(&b).unwrap();
        assert_eq!(index.list().unwrap().len(), 2);
        let found = index.find("docker.io/library/busybox:latest").unwrap();
        assert_eq!(found.manifest_digest, a.manifest_digest);
        assert_eq!(found.references, vec!["docker.io/library/busybox:latest"]);
        assert_eq!(index.find(b.manifest_digest.as_str()).unwrap().manifest_digest, b.manifest_digest);
        assert_eq!(index.find(&b.manifest_digest.hex()[..12]).unwrap().manifest_digest, b.manifest_digest);
        assert!(matches!(index.find("nope"), Err(ImageIndexError::NotFound(_))));
        assert!(matches!(index.find(""), Err(ImageIndexError::NotFound(_))));

        // Tagging moves the reference off image a.
        index.tag(b.manifest_digest.as_str(), "busybox").unwrap();
        assert_eq!(index.find("busybox").unwrap().manifest_digest, b.manifest_digest);
        assert!(index.find(a.manifest_digest.as_str()).unwrap().references.is_empty());

        // Removing one of two references only untags; removing the last removes the image.
        assert!(
            matches!(index.remove("busybox").unwrap(), Removal::Untagged(r) if r.references == ["127.0.0.1:5000/x:1"])
        );
        assert!(index.find("busybox").is_err());
        assert_eq!(index.list().unwrap().len(), 2);
        assert!(matches!(index.remove("127.0.0.1:5000/x:1").unwrap(), Removal::Removed(_)));
        assert_eq!(index.list().unwrap().len(), 1);
        assert!(index.referenced_blobs().unwrap().contains(&a.manifest_digest));
    }
}
