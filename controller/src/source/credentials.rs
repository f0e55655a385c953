//! Credentials for https git remotes (`ignite daemon --git-credentials-file FILE`).
//!
//! A URL with credentials in it (`https://user:token@host/fleet.git`) would show the token in the
//! process list, in logs, events and the API's source list, so such URLs are refused
//! ([`refuse_url_credentials`]); the token comes from a file only root can read instead, and
//! goes to the remote through libgit2's credentials callback.
//!
//! The file holds one line: `USERNAME:PASSWORD`, or a token alone (sent as the password of user
//! [`TOKEN_USERNAME`], which GitHub, GitLab and Gitea accept with a personal access token). It
//! must not be readable or writable by group or others.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The user name sent with a token given alone.
pub const TOKEN_USERNAME: &str = "x-access-token";
/// The largest credentials file read: one line.
pub const MAX_CREDENTIALS_FILE_BYTES: u64 = 4096;

/// A user name and password for https remotes. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct GitCredentials {
    /// The user name.
    pub username: String,
    password: String,
}

impl std::fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitCredentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

/// Why the credentials file or a URL is refused. No message carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file cannot be read.
    #[error("cannot read the git credentials file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Others may read (or change) the file.
    #[error(
        "the git credentials file {path} is readable or writable by other users (mode {mode:o}): chmod 600 {path}"
    )]
    Open {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// Not one line of `USERNAME:PASSWORD` or a token.
    #[error("the git credentials file {path} {problem}: expected one line, USERNAME:PASSWORD or a token")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: &'static str,
    },
    /// The URL carries credentials.
    #[error(
        "the git URL {url} has credentials in it, which would show in the process list, logs and status: \
         remove them from the URL and put them in a file (mode 0600) given to --git-credentials-file"
    )]
    InUrl {
        /// The URL without its credentials.
        url: String,
    },
}

impl GitCredentials {
    /// Reads the credentials file at `path` (see the module docs).
    pub fn load(path: &Path) -> Result<GitCredentials, CredentialsError> {
        let read = |source| CredentialsError::Read { path: path.to_path_buf(), source };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(CredentialsError::Open { path: path.to_path_buf(), mode });
        }
        let malformed = |problem| CredentialsError::Malformed { path: path.to_path_buf(), problem };
        if !meta.is_file() || meta.len() > MAX_CREDENTIALS_FILE_BYTES {
            return Err(malformed("is not a small regular file"));
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let (Some(line), None) = (lines.next(), lines.next()) else {
            return Err(malformed("does not hold exactly one line"));
        };
        let (username, password) = line.split_once(':').unwrap_or((TOKEN_USERNAME, line));
        if username.is_empty() || password.is_empty() {
            return Err(malformed("has an empty user name or password"));
        }
        Ok(GitCredentials { username: username.to_string(), password: password.to_string() })
    }

    /// A libgit2 credential for these.
    pub fn to_git(&self) -> Result<git2::Cred, git2::Error> {
        git2::Cred::userpass_plaintext(&self.username, &self.password)
    }
}

/// Refuses a URL whose authority carries a user name and password or a token (`scheme://X@host`
/// for http, https and git). ssh URLs keep their user name (`ssh://git@host/x`: not a secret).
pub fn refuse_url_credentials(url: &str) -> Result<(), CredentialsError> {
    let Some((scheme, rest)) = url.split_once("://") else { return Ok(()) };
    if scheme.eq_ignore_ascii_case("ssh") || scheme.eq_ignore_ascii_case("file") {
        return Ok(());
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(CredentialsError::InUrl { url: super::redact_url(url) });
    }
    Ok(())
}

/// Whether credentials may be sent to `url`: over https, or plain http to this host only (the
/// password would otherwise cross the network in the clear).
pub fn may_send_to(url: &str) -> bool {
    let Some((scheme, rest)) = url.split_once("://") else { return false };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = host.rsplit_once(':').filter(|(h, p)| !h.ends_with(']') || p.is_empty()).map_or(host, |(h, _)| h);
    match scheme.to_ascii_lowercase().as_str() {
        "https" => true,
        "http" => host == "localhost" || host.starts_with("127.") || host == "[::1]",
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(mode: u32, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        (dir, path)
    }

    #[test]
    fn files_of_one_line_readable_by_root_only() {
        let (_d, path) = file(0o600, "alice:s3cret\n");
        let c = GitCredentials::load(&path).unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("alice", "s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
        let (_d, path) = file(0o400, "ghp_token\n");
        let c = GitCredentials::load(&path).unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), (TOKEN_USERNAME, "ghp_token"));

        let (_d, path) = file(0o644, "alice:s3cret\n");
        let e = GitCredentials::load(&path).unwrap_err().to_string();
        assert!(e.contains("mode 644") && e.contains("chmod 600") && !e.contains("s3cret"), "{e}");
        let (_d, path) = file(0o600, "a:b\nc:d\n");
        let e = GitCredentials::load(&path).unwrap_err().to_string();
        assert!(e.contains("exactly one line") && !e.contains("a:b"), "{e}");
        let (_d, path) = file(0o600, "alice:\n");
        assert!(GitCredentials::load(&path).is_err());
    }

    #[test]
    fn urls_with_credentials_are_refused_without_showing_them() {
        let e = refuse_url_credentials("https://user:tok3n@git.example.com/fleet.git").unwrap_err().to_string();
        assert!(e.contains("https://git.example.com/fleet.git") && e.contains("--git-credentials-file"), "{e}");
        assert!(!e.contains("tok3n"), "{e}");
        assert!(refuse_url_credentials("https://tok3n@git.example.com/x").is_err());
        assert!(refuse_url_credentials("https://git.example.com/x@y").is_ok());
        assert!(refuse_url_credentials("ssh://git@host/x").is_ok());
        assert!(refuse_url_credentials("git@host:x.git").is_ok());
        assert!(refuse_url_credentials("file:///srv/fleet").is_ok());
    }

    #[test]
    fn credentials_go_over_https_or_to_this_host_only() {
        assert!(may_send_to("https://git.example.com/x"));
        assert!(may_send_to("http://127.0.0.1:8080/x"));
        assert!(may_send_to("http://localhost/x"));
        assert!(!may_send_to("http://git.example.com/x"));
        assert!(!may_send_to("git://git.example.com/x"));
    }
}
