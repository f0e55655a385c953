//! Talking to the daemon: connecting (and starting a daemon when none answers), with errors that
//! say what to do next.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use controller::grpc::proto::{
    events_client::EventsClient, host_client::HostClient, images_client::ImagesClient, kernels_client::KernelsClient,
    sources_client::SourcesClient, vms_client::VmsClient,
};
use controller::grpc::tls::ClientTls;
use tonic::transport::Channel;

/// Where the CLI finds the daemon, and the root a daemon it starts uses.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// `--root`.
    pub root: PathBuf,
    /// `--socket`.
    pub socket: PathBuf,
    /// `--host` and its TLS files: a daemon on another machine (never started by the CLI).
    pub remote: Option<Remote>,
}

/// A daemon reached over TCP with mutual TLS.
#[derive(Clone, Debug)]
pub struct Remote {
    /// `https://HOST:PORT`.
    pub url: String,
    /// The CA of the daemon and this client's certificate.
    pub tls: ClientTls,
}

impl Ctx {
    /// Where the daemon is, for messages.
    pub fn daemon(&self) -> String {
        match &self.remote {
            Some(remote) => remote.url.clone(),
            None => self.socket.display().to_string(),
        }
    }
}

/// How long a daemon started by the CLI may take to answer.
const AUTOSTART_TIMEOUT: Duration = Duration::from_secs(30);

/// A tokio runtime for one CLI command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")
}

/// A channel to the daemon, without starting one.
pub async fn connect(ctx: &Ctx) -> anyhow::Result<Channel> {
    match &ctx.remote {
        Some(remote) => {
            let channel = controller::grpc::tls::connect_tcp(&remote.url, &remote.tls)
                .await
                .context("check --host, and that --tls-ca signs the daemon's certificate")?;
            // With TLS 1.3 the daemon checks the client's certificate after the handshake
            // returned here: ask once, so a refusal gets a message that says what to fix.
            if let Err(status) = HostClient::new(channel.clone()).info(controller::grpc::proto::Empty {}).await {
                anyhow::bail!(
                    "the daemon at {} refused this client ({}): its --tls-client-ca must sign {} (--tls-cert)",
                    remote.url,
                    status.message(),
                    remote.tls.cert.display()
                );
            }
            Ok(channel)
        }
        None => Ok(controller::grpc::connect(&ctx.socket)
            .await
            .with_context(|| format!("no daemon answers on {}", ctx.socket.display()))?),
    }
}

/// A channel to the daemon if one answers (never starts one).
pub async fn try_channel(ctx: &Ctx) -> Option<Channel> {
    connect(ctx).await.ok()
}

fn autostart_disabled() -> bool {
    std::env::var("IGNITE_AUTOSTART").is_ok_and(|v| matches!(v.as_str(), "0" | "false" | "no"))
}

/// A channel to the daemon. When none answers, starts `ignite daemon` in the background on the
/// same root and socket (unless `IGNITE_AUTOSTART=0`) and waits for it to answer.
pub async fn channel(ctx: &Ctx) -> anyhow::Result<Channel> {
    if ctx.remote.is_some() {
        return connect(ctx).await;
    }
    if let Some(channel) = try_channel(ctx).await {
        return Ok(channel);
    }
    if autostart_disabled() {
        anyhow::bail!(
            "no ignite daemon answers on {}: start one with `ignite daemon --dir DIR --kernel VMLINUX` (or --gitops URL), or pass --socket (IGNITE_AUTOSTART=0: the CLI does not start one itself)",
            ctx.socket.display()
        );
    }
    start_daemon(ctx).await
}

/// Starts a daemon for `ctx` in its own session, logging to `ROOT/daemon.log`.
async fn start_daemon(ctx: &Ctx) -> anyhow::Result<Channel> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    // The root is private (the daemon makes it 0700 too); so is its log.
    controller::private::secure_root(&ctx.root).with_context(|| format!("creating {}", ctx.root.display()))?;
    let log_path = controller::layout::RootLayout::new(&ctx.root).daemon_log();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let exe = std::env::current_exe().context("locating the ignite binary")?;
    let mut child = std::process::Command::new(exe)
        .arg("--root")
        .arg(&ctx.root)
        .arg("--socket")
        .arg(&ctx.socket)
        .args(["--log", "info", "daemon"])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting `ignite daemon`")?;
    eprintln!(
        "ignite: no daemon answered on {}; started `ignite daemon` (pid {}, log {}; IGNITE_KERNEL, IGNITE_NO_NETWORK and the other IGNITE_* variables configure it)",
        ctx.socket.display(),
        child.id(),
        log_path.display()
    );
    let deadline = Instant::now() + AUTOSTART_TIMEOUT;
    loop {
        if let Some(channel) = try_channel(ctx).await {
            return Ok(channel);
        }
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow::bail!(
                "the daemon the CLI started ended ({status}); its log {} ends with:\n{}",
                log_path.display(),
                tail.join("\n")
            );
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the daemon the CLI started (pid {}) did not answer on {} within {AUTOSTART_TIMEOUT:?}; see {}",
                child.id(),
                ctx.socket.display(),
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The VMs client.
pub async fn vms(ctx: &Ctx) -> anyhow::Result<VmsClient<Channel>> {
    Ok(VmsClient::new(channel(ctx).await?))
}

/// The events client.
pub async fn events(ctx: &Ctx) -> anyhow::Result<EventsClient<Channel>> {
    Ok(EventsClient::new(channel(ctx).await?))
}

/// The sources client.
pub async fn sources(ctx: &Ctx) -> anyhow::Result<SourcesClient<Channel>> {
    Ok(SourcesClient::new(channel(ctx).await?))
}

/// The images and kernels clients, if a local daemon answers (never starts one: the image store
/// works without a daemon too); a remote daemon must answer.
pub async fn image_store(ctx: &Ctx) -> anyhow::Result<Option<(ImagesClient<Channel>, KernelsClient<Channel>)>> {
    let channel = match &ctx.remote {
        Some(_) => Some(connect(ctx).await?),
        None => try_channel(ctx).await,
    };
    Ok(channel.map(|c| (ImagesClient::new(c.clone()), KernelsClient::new(c))))
}

/// Refuses to send the daemon a path of this machine when the daemon runs on another one (it
/// would read its own file of that name, or none).
pub fn refuse_remote_file(ctx: &Ctx, path: &std::path::Path) -> anyhow::Result<()> {
    if let Some(remote) = &ctx.remote {
        anyhow::bail!(
            "the daemon at {} runs on another machine and cannot read {} from this one: import it with ignite on that machine, or push the image to a registry and `ignite image pull` it",
            remote.url,
            path.display()
        );
    }
    Ok(())
}

/// A gRPC status as a user-facing error (the daemon's message, without transport noise).
pub fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}
