//! bench-snapshot: how long a snapshot takes and how fast a VM comes back from one, against a cold
//! start of the same guest in the same run.
//!
//! Measures (medians over `--runs`), with real `ignite vmm run` processes (jailed when run as root):
//! - a tiny counting guest (`controller/tests/guests/serial_counter.S`) with 128 MiB and 1 GiB of
//!   memory: the `snapshot` control request on the running VM (pause, save, resume), the size of its
//!   memory file, and for a restore against a cold start: process start -> first KVM_RUN (the guest
//!   running again, from `--timings`) and spawn -> the guest's first output;
//! - a Linux guest (the cached guest kernel, a busybox initramfs counting once a second), 128 MiB:
//!   the same figures for a restore against a cold boot.
//!
//! Prints tables with ratios. Not a test: it asserts nothing about time. Firecracker publishes a
//! restore bound of 8 ms on hardware virtualization; on hosts whose KVM emulates guests the ratio to
//! a cold boot is the figure to read.
//!
//! Usage: bench-snapshot [--runs N] [--skip-linux]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ignite_e2e::bench::{median, print_table, Options, Row};
use ignite_e2e::{counter_counts, counter_guest, counting_initramfs, guest_kernel, ignite_bin, linux_counts};
use vmm_core::control::{self, Request};

const USAGE: &str = "usage: bench-snapshot [--runs N] [--skip-linux]\n\n\
    Times snapshots of running VMs (128 MiB and 1 GiB) and restores from them against cold starts\n\
    of the same guests (a tiny guest and a Linux guest), printing medians and ratios.";
/// How long any guest may take to show its first output.
const LIMIT: Duration = Duration::from_secs(600);

/// A VMM process (its stderr, where `--timings` reports, in a file), killed when dropped.
struct Vmm {
    child: Child,
    stderr: PathBuf,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vmm {
    /// Stops the VMM (SIGTERM: at once, with `--stop-timeout 0`) and reads from its `--timings` how
    /// long the process took to its first KVM_RUN, in milliseconds.
    fn first_run_ms(mut self) -> Option<f64> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        let stderr = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        stderr
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .and_then(|v| v["processToFirstKvmRunMs"].as_f64())
    }
}

/// The guest under test: how to start it cold, and how to read its progress from its console.
struct Guest {
    name: &'static str,
    cold: Vec<String>,
    counts: fn(&str) -> Vec<u64>,
    memory_mib: u32,
}

fn vmm(console: &Path, args: &[String]) -> Vmm {
    let stderr = console.with_extension("stderr");
    let child = Command::new(ignite_bin())
        .args(["vmm", "run", "--timings", "--stop-timeout", "0", "--console"])
        .arg(console)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("create the stderr file"))
        .spawn()
        .expect("spawn ignite vmm run");
    Vmm { child, stderr }
}

/// Milliseconds from `start` until `console` shows `n` counts (`None` if the VMM died or `LIMIT`).
fn until_counts(vm: &mut Vmm, console: &Path, guest: &Guest, n: usize, start: Instant) -> Option<f64> {
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if (guest.counts)(&text).len() >= n {
            return Some(start.elapsed().as_secs_f64() * 1000.0);
        }
        if start.elapsed() > LIMIT || vm.child.try_wait().ok().flatten().is_some() {
            eprintln!("bench-snapshot: {} did not count (console: {})", guest.name, console.display());
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One start of a guest: spawn -> first output, and process start -> first KVM_RUN (ms).
#[derive(Clone, Copy)]
struct Start {
    first_output: f64,
    first_run: f64,
}

/// One round: a cold start, a snapshot of the running VM, a restore from it.
struct Round {
    cold: Start,
    snapshot_ms: f64,
    memory_bytes: u64,
    restored: Start,
}

fn round(dir: &Path, guest: &Guest, round: usize) -> Option<Round> {
    let socket = dir.join(format!("{}-{round}.sock", guest.name));
    let snapshots = dir.join(format!("{}-{round}.snapshots", guest.name));
    let mut args = guest.cold.clone();
    args.extend(["--memory".into(), guest.memory_mib.to_string(), "--control-socket".into()]);
    args.push(socket.display().to_string());
    args.extend(["--snapshot-dir".into(), snapshots.display().to_string()]);
    let console = dir.join(format!("{}-{round}.cold.log", guest.name));
    let started = Instant::now();
    let mut cold = vmm(&console, &args);
    let first_output = until_counts(&mut cold, &console, guest, 1, started)?;
    until_counts(&mut cold, &console, guest, 2, started)?;
    let taken = Instant::now();
    let reply = control::request(&socket, &Request::Snapshot { name: "s".into() }, LIMIT);
    let snapshot_ms = taken.elapsed().as_secs_f64() * 1000.0;
    let memory_bytes = match reply {
        Ok(reply) => reply.memory_bytes.unwrap_or_default(),
        Err(e) => {
            eprintln!("bench-snapshot: {}: snapshot failed: {e}", guest.name);
            return None;
        }
    };
    let cold = Start { first_output, first_run: cold.first_run_ms()? };
    let console = dir.join(format!("{}-{round}.restored.log", guest.name));
    let mut args = guest.cold.clone();
    // A restore gets the devices but not the kernel, initrd or command line.
    strip_boot_args(&mut args);
    args.extend(["--memory".into(), guest.memory_mib.to_string(), "--restore".into()]);
    args.push(snapshots.join("s").display().to_string());
    let started = Instant::now();
    let mut restored = vmm(&console, &args);
    let first_output = until_counts(&mut restored, &console, guest, 1, started)?;
    let restored = Start { first_output, first_run: restored.first_run_ms()? };
    let _ = std::fs::remove_dir_all(&snapshots);
    Some(Round { cold, snapshot_ms, memory_bytes, restored })
}

fn strip_boot_args(args: &mut Vec<String>) {
    let mut out = Vec::with_capacity(args.len());
    let mut skip = false;
    for arg in args.drain(..) {
        if skip {
            skip = false;
            continue;
        }
        if ["--kernel", "--initrd", "--cmdline"].contains(&arg.as_str()) {
            skip = true;
            continue;
        }
        out.push(arg);
    }
    *args = out;
}

fn measure(dir: &Path, guest: &Guest, runs: usize, rows: &mut Vec<Row>, snapshot_rows: &mut Vec<Row>) {
    let results: Vec<Round> = (0..runs).filter_map(|i| round(dir, guest, i)).collect();
    let med = |f: &dyn Fn(&Round) -> f64| median(results.iter().map(f).collect());
    rows.push(Row::ms(
        &format!("{}: process start -> guest running", guest.name),
        med(&|r| r.restored.first_run),
        med(&|r| r.cold.first_run),
    ));
    rows.push(Row::ms(
        &format!("{}: spawn -> first output", guest.name),
        med(&|r| r.restored.first_output),
        med(&|r| r.cold.first_output),
    ));
    snapshot_rows.push(Row::ms(&format!("{}: snapshot of the running VM", guest.name), med(&|r| r.snapshot_ms), None));
    snapshot_rows.push(Row {
        name: format!("{}: memory file", guest.name),
        unit: "MiB",
        ours: med(&|r| r.memory_bytes as f64 / f64::from(1 << 20)),
        theirs: None,
        note: None,
    });
}

fn main() {
    let Options { runs, skip_linux } = Options::parse("bench-snapshot", USAGE, 3);
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    println!(
        "bench-snapshot: {runs} runs per figure, host mode {:?}, jailed: {}",
        vmm_core::VirtMode::detect(),
        vmm_core::jail::is_root()
    );
    let tiny = counter_guest(d);
    let arg = |p: &PathBuf| p.display().to_string();
    let mut guests = vec![];
    for memory_mib in [128, 1024] {
        guests.push(Guest {
            name: if memory_mib == 128 { "tiny guest, 128 MiB" } else { "tiny guest, 1 GiB" },
            cold: vec!["--no-rng".into(), "--kernel".into(), arg(&tiny)],
            counts: counter_counts,
            memory_mib,
        });
    }
    if !skip_linux {
        let initrd = counting_initramfs(d);
        let disk = d.join("linux-disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).expect("write disk");
        guests.push(Guest {
            name: "Linux guest, 128 MiB",
            cold: vec![
                "--kernel".into(),
                arg(&guest_kernel()),
                "--initrd".into(),
                arg(&initrd),
                "--cmdline".into(),
                "console=ttyS0 reboot=k panic=-1 rdinit=/init".into(),
                "--disk".into(),
                arg(&disk),
            ],
            counts: linux_counts,
            memory_mib: 128,
        });
    }
    let (mut rows, mut snapshot_rows) = (Vec::new(), Vec::new());
    for guest in &guests {
        // One Linux boot costs a minute or more here: one run of it is the figure.
        let n = if guest.name.starts_with("Linux") { 1 } else { runs };
        measure(d, guest, n, &mut rows, &mut snapshot_rows);
    }
    println!("\nrestore from a snapshot (ignite) against a cold start of the same guest (first output waits for");
    println!("the guest's next count after a restore: up to one period of its loop, ~3 s for the Linux guest");
    println!("here, whose busybox loop forks sleep under emulation):");
    print_table("cold start", &rows);
    println!("\nsnapshot of a running VM (pause, save state and memory, resume):");
    print_table("-", &snapshot_rows);
}
