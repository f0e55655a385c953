//! Desired-state sources: a git repository (pinned to one commit per apply) or a local
//! directory. A source delivers the raw `*.yaml`/`*.yml` files of one revision; parsing,
//! validation and ownership are [`apply`]'s: the intake of desired state, which the daemon, the API
//! and the Kubernetes controller call with what they read.

pub mod apply;
pub mod credentials;
mod dir;
mod git;
mod poller;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use apply::{apply_objects, apply_revision, parse_revision, ApplyError, ApplyReport};
pub use credentials::GitCredentials;
pub use dir::DirectorySource;
pub use git::GitSource;
pub use poller::{spawn_poller, SyncOutcome};

/// A named source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSpec {
    /// Unique name (`gitops`, `fleet`...); owned objects are tagged `git:<name>` / `dir:<name>`.
    pub name: String,
    /// Where the manifests come from.
    pub kind: SourceKind,
}

/// The kinds of source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceKind {
    /// A git repository.
    Git(GitSpec),
    /// A local directory.
    Directory(DirSpec),
}

/// A git repository to follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitSpec {
    /// `file://`, `git://`, `https://`, `ssh://` URL, or a local path.
    pub url: String,
    /// What to check out.
    pub reference: GitRef,
    /// Subdirectory holding the manifests ("" for the whole repository).
    pub path: String,
    /// Poll interval.
    pub interval: Duration,
    /// For https remotes that want them (`--git-credentials-file`); never part of `url`.
    pub credentials: Option<GitCredentials>,
}

/// Which commit of a repository to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GitRef {
    /// The tip of a branch, followed (also through force-pushes).
    Branch(String),
    /// A tag.
    Tag(String),
    /// A fixed commit (full or abbreviated sha).
    Commit(String),
}

impl std::fmt::Display for GitRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GitRef::Branch(b) => write!(f, "branch {b}"),
            GitRef::Tag(t) => write!(f, "tag {t}"),
            GitRef::Commit(c) => write!(f, "commit {c}"),
        }
    }
}

/// A local directory to follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirSpec {
    /// The directory (absolute).
    pub path: PathBuf,
    /// Poll interval.
    pub interval: Duration,
}

impl SourceSpec {
    /// The owner tag of the objects this source declares.
    pub fn owner(&self) -> String {
        match self.kind {
            SourceKind::Git(_) => format!("git:{}", self.name),
            SourceKind::Directory(_) => format!("dir:{}", self.name),
        }
    }

    /// How often to poll.
    pub fn interval(&self) -> Duration {
        match &self.kind {
            SourceKind::Git(g) => g.interval,
            SourceKind::Directory(d) => d.interval,
        }
    }

    /// Where it reads from, safe to show (credentials removed).
    pub fn display_url(&self) -> String {
        match &self.kind {
            SourceKind::Git(g) => redact_url(&g.url),
            SourceKind::Directory(d) => d.path.display().to_string(),
        }
    }
}

/// `https://user:token@host/x` -> `https://host/x`.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            if path.is_empty() && !rest.contains('/') {
                format!("{scheme}://{host}")
            } else {
                format!("{scheme}://{host}/{path}")
            }
        }
        None => url.to_string(),
    }
}

/// One manifest file of a revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestFile {
    /// Path relative to the source's root (`vms/web.yaml`).
    pub path: String,
    /// Its content.
    pub text: String,
}

/// Every manifest of one revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The source's name.
    pub source: String,
    /// The full commit sha, or `sha256:<hex>` of a directory's manifests.
    pub revision: String,
    /// The manifest files, sorted by path.
    pub files: Vec<ManifestFile>,
}

/// Why a sync failed. Nothing is applied; the previous revision keeps running.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The remote does not answer or does not exist.
    #[error("git remote {url} is unreachable")]
    RemoteUnreachable {
        /// The URL (credentials removed).
        url: String,
        /// libgit2's words.
        #[source]
        source: ::git2::Error,
    },
    /// The branch, tag or commit does not exist.
    #[error("{reference} not found in {url}")]
    RefNotFound {
        /// What was asked for.
        reference: GitRef,
        /// The URL (credentials removed).
        url: String,
    },
    /// The manifest path does not exist in that revision.
    #[error("path {path:?} does not exist in revision {revision}")]
    PathNotFound {
        /// The configured path.
        path: String,
        /// The revision.
        revision: String,
    },
    /// A manifest is not UTF-8.
    #[error("{file} in revision {revision} is not UTF-8 text")]
    NotUtf8 {
        /// The file.
        file: String,
        /// The revision.
        revision: String,
    },
    /// Any other git failure.
    #[error("git {op} on {url}")]
    Git {
        /// What was being done.
        op: &'static str,
        /// The URL (credentials removed).
        url: String,
        /// libgit2's words.
        #[source]
        source: ::git2::Error,
    },
    /// The URL carries credentials (refused: they would show everywhere the URL does).
    #[error(transparent)]
    Credentials(#[from] credentials::CredentialsError),
    /// A local file or directory could not be read.
    #[error("reading {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Something that yields snapshots.
pub trait Source: Send {
    /// Its configuration.
    fn spec(&self) -> &SourceSpec;
    /// Fetches and reads the current revision (blocking).
    fn sync(&self) -> Result<Snapshot, SourceError>;
}

/// Opens the source `spec`; git mirrors live under `cache_dir`.
pub fn open(spec: &SourceSpec, cache_dir: &Path) -> Result<Box<dyn Source>, SourceError> {
    Ok(match &spec.kind {
        SourceKind::Git(_) => Box::new(GitSource::new(spec.clone(), cache_dir)?),
        SourceKind::Directory(_) => Box::new(DirectorySource::new(spec.clone())),
    })
}

fn is_manifest(path: &str) -> bool {
    path.ends_with(".yaml") || path.ends_with(".yml")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(redact_url("https://user:tok@git.example.com/fleet.git"), "https://git.example.com/fleet.git");
        assert_eq!(redact_url("ssh://git@host:22/x"), "ssh://host:22/x");
        assert_eq!(redact_url("file:///srv/fleet"), "file:///srv/fleet");
        assert_eq!(redact_url("/srv/fleet"), "/srv/fleet");
    }
}
