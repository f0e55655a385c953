//! A git source: a bare mirror under the cache directory, fetched with forced refspecs (so
//! force-pushes and amended commits are followed), and files read from one commit's tree.

use std::path::{Path, PathBuf};

use git2::{ErrorClass, ErrorCode, FetchOptions, ObjectType, Oid, Repository, TreeWalkMode, TreeWalkResult};
use tracing::debug;

use super::{
    is_manifest, redact_url, GitRef, GitSpec, ManifestFile, Snapshot, Source, SourceError, SourceKind, SourceSpec,
};

/// See the module docs.
pub struct GitSource {
    spec: SourceSpec,
    git: GitSpec,
    mirror: PathBuf,
}

impl GitSource {
    /// A source for `spec` (which must be a git source) with its mirror in `cache_dir/<name>.git`.
    pub fn new(spec: SourceSpec, cache_dir: &Path) -> Result<GitSource, SourceError> {
        let SourceKind::Git(git) = &spec.kind else { panic!("GitSource::new needs a git source spec") };
        let git = git.clone();
        super::credentials::refuse_url_credentials(&git.url)?;
        let mirror = cache_dir.join(format!("{}.git", spec.name));
        Ok(GitSource { spec, git, mirror })
    }

    fn url(&self) -> String {
        redact_url(&self.git.url)
    }

    fn git_err(&self, op: &'static str) -> impl FnOnce(git2::Error) -> SourceError + '_ {
        move |source| SourceError::Git { op, url: self.url(), source }
    }

    fn open_mirror(&self) -> Result<Repository, SourceError> {
        match Repository::open_bare(&self.mirror) {
            Ok(repo) => Ok(repo),
            Err(_) => {
                std::fs::create_dir_all(&self.mirror)
                    .map_err(|source| SourceError::Io { path: self.mirror.clone(), source })?;
                Repository::init_bare(&self.mirror).map_err(self.git_err("init mirror"))
            }
        }
    }

    /// Fetches branches and tags into the mirror, forced.
    fn fetch(&self, repo: &Repository) -> Result<(), SourceError> {
        let mut remote = repo.remote_anonymous(&self.git.url).map_err(self.git_err("remote"))?;
        let mut callbacks = git2::RemoteCallbacks::new();
        let mut offered = false;
        callbacks.credentials(|url, username, allowed| {
            if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT) {
                let Some(credentials) = &self.git.credentials else {
                    return Err(git2::Error::from_str(
                        "the remote asks for a user name and password: give them with --git-credentials-file",
                    ));
                };
                if !super::credentials::may_send_to(url) {
                    return Err(git2::Error::from_str(
                        "credentials are sent over https only (or plain http to this host), never in the clear",
                    ));
                }
                // libgit2 asks again after a refusal: answering with the same pair would loop.
                if std::mem::replace(&mut offered, true) {
                    return Err(git2::Error::from_str("the remote refused the credentials of --git-credentials-file"));
                }
                return credentials.to_git();
            }
            if allowed.contains(git2::CredentialType::SSH_KEY) {
                if let Some(key) = std::env::var_os("IGNITE_GIT_SSH_KEY") {
                    return git2::Cred::ssh_key(username.unwrap_or("git"), None, Path::new(&key), None);
                }
                return git2::Cred::ssh_key_from_agent(username.unwrap_or("git"));
            }
            git2::Cred::default()
        });
        let mut options = FetchOptions::new();
        options.remote_callbacks(callbacks);
        options.download_tags(git2::AutotagOption::None);
        let refspecs = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"];
        remote.fetch(&refspecs, Some(&mut options), None).map_err(|source| {
            let unreachable =
                matches!(source.class(), ErrorClass::Net | ErrorClass::Ssh | ErrorClass::Http | ErrorClass::Os)
                    || source.code() == ErrorCode::NotFound
                    || source.message().contains("does not appear to be a git repository")
                    || source.message().contains("failed to resolve path");
            if unreachable {
                SourceError::RemoteUnreachable { url: self.url(), source }
            } else {
                SourceError::Git { op: "fetch", url: self.url(), source }
            }
        })?;
        Ok(())
    }

    fn resolve(&self, repo: &Repository) -> Result<Oid, SourceError> {
        let not_found = || SourceError::RefNotFound { reference: self.git.reference.clone(), url: self.url() };
        let object = match &self.git.reference {
            GitRef::Branch(b) => repo.revparse_single(&format!("refs/heads/{b}")),
            GitRef::Tag(t) => repo.revparse_single(&format!("refs/tags/{t}")),
            GitRef::Commit(c) => repo.revparse_single(c),
        }
        .map_err(|_| not_found())?;
        let commit = object.peel_to_commit().map_err(|_| not_found())?;
        Ok(commit.id())
    }

    fn read(&self, repo: &Repository, commit: Oid) -> Result<Vec<ManifestFile>, SourceError> {
        let revision = commit.to_string();
        let tree = repo.find_commit(commit).and_then(|c| c.tree()).map_err(self.git_err("read commit"))?;
        let path = self.git.path.trim_matches('/');
        let tree = if path.is_empty() {
            tree
        } else {
            let entry = tree
                .get_path(Path::new(path))
                .map_err(|_| SourceError::PathNotFound { path: path.to_string(), revision: revision.clone() })?;
            if entry.kind() != Some(ObjectType::Tree) {
                return Err(SourceError::PathNotFound { path: path.to_string(), revision });
            }
            repo.find_tree(entry.id()).map_err(self.git_err("read tree"))?
        };
        let mut found = Vec::new();
        tree.walk(TreeWalkMode::PreOrder, |dir, entry| {
            let name = entry.name().unwrap_or("");
            // Regular files only: symlinks (mode 0120000) could point anywhere.
            if entry.kind() == Some(ObjectType::Blob) && entry.filemode() != 0o120000 && is_manifest(name) {
                found.push((format!("{dir}{name}"), entry.id()));
            }
            TreeWalkResult::Ok
        })
        .map_err(self.git_err("walk tree"))?;
        let mut files = Vec::new();
        for (file, id) in found {
            let blob = repo.find_blob(id).map_err(self.git_err("read blob"))?;
            let text = String::from_utf8(blob.content().to_vec())
                .map_err(|_| SourceError::NotUtf8 { file: file.clone(), revision: revision.clone() })?;
            let shown = if path.is_empty() { file } else { format!("{path}/{file}") };
            files.push(ManifestFile { path: shown, text });
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }
}

impl Source for GitSource {
    fn spec(&self) -> &SourceSpec {
        &self.spec
    }

    fn sync(&self) -> Result<Snapshot, SourceError> {
        let repo = self.open_mirror()?;
        self.fetch(&repo)?;
        let commit = self.resolve(&repo)?;
        let files = self.read(&repo, commit)?;
        debug!(source = self.spec.name, %commit, files = files.len(), "synced");
        Ok(Snapshot { source: self.spec.name.clone(), revision: commit.to_string(), files })
    }
}
