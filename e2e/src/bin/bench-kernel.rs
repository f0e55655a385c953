//! bench-kernel: the guest kernel of this checkout against an older one, in the same run, on the same
//! guest: a busybox root filesystem with `ignite-init` as PID 1 whose entrypoint prints a marker and
//! then sleeps.
//!
//! Measures, per kernel (medians over `--runs`):
//! - boot: spawn of `ignite vmm run` to the kernel's first line, to "as init process", to ignite-init's
//!   `starting` line and to the entrypoint's own marker;
//! - idle: host CPU (utime + stime of the VMM process, all its threads, from /proc/PID/stat) over
//!   `--idle-secs` once the entrypoint sleeps, in percent of one host core, and which thread spent it.
//!
//! On an emulated host each kernel also boots a second time with the jiffies clocksource, as every
//! guest ran before the VMM passed the TSC's frequency: that is the idle CPU "before".
//!
//! Prints tables with the ratio old/new (above 1: the new kernel boots faster or idles cheaper) and
//! jiffies/TSC.
//! Not a test: it asserts nothing about time. Every wait is bounded.
//!
//! Usage: bench-kernel --old PATH [--new PATH] [--runs N] [--idle-secs S] [--skip-before]
//! `--old` defaults to `$IGNITE_OLD_KERNEL`; `--new` to `$IGNITE_WORKLOADS_KERNEL`, else what
//! `e2e/guest-kernel-workloads.sh` builds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guest_api::config::{write_config_drive, GuestConfig};
use ignite_e2e::bench::{median, print_table, Row};
use ignite_e2e::{busybox_root, ignite_bin, ignite_init_bin, workloads_kernel};

const ENTRYPOINT_MARKER: &str = "BENCH-ENTRYPOINT-READY";
/// Console markers, in boot order, with the label each gets in the table.
const MARKERS: [(&str, &str); 4] = [
    ("Linux version", "kernel's first line"),
    ("as init process", "\"Run ... as init process\""),
    ("ignite-init: starting", "\"ignite-init: starting\""),
    (ENTRYPOINT_MARKER, "entrypoint's marker"),
];
/// How long a booting VM may print nothing before the benchmark gives up on it.
const SILENCE_LIMIT: Duration = Duration::from_secs(180);
/// The whole boot's bound.
const BOOT_LIMIT: Duration = Duration::from_secs(900);
/// After the entrypoint's marker, before measuring idle CPU: lets the guest finish what follows boot
/// (journal commit and writeback of what init wrote, first crng reseed, ...). Measured here: an idle
/// guest's CPU decays over its first minute (15%, 4%, then a steady 2.3% of a core).
const SETTLE: Duration = Duration::from_secs(60);
/// How much longer than the settling and the measurement the entrypoint sleeps between its two
/// readings of the guest's timer interrupt count, so the second falls after the measurement.
const LOC_MARGIN: Duration = Duration::from_secs(5);

const USAGE: &str = "usage: bench-kernel --old PATH [--new PATH] [--runs N] [--idle-secs S] [--skip-before]\n\n\
    Boots an old and a new guest kernel (ignite-init, an entrypoint that sleeps) and prints boot time to\n\
    the entrypoint and the VMM's host CPU while the guest idles, with ratios old/new; on an emulated host\n\
    both also boot with the jiffies clocksource, as before the VMM passed the TSC (--skip-before: not).\n\
    --old defaults to $IGNITE_OLD_KERNEL, --new to $IGNITE_WORKLOADS_KERNEL or e2e/guest-kernel-workloads.sh's kernel.";

struct Args {
    old: PathBuf,
    new: PathBuf,
    runs: usize,
    idle: Duration,
    skip_before: bool,
}

fn parse_args() -> Args {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        std::process::exit(0);
    }
    let mut values: BTreeMap<&str, String> = BTreeMap::new();
    let mut skip_before = false;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let key = match flag.as_str() {
            "--skip-before" => {
                skip_before = true;
                continue;
            }
            "--old" | "--new" | "--runs" | "--idle-secs" => flag.as_str(),
            other => usage_error(&format!("unknown argument {other}")),
        };
        let Some(value) = it.next() else { usage_error(&format!("{key} needs a value")) };
        values.insert(key, value.clone());
    }
    let old = values
        .get("--old")
        .cloned()
        .or_else(|| std::env::var("IGNITE_OLD_KERNEL").ok())
        .unwrap_or_else(|| usage_error("no old kernel: give --old or $IGNITE_OLD_KERNEL"));
    let number = |key: &str, default: u64| {
        values.get(key).map_or(default, |v| v.parse().unwrap_or_else(|_| usage_error(&format!("{key}: not a number"))))
    };
    Args {
        old: old.into(),
        new: values.get("--new").map_or_else(workloads_kernel, PathBuf::from),
        runs: number("--runs", 1).max(1) as usize,
        idle: Duration::from_secs(number("--idle-secs", 30)),
        skip_before,
    }
}

fn usage_error(msg: &str) -> ! {
    eprintln!("bench-kernel: {msg}\n{USAGE}");
    std::process::exit(2);
}

/// One way to boot: a kernel, and what is appended to the guest's command line.
struct Variant {
    name: &'static str,
    kernel: PathBuf,
    extra_cmdline: &'static str,
    runs: Vec<RunResult>,
}

/// Appended to reproduce the VMM before it gave emulated guests the TSC: the jiffies clocksource, on
/// which the tick never stops (see `vmm_core::host::emulated_clock_args`).
const BEFORE_CLOCK: &str = "clocksource=refined-jiffies";

fn main() {
    let args = parse_args();
    for kernel in [&args.old, &args.new] {
        if !kernel.exists() {
            usage_error(&format!("{} does not exist", kernel.display()));
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (rootfs, drive) = guest_disks(dir.path(), SETTLE + args.idle + LOC_MARGIN);
    let emulated = vmm_core::VirtMode::detect() == vmm_core::VirtMode::Emulated;
    println!(
        "bench-kernel: {} run(s) per variant, idle CPU over {} s, host mode {}\n  old: {}\n  new: {}",
        args.runs,
        args.idle.as_secs(),
        if emulated { "emulated" } else { "hardware" },
        args.old.display(),
        args.new.display()
    );
    let variant = |name, kernel: &PathBuf, extra_cmdline| Variant {
        name,
        kernel: kernel.clone(),
        extra_cmdline,
        runs: Vec::new(),
    };
    let mut variants = vec![variant("old", &args.old, ""), variant("new", &args.new, "")];
    // The clock only matters on emulated hosts, where the VMM passes the TSC's frequency.
    if emulated && !args.skip_before {
        variants.push(variant("old, jiffies clock", &args.old, BEFORE_CLOCK));
        variants.push(variant("new, jiffies clock", &args.new, BEFORE_CLOCK));
    }
    // Interleaved, so a change in the host's load affects every variant alike.
    for run in 0..args.runs {
        for v in &mut variants {
            println!("bench-kernel: run {}/{}: booting {} (minutes on an emulated host)", run + 1, args.runs, v.name);
            let result = boot_and_idle(&v.kernel, v.extra_cmdline, &rootfs, &drive, dir.path(), args.idle);
            println!("bench-kernel:   {}: {}", v.name, result.summary());
            v.runs.push(result);
        }
    }

    let marker = |v: &Variant, i: usize| median(v.runs.iter().filter_map(|r| r.markers[i]).collect());
    let idle = |v: &Variant| median(v.runs.iter().filter_map(|r| r.idle.as_ref().map(|i| i.percent)).collect());
    let idle_row = |name: String, ours: &Variant, theirs: &Variant| Row {
        name,
        unit: "% core",
        ours: idle(ours),
        theirs: idle(theirs),
        note: None,
    };
    let irqs = |v: &Variant| median(v.runs.iter().filter_map(|r| r.timer_irqs_per_s).collect());
    let irq_row = |name: &str, ours: &Variant, theirs: &Variant| Row {
        name: name.into(),
        unit: "/s",
        ours: irqs(ours),
        theirs: irqs(theirs),
        note: None,
    };
    let secs = args.idle.as_secs();
    let (old, new) = (&variants[0], &variants[1]);
    let mut rows: Vec<Row> = MARKERS
        .iter()
        .enumerate()
        .map(|(i, (_, label))| Row::ms(&format!("boot: spawn -> {label}"), marker(new, i), marker(old, i)))
        .collect();
    rows.push(idle_row(format!("idle VMM: host CPU over {secs} s"), new, old));
    rows.push(irq_row("idle guest: timer interrupts", new, old));
    println!("\nnew kernel against old, same VMM (ratio above 1: the new kernel is faster or cheaper)");
    print_table("old kernel", &rows);
    if let [old, new, old_before, new_before] = &variants[..] {
        let last = MARKERS.len() - 1;
        let rows = vec![
            idle_row(format!("old kernel: idle VMM host CPU over {secs} s"), old, old_before),
            idle_row(format!("new kernel: idle VMM host CPU over {secs} s"), new, new_before),
            irq_row("old kernel: idle guest timer interrupts", old, old_before),
            irq_row("new kernel: idle guest timer interrupts", new, new_before),
            Row::ms("old kernel: boot to the entrypoint", marker(old, last), marker(old_before, last)),
            Row::ms("new kernel: boot to the entrypoint", marker(new, last), marker(new_before, last)),
        ];
        println!("\nTSC clocksource (now) against jiffies ({BEFORE_CLOCK}, as before the VMM passed the TSC)");
        print_table("jiffies", &rows);
    }
    for v in &variants {
        if let Some(idle) = v.runs.last().and_then(|r| r.idle.as_ref()) {
            println!("idle CPU by thread, {} (last run): {}", v.name, idle.by_thread());
        }
    }
}

/// The guest's disks: a busybox root filesystem with ignite-init, and a config drive whose command
/// prints [`ENTRYPOINT_MARKER`] and sleeps.
fn guest_disks(dir: &Path, loc_sleep: Duration) -> (PathBuf, PathBuf) {
    let root = dir.join("root");
    busybox_root(&root, &["sh", "echo", "sleep", "grep"]);
    std::fs::create_dir_all(root.join("sbin")).expect("create sbin");
    std::fs::copy(ignite_init_bin(), root.join("sbin/ignite-init")).expect("copy ignite-init");
    std::fs::create_dir_all(root.join("etc/ignite")).expect("create etc/ignite");
    std::fs::write(root.join("etc/ignite/image.json"), r#"{"entrypoint":["/bin/sh"]}"#).expect("image.json");
    let rootfs = dir.join("root.ext4");
    image_store::ext4::build_ext4(&root, &rootfs, "root").expect("build the root filesystem");
    // The guest's local timer interrupt count before and after the host measures its idle CPU: the
    // second `grep` runs after the measurement window.
    let command = format!(
        "echo {ENTRYPOINT_MARKER}; grep LOC: /proc/interrupts; sleep {}; grep LOC: /proc/interrupts; exec sleep 1000000",
        loc_sleep.as_secs()
    );
    let config = GuestConfig {
        hostname: "bench-kernel".into(),
        command: Some(vec!["/bin/sh".into(), "-c".into(), command]),
        ..Default::default()
    };
    let drive = dir.join("config.img");
    write_config_drive(&drive, &config).expect("write the config drive");
    (rootfs, drive)
}

struct RunResult {
    /// Milliseconds from spawn to each of [`MARKERS`].
    markers: Vec<Option<f64>>,
    /// The guest's last "Switched to clocksource" announcement.
    clocksource: Option<String>,
    idle: Option<IdleCpu>,
    /// The guest's local timer interrupts per second while it slept (from its /proc/interrupts).
    timer_irqs_per_s: Option<f64>,
}

impl RunResult {
    fn summary(&self) -> String {
        let boot = self.markers.last().copied().flatten().map_or("never".into(), |ms| format!("{:.1} s", ms / 1e3));
        let idle = self.idle.as_ref().map_or("n/a".into(), |i| format!("{:.2}% of a core", i.percent));
        let clock = self.clocksource.as_deref().unwrap_or("?");
        let irqs = self.timer_irqs_per_s.map_or("n/a".into(), |r| format!("{r:.2}/s"));
        format!("entrypoint after {boot}, idle {idle}, clocksource {clock}, guest timer interrupts {irqs}")
    }
}

struct IdleCpu {
    percent: f64,
    /// Clock ticks spent by each thread (by name) during the measurement.
    threads: BTreeMap<String, u64>,
}

impl IdleCpu {
    fn by_thread(&self) -> String {
        let parts: Vec<String> = self.threads.iter().map(|(name, ticks)| format!("{name} {ticks} ticks")).collect();
        parts.join(", ")
    }
}

/// Boots `kernel` on a fresh copy of `rootfs`, records the console markers, then measures the idle VMM.
fn boot_and_idle(
    kernel: &Path,
    extra_cmdline: &str,
    rootfs: &Path,
    drive: &Path,
    dir: &Path,
    idle: Duration,
) -> RunResult {
    let disk = dir.join("run-root.ext4");
    std::fs::copy(rootfs, &disk).expect("copy the root filesystem");
    let start = Instant::now();
    let mut child = Command::new(ignite_bin())
        .args(["vmm", "run", "--memory", "128", "--console", "stdout", "--kernel"])
        .arg(kernel)
        .arg("--disk")
        .arg(&disk)
        .arg("--disk")
        .arg(format!("{},ro", drive.display()))
        .arg("--cmdline")
        .arg(format!("{} {extra_cmdline}", guest_api::boot::KERNEL_ARGS))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ignite vmm run");
    let stdout = child.stdout.take().expect("stdout");
    let rx = ignite_e2e::timed_lines(stdout, start);
    let mut markers = vec![None; MARKERS.len()];
    let mut clocksource = None;
    let deadline = start + BOOT_LIMIT;
    while markers.last().is_some_and(Option::is_none) {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
        match rx.recv_timeout(left.min(SILENCE_LIMIT)) {
            Ok((line, at)) => {
                if let Some((_, name)) = line.split_once("Switched to clocksource ") {
                    clocksource = Some(name.trim().to_string());
                }
                for (i, (marker, _)) in MARKERS.iter().enumerate() {
                    if markers[i].is_none() && line.contains(marker) {
                        markers[i] = Some(at.as_secs_f64() * 1e3);
                    }
                }
            }
            Err(_) => break,
        }
    }
    let booted = markers.last().copied().flatten().is_some();
    let idle = booted
        .then(|| {
            std::thread::sleep(SETTLE);
            // A root user's jailed VMM runs in a child of the started process: measure that one.
            let pid = jailed_child(child.id()).unwrap_or(child.id());
            idle_cpu(pid, idle)
        })
        .flatten();
    // The two timer interrupt counts, with the console time each was printed at.
    let mut counts: Vec<(u64, Duration)> = Vec::new();
    let loc_deadline = Instant::now() + LOC_MARGIN * 4;
    while booted && counts.len() < 2 {
        let Some(left) = loc_deadline.checked_duration_since(Instant::now()) else { break };
        let Ok((line, at)) = rx.recv_timeout(left) else { break };
        if let Some(count) = line.split_once("LOC:").and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        {
            counts.push((count, at));
        }
    }
    let timer_irqs_per_s = match counts[..] {
        [(first, t0), (second, t1)] if t1 > t0 => Some(second.saturating_sub(first) as f64 / (t1 - t0).as_secs_f64()),
        _ => None,
    };
    let _ = child.kill();
    let _ = child.wait();
    RunResult { markers, clocksource, idle, timer_irqs_per_s }
}

/// The only child of `pid`, if it has one.
fn jailed_child(pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// CPU of process `pid` (all threads) over `window`, from utime + stime in /proc.
fn idle_cpu(pid: u32, window: Duration) -> Option<IdleCpu> {
    let before = thread_ticks(pid)?;
    let total_before = stat_ticks(&format!("/proc/{pid}/stat"))?;
    let started = Instant::now();
    std::thread::sleep(window);
    let total_after = stat_ticks(&format!("/proc/{pid}/stat"))?;
    let elapsed = started.elapsed().as_secs_f64();
    let after = thread_ticks(pid)?;
    let threads = after
        .into_iter()
        .map(|(tid, (name, ticks))| {
            let spent = ticks.saturating_sub(before.get(&tid).map_or(0, |(_, t)| *t));
            (format!("{name}[{tid}]"), spent)
        })
        .collect();
    let ticks = total_after.saturating_sub(total_before) as f64;
    Some(IdleCpu { percent: 100.0 * ticks / clock_ticks_per_second() / elapsed, threads })
}

/// utime + stime of every thread of `pid`, by thread id, with the thread's name.
fn thread_ticks(pid: u32) -> Option<BTreeMap<u32, (String, u64)>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else { continue };
        let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default().trim().to_string();
        if let Some(ticks) = stat_ticks(&entry.path().join("stat").to_string_lossy()) {
            out.insert(tid, (name, ticks));
        }
    }
    Some(out)
}

/// utime + stime (fields 14 and 15) of a /proc stat file, in clock ticks.
fn stat_ticks(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks_per_second() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().ok();
    out.and_then(|o| String::from_utf8(o.stdout).ok()).and_then(|s| s.trim().parse().ok()).unwrap_or(100.0)
}
