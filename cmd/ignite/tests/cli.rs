//! The `ignite` binary's image and kernel commands, end to end: a real registry on loopback (Debian's
//! docker-registry), an image built with umoci from busybox-static and pushed with skopeo, and a real
//! store under a temporary `--root`.

use image_store::testing::registry;
use std::path::Path;
use std::process::{Command, Output};

fn ignite(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ignite")).arg("--root").arg(root).args(args).output().expect("run ignite")
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
