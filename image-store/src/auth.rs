//! Registry credentials from a docker-style `config.json`.
//!
//! Only static credentials are read (`auth` = base64 `user:pass`, or `username`/`password`); oci-client
//! exchanges them for bearer tokens itself when a registry asks for a token.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
/// Credentials for one registry (anonymous or user and password).
pub use oci_client::secrets::RegistryAuth;

/// A credentials file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file cannot be read.
    #[error("cannot read registry credentials {path}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid JSON of the docker config shape.
    #[error("registry credentials {path} are not a valid docker config.json")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// An `auth` entry is not base64 of `user:password`.
    #[error("credentials for {registry} in {path}: `auth` is not base64 of user:password")]
    BadAuth {
        /// The registry key.
        registry: String,
        /// The config file.
        path: PathBuf,
    },
}

#[derive(serde::Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
}

#[derive(serde::Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The default config path: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn default_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker/config.json"))
}

/// The host part of an `auths` key (`https://index.docker.io/v1/` -> `index.docker.io`).
fn key_host(key: &str) -> &str {
    let key = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    key.split('/').next().unwrap_or(key)
}

fn same_registry(key: &str, registry: &str) -> bool {
    let docker_hub = |h: &str| matches!(h, "docker.io" | "index.docker.io" | "registry-1.docker.io");
    let host = key_host(key);
    host == registry || (docker_hub(host) && docker_hub(registry))
}

/// Credentials for `registry` from `explicit` or, when `None`, the default config path.
/// A missing default file means anonymous access; a missing explicit file is an error.
pub fn registry_auth(explicit: Option<&Path>, registry: &str) -> Result<RegistryAuth, AuthError> {
    let (path, required) = match explicit {
        Some(p) => (p.to_path_buf(), true),
        None => match default_config_path() {
            Some(p) => (p, false),
            None => return Ok(RegistryAuth::Anonymous),
        },
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(source) => return Err(AuthError::Read { path, source }),
    };
    let config: DockerConfig =
        serde_json::from_slice(&bytes).map_err(|source| AuthError::Parse { path: path.clone(), source })?;
    let Some((key, entry)) = config.auths.iter().find(|(k, _)| same_registry(k, registry)) else {
        tracing::debug!(registry, config = %path.display(), "no credentials; pulling anonymously");
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let bad = || AuthError::BadAuth { registry: key.clone(), path: path.clone() };
        let decoded = base64::engine::general_purpose::STANDARD.decode(auth.trim()).map_err(|_| bad())?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
        let (user, pass) = decoded.split_once(':').ok_or_else(bad)?;
        return Ok(RegistryAuth::Basic(user.to_string(), pass.to_string()));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(RegistryAuth::Basic(u.clone(), p.clone())),
        _ => Ok(RegistryAuth::Anonymous),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(a: RegistryAuth) -> Option<(String, String)> {
        match a {
            RegistryAuth::Basic(u, p) => Some((u, p)),
            _ => None,
        }
    }

    #[test]
    fn reads_auth_and_username_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let enc = base64::engine::general_purpose::STANDARD.encode("alice:s3:cret");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{enc}"}},
                "https://index.docker.io/v1/":{{"username":"bob","password":"pw"}},
                "bad.example":{{"auth":"!!"}}}}}}"#
            ),
        )
        .unwrap();
        assert_eq!(
            basic(registry_auth(Some(&path), "127.0.0.1:5000").unwrap()),
            Some(("alice".into(), "s3:cret".into()))
        );
        assert_eq!(basic(registry_auth(Some(&path), "docker.io").unwrap()), Some(("bob".into(), "pw".into())));
        assert!(matches!(registry_auth(Some(&path), "other:1").unwrap(), RegistryAuth::Anonymous));
        let e = registry_auth(Some(&path), "bad.example").unwrap_err();
        assert!(e.to_string().contains("bad.example"), "{e}");
        let e = registry_auth(Some(&dir.path().join("missing.json")), "x").unwrap_err();
        assert!(e.to_string().contains("missing.json"), "{e}");
    }
}
