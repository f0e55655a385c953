//! Image references (`busybox`, `library/busybox:1.36`, `127.0.0.1:5000/x/y:tag`, `name@sha256:...`)
//! normalised the way the docker CLI does, so `busybox` and `docker.io/library/busybox:latest` are one image.

use std::fmt;
use std::str::FromStr;

use crate::Digest;

/// The registry a reference without a registry part names.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// The tag a reference without tag or digest names.
pub const DEFAULT_TAG: &str = "latest";

/// A parsed, normalised image reference.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageReference {
    /// Registry host (and port), e.g. `docker.io` or `127.0.0.1:5000`.
    pub registry: String,
    /// Repository path, e.g. `library/busybox`.
    pub repository: String,
    /// Tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// Manifest digest, when the reference pins one.
    pub digest: Option<Digest>,
}

/// A string that is not a valid image reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid image reference `{reference}`: {reason}")]
pub struct ReferenceError {
    /// The reference as given.
    pub reference: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ImageReference {
    /// Parses `s`, filling in `docker.io`, `library/` and `latest` as the docker CLI does.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        let err = |reason: &str| ReferenceError { reference: s.to_string(), reason: reason.to_string() };
        if s.is_empty() {
            return Err(err("empty"));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("contains whitespace"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => (rest, Some(d.parse::<Digest>().map_err(|e| err(&e.to_string()))?)),
            None => (s, None),
        };
        // A tag is the part after the last ':' that comes after the last '/', so `host:5000/x` has no tag.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            let valid = !tag.is_empty()
                && tag.len() <= 128
                && !tag.starts_with(['.', '-'])
                && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !valid {
                return Err(err("bad tag"));
            }
        }
        // The first component is a registry only if it looks like a host: has '.', ':' or is localhost.
        let (registry, repository) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), path.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" { DEFAULT_REGISTRY.to_string() } else { registry };
        let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.is_empty() {
            return Err(err("empty repository name"));
        }
        for component in repository.split('/') {
            let valid = !component.is_empty()
                && component.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && component.as_bytes()[0].is_ascii_alphanumeric();
            if !valid {
                return Err(err("repository components must be lowercase letters, digits, '.', '_' or '-'"));
            }
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (None, Some(_)) => None,
        };
        Ok(ImageReference { registry, repository, tag, digest })
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The equivalent oci-client reference.
    pub fn to_oci(&self) -> oci_client::Reference {
        match (&self.tag, &self.digest) {
            (_, Some(d)) => {
                oci_client::Reference::with_digest(self.registry.clone(), self.repository.clone(), d.to_string())
            }
            (Some(t), None) => {
                oci_client::Reference::with_tag(self.registry.clone(), self.repository.clone(), t.clone())
            }
            (None, None) => {
                oci_client::Reference::with_tag(self.registry.clone(), self.repository.clone(), DEFAULT_TAG.to_string())
            }
        }
    }

    /// The same repository pinned to `digest` (the tag dropped).
    pub fn with_digest(&self, digest: Digest) -> ImageReference {
        ImageReference { tag: None, digest: Some(digest), ..self.clone() }
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageReference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageReference::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_docker() {
        let cases = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("library/busybox:1.36", "docker.io/library/busybox:1.36"),
            ("index.docker.io/foo/bar", "docker.io/foo/bar:latest"),
            ("127.0.0.1:5000/x/y:tag", "127.0.0.1:5000/x/y:tag"),
            ("localhost/x", "localhost/x:latest"),
            ("127.0.0.1:5000/x", "127.0.0.1:5000/x:latest"),
        ];
        for (input, want) in cases {
            assert_eq!(ImageReference::parse(input).unwrap().to_string(), want, "{input}");
        }
        let d = Digest::of_bytes(b"x");
        let r = ImageReference::parse(&format!("127.0.0.1:5000/x@{d}")).unwrap();
        assert_eq!(r.digest, Some(d.clone()));
        assert_eq!(r.tag, None);
        assert_eq!(r.to_oci().digest(), Some(d.as_str()));
        assert_eq!(r.to_oci().registry(), "127.0.0.1:5000");
    }

    #[test]
    fn rejects_bad_references_naming_them() {
        for bad in ["", "Busybox", "x:", "x@sha256:12", "a//b", "x:bad tag", "x:-t", "/x"] {
            let e = ImageReference::parse(bad).unwrap_err();
            assert!(e.to_string().contains(&format!("`{bad}`")), "{e}");
        }
    }
}
