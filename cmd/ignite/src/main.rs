//! `ignite`: the command-line entry point. Parses arguments, sets up logging, dispatches to one
//! module per subcommand and prints the error chain. The work lives in the library crates.

mod commands;
mod log_sink;

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

/// ignite: declarative microVMs with container ergonomics.
#[derive(Parser)]
#[command(
    name = "ignite",
    version,
    about = "Declarative microVMs: VM manifests in git (or from this CLI) become running KVM microVMs",
    long_about = None,
    propagate_version = true,
    after_help = "Getting started:\n  \
        ignite run 127.0.0.1:5000/busybox:latest --name web -p 8080:80 -d -- httpd -f -p 80\n  \
        ignite ps -a                 # the fleet; ignite dashboard for a live view\n  \
        ignite exec web -- ps        # a command in the VM; ignite attach web for its console\n  \
        ignite daemon --gitops URL --path vms   # follow a git repository of VM manifests\n\n\
        The VM commands are clients of the daemon's API; when no daemon answers, the CLI starts one."
)]
struct Cli {
    /// Log filter for diagnostics on stderr (e.g. `info`, `vmm_core=debug`). Also read from IGNITE_LOG.
    #[arg(long, global = true, help_heading = "Global options", env = "IGNITE_LOG", default_value = "warn")]
    log: String,

    /// Where ignite keeps images, kernels, disks and state.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "IGNITE_ROOT",
        default_value = "/var/lib/ignite"
    )]
    root: std::path::PathBuf,

    /// The daemon's API socket.
    #[arg(long, global = true, help_heading = "Global options", env = "IGNITE_SOCKET", default_value = controller::grpc::DEFAULT_SOCKET)]
    socket: std::path::PathBuf,

    /// A daemon on another machine, `https://HOST:PORT` (its `--listen`), instead of the socket;
    /// mutual TLS with --tls-ca, --tls-cert and --tls-key.
    #[arg(long, global = true, help_heading = "Global options", env = "IGNITE_HOST", value_name = "URL", requires_all = ["tls_ca", "tls_cert", "tls_key"])]
    host: Option<String>,

    /// PEM CA that signs the remote daemon's certificate.
    #[arg(long, global = true, help_heading = "Global options", env = "IGNITE_TLS_CA", value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,

    /// PEM client certificate for --host (signed by the daemon's --tls-client-ca).
    #[arg(long, global = true, help_heading = "Global options", env = "IGNITE_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, global = true, help_heading = "Global options", env = "IGNITE_TLS_KEY", value_name = "FILE")]
    tls_key: Option<std::path::PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create and start a VM from an image, like `docker run` (through the daemon).
    Run(commands::run::RunArgs),
    /// Declare a VM from an image without starting it (`ignite start` starts it).
    Create(commands::run::CreateArgs),
    /// Start VMs the API owns (desired state Running).
    Start(commands::run::StateArgs),
    /// Stop VMs the API owns (desired state Stopped; disk and address are kept).
    Stop(commands::run::StateArgs),
    /// List VMs: phase, readiness, address, uptime, image, revision, owner and last error.
    Ps(commands::vms::PsArgs),
    /// Create or update VMs from manifest files or directories, through the daemon.
    Apply(commands::vms::ApplyArgs),
    /// Kill VMs at once, without a grace period (they stay stopped).
    Kill(commands::vms::KillArgs),
    /// Remove VMs and everything they own.
    Rm(commands::vms::RmArgs),
    /// Show a VM's manifest (secrets redacted) and status.
    Inspect(commands::vms::InspectArgs),
    /// Show a VM's serial console.
    Logs(commands::vms::LogsArgs),
    /// Run a command in a running VM (through ignite-init's guest agent); its exit code is ignite's.
    Exec(commands::exec::ExecArgs),
    /// Attach to a running VM's serial console: see its output, type its input (Ctrl-P Ctrl-Q detaches).
    Attach(commands::exec::AttachArgs),
    /// Save VMs as they are now (memory, devices and disk), list and remove their snapshots.
    #[command(subcommand)]
    Snapshot(commands::snapshot::SnapshotCommand),
    /// Return a VM to one of its snapshots.
    Rollback(commands::snapshot::RollbackArgs),
    /// Warm start: list, build and remove the templates (booted guests) new VMs start from.
    #[command(subcommand)]
    Template(commands::template::TemplateCommand),
    /// Show what happened to VMs and sources.
    Events(commands::vms::EventsArgs),
    /// A live view of the fleet: VMs, sources and events (q quits).
    Dashboard(commands::dashboard::DashboardArgs),
    /// List the daemon's git and directory sources, or sync one now.
    #[command(subcommand)]
    Sources(commands::vms::SourcesCommand),
    /// Pull, import, list and remove OCI images.
    #[command(subcommand)]
    Image(commands::image::ImageCommand),
    /// Import, list and remove guest kernels.
    #[command(subcommand)]
    Kernel(commands::kernel::KernelCommand),
    /// Run the controller: follow git repositories or directories of VM manifests and converge
    /// the fleet. VMs keep running when the daemon stops and are re-adopted when it starts.
    Daemon(Box<commands::daemon::DaemonArgs>),
    /// Run the embedded KVM engine directly, without the daemon.
    #[command(subcommand)]
    Vmm(commands::vmm::VmmCommand),
    /// Print the version of this CLI and of the daemon that answers.
    Version,
    /// Print a shell completion script.
    #[command(after_help = "Examples:\n  \
        ignite completions bash > /etc/bash_completion.d/ignite\n  \
        ignite completions zsh > \"${fpath[1]}/_ignite\"")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let process_start = Instant::now();
    let cli = Cli::parse();
    // What writes under --root (the daemon, VMMs, local image and kernel stores) creates nothing
    // other users can read: the root holds secrets at rest.
    if matches!(cli.command, Command::Daemon(_) | Command::Vmm(_) | Command::Image(_) | Command::Kernel(_)) {
        controller::private::restrict_umask();
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into()))
        .with_writer(log_sink::make)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let remote = match (cli.host.clone(), cli.tls_ca.clone(), cli.tls_cert.clone(), cli.tls_key.clone()) {
        (Some(url), Some(ca), Some(cert), Some(key)) => {
            Some(commands::client::Remote { url, tls: controller::grpc::tls::ClientTls { ca, cert, key } })
        }
        _ => None,
    };
    let ctx = commands::client::Ctx { root: cli.root.clone(), socket: cli.socket.clone(), remote };
    let done = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
    let result = match cli.command {
        Command::Image(cmd) => done(commands::image::run(cmd, &ctx)),
        Command::Kernel(cmd) => done(commands::kernel::run(cmd, &ctx)),
        Command::Daemon(args) => done(commands::daemon::run(*args, &cli.root, &cli.socket)),
        Command::Run(args) => commands::run::run(args, &ctx),
        Command::Create(args) => done(commands::run::create(args, &ctx)),
        Command::Start(args) => done(commands::run::set_state(args, "Running", &ctx)),
        Command::Stop(args) => done(commands::run::set_state(args, "Stopped", &ctx)),
        Command::Kill(args) => done(commands::vms::kill(args, &ctx)),
        Command::Ps(args) => done(commands::vms::ps(args, &ctx)),
        Command::Apply(args) => done(commands::vms::apply(args, &ctx)),
        Command::Rm(args) => done(commands::vms::rm(args, &ctx)),
        Command::Inspect(args) => done(commands::vms::inspect(args, &ctx)),
        Command::Logs(args) => done(commands::vms::logs(args, &ctx)),
        Command::Exec(args) => commands::exec::exec(args, &ctx),
        Command::Attach(args) => done(commands::exec::attach(args, &ctx)),
        Command::Events(args) => done(commands::vms::events(args, &ctx)),
        Command::Snapshot(cmd) => done(commands::snapshot::run(cmd, &ctx)),
        Command::Rollback(args) => done(commands::snapshot::rollback(args, &ctx)),
        Command::Template(cmd) => done(commands::template::run(cmd, &ctx)),
        Command::Sources(cmd) => done(commands::vms::sources(cmd, &ctx)),
        Command::Dashboard(args) => done(commands::dashboard::run(args, &ctx)),
        Command::Version => done(commands::vms::version(&ctx)),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "ignite",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Vmm(cmd) => commands::vmm::run(cmd, process_start),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", commands::error_chain(&err));
            ExitCode::from(commands::EXIT_VMM_ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{ArgAction, CommandFactory};

    /// A switch that also reads an environment variable takes the usual spellings there: the daemon's
    /// `IGNITE_NO_JAIL=1` once failed with "invalid value '1'", so the daemon never started.
    #[test]
    fn switches_read_from_the_environment_accept_1_yes_and_0() {
        fn walk(cmd: &clap::Command, seen: &mut usize) {
            for arg in cmd.get_arguments() {
                if arg.get_env().is_none() || !matches!(arg.get_action(), ArgAction::SetTrue) {
                    continue;
                }
                *seen += 1;
                // The same argument and value parser, given its value on the command line instead.
                let alone = clap::Command::new("t").arg(arg.clone().action(ArgAction::Set).env(None).required(false));
                let flag = format!("--{}", arg.get_long().unwrap_or_default());
                for value in ["1", "yes", "true", "0", "no", "false"] {
                    let parsed = alone.clone().try_get_matches_from(["t", flag.as_str(), value]);
                    assert!(parsed.is_ok(), "{} {flag}: {value:?} from the environment: {parsed:?}", cmd.get_name());
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, seen);
            }
        }
        let mut seen = 0;
        walk(&super::Cli::command(), &mut seen);
        assert!(seen >= 2, "IGNITE_NO_NETWORK and IGNITE_NO_JAIL are switches read from the environment");
    }
}
