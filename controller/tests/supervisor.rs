//! The VM process supervisor on real /dev/kvm with the real `ignite` binary and tiny guests: spawn,
//! control, exits (clean, guest code, kill -9), daemon restart and re-adoption, impostor pid files,
//! zombies and cleanup.

mod support;

use std::path::Path;
use std::time::Duration;

use controller::supervisor::{Supervisor, SupervisorConfig};
use support::supervised::{self, console, proc_state};
use support::tiny_guest::{self, EXIT_CODE, EXIT_MARKER, IDLE_MARKER};
use vmm_core::control::VmState;
use vmm_core::ExitReason;

/// A hang guard only: every wait below normally ends in well under a second.
const HANG_GUARD: Duration = Duration::from_secs(60);

macro_rules! require_kvm {
    ($test:literal) => {
        if let Some(reason) = tiny_guest::kvm_unavailable() {
            eprintln!("SKIP {}: {reason}", $test);
            return;
        }
    };
}

fn supervisor(run_dir: &Path) -> Supervisor {
    Supervisor::new(SupervisorConfig::new(run_dir.to_owned(), tiny_guest::ignite_bin())).unwrap()
}

#[test]
fn spawn_control_and_stop_report_the_exit_and_cleanup_leaves_nothing() {
    require_kvm!("spawn_control_and_stop_report_the_exit_and_cleanup_leaves_nothing");
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(dir.path());
    let mut exits = sup.exits().unwrap();
    let mut config = tiny_guest::idle_guest();
    // Wherever the caller puts it, the vsock socket goes to the run directory.
    config.vsock = Some(vmm_core::VsockConfig { guest_cid: 3, uds_path: "/nonexistent/v.sock".into() });
    let info = sup.spawn("web", &config).unwrap();
    assert!(info.started_at > 0);
    supervised::wait_for(HANG_GUARD, "the guest marker", || console(&sup, "web").contains(IDLE_MARKER));
    assert!(sup.is_running("web"));
    let vm = sup.vm_dir("web");
    for file in [vm.config(), vm.console_log(), vm.pid(), vm.vmm_log()].iter().chain(&vm.sockets()) {
        assert!(file.exists(), "{} missing", file.display());
    }
    // Its own process group, so a Ctrl-C to the daemon does not reach it.
    assert_eq!(
        rustix::process::getpgid(rustix::process::Pid::from_raw(info.pid)).unwrap().as_raw_nonzero().get(),
        info.pid
    );

    let status = sup.status("web").unwrap();
    assert_eq!(status.state, VmState::Running);
    assert!(status.counters["exits"].as_u64().unwrap() > 0, "{status:?}");
    sup.pause("web").unwrap();
    assert_eq!(sup.status("web").unwrap().state, VmState::Paused);
    sup.resume("web").unwrap();
    assert_eq!(sup.status("web").unwrap().state, VmState::Running);
    assert!(sup.cleanup("web").is_err(), "cleanup refuses a live vm");

    // The idle guest ignores Ctrl-Alt-Del: the stop is forced after the grace period.
    sup.stop("web", Duration::from_millis(200)).unwrap();
    let exit = supervised::next_exit(&mut exits, HANG_GUARD);
    assert_eq!((exit.name.as_str(), &exit.reason, exit.code), ("web", &ExitReason::Stopped, Some(130)));
    assert!(exit.console_tail.contains(IDLE_MARKER), "{exit:?}");
    assert!(!sup.is_running("web"));
    for socket in sup.vm_dir("web").sockets() {
        assert!(!socket.exists(), "{} removed on exit", socket.display());
    }
    assert_eq!(proc_state(info.pid), None, "the vmm process was reaped (no zombie)");
    sup.cleanup("web").unwrap();
    sup.cleanup("web").unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "run dir is empty");
}

#[test]
fn a_kill_during_a_long_graceful_stop_ends_the_vm_at_once() {
    require_kvm!("a_kill_during_a_long_graceful_stop_ends_the_vm_at_once");
    let dir = tempfile::tempdir().unwrap();
    let sup = std::sync::Arc::new(supervisor(dir.path()));
    let mut exits = sup.exits().unwrap();
    sup.spawn("slow", &tiny_guest::idle_guest()).unwrap();
    supervised::wait_for(HANG_GUARD, "the guest marker", || console(&sup, "slow").contains(IDLE_MARKER));
    // The idle guest ignores Ctrl-Alt-Del, so this stop would take ten minutes...
    let stopper = sup.clone();
    let graceful = std::thread::spawn(move || stopper.stop("slow", Duration::from_secs(600)));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sup.status("slow").unwrap().state, VmState::Running, "the control socket answers during the stop");
    // ...but the control socket still answers, and a kill ends the VM now.
    sup.stop("slow", Duration::ZERO).unwrap();
    let exit = supervised::next_exit(&mut exits, HANG_GUARD);
    assert_eq!((exit.name.as_str(), &exit.reason), ("slow", &ExitReason::Stopped));
    // The graceful stop returns too, instead of waiting out its ten minutes.
    graceful.join().unwrap().unwrap();
    sup.cleanup("slow").unwrap();
}

#[test]
fn the_guest_exit_code_is_reported() {
    require_kvm!("the_guest_exit_code_is_reported");
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(dir.path());
    let mut exits = sup.exits().unwrap();
    let info = sup.spawn("job", &tiny_guest::exit_code_guest()).unwrap();
    let exit = supervised::next_exit(&mut exits, HANG_GUARD);
    assert_eq!(exit.reason, ExitReason::PowerOff { code: EXIT_CODE as u8 });
    assert_eq!(exit.code, Some(EXIT_CODE));
    assert!(exit.console_tail.contains(EXIT_MARKER), "{exit:?}");
    assert_eq!(proc_state(info.pid), None, "no zombie");
    assert!(matches!(sup.stop("job", Duration::ZERO), Err(controller::supervisor::SupervisorError::NotRunning(_))));
}

#[test]
fn kill_9_of_the_vm_process_is_reported_as_a_crash() {
    require_kvm!("kill_9_of_the_vm_process_is_reported_as_a_crash");
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(dir.path());
    let mut exits = sup.exits().unwrap();
    let info = sup.spawn("victim", &tiny_guest::idle_guest()).unwrap();
    supervised::wait_for(HANG_GUARD, "the guest marker", || console(&sup, "victim").contains(IDLE_MARKER));
    rustix::process::kill_process(rustix::process::Pid::from_raw(info.pid).unwrap(), rustix::process::Signal::KILL)
        .unwrap();
    let exit = supervised::next_exit(&mut exits, HANG_GUARD);
    assert!(matches!(&exit.reason, ExitReason::Crash { detail } if detail.contains("signal 9")), "{exit:?}");
    assert_eq!((exit.signal, exit.code), (Some(9), None));
    // A jailed VMM opens its exit file before it drops its privileges: killed, it leaves it empty.
    let record = std::fs::read(sup.vm_dir("victim").exit_record()).unwrap_or_default();
    assert!(record.is_empty(), "no exit record: {}", String::from_utf8_lossy(&record));
    assert_eq!(proc_state(info.pid), None, "no zombie");
    // Even after kill -9 (the supervisor removes the sockets), cleanup removes everything.
    sup.cleanup("victim").unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_restarted_daemon_adopts_running_vms_and_learns_how_the_others_ended() {
    require_kvm!("a_restarted_daemon_adopts_running_vms_and_learns_how_the_others_ended");
    let dir = tempfile::tempdir().unwrap();
    let first = supervisor(dir.path());
    let keeper = first.spawn("keeper", &tiny_guest::idle_guest()).unwrap();
    let goner = first.spawn("goner", &tiny_guest::idle_guest()).unwrap();
    supervised::wait_for(HANG_GUARD, "both markers", || {
        console(&first, "keeper").contains(IDLE_MARKER) && console(&first, "goner").contains(IDLE_MARKER)
    });
    // The daemon goes away; the VMs keep running.
    drop(first);
    assert!(matches!(proc_state(keeper.pid), Some(s) if s != 'Z'));

    // While no supervisor is alive, "goner" is killed through its control socket; its VMM records that.
    let mut socket = std::os::unix::net::UnixStream::connect(dir.path().join("goner/control.sock")).unwrap();
    std::io::Write::write_all(&mut socket, b"{\"op\":\"kill\"}\n").unwrap();
    let mut reply = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(socket), &mut reply).unwrap();
    assert!(reply.contains("\"ok\":true"), "{reply}");
    supervised::wait_for(HANG_GUARD, "goner to end", || proc_state(goner.pid) == Some('Z'));

    // An impostor: a pid file naming an unrelated live process with its real start time.
    let mut sleep = std::process::Command::new("sleep").arg("600").spawn().unwrap();
    let sleep_pid = sleep.id() as i32;
    let stat = std::fs::read_to_string(format!("/proc/{sleep_pid}/stat")).unwrap();
    let started_at = stat[stat.rfind(')').unwrap() + 1..].split_whitespace().nth(19).unwrap().to_string();
    std::fs::create_dir(dir.path().join("impostor")).unwrap();
    std::fs::write(dir.path().join("impostor/pid"), format!("{sleep_pid} {started_at}\n")).unwrap();

    let second = supervisor(dir.path());
    let mut exits = second.exits().unwrap();
    let orphans = second.list_orphans(&["goner".into()]).unwrap();
    assert_eq!(orphans.dirs, ["impostor", "keeper"]);
    assert_eq!(orphans.processes, [(keeper.pid, "keeper".to_string())]);

    let report = second.adopt().unwrap();
    assert_eq!(report.adopted, ["keeper"]);
    assert_eq!(report.stale, ["impostor"], "an unrelated process is never adopted");
    assert_eq!(report.exited.len(), 1, "{report:?}");
    assert_eq!(report.exited[0].name, "goner");
    assert_eq!(report.exited[0].reason, ExitReason::Stopped);
    assert_eq!(report.exited[0].code, Some(130));
    assert_eq!(proc_state(goner.pid), None, "the ended vm was reaped");
    assert!(!second.is_running("impostor"));
    assert!(matches!(proc_state(sleep_pid), Some(s) if s != 'Z'), "the impostor was left alone");
    sleep.kill().unwrap();
    sleep.wait().unwrap();

    assert!(second.is_running("keeper"));
    assert_eq!(second.status("keeper").unwrap().state, VmState::Running);
    second.stop("keeper", Duration::from_millis(100)).unwrap();
    let exit = supervised::next_exit(&mut exits, HANG_GUARD);
    assert_eq!((exit.name.as_str(), exit.reason), ("keeper", ExitReason::Stopped));
    assert_eq!(proc_state(keeper.pid), None, "no zombie");
    for name in ["keeper", "goner", "impostor"] {
        second.cleanup(name).unwrap();
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// Set in the helper process that plays a daemon for the SIGKILL test.
const DAEMON_DIR_ENV: &str = "IGNITE_SUPERVISOR_TEST_DAEMON_DIR";
const DAEMON_BIN_ENV: &str = "IGNITE_SUPERVISOR_TEST_IGNITE_BIN";

/// Not a test on its own: the "daemon" process of `a_daemon_killed_with_sigkill_leaves_its_vm_running`.
#[test]
fn helper_daemon_process() {
    let (Ok(run_dir), Ok(bin)) = (std::env::var(DAEMON_DIR_ENV), std::env::var(DAEMON_BIN_ENV)) else { return };
    let sup = Supervisor::new(SupervisorConfig::new(run_dir.into(), bin.into())).unwrap();
    sup.spawn("survivor", &tiny_guest::idle_guest()).unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn a_daemon_killed_with_sigkill_leaves_its_vm_running_for_the_next_one() {
    require_kvm!("a_daemon_killed_with_sigkill_leaves_its_vm_running_for_the_next_one");
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_daemon_process", "--nocapture", "--test-threads=1"])
        .env(DAEMON_DIR_ENV, dir.path())
        .env(DAEMON_BIN_ENV, tiny_guest::ignite_bin())
        .spawn()
        .unwrap();
    let console_path = dir.path().join("survivor/console.log");
    supervised::wait_for(HANG_GUARD, "the survivor's marker", || {
        std::fs::read_to_string(&console_path).unwrap_or_default().contains(IDLE_MARKER)
            && dir.path().join("survivor/pid").exists()
    });
    daemon.kill().unwrap(); // SIGKILL
    daemon.wait().unwrap();

    // The VM is no child of ours: the new supervisor watches it through its pidfd alone.
    let sup = supervisor(dir.path());
    let mut exits = sup.exits().unwrap();
    assert_eq!(sup.adopt().unwrap().adopted, ["survivor"]);
    assert_eq!(sup.status("survivor").unwrap().state, VmState::Running);
    sup.kill("survivor").unwrap();
    let exit = supervised::next_exit(&mut exits, HANG_GUARD);
    assert_eq!((exit.name.as_str(), exit.reason, exit.code), ("survivor", ExitReason::Stopped, Some(130)));
    sup.cleanup("survivor").unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
