//! Path handling inside an unpacked root: normalising tar entry paths, resolving paths without
//! ever leaving the root (symlinks placed by the image are interpreted as if the root were `/`),
//! and applying OCI whiteouts.

use std::collections::{HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Component, Path, PathBuf};

/// Prefix of a whiteout entry: `.wh.NAME` deletes `NAME` from the lower layers.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Opaque marker: the directory holding it loses all lower-layer content.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Symlinks followed while resolving one path before giving up (as Linux's `MAXSYMLINKS`).
const MAX_SYMLINKS: usize = 40;

/// Why an entry path is not acceptable.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BadPath {
    /// Contains a `..` component.
    ParentComponent,
    /// Starts at `/` (or a prefix).
    Absolute,
    /// Nothing left after dropping `.` components.
    Empty,
}

/// Normalises a tar entry path to a relative path of plain components: `./a/./b` becomes `a/b`.
/// `..` and absolute paths are rejected rather than clamped, because a layer carrying them is
/// either broken or hostile.
pub(crate) fn normalize_entry_path(path: &Path) -> Result<PathBuf, BadPath> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => return Err(BadPath::ParentComponent),
            Component::RootDir | Component::Prefix(_) => return Err(BadPath::Absolute),
            Component::Normal(name) => out.push(name),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(BadPath::Empty);
    }
    Ok(out)
}

enum Part {
    Root,
    Parent,
    Name(OsString),
}

fn parts(path: &Path) -> impl Iterator<Item = Part> + '_ {
    path.components().filter_map(|c| match c {
        Component::RootDir | Component::Prefix(_) => Some(Part::Root),
        Component::ParentDir => Some(Part::Parent),
        Component::CurDir => None,
        Component::Normal(n) => Some(Part::Name(n.to_os_string())),
    })
}

/// Resolves `rel` inside `root` following every symlink on the way, with the root acting as `/`:
/// absolute targets restart at the root and `..` never climbs above it. The result is always
/// `root` joined with plain components. Components that do not exist yet are kept as they are.
/// When `follow_last` is false the last component is not followed (to create or replace it).
pub(crate) fn resolve_in_root(root: &Path, rel: &Path, follow_last: bool) -> io::Result<PathBuf> {
    let mut resolved: Vec<OsString> = Vec::new();
    let mut pending: VecDeque<Part> = parts(rel).collect();
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        match part {
            Part::Root => resolved.clear(),
            Part::Parent => {
                resolved.pop();
            }
            Part::Name(name) => {
                let is_last = pending.is_empty();
                let candidate = join(root, &resolved).join(&name);
                let is_link = std::fs::symlink_metadata(&candidate).is_ok_and(|m| m.file_type().is_symlink());
                if is_link && (follow_last || !is_last) {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(io::Error::other(format!(
                            "too many levels of symbolic links resolving {}",
                            rel.display()
                        )));
                    }
                    let target = std::fs::read_link(&candidate)?;
                    for p in parts(&target).collect::<Vec<_>>().into_iter().rev() {
                        pending.push_front(p);
                    }
                } else {
                    resolved.push(name);
                }
            }
        }
    }
    Ok(join(root, &resolved))
}

fn join(root: &Path, parts: &[OsString]) -> PathBuf {
    let mut p = root.to_path_buf();
    p.extend(parts);
    p
}

/// What a file name means for whiteout handling.
pub(crate) enum Whiteout<'a> {
    /// Not a whiteout.
    None,
    /// `.wh.NAME`: delete `NAME`.
    File(&'a OsStr),
    /// `.wh..wh..opq`: empty the directory.
    Opaque,
    /// `.wh.`, `.wh..` or `.wh...`: would delete the directory itself, its parent (outside the
    /// root, at the top), or nothing; a layer carrying one is broken or hostile.
    Invalid,
}

/// Classifies the last component of an entry path.
pub(crate) fn classify(name: &OsStr) -> Whiteout<'_> {
    let Some(s) = name.to_str() else { return Whiteout::None };
    if s == OPAQUE_MARKER {
        Whiteout::Opaque
    } else if let Some(target) = s.strip_prefix(WHITEOUT_PREFIX) {
        match target {
            "" | "." | ".." => Whiteout::Invalid,
            _ => Whiteout::File(OsStr::new(target)),
        }
    } else {
        Whiteout::None
    }
}

/// Removes whatever is at `path` (file, symlink or whole directory) without following a symlink;
/// a missing path is fine.
pub(crate) fn remove_any(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Empties directory `dir` of everything not in `keep` (the paths the current layer created,
/// which an opaque marker must not hide). A missing directory is fine.
pub(crate) fn make_opaque(dir: &Path, keep: &HashSet<PathBuf>) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if !keep.contains(&path) {
            remove_any(&path)?;
        } else if entry.file_type()?.is_dir() {
            // A directory this layer wrote into may still hold lower-layer files.
            make_opaque(&path, keep)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_and_rejects() {
        assert_eq!(normalize_entry_path(Path::new("./a/./b/")).unwrap(), PathBuf::from("a/b"));
        assert_eq!(normalize_entry_path(Path::new("../x")), Err(BadPath::ParentComponent));
        assert_eq!(normalize_entry_path(Path::new("a/../../x")), Err(BadPath::ParentComponent));
        assert_eq!(normalize_entry_path(Path::new("/abs")), Err(BadPath::Absolute));
        assert_eq!(normalize_entry_path(Path::new("./")), Err(BadPath::Empty));
    }

    #[test]
    fn resolution_stays_in_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::os::unix::fs::symlink("/host/etc", root.join("etc")).unwrap();
        std::os::unix::fs::symlink("../../../../usr/lib", root.join("lib")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert_eq!(resolve_in_root(root, Path::new("etc/passwd"), true).unwrap(), root.join("host/etc/passwd"));
        assert_eq!(resolve_in_root(root, Path::new("lib/x.so"), true).unwrap(), root.join("usr/lib/x.so"));
        assert_eq!(resolve_in_root(root, Path::new("lib"), false).unwrap(), root.join("lib"));
        assert!(resolve_in_root(root, Path::new("loop/x"), true).is_err());
    }

    #[test]
    fn classifies_whiteouts() {
        assert!(matches!(classify(OsStr::new(".wh..wh..opq")), Whiteout::Opaque));
        assert!(matches!(classify(OsStr::new(".wh.foo")), Whiteout::File(n) if n == "foo"));
        assert!(matches!(classify(OsStr::new("foo")), Whiteout::None));
        for name in [".wh.", ".wh..", ".wh..."] {
            assert!(matches!(classify(OsStr::new(name)), Whiteout::Invalid), "{name}");
        }
    }
}
