//! `ignite image`: OCI images in the store.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Subcommand;
use image_store::content::ContentStore;
use image_store::images::{ImageIndex, Removal};
use image_store::progress::PullProgress;
use image_store::pull::{pull_blocking, PullOptions};
use image_store::{ImageRecord, StorePaths};

use super::kernel::short_digest;
use super::table::{human_size, render};

/// Image subcommands.
#[derive(Subcommand)]
pub enum ImageCommand {
    /// Pull an image from a registry (only linux/amd64 is stored).
    ///
    /// Credentials come from a docker-style config.json ($DOCKER_CONFIG or ~/.docker).
    /// Example: ignite image pull 127.0.0.1:5000/busybox:latest --insecure
    Pull {
        /// Image reference: [registry/]repository[:tag|@digest].
        reference: String,
        /// Use plain HTTP (for a local registry without TLS).
        #[arg(long)]
        insecure: bool,
        /// A docker config.json with credentials, instead of the default one.
        #[arg(long, value_name = "PATH")]
        auth_config: Option<PathBuf>,
    },
    /// Import an image without a registry: an OCI layout directory or a `docker save` tarball.
    Import {
        /// The directory or tarball.
        path: PathBuf,
        /// Name the image (otherwise the name recorded in the archive, if any).
        #[arg(long)]
        tag: Option<String>,
    },
    /// List stored images.
    #[command(alias = "list")]
    Ls,
    /// Remove an image by reference, digest or digest prefix, and its unshared blobs. A reference of an
    /// image that has other references is only untagged, as with `docker rmi`.
    Rm {
        /// The image.
        image: String,
    },
}

/// Runs an image subcommand against the store at `paths`.
pub fn run(cmd: ImageCommand, paths: &StorePaths) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Pull { reference, insecure, auth_config } => {
            let progress = ProgressLine::new(&reference);
            let report = progress.clone();
            let options = PullOptions {
                insecure,
                auth_config,
                progress: Some(Arc::new(move |p: PullProgress| report.update(&p))),
            };
            let record = pull_blocking(paths, &reference, &options)?;
            progress.finish();
            println!("{}", record.manifest_digest);
        }
        ImageCommand::Import { path, tag } => {
            let record = image_store::import::import(paths, &path, tag.as_deref())?;
            println!("{}", record.manifest_digest);
        }
        ImageCommand::Ls => {
            let rows: Vec<Vec<String>> = ImageIndex::open(paths)?
                .list()?
                .into_iter()
                .map(|image| {
                    let name = if image.references.is_empty() { "<none>".into() } else { image.references.join(", ") };
                    vec![
                        name,
                        short_digest(image.manifest_digest.hex()),
                        image.layers.len().to_string(),
                        human_size(image.size),
                    ]
                })
                .collect();
            println!("{}", render(&["REFERENCE", "DIGEST", "LAYERS", "SIZE"], &rows));
        }
        ImageCommand::Rm { image } => {
            let index = ImageIndex::open(paths)?;
            match index.remove(&image)? {
                Removal::Untagged(kept) => {
                    println!("untagged {image} ({} keeps its other references)", kept.manifest_digest)
                }
                Removal::Removed(removed) => {
                    image_store::remove_base_rootfs(paths, &removed.manifest_digest)?;
                    let freed = ContentStore::open(paths)?.gc(&index.referenced_blobs()?)?;
                    println!("{} (freed {})", removed.manifest_digest, human_size(freed));
                }
            }
        }
    }
    Ok(())
}

/// Finds a stored image by reference, digest or digest prefix.
pub fn find(paths: &StorePaths, query: &str) -> anyhow::Result<ImageRecord> {
    Ok(ImageIndex::open(paths)?.find(query)?)
}

/// A one-line pull progress display on stderr, redrawn at most ten times a second when stderr is a
/// terminal, and printed once per finished layer otherwise (logs stay readable).
#[derive(Clone)]
struct ProgressLine {
    reference: String,
    state: Arc<Mutex<(Instant, usize)>>,
    tty: bool,
}

impl ProgressLine {
    fn new(reference: &str) -> Self {
        let tty = std::io::stderr().is_terminal();
        ProgressLine { reference: reference.into(), state: Arc::new(Mutex::new((Instant::now(), usize::MAX))), tty }
    }

    fn update(&self, p: &PullProgress) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last_draw, last_layers) = &mut *state;
        let line = format!(
            "{}: {}/{} layers, {} / {} ({} downloaded)",
            self.reference,
            p.layers_done,
            p.layers_total,
            human_size(p.bytes_done),
            human_size(p.bytes_total),
            human_size(p.bytes_downloaded)
        );
        if self.tty {
            if last_draw.elapsed() >= Duration::from_millis(100) || p.layers_done == p.layers_total {
                eprint!("\r\x1b[2K{line}");
                let _ = std::io::stderr().flush();
                *last_draw = Instant::now();
            }
        } else if *last_layers != p.layers_done {
            eprintln!("{line}");
            *last_layers = p.layers_done;
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
