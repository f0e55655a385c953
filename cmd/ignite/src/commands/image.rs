//! `ignite image`: OCI images in the store.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use controller::grpc::proto;
use controller::grpc::proto::images_client::ImagesClient;

use super::client;
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

/// Runs an image subcommand through the daemon (started when none answers), which owns the store.
pub fn run(cmd: ImageCommand, ctx: &client::Ctx) -> anyhow::Result<()> {
    let rt = client::runtime()?;
    let mut api = rt.block_on(async { anyhow::Ok(ImagesClient::new(client::channel(ctx).await?)) })?;
    match cmd {
        ImageCommand::Pull { reference, insecure, auth_config } => {
            // This user's credentials, sent along (the daemon may run as another user, or elsewhere).
            let credentials = credentials(&reference, auth_config.as_deref())?;
            let bar = ProgressBar::new(&reference);
            let image = rt.block_on(async {
                let request = proto::PullImageRequest { reference: reference.clone(), insecure, credentials };
                let mut stream = api.pull(request).await.map_err(client::status)?.into_inner();
                while let Some(p) = stream.message().await.map_err(client::status)? {
                    if let Some(image) = p.image {
                        return Ok(image);
                    }
                    bar.update(p.bytes_done, p.bytes_total, p.layers_done as usize, p.layers_total as usize);
                }
                anyhow::bail!("the daemon ended the pull of {reference} without a result")
            })?;
            bar.finish(image.size, image.layers as usize);
            println!("{}", image.digest);
        }
        ImageCommand::Import { path, tag } => {
            client::refuse_remote_file(ctx, &path)?;
            let path = std::fs::canonicalize(&path).with_context(|| format!("{}", path.display()))?;
            let request = proto::ImportImageRequest { path: path.display().to_string(), tag: tag.unwrap_or_default() };
            let image = rt.block_on(api.import(request)).map_err(client::status)?.into_inner();
            println!("{}", image.digest);
        }
        ImageCommand::Ls => {
            let list = rt.block_on(api.list(proto::Empty {})).map_err(client::status)?.into_inner().images;
            let rows: Vec<Vec<String>> = list
                .into_iter()
                .map(|image| {
                    let name = if image.references.is_empty() { "<none>".into() } else { image.references.join(", ") };
                    let hex = image.digest.split_once(':').map_or(image.digest.as_str(), |(_, h)| h);
                    vec![name, short_digest(hex), image.layers.to_string(), human_size(image.size)]
                })
                .collect();
            println!("{}", render(&["REFERENCE", "DIGEST", "LAYERS", "SIZE"], &rows));
        }
        ImageCommand::Rm { image } => {
            let removed =
                rt.block_on(api.remove(proto::ImageName { name: image.clone() })).map_err(client::status)?.into_inner();
            if removed.untagged {
                println!("untagged {image} ({} keeps its other references)", removed.digest);
            } else {
                println!("{} (freed {})", removed.digest, human_size(removed.freed_bytes));
            }
        }
    }
    Ok(())
}

/// The credentials for `reference`'s registry in `auth_config` (default: this user's docker
/// config.json); `None` when there are none (the pull is anonymous).
fn credentials(
    reference: &str,
    auth_config: Option<&std::path::Path>,
) -> anyhow::Result<Option<proto::RegistryCredentials>> {
    let parsed = image_store::reference::ImageReference::parse(reference)?;
    Ok(match image_store::auth::registry_auth(auth_config, &parsed.registry)? {
        image_store::auth::RegistryAuth::Basic(username, password) => {
            Some(proto::RegistryCredentials { username, password })
        }
        _ => None,
    })
}

/// A pull progress bar on stderr (`[=====>    ] 45%  23.1 MiB / 51.0 MiB  2/3 layers`), redrawn
/// at most ten times a second when stderr is a terminal, and printed once per finished layer
/// otherwise (logs stay readable).
#[derive(Clone)]
struct ProgressBar {
    reference: String,
    state: Arc<Mutex<(Instant, usize)>>,
    tty: bool,
}

/// Characters between the bar's brackets.
const BAR_WIDTH: usize = 30;

/// The bar's text for `done` of `total` bytes.
fn bar_line(reference: &str, done: u64, total: u64, layers_done: usize, layers_total: usize) -> String {
    let fraction = if total == 0 { 1.0 } else { (done as f64 / total as f64).min(1.0) };
    let filled = (fraction * BAR_WIDTH as f64).round() as usize;
    let head = if filled < BAR_WIDTH { ">" } else { "" };
    let bar = format!("{}{head}{}", "=".repeat(filled), " ".repeat(BAR_WIDTH - filled - head.len()));
    format!(
        "{reference} [{bar}] {:>3}%  {} / {}  {layers_done}/{layers_total} layers",
        (fraction * 100.0).round() as u32,
        human_size(done),
        human_size(total)
    )
}

impl ProgressBar {
    fn new(reference: &str) -> Self {
        let tty = std::io::stderr().is_terminal();
        ProgressBar { reference: reference.into(), state: Arc::new(Mutex::new((Instant::now(), usize::MAX))), tty }
    }

    fn update(&self, done: u64, total: u64, layers_done: usize, layers_total: usize) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last_draw, last_layers) = &mut *state;
        let line = bar_line(&self.reference, done, total, layers_done, layers_total);
        if self.tty {
            if last_draw.elapsed() >= Duration::from_millis(100) {
                eprint!("\r\x1b[2K{line}");
                let _ = std::io::stderr().flush();
                *last_draw = Instant::now();
            }
        } else if *last_layers != layers_done {
            eprintln!("{line}");
            *last_layers = layers_done;
        }
    }

    fn finish(&self, size: u64, layers: usize) {
        let line = bar_line(&self.reference, size, size, layers, layers);
        if self.tty {
            eprintln!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_the_bytes() {
        let half = bar_line("busybox", 512, 1024, 1, 2);
        assert!(half.starts_with("busybox [===============>              ]  50%"), "{half}");
        assert!(half.ends_with("512 B / 1.0 KiB  1/2 layers"), "{half}");
        let full = bar_line("busybox", 1024, 1024, 2, 2);
        assert!(full.contains(&format!("[{}] 100%", "=".repeat(BAR_WIDTH))), "{full}");
        assert!(bar_line("empty", 0, 0, 0, 0).contains("100%"));
    }
}
