//! `ignite kernel`: guest kernels in the image store.

use clap::Subcommand;
use controller::grpc::{images, proto};
use image_store::StorePaths;

use super::client;

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

/// Runs a kernel subcommand: through the daemon when one answers, else directly on the store at
/// `paths`.
pub fn run(cmd: KernelCommand, paths: &StorePaths, ctx: &client::Ctx) -> anyhow::Result<()> {
    let rt = client::runtime()?;
    let api = rt.block_on(client::image_store(ctx))?.map(|(_, kernels)| kernels);
    match cmd {
        KernelCommand::Import { source, name } => {
            let record = match api {
                Some(mut c) => {
                    // The daemon resolves paths on its own filesystem: send an absolute one.
                    let source = match std::fs::canonicalize(&source) {
                        Ok(path) => {
                            client::refuse_remote_file(ctx, &path)?;
                            path.display().to_string()
                        }
                        Err(_) => source,
                    };
                    rt.block_on(c.import(proto::ImportKernelRequest { source, name }))
                        .map_err(client::status)?
                        .into_inner()
                }
                None => images::import_kernel(paths, &source, &name, true)?,
            };
            println!("{}  {}", record.name, record.digest);
        }
        KernelCommand::Ls => {
            let list = match api {
                Some(mut c) => rt.block_on(c.list(proto::Empty {})).map_err(client::status)?.into_inner().kernels,
                None => images::list_kernels(paths)?,
            };
            let rows: Vec<Vec<String>> = list
                .into_iter()
                .map(|k| {
                    let hex = k.digest.split_once(':').map_or(k.digest.as_str(), |(_, h)| h);
                    vec![k.name.clone(), short_digest(hex), human_size(k.size), k.source]
                })
                .collect();
            println!("{}", render(&["NAME", "DIGEST", "SIZE", "SOURCE"], &rows));
        }
        KernelCommand::Rm { name } => {
            match api {
                Some(mut c) => {
                    rt.block_on(c.remove(proto::KernelName { name: name.clone() })).map_err(client::status)?;
                }
                None => images::remove_kernel(paths, &name)?,
            }
            println!("{name}");
        }
    }
    Ok(())
}

/// The first 12 hex digits, as `docker images` shows IDs.
pub fn short_digest(hex: &str) -> String {
    hex.chars().take(12).collect()
}
