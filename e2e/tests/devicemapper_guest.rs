//! The devicemapper snapshotter on a real kernel: image-store's `devicemapper_real` test program runs
//! inside a guest of our own guest kernel (which has device-mapper thin pools, the snapshot target,
//! loop devices and xfs), because the hosts of CI have no device-mapper. Its disks: `/dev/vda`, the
//! read-only base ext4 the image store builds from the busybox image pulled from a real registry, as
//! the daemon does; `/dev/vdb` and `/dev/vdc`, a thin pool's data (8 GiB) and metadata (64 MiB),
//! sparse and zeroed; `/dev/vdd`, an 8 GiB xfs with reflink made on the host, mounted on `/scratch`
//! (room for loop-backed pools, and the reflink figures of the benchmark). The guest boots twice on
//! the same disks: phase `first`, then phase `reattach`, where the pool and its volumes must be
//! found again from the metadata on the disks. Each boot must end with the program's libtest
//! saying `test result: ok.` and the init saying `DM-GUEST-EXIT 0`; the program's `BENCH ` and
//! `SKIP ` lines are forwarded to this test's output.
//!
//! The benchmark (per-VM 2 GiB disk creation and the space of ten disks: thin snapshot, sparse copy,
//! xfs reflink) is one boot of its own, phase `bench`:
//! `IGNITE_DM_BENCH=1 cargo test -p ignite-e2e --test devicemapper_guest -- --nocapture`.
//! `IGNITE_DM_LOG=image_store=debug` shows the snapshotter's steps with the guest's uptime.
//!
//! The program is built with cargo, stripped of its debug info (the guest's CPU may be emulated,
//! where every MiB of initramfs costs seconds) and put into a busybox initramfs with the host tools
//! it drives (losetup, mkfs, e2fsck...) and their shared libraries. Where KVM emulates guests, each
//! boot takes about 100 s to reach `/init`, then as long as the program's tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ignite_e2e::{
    add_host_files, busybox_registry, guest_kernel, ignite_bin, ignite_init_bin, kvm_unavailable, shared_libraries,
    unless_the_host_faults, Initramfs,
};
use image_store::{build_base_rootfs, pull_blocking, PullOptions, StorePaths};

const NAME: &str = "devicemapper_guest";
/// The integration test of package `image-store` that runs in the guest.
const TEST_TARGET: &str = "devicemapper_real";
/// The longest one boot may take, the program's tests included; a hung guest fails the test
/// instead of holding CI.
const BOOT_DEADLINE: Duration = Duration::from_secs(40 * 60);
/// Host programs the test program runs, copied into the guest with their libraries.
const HOST_PROGRAMS: [&str; 8] = ["losetup", "resize2fs", "e2fsck", "mkfs.ext4", "mkfs.xfs", "cp", "dumpe2fs", "blkid"];
/// Busybox applets in the guest's `/bin`.
const APPLETS: [&str; 14] =
    ["sh", "mount", "umount", "mkdir", "cat", "echo", "poweroff", "reboot", "sync", "dd", "sleep", "ls", "df", "du"];
const GIB: u64 = 1 << 30;
/// The guest's `/init`: says which versions of the host tools in `@TOOLS@` (losetup, mkfs.xfs) run
/// (busybox's shell runs its own applet for a bare name such as `losetup` whatever `PATH` says, so
/// they go by path; the test program's `Command`s search `PATH`), runs the test program
/// `@PROGRAM@` on the disks in the phase the kernel command line names, reports its status, and
/// ends the VM (`reboot -f` is a reset, which `ignite vmm run` takes as the guest's exit).
const INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
phase=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    ignite.dm_phase=*) phase="${arg#ignite.dm_phase=}" ;;
    ignite.rust_log=*) export RUST_LOG="${arg#ignite.rust_log=}" ;;
  esac
done
echo "DM-GUEST-PHASE $phase"
for tool in @TOOLS@; do echo "DM-GUEST-TOOL $("$tool" -V 2>&1)"; done
mkdir -p /scratch
if mount -t xfs /dev/vdd /scratch; then
  IGNITE_DM_PHASE="$phase" IGNITE_DM_BASE=/dev/vda IGNITE_DM_POOL_DATA=/dev/vdb IGNITE_DM_POOL_METADATA=/dev/vdc \
    IGNITE_DM_SCRATCH=/scratch RUST_BACKTRACE=1 /@PROGRAM@ --test-threads=1 --nocapture
  status=$?
  umount /scratch
else
  echo "DM-GUEST: cannot mount /dev/vdd (xfs) on /scratch"
  status=1
fi
echo "DM-GUEST-EXIT $status"
sync
reboot -f
"#;

#[test]
fn the_devicemapper_snapshotter_works_in_a_guest_and_finds_its_pool_again_after_a_reboot() {
    let needed = HOST_PROGRAMS.iter().chain(&["objcopy", "ldd"]);
    let missing: Vec<&str> = needed.copied().filter(|name| host_program(name).is_none()).collect();
    let why = kvm_unavailable()
        .or_else(|| (!vmm_core::jail::is_root()).then(|| "not root".to_string()))
        .or_else(|| (!missing.is_empty()).then(|| format!("host programs missing: {}", missing.join(", "))));
    if let Some(why) = why {
        eprintln!("SKIP {NAME}: {why}");
        return;
    }
    let Some((_registry, image)) = busybox_registry(NAME) else { return };
    let kernel = guest_kernel();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tools: Vec<PathBuf> = HOST_PROGRAMS.iter().filter_map(|name| host_program(name)).collect();
    let initrd = initramfs(d, &test_program(d), &tools);
    let disks = disks(d, &image);
    unless_the_host_faults(NAME, d, || {
        // IGNITE_DM_BENCH: one boot running the disk-creation benchmark instead of the tests.
        let bench = std::env::var_os("IGNITE_DM_BENCH").is_some();
        let phases: &[&str] = if bench { &["bench"] } else { &["first", "reattach"] };
        for &phase in phases {
            boot(d, &kernel, &initrd, &disks, phase);
        }
    });
}

/// Where `name` is on the host's `PATH`, as `command -v` says.
fn host_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|file| file.is_file())
}

/// Builds [`TEST_TARGET`] with cargo (`$CARGO` if set) in this workspace and returns a copy of it
/// in `dir` without debug info.
fn test_program(dir: &Path) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e lives in the workspace");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    let out = Command::new(cargo)
        .current_dir(workspace)
        .args(["test", "-p", "image-store", "--test", TEST_TARGET, "--no-run", "--message-format=json"])
        .stdin(Stdio::null())
        .output()
        .expect("run cargo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cargo could not build {TEST_TARGET}:\n{stderr}");
    let artifact = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == TEST_TARGET)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from));
    let built = artifact.unwrap_or_else(|| panic!("cargo named no executable for {TEST_TARGET}:\n{stderr}"));
    let stripped = dir.join(TEST_TARGET);
    let out = Command::new("objcopy").arg("--strip-debug").arg(&built).arg(&stripped).output().expect("run objcopy");
    assert!(out.status.success(), "objcopy {}: {}", built.display(), String::from_utf8_lossy(&out.stderr));
    let mib = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len() >> 20);
    eprintln!(
        "{TEST_TARGET}: built in {:?}, {} MiB stripped to {} MiB",
        started.elapsed(),
        mib(&built),
        mib(&stripped)
    );
    stripped
}

/// The guest's initramfs, in `dir`: busybox and its applets, [`INIT`], the test `program` as
/// `/<TEST_TARGET>`, and the host `tools` at their own paths, with every library of both.
fn initramfs(dir: &Path, program: &Path, tools: &[PathBuf]) -> PathBuf {
    let read = |path: &Path| std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let versions = tools.iter().filter(|t| t.ends_with("losetup") || t.ends_with("mkfs.xfs"));
    let versions: Vec<String> = versions.map(|t| t.display().to_string()).collect();
    let init = INIT.replace("@PROGRAM@", TEST_TARGET).replace("@TOOLS@", &versions.join(" "));
    let mut initramfs = Initramfs::new();
    for name in ["dev", "proc", "sys", "tmp", "mnt", "etc", "bin"] {
        initramfs.dir(name);
    }
    initramfs
        .char_dev("dev/console", 5, 1)
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        .file("etc/group", 0o644, b"root:x:0:\n")
        .file("bin/busybox", 0o755, &read(Path::new("/bin/busybox")))
        .file("init", 0o755, init.as_bytes())
        .file(TEST_TARGET, 0o755, &read(program));
    for applet in APPLETS {
        initramfs.symlink(&format!("bin/{applet}"), "busybox");
    }
    let libraries = tools.iter().map(PathBuf::as_path).chain([program]).flat_map(shared_libraries);
    add_host_files(&mut initramfs, tools.iter().cloned().chain(libraries));
    let image = dir.join("devicemapper.cpio");
    initramfs.write(&image).expect("write the initramfs");
    let mib = std::fs::metadata(&image).map_or(0, |m| m.len() >> 20);
    eprintln!("initramfs: {mib} MiB");
    image
}

/// The guest's disks in `dir`, as `--disk` arguments in order (vda to vdd): the base ext4 of
/// `image` (pulled and built by the image store, read-only), the pool's data and metadata, and the
/// scratch xfs.
fn disks(dir: &Path, image: &str) -> Vec<String> {
    let store = StorePaths::new(dir.join("store"));
    let record = pull_blocking(&store, image, &PullOptions { insecure: true, ..Default::default() })
        .unwrap_or_else(|e| panic!("pull {image}: {}", guest_api::error_chain(&e)));
    let base = build_base_rootfs(&store, &record, Some(&ignite_init_bin()))
        .unwrap_or_else(|e| panic!("build the base of {image}: {}", guest_api::error_chain(&e)));
    let sparse = |name: &str, len: u64| {
        let path = dir.join(name);
        std::fs::File::create(&path).and_then(|f| f.set_len(len)).expect("create a sparse disk");
        path
    };
    let (data, metadata, scratch) =
        (sparse("pool-data.img", 8 * GIB), sparse("pool-metadata.img", 64 << 20), sparse("scratch.img", 8 * GIB));
    let out = Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(&scratch).output().expect("run mkfs.xfs");
    assert!(out.status.success(), "mkfs.xfs: {}", String::from_utf8_lossy(&out.stderr));
    let arg = |path: &Path| path.display().to_string();
    vec![format!("{},ro", arg(&base)), arg(&data), arg(&metadata), arg(&scratch)]
}

/// `IGNITE_DM_LOG` handed to the guest's program as `RUST_LOG` on the kernel command line: the
/// snapshotter's log, with each step's time since boot.
fn passed_on() -> String {
    match std::env::var("IGNITE_DM_LOG") {
        Ok(value) if !value.is_empty() && !value.contains(char::is_whitespace) => format!(" ignite.rust_log={value}"),
        _ => String::new(),
    }
}

/// A VMM process, killed when dropped: a failing test leaves no VM running.
struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the guest in `phase` on `disks` until it ends (or [`BOOT_DEADLINE`]), forwarding the
/// program's progress, and judges its console.
fn boot(dir: &Path, kernel: &Path, initrd: &Path, disks: &[String], phase: &str) {
    let console = dir.join(format!("{phase}.console.log"));
    let stderr = dir.join(format!("{phase}.vmm-stderr"));
    let mut cmd = Command::new(ignite_bin());
    // --stop-timeout 0: a VMM whose starter is gone (the guard below killed it) stops at once.
    cmd.args(["vmm", "run", "--memory", "1024", "--cpus", "2", "--stop-timeout", "0", "--kernel"])
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .arg("--cmdline")
        .arg(format!("console=ttyS0 reboot=k panic=-1 rdinit=/init ignite.dm_phase={phase}{}", passed_on()))
        .arg("--console")
        .arg(&console);
    for disk in disks {
        cmd.arg("--disk").arg(disk);
    }
    let log = std::fs::File::create(&stderr).unwrap();
    let started = Instant::now();
    let mut vmm = Vmm(cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().expect("run ignite vmm run"));
    // Bytes of the console looked at: whole lines only, so a line is shown once it is complete.
    let mut shown = 0;
    let status: Option<ExitStatus> = loop {
        let bytes = std::fs::read(&console).unwrap_or_default();
        let new = bytes.get(shown..).unwrap_or_default();
        let whole = new.iter().rposition(|&b| b == b'\n').map_or(0, |end| end + 1);
        for line in String::from_utf8_lossy(&new[..whole]).lines().map(str::trim).filter(|l| progress(l)) {
            eprintln!("[{phase} {:>4}s] {line}", started.elapsed().as_secs());
        }
        shown += whole;
        if let Some(status) = vmm.0.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > BOOT_DEADLINE {
            break None;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    drop(vmm);

    let read = |path: &Path| String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
    let text = read(&console);
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let tail = lines[lines.len().saturating_sub(80)..].join("\n");
    let context = format!(
        "{phase} boot, after {:?}: vmm {status:?}, stderr:\n{}\nconsole tail:\n{tail}",
        started.elapsed(),
        read(&stderr)
    );
    eprintln!("{phase} boot ended after {:?} ({status:?})", started.elapsed());
    let status = status.unwrap_or_else(|| panic!("the guest did not end within {BOOT_DEADLINE:?}: {context}"));
    assert!(status.success(), "the VMM failed: {context}");
    let passed = lines
        .iter()
        .find_map(|l| l.strip_prefix("test result: ok. ")?.split(" passed").next()?.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("{TEST_TARGET} did not report `test result: ok.`: {context}"));
    assert!(passed >= 1, "{TEST_TARGET} passed no test: {context}");
    assert!(!text.contains("FAILED") && !text.contains("panicked"), "{TEST_TARGET} failed: {context}");
    assert!(lines.contains(&"DM-GUEST-EXIT 0"), "the guest's init did not report exit 0: {context}");
}

/// Whether a console `line` is the program's progress, forwarded to this test's output: libtest's
/// lines and verdicts (the guest kernel's messages may break a `test NAME ... ok` line in two), its
/// panics, the init's reports and the program's `BENCH ` and `SKIP ` lines.
fn progress(line: &str) -> bool {
    let prefixes = ["BENCH ", "SKIP ", "test ", "running ", "thread '", "DM-GUEST"];
    prefixes.iter().any(|p| line.starts_with(p)) || ["ok", "FAILED", "ignored"].contains(&line)
}
