//! bench-vmm: ignite's engine side by side with QEMU microvm in the same run, on the same guests.
//!
//! Measures (medians over `--runs`):
//! - start-up: process spawn to the guest's first serial byte, and to its exit, for a tiny PVH guest;
//!   plus ignite's own process-start-to-first-`KVM_RUN`;
//! - memory overhead: the VMM process's RSS minus the resident part of the guest RAM mapping, with the
//!   tiny guest halted;
//! - a real Linux boot: spawn to kernel log markers for the same kernel, initramfs and disk.
//!
//! - the jail's cost: spawn to first serial byte and memory overhead, jailed against `--no-jail`
//!   (jailing needs root; without it that table is skipped and says why).
//!
//! Prints tables of figures and ratios. Not a test: it asserts nothing about time. Every wait is
//! bounded: a VMM that prints nothing new for 2 minutes (QEMU stuck on an emulated host) is stopped.
//!
//! Usage: bench-vmm [--runs N] [--skip-linux]

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ignite_e2e::bench::{median, print_table, Options, Row};
use ignite_e2e::{assemble_pvh, guest_kernel, ignite_bin, tiny_initramfs};

const GUEST_MIB: u64 = 128;
const QEMU: &str = "qemu-system-x86_64";
/// A kernel line both VMMs reach on every host (QEMU stops at the INT3 self-test on emulated hosts).
const EARLY_MARKER: &str = "x86/fpu:";
const INIT_MARKER: &str = "Run /init as init process";
/// How long a booting VMM may print nothing before the benchmark gives up on it.
const SILENCE_LIMIT: Duration = Duration::from_secs(120);

const USAGE: &str = "usage: bench-vmm [--runs N] [--skip-linux]\n\n\
    Compares ignite's engine with QEMU microvm on the same guests (start-up, memory, a Linux boot)\n\
    and jailed against --no-jail VMMs, printing medians and ratios.";

fn main() {
    let Options { runs, skip_linux } = Options::parse("bench-vmm", USAGE, 10);
    let dir = tempfile::tempdir().expect("temp dir");
    let tiny = assemble_pvh(dir.path(), "tiny", false);
    let halting = assemble_pvh(dir.path(), "tiny-halt", true);
    let have_qemu = Command::new(QEMU).arg("--version").output().is_ok_and(|o| o.status.success());
    if !have_qemu {
        eprintln!("bench-vmm: {QEMU} not found; install qemu-system-x86 for the comparison");
    }
    println!(
        "bench-vmm: {runs} runs per figure, guest memory {GUEST_MIB} MiB, host mode {:?}",
        vmm_core::VirtMode::detect()
    );

    let mut rows: Vec<Row> = Vec::new();
    let ours: Vec<TinyRun> = (0..runs).map(|_| tiny_run(ignite_cmd(&tiny, &[]))).collect();
    let theirs: Vec<TinyRun> =
        if have_qemu { (0..runs).map(|_| tiny_run(qemu_cmd(&tiny, None))).collect() } else { Vec::new() };
    let med = |v: &[TinyRun], f: fn(&TinyRun) -> Option<f64>| median(v.iter().filter_map(f).collect());
    rows.push(Row::ms(
        "tiny guest: spawn -> first serial byte",
        med(&ours, |r| r.first_output_ms),
        med(&theirs, |r| r.first_output_ms),
    ));
    rows.push(Row::ms("tiny guest: spawn -> exit", med(&ours, |r| r.exit_ms), med(&theirs, |r| r.exit_ms)));
    rows.push(Row::ms("ignite: process start -> first KVM_RUN", med(&ours, |r| r.first_kvm_run_ms), None));

    let our_mem = median((0..3).filter_map(|_| memory_overhead(ignite_cmd(&halting, &[]))).collect());
    let their_mem = if have_qemu {
        median((0..3).filter_map(|_| memory_overhead(qemu_cmd(&halting, None))).collect())
    } else {
        None
    };
    rows.push(Row {
        name: "VMM memory overhead (RSS - guest RAM resident)".into(),
        unit: "MiB",
        ours: our_mem,
        theirs: their_mem,
        note: None,
    });

    if !skip_linux {
        linux_rows(dir.path(), have_qemu, &mut rows);
    }
    print_table("qemu", &rows);
    jail_rows(&tiny, &halting, runs);
}

/// The jail's cost, jailed (ours) against `--no-jail` (theirs), in the same run.
fn jail_rows(tiny: &Path, halting: &Path, runs: usize) {
    if !vmm_core::jail::is_root() {
        println!("bench-vmm: the jail table needs root (a VMM is only jailed when started by root); skipped");
        return;
    }
    let jailed: Vec<TinyRun> = (0..runs).map(|_| tiny_run(ignite_cmd(tiny, &[]))).collect();
    let unjailed: Vec<TinyRun> = (0..runs).map(|_| tiny_run(ignite_cmd(tiny, &["--no-jail"]))).collect();
    let med = |v: &[TinyRun], f: fn(&TinyRun) -> Option<f64>| median(v.iter().filter_map(f).collect());
    let rows = vec![
        Row::ms(
            "tiny guest: spawn -> first serial byte",
            med(&jailed, |r| r.first_output_ms),
            med(&unjailed, |r| r.first_output_ms),
        ),
        Row::ms(
            "vmm process start -> first KVM_RUN",
            med(&jailed, |r| r.first_kvm_run_ms),
            med(&unjailed, |r| r.first_kvm_run_ms),
        ),
        Row {
            name: "VMM memory overhead (RSS - guest RAM resident)".into(),
            unit: "MiB",
            ours: median((0..3).filter_map(|_| memory_overhead(ignite_cmd(halting, &[]))).collect()),
            theirs: median((0..3).filter_map(|_| memory_overhead(ignite_cmd(halting, &["--no-jail"]))).collect()),
            note: None,
        },
    ];
    println!("\nbench-vmm: jailed (ours) against --no-jail (theirs)");
    print_table("--no-jail", &rows);
}

fn ignite_cmd(kernel: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(ignite_bin());
    // A stop (SIGTERM, see `stop`) ends the VM at once: the tiny guests have no OS to shut down.
    cmd.args(["vmm", "run", "--timings", "--no-rng", "--stop-timeout", "0", "--memory", &GUEST_MIB.to_string()])
        .arg("--kernel")
        .arg(kernel)
        .args(extra);
    cmd
}

fn qemu_cmd(kernel: &Path, linux: Option<(&Path, &Path, &str)>) -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.args([
        "-M",
        "microvm,acpi=off,rtc=off",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-m",
        &GUEST_MIB.to_string(),
    ])
    .args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot"])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=1", "-kernel"])
    .arg(kernel);
    if let Some((initrd, disk, cmdline)) = linux {
        cmd.arg("-initrd").arg(initrd).args(["-append", cmdline]);
        cmd.arg("-drive").arg(format!("id=d0,file={},format=raw,if=none,readonly=on", disk.display()));
        cmd.args(["-device", "virtio-blk-device,drive=d0"]);
    }
    cmd
}

struct TinyRun {
    first_output_ms: Option<f64>,
    exit_ms: Option<f64>,
    first_kvm_run_ms: Option<f64>,
}

/// Spawns a VMM running the tiny guest and times its first serial byte and its exit.
fn tiny_run(mut cmd: Command) -> TinyRun {
    let start = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn vmm");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut byte = [0u8];
    let first_output_ms = match stdout.read(&mut byte) {
        Ok(1) => Some(start.elapsed().as_secs_f64() * 1e3),
        _ => None,
    };
    let _ = std::io::copy(&mut stdout, &mut std::io::sink());
    let status = child.wait().expect("wait vmm");
    let exit_ms = Some(start.elapsed().as_secs_f64() * 1e3);
    let mut stderr = String::new();
    let _ = child.stderr.take().expect("stderr").read_to_string(&mut stderr);
    let first_kvm_run_ms = stderr
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|v| v["processToFirstKvmRunMs"].as_f64());
    if first_output_ms.is_none() {
        eprintln!("bench-vmm: {:?} printed nothing (status {status}): {stderr}", cmd.get_program());
    }
    TinyRun { first_output_ms, exit_ms, first_kvm_run_ms }
}

/// RSS of a VMM whose guest printed and halted, minus the resident pages of its guest RAM mapping.
fn memory_overhead(mut cmd: Command) -> Option<f64> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn vmm");
    let mut byte = [0u8];
    let printed = child.stdout.as_mut().expect("stdout").read(&mut byte).is_ok_and(|n| n == 1);
    std::thread::sleep(Duration::from_millis(500));
    // A root user's jailed VMM runs in a child of the started process: measure that one.
    let pid = jailed_child(child.id()).unwrap_or(child.id());
    let result = printed.then(|| rss_minus_guest_kib(pid)).flatten();
    stop(&mut child);
    result.map(|kib| kib / 1024.0)
}

/// The only child of `pid`, if it has one.
fn jailed_child(pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

fn rss_minus_guest_kib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = kib_field(&status, "VmRSS:")?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    // The guest RAM is one anonymous mapping of (about) the guest size: take the largest such mapping.
    let guest_kib = GUEST_MIB * 1024;
    let mut best: Option<(f64, f64)> = None;
    for mapping in smaps.split_inclusive("VmFlags").filter(|m| m.contains("Size:")) {
        let (Some(size), Some(resident)) = (kib_field(mapping, "\nSize:"), kib_field(mapping, "\nRss:")) else {
            continue;
        };
        if size >= guest_kib as f64 && size <= (guest_kib + 8 * 1024) as f64 && best.is_none_or(|(s, _)| size > s) {
            best = Some((size, resident));
        }
    }
    Some(rss - best.map_or(0.0, |(_, resident)| resident))
}

fn kib_field(text: &str, key: &str) -> Option<f64> {
    let rest = &text[text.find(key)? + key.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Ends a sample with SIGTERM, as a user would, so a jailed VMM is stopped and cleaned up by its
/// launcher (SIGKILL would leave that to the VMM's lifeline and the next start's cgroup sweep).
fn stop(child: &mut Child) {
    let terminated = Command::new("kill").arg(child.id().to_string()).status().is_ok_and(|s| s.success());
    if !terminated {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// Boots the real guest kernel on both VMMs and records when each marker appears on the console.
fn linux_rows(dir: &Path, have_qemu: bool, rows: &mut Vec<Row>) {
    let kernel = guest_kernel();
    let initrd = tiny_initramfs(dir);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let markers = [EARLY_MARKER, INIT_MARKER, "IGNITE-INIT-MARKER"];
    println!("bench-vmm: booting {} on ignite (minutes on an emulated host)", kernel.display());
    let disk_arg = format!("{},ro", disk.display());
    let ours =
        console_markers(ignite_cmd(&kernel, &["--initrd", &initrd.to_string_lossy(), "--disk", &disk_arg]), &markers);
    let theirs = if have_qemu {
        // The same command line ignite builds (its --timings report does not include it, so rebuild it).
        let mut cmdline = "console=ttyS0 reboot=k panic=-1".to_string();
        if vmm_core::VirtMode::detect() == vmm_core::VirtMode::Emulated {
            cmdline = format!("{cmdline} {}", vmm_core::host::EMULATED_GUEST_ARGS);
        }
        println!("bench-vmm: booting the same kernel on QEMU microvm");
        console_markers(qemu_cmd(&kernel, Some((&initrd, &disk, &cmdline))), &markers)
    } else {
        vec![None; markers.len()]
    };
    for (i, marker) in markers.iter().enumerate() {
        rows.push(Row::ms(&format!("linux: spawn -> \"{marker}\""), ours[i], theirs[i]));
    }
    if have_qemu && theirs[1].is_none() {
        println!("note: QEMU never reached \"{INIT_MARKER}\" (on an emulated host it stops at the kernel's INT3 self-test, which ignite steps over)");
    }
}

/// Spawns `cmd`, reads its console until it exits, prints every marker, or stays silent for
/// [`SILENCE_LIMIT`] (at most 15 minutes in all), and returns for each marker the milliseconds until a
/// line containing it appeared.
fn console_markers(mut cmd: Command, markers: &[&str]) -> Vec<Option<f64>> {
    let start = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn vmm");
    let stdout = child.stdout.take().expect("stdout");
    let rx = ignite_e2e::timed_lines(stdout, start);
    let mut found = vec![None; markers.len()];
    let deadline = start + Duration::from_secs(900);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if found.iter().all(Option::is_some) {
            break;
        }
        match rx.recv_timeout(left.min(SILENCE_LIMIT)) {
            Ok((line, at)) => {
                for (i, marker) in markers.iter().enumerate() {
                    if found[i].is_none() && line.contains(marker) {
                        found[i] = Some(at.as_secs_f64() * 1e3);
                    }
                }
            }
            Err(_) => break,
        }
    }
    stop(&mut child);
    found
}
