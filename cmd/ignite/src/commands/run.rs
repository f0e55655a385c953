//! `ignite run IMAGE`: create and start a VM in one step, like `docker run`, by applying a
//! generated manifest through the daemon, then (in the foreground) follow it to its end
//! ([`super::follow`]); `create` declares it stopped; `start` and `stop` set its desired state.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::Context;
use clap::Args;
use controller::grpc::proto;

use super::client::{self, Ctx};

/// `ignite run`.
#[derive(Args)]
#[command(after_help = "\
In the foreground (without -d), ignite run streams the VM's console and ends when the VM's \
command ends for good: its exit status becomes ignite's, and the VM is left stopped (desired \
state Stopped; `ignite start NAME` runs it again, `ignite logs NAME` shows its console). With \
--restart on-failure or always, the daemon restarts the VM first as the policy says. \
Ctrl-C stops the VM gracefully and exits with 130; a second Ctrl-C kills it. When another client \
stops (ignite stop, kill) or removes (ignite rm) the VM, ignite run says so and exits with 130. \
Other exit statuses: 125 when ignite failed or the VM cannot run (bad image, missing kernel), 126 \
when the guest crashed.

Examples:
  ignite run 127.0.0.1:5000/demo/busybox:1 -- /bin/sh -c 'cat /etc/os-release'
  ignite run --rm busybox -- sh -c 'exit 3'; echo \"exit status $?\"    # 3, and no VM left
  ignite run --restart on-failure:3 busybox -- /bin/flaky-job           # at most 3 restarts
  ignite run 127.0.0.1:5000/demo/busybox:1 --name web -p 8080:80 -d --restart always -- /bin/httpd -f -p 80 -h /www
  ignite run busybox --kernel 6.1-minimal -- /bin/sh -c 'echo hello'")]
pub struct RunArgs {
    #[command(flatten)]
    vm: VmFlags,
    /// Return once the VM is declared (printing its name) instead of following it to its end.
    #[arg(short, long)]
    detach: bool,
    /// Remove the VM and everything it owns (disk, address) once it has ended (foreground only;
    /// only with --restart no, as with Docker).
    #[arg(long, conflicts_with = "detach")]
    rm: bool,
}

/// `ignite create`.
#[derive(Args)]
#[command(after_help = "Example:\n  \
    ignite create 127.0.0.1:5000/demo/busybox:1 --name web -p 8080:80 -- /bin/httpd -f -p 80 -h /www\n  \
    ignite start web")]
pub struct CreateArgs {
    #[command(flatten)]
    vm: VmFlags,
}

/// What `run` and `create` declare.
#[derive(Args)]
pub struct VmFlags {
    /// OCI image reference of the root filesystem.
    image: String,
    /// The VM's name (default: derived from the image and the time).
    #[arg(long)]
    name: Option<String>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Guest memory (e.g. 256Mi).
    #[arg(long, default_value = "512Mi")]
    memory: String,
    /// Root disk size (e.g. 1Gi).
    #[arg(long, default_value = "4Gi")]
    size: String,
    /// Kernel: an imported kernel's name, or an absolute path to a kernel file on this machine,
    /// imported into the daemon's kernel store first (default: the daemon's --kernel).
    #[arg(long)]
    kernel: Option<String>,
    /// Port forwarded from the host, HOST:GUEST[/tcp|udp]. Repeatable.
    #[arg(short = 'p', long = "ports")]
    ports: Vec<String>,
    /// A public key file for root's authorized_keys.
    #[arg(long)]
    ssh: Option<PathBuf>,
    /// A file of this machine copied into the guest, SOURCE:DESTINATION (mode kept, at most 4 MiB;
    /// its content is sent with the VM). Repeatable.
    #[arg(long = "copy-files")]
    copy_files: Vec<String>,
    /// An environment variable, NAME=VALUE. Repeatable.
    #[arg(short, long, value_name = "NAME=VALUE", value_parser = super::parse_env)]
    env: Vec<(String, String)>,
    /// Restart policy: no (default: the VM ends with its command), on-failure[:N] (restart after a
    /// non-zero exit or a crash, at most N times in a row) or always. Manifests applied with
    /// `ignite apply` keep their own default, restartPolicy Always.
    #[arg(long, value_name = "POLICY", default_value = "no")]
    restart: Restart,
    /// How the guest starts: warm (default: restored from a booted template of its kernel and
    /// shape, when one is built; the first VM of a shape boots cold and builds it) or cold (boot
    /// the kernel). `ignite inspect` shows which it got, and why not warm.
    #[arg(long, value_name = "MODE", default_value = "warm", value_parser = ["warm", "cold"])]
    boot: String,
    /// The command and its arguments (replace the image's entrypoint and cmd).
    #[arg(last = true)]
    command: Vec<String>,
}

/// `--restart`: Docker's restart policies, as the manifest's `restartPolicy` and `maxRestarts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// `no`: never restart (`restartPolicy: Never`).
    No,
    /// `on-failure[:N]`: restart after a failure, at most N times in a row (`OnFailure`, `maxRestarts: N`).
    OnFailure(Option<u32>),
    /// `always`: restart whatever the exit status (`Always`).
    Always,
}

impl FromStr for Restart {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            None if s == "no" => Ok(Restart::No),
            None if s == "always" => Ok(Restart::Always),
            None if s == "on-failure" => Ok(Restart::OnFailure(None)),
            Some(("on-failure", n)) => n
                .parse()
                .map(|n| Restart::OnFailure(Some(n)))
                .map_err(|_| format!("`{n}` in on-failure:N is not a number of restarts (0 or more)")),
            _ => Err(format!("`{s}` is not a restart policy: use no, on-failure[:N] or always")),
        }
    }
}

impl std::fmt::Display for Restart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Restart::No => f.write_str("no"),
            Restart::OnFailure(None) => f.write_str("on-failure"),
            Restart::OnFailure(Some(n)) => write!(f, "on-failure:{n}"),
            Restart::Always => f.write_str("always"),
        }
    }
}

impl Restart {
    /// The manifest's `restartPolicy` and `maxRestarts`.
    fn policy(self) -> (&'static str, Option<u32>) {
        match self {
            Restart::No => ("Never", None),
            Restart::OnFailure(max) => ("OnFailure", max),
            Restart::Always => ("Always", None),
        }
    }
}

/// `ignite start` / `ignite stop`.
#[derive(Args)]
pub struct StateArgs {
    /// The VMs.
    #[arg(required = true)]
    names: Vec<String>,
}

fn default_name(image: &str) -> String {
    let base = image.rsplit('/').next().unwrap_or("vm").split([':', '@']).next().unwrap_or("vm");
    let clean: String =
        base.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{}-{:x}", clean.trim_matches('-'), secs & 0xff_ffff)
}

/// The manifest `ignite run` and `ignite create` apply.
fn manifest(args: &VmFlags, name: &str, state: &str) -> anyhow::Result<serde_json::Value> {
    let mut spec = serde_json::json!({
        "image": args.image, "cpus": args.cpus, "memory": args.memory, "diskSize": args.size,
        "network": {"ports": args.ports}, "state": state,
    });
    let (policy, max_restarts) = args.restart.policy();
    spec["restartPolicy"] = policy.into();
    if args.boot == "cold" {
        spec["boot"] = "Cold".into();
    }
    if let Some(max) = max_restarts {
        spec["maxRestarts"] = max.into();
    }
    if let Some(kernel) = &args.kernel {
        // A kernel file was imported first (see `declare`): the manifest names stored kernels only.
        spec["kernel"] = serde_json::json!({ "image": kernel });
    }
    if let Some((command, rest)) = args.command.split_first() {
        spec["command"] = serde_json::json!([command]);
        spec["args"] = serde_json::json!(rest);
    }
    let env: Vec<serde_json::Value> =
        args.env.iter().map(|(k, v)| serde_json::json!({"name": k, "value": v})).collect();
    spec["env"] = env.into();
    let copies: Vec<serde_json::Value> = args
        .copy_files
        .iter()
        .map(|c| {
            let (src, dst) =
                c.split_once(':').with_context(|| format!("--copy-files {c:?}: expected SOURCE:DESTINATION"))?;
            // The content travels in the manifest: the daemon never reads a path a client names.
            let (content, mode) = read_copied_file(Path::new(src))?;
            Ok(serde_json::json!({"contentBase64": content, "mode": format!("{mode:04o}"), "destination": dst}))
        })
        .collect::<anyhow::Result<_>>()?;
    spec["copyFiles"] = copies.into();
    if let Some(key) = &args.ssh {
        let key = std::fs::read_to_string(key).with_context(|| format!("--ssh {}", key.display()))?;
        spec["ssh"] = serde_json::json!({"authorizedKeys": [key.trim()]});
    }
    Ok(serde_json::json!({
        "apiVersion": "ignite.dev/v1alpha1", "kind": "VM", "metadata": {"name": name}, "spec": spec,
    }))
}

/// A file `--copy-files` copies: its content (base64) and permission bits, within the cap a
/// manifest allows.
fn read_copied_file(path: &Path) -> anyhow::Result<(String, u32)> {
    use base64::Engine as _;
    use std::os::unix::fs::PermissionsExt;
    let max = controller::api::host_paths::MAX_COPY_FILE_BYTES;
    let meta = std::fs::metadata(path).with_context(|| format!("--copy-files: {}", path.display()))?;
    anyhow::ensure!(meta.is_file(), "--copy-files: {} is not a regular file", path.display());
    anyhow::ensure!(meta.len() <= max, "--copy-files: {} is {} bytes, more than {max}", path.display(), meta.len());
    let bytes = std::fs::read(path).with_context(|| format!("--copy-files: {}", path.display()))?;
    Ok((base64::engine::general_purpose::STANDARD.encode(bytes), meta.permissions().mode() & 0o7777))
}

/// `--kernel PATH`: imports the file into the daemon's kernel store (under a name made of its
/// digest, so running it again reuses it) and returns that name; a name is returned as it is.
async fn kernel_name(ctx: &Ctx, kernel: &str) -> anyhow::Result<String> {
    if !Path::new(kernel).is_absolute() {
        return Ok(kernel.to_string());
    }
    let path = std::fs::canonicalize(kernel).with_context(|| format!("--kernel {kernel}"))?;
    client::refuse_remote_file(ctx, &path)?;
    let digest = image_store::Digest::of_file(&path).with_context(|| format!("--kernel {kernel}"))?;
    let name = format!("file-{}", &digest.hex()[..16]);
    let Some((_, mut kernels)) = client::image_store(ctx).await? else {
        anyhow::bail!("no daemon to import {kernel} into");
    };
    let request = proto::ImportKernelRequest { source: path.display().to_string(), name: name.clone() };
    match kernels.import(request).await {
        Ok(_) => Ok(name),
        Err(status) if status.code() == tonic::Code::AlreadyExists => Ok(name),
        Err(status) => Err(client::status(status)),
    }
}

/// Declares a VM through the API in `state`; returns its name.
async fn declare(ctx: &Ctx, args: &VmFlags, state: &str, verb: &str) -> anyhow::Result<String> {
    let mut c = client::vms(ctx).await?;
    let name = args.name.clone().unwrap_or_else(|| default_name(&args.image));
    let mut manifest = manifest(args, &name, state)?;
    if let Some(kernel) = &args.kernel {
        manifest["spec"]["kernel"]["image"] = kernel_name(ctx, kernel).await?.into();
    }
    let text = serde_yaml::to_string(&manifest)?;
    // Like `docker run --name`: an existing VM is never changed by run or create.
    if c.get(proto::VmName { name: name.clone() }).await.is_ok() {
        anyhow::bail!("a VM named {name:?} already exists: remove it with `ignite rm {name}` or pick another --name");
    }
    let file = proto::ManifestFile { path: format!("ignite {verb} {}", args.image), text };
    c.apply(proto::ApplyRequest { files: vec![file], force: false }).await.map_err(client::status)?;
    Ok(name)
}

/// Declares a VM without starting it (`ignite start` starts it).
pub fn create(args: CreateArgs, ctx: &Ctx) -> anyhow::Result<()> {
    client::runtime()?.block_on(async {
        println!("{}", declare(ctx, &args.vm, "Stopped", "create").await?);
        anyhow::Ok(())
    })
}

/// Creates and starts a VM. Detached: prints its name. In the foreground: follows it to its end
/// and returns the exit status of its command (see [`super::follow::follow`]).
pub fn run(args: RunArgs, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    if args.rm && args.vm.restart != Restart::No {
        anyhow::bail!("--rm and --restart {} conflict: a VM that restarts does not end to be removed", args.vm.restart);
    }
    client::runtime()?.block_on(async {
        let mut c = client::vms(ctx).await?;
        if args.detach {
            println!("{}", declare(ctx, &args.vm, "Running", "run").await?);
            return Ok(ExitCode::SUCCESS);
        }
        // Watch before declaring, so no change of the new VM is missed.
        let request = proto::WatchVmsRequest { snapshot: false, from_revision: 0 };
        let watch = c.watch(request).await.map_err(client::status).context("watching VMs")?.into_inner();
        let name = declare(ctx, &args.vm, "Running", "run").await?;
        eprintln!("ignite: VM {name:?} declared; following its console until its command ends (Ctrl-C stops it)");
        super::follow::follow(&mut c, watch, &name, args.rm).await
    })
}

/// Sets the desired state of VMs (`Running` or `Stopped`).
pub fn set_state(args: StateArgs, state: &str, ctx: &Ctx) -> anyhow::Result<()> {
    client::runtime()?.block_on(async {
        let mut c = client::vms(ctx).await?;
        for name in args.names {
            let request = proto::SetStateRequest { name: name.clone(), state: state.to_string() };
            c.set_state(request).await.map_err(client::status)?;
            println!("{name}");
        }
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use controller::api::RestartPolicy;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn run_flags_become_a_valid_manifest() {
        let cli = Cli::parse_from([
            "ignite",
            "busybox:1",
            "--name",
            "web",
            "-p",
            "8080:80",
            "-e",
            "A=b",
            "--memory",
            "128Mi",
            "--",
            "/bin/sh",
            "-c",
            "echo hi",
        ]);
        let doc = manifest(&cli.run.vm, "web", "Running").unwrap();
        let text = serde_yaml::to_string(&doc).unwrap();
        let vm = controller::api::parse_manifests("run", &text).unwrap().remove(0);
        assert_eq!(vm.spec.restart_policy, RestartPolicy::Never, "run defaults to --restart no, as docker run");
        assert_eq!(vm.spec.command.as_deref(), Some(&["/bin/sh".to_string()][..]));
        assert_eq!(vm.spec.args.as_deref(), Some(&["-c".to_string(), "echo hi".to_string()][..]));
        assert_eq!(vm.spec.network.ports[0].to_string(), "8080:80/tcp");
        assert_eq!(vm.spec.memory.mib(), 128);
        for bad in ["NOEQUALS", "=value"] {
            let err = Cli::try_parse_from(["ignite", "busybox", "-e", bad]).err().expect("refused").to_string();
            assert!(err.contains("--env <NAME=VALUE>") && err.contains(&format!("`{bad}` is not NAME=VALUE")), "{err}");
        }
        assert!(controller::api::validate::is_dns_label(&default_name("127.0.0.1:5000/demo/Busy_Box:1")));
    }

    #[test]
    fn copied_files_travel_as_content_never_as_a_path() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("start.sh");
        std::fs::write(&script, b"#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o750)).unwrap();
        let arg = format!("{}:/usr/local/bin/start", script.display());
        let cli = Cli::parse_from(["ignite", "busybox:1", "--copy-files", &arg]);
        let text = serde_yaml::to_string(&manifest(&cli.run.vm, "web", "Running").unwrap()).unwrap();
        assert!(!text.contains(&dir.path().display().to_string()), "no host path in {text}");
        // A daemon that allows no host path accepts it.
        let vm = controller::api::parse_manifests("run", &text).unwrap().remove(0);
        let copy = &vm.spec.copy_files[0];
        assert_eq!((copy.source.as_ref(), copy.mode.as_deref()), (None, Some("0750")));
        assert_eq!(copy.content_base64.as_deref(), Some("IyEvYmluL3NoCmVjaG8gaGkK"));
        let dir_arg = format!("{}:/x", dir.path().display());
        let cli = Cli::parse_from(["ignite", "busybox:1", "--copy-files", &dir_arg]);
        assert!(manifest(&cli.run.vm, "web", "Running").unwrap_err().to_string().contains("not a regular file"));
    }

    #[test]
    fn restart_flags_map_onto_the_restart_policy() {
        let spec = |flags: &[&str]| {
            let cli = Cli::try_parse_from(["ignite", "busybox"].iter().chain(flags)).map_err(|e| e.to_string())?;
            let text = serde_yaml::to_string(&manifest(&cli.run.vm, "job", "Running").unwrap()).unwrap();
            Ok::<_, String>(controller::api::parse_manifests("run", &text).unwrap().remove(0).spec)
        };
        for (flag, policy, max) in [
            ("no", RestartPolicy::Never, None),
            ("always", RestartPolicy::Always, None),
            ("on-failure", RestartPolicy::OnFailure, None),
            ("on-failure:3", RestartPolicy::OnFailure, Some(3)),
            ("on-failure:0", RestartPolicy::OnFailure, Some(0)),
        ] {
            let s = spec(&["--restart", flag]).unwrap();
            assert_eq!((s.restart_policy, s.max_restarts), (policy, max), "--restart {flag}");
        }
        for (bad, says) in [
            ("sometimes", "`sometimes` is not a restart policy: use no, on-failure[:N] or always"),
            ("always:2", "`always:2` is not a restart policy"),
            ("on-failure:x", "`x` in on-failure:N is not a number of restarts"),
            ("on-failure:-1", "`-1` in on-failure:N is not a number of restarts"),
        ] {
            let err = spec(&["--restart", bad]).unwrap_err();
            assert!(err.contains("--restart <POLICY>") && err.contains(says), "{err}");
        }
        let err = Cli::try_parse_from(["ignite", "busybox", "--rm", "-d"]).err().expect("refused").to_string();
        assert!(err.contains("--rm") && err.contains("--detach"), "{err}");
    }
}
