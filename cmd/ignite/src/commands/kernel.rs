//! `ignite kernel`: guest kernels in the image store.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use image_store::{kernel, StorePaths};

use super::table::{human_size, render};

/// Kernel subcommands.
#[derive(Subcommand)]
pub enum KernelCommand {
    /// Import a kernel from a local vmlinux/bzImage file, or from an image already pulled that
    /// carries /boot/vmlinux.
    ///
    /// Example: ignite kernel import ./vmlinux --name 6.1-minimal
    Import {
        /// A kernel file path, or an image reference or digest known to `ignite image ls`.
        source: String,
        /// The name VMs use to refer to this kernel.
        #[arg(long)]
        name: String,
    },
    /// List imported kernels.
    #[command(alias = "list")]
    Ls,
    /// Remove a kernel.
    Rm {
        /// The kernel's name.
        name: String,
    },
}

/// Runs a kernel subcommand against the store at `paths`.
pub fn run(cmd: KernelCommand, paths: &StorePaths) -> anyhow::Result<()> {
    match cmd {
        KernelCommand::Import { source, name } => {
            let file = PathBuf::from(&source);
            let record = if file.exists() {
                kernel::import_file(paths, &file, &name)?
            } else {
                let image = super::image::find(paths, &source).with_context(|| {
                    format!("`{source}` is neither a kernel file nor a pulled image (pull it with `ignite image pull {source}`)")
                })?;
                kernel::import_from_image(paths, &image, &name)?
            };
            println!("{}  {}", record.name, record.digest);
        }
        KernelCommand::Ls => {
            let rows: Vec<Vec<String>> = kernel::list(paths)?
                .into_iter()
                .map(|k| vec![k.name, short_digest(k.digest.hex()), human_size(k.size), k.source])
                .collect();
            println!("{}", render(&["NAME", "DIGEST", "SIZE", "SOURCE"], &rows));
        }
        KernelCommand::Rm { name } => {
            kernel::remove(paths, &name)?;
            println!("{name}");
        }
    }
    Ok(())
}

/// The first 12 hex digits, as `docker images` shows IDs.
pub fn short_digest(hex: &str) -> String {
    hex.chars().take(12).collect()
}
