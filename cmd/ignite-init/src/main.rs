//! `ignite-init`: PID 1 inside every ignite guest. Mounts the pseudo filesystems (what a normal boot
//! gives: devpts, /dev/shm, /dev/mqueue, cgroup2), brings loopback up, sets resource limits, reads the VM's config
//! drive, sets hostname and name resolution, writes ssh keys and copied files, runs the image's
//! entrypoint (merged with the VM's overrides) as a child and, for Kubernetes nodes, `kubeadm join`
//! and the kubelet alongside it (`ignite_init::node`), reaps children, forwards signals, then reports the main process's exit on the console (`ignite-init: exit
//! status=N` or `signal=S`) and powers the VM off through the ignite power port (0xf4), falling back to
//! a reset.
//!
//! Started as `/init` from the host's initramfs with `ignite.template=1` on the kernel command line, it
//! is a warm-start template instead ([`warm`]): it waits for the identity of the VM a restored copy
//! becomes, then switches root to that VM's disk and execs the disk's `ignite-init`, which boots as above.

mod registered;
mod setup;
mod supervise;
mod vsock_agent;
mod warm;

use guest_api::boot::{exit_status_line, CONSOLE_PREFIX};
use ignite_init::{spec, sys};

/// Writes one `ignite-init:`-prefixed line to the console.
fn log(msg: &str) {
    eprintln!("{CONSOLE_PREFIX}{msg}");
}

fn main() {
    if std::process::id() != 1 {
        log("must run as PID 1 (the kernel's init=) inside an ignite guest");
        std::process::exit(2);
    }
    let code = match run() {
        Ok(exit) => {
            match exit {
                sys::Exit::Status(s) => log(&exit_status_line(s)),
                sys::Exit::Signal(s) => log(&format!("exit signal={s}")),
            }
            exit.code()
        }
        Err((msg, code)) => {
            log(&format!("error: {msg}"));
            log(&exit_status_line(code));
            code
        }
    };
    sys::sync();
    let err = sys::power_off(code);
    log(&format!("cannot power off: {err}"));
    // PID 1 must never exit (the kernel would panic); wait for the host to end the VM.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Everything up to the main process's end; errors carry the status to report.
fn run() -> Result<sys::Exit, (String, u8)> {
    let fail = |msg: String| (msg, 127);
    if warm::template_mode() {
        // Returns only when the root switch to the VM's disk failed.
        return Err(fail(warm::run()));
    }
    sys::mask_handled(true).map_err(|e| fail(format!("cannot block signals: {e}")))?;
    setup::mount_pseudo_filesystems().map_err(fail)?;
    setup::loopback_up();
    // Before any child starts: they all inherit the limits.
    setup::set_rlimits();
    if let Err(e) = sys::disable_ctrl_alt_del() {
        log(&format!("cannot route Ctrl-Alt-Del to init: {e}"));
    }
    let vm = setup::load_guest_config().map_err(fail)?;
    let image = setup::load_image_config().map_err(fail)?;
    let spec = spec::merge(&image, &vm).map_err(|e| fail(e.to_string()))?;
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let user = spec::resolve_user(&spec.user, &passwd, &group).map_err(|e| fail(e.to_string()))?;
    let root_home = spec::resolve_user("0", &passwd, &group).map(|u| u.home).unwrap_or_else(|_| "/root".into());
    setup::network_identity(&vm);
    setup::write_files(&vm, if root_home == "/" { "/root" } else { &root_home }).map_err(fail)?;
    log(&format!("starting {:?} as {} in {}", spec.argv, spec.user, spec.working_dir));
    // `ignite exec` runs as the main process's user by default; HOME follows the user it runs as.
    let env = spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vsock_agent::start(ignite_init::agent::ExecDefaults {
        env,
        cwd: spec.working_dir.clone(),
        user: spec.user.clone(),
    });
    // The entrypoint first: on a node image it is the container runtime kubeadm join needs.
    let main = supervise::spawn(&spec, &user)?;
    let node = vm.join.and_then(|join| {
        let console: ignite_init::node::Log = std::sync::Arc::new(|line: &str| log(line));
        let children = std::sync::Arc::new(registered::Reaped);
        let started = ignite_init::node::Node::start("/".into(), join, children, Default::default(), console);
        started.map_err(|e| log(&format!("kubernetes: cannot start the node bootstrap: {e}"))).ok()
    });
    let stop_node = || {
        if let Some(node) = &node {
            log("stop requested: SIGTERM to the kubelet");
            node.stop();
        }
    };
    Ok(supervise::supervise(main, &stop_node))
}
