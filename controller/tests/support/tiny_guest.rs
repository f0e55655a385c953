//! Tiny long-mode test guests (from `tests/guests/*.S`, assembled once per test process) and the real
//! `ignite` binary, for supervisor tests on real /dev/kvm.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use vmm_core::VmConfig;

/// The marker the idle guest prints before idling.
pub const IDLE_MARKER: &str = "SUPERVISOR-GUEST-UP";
/// The marker the exit-code guest prints before powering off.
pub const EXIT_MARKER: &str = "SUPERVISOR-GUEST-EXIT";
/// The marker the flood guest prints first.
pub const FLOOD_MARKER: &str = "FLOOD-START";
/// The code the exit-code guest powers off with.
pub const EXIT_CODE: i32 = 42;

/// Why a real-KVM test cannot run here, or `None` when it can.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => None,
        Err(err) => Some(format!("/dev/kvm cannot be opened ({err})")),
    }
}

fn guest_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("ignite-tiny-guests").tempdir().unwrap().keep();
        for name in ["serial_idle", "exit_code", "serial_flood", "serial_counter", "template_ready"] {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests").join(format!("{name}.S"));
            let obj = dir.join(format!("{name}.o"));
            run(Command::new("as").arg("--64").arg("-o").arg(&obj).arg(&src));
            // -N: one RWX segment starting exactly at 1 MiB.
            run(Command::new("ld")
                .args(["-m", "elf_x86_64", "-N", "-Ttext=0x100000", "-e", "_start", "-o"])
                .arg(dir.join(format!("{name}.elf")))
                .arg(&obj));
        }
        dir
    })
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils)"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn config(kernel: PathBuf) -> VmConfig {
    let mut config = VmConfig::new(kernel);
    config.memory_mib = 32;
    config.rng = false;
    config
}

/// A guest that prints [`IDLE_MARKER`] and then idles until stopped.
pub fn idle_guest() -> VmConfig {
    config(guest_dir().join("serial_idle.elf"))
}

/// A guest that prints [`EXIT_MARKER`] and powers off with [`EXIT_CODE`].
pub fn exit_code_guest() -> VmConfig {
    config(guest_dir().join("exit_code.elf"))
}

/// The prefix of each line the counter guest prints (`COUNT ` and 16 hex digits).
pub const COUNT_PREFIX: &str = "COUNT ";

/// A guest that counts in a register and in memory, checks that both agree, and prints
/// `COUNT <hex>` a few times a second until stopped (`COUNT-MISMATCH` and a halt if they differ).
pub fn counter_guest() -> VmConfig {
    config(guest_dir().join("serial_counter.elf"))
}

/// The counts a counter guest's console shows, in order.
pub fn counts(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.strip_prefix(COUNT_PREFIX))
        .filter_map(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .collect()
}

/// A guest that prints a warm-start template's ready line (`guest_api::warm::TEMPLATE_READY`) and
/// idles: the host side of a template build, without a Linux boot.
pub fn template_ready_guest() -> VmConfig {
    config(guest_dir().join("template_ready.elf"))
}

/// A guest that prints [`FLOOD_MARKER`], then 64-byte lines to its console until stopped.
pub fn flood_guest() -> VmConfig {
    config(guest_dir().join("serial_flood.elf"))
}

/// The `ignite` binary of this workspace, built once per test process (`cargo build -p ignite`).
pub fn ignite_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned();
        run(Command::new(env!("CARGO")).args(["build", "-q", "-p", "ignite"]).current_dir(&workspace));
        // The test binary is <target>/debug/deps/<test>; the CLI is <target>/debug/ignite.
        let exe = std::env::current_exe().unwrap();
        let bin = exe.parent().unwrap().parent().unwrap().join("ignite");
        assert!(bin.exists(), "ignite binary not found at {}", bin.display());
        bin
    })
    .clone()
}
