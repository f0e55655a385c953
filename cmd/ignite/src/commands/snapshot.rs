//! `ignite snapshot` and `ignite rollback`: point-in-time copies of VMs (machine state, memory and
//! disk) through the daemon's Snapshots service.

use clap::{Args, Subcommand};
use controller::grpc::proto;
use controller::grpc::proto::snapshots_client::SnapshotsClient;
use tonic::transport::Channel;

use super::client::{self, Ctx};
use super::table::{human_size, render};

/// Snapshot subcommands.
#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Save a VM as it is now: a running VM is paused for the copy and runs on; its memory,
    /// devices and disk are kept (a stopped VM's disk only).
    ///
    /// Examples:
    ///   ignite snapshot create web before-upgrade
    ///   ignite snapshot create web --disk-only
    #[command(verbatim_doc_comment)]
    Create {
        /// The VM.
        vm: String,
        /// The snapshot's name (1 to 64 letters, digits, '.', '_', '-'); default: the time,
        /// YYYYMMDD-HHMMSS.
        name: Option<String>,
        /// Save the disk only (a rollback then reboots from it).
        #[arg(long)]
        disk_only: bool,
    },
    /// List snapshots, of one VM or of all.
    #[command(alias = "list")]
    Ls {
        /// Only this VM's.
        vm: Option<String>,
    },
    /// Remove a snapshot.
    Rm {
        /// The VM.
        vm: String,
        /// The snapshot.
        name: String,
    },
}

/// `ignite rollback VM NAME`.
#[derive(Args)]
#[command(after_help = "The VM returns to exactly the snapshot's point: its memory, devices and disk (what it \
wrote since is lost). A disk-only snapshot reboots the VM from its disk. A stopped VM the API owns is \
started from the snapshot. A snapshot of another spec of the VM, or one that cannot be restored, is \
refused and the VM is left as it was.\n\nExample:\n  ignite rollback web before-upgrade")]
pub struct RollbackArgs {
    /// The VM.
    pub vm: String,
    /// The snapshot (see `ignite snapshot ls VM`).
    pub name: String,
}

async fn snapshots(ctx: &Ctx) -> anyhow::Result<SnapshotsClient<Channel>> {
    Ok(SnapshotsClient::new(client::channel(ctx).await?))
}

fn describe(s: &proto::Snapshot) -> String {
    match s.kind.as_str() {
        "full" => format!(
            "{}/{}: memory ({}) and disk ({})",
            s.vm,
            s.name,
            human_size(s.memory_bytes),
            human_size(s.disk_bytes)
        ),
        _ => format!("{}/{}: disk only ({})", s.vm, s.name, human_size(s.disk_bytes)),
    }
}

/// The snapshots of `vm`, for `ignite inspect`.
pub async fn list(ctx: &Ctx, vm: &str) -> anyhow::Result<Vec<proto::Snapshot>> {
    let request = proto::ListSnapshotsRequest { vm: vm.to_string() };
    Ok(snapshots(ctx).await?.list(request).await.map_err(client::status)?.into_inner().snapshots)
}

/// Runs a snapshot subcommand.
pub fn run(cmd: SnapshotCommand, ctx: &Ctx) -> anyhow::Result<()> {
    client::runtime()?.block_on(async {
        match cmd {
            SnapshotCommand::Create { vm, name, disk_only } => {
                let request = proto::CreateSnapshotRequest { vm, name: name.unwrap_or_default(), disk_only };
                let taken = snapshots(ctx).await?.create(request).await.map_err(client::status)?.into_inner();
                println!("{}", describe(&taken));
            }
            SnapshotCommand::Ls { vm } => {
                let rows: Vec<Vec<String>> = list(ctx, vm.as_deref().unwrap_or_default())
                    .await?
                    .into_iter()
                    .map(|s| {
                        let memory = if s.kind == "full" { human_size(s.memory_bytes) } else { "-".into() };
                        vec![s.vm, s.name, s.kind, s.created, memory, human_size(s.disk_bytes)]
                    })
                    .collect();
                println!("{}", render(&["VM", "NAME", "KIND", "CREATED", "MEMORY", "DISK"], &rows));
            }
            SnapshotCommand::Rm { vm, name } => {
                let request = proto::SnapshotRef { vm: vm.clone(), name: name.clone() };
                snapshots(ctx).await?.delete(request).await.map_err(client::status)?;
                println!("{vm}/{name}");
            }
        }
        anyhow::Ok(())
    })
}

/// Rolls a VM back to a snapshot.
pub fn rollback(args: RollbackArgs, ctx: &Ctx) -> anyhow::Result<()> {
    client::runtime()?.block_on(async {
        let request = proto::SnapshotRef { vm: args.vm.clone(), name: args.name.clone() };
        let target = snapshots(ctx).await?.rollback(request).await.map_err(client::status)?.into_inner();
        let how = if target.kind == "full" { "resumes from" } else { "boots from the disk of" };
        println!("{}: {how} snapshot {} (taken {}); see `ignite events`", args.vm, target.name, target.created);
        anyhow::Ok(())
    })
}
