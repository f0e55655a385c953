//! A directory source: every `*.yaml`/`*.yml` below a local directory; the revision is a
//! digest of their paths and contents, so it changes exactly when a manifest does.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::{is_manifest, ManifestFile, Snapshot, Source, SourceError, SourceKind, SourceSpec};

/// See the module docs.
pub struct DirectorySource {
    spec: SourceSpec,
}

impl DirectorySource {
    /// A source for `spec` (which must be a directory source).
    pub fn new(spec: SourceSpec) -> DirectorySource {
        assert!(matches!(spec.kind, SourceKind::Directory(_)), "DirectorySource::new needs a directory spec");
        DirectorySource { spec }
    }
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<ManifestFile>) -> Result<(), SourceError> {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SourceError + '_ {
        move |source| SourceError::Io { path: path.to_path_buf(), source }
    }
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io(&path))?;
        let rel = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
        if kind.is_dir() && !rel.starts_with('.') && !rel.contains("/.") {
            collect(root, &path, out)?;
        } else if kind.is_file() && is_manifest(&rel) {
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let text = String::from_utf8(bytes)
                .map_err(|_| SourceError::NotUtf8 { file: rel.clone(), revision: "working directory".into() })?;
            out.push(ManifestFile { path: rel, text });
        }
    }
    Ok(())
}

impl Source for DirectorySource {
    fn spec(&self) -> &SourceSpec {
        &self.spec
    }

    fn sync(&self) -> Result<Snapshot, SourceError> {
        let SourceKind::Directory(dir) = &self.spec.kind else { unreachable!("checked in new") };
        let mut files = Vec::new();
        collect(&dir.path, &dir.path, &mut files)?;
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let mut hash = Sha256::new();
        for f in &files {
            hash.update(f.path.as_bytes());
            hash.update([0]);
            hash.update(f.text.as_bytes());
            hash.update([0]);
        }
        let revision = format!("sha256:{}", hex::encode(hash.finalize()));
        Ok(Snapshot { source: self.spec.name.clone(), revision, files })
    }
}
