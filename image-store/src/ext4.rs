//! Builds an ext4 image from a directory with `mkfs.ext4 -d`: no mount and no root needed.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::debug;

/// Filesystem block size we ask mkfs for; sizing below counts in these.
const BLOCK: u64 = 4096;
/// Fixed headroom on top of the content: journal, group descriptors, a little free space.
const FIXED_HEADROOM: u64 = 16 << 20;

/// Building an ext4 image failed.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// The source tree could not be measured.
    #[error("cannot measure {path}")]
    Measure {
        /// Path being read.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The image file could not be created.
    #[error("cannot create image file {path}")]
    CreateImage {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `mkfs.ext4` is not installed.
    #[error("mkfs.ext4 not found (install e2fsprogs)")]
    MkfsMissing,
    /// `mkfs.ext4` could not be run.
    #[error("cannot run mkfs.ext4")]
    MkfsSpawn(#[source] io::Error),
    /// `mkfs.ext4` failed.
    #[error("mkfs.ext4 failed building {image} from {source_dir}: {stderr}")]
    MkfsFailed {
        /// Image path.
        image: PathBuf,
        /// Source directory.
        source_dir: PathBuf,
        /// What mkfs printed.
        stderr: String,
    },
}

/// What a tree needs on disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeUsage {
    /// Bytes of data, each file rounded up to whole blocks, hardlinked files counted once.
    pub bytes: u64,
    /// Inodes (files, directories, links, nodes), hardlinks counted once.
    pub inodes: u64,
}

/// Measures `dir` without following symlinks.
pub fn tree_usage(dir: &Path) -> Result<TreeUsage, Ext4Error> {
    let mut usage = TreeUsage::default();
    let mut seen = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let measure = |source| Ext4Error::Measure { path: path.clone(), source };
        let meta = std::fs::symlink_metadata(&path).map_err(measure)?;
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        usage.inodes += 1;
        usage.bytes += meta.len().div_ceil(BLOCK).max(1) * BLOCK;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(measure)? {
                stack.push(entry.map_err(measure)?.path());
            }
        }
    }
    Ok(usage)
}

/// The image size for `usage`: content plus 20% plus 16 MiB, with room for the inode table,
/// rounded up to a MiB.
pub fn image_size(usage: TreeUsage, inodes: u64) -> u64 {
    let size = usage.bytes + usage.bytes / 5 + FIXED_HEADROOM + inodes * 256;
    size.div_ceil(1 << 20) * (1 << 20)
}

/// Builds a sparse ext4 image at `image` holding a copy of `dir` (owned by root:root at the top),
/// labelled `label` (at most 16 bytes). Returns the image size in bytes. `image` is overwritten.
pub fn build_ext4(dir: &Path, image: &Path, label: &str) -> Result<u64, Ext4Error> {
    let usage = tree_usage(dir)?;
    // Twice the inodes in use (and at least 1024) so the guest can still create files.
    let inodes = (usage.inodes * 2).max(1024);
    let size = image_size(usage, inodes);
    let create = |source| Ext4Error::CreateImage { path: image.to_path_buf(), source };
    // set_len on a fresh file leaves it sparse: only the blocks mkfs writes take space.
    let file = std::fs::File::create(image).map_err(create)?;
    file.set_len(size).map_err(create)?;
    drop(file);
    debug!(dir = %dir.display(), image = %image.display(), size, inodes, "running mkfs.ext4");
    let output = Command::new("mkfs.ext4")
        .args(["-F", "-q", "-T", "default", "-b", "4096", "-E", "root_owner=0:0"])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-L")
        .arg(label)
        .arg("-d")
        .arg(dir)
        .arg(image)
        .output()
        .map_err(
            |e| if e.kind() == io::ErrorKind::NotFound { Ext4Error::MkfsMissing } else { Ext4Error::MkfsSpawn(e) },
        )?;
    if !output.status.success() {
        let _ = std::fs::remove_file(image);
        return Err(Ext4Error::MkfsFailed {
            image: image.to_path_buf(),
            source_dir: dir.to_path_buf(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_sparse_image_sized_to_content() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("a")).unwrap();
        std::fs::write(src.join("a/big"), vec![7u8; 3 << 20]).unwrap();
        std::fs::hard_link(src.join("a/big"), src.join("a/big2")).unwrap();
        let usage = tree_usage(&src).unwrap();
        assert_eq!(usage.inodes, 3, "hardlinked file counted once");
        assert!(usage.bytes >= 3 << 20 && usage.bytes < (3 << 20) + 4 * BLOCK);
        let img = dir.path().join("img.ext4");
        let size = build_ext4(&src, &img, "test").unwrap();
        let meta = std::fs::metadata(&img).unwrap();
        assert_eq!(meta.len(), size);
        assert!(((3 << 20) + FIXED_HEADROOM..64 << 20).contains(&size), "{size}");
        assert!(meta.blocks() * 512 < size, "image is sparse");
    }

    #[test]
    fn mkfs_failure_names_the_paths() {
        let dir = tempfile::tempdir().unwrap();
        let err = build_ext4(&dir.path().join("missing"), &dir.path().join("x.ext4"), "x").unwrap_err();
        assert!(matches!(err, Ext4Error::Measure { .. }), "{err}");
        // A file instead of a directory: mkfs itself refuses, and its stderr is in the message.
        let src = dir.path().join("src");
        std::fs::write(&src, "not a dir").unwrap();
        let err = build_ext4(&src, &dir.path().join("x.ext4"), "x").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("mkfs.ext4 failed") && msg.contains("Not a directory"), "{msg}");
        assert!(!dir.path().join("x.ext4").exists());
    }
}
