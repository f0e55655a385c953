//! Shared helpers for the real-KVM integration tests: assembling tiny guests and running them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vmm_core::{ConsoleConfig, ExitReason, Vm, VmConfig};

/// Guest code prelude shared by every tiny guest: Intel syntax, 64-bit, and the `power_off` macro.
const PRELUDE: &str = include_str!("../guests/prelude.S");

/// Why a real-KVM test cannot run here, or `None` when it can.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => None,
        Err(err) => Some(format!("/dev/kvm cannot be opened ({err})")),
    }
}

/// Skips the calling test (with a reason on stderr) when KVM is unavailable.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if let Some(reason) = common::kvm_unavailable() {
            eprintln!("skipping: {reason}");
            return;
        }
    };
}

/// Assembles `source` (GNU as, after the prelude) into an ELF loaded at 1 MiB with entry `_start`.
pub fn assemble(dir: &Path, name: &str, source: &str) -> PathBuf {
    let asm = dir.join(format!("{name}.S"));
    let obj = dir.join(format!("{name}.o"));
    let elf = dir.join(format!("{name}.elf"));
    std::fs::write(&asm, format!("{PRELUDE}\n{source}\n")).unwrap();
    run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&asm));
    // -N: one RWX segment starting exactly at 1 MiB (no header segment below it).
    run(Command::new("ld")
        .args(["-m", "elf_x86_64", "-N", "-Ttext=0x100000", "-e", "_start", "-o"])
        .arg(&elf)
        .arg(&obj));
    elf
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils)"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// A configuration for a tiny guest: no rng unless asked, console to a file in `dir`.
pub fn tiny_config(dir: &Path, kernel: PathBuf) -> VmConfig {
    let mut config = VmConfig::new(kernel);
    config.memory_mib = 64;
    config.rng = false;
    config.console = ConsoleConfig::File(dir.join("console.log"));
    config
}

/// Runs a VM to its end (at most `timeout`, then it is stopped and the test fails) and returns the exit
/// reason with the console output.
pub fn run_to_exit(config: &VmConfig, timeout: Duration) -> (ExitReason, String) {
    let handle = Vm::start(config).expect("vm starts");
    let finished = handle.wait_timeout(timeout);
    let exit = handle.kill();
    let console = match &config.console {
        ConsoleConfig::File(path) => std::fs::read_to_string(path).unwrap_or_default(),
        _ => String::new(),
    };
    assert!(finished.is_some(), "guest did not finish within {timeout:?}; console:\n{console}");
    (exit.reason, console)
}
