//! The `ignite` binary's image and kernel commands, end to end: a real registry on loopback (Debian's
//! docker-registry), an image built with umoci from busybox-static and pushed with skopeo, and a real
//! store under a temporary `--root`. The commands go through the API of a daemon the CLI starts
//! itself (without network or VMs), which the test stops at its end.

use image_store::testing::registry;
use std::path::Path;
use std::process::{Command, Output};

fn ignite(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ignite"))
        .arg("--root")
        .arg(root)
        .arg("--socket")
        .arg(root.with_extension("sock"))
        .args(args)
        // The daemon the CLI starts: no host network; the CLI's and its credentials stay the test's.
        .env("IGNITE_NO_NETWORK", "1")
        .env("DOCKER_CONFIG", root.with_extension("docker"))
        .output()
        .expect("run ignite")
}

/// Stops the daemon the CLI started on `root` when dropped (SIGTERM, then waits for it).
struct StopDaemon<'a>(&'a Path);

impl Drop for StopDaemon<'_> {
    fn drop(&mut self) {
        let root = self.0.to_string_lossy().into_owned();
        let pids: Vec<String> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
                let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                let ours = args.contains(&root.as_bytes()) && args.contains(&&b"daemon"[..]);
                ours.then(|| e.file_name().to_string_lossy().into_owned())
            })
            .collect();
        for pid in &pids {
            let _ = Command::new("kill").arg(pid).status();
        }
        for pid in &pids {
            for _ in 0..100 {
                if !Path::new("/proc").join(pid).exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

fn ok(out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "ignite failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn err(out: Output) -> String {
    assert!(!out.status.success(), "ignite should have failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

fn have(tool: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success())
}

#[test]
fn kernel_import_ls_rm() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let _daemon = StopDaemon(&root);
    // A real ELF with a 64-bit entry: the test binary of this very test is one.
    let elf = std::env::current_exe().unwrap();
    let out = ok(ignite(&root, &["kernel", "import", elf.to_str().unwrap(), "--name", "k1"]));
    assert!(out.starts_with("k1  sha256:"), "{out}");
    let listing = ok(ignite(&root, &["kernel", "ls"]));
    assert!(listing.starts_with("NAME") && listing.contains("\nk1 "), "{listing}");

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a kernel").unwrap();
    let message = err(ignite(&root, &["kernel", "import", text.to_str().unwrap(), "--name", "k2"]));
    assert!(message.contains("notes.txt"), "{message}");
    let message = err(ignite(&root, &["kernel", "import", "nope:latest", "--name", "k3"]));
    assert!(message.contains("ignite image pull nope:latest"), "the error says what to do next: {message}");

    ok(ignite(&root, &["kernel", "rm", "k1"]));
    assert_eq!(ok(ignite(&root, &["kernel", "ls"])).trim(), "NAME   DIGEST   SIZE   SOURCE");
    assert!(err(ignite(&root, &["kernel", "rm", "k1"])).contains("k1"));
}

#[test]
fn image_pull_import_ls_rm_against_a_real_registry() {
    for tool in ["umoci", "skopeo", "busybox"] {
        if !have(tool) {
            eprintln!("skipping: {tool} is not installed (scripts/install-deps.sh installs it)");
            return;
        }
    }
    let registry = match registry::Registry::start(None) {
        Ok(registry) => registry,
        Err(reason) => {
            eprintln!("skipping: {reason}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let bundle = dir.path().join("bundle");
    let (l, b) = (layout.display(), bundle.display());
    sh(&format!("umoci init --layout {l} && umoci new --image {l}:demo && umoci unpack --image {l}:demo {b}"));
    sh(&format!("mkdir -p {b}/rootfs/bin && cp \"$(command -v busybox)\" {b}/rootfs/bin/busybox"));
    sh(&format!("umoci repack --image {l}:demo {b} && umoci config --image {l}:demo --config.cmd /bin/busybox"));
    let reference = format!("{}/demo:1", registry.host());
    sh(&format!("skopeo copy --quiet --dest-tls-verify=false oci:{l}:demo docker://{reference}"));

    let root = dir.path().join("store");
    let _daemon = StopDaemon(&root);
    let digest = ok(ignite(&root, &["image", "pull", "--insecure", &reference]));
    assert!(digest.trim().starts_with("sha256:"), "{digest}");
    // Pulling again is a no-op that gives the same digest.
    assert_eq!(ok(ignite(&root, &["image", "pull", "--insecure", &reference])), digest);
    let listing = ok(ignite(&root, &["image", "ls"]));
    assert!(listing.contains(&reference), "{listing}");

    // Import of the same layout under another name (no registry involved).
    ok(ignite(&root, &["image", "import", layout.to_str().unwrap(), "--tag", "local/demo:2"]));
    assert!(ok(ignite(&root, &["image", "ls"])).contains("local/demo:2"));

    let message = err(ignite(&root, &["image", "pull", "--insecure", &format!("{}/demo:nope", registry.host())]));
    assert!(message.contains("nope"), "{message}");
    let closed = format!("127.0.0.1:{}/demo:1", registry::free_port());
    assert!(err(ignite(&root, &["image", "pull", "--insecure", &closed])).contains("not reachable"));

    ok(ignite(&root, &["image", "rm", &reference]));
    ok(ignite(&root, &["image", "rm", "local/demo:2"]));
    assert_eq!(ok(ignite(&root, &["image", "ls"])).trim(), "REFERENCE   DIGEST   LAYERS   SIZE");
    let blobs = std::fs::read_dir(root.join("blobs/sha256")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(blobs, 0, "removing every image frees every blob");
}

#[test]
fn a_pull_through_the_daemon_carries_the_users_registry_credentials() {
    let Ok(out) = Command::new("htpasswd").args(["-Bbn", "alice", "secret"]).output() else {
        eprintln!("skipping: htpasswd (apache2-utils) is not installed (scripts/install-deps.sh installs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, &out.stdout).unwrap();
    let registry = match registry::Registry::start(Some(&htpasswd)) {
        Ok(registry) => registry,
        Err(reason) => {
            eprintln!("skipping: {reason}");
            return;
        }
    };
    let host = registry.host();
    let image = image_store::testing::fixtures::whiteout_image();
    image_store::testing::fixtures::push_image(&host, "private", "v1", &image, Some(("alice", "secret")));
    let root = dir.path().join("store");
    let _daemon = StopDaemon(&root);
    let reference = format!("{host}/private:v1");
    let message = err(ignite(&root, &["image", "pull", &reference]));
    assert!(message.contains("denied access to") && message.contains("private"), "{message}");
    let config = dir.path().join("auth.json");
    std::fs::write(&config, format!(r#"{{"auths":{{"{host}":{{"auth":"YWxpY2U6c2VjcmV0"}}}}}}"#)).unwrap();
    let digest = ok(ignite(&root, &["image", "pull", "--auth-config", config.to_str().unwrap(), &reference]));
    assert!(digest.trim().starts_with("sha256:"), "{digest}");
    let log = std::fs::read_to_string(root.join("daemon.log")).unwrap_or_default();
    assert!(!log.contains("secret"), "the password never reaches the daemon's log");
}
