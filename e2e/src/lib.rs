//! Helpers for ignite's end-to-end tests: locating the `ignite` binary and the guest kernel, and
//! building guest initramfs images. The tests themselves live in `tests/`.

pub mod bench;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Why real-KVM tests cannot run here (`/dev/kvm` cannot be opened), or `None`.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => None,
        Err(err) => Some(format!("/dev/kvm cannot be opened ({err})")),
    }
}

/// A binary of this build: `$env` if set, else `name` next to the test executable (tests run from
/// `target/<profile>/deps/`, programs from `target/<profile>/`: both are searched).
fn build_binary(name: &str, env: &str) -> PathBuf {
    if let Some(bin) = std::env::var_os(env) {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let candidates: Vec<PathBuf> = exe.ancestors().skip(1).take(2).map(|dir| dir.join(name)).collect();
    let found = candidates.iter().find(|bin| bin.exists()).cloned();
    found
        .unwrap_or_else(|| panic!("{candidates:?} missing: run `cargo build --workspace` first (scripts/test.sh does)"))
}

/// The `ignite` binary of this build (`$IGNITE_BIN` overrides).
pub fn ignite_bin() -> PathBuf {
    build_binary("ignite", "IGNITE_BIN")
}

/// The static guest init of this build (`$IGNITE_INIT_BIN` overrides).
pub fn ignite_init_bin() -> PathBuf {
    build_binary("ignite-init", "IGNITE_INIT_BIN")
}

/// Fills `root` with a minimal busybox userland: the host's static `/bin/busybox` (package
/// `busybox-static`) with `applets` linked to it in `/bin`, plus `/etc/passwd` and `/etc/group` for root.
pub fn busybox_root(root: &Path, applets: &[&str]) {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).expect("create bin");
    std::fs::create_dir_all(root.join("etc")).expect("create etc");
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("copy /bin/busybox (install busybox-static)");
    for applet in applets {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("link a busybox applet");
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("write passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\n").expect("write group");
}

/// The cached guest kernel: `$IGNITE_GUEST_KERNEL`, else what `e2e/guest-kernel.sh` prints (building it
/// the first time, several minutes).
pub fn guest_kernel() -> PathBuf {
    cached_kernel("IGNITE_GUEST_KERNEL", "guest-kernel.sh")
}

/// The cached "workloads" guest kernel (`e2e/guest-kernel-workloads.config`: what ordinary images and
/// container runtimes need): `$IGNITE_WORKLOADS_KERNEL`, else what `e2e/guest-kernel-workloads.sh`
/// prints (building it the first time).
pub fn workloads_kernel() -> PathBuf {
    cached_kernel("IGNITE_WORKLOADS_KERNEL", "guest-kernel-workloads.sh")
}

/// `$env` when set, else the vmlinux path `e2e/<script>` prints (building the kernel the first time).
fn cached_kernel(env: &str, script: &str) -> PathBuf {
    if let Some(kernel) = std::env::var_os(env) {
        return kernel.into();
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let out = Command::new("bash").arg(&path).output().unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(out.status.success(), "{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
}

/// `ignite vmm run` booting the cached guest kernel with ignite-init as PID 1: `rootfs` as `/dev/vda`
/// (read-write), the config drive `drive` as `/dev/vdb` (read-only), the console into `console`.
pub fn ignite_init_vm(rootfs: &Path, drive: &Path, console: &Path) -> Command {
    let mut cmd = Command::new(ignite_bin());
    cmd.args(["vmm", "run", "--memory", "128", "--kernel"])
        .arg(guest_kernel())
        .arg("--disk")
        .arg(rootfs)
        .arg("--disk")
        .arg(format!("{},ro", drive.display()))
        .arg("--cmdline")
        .arg(guest_api::boot::KERNEL_ARGS)
        .arg("--console")
        .arg(console);
    cmd
}

/// The tiny static `/init` of `guests/init.S`, assembled into `dir`: prints `IGNITE-INIT-MARKER`, then
/// the first 16 bytes of `/dev/vda`, then reboots.
pub fn tiny_init(dir: &Path) -> PathBuf {
    let obj = dir.join("init.o");
    let elf = dir.join("init");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/init.S");
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(src));
    run(Command::new("ld").args(["-m", "elf_x86_64", "-static", "-o"]).arg(&elf).arg(&obj));
    elf
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils)"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

pub use image_store::initramfs::Initramfs;

/// An initramfs in `dir` whose `/init` is [`tiny_init`], with `/dev/console` so init has its stdio.
pub fn tiny_initramfs(dir: &Path) -> PathBuf {
    let init = std::fs::read(tiny_init(dir)).expect("read init");
    let image = dir.join("initramfs.cpio");
    Initramfs::new()
        .dir("dev")
        .char_dev("dev/console", 5, 1)
        .file("init", 0o755, &init)
        .write(&image)
        .expect("write initramfs");
    image
}

/// Assembles the tiny PVH guest (`guests/pvh-tiny.S`) into `dir/<name>.elf`: it prints `X` on
/// COM1, then powers off through port 0xf4, or with `halt` idles forever.
pub fn assemble_pvh(dir: &Path, name: &str, halt: bool) -> PathBuf {
    let guests = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests");
    let obj = dir.join(format!("{name}.o"));
    let elf = dir.join(format!("{name}.elf"));
    let mut as_cmd = Command::new("as");
    as_cmd.arg("--64").arg("-o").arg(&obj).arg(guests.join("pvh-tiny.S"));
    if halt {
        as_cmd.args(["--defsym", "HALT=1"]);
    }
    run_checked(&mut as_cmd);
    run_checked(
        Command::new("ld")
            .args(["-m", "elf_x86_64", "-T"])
            .arg(guests.join("pvh-tiny.ld"))
            .arg("-o")
            .arg(&elf)
            .arg(&obj),
    );
    elf
}

/// Assembles the counting guest of the controller's tests (`controller/tests/guests/serial_counter.S`)
/// into `dir/counter.elf`: it counts in a register and in memory and prints `COUNT <hex>` on COM1
/// a few times a second, forever.
pub fn counter_guest(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../controller/tests/guests/serial_counter.S");
    let (obj, elf) = (dir.join("counter.o"), dir.join("counter.elf"));
    run_checked(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(src));
    // -N: one RWX segment starting exactly at 1 MiB.
    run_checked(
        Command::new("ld")
            .args(["-m", "elf_x86_64", "-N", "-Ttext=0x100000", "-e", "_start", "-o"])
            .arg(&elf)
            .arg(&obj),
    );
    elf
}

/// The counts [`counter_guest`] printed on `console`, in order.
pub fn counter_counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix("COUNT "))
        .filter_map(|n| u64::from_str_radix(n.trim(), 16).ok())
        .collect()
}

/// An initramfs in `dir` whose `/init` (busybox sh) counts once a second on the console
/// (`LINUX-COUNT N`) and writes each count to the start of `/dev/vda`.
pub fn counting_initramfs(dir: &Path) -> PathBuf {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static, scripts/install-deps.sh)");
    let init = "#!/bin/sh\n\
        /bin/busybox mount -t devtmpfs dev /dev\n\
        i=0\n\
        while true; do\n\
          i=$((i+1))\n\
          echo \"$i\" | /bin/busybox dd of=/dev/vda conv=fsync 2>/dev/null\n\
          echo \"LINUX-COUNT $i\"\n\
          /bin/busybox sleep 1\n\
        done\n";
    let image = dir.join("counter.cpio");
    Initramfs::new()
        .dir("dev")
        .char_dev("dev/console", 5, 1)
        .dir("bin")
        .file("bin/busybox", 0o755, &busybox)
        .symlink("bin/sh", "busybox")
        .file("init", 0o755, init.as_bytes())
        .write(&image)
        .expect("write initramfs");
    image
}

/// The counts [`counting_initramfs`]'s guest printed on `console`, in order.
pub fn linux_counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("LINUX-COUNT "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn run_checked(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The fork/exec probe of `guests/fsbase-probe.c`, built into `dir` as an initramfs: its static build
/// is `/init`, beside `/probe-static`, `/probe-dynamic` (with the host's glibc loader and libc) and a
/// busybox `/bin/sh`. Configured by `PROBE_*` variables on the kernel command line (see the source).
pub fn fsbase_probe_initramfs(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("guests/fsbase-probe.c");
    let build = |name: &str, static_: bool| {
        let out = dir.join(name);
        let mut gcc = Command::new("gcc");
        gcc.args(["-O2", "-Wall", "-Werror", "-pthread"]);
        if static_ {
            gcc.arg("-static");
        }
        run(gcc.arg("-o").arg(&out).arg(&src));
        std::fs::read(out).expect("read the probe")
    };
    let (fixed, dynamic) = (build("probe-static", true), build("probe-dynamic", false));
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (install busybox-static)");
    let image = dir.join("probe.cpio");
    let mut initramfs = Initramfs::new();
    initramfs
        .dir("dev")
        .char_dev("dev/console", 5, 1)
        .dir("bin")
        .file("init", 0o755, &fixed)
        .file("probe-static", 0o755, &fixed)
        .file("probe-dynamic", 0o755, &dynamic)
        .file("bin/busybox", 0o755, &busybox)
        .symlink("bin/sh", "busybox")
        .symlink("bin/echo", "busybox");
    add_host_files(&mut initramfs, shared_libraries(&dir.join("probe-dynamic")));
    initramfs.write(&image).expect("write the probe initramfs");
    image
}

/// The shared libraries the host's dynamic loader would map for `program`, the ELF interpreter
/// included, as `ldd` lists them (the vDSO, which has no file, left out): what a guest of the same
/// architecture needs beside the program to run it. Empty for a static program.
pub fn shared_libraries(program: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(program).output().unwrap_or_else(|e| panic!("cannot run ldd: {e} (libc-bin)"));
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // ldd fails for a static program, saying so.
        let static_ = text.contains("not a dynamic executable") || text.contains("statically linked");
        assert!(static_, "ldd {}: {text}{}", program.display(), String::from_utf8_lossy(&out.stderr));
        return Vec::new();
    }
    let mut libraries = Vec::new();
    for line in text.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2 (0x...)`
        // or `linux-vdso.so.1 (0x...)`.
        let file = line.split_once("=>").map_or(line, |(_, file)| file).split_whitespace().next().unwrap_or("");
        assert!(!line.contains("not found"), "{}: a library is missing: {line}", program.display());
        if file.starts_with('/') {
            libraries.push(PathBuf::from(file));
        }
    }
    libraries
}

/// Adds the host files `paths` (absolute) to `initramfs` at their own paths with their permission
/// bits, each once whatever the repeats, after the directories above them (the kernel's unpacker
/// creates no missing parents). Symlinks are followed: the archive holds the file under the name
/// the loader asks for.
pub fn add_host_files(initramfs: &mut Initramfs, paths: impl IntoIterator<Item = PathBuf>) {
    use std::os::unix::fs::PermissionsExt;
    let files: std::collections::BTreeSet<PathBuf> = paths.into_iter().collect();
    let dirs: std::collections::BTreeSet<&Path> =
        files.iter().flat_map(|file| file.ancestors().skip(1)).filter(|dir| dir != &Path::new("/")).collect();
    let name = |path: &Path| path.strip_prefix("/").unwrap_or(path).to_str().expect("a UTF-8 path").to_string();
    // In order, so each directory comes after its parent.
    for dir in dirs {
        initramfs.dir(&name(dir));
    }
    for file in &files {
        let content = std::fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        let mode = std::fs::metadata(file).expect("the file was just read").permissions().mode();
        initramfs.file(&name(file), mode & 0o7777, &content);
    }
}

/// A test's daemon process, killed and reaped when dropped.
pub struct Daemon(pub Child);

impl Daemon {
    /// Starts the real `ignite daemon ARGS` on `root` with `kernel` and the built ignite-init, logging
    /// (appending) to `root/daemon.log`, and waits until its socket exists (panics with the log after
    /// 30 s). Its VMs boot cold (`--no-warm-start`): a test about something else does not build
    /// templates beside its guests; [`Daemon::start_warm`] keeps the default.
    pub fn start(root: &Path, kernel: &Path, args: &[&str]) -> Daemon {
        Daemon::start_warm(root, kernel, &[&["--no-warm-start"], args].concat())
    }

    /// [`Daemon::start`] with warm start on, as a daemon is by default.
    pub fn start_warm(root: &Path, kernel: &Path, args: &[&str]) -> Daemon {
        let log_path = root.join("daemon.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        let child = Command::new(ignite_bin())
            .arg("--root")
            .arg(root)
            .arg("--socket")
            .arg(root.join("ignite.sock"))
            .args(["--log", "info", "daemon"])
            .args(args)
            .arg("--kernel")
            .arg(kernel)
            .arg("--init")
            .arg(ignite_init_bin())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let daemon = Daemon(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !root.join("ignite.sock").exists() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            assert!(std::time::Instant::now() < deadline, "the daemon did not listen:\n{log}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        daemon
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Why a Linux fleet test cannot run here (no `/dev/kvm`, busybox-static or docker-registry), or
/// `None`.
pub fn linux_fleet_unavailable() -> Option<String> {
    use image_store::testing::fixtures;
    kvm_unavailable()
        .or_else(|| {
            fixtures::busybox_image(&["/bin/sh"])
                .is_none()
                .then(|| format!("{} (busybox-static) is not installed", fixtures::BUSYBOX))
        })
        .or_else(|| {
            (!Path::new("/usr/bin/docker-registry").exists())
                .then(|| "docker-registry is not installed (scripts/install-deps.sh installs it)".to_string())
        })
}

/// The guest kernel's reports, on `console`, of a process killed by a memory fault (a segfault, a
/// general protection fault) and of init's death. On hosts whose KVM is software (kvm_pvm) the host's
/// hypervisor now and then serves a guest process stale or zeroed memory (issue 13): these lines are
/// how that shows.
pub fn guest_fault_reports(console: &str) -> Vec<String> {
    let fault = |l: &&str| [": segfault at ", "traps: ", "Attempted to kill init"].iter().any(|w| l.contains(w));
    console.lines().filter(fault).map(str::to_string).collect()
}

/// Every guest fault report in the logs under `dir` (files whose name holds `.log`, a few levels deep).
fn fault_reports_under(dir: &Path, depth: u32) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() && depth > 0 {
            found.extend(fault_reports_under(&path, depth - 1));
        } else if entry.file_name().to_string_lossy().contains(".log") {
            let text = std::fs::read(&path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            found.extend(guest_fault_reports(&text).into_iter().map(|l| format!("{}: {l}", path.display())));
        }
    }
    found
}

/// Runs `checks`, the part of test `name` whose Linux guests run processes, with their consoles
/// under `dir`. A failure on a host whose KVM is software, while a guest console under `dir` holds
/// [`guest_fault_reports`], is issue 13's host fault, not ignite's: the test then says SKIP, quoting
/// the guest kernel, and passes. On hardware KVM, or without such a report, the failure stands.
pub fn unless_the_host_faults(name: &str, dir: &Path, checks: impl FnOnce()) {
    let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(checks)) else { return };
    let emulated = vmm_core::VirtMode::detect() == vmm_core::VirtMode::Emulated;
    let reports = fault_reports_under(dir, 4);
    if !emulated || reports.is_empty() {
        std::panic::resume_unwind(panic);
    }
    eprintln!(
        "SKIP {name}: it failed (above) after guest processes faulted on this software KVM (issue 13, the host's \
         hypervisor serving guest processes stale memory); the guest kernel said:\n{}",
        reports.join("\n")
    );
}

/// Runs a Linux-guest test `name` in its own network namespace `ns`: says SKIP and why when the host
/// cannot (see [`linux_fleet_unavailable`]), builds the guest kernel outside the namespace's time
/// budget, re-runs the test inside `ns`, where `test` gets a fresh root, the kernel and a busybox
/// image in a real registry, its checks judged by [`unless_the_host_faults`].
pub fn linux_test_in_netns(name: &str, ns: &str, test: impl FnOnce(&Path, &Path, &str)) {
    if let Some(why) = linux_fleet_unavailable() {
        eprintln!("SKIP {name}: {why}");
        return;
    }
    let kernel = guest_kernel();
    if !controller::testing::netns::run_inside(ns, name) {
        return;
    }
    let Some((_registry, image)) = busybox_registry(name) else { return };
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    unless_the_host_faults(name, r, || test(r, &kernel, &image));
}

/// What a Linux fleet test needs before anything runs: `/dev/kvm`, busybox-static and
/// docker-registry. Returns a real registry on 127.0.0.1 serving a busybox image (keep the registry
/// alive) and that image's reference; or `None` after printing why test `name` skips.
pub fn busybox_registry(name: &str) -> Option<(image_store::testing::registry::Registry, String)> {
    use image_store::testing::{fixtures, registry::Registry};
    if let Some(why) = linux_fleet_unavailable() {
        eprintln!("SKIP {name}: {why}");
        return None;
    }
    let image = fixtures::busybox_image(&["/bin/sh"])?;
    let registry = Registry::start(None).expect("start docker-registry on 127.0.0.1");
    fixtures::push_image(&registry.host(), "demo/busybox", "1", &image, None);
    let reference = format!("{}/demo/busybox:1", registry.host());
    Some((registry, reference))
}

/// Kills the VM processes under a root when dropped, so a failing test leaves no VM running (they
/// outlive their daemon by design).
pub struct KillVmsOnDrop<'a>(pub &'a Path);

impl Drop for KillVmsOnDrop<'_> {
    fn drop(&mut self) {
        for dir in std::fs::read_dir(self.0.join("vms")).into_iter().flatten().flatten() {
            let pid = std::fs::read_to_string(dir.path().join("pid")).unwrap_or_default();
            if let Some(pid) = pid.split_whitespace().next() {
                let _ = Command::new("kill").args(["-9", pid]).stderr(Stdio::null()).status();
            }
        }
    }
}

/// The `ignite` CLI against a test's daemon on `<root>/ignite.sock` (never starting one of its own).
pub fn ignite_cmd(root: &Path) -> Command {
    let mut cmd = Command::new(ignite_bin());
    cmd.arg("--root").arg(root).arg("--socket").arg(root.join("ignite.sock")).env("IGNITE_AUTOSTART", "0");
    cmd
}

/// `ignite ARGS` against a test's daemon on `root` (see [`ignite_cmd`]), stdin closed: whether it
/// succeeded, its stdout and its stderr.
pub fn ignite_output(root: &Path, args: &[&str]) -> (bool, String, String) {
    let out = ignite_cmd(root).args(args).stdin(Stdio::null()).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// Polls `cond` every 250 ms until it holds; panics after `timeout` naming `what` and showing
/// `context()`.
pub fn wait_for(
    what: &str,
    timeout: std::time::Duration,
    context: &dyn Fn() -> String,
    mut cond: impl FnMut() -> bool,
) {
    let deadline = std::time::Instant::now() + timeout;
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}:\n{}", context());
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// `GET /index.html` from 127.0.0.1:`port` (HTTP/1.0): the whole answer, headers included.
pub fn http_get(port: u16) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Reads `output` line by line on a thread and sends each line with the time since `start` at which
/// it arrived; the channel closes at end of file.
pub fn timed_lines(
    output: impl std::io::Read + Send + 'static,
    start: std::time::Instant,
) -> std::sync::mpsc::Receiver<(String, std::time::Duration)> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(output).lines().map_while(Result::ok) {
            if tx.send((line, start.elapsed())).is_err() {
                break;
            }
        }
    });
    rx
}
