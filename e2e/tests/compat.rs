//! The compatibility suite: real Debian images run unmodified. Each image is built from Debian packages by
//! `scripts/compat-images.sh` (debootstrap minbase + the case's packages, packed by umoci, cached under
//! /var/cache/ignite/compat by content), pushed to a real registry, and run through the real CLI and daemon
//! (`ignite run -d -p HOST:GUEST IMAGE`) inside a network namespace this test creates. Each case waits for
//! its own sign of life through the way a user would look:
//!
//! | case            | image packages      | ready when                                                        |
//! |-----------------|---------------------|-------------------------------------------------------------------|
//! | nginx           | nginx-light         | Debian's default site answers HTTP through the port forward       |
//! | python          | python3             | `python3 -m http.server` answers HTTP through the port forward     |
//! | redis           | redis-server        | `PING` gets `+PONG` through the port forward                      |
//! | postgres        | postgresql-15       | cluster made at build time; `ignite exec VM -- psql -c 'select 1'` |
//! | postgres-initdb | postgresql-15       | `initdb` in the guest, start, then the same `psql`                |
//! | ssh             | openssh-server      | `ssh -tt` with the key given by `--ssh` gets a pty (/dev/pts/N)   |
//! | runc            | runc, busybox-static| runc runs a busybox bundle that prints a marker on the console    |
//! | containerd      | containerd, runc    | `ctr run` of an imported busybox image prints a marker            |
//!
//! `IGNITE_COMPAT` selects the cases: a comma-separated list, or `all` (default `nginx`, what CI runs:
//! on hosts whose KVM is software, runc's container init meets issue 13's fault in about one run in
//! three, reading zeros in its config).
//! `IGNITE_COMPAT_JOBS` VMs boot side by side (default 3). A table prints each case: pass or fail, the time
//! from `ignite run` to ready, and what was seen. Unselected cases are listed as skipped, with why.
//!
//! The whole suite: `IGNITE_COMPAT=all cargo test -p ignite-e2e --test compat -- --nocapture`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use controller::testing::netns::{self, Netns};
use ignite_e2e::{ignite_cmd, kvm_unavailable, workloads_kernel, Daemon, KillVmsOnDrop};
use image_store::testing::registry::Registry;

const NAME: &str = "real_debian_images_run_unmodified";
const NETNS: &str = "ignite-e2e-compat";
/// The cases CI runs when `IGNITE_COMPAT` is not set.
const DEFAULT_CASES: &str = "nginx";
/// Set (to `case=layout-dir,...`) in the re-executed test inside the network namespace.
const INSIDE: &str = "IGNITE_COMPAT_INSIDE";

/// How a case shows it is up.
#[derive(Clone, Copy)]
enum Ready {
    /// An HTTP GET of `/` through the forward of this guest port answers 200 with this text in it.
    Http(u16, &'static str),
    /// `PING` through the forward of this guest port answers `+PONG`.
    RedisPing(u16),
    /// The console shows this line, then `ignite exec VM -- ARGS` prints the expected output.
    Exec(&'static str, &'static [&'static str], &'static str),
    /// `ssh -tt root@` through the forward of this guest port, with the `--ssh` key, runs on a pty.
    Ssh(u16),
    /// The console shows this text.
    Console(&'static str),
}

struct Case {
    name: &'static str,
    /// The image built by scripts/compat-images.sh.
    image: &'static str,
    /// The command replacing the image's (`ignite run IMG -- ...`), if any.
    command: &'static [&'static str],
    memory: &'static str,
    ready: Ready,
    /// From `ignite run` to ready, booting alongside `IGNITE_COMPAT_JOBS - 1` other guests.
    timeout: Duration,
}

const MIN: Duration = Duration::from_secs(60);
/// How often the running cases are probed (the resolution of the times to ready).
const POLL: Duration = Duration::from_secs(3);

const CASES: &[Case] = &[
    Case {
        name: "nginx",
        image: "nginx",
        command: &[],
        memory: "256Mi",
        ready: Ready::Http(80, "Welcome to nginx!"),
        timeout: MIN.saturating_mul(15),
    },
    Case {
        name: "runc",
        image: "runc",
        command: &[],
        memory: "256Mi",
        ready: Ready::Console("COMPAT-RUNC-OK uid=0 hostname=in-runc"),
        timeout: MIN.saturating_mul(15),
    },
    Case {
        name: "python",
        image: "python",
        command: &[],
        memory: "256Mi",
        ready: Ready::Http(8000, "COMPAT-PYTHON-OK"),
        timeout: MIN.saturating_mul(15),
    },
    Case {
        name: "redis",
        image: "redis",
        command: &[],
        memory: "256Mi",
        ready: Ready::RedisPing(6379),
        timeout: MIN.saturating_mul(15),
    },
    Case {
        name: "ssh",
        image: "ssh",
        command: &[],
        memory: "256Mi",
        ready: Ready::Ssh(22),
        timeout: MIN.saturating_mul(15),
    },
    Case {
        name: "postgres",
        image: "postgres",
        command: &["/usr/local/bin/compat-postgres", "prebuilt"],
        memory: "512Mi",
        ready: Ready::Exec(
            "database system is ready to accept connections",
            &["psql", "-U", "postgres", "-h", "/run/postgresql", "-Atc", "select 1"],
            "1",
        ),
        timeout: MIN.saturating_mul(15),
    },
    Case {
        name: "postgres-initdb",
        image: "postgres",
        command: &[],
        memory: "512Mi",
        ready: Ready::Exec(
            "database system is ready to accept connections",
            &["psql", "-U", "postgres", "-h", "/run/postgresql", "-Atc", "select 1"],
            "1",
        ),
        timeout: MIN.saturating_mul(30),
    },
    Case {
        name: "containerd",
        image: "containerd",
        command: &[],
        memory: "512Mi",
        ready: Ready::Console("COMPAT-CTR-OK uid=0"),
        timeout: MIN.saturating_mul(30),
    },
];

/// The selected cases (`IGNITE_COMPAT`), in the suite's order.
fn selected() -> Vec<&'static Case> {
    let wanted = std::env::var("IGNITE_COMPAT").unwrap_or_else(|_| DEFAULT_CASES.to_string());
    if wanted.trim() == "all" {
        return CASES.iter().collect();
    }
    let names: Vec<&str> = wanted.split(',').map(str::trim).filter(|n| !n.is_empty()).collect();
    for n in &names {
        let known: Vec<&str> = CASES.iter().map(|c| c.name).collect();
        assert!(known.contains(n), "IGNITE_COMPAT: unknown case {n:?} (cases: {}, or all)", known.join(", "));
    }
    CASES.iter().filter(|c| names.contains(&c.name)).collect()
}

/// Builds (or finds in the cache) the images of `cases`: `image name -> OCI layout directory`.
fn build_images(cases: &[&Case]) -> Vec<(String, PathBuf)> {
    let mut images: Vec<&str> = cases.iter().map(|c| c.image).collect();
    images.dedup();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/compat-images.sh");
    let started = Instant::now();
    let out = Command::new("bash").arg(&script).args(&images).stderr(Stdio::inherit()).output().unwrap();
    assert!(out.status.success(), "{} {} failed", script.display(), images.join(" "));
    eprintln!("compat: images {} ready in {:.0?}", images.join(", "), started.elapsed());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(name, dir)| (name.to_string(), PathBuf::from(dir)))
        .collect()
}

/// What tools the suite needs on this machine that are missing, if any.
fn missing_tools() -> Option<String> {
    let tools =
        ["/usr/sbin/debootstrap", "/usr/bin/umoci", "/usr/bin/skopeo", "/usr/bin/docker-registry", "/usr/bin/ssh"];
    let missing: Vec<&str> = tools.into_iter().filter(|t| !Path::new(t).exists()).collect();
    (!missing.is_empty())
        .then(|| format!("{} not installed (scripts/install-deps.sh installs them)", missing.join(", ")))
}

#[test]
fn real_debian_images_run_unmodified() {
    if let Ok(images) = std::env::var(INSIDE) {
        let images = images.split(',').filter_map(|p| p.split_once('=')).map(|(n, d)| (n.to_string(), d.into()));
        return run_suite(&images.collect::<Vec<_>>());
    }
    let cases = selected();
    for c in CASES.iter().filter(|c| !cases.iter().any(|s| s.name == c.name)) {
        eprintln!("compat: {} not selected (IGNITE_COMPAT={}; IGNITE_COMPAT=all runs every case)", c.name, selection());
    }
    if cases.is_empty() {
        eprintln!("SKIP {NAME}: IGNITE_COMPAT selects no case");
        return;
    }
    if let Some(why) = kvm_unavailable().or_else(missing_tools).or_else(netns::unavailable) {
        eprintln!("SKIP {NAME}: {why}");
        return;
    }
    // Built outside the namespace, which has no route to Debian's mirror.
    let images = build_images(&cases);
    let kernel = workloads_kernel();
    let netns = Netns::create(NETNS);
    let list: Vec<String> = images.iter().map(|(n, d)| format!("{n}={}", d.display())).collect();
    let out = Command::new("ip")
        .args(["netns", "exec", &netns.0])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads", "1"])
        .env(INSIDE, list.join(","))
        .env("IGNITE_WORKLOADS_KERNEL", &kernel)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("1 passed"), "the suite inside {NETNS} failed:\n{stdout}");
}

fn selection() -> String {
    std::env::var("IGNITE_COMPAT").unwrap_or_else(|_| format!("{DEFAULT_CASES} (default)"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Where a case stands.
enum State {
    Waiting,
    Running { vm: String, started: Instant, host_port: Option<u16> },
    Done { ready: Option<Duration>, note: String },
}

/// Runs the selected cases inside the namespace; `images` are the OCI layouts by image name.
fn run_suite(images: &[(String, PathBuf)]) {
    let cases = selected();
    let jobs: usize = std::env::var("IGNITE_COMPAT_JOBS").ok().and_then(|j| j.parse().ok()).unwrap_or(3).max(1);
    let registry = Registry::start(None).unwrap();
    for (name, dir) in images {
        let started = Instant::now();
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:latest", dir.display()))
            .arg(format!("docker://{}/compat/{name}:latest", registry.host()))
            .output()
            .unwrap();
        assert!(out.status.success(), "skopeo copy {name}: {}", text(&out.stderr));
        eprintln!("compat: pushed {name} in {:.1?}", started.elapsed());
    }
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let _vms = KillVmsOnDrop(r);
    let _daemon = Daemon::start(r, &workloads_kernel(), &["--bridge", "ignbr-compat", "--subnet", "10.98.0.0/24"]);
    let key = r.join("id_ed25519");
    let ok = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", ""]).arg("-f").arg(&key).status().unwrap();
    assert!(ok.success(), "ssh-keygen");

    let suite_started = Instant::now();
    let mut states: Vec<State> = cases.iter().map(|_| State::Waiting).collect();
    loop {
        let running = states.iter().filter(|s| matches!(s, State::Running { .. })).count();
        if let Some(i) = states.iter().position(|s| matches!(s, State::Waiting)).filter(|_| running < jobs) {
            states[i] = start(r, &registry.host(), cases[i], 18080 + i as u16, &key);
            continue;
        }
        if states.iter().all(|s| matches!(s, State::Done { .. })) {
            break;
        }
        for (case, state) in cases.iter().zip(states.iter_mut()) {
            if let State::Running { vm, started, host_port } = state {
                if let Some(done) = check(r, case, vm, *started, *host_port, &key) {
                    eprintln!("compat: {} {}", case.name, describe(&done));
                    let out = ignite_cmd(r).args(["rm", "--force", vm.as_str()]).output().unwrap();
                    if !out.status.success() {
                        eprintln!("compat: ignite rm {vm}: {}", text(&out.stderr));
                    }
                    *state = done;
                }
            }
        }
        // Each probe runs the ignite CLI or connects through a forward: every few seconds is enough.
        std::thread::sleep(POLL);
    }

    let mut table = format!(
        "\ncompat: {} case(s), {jobs} at a time, kernel {}, suite {:.0?}\n{:<16} {:<6} {:>14}  {}\n",
        cases.len(),
        workloads_kernel().display(),
        suite_started.elapsed(),
        "IMAGE",
        "RESULT",
        "TIME TO READY",
        "NOTE"
    );
    for c in CASES.iter().filter(|c| !cases.iter().any(|s| s.name == c.name)) {
        table.push_str(&format!(
            "{:<16} {:<6} {:>14}  not selected (IGNITE_COMPAT={})\n",
            c.name,
            "skip",
            "-",
            selection()
        ));
    }
    let mut failed = Vec::new();
    for (case, state) in cases.iter().zip(&states) {
        let State::Done { ready, note } = state else { unreachable!() };
        let (result, time) = match ready {
            Some(t) => ("pass", format!("{:.1} s", t.as_secs_f64())),
            None => {
                failed.push(case.name);
                ("FAIL", "-".to_string())
            }
        };
        let first = note.lines().next().unwrap_or_default();
        table.push_str(&format!("{:<16} {:<6} {:>14}  {first}\n", case.name, result, time));
    }
    eprintln!("{table}");
    for (case, state) in cases.iter().zip(&states) {
        if let State::Done { ready: None, note } = state {
            eprintln!("compat: {} failed:\n{note}\n", case.name);
        }
    }
    assert!(failed.is_empty(), "compat cases failed: {failed:?}{table}");
}

fn describe(done: &State) -> String {
    match done {
        State::Done { ready: Some(t), note } => format!("ready after {t:.1?}: {}", note.lines().next().unwrap_or("")),
        State::Done { ready: None, note } => format!("FAILED: {}", note.lines().next().unwrap_or("")),
        _ => String::new(),
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// The VM's whole console so far (the rotated part first).
fn console(root: &Path, vm: &str) -> String {
    let dir = root.join("vms").join(vm);
    read(&dir.join("console.log.1")) + &read(&dir.join("console.log"))
}

/// `ignite run -d` for a case; `host_port` is forwarded to the case's guest port, if it has one.
fn start(root: &Path, registry: &str, case: &Case, host_port: u16, key: &Path) -> State {
    let vm = format!("compat-{}", case.name);
    let guest_port = match case.ready {
        Ready::Http(p, _) | Ready::RedisPing(p) | Ready::Ssh(p) => Some(p),
        Ready::Exec(..) | Ready::Console(_) => None,
    };
    let mut cmd = ignite_cmd(root);
    cmd.args(["run", "-d", "--name", &vm, "--memory", case.memory, "--size", "1Gi"]);
    if let Some(p) = guest_port {
        cmd.args(["-p", &format!("{host_port}:{p}")]);
    }
    if matches!(case.ready, Ready::Ssh(_)) {
        cmd.arg("--ssh").arg(key.with_extension("pub"));
    }
    cmd.arg(format!("{registry}/compat/{}:latest", case.image));
    if !case.command.is_empty() {
        cmd.arg("--").args(case.command);
    }
    let started = Instant::now();
    let out = cmd.output().unwrap();
    if !out.status.success() {
        let note = format!("ignite run -d failed: {}", text(&out.stderr));
        eprintln!("compat: {} {note}", case.name);
        return State::Done { ready: None, note };
    }
    eprintln!("compat: {} started as {vm} ({})", case.name, text(&out.stdout).trim());
    State::Running { vm, started, host_port: guest_port.map(|_| host_port) }
}

/// `Some(Done)` once the case is ready, has failed or has timed out.
fn check(root: &Path, case: &Case, vm: &str, started: Instant, host_port: Option<u16>, key: &Path) -> Option<State> {
    let elapsed = started.elapsed();
    let forward = host_port.map(|p| format!("through 127.0.0.1:{p}"));
    let seen = match case.ready {
        Ready::Http(_, want) => {
            let answer = http_get(host_port.unwrap()).unwrap_or_default();
            (answer.starts_with("HTTP/1") && answer.contains(" 200 ") && answer.contains(want))
                .then(|| format!("HTTP 200 with {want:?} {}", forward.unwrap()))
        }
        Ready::RedisPing(_) => {
            let answer = redis_ping(host_port.unwrap()).unwrap_or_default();
            answer.starts_with("+PONG").then(|| format!("PING -> +PONG {}", forward.unwrap()))
        }
        Ready::Exec(line, args, want) => {
            if console(root, vm).contains(line) {
                let out = ignite_cmd(root).args(["exec", vm, "--"]).args(args).output().unwrap();
                (out.status.success() && text(&out.stdout).trim() == want)
                    .then(|| format!("ignite exec -- {} printed {want:?}", args.join(" ")))
            } else {
                None
            }
        }
        Ready::Ssh(_) => ssh_tty(host_port.unwrap(), key).map(|tty| format!("ssh -tt root@ with the --ssh key: {tty}")),
        Ready::Console(marker) => console(root, vm).contains(marker).then(|| format!("console: {marker}")),
    };
    if let Some(note) = seen {
        return Some(State::Done { ready: Some(elapsed), note });
    }
    // `ignite inspect` only once the VM's process is gone or time is up: each CLI run costs the host.
    let timeout = case.timeout.mul_f64(timeout_factor());
    if vm_process_alive(root, vm) && elapsed <= timeout {
        return None;
    }
    let phase = inspect_phase(root, vm);
    let ended = matches!(phase.as_deref(), Some("Stopped" | "Failed"));
    if ended || elapsed > timeout {
        let why = if ended {
            format!("the VM ended ({}) before it was ready, after {elapsed:.0?}", phase.unwrap())
        } else {
            format!("not ready within {timeout:.0?} (phase {})", phase.unwrap_or_default())
        };
        // The whole console is kept (the VM's own goes with it); the note shows the guest's user-space lines.
        let console = console(root, vm);
        let kept = std::env::temp_dir().join(format!("ignite-compat-{}.console.log", case.name));
        let _ = std::fs::write(&kept, &console);
        let user: Vec<&str> = console.lines().filter(|l| !l.starts_with('[')).collect();
        let tail = &user[user.len().saturating_sub(60)..];
        let note =
            format!("{why}\nconsole kept in {}; its last user-space lines:\n{}", kept.display(), tail.join("\n"));
        return Some(State::Done { ready: None, note });
    }
    None
}

/// `IGNITE_COMPAT_TIMEOUT_FACTOR` scales every case's timeout (default 1), for hosts shared with other work.
fn timeout_factor() -> f64 {
    std::env::var("IGNITE_COMPAT_TIMEOUT_FACTOR").ok().and_then(|f| f.parse().ok()).unwrap_or(1.0)
}

/// Whether the VM's process (its `pid` file) still runs, or is still to start.
fn vm_process_alive(root: &Path, vm: &str) -> bool {
    let pid = read(&root.join("vms").join(vm).join("pid"));
    match pid.split_whitespace().next() {
        Some(pid) => Path::new("/proc").join(pid).exists(),
        // No pid file: not started yet (no console either), or ended and cleaned up.
        None => !root.join("vms").join(vm).join("console.log").exists(),
    }
}

fn inspect_phase(root: &Path, vm: &str) -> Option<String> {
    let out = ignite_cmd(root).args(["inspect", vm, "-o", "json"]).output().unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    doc["status"]["phase"].as_str().map(str::to_string)
}

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    Ok(s)
}

fn http_get(port: u16) -> std::io::Result<String> {
    let mut s = connect(port)?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: compat\r\n\r\n")?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(text(&out))
}

fn redis_ping(port: u16) -> std::io::Result<String> {
    let mut s = connect(port)?;
    s.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    Ok(text(&buf[..n]))
}

/// `ssh -tt` as root with `key`: the guest's `tty` when it names a pty. sshd re-executes itself for each
/// connection: its banner takes minutes in an emulated guest, hence the long connect timeout.
fn ssh_tty(port: u16, key: &Path) -> Option<String> {
    let out = Command::new("ssh")
        .args(["-tt", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "ConnectTimeout=180", "-o", "LogLevel=ERROR", "-p", &port.to_string(), "-i"])
        .arg(key)
        .args(["root@127.0.0.1", "tty; echo COMPAT-SSH-OK"])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let stdout = text(&out.stdout);
    let tty = stdout.lines().next().unwrap_or_default().trim().to_string();
    (stdout.contains("COMPAT-SSH-OK") && tty.starts_with("/dev/pts/")).then_some(tty)
}
