//! The whole path with a real Linux guest: a VM manifest committed to a git repository, the real
//! `ignite daemon` (inside a network namespace this test creates), an image pulled from a real
//! registry, a root disk with `ignite-init` as PID 1, the patched guest kernel booting on
//! /dev/kvm, and the guest's address set at boot, seen through the real `ignite` CLI. Then: a
//! commit with invalid YAML changes nothing and `ignite ps` says why; a commit changing the memory
//! and adding a port recreates the VM, the daemon is killed (SIGKILL) in the middle of that, and
//! the next daemon finishes it: the port answers from the host side of the namespace. Deleting the
//! file removes the VM, its tap and its forward. On the first boot, `ignite exec` (with pipes, and
//! with a terminal: `exec -it web -- sh` on tmux) and `ignite attach` work with the guest, and the
//! guest has what a normal boot gives (mounts, loopback, limits, /etc/hosts).
//!
//! Two Linux boots: about a minute and a half each on hosts whose KVM emulates guests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use controller::testing::git::Repo;
use controller::testing::netns::run_inside;
use controller::testing::tmux::{tmux_missing, Tmux};
use ignite_e2e::{guest_kernel, ignite_bin, ignite_cmd, kvm_unavailable, Daemon, KillVmsOnDrop};
use image_store::testing::{fixtures, registry::Registry};

const NAME: &str = "a_committed_vm_boots_linux_with_ignite_init_and_serves_its_port";

const MANIFEST: &str = "apiVersion: ignite.dev/v1alpha1
kind: VM
metadata:
  name: web
spec:
  image: IMAGE
  memory: MEMORY
  diskSize: 256Mi
  command: [/bin/sh, -c]
  args: [\"echo IGNITE-E2E-UP $(hostname) $GREETING; exec httpd -f -p 80 -h /www\"]
  env:
    - name: GREETING
      value: from-the-manifest
PORTS";

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

/// The real daemon on `root`, following `repo`, logging (appending) to `root/daemon.log`.
fn start_daemon(root: &Path, repo: &Repo, kernel: &Path) -> Daemon {
    let url = repo.url();
    let gitops = ["--gitops", &url, "--path", "vms", "--interval", "1s"];
    Daemon::start(root, kernel, &[&gitops[..], &["--bridge", "ignbr-e2e", "--subnet", "10.97.0.0/24"]].concat())
}

/// Runs `ignite ARGS` against the test's daemon; its stdout and stderr.
fn ignite(root: &Path, args: &[&str]) -> (String, String) {
    let out = ignite_cmd(root).args(args).output().unwrap();
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `ignite exec` with `stdin`, returning stdout, stderr and the exit code.
/// Runs `ignite exec ARGS` with `stdin`: stdout, stderr and exit code. A guest command killed by
/// SIGSEGV (status 139) is run once more, saying so: on hosts whose KVM is software, a busy host makes
/// the hypervisor lose guest user memory now and then (issue 13, blocked as a platform fault); a
/// segfault that comes back is reported.
fn ignite_exec(root: &Path, args: &[&str], stdin: &[u8]) -> (String, String, Option<i32>) {
    let console_tail = || {
        let console = std::fs::read_to_string(root.join("vms/web/console.log")).unwrap_or_default();
        let lines: Vec<&str> = console.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    let first = ignite_exec_once(root, args, stdin);
    if first.2 == Some(125) {
        eprintln!("`ignite exec {args:?}` failed in ignite (125); the guest console ends:\n{}", console_tail());
    }
    if first.2 != Some(139) {
        return first;
    }
    eprintln!(
        "NOTE: `ignite exec {args:?}` died of SIGSEGV in the guest (the software KVM's fault under host load, issue 13); once more. The guest console ends:\n{}",
        console_tail()
    );
    ignite_exec_once(root, args, stdin)
}

fn ignite_exec_once(root: &Path, args: &[&str], stdin: &[u8]) -> (String, String, Option<i32>) {
    let mut child = ignite_cmd(root)
        .arg("exec")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (text(&out.stdout), text(&out.stderr), out.status.code())
}

/// The guest kernel's reports of a process killed by a memory fault (and of init's death) on `console`.
fn guest_fault_reports(console: &Path) -> Vec<String> {
    ignite_e2e::guest_fault_reports(&std::fs::read_to_string(console).unwrap_or_default())
}

/// Whether, on a host whose KVM is software, the guest kernel reported more memory faults than the
/// `before` it had: issue 13's host fault, which may kill the guest's init (the daemon then restarts
/// the VM). Always false on hardware KVM, where such a report is a bug of ours.
fn host_fault_since(console: &Path, before: usize) -> bool {
    vmm_core::VirtMode::detect() == vmm_core::VirtMode::Emulated && guest_fault_reports(console).len() > before
}

/// [`exec_and_attach`], except on a host whose KVM is software when the guest kernel reports that
/// processes the agent started segfaulted: there the host's hypervisor serves a new process pages of
/// the address space it replaced (the value read from its TLS is a pointer of its parent's heap), the
/// fault of issue 13 (blocked). The exec and attach checks then stop with a SKIP that quotes the
/// guest kernel, and the rest of the test goes on. On hardware KVM a segfault fails the test.
///
/// Returns whether the checks were cut short (the VM may then have been restarted: a fault can kill
/// ignite-init itself).
fn exec_and_attach_unless_the_host_loses_guest_memory(r: &Path, console: &Path) -> bool {
    let before = guest_fault_reports(console).len();
    let outcome = std::panic::catch_unwind(|| exec_and_attach(r));
    let Err(panic) = outcome else { return false };
    if !host_fault_since(console, before) {
        std::panic::resume_unwind(panic);
    }
    let report = guest_fault_reports(console);
    eprintln!(
        "SKIP {NAME} (exec and attach checks): processes started by the guest agent segfaulted on this software KVM \
         (issue 13, the host's hypervisor); the guest kernel said:\n{}",
        report.join("\n")
    );
    true
}

/// `ignite exec` runs commands in the guest through ignite-init's agent (stdin, stdout, stderr,
/// exit codes), and `ignite attach` gets console output and sends console input.
fn exec_and_attach(r: &Path) {
    // The agent listens before the main process starts, so it answers by now.
    let script = "echo out-$(hostname) $GREETING; echo to-stderr >&2; exit 7";
    let (out, err, code) = ignite_exec(r, &["web", "--", "sh", "-c", script], b"");
    assert_eq!((out.as_str(), code), ("out-web from-the-manifest\n", Some(7)), "stderr: {err}");
    assert_eq!(err, "to-stderr\n");
    let (out, err, code) = ignite_exec(r, &["-i", "web", "--", "sh", "-c", "tr a-z A-Z"], b"hello guest\n");
    assert_eq!((out.as_str(), code), ("HELLO GUEST\n", Some(0)), "stderr: {err}");
    let (_, err, code) = ignite_exec(r, &["web", "--", "/no/such/program"], b"");
    assert_eq!(code, Some(127), "{err}");
    assert!(err.contains("/no/such/program"), "{err}");
    // The main process runs as root; -u picks another user from the image's /etc/passwd.
    let (out, err, code) = ignite_exec(r, &["web", "--", "id", "-u"], b"");
    assert_eq!((out.as_str(), code), ("0\n", Some(0)), "stderr: {err}");
    let (out, err, code) =
        ignite_exec(r, &["-u", "nobody", "web", "--", "sh", "-c", "echo $(id -u):$(id -g) $HOME"], b"");
    assert_eq!((out.as_str(), code), ("65534:65534 /\n", Some(0)), "stderr: {err}");
    let (_, err, code) = ignite_exec(r, &["-u", "ghost", "web", "--", "true"], b"");
    assert_eq!(code, Some(126), "{err}");
    assert!(err.contains("user \"ghost\" not found in /etc/passwd"), "{err}");
    let (_, err, code) = ignite_exec(r, &["nosuchvm", "--", "true"], b"");
    assert!(code != Some(0) && err.contains("no VM named \"nosuchvm\""), "{err}");
    let timed = Instant::now();
    let (_, err, code) = ignite_exec(r, &["web", "--", "true"], b"");
    assert_eq!(code, Some(0), "{err}");
    eprintln!("ignite exec: output, stdin, exit codes and errors work; `exec web -- true` took {:?}", timed.elapsed());
    a_normal_boots_environment(r);
    exec_with_a_terminal(r);

    // Attach, then a command in the guest reads a line from the console and writes to it.
    let mut attach = ignite_cmd(r)
        .args(["attach", "web"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut typed = attach.stdin.take().unwrap();
    let mut attach_out = attach.stdout.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = attach_out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let root = r.to_path_buf();
    let console_reader = std::thread::spawn(move || {
        let script = "read line < /dev/console; echo console-said-$line > /dev/console; echo got-$line";
        ignite_exec(&root, &["web", "--", "sh", "-c", script], b"")
    });
    // Type until the guest has read a line (the reader may not have opened the console yet).
    let started = Instant::now();
    while !console_reader.is_finished() {
        assert!(started.elapsed() < Duration::from_secs(120), "the guest never read the typed line");
        let _ = typed.write_all(b"typed\n");
        std::thread::sleep(Duration::from_secs(1));
    }
    let (out, err, code) = console_reader.join().unwrap();
    assert_eq!((out.as_str(), code), ("got-typed\n", Some(0)), "stderr: {err}");
    let has = |needle: &str| String::from_utf8_lossy(&seen.lock().unwrap()).contains(needle);
    wait_for("the console output to reach ignite attach", Duration::from_secs(30), || has("console-said-typed"));
    let _ = attach.kill();
    let _ = attach.wait();
    let _ = reader.join();
    eprintln!("ignite attach: console input read by the guest, console output seen");
    attach_on_a_terminal(r);
}

/// ignite-init gave the guest what images expect from a normal boot: /dev/shm, /dev/pts, /dev/mqueue
/// and cgroup2 (when the kernel has them), /dev links, loopback up, Docker's open-files limit and
/// the hostname in /etc/hosts.
fn a_normal_boots_environment(r: &Path) {
    let script = "cat /proc/mounts; echo FS; cat /proc/filesystems; echo LO; ip link show lo; \
                  echo NOFILE $(ulimit -n) CORE $(ulimit -c); ls -l /dev/fd /dev/stdin; cat /etc/hosts";
    let (out, err, code) = ignite_exec(r, &["web", "--", "sh", "-c", script], b"");
    assert_eq!(code, Some(0), "{out}\nstderr: {err}");
    let mounted = |target: &str, fstype: &str| {
        out.lines().any(|l| l.split(' ').nth(1) == Some(target) && l.split(' ').nth(2) == Some(fstype))
    };
    let (_, filesystems) = out.split_once("\nFS\n").unwrap_or_default();
    let kernel_has = |fstype: &str| filesystems.lines().any(|l| l.split_whitespace().last() == Some(fstype));
    assert!(mounted("/dev/pts", "devpts") && mounted("/dev/shm", "tmpfs"), "{out}");
    for (target, fstype) in [("/dev/mqueue", "mqueue"), ("/sys/fs/cgroup", "cgroup2")] {
        if kernel_has(fstype) {
            assert!(mounted(target, fstype), "{target} ({fstype}) is mounted: {out}");
        } else {
            eprintln!("note: this guest kernel has no {fstype}; {target} is not mounted");
        }
    }
    let (_, lo) = out.split_once("\nLO\n").unwrap_or_default();
    assert!(lo.lines().next().is_some_and(|l| l.contains(",UP")), "loopback is up: {lo}");
    assert!(out.contains("NOFILE 1048576 CORE 0"), "{out}");
    assert!(out.contains("/dev/fd -> /proc/self/fd") && out.contains("/dev/stdin -> /proc/self/fd/0"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("127.0.0.1") && l.split_whitespace().any(|w| w == "web")), "{out}");
    eprintln!(
        "ignite-init: /dev/shm, /dev/pts, /dev links, loopback, rlimits and /etc/hosts as a normal boot has them"
    );
}

/// `ignite exec -t` gives the command a pseudo-terminal sized like the local one; `-it` on a real
/// terminal (tmux) is an interactive shell: typed lines and Ctrl-C reach it, resizes follow, and the
/// shell's exit status becomes ignite's, with the local terminal restored.
fn exec_with_a_terminal(r: &Path) {
    let script = "busybox tty; echo TERM=$TERM; echo to-stderr >&2";
    let (out, err, code) = ignite_exec(r, &["-t", "web", "--", "sh", "-c", script], b"");
    assert_eq!(code, Some(0), "{out}\nstderr: {err}");
    let lines: Vec<&str> = out.split("\r\n").collect();
    assert!(lines[0].starts_with("/dev/pts/"), "a pseudo-terminal: {out:?} (stderr: {err})");
    assert_eq!(lines[1..3], ["TERM=xterm", "to-stderr"], "stderr merged into the terminal: {out:?}");
    let (_, err, code) = ignite_exec(r, &["-it", "web", "--", "sh"], b"");
    assert!(code != Some(0) && err.contains("the input device is not a TTY"), "{err}");
    eprintln!("ignite exec -t: a pseudo-terminal in the guest, output merged");

    if tmux_missing() {
        eprintln!("skipping exec -it on a terminal: tmux is not installed (scripts/install-deps.sh installs it)");
        return;
    }
    let command = format!(
        "IGNITE_AUTOSTART=0 {} --root {} --socket {} exec -it web -- sh; echo EXEC-EXIT-$?; stty -a | tr ' ' '\\n' | grep -x -- '-*icanon'; echo STTY-SHOWN; sleep 60",
        ignite_bin().display(),
        r.display(),
        r.join("ignite.sock").display()
    );
    let tmux = Tmux::start("ignite-e2e-exec", &command);
    let line_is = |screen: &str, want: &str| screen.lines().any(|l| l.trim() == want);
    tmux.wait("the guest shell's prompt", Duration::from_secs(120), |s| {
        s.lines().any(|l| l.trim_end().ends_with(" #"))
    });
    tmux.keys("busybox stty size; busybox tty");
    tmux.keys("Enter");
    tmux.wait("the shell to see the terminal's size (tmux: 50x200)", Duration::from_secs(120), |s| {
        line_is(s, "50 200")
    });
    let resized =
        Command::new("tmux").args(["resize-window", "-t", "ignite-e2e-exec", "-x", "120", "-y", "40"]).status();
    assert!(resized.unwrap().success(), "tmux resize-window");
    // The resize travels as SIGWINCH to ignite, a Resize frame, TIOCSWINSZ in the guest.
    std::thread::sleep(Duration::from_secs(2));
    tmux.keys("busybox stty size");
    tmux.keys("Enter");
    tmux.wait("the new size after a resize", Duration::from_secs(120), |s| line_is(s, "40 120"));
    tmux.keys("sleep 300");
    tmux.keys("Enter");
    // Ctrl-C interrupts the sleep (and flushes typed input), then the shell runs the next line. Under
    // an emulated guest the sleep may not run yet when Ctrl-C arrives: then interrupt it again.
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_secs(2));
        tmux.keys("C-c");
        tmux.keys("echo after-$((6*7))");
        tmux.keys("Enter");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !line_is(&tmux.screen(), "after-42") {
            std::thread::sleep(Duration::from_millis(300));
        }
        if line_is(&tmux.screen(), "after-42") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "Ctrl-C never ended sleep: {}", tmux.screen());
    }
    tmux.keys("exit 3");
    tmux.keys("Enter");
    let screen =
        tmux.wait("the shell's exit and the terminal's mode", Duration::from_secs(120), |s| s.contains("STTY-SHOWN"));
    assert!(screen.contains("EXEC-EXIT-3"), "the shell's exit status is ignite's: {screen}");
    assert!(line_is(&screen, "icanon"), "the terminal is back in canonical mode: {screen}");
    eprintln!("ignite exec -it: an interactive shell on a sized, resizable terminal; Ctrl-C and the exit status work");
}

/// `ignite attach` on a real terminal (tmux): raw mode, so Enter reaches the guest as typed;
/// Ctrl-P Ctrl-Q detaches with status 0 and gives the terminal back in canonical mode.
fn attach_on_a_terminal(r: &Path) {
    if tmux_missing() {
        eprintln!("skipping attach on a terminal: tmux is not installed (scripts/install-deps.sh installs it)");
        return;
    }
    let command = format!(
        "IGNITE_AUTOSTART=0 {} --root {} --socket {} attach web; echo ATTACH-EXIT-$?; stty -a | tr ' ' '\\n' | grep -x -- '-*icanon'; echo STTY-SHOWN; sleep 60",
        ignite_bin().display(),
        r.display(),
        r.join("ignite.sock").display()
    );
    let tmux = Tmux::start("ignite-e2e-attach", &command);
    tmux.wait("ignite attach to say how to detach", Duration::from_secs(30), |s| s.contains("Ctrl-P Ctrl-Q detaches"));
    let root = r.to_path_buf();
    let console_reader = std::thread::spawn(move || {
        // Lines typed for the attach above may still wait in the console's input: skip them.
        let script = "while read line < /dev/console; do [ \"$line\" = from-a-tty ] && break; done; \
                      echo console-got-$line > /dev/console";
        ignite_exec(&root, &["web", "--", "sh", "-c", script], b"")
    });
    let started = Instant::now();
    while !console_reader.is_finished() {
        assert!(started.elapsed() < Duration::from_secs(120), "the guest never read the line typed on the terminal");
        tmux.keys("from-a-tty");
        tmux.keys("Enter");
        std::thread::sleep(Duration::from_secs(1));
    }
    let (_, err, code) = console_reader.join().unwrap();
    assert_eq!(code, Some(0), "stderr: {err}");
    tmux.wait("the guest's answer on the terminal", Duration::from_secs(30), |s| s.contains("console-got-from-a-tty"));
    tmux.keys("C-p");
    tmux.keys("C-q");
    let screen = tmux.wait("the detach and the terminal's mode", Duration::from_secs(30), |s| s.contains("STTY-SHOWN"));
    assert!(screen.contains("detached from web") && screen.contains("ATTACH-EXIT-0"), "{screen}");
    assert!(screen.lines().any(|l| l.trim() == "icanon"), "the terminal is back in canonical mode: {screen}");
    eprintln!(
        "ignite attach on a terminal: raw input reached the guest; Ctrl-P Ctrl-Q detached and restored the terminal"
    );
}

fn manifest(image: &str, memory: &str, ports: &str) -> String {
    MANIFEST.replace("IMAGE", image).replace("MEMORY", memory).replace("PORTS", ports)
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
    let registry = Registry::start(None).unwrap();
    fixtures::push_image(&registry.host(), "demo/busybox", "1", &image, None);
    let image = format!("{}/demo/busybox:1", registry.host());
    let repo = Repo::new();
    let first = manifest(&image, "128Mi", "");
    repo.commit(&[("vms/README.md", Some("demo fleet\n")), ("vms/web.yaml", Some(&first))], "web");
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let _vms = KillVmsOnDrop(r);
    let mut daemon = start_daemon(r, &repo, &kernel);
    let log = r.join("daemon.log");
    let console = r.join("vms/web/console.log");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let context = || format!("daemon log:\n{}\nconsole:\n{}", read(&log), read(&console));
    let pid = || read(&r.join("vms/web/pid")).trim().to_string();

    // 1. Commit a VM: it reaches Running, and its console shows the guest's init marker.
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
    let (ps, _) = ignite(r, &["ps"]);
    assert!(ps.lines().any(|l| l.starts_with("web ") && l.contains("Running") && l.contains("10.97.0.2")), "{ps}");
    let mut first_pid = pid();
    let faults_before = guest_fault_reports(&console).len();
    let markers = || read(&console).matches("IGNITE-E2E-UP web from-the-manifest").count();
    let markers_before = markers();
    if exec_and_attach_unless_the_host_loses_guest_memory(r, &console) {
        // The fault may have killed the guest's init (its panic can follow the process's trap by a
        // moment): then the daemon restarts the VM, and the test goes on once its command runs again.
        let init_died = || {
            let reports = guest_fault_reports(&console);
            reports.get(faults_before..).unwrap_or_default().iter().any(|l| l.contains("Attempted to kill init"))
        };
        let settle = Instant::now();
        while settle.elapsed() < Duration::from_secs(30) && !init_died() && pid() == first_pid {
            std::thread::sleep(Duration::from_millis(500));
        }
        if init_died() || pid() != first_pid {
            wait_for("the VM to run its command again after the host fault", Duration::from_secs(420), || {
                let (ps, _) = ignite(r, &["ps"]);
                markers() > markers_before && ps.lines().any(|l| l.starts_with("web ") && l.contains("Running"))
            });
        }
        first_pid = pid();
    }
    let faults_at_first_pid = guest_fault_reports(&console).len();

    // 2. Invalid YAML: nothing changes, and `ignite ps` says which file, line and field.
    repo.commit(&[("vms/broken.yaml", Some("kind: VM\nspec: [unclosed\n"))], "broken");
    wait_for("ps to show the refused commit", Duration::from_secs(60), || {
        let (_, err) = ignite(r, &["ps"]);
        err.contains("broken.yaml") && err.contains("source gitops")
    });
    if pid() != first_pid && host_fault_since(&console, faults_at_first_pid) {
        // Not the broken commit's doing: the host fault killed the guest's init and the daemon
        // restarted the VM (its events say so); the reconciler still applied nothing.
        eprintln!(
            "NOTE {NAME}: the VM restarted after the host fault (issue 13); the guest kernel said:\n{}",
            guest_fault_reports(&console)[faults_at_first_pid..].join("\n")
        );
        assert!(!ignite(r, &["events"]).0.contains("Recreating"), "the broken commit recreated the VM:\n{}", context());
    } else {
        assert_eq!(pid(), first_pid, "the running VM was left alone:\n{}", context());
    }
    repo.commit(&[("vms/broken.yaml", None)], "fix");

    // 3. More memory and a port: the VM is recreated. Kill the daemon in the middle of it.
    repo.commit(
        &[("vms/web.yaml", Some(&manifest(&image, "160Mi", "  network:\n    ports: [\"8080:80\"]\n")))],
        "grow",
    );
    wait_for("the recreate to begin", Duration::from_secs(60), || ignite(r, &["events"]).0.contains("Recreating"));
    let _ = daemon.0.kill(); // SIGKILL: no clean-up of its own
    let _ = daemon.0.wait();
    drop(daemon);
    let daemon = start_daemon(r, &repo, &kernel);
    wait_for("the recreated VM to boot", Duration::from_secs(420), || {
        pid() != first_pid && read(&console).contains("IGNITE-E2E-UP web from-the-manifest")
    });
    let config: serde_json::Value = serde_json::from_str(&read(&r.join("vms/web/config.json"))).unwrap();
    assert_eq!(config["memoryMib"], 160, "{config}");
    let mut answer = String::new();
    wait_for("the guest's web server through the host port", Duration::from_secs(120), || {
        answer = http_get(8080).unwrap_or_default();
        answer.contains("hello from an ignite microVM")
    });
    assert!(answer.starts_with("HTTP/1."), "{answer}");

    // 4. Delete the file: the VM, its tap and its forward go away.
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
        !r.join("vms/web").exists() && !r.join("runtime/web").exists() && taps().is_empty()
    });
    assert!(http_get(8080).is_err(), "the forward is gone");
    assert_eq!(ignite(r, &["ps", "-a", "-q"]).0, "", "nothing left in the fleet");
    drop(daemon);
}
