//! Pulling an image from a registry into the content store with oci-client.
//!
//! Order matters for crash safety: blobs first (each verified and renamed into place by the content
//! store), the manifest blob next, the image record last. A crash or error at any point leaves at most
//! verified, unreferenced blobs, which [`ContentStore::gc`] removes; never a record with missing blobs.

use std::path::PathBuf;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use tracing::Instrument as _;

use crate::auth::{registry_auth, AuthError};
use crate::content::{ContentError, ContentStore};
use crate::import::{build_record, save_merged, ImportError, ManifestDoc, ManifestError};
use crate::import::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
use crate::progress::{ProgressFn, ProgressTracker};
use crate::reference::{ImageReference, ReferenceError};
use crate::{Digest, ImageRecord, StorePaths};

/// The largest manifest fetched when no descriptor declares its size (by tag): manifests are a
/// few KiB; containerd bounds them at 4 MiB too. A manifest named by an index is bounded by the
/// size the index declares.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// Layers downloaded at the same time: enough to hide latency, few enough not to flood a registry.
pub const MAX_CONCURRENT_DOWNLOADS: usize = 3;

/// How to pull.
#[derive(Clone, Default)]
pub struct PullOptions {
    /// Use plain HTTP instead of HTTPS (`--insecure`).
    pub insecure: bool,
    /// A docker `config.json` with credentials; `None` uses `$DOCKER_CONFIG` or `~/.docker`.
    pub auth_config: Option<PathBuf>,
    /// Credentials resolved by the caller (the CLI reads its user's config.json and sends them to
    /// the daemon): used instead of any config file.
    pub credentials: Option<crate::auth::RegistryAuth>,
    /// Called as bytes and layers arrive.
    pub progress: Option<ProgressFn>,
    /// How long a registry may take to accept a connection and between two reads.
    pub timeouts: PullTimeouts,
}

/// A registry that accepts a connection and then says nothing must not hold a pull (and the VM
/// waiting for it) forever; nor may one that trickles a byte now and then, just often enough to
/// never miss a read timeout: the whole pull has a bound too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PullTimeouts {
    /// To connect ([`DEFAULT_CONNECT_TIMEOUT`]).
    pub connect: std::time::Duration,
    /// Between two reads of one response ([`DEFAULT_READ_TIMEOUT`]).
    pub read: std::time::Duration,
    /// For the whole pull: manifests, config and every layer ([`DEFAULT_TOTAL_TIMEOUT`]).
    pub total: std::time::Duration,
}

/// The default [`PullTimeouts::connect`].
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The default [`PullTimeouts::read`].
pub const DEFAULT_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// The default [`PullTimeouts::total`]: a few GiB over a slow link, not a registry stalling forever.
pub const DEFAULT_TOTAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

impl Default for PullTimeouts {
    fn default() -> Self {
        PullTimeouts { connect: DEFAULT_CONNECT_TIMEOUT, read: DEFAULT_READ_TIMEOUT, total: DEFAULT_TOTAL_TIMEOUT }
    }
}

/// A pull failure.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The reference does not parse.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// The credentials file is unusable.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Nothing answers at the registry's address.
    #[error("registry {registry} is not reachable")]
    Unreachable {
        /// Registry host:port.
        registry: String,
        /// The cause.
        #[source]
        source: OciDistributionError,
    },
    /// The registry has no such tag, digest or repository.
    #[error("manifest unknown: {what} of {name}")]
    ManifestUnknown {
        /// `tag X` or `digest sha256:...`.
        what: String,
        /// `registry/repository`.
        name: String,
    },
    /// The registry refused our credentials (or wants some).
    #[error("registry {registry} denied access to {name}")]
    Unauthorized {
        /// Registry host:port.
        registry: String,
        /// `registry/repository`.
        name: String,
        /// The cause.
        #[source]
        source: OciDistributionError,
    },
    /// Any other registry failure.
    #[error("pulling {reference} failed")]
    Registry {
        /// The reference being pulled.
        reference: String,
        /// The cause.
        #[source]
        source: OciDistributionError,
    },
    /// A blob transfer broke off before all bytes arrived and the registry sent no more.
    #[error("downloading blob {digest} of {reference} failed")]
    Transfer {
        /// The blob.
        digest: Digest,
        /// The reference being pulled.
        reference: String,
        /// The cause.
        #[source]
        source: OciDistributionError,
    },
    /// The whole pull took longer than [`PullTimeouts::total`]; what it had downloaded is dropped.
    #[error("pulling {reference} did not finish within {}s (the daemon's --image-pull-timeout)", .limit.as_secs_f64())]
    TimedOut {
        /// The reference being pulled.
        reference: String,
        /// The bound.
        limit: std::time::Duration,
    },
    /// A manifest is longer than its descriptor declares, or than [`MAX_MANIFEST_BYTES`]; the
    /// transfer was cut off there, nothing more was read.
    #[error("the manifest of {reference} is longer than {limit} bytes (cut off after {received})")]
    ManifestTooLong {
        /// The reference (with the digest, for a manifest named by an index).
        reference: String,
        /// The declared size, or [`MAX_MANIFEST_BYTES`].
        limit: u64,
        /// Bytes received (or announced) when the transfer was cut off.
        received: u64,
    },
    /// A manifest or config is unusable (e.g. a zstd layer, no amd64 image).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A blob failed verification or could not be stored.
    #[error(transparent)]
    Content(#[from] ContentError),
    /// Writing the image record failed.
    #[error(transparent)]
    Record(#[from] ImportError),
    /// The async runtime of [`pull_blocking`] could not start.
    #[error("cannot start the pull runtime")]
    Runtime(#[source] std::io::Error),
}

/// Media types we accept for manifests: OCI and Docker, images and indexes.
const ACCEPTED: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST];

struct Puller<'a> {
    client: Client,
    /// For manifests, whose size oci-client does not bound (same timeouts as `client`).
    http: reqwest::Client,
    /// `http` or `https`.
    scheme: &'static str,
    auth: RegistryAuth,
    reference: &'a ImageReference,
    store: ContentStore,
}

impl Puller<'_> {
    fn classify(&self, e: OciDistributionError, what: Option<String>) -> PullError {
        let registry = self.reference.registry.clone();
        let name = self.reference.name();
        let what = what.unwrap_or_else(|| match (&self.reference.digest, &self.reference.tag) {
            (Some(d), _) => format!("digest {d}"),
            (None, Some(t)) => format!("tag {t}"),
            (None, None) => "latest".to_string(),
        });
        let unknown = match &e {
            OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|x| {
                matches!(x.code, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::NotFound)
            }),
            OciDistributionError::ImageManifestNotFoundError(_) => true,
            OciDistributionError::ServerError { code, .. } => *code == 404,
            _ => false,
        };
        match &e {
            _ if unknown => PullError::ManifestUnknown { what, name },
            OciDistributionError::RequestError(r) if r.is_connect() || r.is_timeout() => {
                PullError::Unreachable { registry, source: e }
            }
            OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
                PullError::Unauthorized { registry, name, source: e }
            }
            _ => PullError::Registry { reference: self.reference.to_string(), source: e },
        }
    }

    /// Fetches a manifest, at most `declared` bytes (its descriptor's size; [`MAX_MANIFEST_BYTES`]
    /// without one), and checks it against `at`'s digest when pinned. The body is read chunk by
    /// chunk and the transfer cut off past the bound: a registry cannot make us buffer an endless
    /// manifest (oci-client's `pull_manifest_raw` reads whole bodies).
    async fn manifest(&self, at: &ImageReference, declared: Option<u64>) -> Result<(Vec<u8>, Digest), PullError> {
        let what = at.digest.as_ref().map(|d| format!("digest {d}"));
        let oci = at.to_oci();
        // A bearer token (also cached for the blob requests), or None: basic or no auth.
        let token = self
            .client
            .auth(&oci, &self.auth, RegistryOperation::Pull)
            .await
            .map_err(|e| self.classify(e, what.clone()))?;
        let tag_or_digest = oci.digest().or(oci.tag()).unwrap_or("latest");
        let url =
            format!("{}://{}/v2/{}/manifests/{tag_or_digest}", self.scheme, oci.resolve_registry(), oci.repository());
        let mut request = self.http.get(&url).header(reqwest::header::ACCEPT, ACCEPTED.join(", "));
        request = match (token, &self.auth) {
            (Some(token), _) => request.bearer_auth(token),
            (None, RegistryAuth::Basic(user, password)) => request.basic_auth(user, Some(password)),
            _ => request,
        };
        let request_err = |e| self.classify(OciDistributionError::RequestError(e), what.clone());
        let mut response = request.send().await.map_err(request_err)?;
        let status = response.status();
        if !status.is_success() {
            let code = status.as_u16();
            let e = match code {
                401 | 403 => OciDistributionError::UnauthorizedError { url },
                _ => OciDistributionError::ServerError { code, url, message: status.to_string() },
            };
            return Err(self.classify(e, what));
        }
        let limit = declared.unwrap_or(MAX_MANIFEST_BYTES);
        let too_long = |received| PullError::ManifestTooLong { reference: at.to_string(), limit, received };
        if let Some(announced) = response.content_length().filter(|&n| n > limit) {
            return Err(too_long(announced));
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(request_err)? {
            let received = (bytes.len() + chunk.len()) as u64;
            if received > limit {
                return Err(too_long(received));
            }
            bytes.extend_from_slice(&chunk);
        }
        let actual = Digest::of_bytes(&bytes);
        if let Some(expected) = &at.digest {
            if *expected != actual {
                return Err(ContentError::DigestMismatch { expected: expected.clone(), actual }.into());
            }
        }
        Ok((bytes, actual))
    }

    /// Downloads one blob into the store unless present. `layer` blobs count towards layer progress.
    async fn blob(&self, digest: &Digest, size: u64, layer: bool, progress: &ProgressTracker) -> Result<(), PullError> {
        if self.store.has(digest) {
            tracing::debug!(%digest, "blob already present");
            if layer {
                progress.update(|p| {
                    p.bytes_done += size;
                    p.layers_done += 1;
                });
            }
            return Ok(());
        }
        let oci_ref = self.reference.to_oci();
        let mut stream = self
            .client
            .pull_blob_stream(&oci_ref, digest.as_str())
            .await
            .map_err(|e| self.classify(e, Some(format!("blob {digest}"))))?;
        let mut writer = self.store.writer(Some(digest.clone()), Some(size))?;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    writer.write(&bytes)?;
                    let n = bytes.len() as u64;
                    progress.update(|p| {
                        p.bytes_downloaded += n;
                        if layer {
                            p.bytes_done += n;
                        }
                    });
                }
                Err(e) => {
                    // oci-client's own verification or a broken connection ends the stream with an
                    // error; our writer has hashed every byte, so let it say what exactly is wrong.
                    tracing::debug!(%digest, error = %e, "blob stream ended with an error");
                    return match writer.commit() {
                        Ok(_) => Ok(()),
                        Err(c @ (ContentError::DigestMismatch { .. } | ContentError::SizeMismatch { .. })) => {
                            Err(c.into())
                        }
                        Err(_) => Err(PullError::Transfer {
                            digest: digest.clone(),
                            reference: self.reference.to_string(),
                            source: OciDistributionError::IoError(e),
                        }),
                    };
                }
            }
        }
        writer.commit()?;
        if layer {
            progress.update(|p| p.layers_done += 1);
        }
        Ok(())
    }
}

/// Pulls `reference` into the store at `paths` and records it; returns the record.
pub async fn pull(paths: &StorePaths, reference: &str, options: &PullOptions) -> Result<ImageRecord, PullError> {
    let parsed = ImageReference::parse(reference)?;
    let span = tracing::info_span!("pull", reference = %parsed);
    let limit = options.timeouts.total;
    // Dropping the pull on time-out drops its blob writers, which delete their temp files.
    match tokio::time::timeout(limit, pull_parsed(paths, &parsed, options).instrument(span)).await {
        Ok(result) => result,
        Err(_) => Err(PullError::TimedOut { reference: parsed.to_string(), limit }),
    }
}

async fn pull_parsed(
    paths: &StorePaths,
    parsed: &ImageReference,
    options: &PullOptions,
) -> Result<ImageRecord, PullError> {
    let auth = match &options.credentials {
        Some(credentials) => credentials.clone(),
        None => registry_auth(options.auth_config.as_deref(), &parsed.registry)?,
    };
    let config = ClientConfig {
        protocol: if options.insecure { ClientProtocol::Http } else { ClientProtocol::Https },
        connect_timeout: Some(options.timeouts.connect),
        read_timeout: Some(options.timeouts.read),
        ..Default::default()
    };
    let http = reqwest::Client::builder()
        .connect_timeout(options.timeouts.connect)
        .read_timeout(options.timeouts.read)
        .build()
        .map_err(|e| PullError::Registry { reference: parsed.to_string(), source: e.into() })?;
    let scheme = if options.insecure { "http" } else { "https" };
    let store = ContentStore::open(paths)?;
    let puller = Puller { client: Client::new(config), http, scheme, auth, reference: parsed, store };

    let (mut bytes, mut digest) = puller.manifest(parsed, None).await?;
    let mut doc = ManifestDoc::parse(&bytes, &digest)?;
    if doc.is_index() {
        let (chosen, size) = doc.select_amd64(&digest)?;
        tracing::debug!(index = %digest, manifest = %chosen, "resolved linux/amd64");
        (bytes, digest) = puller.manifest(&parsed.with_digest(chosen), Some(size)).await?;
        doc = ManifestDoc::parse(&bytes, &digest)?;
    }
    let (config_digest, layers) = doc.image_parts(&digest)?;
    let config_size = doc.config.as_ref().map_or(0, |c| c.size);

    let progress = ProgressTracker::new(options.progress.clone(), layers.iter().map(|l| l.size).sum(), layers.len());
    puller.blob(&config_digest, config_size, false, &progress).await?;
    // Each layer once, even if the manifest lists the same blob twice.
    let mut unique = Vec::new();
    for l in &layers {
        if !unique.iter().any(|u: &&crate::Layer| u.digest == l.digest) {
            unique.push(l);
        }
    }
    stream::iter(unique.into_iter().map(Ok))
        .try_for_each_concurrent(MAX_CONCURRENT_DOWNLOADS, |l| puller.blob(&l.digest, l.size, true, &progress))
        .await?;
    puller.store.put_bytes(&bytes, Some(digest.clone()))?;

    let record = build_record(&puller.store, vec![parsed.to_string()], digest, config_digest, layers)?;
    let record = save_merged(paths, record)?;
    let p = progress.get();
    tracing::info!(digest = %record.manifest_digest, downloaded = p.bytes_downloaded, "pulled image");
    Ok(record)
}

/// [`pull`] for synchronous callers (the CLI): runs it on a current-thread tokio runtime.
pub fn pull_blocking(paths: &StorePaths, reference: &str, options: &PullOptions) -> Result<ImageRecord, PullError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(PullError::Runtime)?;
    rt.block_on(pull(paths, reference, options))
}
