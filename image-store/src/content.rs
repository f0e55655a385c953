//! The content-addressed blob store under `blobs/sha256/<hex>`.
//!
//! Every blob is streamed into a temp file in [`StorePaths::tmp_dir`] while being hashed, fsynced, and
//! renamed into place only when its digest (and size, when known) match. A bad download or a crash
//! therefore never leaves a blob under its final name. Two writers of the same digest each use their own
//! temp file; the second rename replaces identical bytes, so both succeed and one file remains.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

use crate::{Digest, StorePaths};

/// Prefixes of the temp files of blobs and image records, so cleanup never touches other parts' temp files.
const TEMP_PREFIXES: &[&str] = &["blob-", "image-"];
/// Prefixes of the work directories that unpack images (root disks, kernels from images).
const WORK_PREFIXES: &[&str] = &["rootfs-", "kernel-"];
const TEMP_SUFFIX: &str = ".partial";

/// Distinguishes temp files of one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A blob store failure.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// The bytes received do not hash to the expected digest.
    #[error("blob {expected} has digest {actual}, expected {expected}")]
    DigestMismatch {
        /// The digest the blob should have.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },
    /// The number of bytes received differs from the expected size.
    #[error("blob {digest} is {actual} bytes, expected {expected}")]
    SizeMismatch {
        /// The blob's digest.
        digest: Digest,
        /// Expected size in bytes.
        expected: u64,
        /// Bytes received.
        actual: u64,
    },
    /// More bytes arrived than the blob's descriptor declares: the transfer was cut off there,
    /// nothing past the declared size was written or kept.
    #[error(
        "blob {digest} is longer than the {expected} bytes its descriptor declares: cut off after {received} bytes"
    )]
    TooLong {
        /// The blob's digest (or `unverified` for a blob stored under whatever digest it has).
        digest: String,
        /// The declared size.
        expected: u64,
        /// Bytes received when the transfer was cut off.
        received: u64,
    },
    /// The blob is not in the store.
    #[error("blob {0} is not in the content store")]
    NotFound(Digest),
    /// The store's filesystem is full.
    #[error("no space left on device writing {path}")]
    NoSpace {
        /// The file being written.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("content store i/o on {path}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ContentError + '_ {
    move |source| match source.kind() {
        io::ErrorKind::StorageFull => ContentError::NoSpace { path: path.to_path_buf() },
        _ => ContentError::Io { path: path.to_path_buf(), source },
    }
}

/// A unique temp file name `<kind>-<pid>-<n>.partial` in `tmp_dir`: the pid lets a later
/// [`ContentStore::open`] or gc tell a crashed writer's leftovers from a live writer's file.
pub(crate) fn temp_path(tmp_dir: &Path, kind: &str) -> PathBuf {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    tmp_dir.join(format!("{kind}-{}-{n}{TEMP_SUFFIX}", std::process::id()))
}

/// A private work directory `tmp/<kind>-<pid>-XXXXXX` (mode 0700: image layers, untrusted, unpack
/// there), removed when dropped; a crash leaves it for the next [`ContentStore::open`] to sweep.
pub(crate) fn work_dir(paths: &StorePaths, kind: &str) -> io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = paths.tmp_dir();
    fs::create_dir_all(&tmp)?;
    let dir = tempfile::Builder::new().prefix(&format!("{kind}-{}-", std::process::id())).tempdir_in(&tmp)?;
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

/// The pid a temp name `<prefix><pid>-...` carries, for one of `prefixes`.
fn writer_pid<'a>(name: &'a str, prefixes: &[&str]) -> Option<&'a str> {
    let rest = prefixes.iter().find_map(|p| name.strip_prefix(p))?;
    rest.split('-').next().filter(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// The blob store of one [`StorePaths`].
#[derive(Clone, Debug)]
pub struct ContentStore {
    paths: StorePaths,
}

impl ContentStore {
    /// Opens (creating directories as needed) and removes temp files left by dead processes.
    pub fn open(paths: &StorePaths) -> Result<Self, ContentError> {
        let store = ContentStore { paths: paths.clone() };
        let blobs = store.blob_dir();
        fs::create_dir_all(&blobs).map_err(io_err(&blobs))?;
        let tmp = paths.tmp_dir();
        fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        store.remove_stale_temps()?;
        Ok(store)
    }

    fn blob_dir(&self) -> PathBuf {
        self.paths.root().join("blobs/sha256")
    }

    /// Whether the blob is present.
    pub fn has(&self, digest: &Digest) -> bool {
        self.paths.blob(digest).is_file()
    }

    /// Where the blob lives (whether or not it is present).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.paths.blob(digest)
    }

    /// Opens a present blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, ContentError> {
        let path = self.paths.blob(digest);
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ContentError::NotFound(digest.clone()),
            _ => ContentError::Io { path, source: e },
        })
    }

    /// Reads a whole (small) blob, e.g. a manifest or config.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, ContentError> {
        let mut buf = Vec::new();
        self.open_blob(digest)?.read_to_end(&mut buf).map_err(io_err(&self.paths.blob(digest)))?;
        Ok(buf)
    }

    /// Size in bytes of a present blob.
    pub fn size(&self, digest: &Digest) -> Result<u64, ContentError> {
        let path = self.paths.blob(digest);
        match fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ContentError::NotFound(digest.clone())),
            Err(e) => Err(ContentError::Io { path, source: e }),
        }
    }

    /// Removes a blob; returns whether it was present.
    pub fn remove(&self, digest: &Digest) -> Result<bool, ContentError> {
        let path = self.paths.blob(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ContentError::Io { path, source: e }),
        }
    }

    /// Every blob present.
    pub fn list(&self) -> Result<Vec<Digest>, ContentError> {
        let dir = self.blob_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            if let Ok(d) = format!("sha256:{}", entry.file_name().to_string_lossy()).parse::<Digest>() {
                out.push(d);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Starts writing a blob. `expected` is checked at [`BlobWriter::commit`]; `None` stores the blob
    /// under whatever digest its bytes have (for imports whose format carries no digest).
    pub fn writer(&self, expected: Option<Digest>, expected_size: Option<u64>) -> Result<BlobWriter, ContentError> {
        let tmp_dir = self.paths.tmp_dir();
        let tmp = temp_path(&tmp_dir, "blob");
        let file = File::create(&tmp).map_err(io_err(&tmp))?;
        Ok(BlobWriter {
            store: self.clone(),
            tmp,
            file: Some(file),
            hasher: Sha256::new(),
            written: 0,
            expected,
            expected_size,
        })
    }

    /// Stores everything `reader` yields, verified against `expected` when given; returns the digest.
    pub fn put_reader(
        &self,
        mut reader: impl Read,
        expected: Option<Digest>,
        size: Option<u64>,
    ) -> Result<Digest, ContentError> {
        let mut w = self.writer(expected, size)?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = reader.read(&mut buf).map_err(io_err(&w.tmp))?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        w.commit()
    }

    /// Stores `bytes`; returns their digest.
    pub fn put_bytes(&self, bytes: &[u8], expected: Option<Digest>) -> Result<Digest, ContentError> {
        self.put_reader(bytes, expected, Some(bytes.len() as u64))
    }

    /// Removes every blob not in `referenced` and every stale temp file; returns the bytes freed.
    pub fn gc(&self, referenced: &HashSet<Digest>) -> Result<u64, ContentError> {
        let mut freed = self.remove_stale_temps()?;
        for digest in self.list()? {
            if referenced.contains(&digest) {
                continue;
            }
            let size = self.size(&digest).unwrap_or(0);
            if self.remove(&digest)? {
                tracing::debug!(%digest, size, "gc removed blob");
                freed += size;
            }
        }
        Ok(freed)
    }

    /// Removes temp files and work directories whose process is gone (crashed or killed); returns the
    /// bytes freed (of files). Names carry the writer's pid, so live writers (also in other processes)
    /// are left alone.
    fn remove_stale_temps(&self) -> Result<u64, ContentError> {
        let dir = self.paths.tmp_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(ContentError::Io { path: dir, source: e }),
        };
        let mut freed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let pid = if is_dir { writer_pid(&name, WORK_PREFIXES) } else { writer_pid(&name, TEMP_PREFIXES) };
            let Some(pid) = pid else { continue };
            if (!is_dir && !name.ends_with(TEMP_SUFFIX)) || Path::new("/proc").join(pid).exists() {
                continue;
            }
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            let removed = if is_dir { fs::remove_dir_all(entry.path()) } else { fs::remove_file(entry.path()) };
            if removed.is_ok() {
                tracing::debug!(path = %entry.path().display(), "removed what a dead process left in tmp");
                freed += len;
            }
        }
        Ok(freed)
    }
}

/// A blob being written; dropping it without [`commit`](BlobWriter::commit) deletes the temp file.
#[derive(Debug)]
pub struct BlobWriter {
    store: ContentStore,
    tmp: PathBuf,
    file: Option<File>,
    hasher: Sha256,
    written: u64,
    expected: Option<Digest>,
    expected_size: Option<u64>,
}

impl BlobWriter {
    /// Appends bytes (and hashes them). Bytes past the expected size are refused before any of
    /// them is written: a registry (or file) sending an endless blob fills neither disk nor memory.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), ContentError> {
        if let Some(expected) = self.expected_size {
            let received = self.written.saturating_add(bytes.len() as u64);
            if received > expected {
                let digest = self.expected.as_ref().map_or_else(|| "unverified".to_string(), |d| d.to_string());
                return Err(ContentError::TooLong { digest, expected, received });
            }
        }
        if let Some(file) = self.file.as_mut() {
            file.write_all(bytes).map_err(io_err(&self.tmp))?;
        }
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verifies, fsyncs and renames the blob into place; on any mismatch the temp file is deleted.
    pub fn commit(mut self) -> Result<Digest, ContentError> {
        let actual: Digest = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
            .parse()
            .expect("sha256 hex is a valid digest");
        if let (Some(expected), Some(size)) = (&self.expected, self.expected_size) {
            if size != self.written {
                return Err(ContentError::SizeMismatch {
                    digest: expected.clone(),
                    expected: size,
                    actual: self.written,
                });
            }
        }
        if let Some(expected) = &self.expected {
            if *expected != actual {
                return Err(ContentError::DigestMismatch { expected: expected.clone(), actual });
            }
        }
        let file = self.file.take().expect("file present until commit");
        // fsync before rename: after a crash the final name must never point at unwritten data.
        file.sync_all().map_err(io_err(&self.tmp))?;
        drop(file);
        let dest = self.store.paths.blob(&actual);
        fs::rename(&self.tmp, &dest).map_err(io_err(&dest))?;
        if let Some(dir) = dest.parent() {
            // Persist the rename itself; failure here only risks losing a verified blob, never corruption.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(actual)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // After a successful commit the temp name no longer exists; this removes failed or abandoned writes.
        let _ = fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temps(paths: &StorePaths) -> usize {
        fs::read_dir(paths.tmp_dir()).unwrap().count()
    }

    #[test]
    fn stores_verified_blobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let paths = StorePaths::new(dir.path());
        let store = ContentStore::open(&paths).unwrap();
        let d = Digest::of_bytes(b"hello");
        assert_eq!(store.put_bytes(b"hello", Some(d.clone())).unwrap(), d);
        assert!(store.has(&d));
        assert_eq!(store.size(&d).unwrap(), 5);
        assert_eq!(store.read(&d).unwrap(), b"hello");

        let other = Digest::of_bytes(b"other");
        let e = store.put_bytes(b"hellO", Some(other.clone())).unwrap_err();
        assert!(matches!(e, ContentError::DigestMismatch { .. }), "{e}");
        assert!(e.to_string().contains(other.as_str()), "{e}");
        assert!(!store.has(&other));
        let e = store.put_reader(&b"hello, and then some"[..], Some(d.clone()), Some(5)).unwrap_err();
        assert!(matches!(e, ContentError::TooLong { expected: 5, .. }), "{e}");
        let e = store.put_reader(&b"hell"[..], Some(d.clone()), Some(5)).unwrap_err();
        assert!(matches!(e, ContentError::SizeMismatch { actual: 4, .. }), "{e}");
        assert_eq!(temps(&paths), 0);
        assert!(matches!(store.open_blob(&other), Err(ContentError::NotFound(_))));
    }

    #[test]
    fn concurrent_writers_of_one_blob_both_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(&StorePaths::new(dir.path())).unwrap();
        let data = vec![7u8; 1 << 20];
        let d = Digest::of_bytes(&data);
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..4).map(|_| s.spawn(|| store.put_bytes(&data, Some(d.clone())))).collect();
            for h in hs {
                assert_eq!(h.join().unwrap().unwrap(), d);
            }
        });
        assert_eq!(store.list().unwrap(), vec![d]);
    }

    #[test]
    fn gc_and_stale_temps() {
        let dir = tempfile::tempdir().unwrap();
        let paths = StorePaths::new(dir.path());
        let store = ContentStore::open(&paths).unwrap();
        let keep = store.put_bytes(b"keep", None).unwrap();
        let drop_ = store.put_bytes(b"drop!", None).unwrap();
        // A temp of a process that no longer exists, and one of this (live) process.
        fs::write(paths.tmp_dir().join("blob-999999999-0.partial"), b"xx").unwrap();
        let live = store.writer(None, None).unwrap();
        fs::write(paths.tmp_dir().join("unrelated"), b"x").unwrap();
        let freed = store.gc(&HashSet::from([keep.clone()])).unwrap();
        assert_eq!(freed, 5 + 2);
        assert_eq!(store.list().unwrap(), vec![keep]);
        assert!(!store.has(&drop_));
        assert_eq!(temps(&paths), 2, "live temp and unrelated file stay");
        drop(live);
        fs::write(paths.tmp_dir().join("blob-999999999-1.partial"), b"xx").unwrap();
        // A root disk build that crashed half way, and one in progress in this process.
        fs::create_dir_all(paths.tmp_dir().join("rootfs-999999999-abc/tree/etc")).unwrap();
        let building = work_dir(&paths, "rootfs").unwrap();
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&fs::metadata(building.path()).unwrap().permissions()) & 0o777;
        assert_eq!(mode, 0o700, "layers unpack where no other user can look");
        ContentStore::open(&paths).unwrap();
        assert_eq!(temps(&paths), 2, "the live build and the unrelated file stay");
        assert!(!paths.tmp_dir().join("rootfs-999999999-abc").exists());
        assert!(building.path().exists());
    }
}
