//! Host files a manifest may name. Whoever can push to the fleet repository, apply through the API
//! or create a Kubernetes `MicroVM` is not the host's operator: a manifest reads a host file (a
//! `copyFiles[].source`, a `kernel.path`) only under a directory the operator allowed with
//! `ignite daemon --allow-host-path DIR` (none by default). The file is resolved beneath that
//! directory in one `openat2(RESOLVE_BENEATH)`, so neither `..` nor a symlink leads out of it, and
//! it must be a regular file within a size cap.

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use super::types::Vm;
use super::validate::Problem;

/// Largest file one `copyFiles` entry may copy into a guest (its content travels in the config
/// drive, base64, beside the others).
pub const MAX_COPY_FILE_BYTES: u64 = 4 << 20;
/// Largest sum of all `copyFiles` contents of one VM (the config drive holds at most 16 MiB of JSON).
pub const MAX_COPY_FILES_TOTAL_BYTES: u64 = 8 << 20;
/// Largest kernel file `kernel.path` may name.
pub const MAX_KERNEL_FILE_BYTES: u64 = 256 << 20;

/// Why a host file named by a manifest cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum HostPathError {
    /// The path is not under any allowed directory.
    #[error("{path} is not under a directory this host lets manifests read ({allowed})")]
    NotAllowed {
        /// The path named.
        path: PathBuf,
        /// The allowed directories, for the message.
        allowed: String,
    },
    /// Opening failed: missing, a symlink leading out of the allowed directory, or unreadable.
    #[error("cannot open {path} beneath {dir}")]
    Open {
        /// The path named.
        path: PathBuf,
        /// The allowed directory it was resolved beneath.
        dir: PathBuf,
        /// Why (EXDEV: it leads out of the directory).
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file (a directory, device, FIFO or socket).
    #[error("{path} is not a regular file")]
    NotRegular {
        /// The path named.
        path: PathBuf,
    },
    /// Bigger than its cap.
    #[error("{path} is {size} bytes, more than the {max} allowed here")]
    TooLarge {
        /// The path named.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The cap.
        max: u64,
    },
    /// Reading failed.
    #[error("reading {path}")]
    Read {
        /// The path named.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Every host path `vm` names, with the field that names it.
pub fn named_host_paths(vm: &Vm) -> Vec<(String, &Path)> {
    let copies =
        vm.spec.copy_files.iter().enumerate().filter_map(|(i, copy)| {
            copy.source.as_deref().map(|source| (format!("spec.copyFiles[{i}].source"), source))
        });
    let kernel = vm.spec.kernel.path.as_deref().map(|path| ("spec.kernel.path".to_string(), path));
    copies.chain(kernel).collect()
}

/// One allowed directory: as the operator named it, and resolved (symlinks of the operator's own
/// choosing are followed once, at start-up).
#[derive(Clone, Debug, PartialEq, Eq)]
struct AllowedDir {
    given: PathBuf,
    resolved: PathBuf,
}

/// The directories manifests may read host files from. The default allows none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostPaths {
    allowed: Vec<AllowedDir>,
}

/// A host file read for a guest: content and permission bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFile {
    /// The bytes.
    pub content: Vec<u8>,
    /// Permission bits (e.g. `0o644`).
    pub mode: u32,
}

impl HostPaths {
    /// Allows manifests to read files under each of `dirs` (absolute, existing directories).
    pub fn allow(dirs: impl IntoIterator<Item = PathBuf>) -> Result<Self, String> {
        let mut allowed = Vec::new();
        for given in dirs {
            if !given.is_absolute() {
                return Err(format!("--allow-host-path {}: must be an absolute path", given.display()));
            }
            let resolved =
                std::fs::canonicalize(&given).map_err(|e| format!("--allow-host-path {}: {e}", given.display()))?;
            if !resolved.is_dir() {
                return Err(format!("--allow-host-path {}: not a directory", given.display()));
            }
            if resolved == Path::new("/") {
                return Err("--allow-host-path /: would let every manifest read every host file".into());
            }
            allowed.push(AllowedDir { given, resolved });
        }
        Ok(HostPaths { allowed })
    }

    /// Whether no host path is allowed at all.
    pub fn is_empty(&self) -> bool {
        self.allowed.is_empty()
    }

    fn describe(&self) -> String {
        if self.allowed.is_empty() {
            "none is allowed: the operator can allow one with `ignite daemon --allow-host-path DIR`, or \
             give the content inline with `contentBase64`"
                .into()
        } else {
            let dirs: Vec<String> = self.allowed.iter().map(|d| d.given.display().to_string()).collect();
            format!("allowed: {}", dirs.join(", "))
        }
    }

    /// The allowed directory `path` lies under (lexically: no `.` or `..` components) and the path
    /// relative to it.
    fn beneath<'a>(&'a self, path: &Path) -> Result<(&'a AllowedDir, PathBuf), HostPathError> {
        let plain = path.is_absolute() && path.components().skip(1).all(|c| matches!(c, Component::Normal(_)));
        let found = self.allowed.iter().find_map(|dir| {
            let rel = path.strip_prefix(&dir.given).or_else(|_| path.strip_prefix(&dir.resolved)).ok()?;
            (!rel.as_os_str().is_empty()).then(|| (dir, rel.to_path_buf()))
        });
        match found {
            Some(found) if plain => Ok(found),
            _ => Err(HostPathError::NotAllowed { path: path.to_path_buf(), allowed: self.describe() }),
        }
    }

    /// `path` resolved (symlinks followed), if it lies under an allowed directory before and after:
    /// for paths a remote API client names (an image layout to import), which are then read by
    /// code that checks what it reads (digests).
    pub fn resolve(&self, path: &Path) -> Result<PathBuf, HostPathError> {
        let (dir, _) = self.beneath(path)?;
        let open_err = |source| HostPathError::Open { path: path.to_path_buf(), dir: dir.given.clone(), source };
        let resolved = std::fs::canonicalize(path).map_err(open_err)?;
        if !resolved.starts_with(&dir.resolved) {
            let source = std::io::Error::other("it resolves to a path outside that directory");
            return Err(open_err(source));
        }
        Ok(resolved)
    }

    /// Every host path of `vm` that lies under no allowed directory, as validation problems.
    pub fn check(&self, vm: &Vm) -> Vec<Problem> {
        named_host_paths(vm)
            .into_iter()
            // A relative path is already a validation problem of its own.
            .filter(|(_, path)| path.is_absolute())
            .filter_map(|(field, path)| self.beneath(path).err().map(|e| (field, e.to_string())))
            .collect()
    }

    /// Opens `path` for reading: it must lie under an allowed directory, resolve beneath it, be a
    /// regular file and hold at most `max` bytes.
    pub fn open(&self, path: &Path, max: u64) -> Result<(File, u64, u32), HostPathError> {
        use std::os::unix::fs::PermissionsExt;
        let (dir, rel) = self.beneath(path)?;
        let open_err =
            |source: std::io::Error| HostPathError::Open { path: path.to_path_buf(), dir: dir.given.clone(), source };
        let dir_fd = rustix::fs::open(&dir.resolved, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| open_err(e.into()))?;
        // NONBLOCK: opening a FIFO must not wait for a writer; it is refused below anyway.
        let fd = rustix::fs::openat2(
            &dir_fd,
            &rel,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| open_err(e.into()))?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(|source| HostPathError::Read { path: path.to_path_buf(), source })?;
        if !meta.is_file() {
            return Err(HostPathError::NotRegular { path: path.to_path_buf() });
        }
        if meta.len() > max {
            return Err(HostPathError::TooLarge { path: path.to_path_buf(), size: meta.len(), max });
        }
        Ok((file, meta.len(), meta.permissions().mode() & 0o7777))
    }

    /// Reads `path` as [`HostPaths::open`] allows, never more than `max` bytes (a file growing
    /// while read is cut off and refused).
    pub fn read(&self, path: &Path, max: u64) -> Result<HostFile, HostPathError> {
        let (file, _, mode) = self.open(path, max)?;
        let mut content = Vec::new();
        file.take(max + 1)
            .read_to_end(&mut content)
            .map_err(|source| HostPathError::Read { path: path.to_path_buf(), source })?;
        if content.len() as u64 > max {
            return Err(HostPathError::TooLarge { path: path.to_path_buf(), size: content.len() as u64, max });
        }
        Ok(HostFile { content, mode })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(dir: &Path) -> HostPaths {
        HostPaths::allow([dir.to_path_buf()]).unwrap()
    }

    #[test]
    fn nothing_is_allowed_by_default() {
        let err = HostPaths::default().read(Path::new("/etc/hostname"), 1 << 20).unwrap_err();
        assert!(matches!(err, HostPathError::NotAllowed { .. }), "{err}");
        assert!(err.to_string().contains("--allow-host-path"), "{err}");
    }

    #[test]
    fn files_under_an_allowed_directory_are_read_with_their_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let file = dir.path().join("sub/app.conf");
        std::fs::write(&file, b"listen 80;\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let got = allowed(dir.path()).read(&file, 1 << 20).unwrap();
        assert_eq!(got, HostFile { content: b"listen 80;\n".to_vec(), mode: 0o640 });
    }

    #[test]
    fn dot_dot_and_symlinks_never_lead_out() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s3cret").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let paths = allowed(dir.path());
        let up = dir.path().join("..").join(outside.path().file_name().unwrap()).join("secret");
        assert!(matches!(paths.read(&up, 1 << 20), Err(HostPathError::NotAllowed { .. })));
        // A symlink inside the allowed directory, to a file outside it.
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link")).unwrap();
        let err = paths.read(&dir.path().join("link"), 1 << 20).unwrap_err();
        assert!(matches!(err, HostPathError::Open { .. }), "{err}");
        // A symlinked directory inside, pointing out.
        std::os::unix::fs::symlink(outside.path(), dir.path().join("d")).unwrap();
        assert!(paths.read(&dir.path().join("d/secret"), 1 << 20).is_err());
        // A symlink that stays inside is fine.
        std::fs::write(dir.path().join("real"), b"ok").unwrap();
        std::os::unix::fs::symlink("real", dir.path().join("alias")).unwrap();
        assert_eq!(paths.read(&dir.path().join("alias"), 1 << 20).unwrap().content, b"ok");
    }

    #[test]
    fn only_small_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        let paths = allowed(dir.path());
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert!(matches!(paths.read(&dir.path().join("sub"), 1 << 20), Err(HostPathError::NotRegular { .. })));
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(matches!(paths.read(&dir.path().join("fifo"), 1 << 20), Err(HostPathError::NotRegular { .. })));
        std::fs::write(dir.path().join("big"), vec![0u8; 2048]).unwrap();
        let err = paths.read(&dir.path().join("big"), 1024).unwrap_err();
        assert!(matches!(err, HostPathError::TooLarge { size: 2048, max: 1024, .. }), "{err}");
        // The directory itself is not a file under it.
        assert!(matches!(paths.read(dir.path(), 1 << 20), Err(HostPathError::NotAllowed { .. })));
    }

    #[test]
    fn resolved_paths_stay_beneath() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("layout")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
        let paths = allowed(dir.path());
        let inside = paths.resolve(&dir.path().join("layout")).unwrap();
        assert_eq!(inside, std::fs::canonicalize(dir.path().join("layout")).unwrap());
        assert!(matches!(paths.resolve(&dir.path().join("out")), Err(HostPathError::Open { .. })));
        assert!(matches!(paths.resolve(Path::new("/etc")), Err(HostPathError::NotAllowed { .. })));
    }

    #[test]
    fn the_root_and_relative_directories_cannot_be_allowed() {
        assert!(HostPaths::allow([PathBuf::from("/")]).unwrap_err().contains("every host file"));
        assert!(HostPaths::allow([PathBuf::from("rel")]).unwrap_err().contains("absolute"));
        assert!(HostPaths::allow([PathBuf::from("/nonexistent-ignite-dir")]).is_err());
    }
}
