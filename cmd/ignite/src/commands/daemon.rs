//! `ignite daemon`: the controller process. Follows git repositories or directories of VM
//! manifests and converges the fleet; VMs survive a restart of the daemon and are re-adopted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::builder::BoolishValueParser;
use clap::Args;
use controller::daemon::{Daemon, DaemonConfig, DaemonKube, TcpApi, VmmPolicy};
use controller::grpc::tls::ServerTls;
use controller::host::{DefaultKernel, HostConfig};
use controller::net::{NetConfig, Subnet};
use controller::reconcile::ReconcilerConfig;
use controller::source::{DirSpec, GitCredentials, GitRef, GitSpec, SourceKind, SourceSpec};
use controller::supervisor::JailPolicy;

/// Flags of `ignite daemon`.
#[derive(Args)]
#[command(after_help = "Examples:\n  \
    ignite daemon --gitops https://git.example.com/fleet.git --branch main --path vms --kernel 6.1\n  \
    ignite daemon --dir ./examples/fleet --kernel /var/cache/ignite/kernel/vmlinux\n  \
    ignite daemon --kube --namespace fleet --kube-selector pool=edge   # MicroVMs from Kubernetes\n  \
    ignite daemon --gitops ./fleet --listen 0.0.0.0:7443 --tls-cert daemon.pem --tls-key daemon.key \\\n      \
    --tls-client-ca clients-ca.pem      # then: ignite --host https://HOST:7443 --tls-ca ... ps")]
pub struct DaemonArgs {
    /// Git repository of VM manifests to follow (file://, git://, https://, ssh:// or a path).
    #[arg(long, value_name = "URL")]
    gitops: Option<String>,
    /// Branch to follow (default: main).
    #[arg(long, conflicts_with_all = ["tag", "commit"], requires = "gitops")]
    branch: Option<String>,
    /// Tag to pin.
    #[arg(long, conflicts_with = "commit", requires = "gitops")]
    tag: Option<String>,
    /// Commit to pin.
    #[arg(long, requires = "gitops")]
    commit: Option<String>,
    /// User name and password (or token) for an https --gitops remote: a file of one line,
    /// USERNAME:PASSWORD, or a token alone (sent as the password of user x-access-token), readable
    /// by its owner only (chmod 600). Credentials inside the URL are refused: they would show in
    /// the process list, logs and status. Sent over https only, or plain http to this host.
    #[arg(long, value_name = "FILE", requires = "gitops")]
    git_credentials_file: Option<PathBuf>,
    /// Subdirectory of the repository holding the manifests.
    #[arg(long, default_value = "", requires = "gitops")]
    path: String,
    /// A local directory of VM manifests to follow instead of (or besides) git.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// How often sources are polled (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    interval: Duration,
    /// Kernel for VMs that name none: a file, or the name of an imported kernel.
    #[arg(long, env = "IGNITE_KERNEL")]
    kernel: Option<String>,
    /// The static guest init placed in every root disk (default: ignite-init next to this binary).
    #[arg(long, env = "IGNITE_INIT")]
    init: Option<PathBuf>,
    /// Host bridge the VMs' taps join.
    #[arg(long, default_value = "ignite0")]
    bridge: String,
    /// Subnet VMs get their addresses from; the bridge takes the first address.
    #[arg(long, default_value = "10.61.0.0/24")]
    subnet: Subnet,
    /// Run VMs without a network interface (no bridge, taps or port forwards).
    #[arg(long, env = "IGNITE_NO_NETWORK", value_parser = BoolishValueParser::new())]
    no_network: bool,
    /// Run VMMs unjailed, as root with every capability, no seccomp, namespaces or cgroup: for
    /// debugging only (a guest escaping into its VMM then owns the host). Printed as a warning.
    #[arg(long, env = "IGNITE_NO_JAIL", value_parser = BoolishValueParser::new())]
    no_jail: bool,
    /// Boot every VM cold: no templates are built or used, whatever `spec.boot` says. By default
    /// VMs start warm, from a snapshot of a booted guest of their kernel and shape (a template,
    /// built under ROOT/templates on first need; see `ignite template`).
    #[arg(long, env = "IGNITE_NO_WARM_START", value_parser = BoolishValueParser::new())]
    no_warm_start: bool,
    /// A block device for the devicemapper thin pool's data, where device-mapper is used (the
    /// default is a sparse 100 GiB file under ROOT). Fixed once the pool exists: a later start with
    /// another device is refused rather than formatting a new pool.
    #[arg(long, value_name = "DEVICE", requires = "dm_pool_metadata")]
    dm_pool_data: Option<PathBuf>,
    /// A block device for the thin pool's metadata (with --dm-pool-data; its first block is cleared
    /// when the pool is created).
    #[arg(long, value_name = "DEVICE", requires = "dm_pool_data")]
    dm_pool_metadata: Option<PathBuf>,
    /// The uids jailed VMMs run as, one per VM (gid = uid): FIRST-LAST.
    #[arg(long, value_name = "FIRST-LAST", default_value = "3000000-3065535", value_parser = parse_uid_range)]
    jail_uids: std::ops::RangeInclusive<u32>,
    /// Memory a VMM may use beyond its guest's (its cgroup's limit is guest memory plus this), e.g. 96Mi.
    #[arg(long, value_name = "SIZE", default_value = "96Mi")]
    vmm_memory_allowance: controller::api::Quantity,
    /// Cap on each VM's console.log and vmm.log (each rotated keeping one old file), e.g. 16Mi.
    #[arg(long, value_name = "SIZE", default_value = "16Mi")]
    max_log_size: controller::api::Quantity,
    /// Masquerade the VMs' outbound traffic behind the host.
    #[arg(long)]
    masquerade: bool,
    /// How many VMs are worked on at once.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Reach every registry over plain HTTP (loopback registries always are).
    #[arg(long)]
    insecure_registries: bool,
    /// A host directory whose files manifests may name (`copyFiles[].source`, `kernel.path`);
    /// repeatable. None by default: whoever can push to the fleet repository or reach the API
    /// would otherwise read any host file. Symlinks never lead out of it.
    #[arg(long = "allow-host-path", value_name = "DIR")]
    allow_host_paths: Vec<PathBuf>,
    /// Let VMs forward host ports below 1024 (refused by default: they belong to the host's own
    /// services). Port 22 and the daemon's --listen port are never forwarded.
    #[arg(long)]
    allow_privileged_ports: bool,
    /// The most file content an image may unpack to, over all its layers (e.g. 8Gi); a bigger
    /// image (or a decompression bomb) is refused when its root disk is built.
    #[arg(long, value_name = "SIZE", default_value = "32Gi")]
    max_image_size: controller::api::Quantity,
    /// The most entries (files, directories, links) an image may have, over all its layers.
    #[arg(long, value_name = "N", default_value_t = image_store::unpack::DEFAULT_MAX_IMAGE_ENTRIES)]
    max_image_entries: u64,
    /// The longest one image pull may take, all of it (manifests, config, layers): a registry
    /// that trickles bytes just often enough to dodge the 60 s read timeout would otherwise hold a
    /// worker, and the VMs queued behind it, forever. The VM gets an ImagePullFailed condition
    /// and is retried with backoff.
    #[arg(long, value_name = "DURATION", default_value = "30m", value_parser = parse_duration)]
    image_pull_timeout: Duration,
    /// Serve the API over TCP too, on ADDR:PORT, with mutual TLS (needs --tls-cert, --tls-key and
    /// --tls-client-ca: whoever reaches the API can start VMs, so clients must present a
    /// certificate).
    #[arg(long, value_name = "ADDR:PORT", requires_all = ["tls_cert", "tls_key", "tls_client_ca"])]
    listen: Option<std::net::SocketAddr>,
    /// PEM certificate the daemon presents on --listen.
    #[arg(long, value_name = "FILE", requires = "listen")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "listen")]
    tls_key: Option<PathBuf>,
    /// PEM CA whose certificates the daemon accepts from clients on --listen.
    #[arg(long, value_name = "FILE", requires = "listen")]
    tls_client_ca: Option<PathBuf>,
    /// Run the MicroVMs of a Kubernetes cluster scheduled to this host (needs the CRD:
    /// kubectl apply -f manifests/crd/microvm.yaml).
    #[arg(long)]
    kube: bool,
    /// Watch MicroVMs in this namespace only (default: every namespace).
    #[arg(long, value_name = "NS", requires = "kube")]
    namespace: Option<String>,
    /// Kubeconfig to use (default: $KUBECONFIG, ~/.kube/config, then the in-cluster service account).
    #[arg(long, value_name = "PATH", requires = "kube")]
    kubeconfig: Option<PathBuf>,
    /// This host's name, matched against a MicroVM's spec.host (default: the hostname).
    #[arg(long, value_name = "NAME", requires = "kube")]
    kube_host_name: Option<String>,
    /// Take MicroVMs without spec.host only when their labels match (k=v,k!=v,k,!k; default: all).
    #[arg(long, value_name = "SELECTOR", requires = "kube")]
    kube_selector: Option<String>,
    /// Lifetime of the bootstrap tokens created for spec.bootstrap.kubernetes.createToken (default: 1h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "kube")]
    kube_token_ttl: Option<Duration>,
    /// Let the MicroVMs of namespace NS use the bootstrap-token Secret kube-system/NAME as
    /// spec.bootstrap.kubernetes.tokenSecretRef (NS/NAME; repeatable; @host/NAME for the VMs of
    /// this host's own git, directory and API sources). None by default: a VM naming a Secret not
    /// listed is Stalled (BootstrapNotAllowed) and the Secret is never read.
    #[arg(long = "kube-token-secret", value_name = "NS/NAME", requires = "kube")]
    kube_token_secrets: Vec<String>,
    /// Let the MicroVMs of namespace NS have the daemon create bootstrap tokens
    /// (spec.bootstrap.kubernetes.createToken; repeatable; @host for the VMs of this host's own
    /// sources). None by default: such a VM is Stalled (BootstrapNotAllowed).
    #[arg(long = "kube-bootstrap-namespaces", value_name = "NS", requires = "kube")]
    kube_bootstrap_namespaces: Vec<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 30s, 2m, 1h)"))
}

fn default_init() -> Option<PathBuf> {
    let candidate = std::env::current_exe().ok()?.with_file_name("ignite-init");
    candidate.is_file().then_some(candidate)
}

fn default_kernel(kernel: Option<String>) -> DefaultKernel {
    match kernel {
        None => DefaultKernel::None,
        Some(k) if Path::new(&k).is_absolute() || Path::new(&k).exists() => DefaultKernel::Path(PathBuf::from(k)),
        Some(name) => DefaultKernel::Stored(name),
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(args: DaemonArgs, root: &Path, socket: &Path) -> anyhow::Result<()> {
    let mut sources = Vec::new();
    if let Some(url) = args.gitops {
        let reference = match (args.tag, args.commit) {
            (Some(tag), _) => GitRef::Tag(tag),
            (None, Some(commit)) => GitRef::Commit(commit),
            (None, None) => GitRef::Branch(args.branch.unwrap_or_else(|| "main".into())),
        };
        controller::source::credentials::refuse_url_credentials(&url)?;
        let credentials = match &args.git_credentials_file {
            Some(file) => Some(GitCredentials::load(file)?),
            None => None,
        };
        let git = GitSpec { url, reference, path: args.path, interval: args.interval, credentials };
        sources.push(SourceSpec { name: "gitops".into(), kind: SourceKind::Git(git) });
    }
    if let Some(path) = args.dir {
        let path = std::fs::canonicalize(&path).with_context(|| format!("manifest directory {}", path.display()))?;
        sources.push(SourceSpec {
            name: "dir".into(),
            kind: SourceKind::Directory(DirSpec { path, interval: args.interval }),
        });
    }
    image_store::unpack::UnpackLimits::set_for_process(image_store::unpack::UnpackLimits {
        max_bytes: args.max_image_size.bytes(),
        max_entries: args.max_image_entries,
    });
    let init_bin = args.init.or_else(default_init);
    if init_bin.is_none() {
        tracing::warn!("no ignite-init found next to this binary: images must bring their own /sbin/ignite-init");
    }
    let host = HostConfig {
        init_bin,
        default_kernel: default_kernel(args.kernel),
        net: (!args.no_network).then_some(NetConfig {
            bridge: args.bridge,
            subnet: args.subnet,
            masquerade: args.masquerade,
        }),
        insecure_registries: args.insecure_registries,
        virt_mode: vmm_core::VirtModeConfig::Auto,
        policy: host_policy(args.allow_host_paths, args.allow_privileged_ports, args.listen)?,
        pull_timeouts: image_store::pull::PullTimeouts { total: args.image_pull_timeout, ..Default::default() },
        warm_start: !args.no_warm_start,
        dm_pool: image_store::DmPoolConfig {
            data_device: args.dm_pool_data,
            metadata_device: args.dm_pool_metadata,
            ..Default::default()
        },
    };
    let mut scope = controller::kube::scope::BootstrapScope::default();
    for entry in &args.kube_token_secrets {
        scope.allow_token_secret(entry).context("--kube-token-secret")?;
    }
    for ns in &args.kube_bootstrap_namespaces {
        scope.allow_create_token(ns).context("--kube-bootstrap-namespaces")?;
    }
    let kube = match args.kube {
        false => None,
        true => {
            let mut settings = controller::kube::KubeSettings::new(
                args.kube_host_name.unwrap_or_else(controller::kube::controller::default_host_name),
            );
            settings.namespace = args.namespace;
            settings.kubeconfig = args.kubeconfig;
            settings.selector =
                controller::kube::LabelSelector::parse(args.kube_selector.as_deref().unwrap_or_default())
                    .context("--kube-selector")?;
            Some(DaemonKube { settings, token_ttl: args.kube_token_ttl, scope, microvms: true, client: None })
        }
    };
    let config = DaemonConfig {
        root: root.to_path_buf(),
        sources,
        host,
        reconciler: ReconcilerConfig { workers: args.workers, ..Default::default() },
        ignite_bin: std::env::current_exe().context("locating the ignite binary")?,
        vmm: VmmPolicy {
            jail: (!args.no_jail)
                .then(|| JailPolicy { uids: args.jail_uids, vmm_memory_allowance: args.vmm_memory_allowance.bytes() }),
            log_max_bytes: args.max_log_size.bytes(),
        },
        socket: Some(socket.to_path_buf()),
        tcp: match (args.listen, args.tls_cert, args.tls_key, args.tls_client_ca) {
            (Some(addr), Some(cert), Some(key), Some(client_ca)) => {
                Some(TcpApi { addr, tls: ServerTls { cert, key, client_ca } })
            }
            _ => None,
        },
        kube,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async {
        // Handlers first: a stop requested while the daemon starts waits for the start to finish.
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let kube_host = config.kube.as_ref().map(|k| k.settings.host_name.clone());
        let daemon = Daemon::start(config).await.context("starting the daemon")?;
        if let Some(host) = kube_host {
            eprintln!("ignite daemon: running the MicroVMs scheduled to host {host:?}");
        }
        eprintln!("ignite daemon: running on {} (Ctrl-C stops the daemon; VMs keep running)", root.display());
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        daemon.shutdown().await;
        anyhow::Ok(())
    })
}

/// What manifests may name on this host: the allowed directories and host ports.
fn host_policy(
    dirs: Vec<PathBuf>,
    allow_privileged_ports: bool,
    listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<controller::api::HostPolicy> {
    let paths = controller::api::HostPaths::allow(dirs).map_err(anyhow::Error::msg)?;
    let mut ports = controller::api::PortPolicy::default().allow_privileged(allow_privileged_ports);
    if let Some(addr) = listen {
        ports = ports.reserve(addr.port(), "the daemon's API (--listen)");
    }
    Ok(controller::api::HostPolicy { paths, ports })
}

fn parse_uid_range(s: &str) -> Result<std::ops::RangeInclusive<u32>, String> {
    let (first, last) = s.split_once('-').ok_or("expected FIRST-LAST, e.g. 3000000-3065535")?;
    let parse = |v: &str| v.trim().parse::<u32>().map_err(|_| format!("`{v}` is not a uid"));
    let (first, last) = (parse(first)?, parse(last)?);
    if first == 0 || last < first {
        return Err(format!("`{s}` is not a range of unprivileged uids (FIRST > 0, LAST >= FIRST)"));
    }
    Ok(first..=last)
}
