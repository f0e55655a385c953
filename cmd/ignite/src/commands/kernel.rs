//! `ignite kernel`: guest kernels in the image store.

use clap::Subcommand;
use controller::grpc::proto;
use controller::grpc::proto::kernels_client::KernelsClient;

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

/// Runs a kernel subcommand through the daemon (started when none answers), which owns the store.
pub fn run(cmd: KernelCommand, ctx: &client::Ctx) -> anyhow::Result<()> {
    let rt = client::runtime()?;
    let mut api = rt.block_on(async { anyhow::Ok(KernelsClient::new(client::channel(ctx).await?)) })?;
    match cmd {
        KernelCommand::Import { source, name } => {
            // The daemon resolves paths on its own filesystem: send an absolute one.
            let source = match std::fs::canonicalize(&source) {
                Ok(path) => {
                    client::refuse_remote_file(ctx, &path)?;
                    path.display().to_string()
                }
                Err(_) => source,
            };
            let record = rt
                .block_on(api.import(proto::ImportKernelRequest { source, name }))
                .map_err(client::status)?
                .into_inner();
            println!("{}  {}", record.name, record.digest);
        }
        KernelCommand::Ls => {
            let list = rt.block_on(api.list(proto::Empty {})).map_err(client::status)?.into_inner().kernels;
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
            rt.block_on(api.remove(proto::KernelName { name: name.clone() })).map_err(client::status)?;
            println!("{name}");
        }
    }
    Ok(())
}

/// The first 12 hex digits, as `docker images` shows IDs.
pub fn short_digest(hex: &str) -> String {
    hex.chars().take(12).collect()
}
