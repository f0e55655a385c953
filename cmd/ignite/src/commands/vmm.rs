//! `ignite vmm`: the embedded engine without the daemon.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use vmm_core::control::{self, Action, ControlListener, ExitRecord};
use vmm_core::jail::{self, cgroup::Cgroups};
use vmm_core::{ConsoleConfig, DiskConfig, ExitReason, NetConfig, VirtModeConfig, Vm, VmConfig, VsockConfig};

use super::{EXIT_GUEST_CRASH, EXIT_STOPPED, EXIT_VMM_ERROR};

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
    /// Serve the JSON-lines control protocol (status, pause, resume, stop, kill) on this unix socket.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Write how the VM ended (reason and exit code, JSON) to this file, atomically, before exiting.
    #[arg(long, value_name = "PATH")]
    exit_file: Option<PathBuf>,
    /// Kernel image: an uncompressed ELF vmlinux (64-bit or PVH entry) or a bzImage.
    #[arg(long, value_name = "PATH", required_unless_present = "config")]
    kernel: Option<PathBuf>,
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
        return serde_json::from_str(&text).with_context(|| format!("invalid vm config {}", path.display()));
    }
    Ok(VmConfig {
        vcpus: args.cpus,
        memory_mib: args.memory,
        kernel: args.kernel.clone().context("--kernel or --config is required")?,
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
        virt_mode: args.virt_mode,
    })
}

fn exit_code(reason: &ExitReason) -> u8 {
    match reason {
        ExitReason::PowerOff { code } => *code,
        ExitReason::Reset => 0,
        ExitReason::Stopped => EXIT_STOPPED,
        ExitReason::Crash { .. } => EXIT_GUEST_CRASH,
        ExitReason::Error { .. } => EXIT_VMM_ERROR,
    }
}

/// Where the exit record goes: written atomically by path, or into a file opened before the jail
/// (read only after this process is gone, so it needs no rename).
enum ExitSink {
    None,
    Path(PathBuf),
    Opened(std::fs::File),
}

impl ExitSink {
    fn new(path: Option<&Path>, jailed: bool) -> anyhow::Result<ExitSink> {
        use std::os::unix::fs::OpenOptionsExt;
        Ok(match path {
            None => ExitSink::None,
            Some(path) if jailed => ExitSink::Opened(
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(path)
                    .with_context(|| format!("cannot open the exit file {}", path.display()))?,
            ),
            Some(path) => ExitSink::Path(path.to_owned()),
        })
    }

    fn write(&mut self, exit: ExitReason, code: u8) {
        use std::io::Write;
        let record = ExitRecord { exit, exit_code: i32::from(code) };
        let result = match self {
            ExitSink::None => Ok(()),
            ExitSink::Path(path) => record.write_atomic(path),
            ExitSink::Opened(file) => serde_json::to_vec(&record)
                .map_err(std::io::Error::other)
                .and_then(|bytes| file.write_all(&bytes))
                .and_then(|()| file.sync_all()),
        };
        if let Err(err) = result {
            eprintln!("error: cannot write the exit file: {err}");
        }
    }
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
    let name = format!("manual-{}", std::process::id());
    let cgroups = Cgroups::detect("manual");
    let dirs = match &cgroups {
        Some(cgroups) => cgroups.create(&name, jail::limits_for(config, jail::DEFAULT_VMM_ALLOWANCE))?,
        None => Vec::new(),
    };
    let root_dir = PathBuf::from(MANUAL_JAIL_ROOT);
    std::fs::create_dir_all(&root_dir).with_context(|| format!("cannot create {}", root_dir.display()))?;
    config.jail = Some(jail::JailConfig::for_vm(config, args.jail_uid, args.jail_uid, root_dir, dirs));
    Ok(cgroups.map(|c| (c, name)))
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
    })
    .context("cannot start the jailed vmm")?;
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
            let detail = format!("{err:#}");
            ExitSink::new(args.exit_file.as_deref(), false)?.write(ExitReason::Error { detail }, EXIT_VMM_ERROR);
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
    let jailed = config.jail.is_some();
    if let Some(path) = &args.log_file {
        let max = config.console_max_bytes.unwrap_or(DEFAULT_LOG_MAX_BYTES);
        let log = vmm_core::log_file::BoundedLog::open(path, max)
            .with_context(|| format!("cannot open the log file {}", path.display()))?;
        crate::log_sink::set(log);
    }
    let mut exit_sink = ExitSink::new(args.exit_file.as_deref(), jailed)?;
    let interrupted = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, interrupted.clone()).context("cannot install the signal handler")?;
    }
    // Bound while the path is reachable; served once the process is jailed.
    let listener = match args.control_socket.as_deref().map(|path| (path, ControlListener::bind(path))) {
        None => None,
        Some((_, Ok(listener))) => Some(listener),
        Some((path, Err(err))) => {
            let err = anyhow::Error::new(err).context(format!("cannot serve the control socket {}", path.display()));
            exit_sink.write(ExitReason::Error { detail: format!("{err:#}") }, EXIT_VMM_ERROR);
            return Err(err);
        }
    };
    let vm_started = process_start.elapsed();
    let handle = match Vm::start(&config) {
        Ok(handle) => handle,
        Err(err) => {
            let err =
                anyhow::Error::new(err).context(format!("cannot start a vm with kernel {}", config.kernel.display()));
            let detail = format!("{err:#}");
            exit_sink.write(ExitReason::Error { detail }, EXIT_VMM_ERROR);
            return Err(err);
        }
    };
    let control = match listener.map(ControlListener::serve) {
        None => None,
        Some(Ok(server)) => Some(server),
        Some(Err(err)) => {
            let err = anyhow::Error::new(err).context("cannot serve the control socket");
            let exit = handle.kill();
            exit_sink.write(ExitReason::Error { detail: format!("{err:#}") }, EXIT_VMM_ERROR);
            tracing::debug!(reason = %exit.reason, "vm stopped");
            return Err(err);
        }
    };
    if let Err(err) = jail::seccomp::apply(jail::seccomp::ThreadKind::Main) {
        let err = anyhow::Error::new(err);
        let exit = handle.kill();
        exit_sink.write(ExitReason::Error { detail: format!("{err:#}") }, EXIT_VMM_ERROR);
        tracing::debug!(reason = %exit.reason, "vm stopped");
        return Err(err);
    }
    let mut paused = false;
    // When a graceful stop was asked for: the moment to stop by force. The control socket keeps
    // answering meanwhile, so a later `kill` (or a shorter stop) takes effect and nobody waits.
    let mut deadline: Option<Instant> = None;
    // Wait in short steps so Ctrl-C, control requests and the deadline are noticed promptly.
    while handle.exit_reason().is_none() {
        let mut action = Action::Continue;
        if interrupted.swap(false, Ordering::Relaxed) {
            if deadline.is_none() {
                eprintln!(
                    "ignite: stopping the guest (waiting up to {}s; interrupt again to stop it at once)",
                    args.stop_timeout
                );
                action = Action::Stop(Duration::from_secs(args.stop_timeout));
            } else {
                eprintln!("ignite: stopping the guest at once");
                action = Action::Kill;
            }
        } else if let Some((_, requests)) = &control {
            if let Ok(cmd) = requests.recv_timeout(Duration::from_millis(100)) {
                let (reply, next) = control::apply(&handle, &mut paused, &cmd.request);
                // The requester may have gone away; the VM does not care.
                let _ = cmd.reply.send(reply);
                action = next;
            }
        } else {
            handle.wait_timeout(Duration::from_millis(100));
        }
        match action {
            Action::Continue => {}
            Action::Stop(grace) => {
                if deadline.is_none() {
                    handle.request_shutdown();
                }
                let asked = Instant::now() + grace;
                deadline = Some(deadline.map_or(asked, |d| d.min(asked)));
            }
            Action::Kill => handle.force_stop(),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) && handle.exit_reason().is_none() {
            tracing::info!("guest did not shut down in time; stopping it");
            handle.force_stop();
        }
    }
    let exit = handle.wait();
    let code = exit_code(&exit.reason);
    exit_sink.write(exit.reason.clone(), code);
    drop(control);
    if args.timings {
        let report = serde_json::json!({
            "exit": exit.reason,
            "processToVmStartMs": vm_started.as_secs_f64() * 1e3,
            "processToFirstKvmRunMs": exit.counters.time_to_first_run.map(|t| (vm_started + t).as_secs_f64() * 1e3),
            "counters": exit.counters,
        });
        eprintln!("{report}");
    }
    match &exit.reason {
        ExitReason::Crash { detail } => eprintln!("error: the guest crashed: {detail}"),
        ExitReason::Error { detail } => eprintln!("error: the vmm failed: {detail}"),
        _ => {}
    }
    Ok(ExitCode::from(code))
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
