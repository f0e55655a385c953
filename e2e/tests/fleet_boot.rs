//! The whole path with a real Linux guest: a VM manifest committed to a git repository, the real
//! `ignite daemon` (inside a network namespace this test creates), an image pulled from a real
//! registry, a root disk with `ignite-init` as PID 1, the patched guest kernel booting on
//! /dev/kvm, the guest's address set at boot, and a port forwarded from the host to the guest's
//! web server. Deleting the file removes the VM, its tap and its forward.
//!
//! One Linux boot: about a minute and a half on hosts whose KVM emulates guests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use controller::testing::git::Repo;
use controller::testing::netns::run_inside;
use ignite_e2e::{guest_kernel, ignite_bin, ignite_init_bin, kvm_unavailable};
use image_store::testing::{fixtures, registry::Registry};

const NAME: &str = "a_committed_vm_boots_linux_with_ignite_init_and_serves_its_port";

const MANIFEST: &str = "apiVersion: ignite.dev/v1alpha1
kind: VM
metadata:
  name: web
spec:
  image: IMAGE
  memory: 128Mi
  diskSize: 256Mi
  command: [/bin/sh, -c]
  args: [\"echo IGNITE-E2E-UP $(hostname) $GREETING; exec httpd -f -p 80 -h /www\"]
  env:
    - name: GREETING
      value: from-the-manifest
  network:
    ports: [\"8080:80\"]
";

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn http_get(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_committed_vm_boots_linux_with_ignite_init_and_serves_its_port() {
    if let Some(why) = kvm_unavailable() {
        eprintln!("SKIP {NAME}: {why}");
        return;
    }
    let Some(image) = fixtures::busybox_image(&["/bin/sh"]) else {
        eprintln!("SKIP {NAME}: {} (busybox-static) is not installed", fixtures::BUSYBOX);
        return;
    };
    let kernel = guest_kernel(); // built outside the namespace's time budget
    if !run_inside("ignite-e2e-fleet", NAME) {
        return;
    }
    let init = ignite_init_bin();
    let registry = Registry::start(None).unwrap();
    fixtures::push_image(&registry.host(), "demo/busybox", "1", &image, None);
    let manifest = MANIFEST.replace("IMAGE", &format!("{}/demo/busybox:1", registry.host()));
    let repo = Repo::new();
    repo.commit(&[("vms/README.md", Some("demo fleet\n")), ("vms/web.yaml", Some(&manifest))], "web");
    let root = tempfile::tempdir().unwrap();
    let log = root.path().join("daemon.log");
    let daemon = Daemon(
        Command::new(ignite_bin())
            .arg("--root")
            .arg(root.path())
            .args(["--log", "info", "daemon", "--gitops", &repo.url(), "--path", "vms", "--interval", "1s"])
            .args(["--bridge", "ignbr-e2e", "--subnet", "10.97.0.0/24", "--kernel"])
            .arg(&kernel)
            .arg("--init")
            .arg(&init)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let console = root.path().join("vms/web/console.log");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let context = || format!("daemon log:\n{}\nconsole:\n{}", read(&log), read(&console));
    let started = Instant::now();
    let deadline = Duration::from_secs(420);
    let mut up = false;
    while started.elapsed() < deadline {
        if read(&console).contains("IGNITE-E2E-UP web from-the-manifest") {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(up, "the guest's command did not run within {deadline:?}:\n{}", context());
    eprintln!("commit -> guest command running: {:?}", started.elapsed());
    let c = read(&console);
    assert!(c.contains("ignite-init:"), "ignite-init ran as PID 1:\n{c}");
    assert!(c.contains("IP-Config: Complete") || c.contains("10.97.0.2"), "the guest address was set at boot:\n{c}");

    let mut answer = String::new();
    wait_for("the guest's web server through the host port", Duration::from_secs(120), || {
        answer = http_get(8080).unwrap_or_default();
        answer.contains("hello from an ignite microVM")
    });
    assert!(answer.starts_with("HTTP/1."), "{answer}");

    // Delete the file: the VM, its tap and its forward go away.
    repo.commit(&[("vms/web.yaml", None)], "delete web");
    let taps = || -> Vec<String> {
        let names = std::fs::read_dir("/sys/class/net").unwrap().flatten();
        names
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|t| t.starts_with("ign") && t != "ignbr-e2e")
            .collect()
    };
    // Removal ends with the disk and the runtime directory, after the process, forwards and tap.
    wait_for("web and its tap removed", Duration::from_secs(120), || {
        !root.path().join("vms/web").exists() && !root.path().join("runtime/web").exists() && taps().is_empty()
    });
    assert!(http_get(8080).is_err(), "the forward is gone");
    drop(daemon);
}
