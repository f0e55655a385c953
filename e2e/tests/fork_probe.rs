//! Thousands of guest processes, and not one fault: the fork/exec probe (`guests/fsbase-probe.c`) as
//! PID 1 of a two-vCPU guest on the patched guest kernel, started by fork + exec, posix_spawn and a
//! busybox shell's command substitutions, static and dynamic, while a second thread of PID 1 wakes
//! every 20 ms and the host is kept busy by a neighbour VM that wakes every 10 ms. Every process compares the FS
//! base the guest kernel set (arch_prctl), the one its TLS names (%fs:0) and the one the CPU has
//! (RDFSBASE): a stale FS base or a stale TLB entry for the TLS page shows as a mismatch before it
//! becomes a segfault, and the guest kernel's `segfault at` lines are counted too.
//!
//! One Linux boot plus the processes: several minutes of emulated CPU on hosts without hardware
//! virtualization. `IGNITE_PROBE_ROUNDS` (default 70, 30 processes each) sets the length.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ignite_e2e::{fsbase_probe_initramfs, guest_kernel, ignite_bin, kvm_unavailable};

const NAME: &str = "thousands_of_guest_processes_run_without_a_fault_under_host_load";
/// The longest the probe may take; a hung guest fails the test instead of holding CI.
const PROBE_DEADLINE: Duration = Duration::from_secs(1800);

/// A VM process killed when dropped.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vm(initrd: &std::path::Path, cpus: u8, args: &str, console: &std::path::Path) -> Vm {
    let child = Command::new(ignite_bin())
        .args(["vmm", "run", "--memory", "128", "--cpus", &cpus.to_string(), "--kernel"])
        .arg(guest_kernel())
        .arg("--initrd")
        .arg(initrd)
        .arg("--cmdline")
        .arg(format!("console=ttyS0 reboot=k panic=-1 {args}"))
        .arg("--console")
        .arg(console)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ignite vmm run");
    Vm(child)
}

/// The value of `key=` in the probe's `PROBE-RESULT` line.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

#[test]
fn thousands_of_guest_processes_run_without_a_fault_under_host_load() {
    if let Some(why) = kvm_unavailable() {
        eprintln!("SKIP {NAME}: {why}");
        return;
    }
    let rounds: u64 = std::env::var("IGNITE_PROBE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(70);
    let dir = tempfile::tempdir().unwrap();
    let initrd = fsbase_probe_initramfs(dir.path());

    // The load the fault needed: another guest, waking every 10 ms.
    let neighbour_console = dir.path().join("neighbour.log");
    let _neighbour = vm(&initrd, 1, "PROBE_IDLE=1", &neighbour_console);

    let console = dir.path().join("probe.log");
    let started = Instant::now();
    let mut probe = vm(&initrd, 2, &format!("PROBE_ROUNDS={rounds} PROBE_WORKERS=8"), &console);
    // Progress as the guest prints it, so a long run shows where it is.
    let mut shown = 0;
    let status = loop {
        let log = std::fs::read_to_string(&console).unwrap_or_default();
        for line in log.lines().skip(shown) {
            if line.starts_with("PROBE-") {
                eprintln!("[{:>4}s] {line}", started.elapsed().as_secs());
            }
        }
        shown = log.lines().count();
        if let Some(status) = probe.0.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > PROBE_DEADLINE {
            break None;
        }
        std::thread::sleep(Duration::from_millis(500));
    };

    let log = std::fs::read_to_string(&console).unwrap_or_default();
    let reports: Vec<&str> =
        log.lines().filter(|l| l.contains("PROBE-") || l.contains("segfault at") || l.contains("traps:")).collect();
    let context = format!("after {:?}, status {status:?}; probe lines:\n{}", started.elapsed(), reports.join("\n"));
    eprintln!("{context}");
    let result = log.lines().find(|l| l.starts_with("PROBE-RESULT")).unwrap_or_else(|| panic!("no result: {context}"));
    assert!(field(result, "processes") >= rounds * 8 * 3, "fewer processes than started: {context}");
    assert_eq!(field(result, "faults"), 0, "guest processes faulted: {context}");
    assert_eq!(field(result, "mismatches"), 0, "a process saw an FS base that is not its own: {context}");
    assert!(!log.contains("segfault at"), "the guest kernel reported a segfault: {context}");
    let neighbour = std::fs::read_to_string(&neighbour_console).unwrap_or_default();
    assert!(neighbour.contains("PROBE-IDLE"), "the neighbour VM never ran: the probe ran without its load");
}
