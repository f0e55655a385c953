//! `ignite run IMAGE`: create and start a VM in one step, like `docker run`, by applying a
//! generated manifest through the daemon; `create` declares it stopped; `start` and `stop` set
//! its desired state.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use controller::grpc::proto;

use super::client::{self, Ctx};

/// `ignite run`.
#[derive(Args)]
#[command(after_help = "Examples:\n  \
    ignite run 127.0.0.1:5000/demo/busybox:1 --name web -p 8080:80 -d -- /bin/httpd -f -p 80 -h /www\n  \
    ignite run busybox --kernel 6.1-minimal -- /bin/sh -c 'echo hello'")]
pub struct RunArgs {
    #[command(flatten)]
    vm: VmFlags,
    /// Return once the VM is declared instead of following its console.
    #[arg(short, long)]
    detach: bool,
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
    /// The command and its arguments (replace the image's entrypoint and cmd).
    #[arg(last = true)]
    command: Vec<String>,
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

/// Creates and starts a VM; follows its console unless detached.
pub fn run(args: RunArgs, ctx: &Ctx) -> anyhow::Result<()> {
    client::runtime()?.block_on(async {
        let name = declare(ctx, &args.vm, "Running", "run").await?;
        let mut c = client::vms(ctx).await?;
        println!("{name}");
        if args.detach {
            return anyhow::Ok(());
        }
        eprintln!("following the console of {name} (Ctrl-C detaches; the VM keeps running)");
        let request = proto::LogsRequest { name, follow: true, tail_bytes: 0 };
        let mut stream = c.logs(request).await.map_err(client::status)?.into_inner();
        use std::io::Write;
        while let Some(chunk) = stream.message().await.map_err(client::status)? {
            std::io::stdout().write_all(&chunk.data)?;
            std::io::stdout().flush()?;
        }
        anyhow::Ok(())
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
}
