//! `ignite template`: the warm-start templates (snapshots of booted guests new VMs start from)
//! through the daemon's Templates service.

use clap::Subcommand;
use controller::grpc::proto;
use controller::grpc::proto::templates_client::TemplatesClient;
use tonic::transport::Channel;

use super::client::{self, Ctx};
use super::table::{human_size, render};

/// Template subcommands.
#[derive(Subcommand)]
#[command(after_help = "A template is a guest that booted its kernel and ignite-init and waits for an identity. \
A VM with spec.boot Warm (the default; `ignite run --boot warm`) of the same kernel, ignite-init build, vCPUs, \
memory and network starts as a copy of it instead of booting, then gets its own disk, address, hostname, \
clock and randomness. The first VM of a shape boots cold and builds its template; `build` makes one ahead.")]
pub enum TemplateCommand {
    /// List the built templates and those being built.
    #[command(alias = "list")]
    Ls,
    /// Build the template VMs of this shape start from (waits for it: a cold kernel boot).
    ///
    /// Examples:
    ///   ignite template build                       # 1 vCPU, 256Mi, the default kernel
    ///   ignite template build --cpus 2 --memory 1Gi --kernel my-6.1
    #[command(verbatim_doc_comment)]
    Build {
        /// vCPUs of the VMs it serves.
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Guest memory of the VMs it serves.
        #[arg(long, default_value = "256Mi")]
        memory: String,
        /// A stored kernel (`ignite kernel ls`); default: the daemon's.
        #[arg(long)]
        kernel: Option<String>,
        /// For VMs without a network interface.
        #[arg(long)]
        no_network: bool,
    },
    /// Remove a template (VMs started from it run on; the next VM of its shape boots cold and
    /// builds it again).
    Rm {
        /// Its key (see `ignite template ls`).
        key: String,
    },
}

async fn templates(ctx: &Ctx) -> anyhow::Result<TemplatesClient<Channel>> {
    Ok(TemplatesClient::new(client::channel(ctx).await?))
}

fn row(t: &proto::Template) -> Vec<String> {
    let network = if t.network { "yes" } else { "no" };
    vec![
        t.key.clone(),
        t.cpus.to_string(),
        format!("{}Mi", t.memory_mib),
        network.into(),
        t.kernel.clone(),
        t.created.clone(),
        format!("{:.1}s", t.build_ms as f64 / 1000.0),
        human_size(t.memory_bytes),
    ]
}

const HEADER: [&str; 8] = ["KEY", "CPUS", "MEMORY", "NETWORK", "KERNEL", "CREATED", "BUILD", "SIZE"];

/// Runs a template subcommand.
pub fn run(cmd: TemplateCommand, ctx: &Ctx) -> anyhow::Result<()> {
    client::runtime()?.block_on(async {
        match cmd {
            TemplateCommand::Ls => {
                let list = templates(ctx).await?.list(proto::ListTemplatesRequest {}).await.map_err(client::status)?;
                let list = list.into_inner();
                println!("{}", render(&HEADER, &list.templates.iter().map(row).collect::<Vec<_>>()));
                for key in list.building {
                    println!("{key}: being built");
                }
            }
            TemplateCommand::Build { cpus, memory, kernel, no_network } => {
                eprintln!("building the template (a cold boot of the kernel: seconds on hardware KVM, minutes when emulated)...");
                let request =
                    proto::BuildTemplateRequest { cpus, memory, kernel: kernel.unwrap_or_default(), no_network };
                let built = templates(ctx).await?.build(request).await.map_err(client::status)?.into_inner();
                println!("{}", render(&HEADER, &[row(&built)]));
            }
            TemplateCommand::Rm { key } => {
                templates(ctx).await?.delete(proto::TemplateRef { key: key.clone() }).await.map_err(client::status)?;
                println!("{key}");
            }
        }
        anyhow::Ok(())
    })
}
