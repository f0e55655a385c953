//! bench-start: how fast `ignite run` brings a VM to its entrypoint, warm (from a template) against
//! cold (booting the kernel), with the same image, kernel and host in the same run.
//!
//! Measures, through the real CLI and daemon (no network) and a busybox image from a real registry:
//! - the template's build (`ignite template build`: a cold kernel boot up to ignite-init waiting);
//! - one VM: `ignite run -d` to the entrypoint's first output on the console, cold and warm;
//! - N VMs started at once (`--runs N`, default 10): until all of them printed, cold and warm;
//! - host memory per VM of those N (the VMM processes' proportional set size, which splits pages
//!   shared between VMs among them: warm VMs share the template's memory they have not written).
//!
//! Prints tables with ratios cold/warm. Not a test: it asserts nothing about time.
//!
//! Usage: bench-start [--runs N]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use ignite_e2e::bench::{print_table, Options, Row};
use ignite_e2e::{busybox_registry, guest_kernel, ignite_cmd, Daemon, KillVmsOnDrop};

const USAGE: &str = "usage: bench-start [--runs N]\n\n\
    Starts VMs with `ignite run -d` cold and warm (from a template) and prints the time to the\n\
    entrypoint's first output for one VM and for N at once (--runs, default 10), and host memory per VM.";
/// How long any VM may take to show its first output.
const LIMIT: Duration = Duration::from_secs(1800);
const MARKER: &str = "BENCH-START-FIRST-OUTPUT";

fn ignite(r: &Path, args: &[&str]) -> String {
    let out = ignite_cmd(r).args(args).stdin(Stdio::null()).output().expect("run ignite");
    assert!(out.status.success(), "ignite {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts `vms` with `ignite run -d --boot BOOT` at once and waits until each printed; returns the
/// time from the start to the last one's output.
fn start(r: &Path, image: &str, boot: &str, vms: &[String]) -> Duration {
    let started = Instant::now();
    std::thread::scope(|s| {
        for vm in vms {
            s.spawn(move || {
                let script = format!("echo {MARKER}; exec sleep 1000000");
                let args = ["run", "-d", "--boot", boot, image, "--name", vm, "--memory", "128Mi", "--size", "256Mi"];
                ignite(r, &[&args[..], &["--", "/bin/sh", "-c", &script]].concat());
            });
        }
    });
    for vm in vms {
        let console = r.join(format!("vms/{vm}/console.log"));
        while !std::fs::read_to_string(&console).unwrap_or_default().contains(MARKER) {
            assert!(started.elapsed() < LIMIT, "{vm} showed no output within {LIMIT:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    started.elapsed()
}

/// The mean proportional set size of the VMM processes of `vms`, in MiB.
fn pss_mib(r: &Path, vms: &[String]) -> Option<f64> {
    let mut total = 0.0;
    for vm in vms {
        let pid = std::fs::read_to_string(r.join(format!("vms/{vm}/pid"))).ok()?;
        let pid = pid.split_whitespace().next()?;
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
        let kib: f64 = rollup.lines().find(|l| l.starts_with("Pss:"))?.split_whitespace().nth(1)?.parse().ok()?;
        total += kib / 1024.0;
    }
    Some(total / vms.len() as f64)
}

fn remove(r: &Path, vms: &[String]) {
    let names: Vec<&str> = vms.iter().map(String::as_str).collect();
    ignite(r, &[&["rm", "-f"][..], &names].concat());
}

fn main() {
    let options = Options::parse("bench-start", USAGE, 10);
    let Some((_registry, image)) = busybox_registry("bench-start") else { std::process::exit(1) };
    let kernel = guest_kernel();
    let root = tempfile::tempdir().expect("a temporary root");
    let r = root.path();
    let _vms = KillVmsOnDrop(r);
    let _daemon = Daemon::start_warm(r, &kernel, &["--no-network"]);

    eprintln!("bench-start: building the template...");
    let built = Instant::now();
    ignite(r, &["template", "build", "--memory", "128Mi", "--no-network"]);
    let build = built.elapsed();

    let one = |boot: &str| {
        let vm = vec![format!("one-{boot}")];
        let took = start(r, &image, boot, &vm);
        remove(r, &vm);
        took
    };
    eprintln!("bench-start: one VM, cold then warm...");
    let (cold_one, warm_one) = (one("cold"), one("warm"));

    let n = options.runs.max(1);
    let mut rows = vec![Row {
        note: Some(format!("{:.1} s", build.as_secs_f64())),
        ..Row::ms("template build (once per kernel and shape)", None, None)
    }];
    rows.push(Row::ms("1 VM: ignite run -d to first output", Some(ms(warm_one)), Some(ms(cold_one))));
    let mut memory = Vec::new();
    let mut at_once = Vec::new();
    for boot in ["cold", "warm"] {
        eprintln!("bench-start: {n} VMs at once, {boot}...");
        let vms: Vec<String> = (0..n).map(|i| format!("{boot}-{i}")).collect();
        at_once.push(ms(start(r, &image, boot, &vms)));
        memory.push(pss_mib(r, &vms));
        remove(r, &vms);
    }
    rows.push(Row::ms(&format!("{n} VMs at once: until all printed"), Some(at_once[1]), Some(at_once[0])));
    rows.push(Row {
        name: format!("host memory per VM of {n} (VMM PSS)"),
        unit: "MiB",
        ours: memory[1],
        theirs: memory[0],
        note: None,
    });
    println!("\nwarm start (ignite column) against cold boot (cold column), same image, kernel and host");
    print_table("cold", &rows);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
