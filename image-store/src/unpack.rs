//! Applies image layers (plain or gzip tar) in order onto a directory, with OCI whiteouts, and
//! without ever writing outside that directory.
//!
//! Every entry's parent is resolved inside the root (see [`crate::whiteout`]): a symlink placed by
//! an earlier layer (`etc -> /host/etc`) is followed as if the root were `/`, so it can never
//! lead out of it. The entry's own name is never followed: whatever is there is replaced.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use tar::EntryType;
use tracing::debug;

use crate::whiteout::{self, BadPath, Whiteout};
use crate::{Digest, Layer, StorePaths};

/// A layer that could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The layer blob is missing or unreadable.
    #[error("cannot open blob of layer {digest} at {path}")]
    OpenBlob {
        /// Layer digest.
        digest: Digest,
        /// Blob path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The layer is compressed in a way we do not read (zstd).
    #[error("layer {digest} uses unsupported compression ({what})")]
    UnsupportedCompression {
        /// Layer digest.
        digest: Digest,
        /// Media type or detected format.
        what: String,
    },
    /// The tar stream is corrupt or truncated.
    #[error("cannot read layer {digest}")]
    Read {
        /// Layer digest.
        digest: Digest,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An entry path that would escape the root.
    #[error("layer {digest}: entry {entry} is rejected: {reason}")]
    BadPath {
        /// Layer digest.
        digest: Digest,
        /// Entry path as in the tar.
        entry: PathBuf,
        /// Why.
        reason: String,
    },
    /// A hardlink whose target escapes the root or does not exist.
    #[error("layer {digest}: hardlink {entry} -> {target} is rejected: {reason}")]
    BadHardlink {
        /// Layer digest.
        digest: Digest,
        /// Entry path.
        entry: PathBuf,
        /// Link target as in the tar.
        target: PathBuf,
        /// Why.
        reason: String,
    },
    /// The image unpacks to more than its limits allow (see [`UnpackLimits`]).
    #[error("layer {digest}: the image unpacks to more than {limit} ({what}); refused (raise --max-image-size or --max-image-entries if it is genuine)")]
    TooLarge {
        /// Layer digest (the one that crossed the limit).
        digest: Digest,
        /// What ran over: `bytes` or `entries`.
        what: &'static str,
        /// The limit, in its unit.
        limit: u64,
    },
    /// Writing an entry failed.
    #[error("layer {digest}: cannot extract {entry}")]
    Extract {
        /// Layer digest.
        digest: Digest,
        /// Entry path.
        entry: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// How much one image may unpack to: a layer is untrusted input, and a few kilobytes of gzip can
/// decompress to terabytes or to millions of empty files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Bytes of file content, summed over all layers ([`DEFAULT_MAX_IMAGE_BYTES`]).
    pub max_bytes: u64,
    /// Tar entries, summed over all layers ([`DEFAULT_MAX_IMAGE_ENTRIES`]).
    pub max_entries: u64,
}

/// The default of [`UnpackLimits::max_bytes`]: 32 GiB.
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 32 << 30;
/// The default of [`UnpackLimits::max_entries`]: one million (a full Debian with docs has ~100 000).
pub const DEFAULT_MAX_IMAGE_ENTRIES: u64 = 1_000_000;

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits { max_bytes: DEFAULT_MAX_IMAGE_BYTES, max_entries: DEFAULT_MAX_IMAGE_ENTRIES }
    }
}

static PROCESS_LIMITS: std::sync::RwLock<Option<UnpackLimits>> = std::sync::RwLock::new(None);

impl UnpackLimits {
    /// Sets the limits every later unpack of this process uses (`ignite daemon --max-image-size`).
    pub fn set_for_process(limits: UnpackLimits) {
        *PROCESS_LIMITS.write().unwrap_or_else(|e| e.into_inner()) = Some(limits);
    }

    /// The limits of this process: what [`UnpackLimits::set_for_process`] set, else the defaults.
    pub fn for_process() -> UnpackLimits {
        PROCESS_LIMITS.read().unwrap_or_else(|e| e.into_inner()).unwrap_or_default()
    }
}

/// What the layers of one image have used of its [`UnpackLimits`] so far.
#[derive(Debug, Default)]
pub struct UnpackBudget {
    limits: UnpackLimits,
    bytes: u64,
    entries: u64,
}

impl UnpackBudget {
    /// A fresh budget for one image.
    pub fn new(limits: UnpackLimits) -> Self {
        UnpackBudget { limits, bytes: 0, entries: 0 }
    }

    fn charge(&mut self, digest: &Digest, size: u64) -> Result<(), UnpackError> {
        self.entries += 1;
        self.bytes = self.bytes.saturating_add(size);
        let over = |what, limit| Err(UnpackError::TooLarge { digest: digest.clone(), what, limit });
        if self.entries > self.limits.max_entries {
            return over("entries", self.limits.max_entries);
        }
        if self.bytes > self.limits.max_bytes {
            return over("bytes", self.limits.max_bytes);
        }
        Ok(())
    }
}

/// Applies `layers` (bottom first, blobs read from the content store) onto `root`, within the
/// process's [`UnpackLimits`].
pub fn unpack_layers(paths: &StorePaths, layers: &[Layer], root: &Path) -> Result<(), UnpackError> {
    let mut budget = UnpackBudget::new(UnpackLimits::for_process());
    for layer in layers {
        if layer.media_type.contains("zstd") {
            return Err(UnpackError::UnsupportedCompression {
                digest: layer.digest.clone(),
                what: layer.media_type.clone(),
            });
        }
        let path = paths.blob(&layer.digest);
        let file = File::open(&path).map_err(|source| UnpackError::OpenBlob {
            digest: layer.digest.clone(),
            path: path.clone(),
            source,
        })?;
        debug!(layer = %layer.digest, "applying layer");
        apply_layer(file, &layer.digest, root, &mut budget)?;
    }
    Ok(())
}

/// Applies one layer, plain or gzip tar (told apart by the gzip magic bytes), onto `root`, charging
/// its entries and bytes to `budget`. `digest` only names the layer in errors.
pub fn apply_layer(
    reader: impl Read,
    digest: &Digest,
    root: &Path,
    budget: &mut UnpackBudget,
) -> Result<(), UnpackError> {
    let mut reader = BufReader::new(reader);
    let read_err = |source| UnpackError::Read { digest: digest.clone(), source };
    let magic = reader.fill_buf().map_err(read_err)?;
    if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(UnpackError::UnsupportedCompression { digest: digest.clone(), what: "zstd".into() });
    }
    if magic.starts_with(&[0x1f, 0x8b]) {
        apply_tar(flate2::read::GzDecoder::new(reader), digest, root, budget)
    } else {
        apply_tar(reader, digest, root, budget)
    }
}

/// Whether we may chown and mknod (checked through `/proc/self`, owned by our effective uid,
/// since the crate forbids the unsafe `geteuid`).
pub(crate) fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn apply_tar(reader: impl Read, digest: &Digest, root: &Path, budget: &mut UnpackBudget) -> Result<(), UnpackError> {
    let is_root = running_as_root();
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_preserve_ownerships(is_root);
    archive.set_overwrite(true);
    let read_err = |source| UnpackError::Read { digest: digest.clone(), source };
    // Paths this layer wrote: an opaque marker hides only lower-layer content.
    let mut created: HashSet<PathBuf> = HashSet::new();
    // Directory mtimes are restored once the layer is done, since adding children changes them.
    let mut dir_times: Vec<(PathBuf, u64)> = Vec::new();
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        // Charged before anything is written: the declared size is what unpacking it would write.
        budget.charge(digest, entry.header().size().map_err(read_err)?)?;
        let raw = entry.path().map_err(read_err)?.into_owned();
        let rel = match whiteout::normalize_entry_path(&raw) {
            Ok(rel) => rel,
            Err(BadPath::Empty) => continue, // the root directory itself
            Err(bad) => {
                return Err(UnpackError::BadPath { digest: digest.clone(), entry: raw, reason: reason(&bad).into() })
            }
        };
        let extract_err = |source| UnpackError::Extract { digest: digest.clone(), entry: raw.clone(), source };
        let name = rel.file_name().expect("normalized path ends in a name").to_os_string();
        let parent =
            whiteout::resolve_in_root(root, rel.parent().unwrap_or(Path::new("")), true).map_err(extract_err)?;
        match whiteout::classify(&name) {
            Whiteout::Opaque => {
                whiteout::make_opaque(&parent, &created).map_err(extract_err)?;
                continue;
            }
            Whiteout::File(target) => {
                whiteout::remove_any(&parent.join(target)).map_err(extract_err)?;
                continue;
            }
            Whiteout::Invalid => {
                let reason = "a whiteout must name one entry (`.wh.NAME`), not `.`, `..` or nothing";
                return Err(UnpackError::BadPath { digest: digest.clone(), entry: raw, reason: reason.into() });
            }
            Whiteout::None => {}
        }
        std::fs::create_dir_all(&parent).map_err(extract_err)?;
        let dst = parent.join(&name);
        let kind = entry.header().entry_type();
        match std::fs::symlink_metadata(&dst) {
            Ok(m) if m.is_dir() && kind.is_dir() => {}
            Ok(_) => whiteout::remove_any(&dst).map_err(extract_err)?,
            Err(_) => {}
        }
        match kind {
            EntryType::Link => hardlink(&entry, digest, &raw, root, &dst)?,
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                if !special_file(&entry, kind, &dst, is_root).map_err(extract_err)? {
                    debug!(layer = %digest, entry = %raw.display(), "skipping device node: not running as root");
                    continue;
                }
            }
            _ => {
                entry.unpack(&dst).map_err(extract_err)?;
                if kind.is_dir() {
                    dir_times.push((dst.clone(), entry.header().mtime().unwrap_or(0)));
                }
            }
        }
        // Parents created implicitly belong to this layer too.
        for path in dst.ancestors().take_while(|p| *p != root) {
            if !created.insert(path.to_path_buf()) {
                break;
            }
        }
    }
    for (dir, mtime) in dir_times.iter().rev() {
        // Best effort: a wrong directory mtime is not worth failing a build for.
        if let Ok(f) = File::open(dir) {
            let _ = f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(*mtime));
        }
    }
    Ok(())
}

fn reason(bad: &BadPath) -> &'static str {
    match bad {
        BadPath::ParentComponent => "it contains a `..` component",
        BadPath::Absolute => "it is absolute",
        BadPath::Empty => "it is empty",
    }
}

/// Creates a hardlink to an entry already extracted; the target is resolved inside the root.
fn hardlink<R: Read>(
    entry: &tar::Entry<'_, R>,
    digest: &Digest,
    raw: &Path,
    root: &Path,
    dst: &Path,
) -> Result<(), UnpackError> {
    let target = entry.link_name().ok().flatten().map(|t| t.into_owned()).unwrap_or_default();
    let bad = |reason: &str| UnpackError::BadHardlink {
        digest: digest.clone(),
        entry: raw.to_path_buf(),
        target: target.clone(),
        reason: reason.to_string(),
    };
    let rel = whiteout::normalize_entry_path(&target).map_err(|b| bad(reason(&b)))?;
    let source = whiteout::resolve_in_root(root, &rel, false).map_err(|e| bad(&e.to_string()))?;
    match std::fs::symlink_metadata(&source) {
        Ok(m) if m.is_dir() => return Err(bad("the target is a directory")),
        Ok(_) => {}
        Err(_) => return Err(bad("the target was not extracted before the link")),
    }
    std::fs::hard_link(&source, dst).map_err(|source| UnpackError::Extract {
        digest: digest.clone(),
        entry: raw.to_path_buf(),
        source,
    })
}

/// Creates a device node or fifo with the `mknod` command (the crate has no unsafe for the
/// syscall). Returns false when skipped: device nodes need root, fifos do not.
fn special_file<R: Read>(entry: &tar::Entry<'_, R>, kind: EntryType, dst: &Path, is_root: bool) -> io::Result<bool> {
    let header = entry.header();
    let mode = header.mode()? & 0o7777;
    let mut cmd = Command::new("mknod");
    cmd.arg("-m").arg(format!("{mode:o}")).arg(dst);
    match kind {
        EntryType::Fifo => {
            cmd.arg("p");
        }
        _ if !is_root => return Ok(false),
        _ => {
            let major = header.device_major()?.unwrap_or(0);
            let minor = header.device_minor()?.unwrap_or(0);
            cmd.arg(if kind == EntryType::Char { "c" } else { "b" }).arg(major.to_string()).arg(minor.to_string());
        }
    }
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!("mknod failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    if is_root {
        let uid = u32::try_from(header.uid()?).map_err(io::Error::other)?;
        let gid = u32::try_from(header.gid()?).map_err(io::Error::other)?;
        std::os::unix::fs::lchown(dst, Some(uid), Some(gid))?;
        // chown clears set-id bits; put the mode back.
        std::fs::set_permissions(dst, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    }
    Ok(true)
}

#[cfg(test)]
#[path = "unpack_tests.rs"]
mod tests;
