//! `ignite vmm`: the embedded engine without the daemon.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use vmm_core::jail::{self, cgroup::Cgroups};
use vmm_core::process::{self, RunOptions};
use vmm_core::{ConsoleConfig, DiskConfig, ExitReason, NetConfig, VirtModeConfig, VmConfig, VsockConfig};

use super::EXIT_VMM_ERROR;

/// Engine subcommands.
#[derive(Subcommand)]
pub enum VmmCommand {
    /// Boot a kernel in the foreground with the serial console on stdout.
    ///
    /// Exit status: 0 when the guest resets or powers off cleanly; the guest's own code when it powers
    /// off through the ignite power port with a non-zero code; 125 when the VM cannot be built (bad
    /// kernel, missing file, no /dev/kvm); 126 when the guest crashes; 130 when stopped by Ctrl-C.
    ///
    /// Example: ignite vmm run --kernel vmlinux --initrd initrd.cpio --disk rootfs.ext4,ro --memory 256
    Run(Box<RunArgs>),
}

/// Arguments of `ignite vmm run`.
#[derive(Args)]
pub struct RunArgs {
    /// A serialized `VmConfig` (JSON) instead of the device flags.
    #[arg(long, value_name = "FILE.json", conflicts_with_all = [
        "kernel", "initrd", "disks", "nets", "vsock", "cmdline", "cpus", "memory", "console", "console_socket",
        "no_rng", "virt_mode"
    ])]
    config: Option<PathBuf>,
    /// Serve the JSON-lines control protocol (status, pause, resume, stop, kill, snapshot) on this unix
    /// socket.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Write how the VM ended (reason and exit code, JSON) to this file, atomically, before exiting.
    #[arg(long, value_name = "PATH")]
    exit_file: Option<PathBuf>,
    /// Kernel image: an uncompressed ELF vmlinux (64-bit or PVH entry) or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["config", "restore"])]
    kernel: Option<PathBuf>,
    /// Start from this snapshot directory (written by a `snapshot` control request) instead of
    /// booting: the guest runs on from the saved moment. The device flags must describe the same
    /// machine (vCPUs, memory, the same kinds of devices in the same order); disks, taps and sockets
    /// may be other ones.
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    restore: Option<PathBuf>,
    /// Where `{"op":"snapshot","name":N}` control requests save the VM (as DIR/N). Created if missing
    /// (mode 0700, owned by the jail's uid when jailed).
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    snapshot_dir: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed if the kernel supports it).
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// A raw disk image for virtio-blk; `,ro` makes it read-only. Repeat for more disks (vda, vdb, ...).
    #[arg(long = "disk", value_name = "PATH[,ro]", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// A virtio-net interface on an existing host tap device. Repeatable. The guest may only send
    /// from MAC, and from IPV4 when it is given (frames with another source are dropped).
    #[arg(long = "net", value_name = "TAP=MAC[,IPV4]", value_parser = parse_net)]
    nets: Vec<NetConfig>,
    /// A virtio-vsock device: guest CID and host unix socket path.
    #[arg(long, value_name = "CID:PATH", value_parser = parse_vsock)]
    vsock: Option<VsockConfig>,
    /// Kernel command line (the VMM appends the virtio device announcements).
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u32,
    /// Where the serial console goes: `stdout`, `null`, or a file path.
    #[arg(long, default_value = "stdout", value_parser = parse_console)]
    console: ConsoleConfig,
    /// Also serve the serial console on this unix socket: clients get its output and type its input
    /// (what `ignite attach` connects to).
    #[arg(long, value_name = "PATH")]
    console_socket: Option<PathBuf>,
    /// Do not offer a virtio-rng device.
    #[arg(long)]
    no_rng: bool,
    /// Virtualization mode: `auto` detects vmx/svm; `emulated` applies the software-KVM workarounds.
    #[arg(long, default_value = "auto", value_parser = parse_virt_mode)]
    virt_mode: VirtModeConfig,
    /// Seconds Ctrl-C waits for the guest to shut down before stopping it by force.
    #[arg(long, default_value_t = 10)]
    stop_timeout: u64,
    /// Print start-up timings and exit counters as JSON on stderr when the VM ends.
    #[arg(long)]
    timings: bool,
    /// Run without the jail (no own uid, namespaces, seccomp or cgroup): for debugging only. By
    /// default a root user's VMM is jailed (uid from --jail-uid); other users' VMMs never are.
    #[arg(long)]
    no_jail: bool,
    /// The unprivileged uid (and gid) a jailed VMM started from device flags runs as.
    #[arg(long, value_name = "UID", default_value_t = DEFAULT_MANUAL_UID, conflicts_with = "config")]
    jail_uid: u32,
    /// Write the VMM's own log here, capped and rate-limited (size from the config's
    /// `consoleMaxBytes`, else 16 MiB), instead of standard error.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// (Internal, for the jailed relaunch.) Remove the `--config` file once it is read.
    #[arg(long, hide = true, requires = "config")]
    consume_config: bool,
    /// (Internal, for the jailed relaunch.) A pipe from the launcher: its end of file stops the VM.
    #[arg(long, hide = true, value_name = "FD")]
    lifeline_fd: Option<i32>,
}

/// The uid a root user's hand-started VMM runs as when none is given.
const DEFAULT_MANUAL_UID: u32 = 64_000;
/// The VMM log's cap when the config names none.
const DEFAULT_LOG_MAX_BYTES: u64 = 16 << 20;

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let (path, read_only) = match s.rsplit_once(',') {
        Some((path, "ro")) => (path, true),
        Some((path, "rw")) => (path, false),
        Some((_, opt)) => return Err(format!("unknown disk option `{opt}` (expected `ro` or `rw`)")),
        None => (s, false),
    };
    Ok(DiskConfig { path: path.into(), read_only })
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    let (tap, rest) = s.split_once('=').ok_or("expected TAP=MAC[,IPV4], e.g. tap0=06:00:ac:10:00:02,10.61.0.2")?;
    let (mac, ipv4) = match rest.split_once(',') {
        Some((mac, ip)) => (mac, Some(ip.parse().map_err(|_| format!("`{ip}` is not an IPv4 address"))?)),
        None => (rest, None),
    };
    Ok(NetConfig { tap: tap.into(), mac: mac.into(), ipv4 })
}

fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
    let (cid, path) = s.split_once(':').ok_or("expected CID:PATH, e.g. 3:/run/vm.vsock")?;
    let guest_cid = cid.parse().map_err(|_| format!("`{cid}` is not a CID number"))?;
    Ok(VsockConfig { guest_cid, uds_path: path.into() })
}

fn parse_console(s: &str) -> Result<ConsoleConfig, String> {
    Ok(match s {
        "stdout" => ConsoleConfig::Stdout,
        "null" => ConsoleConfig::Null,
        path => ConsoleConfig::File(path.into()),
    })
}

fn parse_virt_mode(s: &str) -> Result<VirtModeConfig, String> {
    match s {
        "auto" => Ok(VirtModeConfig::Auto),
        "hardware" => Ok(VirtModeConfig::Hardware),
        "emulated" => Ok(VirtModeConfig::Emulated),
        other => Err(format!("unknown mode `{other}` (expected auto, hardware or emulated)")),
    }
}

/// Runs an engine subcommand.
pub fn run(cmd: VmmCommand, process_start: Instant) -> anyhow::Result<ExitCode> {
    match cmd {
        VmmCommand::Run(args) => run_foreground(*args, process_start),
    }
}

fn vm_config(args: &RunArgs) -> anyhow::Result<VmConfig> {
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        if args.consume_config {
            std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
        return serde_json::from_str(&text).with_context(|| format!("invalid vm config {}", path.display()));
    }
    Ok(VmConfig {
        vcpus: args.cpus,
        memory_mib: args.memory,
        kernel: match (&args.kernel, &args.restore) {
            (Some(kernel), _) => kernel.clone(),
            (None, Some(_)) => PathBuf::new(),
            (None, None) => anyhow::bail!("--kernel or --config is required"),
        },
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        disks: args.disks.clone(),
        nets: args.nets.clone(),
        vsock: args.vsock.clone(),
        rng: !args.no_rng,
        console: args.console.clone(),
        console_socket: args.console_socket.clone(),
        console_max_bytes: None,
        jail: None,
        snapshot_dir: args.snapshot_dir.clone(),
        restore_from: args.restore.clone(),
        virt_mode: args.virt_mode,
    })
}

/// Whether this process is the first of its own PID namespace (how [`jail::spawn`] starts it).
fn in_own_pid_namespace() -> bool {
    std::process::id() == 1
}

/// A root user's VMM gets a jail unless `--no-jail`; the cgroup made for it is returned for removal.
fn add_manual_jail(args: &RunArgs, config: &mut VmConfig) -> anyhow::Result<Option<(Cgroups, String)>> {
    let root = jail::is_root();
    if config.jail.is_some() || args.no_jail || !root {
        if !root && !args.no_jail && config.jail.is_none() {
            eprintln!("ignite: warning: not running as root, so the vmm runs without a jail");
        }
        return Ok(None);
    }
    let name = format!("{MANUAL_PREFIX}{}", std::process::id());
    let cgroups = Cgroups::detect("manual");
    if let Some(cgroups) = &cgroups {
        sweep_manual_cgroups(cgroups);
    }
    let dirs = match &cgroups {
        Some(cgroups) => cgroups.create(&name, jail::limits_for(config, jail::DEFAULT_VMM_ALLOWANCE))?,
        None => Vec::new(),
    };
    let root_dir = PathBuf::from(MANUAL_JAIL_ROOT);
    std::fs::create_dir_all(&root_dir).with_context(|| format!("cannot create {}", root_dir.display()))?;
    if let Some(dir) = &config.snapshot_dir {
        prepare_snapshot_dir(dir, Some(args.jail_uid))?;
    }
    config.jail = Some(jail::JailConfig::for_vm(config, args.jail_uid, args.jail_uid, root_dir, dirs));
    Ok(cgroups.map(|c| (c, name)))
}

/// Creates the snapshot directory (mode 0700) if missing and gives it to the jail's `uid`.
fn prepare_snapshot_dir(dir: &Path, uid: Option<u32>) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.is_dir() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create the snapshot directory {}", dir.display()))?;
    }
    if let Some(uid) = uid {
        std::os::unix::fs::chown(dir, Some(uid), Some(uid))
            .with_context(|| format!("cannot give the snapshot directory {} to uid {uid}", dir.display()))?;
    }
    Ok(())
}

/// Hand-started VMMs' cgroups are `manual-<launcher pid>`.
const MANUAL_PREFIX: &str = "manual-";

/// Removes the cgroups of hand-started VMMs whose launcher is gone (killed before it could remove
/// them). A cgroup that still holds a process cannot be removed, so a live VMM keeps its own.
fn sweep_manual_cgroups(cgroups: &Cgroups) {
    for name in cgroups.names() {
        let Some(pid) = name.strip_prefix(MANUAL_PREFIX).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            if let Err(err) = cgroups.remove(&name) {
                tracing::debug!(%err, "a stale vmm cgroup is still in use");
            }
        }
    }
}

/// Where hand-started VMMs mount their jail's root (inside their own mount namespace).
const MANUAL_JAIL_ROOT: &str = "/run/ignite/jail";

/// Starts this same command again in its own namespaces (with `config` in a 0600 file when it was
/// built from flags), forwards SIGTERM to it, and returns its exit status.
fn run_in_namespaces(args: &RunArgs, config: &VmConfig) -> anyhow::Result<ExitCode> {
    use std::ffi::OsString;
    use std::os::unix::fs::OpenOptionsExt;
    let config_file = PathBuf::from(format!("{MANUAL_JAIL_ROOT}-{}.json", std::process::id()));
    if let Some(dir) = config_file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&config_file)
        .with_context(|| format!("cannot create the jailed vmm's config file {}", config_file.display()))?;
    std::io::Write::write_all(&mut file, &serde_json::to_vec(config)?)?;
    let _remove = RemoveOnDrop(config_file.clone());
    let mut argv: Vec<OsString> = vec!["vmm".into(), "run".into(), "--config".into(), config_file.into()];
    // The child removes the config file once read, and stops its VM when this process is gone (even
    // killed): it holds the read end of a pipe whose write end only this process has.
    argv.extend(["--consume-config".into(), "--lifeline-fd".into(), "3".into()]);
    let (lifeline_read, _lifeline_write) = process::lifeline_pipe().context("cannot create the vmm's lifeline pipe")?;
    for (flag, value) in [
        ("--control-socket", args.control_socket.as_deref()),
        ("--exit-file", args.exit_file.as_deref()),
        ("--log-file", args.log_file.as_deref()),
    ] {
        if let Some(value) = value {
            argv.extend([flag.into(), value.into()]);
        }
    }
    argv.extend(["--stop-timeout".into(), args.stop_timeout.to_string().into()]);
    if args.timings {
        argv.push("--timings".into());
    }
    let exe = std::env::current_exe().context("cannot find the ignite binary")?;
    let env = jail::vmm_environment();
    let (pid, pidfd) = jail::spawn(&jail::SpawnSpec {
        program: &exe,
        args: &argv,
        env: &env,
        stdout: None,
        stderr: None,
        namespaces: true,
        process_group: false,
        fd3: Some(lifeline_read.as_fd()),
    })
    .context("cannot start the jailed vmm")?;
    drop(lifeline_read);
    // Ctrl-C reaches the child through the terminal's process group; SIGTERM is passed on.
    let term = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, term.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::new(AtomicBool::new(false)))?;
    let status = loop {
        if term.swap(false, Ordering::Relaxed) {
            jail::send_signal(&pidfd, signal_hook::consts::SIGTERM);
        }
        if let Some(status) = jail::try_wait(pid)? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(match status {
        jail::ChildStatus::Exited(code) => ExitCode::from(u8::try_from(code).unwrap_or(EXIT_VMM_ERROR)),
        jail::ChildStatus::Signaled(signal) => {
            eprintln!("error: the vmm was killed by signal {signal}");
            ExitCode::from(128u8.saturating_add(u8::try_from(signal).unwrap_or(0)))
        }
    })
}

/// Removes a file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn run_foreground(args: RunArgs, process_start: Instant) -> anyhow::Result<ExitCode> {
    let mut config = match vm_config(&args) {
        Ok(config) => config,
        Err(err) => {
            if let Some(path) = &args.exit_file {
                process::write_exit_file(path, &process::error_record(err.as_ref()));
            }
            return Err(err);
        }
    };
    if args.no_jail {
        if config.jail.take().is_some() || jail::is_root() {
            eprintln!("ignite: warning: --no-jail: the vmm runs as this user, unconfined (debugging only)");
        }
    } else if !in_own_pid_namespace() {
        let manual = add_manual_jail(&args, &mut config)?;
        if config.jail.is_some() {
            let code = run_in_namespaces(&args, &config);
            if let Some((cgroups, name)) = manual {
                if let Err(err) = cgroups.remove(&name) {
                    eprintln!("ignite: warning: {err}");
                }
            }
            return code;
        }
    }
    if let (None, Some(dir)) = (&config.jail, &config.snapshot_dir) {
        prepare_snapshot_dir(dir, None)?;
    }
    if let Some(path) = &args.log_file {
        let max = config.console_max_bytes.unwrap_or(DEFAULT_LOG_MAX_BYTES);
        let log = vmm_core::log_file::BoundedLog::open(path, max)
            .with_context(|| format!("cannot open the log file {}", path.display()))?;
        crate::log_sink::set(log);
    }
    let options = RunOptions {
        control_socket: args.control_socket.clone(),
        exit_file: args.exit_file.clone(),
        stop_timeout: Duration::from_secs(args.stop_timeout),
        // SAFETY: the launcher passes this descriptor (the lifeline pipe) to this process alone.
        lifeline: args.lifeline_fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
        process_start,
    };
    let finished = process::run(&config, options)?;
    if args.timings {
        eprintln!("{}", finished.timings());
    }
    match &finished.record.exit {
        ExitReason::Crash { detail } => eprintln!("error: the guest crashed: {detail}"),
        ExitReason::Error { detail } => eprintln!("error: the vmm failed: {detail}"),
        _ => {}
    }
    Ok(ExitCode::from(u8::try_from(finished.record.exit_code).unwrap_or(EXIT_VMM_ERROR)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_arguments_and_rejects_bad_ones() {
        assert_eq!(parse_disk("/a.img,ro").unwrap(), DiskConfig { path: "/a.img".into(), read_only: true });
        assert_eq!(parse_disk("/a,b.img").unwrap_err(), "unknown disk option `b.img` (expected `ro` or `rw`)");
        assert_eq!(parse_disk("/a.img").unwrap(), DiskConfig { path: "/a.img".into(), read_only: false });
        assert!(parse_net("tap0").is_err());
        assert_eq!(parse_vsock("3:/x").unwrap().guest_cid, 3);
        assert!(parse_vsock("x:/x").unwrap_err().contains("`x`"));
        assert!(parse_virt_mode("fast").is_err());
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: VmmCommand,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        use clap::Parser;
        let Cli { cmd: VmmCommand::Run(args) } = Cli::try_parse_from([&["ignite", "run"], args].concat())?;
        Ok(*args)
    }

    #[test]
    fn a_config_file_excludes_the_device_flags_and_is_read_as_json() {
        assert!(parse(&["--config", "c.json", "--kernel", "k"]).is_err());
        assert!(parse(&["--config", "c.json", "--memory", "64"]).is_err());
        assert!(parse(&[]).is_err(), "a kernel or a config is required");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let mut config = VmConfig::new("/k");
        config.memory_mib = 64;
        std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
        let args = parse(&["--config", path.to_str().unwrap(), "--control-socket", "/s", "--exit-file", "/e"]).unwrap();
        assert_eq!(vm_config(&args).unwrap(), config);
        std::fs::write(&path, "{\"vcpuz\":1}").unwrap();
        assert!(format!("{:#}", vm_config(&args).unwrap_err()).contains("vcpuz"));
        assert_eq!(vm_config(&parse(&["--kernel", "/k2"]).unwrap()).unwrap().kernel, PathBuf::from("/k2"));
    }
}
