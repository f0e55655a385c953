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
//!
//! On hosts whose KVM is software (kvm_pvm) the probe finds faults whenever the host is busy: a
//! process's FS base is right (the guest kernel's report shows MSR_FS_BASE equal to the saved base)
//! but the memory behind it reads as zeros, with the vCPU threads pinned to one host CPU, without
//! another VM, with `nofsgsbase` or `nopcid` alike: the host's hypervisor loses guest user memory
//! when a vCPU thread is preempted (issue 13). There the test says so and skips, unless
//! `IGNITE_PROBE_EMULATED=1` asks it to reproduce the fault. `IGNITE_PROBE_CMDLINE` adds guest
//! kernel arguments, `IGNITE_PROBE_CPUS` sets the vCPUs, `IGNITE_PROBE_NEIGHBOUR=0` leaves the
//! neighbour VM out.

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
    let emulated = vmm_core::host::VirtMode::detect() == vmm_core::host::VirtMode::Emulated;
    if emulated && std::env::var_os("IGNITE_PROBE_EMULATED").is_none() {
        eprintln!(
            "SKIP {NAME}: this host's KVM is software, whose guests read zeros for their own memory under host load (issue 13, a fault of the host's hypervisor); IGNITE_PROBE_EMULATED=1 reproduces it"
        );
        return;
    }
    let rounds: u64 = std::env::var("IGNITE_PROBE_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(70);
    let dir = tempfile::tempdir().unwrap();
    let initrd = fsbase_probe_initramfs(dir.path());

    // The load the fault needed: another guest, waking every 10 ms.
    // (IGNITE_PROBE_NEIGHBOUR=0 leaves it out, to tell load from other VMs from other host load.)
    let with_neighbour = std::env::var("IGNITE_PROBE_NEIGHBOUR").map_or(true, |v| v != "0");
    let neighbour_console = dir.path().join("neighbour.log");
    let _neighbour = with_neighbour.then(|| vm(&initrd, 1, "PROBE_IDLE=1", &neighbour_console));
    let cpus: u8 = std::env::var("IGNITE_PROBE_CPUS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);

    let console = dir.path().join("probe.log");
    let started = Instant::now();
    // Extra guest kernel arguments, to try a workaround (e.g. `nofsgsbase`).
    let extra = std::env::var("IGNITE_PROBE_CMDLINE").unwrap_or_default();
    let mut probe = vm(&initrd, cpus, &format!("PROBE_ROUNDS={rounds} PROBE_WORKERS=8 {extra}"), &console);
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
    let reports: Vec<&str> = log
        .lines()
        .filter(|l| ["PROBE-", "segfault at", "traps:", "fs base", "Code:"].iter().any(|w| l.contains(w)))
        .collect();
    // The whole console outlives the test's temp directory, for what the lines above do not show.
    let kept = std::env::temp_dir().join(format!("ignite-fork-probe-{}.log", std::process::id()));
    let _ = std::fs::copy(&console, &kept);
    let context = format!(
        "after {:?}, status {status:?}; whole console in {}; probe lines:\n{}",
        started.elapsed(),
        kept.display(),
        reports.join("\n")
    );
    eprintln!("{context}");
    let result = log.lines().find(|l| l.starts_with("PROBE-RESULT")).unwrap_or_else(|| panic!("no result: {context}"));
    assert!(field(result, "processes") >= rounds * 8 * 3, "fewer processes than started: {context}");
    assert_eq!(field(result, "faults"), 0, "guest processes faulted: {context}");
    assert_eq!(field(result, "mismatches"), 0, "a process saw an FS base that is not its own: {context}");
    assert!(!log.contains("segfault at"), "the guest kernel reported a segfault: {context}");
    let neighbour = std::fs::read_to_string(&neighbour_console).unwrap_or_default();
    assert!(
        !with_neighbour || neighbour.contains("PROBE-IDLE"),
        "the neighbour VM never ran: the probe ran without its load"
    );
}
