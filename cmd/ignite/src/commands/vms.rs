//! `ignite ps`, `apply`, `rm`, `kill`, `inspect`, `logs`, `events` and `sources`: clients of the
//! daemon's API.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use controller::grpc::proto;
use controller::grpc::proto::host_client::HostClient;

use super::client::{self, Ctx};
use super::table::render;

/// `ignite ps`.
#[derive(Args)]
pub struct PsArgs {
    /// Also show VMs that are not running.
    #[arg(short, long)]
    all: bool,
    /// Only print the names.
    #[arg(short, long)]
    quiet: bool,
}

/// `ignite kill`.
#[derive(Args)]
pub struct KillArgs {
    /// The VMs to kill at once (no grace period); they stay stopped.
    #[arg(required = true)]
    names: Vec<String>,
}

/// `ignite sources`.
#[derive(clap::Subcommand)]
pub enum SourcesCommand {
    /// The git repositories and directories the daemon follows, their revision and last error.
    #[command(alias = "list")]
    Ls,
    /// Fetch a source now instead of at its next interval.
    Sync {
        /// The source (see `ignite sources ls`).
        name: String,
    },
}

/// `ignite apply`.
#[derive(Args)]
#[command(after_help = "Example:\n  ignite apply -f examples/fleet/web.yaml")]
pub struct ApplyArgs {
    /// A manifest file, or a directory of *.yaml/*.yml files. Repeatable.
    #[arg(short, long = "filename", required = true)]
    files: Vec<PathBuf>,
    /// Take over VMs that a git or directory source owns.
    #[arg(long)]
    force: bool,
}

/// `ignite rm`.
#[derive(Args)]
pub struct RmArgs {
    /// The VMs to remove (with their disks, taps, forwards and addresses).
    #[arg(required = true)]
    names: Vec<String>,
    /// Remove VMs a source owns too (the source declares them again on its next sync).
    #[arg(short, long)]
    force: bool,
}

/// Output formats of `ignite inspect`.
#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    /// YAML: the manifest (secrets redacted) and the status.
    Yaml,
    /// JSON.
    Json,
}

/// `ignite inspect`.
#[derive(Args)]
pub struct InspectArgs {
    /// The VM.
    name: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value = "yaml")]
    output: Format,
}

/// `ignite logs`.
#[derive(Args)]
pub struct LogsArgs {
    /// The VM whose serial console to show.
    name: String,
    /// Keep following the console.
    #[arg(short, long)]
    follow: bool,
    /// Only the last N bytes.
    #[arg(long, default_value_t = 0)]
    tail: u64,
}

/// `ignite events`.
#[derive(Args)]
pub struct EventsArgs {
    /// Keep following new events.
    #[arg(short, long)]
    follow: bool,
}

fn uptime(boot_time: &str) -> String {
    let Ok(t) = humantime::parse_rfc3339(boot_time) else { return "-".into() };
    let secs = t.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

/// Lists VMs as a table.
pub fn ps(args: PsArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let (vms, sources) = client::runtime()?.block_on(async {
        let channel = client::channel(ctx).await?;
        let mut c = proto::vms_client::VmsClient::new(channel.clone());
        let vms = c.list(proto::ListVmsRequest {}).await.map_err(client::status)?.into_inner();
        let mut s = proto::sources_client::SourcesClient::new(channel);
        let sources = s.list(proto::Empty {}).await.map_err(client::status)?.into_inner();
        anyhow::Ok((vms, sources))
    })?;
    // A source whose last revision was refused: the fleet still runs the previous one.
    for source in sources.sources.iter().filter(|s| !s.last_error.is_empty()) {
        eprintln!("warning: source {} ({}): {}", source.name, source.url, source.last_error);
    }
    if args.quiet {
        for vm in vms.vms.iter().filter(|vm| args.all || vm.status.as_ref().is_some_and(|s| s.phase == "Running")) {
            println!("{}", vm.name);
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = vms
        .vms
        .into_iter()
        .filter_map(|vm| {
            let s = vm.status.clone().unwrap_or_default();
            if !args.all && s.phase != "Running" {
                return None;
            }
            let ready = s.conditions.iter().find(|c| c.status == "True").map(|c| c.reason.clone()).unwrap_or_default();
            let revision: String = s.observed_revision.chars().take(12).collect();
            let up = if s.phase == "Running" { uptime(&s.boot_time) } else { "-".into() };
            let error = if s.last_error.is_empty() { String::new() } else { s.last_error };
            Some(vec![vm.name, s.phase, ready, s.ip, up, vm.image, revision, vm.owner, error])
        })
        .collect();
    println!(
        "{}",
        render(&["NAME", "PHASE", "REASON", "IP", "UPTIME", "IMAGE", "REVISION", "OWNER", "LAST ERROR"], &rows)
    );
    Ok(())
}

/// Kills VMs at once.
pub fn kill(args: KillArgs, ctx: &Ctx) -> anyhow::Result<()> {
    client::runtime()?.block_on(async {
        let mut c = client::vms(ctx).await?;
        for name in args.names {
            c.kill(proto::VmName { name: name.clone() }).await.map_err(client::status)?;
            println!("{name}");
        }
        anyhow::Ok(())
    })
}

/// Lists or syncs sources.
pub fn sources(cmd: SourcesCommand, ctx: &Ctx) -> anyhow::Result<()> {
    client::runtime()?.block_on(async {
        let mut c = client::sources(ctx).await?;
        match cmd {
            SourcesCommand::Ls => {
                let listed = c.list(proto::Empty {}).await.map_err(client::status)?.into_inner();
                let rows: Vec<Vec<String>> = listed
                    .sources
                    .into_iter()
                    .map(|s| vec![s.name, s.url, s.revision.chars().take(12).collect(), s.last_sync, s.last_error])
                    .collect();
                println!("{}", render(&["NAME", "URL", "REVISION", "LAST SYNC", "LAST ERROR"], &rows));
            }
            SourcesCommand::Sync { name } => {
                c.sync(proto::SourceName { name: name.clone() }).await.map_err(client::status)?;
                println!("{name}: sync requested (see `ignite sources ls` and `ignite events`)");
            }
        }
        anyhow::Ok(())
    })
}

/// Prints the CLI's version and, if a daemon answers, the daemon's, with its health and the services
/// its reflection lists.
pub fn version(ctx: &Ctx) -> anyhow::Result<()> {
    use controller::grpc::standard;
    let cgroups = vmm_core::jail::cgroup::Cgroups::host_version().map_or("none usable".to_string(), |v| v.to_string());
    println!("ignite {} (client), this host's cgroups: {cgroups}", env!("CARGO_PKG_VERSION"));
    let answer = client::runtime()?.block_on(async {
        let channel = client::try_channel(ctx).await?;
        let info = HostClient::new(channel.clone()).info(proto::Empty {}).await.ok()?.into_inner();
        let health =
            standard::check_health(channel.clone()).await.unwrap_or_else(|s| format!("unavailable ({})", s.message()));
        let reflection = match standard::list_services(channel).await {
            Ok(names) => format!("{} services ({})", names.len(), names.join(", ")),
            Err(s) => format!("unavailable ({})", s.message()),
        };
        Some((info, health, reflection))
    });
    match answer {
        Some((i, health, reflection)) => {
            println!(
                "ignite {} (daemon on {}): root {}, virtualization {}, snapshotter {}, vmm {}, cgroups {}, {} VMs ({} running), {} CPUs, {}",
                i.version,
                ctx.daemon(),
                i.root,
                i.virt_mode,
                i.snapshotter,
                i.vmm_jail,
                i.cgroups,
                i.vms,
                i.running_vms,
                i.cpus,
                super::table::human_size(i.memory_bytes)
            );
            println!("health (grpc.health.v1): {health}");
            println!("reflection (grpc.reflection.v1): {reflection}");
        }
        None => println!("no daemon answers on {}", ctx.daemon()),
    }
    Ok(())
}

fn collect(path: &Path, out: &mut Vec<proto::ManifestFile>) -> anyhow::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading {}", path.display()))?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for entry in entries {
            if entry.is_dir() || entry.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                collect(&entry, out)?;
            }
        }
        return Ok(());
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    out.push(proto::ManifestFile { path: path.display().to_string(), text });
    Ok(())
}

/// Applies manifests through the daemon (all or nothing).
pub fn apply(args: ApplyArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let mut files = Vec::new();
    for path in &args.files {
        collect(path, &mut files)?;
    }
    anyhow::ensure!(!files.is_empty(), "no *.yaml or *.yml file found in {:?}", args.files);
    let report = client::runtime()?.block_on(async {
        let mut c = client::vms(ctx).await?;
        c.apply(proto::ApplyRequest { files, force: args.force }).await.map_err(client::status)
    })?;
    let report = report.into_inner();
    for (verb, names) in
        [("created", &report.created), ("configured", &report.updated), ("unchanged", &report.unchanged)]
    {
        for name in names {
            println!("vm/{name} {verb}");
        }
    }
    Ok(())
}

/// Removes VMs.
pub fn rm(args: RmArgs, ctx: &Ctx) -> anyhow::Result<()> {
    client::runtime()?.block_on(async {
        let mut c = client::vms(ctx).await?;
        for name in &args.names {
            c.delete(proto::DeleteVmRequest { name: name.clone(), force: args.force }).await.map_err(client::status)?;
            println!("{name}");
        }
        anyhow::Ok(())
    })
}

/// Shows one VM.
pub fn inspect(args: InspectArgs, ctx: &Ctx) -> anyhow::Result<()> {
    let (vm, snapshots) = client::runtime()?.block_on(async {
        let mut c = client::vms(ctx).await?;
        let vm = c.get(proto::VmName { name: args.name.clone() }).await.map_err(client::status)?;
        anyhow::Ok((vm, super::snapshot::list(ctx, &args.name).await?))
    })?;
    let vm = vm.into_inner();
    let manifest: serde_json::Value = serde_yaml::from_str(&vm.manifest_yaml).context("decoding the manifest")?;
    let status = vm.status.unwrap_or_default();
    let doc = serde_json::json!({
        "manifest": manifest,
        "owner": vm.owner,
        "generation": vm.generation,
        "deletionRequested": vm.deletion_requested,
        "status": {
            "phase": status.phase, "ip": status.ip, "mac": status.mac,
            "sourceRevision": status.source_revision, "observedRevision": status.observed_revision,
            "observedGeneration": status.observed_generation, "bootTime": status.boot_time,
            "restarts": status.restarts, "lastError": status.last_error, "nodeRef": status.node_ref,
            "boot": (!status.boot.is_empty()).then(|| serde_json::json!({
                "mode": status.boot, "template": status.boot_template, "reason": status.boot_reason,
            })),
            "lastExit": status.last_exit.map(|e| serde_json::json!({
                "code": e.code, "crashed": e.crashed, "message": e.message, "finishedAt": e.finished_at,
            })),
            "conditions": status.conditions.iter().map(|c| serde_json::json!({
                "type": c.r#type, "status": c.status, "reason": c.reason, "message": c.message,
                "lastTransitionTime": c.last_transition_time,
            })).collect::<Vec<_>>(),
        },
        "snapshots": snapshots.iter().map(|s| serde_json::json!({
            "name": s.name, "kind": s.kind, "created": s.created,
            "memoryBytes": s.memory_bytes, "diskBytes": s.disk_bytes,
        })).collect::<Vec<_>>(),
    });
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&doc)?),
        Format::Yaml => print!("{}", serde_yaml::to_string(&doc)?),
    }
    Ok(())
}

/// Prints a VM's console.
pub fn logs(args: LogsArgs, ctx: &Ctx) -> anyhow::Result<()> {
    client::runtime()?.block_on(async {
        let mut c = client::vms(ctx).await?;
        let request = proto::LogsRequest { name: args.name.clone(), follow: args.follow, tail_bytes: args.tail };
        let mut stream = c.logs(request).await.map_err(client::status)?.into_inner();
        let mut out = std::io::stdout();
        while let Some(chunk) = stream.message().await.map_err(client::status)? {
            out.write_all(&chunk.data)?;
            out.flush()?;
        }
        anyhow::Ok(())
    })
}

/// Prints events.
pub fn events(args: EventsArgs, ctx: &Ctx) -> anyhow::Result<()> {
    client::runtime()?.block_on(async {
        let mut c = client::events(ctx).await?;
        let request = proto::WatchEventsRequest { after_seq: 0, follow: args.follow };
        let mut stream = c.watch(request).await.map_err(client::status)?.into_inner();
        while let Some(e) = stream.message().await.map_err(client::status)? {
            println!("{}  {:<7} {:<14} {:<16} {}", e.time, e.kind, e.object, e.reason, e.message);
        }
        anyhow::Ok(())
    })
}
