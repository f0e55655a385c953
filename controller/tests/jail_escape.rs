//! Escape attempts from inside a jailed VMM (the debug-build test hook makes its device thread try
//! them): opening a host file, exec'ing a shell and ptrace'ing are each killed by seccomp, reported
//! with the call and the thread, while another VM keeps running. One test in its own binary, because
//! the hook is chosen through this process's environment.

mod support;

use std::time::Duration;

use controller::supervisor::{Supervisor, SupervisorConfig};
use support::supervised::{self, console, next_exit};
use support::tiny_guest::{self, IDLE_MARKER};
use vmm_core::jail::escape_test;

const HANG_GUARD: Duration = Duration::from_secs(120);

#[test]
fn escape_attempts_from_a_device_thread_are_killed_by_seccomp_and_reported() {
    if let Some(reason) = tiny_guest::kvm_unavailable() {
        eprintln!("SKIP escape_attempts_from_a_device_thread_are_killed_by_seccomp_and_reported: {reason}");
        return;
    }
    if !vmm_core::jail::is_root() {
        eprintln!("SKIP escape_attempts_from_a_device_thread_are_killed_by_seccomp_and_reported: jailing needs root");
        return;
    }
    if !cfg!(debug_assertions) {
        eprintln!("SKIP escape_attempts...: the escape hook is compiled into debug builds only");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sup = Supervisor::new(SupervisorConfig::new(dir.path().join("vms"), tiny_guest::ignite_bin())).unwrap();
    let mut exits = sup.exits().unwrap();
    // A bystander started before the hook is set: it must outlive every attempt.
    sup.spawn("bystander", &tiny_guest::idle_guest()).unwrap();
    supervised::wait_for(HANG_GUARD, "the bystander", || console(&sup, "bystander").contains(IDLE_MARKER));

    for (attempt, call) in
        [("open", "syscall 257 (openat)"), ("exec", "syscall 59 (execve)"), ("ptrace", "syscall 101 (ptrace)")]
    {
        std::env::set_var(escape_test::ENV, attempt);
        let name = format!("escape-{attempt}");
        sup.spawn(&name, &tiny_guest::idle_guest()).unwrap();
        std::env::remove_var(escape_test::ENV);
        let exit = next_exit(&mut exits, HANG_GUARD);
        assert_eq!(exit.name, name);
        assert_eq!(exit.signal, Some(31), "killed by SIGSYS: {exit:?}");
        let vmm_core::ExitReason::Crash { detail } = &exit.reason else { panic!("{exit:?}") };
        assert_eq!(detail, &format!("the vmm process was killed by seccomp: {call} by the devices thread"));
        assert!(sup.is_running("bystander"), "the other VM keeps running");
        sup.cleanup(&name).unwrap();
        eprintln!("{attempt}: {detail}");
    }
    sup.kill("bystander").unwrap();
    next_exit(&mut exits, HANG_GUARD);
    sup.cleanup("bystander").unwrap();
}
