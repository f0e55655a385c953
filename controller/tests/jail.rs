//! Jailed VMMs on real /dev/kvm with the real `ignite` binary and tiny guests: what the kernel says
//! about the process (uid, capabilities, no_new_privs, seccomp on every thread, namespaces, root,
//! environment, cgroup limits), uid allocation across VMs and restarts, cleanup after a crash, and the
//! console log cap against a flooding guest.

mod support;

use std::path::Path;
use std::time::Duration;

use controller::supervisor::{Supervisor, SupervisorConfig};
use support::supervised::{self, console, next_exit, proc_state};
use support::tiny_guest::{self, FLOOD_MARKER, IDLE_MARKER};

/// A hang guard only.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// Why these tests cannot run here, or `None`.
fn unavailable() -> Option<String> {
    if let Some(reason) = tiny_guest::kvm_unavailable() {
        return Some(reason);
    }
    if !vmm_core::jail::is_root() {
        return Some("jailing a VMM needs root".into());
    }
    None
}

macro_rules! require_jail {
    ($test:literal) => {
        if let Some(reason) = unavailable() {
            eprintln!("SKIP {}: {reason}", $test);
            return;
        }
    };
}

/// The value of `field` in /proc/PID/status (or of a thread's status file).
fn status_field(status_file: &Path, field: &str) -> String {
    let text = std::fs::read_to_string(status_file).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {}", status_file.display()))
        .trim()
        .to_string()
}

fn ns(pid: &str, kind: &str) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

#[test]
fn a_jailed_vmm_holds_no_privilege_and_sees_only_its_jail() {
    require_jail!("a_jailed_vmm_holds_no_privilege_and_sees_only_its_jail");
    let dir = tempfile::tempdir().unwrap();
    let sup = Supervisor::new(SupervisorConfig::new(dir.path().join("vms"), tiny_guest::ignite_bin())).unwrap();
    let mut exits = sup.exits().unwrap();
    let info = sup.spawn("web", &tiny_guest::idle_guest()).unwrap();
    supervised::wait_for(HANG_GUARD, "the guest marker", || console(&sup, "web").contains(IDLE_MARKER));
    let pid = info.pid.to_string();
    let status = Path::new("/proc").join(&pid).join("status");

    let uids: Vec<u32> = status_field(&status, "Uid").split_whitespace().map(|u| u.parse().unwrap()).collect();
    assert!(uids.iter().all(|&u| u == uids[0] && controller::supervisor::DEFAULT_UIDS.contains(&u)), "{uids:?}");
    let gids: Vec<u32> = status_field(&status, "Gid").split_whitespace().map(|u| u.parse().unwrap()).collect();
    assert!(gids.iter().all(|&g| g == uids[0]), "{gids:?}");
    assert_eq!(status_field(&status, "Groups"), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(&status, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), "1");
    // Every thread, not only the main one, runs under a filter.
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten().collect();
    assert!(tasks.len() >= 3, "main, vcpu, devices and control threads: {}", tasks.len());
    for task in &tasks {
        let status = task.path().join("status");
        assert_eq!(
            status_field(&status, "Seccomp"),
            "2",
            "{}",
            std::fs::read_to_string(task.path().join("comm")).unwrap()
        );
    }

    for kind in ["mnt", "pid", "ipc", "uts"] {
        assert_ne!(ns(&pid, kind), ns("self", kind), "the vmm has its own {kind} namespace");
    }
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("NSpid:"))
            .unwrap()
            .split_whitespace()
            .last(),
        Some("1"),
        "it is PID 1 of its namespace"
    );

    // Its root is the jail: a few device nodes and nothing of the host.
    let root = Path::new("/proc").join(&pid).join("root");
    let mut entries: Vec<String> =
        std::fs::read_dir(&root).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    entries.sort();
    assert_eq!(entries, vec!["dev"]);
    assert!(!root.join("etc/shadow").exists());
    assert!(root.join("dev/kvm").exists());

    // A clean environment: nothing of the daemon's.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(!environ.contains("CARGO") && !environ.contains("PATH="), "{environ}");

    // Only the VM's own descriptors: no inherited sockets or files of the daemon (this test).
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let target = std::fs::read_link(fd.path()).unwrap_or_default().to_string_lossy().into_owned();
        assert!(!target.contains("ignite-tiny-guests") || target.ends_with(".elf"), "unexpected descriptor {target}");
    }

    if let Some(cgroups) = sup.cgroups() {
        let memory = cgroups.memory_limit("web").expect("a memory limit");
        assert_eq!(memory, (32 << 20) + vmm_core::jail::DEFAULT_VMM_ALLOWANCE);
        assert_eq!(cgroups.pids_limit("web"), Some(1 + vmm_core::jail::VMM_EXTRA_THREADS));
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(own.lines().filter(|l| l.contains("/ignite/") && l.ends_with("/web")).count() >= 3, "{own}");
        eprintln!("cgroups {} with a memory limit of {memory} bytes", cgroups.version);
    } else {
        eprintln!("NOTE: no usable cgroups on this host; the cgroup part of this test did not run");
    }

    sup.stop("web", Duration::from_secs(5)).unwrap();
    let exit = next_exit(&mut exits, HANG_GUARD);
    assert_eq!(exit.reason, vmm_core::ExitReason::Stopped, "{exit:?}");
    sup.cleanup("web").unwrap();
    assert!(!sup.vm_dir("web").path().exists());
    if let Some(cgroups) = sup.cgroups() {
        assert!(!cgroups.names().contains(&"web".to_string()), "the cgroup goes with the vm");
    }
}

#[test]
fn uids_are_per_vm_kept_across_a_supervisor_restart_and_freed_after_a_crash() {
    require_jail!("uids_are_per_vm_kept_across_a_supervisor_restart_and_freed_after_a_crash");
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("vms");
    let uid_of = |pid: i32| -> String {
        status_field(&Path::new("/proc").join(pid.to_string()).join("status"), "Uid")
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let sup = Supervisor::new(SupervisorConfig::new(run_dir.clone(), tiny_guest::ignite_bin())).unwrap();
    let a = sup.spawn("a", &tiny_guest::idle_guest()).unwrap();
    let b = sup.spawn("b", &tiny_guest::idle_guest()).unwrap();
    supervised::wait_for(HANG_GUARD, "both guests", || {
        console(&sup, "a").contains(IDLE_MARKER) && console(&sup, "b").contains(IDLE_MARKER)
    });
    let (uid_a, uid_b) = (uid_of(a.pid), uid_of(b.pid));
    assert_ne!(uid_a, uid_b, "two live VMs never share a uid");

    // The daemon "crashes": its supervisor goes away, then VM a's process is SIGKILLed.
    drop(sup);
    kill9(a.pid);
    let sup = Supervisor::new(SupervisorConfig::new(run_dir.clone(), tiny_guest::ignite_bin())).unwrap();
    let mut exits = sup.exits().unwrap();
    supervised::wait_for(HANG_GUARD, "vm a's process to end", || {
        !Path::new(&format!("/proc/{}", a.pid)).exists() || proc_state(a.pid) == Some('Z')
    });
    let report = sup.adopt().unwrap();
    assert_eq!(report.adopted, vec!["b".to_string()]);
    assert_eq!(uid_of(b.pid), uid_b);

    // A restarted VM keeps its uid.
    let a2 = sup.spawn("a", &tiny_guest::idle_guest()).unwrap();
    // The console log is appended to across restarts: the second marker is this run's.
    supervised::wait_for(HANG_GUARD, "vm a again", || console(&sup, "a").matches(IDLE_MARKER).count() == 2);
    assert_eq!(uid_of(a2.pid), uid_a);

    // Deleting b frees its uid, run directory and cgroup; a new VM may take the uid.
    sup.kill("b").unwrap();
    next_exit(&mut exits, HANG_GUARD);
    sup.cleanup("b").unwrap();
    assert!(!sup.vm_dir("b").path().exists());
    let c = sup.spawn("c", &tiny_guest::idle_guest()).unwrap();
    supervised::wait_for(HANG_GUARD, "vm c", || console(&sup, "c").contains(IDLE_MARKER));
    assert_eq!(uid_of(c.pid), uid_b, "the lowest free uid is b's old one");

    // A cgroup whose run directory is gone (a crash between the two removals) is an orphan to clean.
    for vm in ["a", "c"] {
        sup.kill(vm).unwrap();
        next_exit(&mut exits, HANG_GUARD);
    }
    if let Some(cgroups) = sup.cgroups() {
        std::fs::remove_dir_all(sup.vm_dir("c").path()).unwrap();
        let orphans = sup.list_orphans(&["a".to_string()]).unwrap();
        assert_eq!(orphans.dirs, vec!["c".to_string()]);
        sup.cleanup("c").unwrap();
        assert!(!cgroups.names().contains(&"c".to_string()));
    }
    sup.cleanup("a").unwrap();
    sup.cleanup("c").unwrap();
}

#[test]
fn a_flooding_guest_leaves_its_console_log_within_the_cap() {
    require_jail!("a_flooding_guest_leaves_its_console_log_within_the_cap");
    const CAP: u64 = 16 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let mut config = SupervisorConfig::new(dir.path().join("vms"), tiny_guest::ignite_bin());
    config.log_max_bytes = CAP;
    let sup = Supervisor::new(config).unwrap();
    let mut exits = sup.exits().unwrap();
    sup.spawn("flood", &tiny_guest::flood_guest()).unwrap();
    let log = sup.vm_dir("flood").console_log();
    let old = log.with_extension("log.1");
    // An attached console client (`ignite attach`) gets the output too: the vCPU thread writes to it.
    let socket = sup.vm_dir("flood").console_socket();
    supervised::wait_for(HANG_GUARD, "the console socket", || socket.exists());
    let mut attached = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    attached.set_read_timeout(Some(HANG_GUARD)).unwrap();
    let mut seen = 0;
    let mut buf = [0u8; 4096];
    while seen < 4 * CAP {
        let n = std::io::Read::read(&mut attached, &mut buf).unwrap();
        let vmm_log = || std::fs::read_to_string(sup.vm_dir("flood").vmm_log()).unwrap_or_default();
        assert!(n > 0, "the console closed after {seen} bytes; vmm.log: {}", vmm_log());
        assert!(buf[..n].iter().all(|b| *b == b'F' || *b == b'\n' || FLOOD_MARKER.as_bytes().contains(b)));
        seen += n as u64;
    }
    // Rotated at least twice: the old file holds lines only (the start marker rotated away).
    supervised::wait_for(HANG_GUARD, "two rotations", || {
        std::fs::read_to_string(&old).is_ok_and(|t| t.len() as u64 > CAP / 2 && !t.contains(FLOOD_MARKER))
    });
    for file in [&log, &old] {
        let len = std::fs::metadata(file).unwrap().len();
        assert!(len <= CAP, "{} is {len} bytes, over the {CAP}-byte cap", file.display());
    }
    sup.kill("flood").unwrap();
    next_exit(&mut exits, HANG_GUARD);
    sup.cleanup("flood").unwrap();
}

/// SIGKILL to `pid`, through kill(1) (this crate forbids unsafe code).
fn kill9(pid: i32) {
    let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill -9 {pid}");
}

/// The children of `pid` (from /proc; empty once it is gone).
fn children(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.flatten().collect()).unwrap_or(Vec::new());
    tasks
        .iter()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| c.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

/// Starts `ignite vmm run` by hand (jailed: the test runs as root) on the idle guest, and returns it
/// with the jailed VMM's pid once the guest prints its marker.
fn manual_vmm(dir: &Path, name: &str) -> (std::process::Child, u32) {
    let mut config = tiny_guest::idle_guest();
    let console = dir.join(format!("{name}.console"));
    config.console = vmm_core::ConsoleConfig::File(console.clone());
    let file = dir.join(format!("{name}.json"));
    std::fs::write(&file, serde_json::to_vec(&config).unwrap()).unwrap();
    let launcher = std::process::Command::new(tiny_guest::ignite_bin())
        .args(["vmm", "run", "--stop-timeout", "1", "--config"])
        .arg(&file)
        .spawn()
        .unwrap();
    let mut vmm = None;
    supervised::wait_for(HANG_GUARD, "the hand-started guest's marker", || {
        vmm = children(launcher.id()).first().copied();
        std::fs::read_to_string(&console).unwrap_or_default().contains(IDLE_MARKER)
    });
    (launcher, vmm.expect("the launcher's jailed child"))
}

#[test]
fn a_killed_launcher_leaves_no_vmm_config_file_or_cgroup_behind() {
    require_jail!("a_killed_launcher_leaves_no_vmm_config_file_or_cgroup_behind");
    let dir = tempfile::tempdir().unwrap();
    let (mut launcher, vmm) = manual_vmm(dir.path(), "first");
    let name = format!("manual-{}", launcher.id());
    let config_file = Path::new("/run/ignite").join(format!("jail-{}.json", launcher.id()));
    assert!(!config_file.exists(), "the jailed vmm removes its config file once read");
    let cgroups = vmm_core::jail::cgroup::Cgroups::detect("manual");
    if let Some(cgroups) = &cgroups {
        assert!(cgroups.dirs(&name).iter().all(|d| d.is_dir()), "the vmm runs in its cgroup {name}");
    }
    // SIGKILL: the launcher cannot clean up; its VMM notices the lifeline and stops by itself.
    kill9(i32::try_from(launcher.id()).unwrap());
    launcher.wait().unwrap();
    supervised::wait_for(HANG_GUARD, "the orphaned vmm to stop", || proc_state(vmm as i32).is_none_or(|s| s == 'Z'));
    // The next hand-started VMM sweeps the dead launcher's cgroup.
    let (mut second, _) = manual_vmm(dir.path(), "second");
    if let Some(cgroups) = &cgroups {
        assert!(cgroups.dirs(&name).iter().all(|d| !d.exists()), "the dead launcher's cgroup {name} is swept");
        assert!(cgroups.names().contains(&format!("manual-{}", second.id())), "{:?}", cgroups.names());
    } else {
        eprintln!("note: no usable cgroups on this host, the sweep is not checked");
    }
    // SIGTERM: a graceful stop, after which the launcher removes its own cgroup.
    let status = std::process::Command::new("kill").arg(second.id().to_string()).status().unwrap();
    assert!(status.success());
    let code = second.wait().unwrap();
    assert_eq!(code.code(), Some(i32::from(vmm_core::process::EXIT_STOPPED)), "{code:?}");
    if let Some(cgroups) = &cgroups {
        assert!(!cgroups.names().contains(&format!("manual-{}", second.id())), "{:?}", cgroups.names());
    }
}
