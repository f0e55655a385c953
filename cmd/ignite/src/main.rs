//! `ignite`: the command-line entry point. Parses arguments, sets up logging, dispatches to one
//! module per subcommand and prints the error chain. The work lives in the library crates.

mod commands;

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

/// ignite: declarative microVMs with container ergonomics.
#[derive(Parser)]
#[command(name = "ignite", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log filter for diagnostics on stderr (e.g. `info`, `vmm_core=debug`). Also read from IGNITE_LOG.
    #[arg(long, global = true, env = "IGNITE_LOG", default_value = "warn")]
    log: String,

    /// Where ignite keeps images, kernels, disks and state.
    #[arg(long, global = true, env = "IGNITE_ROOT", default_value = "/var/lib/ignite")]
    root: std::path::PathBuf,

    /// The daemon's API socket.
    #[arg(long, global = true, env = "IGNITE_SOCKET", default_value = controller::grpc::DEFAULT_SOCKET)]
    socket: std::path::PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create and start a VM from an image, like `docker run` (through the daemon).
    Run(commands::run::RunArgs),
    /// Start VMs the API owns (desired state Running).
    Start(commands::run::StateArgs),
    /// Stop VMs the API owns (desired state Stopped; disk and address are kept).
    Stop(commands::run::StateArgs),
    /// List VMs: phase, readiness, address, uptime, image, revision, owner and last error.
    Ps(commands::vms::PsArgs),
    /// Create or update VMs from manifest files or directories, through the daemon.
    Apply(commands::vms::ApplyArgs),
    /// Remove VMs and everything they own.
    Rm(commands::vms::RmArgs),
    /// Show a VM's manifest (secrets redacted) and status.
    Inspect(commands::vms::InspectArgs),
    /// Show a VM's serial console.
    Logs(commands::vms::LogsArgs),
    /// Show what happened to VMs and sources.
    Events(commands::vms::EventsArgs),
    /// Pull, import, list and remove OCI images.
    #[command(subcommand)]
    Image(commands::image::ImageCommand),
    /// Import, list and remove guest kernels.
    #[command(subcommand)]
    Kernel(commands::kernel::KernelCommand),
    /// Run the controller: follow git repositories or directories of VM manifests and converge
    /// the fleet. VMs keep running when the daemon stops and are re-adopted when it starts.
    Daemon(commands::daemon::DaemonArgs),
    /// Run the embedded KVM engine directly, without the daemon.
    #[command(subcommand)]
    Vmm(commands::vmm::VmmCommand),
}

fn main() -> ExitCode {
    let process_start = Instant::now();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let paths = image_store::StorePaths::new(&cli.root);
    let result = match cli.command {
        Command::Image(cmd) => commands::image::run(cmd, &paths).map(|()| ExitCode::SUCCESS),
        Command::Kernel(cmd) => commands::kernel::run(cmd, &paths).map(|()| ExitCode::SUCCESS),
        Command::Daemon(args) => commands::daemon::run(args, &cli.root, &cli.socket).map(|()| ExitCode::SUCCESS),
        Command::Run(args) => commands::run::run(args, &cli.socket).map(|()| ExitCode::SUCCESS),
        Command::Start(args) => commands::run::set_state(args, "Running", &cli.socket).map(|()| ExitCode::SUCCESS),
        Command::Stop(args) => commands::run::set_state(args, "Stopped", &cli.socket).map(|()| ExitCode::SUCCESS),
        Command::Ps(args) => commands::vms::ps(args, &cli.socket).map(|()| ExitCode::SUCCESS),
        Command::Apply(args) => commands::vms::apply(args, &cli.socket).map(|()| ExitCode::SUCCESS),
        Command::Rm(args) => commands::vms::rm(args, &cli.socket).map(|()| ExitCode::SUCCESS),
        Command::Inspect(args) => commands::vms::inspect(args, &cli.socket).map(|()| ExitCode::SUCCESS),
        Command::Logs(args) => commands::vms::logs(args, &cli.socket).map(|()| ExitCode::SUCCESS),
        Command::Events(args) => commands::vms::events(args, &cli.socket).map(|()| ExitCode::SUCCESS),
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
