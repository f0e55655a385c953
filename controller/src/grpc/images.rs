//! Images and kernels of the image store, as the API shows them. The same functions serve the
//! `Images` and `Kernels` services and the CLI when no daemon runs (the image store is plain
//! files with its own locking, usable without the daemon).

use std::path::Path;

use image_store::content::ContentStore;
use image_store::images::{ImageIndex, ImageIndexError, Removal};
use image_store::kernel::{self, KernelError};
use image_store::{ImageRecord, StorePaths};
use tonic::{Request, Response, Status};

use super::proto::{self, images_server, kernels_server};
use super::server::{stream_from, ApiState, Stream_};
use guest_api::error_chain;

/// An image-store failure, with the gRPC code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    /// The image index.
    #[error(transparent)]
    Index(#[from] ImageIndexError),
    /// Kernels.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The content store (garbage collection after a removal).
    #[error(transparent)]
    Content(#[from] image_store::content::ContentError),
    /// Removing the image's base root filesystem.
    #[error(transparent)]
    BaseRootfs(#[from] image_store::RootfsError),
    /// Importing an image.
    #[error(transparent)]
    Import(#[from] image_store::import::ImportError),
    /// Pulling an image.
    #[error(transparent)]
    Pull(#[from] image_store::pull::PullError),
    /// A path a remote client may not name.
    #[error("over TCP only paths under --allow-host-path can be imported")]
    HostPath(#[from] crate::api::HostPathError),
    /// A kernel source that is neither a file nor a pulled image.
    #[error("`{0}` is neither a kernel file nor a pulled image (pull it with `ignite image pull {0}`)")]
    NoKernelSource(String),
}

impl From<ImagesError> for Status {
    fn from(e: ImagesError) -> Status {
        let message = error_chain(&e);
        match e {
            ImagesError::Index(ImageIndexError::NotFound(_))
            | ImagesError::Kernel(KernelError::NotFound(_))
            | ImagesError::NoKernelSource(_) => Status::not_found(message),
            ImagesError::Index(ImageIndexError::Ambiguous { .. })
            | ImagesError::Kernel(KernelError::InvalidName(_)) => Status::invalid_argument(message),
            ImagesError::HostPath(_) => Status::permission_denied(message),
            ImagesError::Kernel(KernelError::AlreadyExists(_)) => Status::already_exists(message),
            ImagesError::Import(_) | ImagesError::Pull(_) => Status::failed_precondition(message),
            _ => Status::internal(message),
        }
    }
}

/// An image record as the API shows it.
pub fn image(record: &ImageRecord) -> proto::Image {
    proto::Image {
        references: record.references.clone(),
        digest: record.manifest_digest.to_string(),
        layers: record.layers.len() as u32,
        size: record.size,
    }
}

/// Every stored image.
pub fn list_images(paths: &StorePaths) -> Result<Vec<proto::Image>, ImagesError> {
    Ok(ImageIndex::open(paths)?.list()?.iter().map(image).collect())
}

/// Removes an image (or only one of its references) and garbage-collects unshared blobs.
pub fn remove_image(paths: &StorePaths, query: &str) -> Result<proto::RemoveImageResponse, ImagesError> {
    let index = ImageIndex::open(paths)?;
    Ok(match index.remove(query)? {
        Removal::Untagged(kept) => {
            proto::RemoveImageResponse { digest: kept.manifest_digest.to_string(), untagged: true, freed_bytes: 0 }
        }
        Removal::Removed(removed) => {
            image_store::remove_base_rootfs(paths, &removed.manifest_digest)?;
            let freed = ContentStore::open(paths)?.gc(&index.referenced_blobs()?)?;
            proto::RemoveImageResponse {
                digest: removed.manifest_digest.to_string(),
                untagged: false,
                freed_bytes: freed,
            }
        }
    })
}

/// Imports an OCI layout directory or a `docker save` tarball.
pub fn import_image(paths: &StorePaths, path: &Path, tag: Option<&str>) -> Result<proto::Image, ImagesError> {
    Ok(image(&image_store::import::import(paths, path, tag)?))
}

/// A kernel record as the API shows it.
pub fn kernel(record: &kernel::KernelRecord) -> proto::Kernel {
    proto::Kernel {
        name: record.name.clone(),
        digest: record.digest.to_string(),
        size: record.size,
        source: record.source.clone(),
    }
}

/// Every imported kernel.
pub fn list_kernels(paths: &StorePaths) -> Result<Vec<proto::Kernel>, ImagesError> {
    Ok(kernel::list(paths)?.iter().map(kernel).collect())
}

/// Imports a kernel from a file (when `files` allows it), or from a pulled image's `/boot/vmlinux`.
pub fn import_kernel(paths: &StorePaths, source: &str, name: &str, files: bool) -> Result<proto::Kernel, ImagesError> {
    let file = Path::new(source);
    let record = if files && file.exists() {
        kernel::import_file(paths, file, name)?
    } else {
        let image = ImageIndex::open(paths)?.find(source).map_err(|e| match e {
            ImageIndexError::NotFound(_) => ImagesError::NoKernelSource(source.to_string()),
            other => other.into(),
        })?;
        kernel::import_from_image(paths, &image, name)?
    };
    Ok(kernel(&record))
}

/// Removes a kernel.
pub fn remove_kernel(paths: &StorePaths, name: &str) -> Result<(), ImagesError> {
    Ok(kernel::remove(paths, name)?)
}

/// Runs blocking image-store work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImagesError> + Send + 'static,
) -> Result<Response<T>, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map(Response::new).map_err(Status::from),
        Err(e) => Err(Status::internal(format!("image store task failed: {e}"))),
    }
}

fn progress(p: &image_store::progress::PullProgress) -> proto::PullProgress {
    proto::PullProgress {
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        bytes_downloaded: p.bytes_downloaded,
        layers_done: p.layers_done as u32,
        layers_total: p.layers_total as u32,
        image: None,
    }
}

#[tonic::async_trait]
impl images_server::Images for ApiState {
    async fn list(&self, _: Request<proto::Empty>) -> Result<Response<proto::ListImagesResponse>, Status> {
        let paths = self.images.clone();
        blocking(move || Ok(proto::ListImagesResponse { images: list_images(&paths)? })).await
    }

    type PullStream = Stream_<proto::PullProgress>;

    async fn pull(&self, request: Request<proto::PullImageRequest>) -> Result<Response<Self::PullStream>, Status> {
        let request = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let paths = self.images.clone();
        let insecure = request.insecure
            || self.insecure_registries
            || crate::host::artifacts::is_loopback_registry(&request.reference);
        tokio::spawn(async move {
            let reporter = tx.clone();
            let credentials =
                request.credentials.map(|c| image_store::auth::RegistryAuth::Basic(c.username, c.password));
            let options = image_store::pull::PullOptions {
                insecure,
                auth_config: None,
                credentials,
                // Progress is sampled: a full channel drops an update, never blocks the pull.
                progress: Some(std::sync::Arc::new(move |p| {
                    let _ = reporter.try_send(Ok(progress(&p)));
                })),
                ..Default::default()
            };
            let last = match image_store::pull::pull(&paths, &request.reference, &options).await {
                Ok(record) => {
                    let size = record.size;
                    let layers = record.layers.len() as u32;
                    Ok(proto::PullProgress {
                        bytes_done: size,
                        bytes_total: size,
                        layers_done: layers,
                        layers_total: layers,
                        bytes_downloaded: 0,
                        image: Some(image(&record)),
                    })
                }
                Err(e) => Err(Status::from(ImagesError::from(e))),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(stream_from(rx)))
    }

    async fn import(&self, request: Request<proto::ImportImageRequest>) -> Result<Response<proto::Image>, Status> {
        let request = request.into_inner();
        let paths = self.images.clone();
        let tag = Some(request.tag).filter(|t| !t.is_empty());
        let path = self.client_path(&request.path)?;
        blocking(move || import_image(&paths, &path, tag.as_deref())).await
    }

    async fn remove(&self, request: Request<proto::ImageName>) -> Result<Response<proto::RemoveImageResponse>, Status> {
        let name = request.into_inner().name;
        let paths = self.images.clone();
        blocking(move || remove_image(&paths, &name)).await
    }
}

#[tonic::async_trait]
impl kernels_server::Kernels for ApiState {
    async fn list(&self, _: Request<proto::Empty>) -> Result<Response<proto::ListKernelsResponse>, Status> {
        let paths = self.images.clone();
        blocking(move || Ok(proto::ListKernelsResponse { kernels: list_kernels(&paths)? })).await
    }

    async fn import(&self, request: Request<proto::ImportKernelRequest>) -> Result<Response<proto::Kernel>, Status> {
        let request = request.into_inner();
        let paths = self.images.clone();
        // A remote client's source is a file only if absolute and allowed; else an image.
        let (source, files) = if self.local_clients {
            (request.source, true)
        } else if request.source.starts_with('/') {
            (self.client_path(&request.source)?.display().to_string(), true)
        } else {
            (request.source, false)
        };
        blocking(move || import_kernel(&paths, &source, &request.name, files)).await
    }

    async fn remove(&self, request: Request<proto::KernelName>) -> Result<Response<proto::Empty>, Status> {
        let name = request.into_inner().name;
        let paths = self.images.clone();
        blocking(move || remove_kernel(&paths, &name).map(|()| proto::Empty {})).await
    }
}

impl ApiState {
    /// A path on the daemon's host named by the client: any path for local clients (who can read
    /// it themselves), else only one under the host's allowed directories.
    fn client_path(&self, path: &str) -> Result<std::path::PathBuf, Status> {
        if self.local_clients {
            return Ok(path.into());
        }
        self.policy.paths.resolve(Path::new(path)).map_err(|e| ImagesError::HostPath(e).into())
    }
}
