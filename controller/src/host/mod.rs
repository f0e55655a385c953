//! The real [`Runtime`]: the image store makes root disks, host networking gives each VM a tap,
//! a lease and its port forwards, a config drive carries the guest settings, and the supervisor
//! runs one `ignite vmm` process per VM.
//!
//! Layout under the root ([`crate::layout`]): `runtime/<vm>/` ([`crate::layout::RuntimeDir`]: what
//! was prepared, the last exit, the config drive; mode 0700) and the supervisor's `vms/<vm>/`
//! ([`crate::layout::VmDir`]: process files, console log). Every step is idempotent; `destroy`
//! removes whatever exists, in reverse order of creation, so a crash at any point is repaired by
//! running it again.

pub mod artifacts;
pub mod exits;
pub mod guest;
pub mod kubernetes;
pub mod prepared;
pub mod schedule;
pub mod snapshots;
pub mod templates;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use image_store::{Snapshotter, StorePaths};
use tracing::{info, warn};

use crate::api::Vm;
use crate::layout::RootLayout;
use crate::net::{self, HostNet, NetConfig};
use crate::reconcile::{Actual, Prepared, Runtime, RuntimeError, Started};
use crate::store::Store;
use crate::supervisor::{Supervisor, VmExit};
use guest_api::error_chain;

pub use artifacts::DefaultKernel;
pub use prepared::PreparedVm;

/// Configuration of the real runtime.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// The static `ignite-init` placed into every root disk (`None`: images bring their own init).
    pub init_bin: Option<PathBuf>,
    /// Kernel for VMs that name none.
    pub default_kernel: DefaultKernel,
    /// Host networking; `None` runs VMs without a network interface.
    pub net: Option<NetConfig>,
    /// Reach every registry over plain HTTP (loopback registries always are).
    pub insecure_registries: bool,
    /// vmm virtualization mode passed to every VM.
    pub virt_mode: vmm_core::VirtModeConfig,
    /// What manifests may name on this host: files (`--allow-host-path`) and ports.
    pub policy: crate::api::HostPolicy,
    /// Bounds on every image pull (`--image-pull-timeout` for the whole pull).
    pub pull_timeouts: image_store::pull::PullTimeouts,
    /// Start VMs from templates where they ask for it (`spec.boot: Warm`, the default) and build
    /// templates on first need; `false` (`--no-warm-start`) boots every VM cold.
    pub warm_start: bool,
    /// Where the devicemapper snapshotter's thin pool lives (`--dm-pool-data`,
    /// `--dm-pool-metadata`; by default sparse files in the store), where device-mapper is used.
    pub dm_pool: image_store::DmPoolConfig,
}

/// See the module docs.
pub struct HostRuntime {
    config: HostConfig,
    layout: RootLayout,
    paths: StorePaths,
    store: Store,
    snapshotter: Box<dyn Snapshotter>,
    net: Arc<dyn HostNet>,
    supervisor: Supervisor,
    /// VMs being stopped on purpose: their exit is not one the restart policy should see.
    stopping: Mutex<HashSet<String>>,
    /// Kubernetes access for `spec.bootstrap.kubernetes` (`None`: such VMs fail with a precise error).
    kube: Option<crate::kube::access::KubeAccess>,
    /// One lock per VM, held by start, stop, destroy and the snapshot operations, so a rollback or
    /// a snapshot never interleaves with the reconciler's steps on the same VM.
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// The warm-start templates (`None`: every VM boots cold).
    templates: Option<Arc<templates::Templates>>,
}

fn transient(reason: &'static str, what: String) -> impl FnOnce(&dyn std::error::Error) -> RuntimeError {
    move |e| RuntimeError::transient(reason, format!("{what}: {}", error_chain(e)))
}

impl HostRuntime {
    /// A runtime over the given parts, keeping its files under `layout`.
    pub fn new(
        layout: RootLayout,
        config: HostConfig,
        store: Store,
        snapshotter: Box<dyn Snapshotter>,
        net: Arc<dyn HostNet>,
        supervisor: Supervisor,
    ) -> Self {
        let paths = layout.store();
        HostRuntime {
            config,
            layout,
            paths,
            store,
            snapshotter,
            net,
            supervisor,
            stopping: Mutex::new(HashSet::new()),
            kube: None,
            locks: Mutex::new(HashMap::new()),
            templates: None,
        }
    }

    /// The same runtime with Kubernetes access: VMs with `spec.bootstrap.kubernetes` get bootstrap
    /// tokens and a join configuration, and their Nodes are deleted with them.
    pub fn with_kube(mut self, access: crate::kube::access::KubeAccess) -> Self {
        self.kube = Some(access);
        self
    }

    /// Starts VMs warm from `templates` (see [`templates`]).
    pub fn with_templates(mut self, templates: Arc<templates::Templates>) -> Self {
        self.templates = Some(templates);
        self
    }

    /// The supervisor (for exit notifications and control).
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    fn runtime_dir(&self) -> PathBuf {
        self.layout.runtime_dir()
    }

    fn load(&self, name: &str) -> Result<Option<PreparedVm>, RuntimeError> {
        prepared::load(&self.runtime_dir(), name)
            .map_err(|e| transient("StateCorrupt", format!("reading the prepared state of VM {name:?}"))(&e))
    }

    /// Records how a VM process ended (from the supervisor's exit stream or its adopt report),
    /// unless the VM was stopped on purpose or a newer process already runs. Returns whether the
    /// exit counts (the restart policy will see it): how it ended, translated once.
    pub fn record_exit(&self, exit: &VmExit) -> Option<crate::reconcile::Exit> {
        let deliberate = self.stopping.lock().unwrap_or_else(|p| p.into_inner()).remove(&exit.name);
        if deliberate || self.supervisor.is_running(&exit.name) {
            return None;
        }
        let summary = exits::exit_of(exit);
        if let Err(e) = exits::save(&prepared::dir(&self.runtime_dir(), &exit.name), &summary) {
            warn!(vm = exit.name, error = %e, "cannot record the VM's exit");
        }
        Some(summary)
    }

    /// VM `name`'s lock (see the `locks` field).
    fn vm_lock(&self, name: &str) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_string()).or_default().clone()
    }

    /// The template VM `vm` starts from (its key and directory), or why it boots cold (empty when it
    /// asked to, or warm start is off).
    fn warm_template(&self, vm: &Vm, prepared: &PreparedVm) -> Result<(String, PathBuf), String> {
        let Some(templates) = &self.templates else { return Err(String::new()) };
        if vm.spec.boot == crate::api::BootMode::Cold {
            return Err(String::new());
        }
        if vm.spec.kernel.cmdline.is_some() {
            return Err("spec.kernel.cmdline adds kernel arguments, and a template has booted with its own".into());
        }
        let shape = templates::TemplateShape {
            vcpus: vm.spec.cpus,
            memory_mib: u32::try_from(vm.spec.memory.mib()).unwrap_or(u32::MAX),
            network: prepared.tap.is_some(),
            virt_mode: self.config.virt_mode,
        };
        let (key, ..) = templates.key(&prepared.kernel, &shape).map_err(|e| error_chain(&e))?;
        if let Some(dir) = templates.ready(&key) {
            return Ok((key, dir));
        }
        if templates.is_building(&key) {
            return Err(format!("the template for this kernel and shape ({key}) is being built"));
        }
        if let Some(why) = templates.recent_failure(&key) {
            return Err(format!(
                "the template for this kernel and shape ({key}) failed to build, tried again later: {why}"
            ));
        }
        templates.build_in_background(prepared.kernel.clone(), shape);
        Err(format!("no template yet for this kernel and shape: building {key} now"))
    }

    /// Starts VM `name` from template `key` (directory `dir`) and hands the guest its identity.
    /// On failure the VMM is gone and the error says why, for the cold boot that follows.
    fn start_warm(
        &self,
        name: &str,
        config: &vmm_core::VmConfig,
        prepared: &PreparedVm,
        key: &str,
        dir: &std::path::Path,
    ) -> Result<crate::supervisor::ProcInfo, String> {
        let Some(templates) = &self.templates else { return Err(String::new()) };
        let mut warm = config.clone();
        warm.restore_from = Some(dir.to_path_buf());
        if let Err(e) = vmm_core::snapshot::load(dir).and_then(|l| l.check_fits(&warm)) {
            // Damaged, or taken on another CPU: it serves nobody; the next start builds it again.
            let _ = templates.remove(key);
            return Err(format!(
                "template {key} cannot serve ({}): removed, built again on next need",
                error_chain(&e)
            ));
        }
        let network = match (&prepared.mac, prepared.ip.as_deref().and_then(|ip| ip.parse().ok()), &self.config.net) {
            (Some(mac), Some(address), Some(net)) => Some(guest_api::warm::Network {
                mac: mac.clone(),
                address,
                prefix_len: net.subnet.prefix_len(),
                gateway: net.subnet.gateway(),
            }),
            _ => None,
        };
        let identity = templates::identity(&warm, network).map_err(|e| error_chain(&e))?;
        let info = self
            .supervisor
            .spawn(name, &warm)
            .map_err(|e| format!("starting its VMM from template {key}: {}", error_chain(&e)))?;
        let socket = self.supervisor.vm_dir(name).vsock_socket();
        let handed = std::time::Instant::now();
        match templates::send_identity(&socket, &identity, &|| self.supervisor.is_running(name)) {
            Ok(()) => {
                let identity_ms = handed.elapsed().as_millis();
                info!(vm = name, template = key, identity_ms, "started warm: the guest has its identity and disk");
                Ok(info)
            }
            Err(e) => {
                let console = std::fs::read(self.supervisor.vm_dir(name).console_log()).unwrap_or_default();
                let tail = templates::tail(&String::from_utf8_lossy(&console), 3);
                self.kill_quietly(name);
                Err(format!("warm start from template {key} failed: {e}; its console ended: {tail}"))
            }
        }
    }

    /// Kills VM `name`'s VMM without its exit counting for the restart policy: waits (briefly) for
    /// the exit to be seen, so the mark cannot swallow the exit of a VMM started after.
    fn kill_quietly(&self, name: &str) {
        self.mark_stopping(name);
        let _ = self.supervisor.kill(name);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline
            && self.stopping.lock().unwrap_or_else(|p| p.into_inner()).contains(name)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stopping.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        let _ = self.supervisor.cleanup(name);
    }

    fn mark_stopping(&self, name: &str) {
        self.stopping.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
    }

    /// Removes taps and port forwards whose VM is unknown (left by a crash). Returns what went.
    pub fn sweep_network_orphans(&self, known: &[String]) -> Vec<String> {
        let mut removed = Vec::new();
        if self.config.net.is_none() {
            return removed;
        }
        let wanted: Vec<String> = known.iter().map(|n| net::tap_name(n)).collect();
        match self.net.list_taps() {
            Ok(taps) => {
                for tap in taps.into_iter().filter(|t| !wanted.contains(t)) {
                    match self.net.delete_tap(&tap) {
                        Ok(()) => removed.push(format!("tap {tap}")),
                        Err(e) => warn!(tap, error = %error_chain(&e), "cannot remove an orphan tap"),
                    }
                }
            }
            Err(e) => warn!(error = %error_chain(&e), "cannot list taps"),
        }
        match self.net.list_port_forwards() {
            Ok(forwards) => {
                for vm in forwards.into_iter().map(|f| f.vm).filter(|vm| !known.contains(vm)) {
                    if self.net.remove_port_forwards(&vm).is_ok() {
                        removed.push(format!("port forwards of {vm}"));
                    }
                }
            }
            Err(e) => warn!(error = %error_chain(&e), "cannot list port forwards"),
        }
        removed.dedup();
        removed
    }
}

impl Runtime for HostRuntime {
    fn inspect(&self, name: &str) -> Result<Actual, RuntimeError> {
        let prepared = self.load(name)?;
        let running = self.supervisor.is_running(name);
        let dir = prepared::dir(&self.runtime_dir(), name);
        let last_exit = if running { None } else { exits::load(&dir) };
        let mut leftovers = Vec::new();
        if prepared.is_none() {
            if dir.path().exists() {
                leftovers.push("runtime directory".to_string());
            }
            if self.snapshotter.list().map(|d| d.iter().any(|d| d.vm_id == name)).unwrap_or(false) {
                leftovers.push("disk".to_string());
            }
            if self.store.list_leases().map(|l| l.iter().any(|l| l.vm == name)).unwrap_or(false) {
                leftovers.push("lease".to_string());
            }
            if self.supervisor.vm_dir(name).path().exists() {
                leftovers.push("run directory".to_string());
            }
            if self.layout.vm_snapshots(name).path().exists() {
                leftovers.push("snapshots".to_string());
            }
        }
        Ok(Actual { prepared: prepared.map(|p| p.fingerprint), running, last_exit, leftovers })
    }

    fn create(&self, vm: &Vm, fingerprint: &str) -> Result<Prepared, RuntimeError> {
        let name = vm.metadata.name.as_str();
        let spec = &vm.spec;
        // Checked when manifests are parsed too; again here for every way a VM reaches the host.
        if let Some((field, message)) = self.config.policy.ports.check(vm).into_iter().next() {
            return Err(RuntimeError::permanent("PortNotAllowed", format!("VM {name:?}: {field}: {message}")));
        }
        let image = artifacts::resolve_image(
            &self.paths,
            &spec.image,
            self.config.insecure_registries,
            self.config.pull_timeouts,
        )?;
        let base = artifacts::base_rootfs(&self.paths, &image, self.config.init_bin.as_deref())?;
        // Early, so a VM that cannot join fails before a disk is made; the token stays in memory.
        let owner = self.store.get_vm(name).ok().flatten().map(|r| r.owner).unwrap_or_default();
        let join = kubernetes::join_config(self.kube.as_ref(), vm, &owner)?;
        let dir = prepared::dir(&self.runtime_dir(), name);
        guest::create_private_dir(dir.path())
            .map_err(|e| transient("DiskFailed", format!("creating {}", dir.path().display()))(&e))?;
        let kernel = artifacts::resolve_kernel(&self.paths, spec, &self.config, dir.path())?;
        // Read now, before a disk is made: a file the host does not allow fails the VM at once.
        let guest_config = guest::guest_config(vm, &self.config.policy.paths)
            .map_err(|e| RuntimeError::permanent("CopyFileFailed", format!("VM {name:?}: {e}")))?;

        // A previous attempt may have left a disk: start from scratch.
        self.snapshotter.remove(name).map_err(|e| transient("DiskFailed", format!("VM {name:?}: old disk"))(&e))?;
        let disk = self.snapshotter.create(name, &base, spec.disk_size.bytes()).map_err(|e| {
            let message = format!("VM {name:?}: root disk of {}: {}", spec.disk_size, error_chain(&e));
            match e {
                image_store::SnapshotError::SizeTooSmall { .. } => RuntimeError::permanent("DiskTooSmall", message),
                // Retried: removing VMs or growing the pool makes room.
                image_store::SnapshotError::PoolFull { .. } => RuntimeError::transient("PoolFull", message),
                _ => RuntimeError::transient("DiskFailed", message),
            }
        })?;

        crate::failpoint::hit("create:after-disk");
        let mut cmdline = guest_api::boot::KERNEL_ARGS.to_string();
        let (mut tap, mut mac, mut ip) = (None, None, None);
        if let Some(netcfg) = &self.config.net {
            let lease_err = |e: crate::store::StoreError| {
                RuntimeError::transient("NetworkFailed", format!("VM {name:?}: IP lease: {}", error_chain(&e)))
            };
            let lease =
                self.store.allocate_lease(name, netcfg.subnet.hosts(), &net::mac_for(name)).map_err(lease_err)?;
            let leases = self.store.list_leases().map_err(lease_err)?;
            if let Some(clash) =
                net::collision(name, &lease.mac, leases.iter().map(|l| (l.vm.as_str(), l.mac.as_str())))
            {
                self.store.release_lease(name).map_err(lease_err)?;
                return Err(RuntimeError::permanent(
                    "NetworkCollision",
                    format!("VM {name:?}: {clash}: rename one of them"),
                ));
            }
            let net_err = |what: &str| transient("NetworkFailed", format!("VM {name:?}: {what}"));
            self.net.ensure_bridge(netcfg).map_err(|e| net_err("bridge")(&e))?;
            let tap_name = net::tap_name(name);
            self.net.create_tap(&tap_name, &netcfg.bridge).map_err(|e| net_err("tap")(&e))?;
            self.net.remove_port_forwards(name).map_err(|e| net_err("port forwards")(&e))?;
            for port in &spec.network.ports {
                let forward = net::PortForward {
                    vm: name.to_string(),
                    host_port: port.host_port,
                    guest_ip: lease.ip,
                    guest_port: port.guest_port,
                    protocol: port.protocol,
                };
                self.net.add_port_forward(&forward).map_err(|e| net_err(&format!("port {port}"))(&e))?;
            }
            cmdline.push(' ');
            cmdline.push_str(&net::kernel_ip_arg(lease.ip, &netcfg.subnet, name));
            tap = Some(tap_name);
            mac = Some(lease.mac.clone());
            ip = Some(lease.ip.to_string());
        }
        crate::failpoint::hit("create:after-network");
        if let Some(extra) = &spec.kernel.cmdline {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        let config_drive = dir.config_drive();
        let mut guest_config = guest_config;
        let kubernetes_node = join.is_some();
        guest_config.join = join;
        guest::write_drive(&config_drive, &guest_config)
            .map_err(|e| transient("ConfigDriveFailed", format!("VM {name:?}: config drive"))(&e))?;

        crate::failpoint::hit("create:after-config-drive");
        let record = PreparedVm {
            fingerprint: fingerprint.to_string(),
            image_digest: image.manifest_digest.to_string(),
            disk: disk.path,
            config_drive,
            kernel,
            cmdline,
            tap,
            mac: mac.clone(),
            ip: ip.clone(),
            kubernetes_node,
        };
        prepared::save(&self.runtime_dir(), name, &record)
            .map_err(|e| transient("StateFailed", format!("VM {name:?}: saving prepared state"))(&e))?;
        info!(vm = name, image = %image.manifest_digest, "prepared");
        Ok(Prepared { ip, mac, image_digest: Some(image.manifest_digest.to_string()) })
    }

    fn start(&self, vm: &Vm) -> Result<Started, RuntimeError> {
        let name = vm.metadata.name.as_str();
        let prepared = self
            .load(name)?
            .ok_or_else(|| RuntimeError::transient("NotPrepared", format!("VM {name:?} is not prepared")))?;
        let lock = self.vm_lock(name);
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut config = guest::vm_config(vm, &prepared, self.config.virt_mode);
        let snapshots = self.layout.vm_snapshots(name);
        config.snapshot_dir = Some(snapshots.incoming());
        let rollback = self.apply_pending_restore(name).map_err(|e| {
            RuntimeError::transient("RollbackFailed", format!("VM {name:?}: rollback: {}", error_chain(&e)))
        })?;
        if let Some(info) = rollback.as_ref().filter(|i| i.kind == snapshots::SnapshotKind::Full) {
            config.restore_from = Some(snapshots.snapshot(&info.name));
        }
        exits::clear(&prepared::dir(&self.runtime_dir(), name))
            .map_err(|e| transient("StartFailed", format!("VM {name:?}: clearing its last exit"))(&e))?;
        self.stopping.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        let mut boot = crate::api::BootStatus { mode: "cold".into(), ..Default::default() };
        let warm = if rollback.is_some() { Err(String::new()) } else { self.warm_template(vm, &prepared) };
        let warm = warm.and_then(|(key, dir)| {
            let info = self.start_warm(name, &config, &prepared, &key, &dir)?;
            Ok((key, info))
        });
        let info = match warm {
            Ok((key, info)) => {
                boot = crate::api::BootStatus { mode: "warm".into(), template: key, reason: String::new() };
                info
            }
            Err(reason) => {
                if !reason.is_empty() {
                    info!(vm = name, reason, "booting cold");
                }
                boot.reason = reason;
                let info = self.supervisor.spawn(name, &config).map_err(|e| {
                    RuntimeError::transient(
                        "StartFailed",
                        format!("VM {name:?}: starting its VMM: {}", error_chain(&e)),
                    )
                })?;
                // A failed warm attempt's exit may have been recorded before this VMM ran.
                let _ = exits::clear(&prepared::dir(&self.runtime_dir(), name));
                info
            }
        };
        crate::failpoint::hit("start:after-spawn");
        if let Some(rolled_back) = rollback {
            info!(vm = name, snapshot = rolled_back.name, "started from the snapshot");
            self.clear_pending_restore(name);
        }
        Ok(Started { pid: u32::try_from(info.pid).unwrap_or_default(), jailed: self.supervisor.jailed(), boot })
    }

    fn stop(&self, name: &str, grace: Duration) -> Result<(), RuntimeError> {
        let lock = self.vm_lock(name);
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.supervisor.is_running(name) {
            self.mark_stopping(name);
            self.supervisor
                .stop(name, grace)
                .map_err(|e| transient("StopFailed", format!("VM {name:?}: stopping"))(&e))?;
        }
        // A deliberate stop is not an exit the restart policy should see.
        exits::clear(&prepared::dir(&self.runtime_dir(), name))
            .map_err(|e| transient("StopFailed", format!("VM {name:?}: clearing its last exit"))(&e))?;
        self.supervisor.cleanup(name).map_err(|e| transient("StopFailed", format!("VM {name:?}: run directory"))(&e))
    }

    fn forget_exit(&self, name: &str) -> Result<(), RuntimeError> {
        exits::clear(&prepared::dir(&self.runtime_dir(), name))
            .map_err(|e| transient("StopFailed", format!("VM {name:?}: clearing its last exit"))(&e))
    }

    fn destroy(&self, name: &str, keep_lease: bool) -> Result<(), RuntimeError> {
        let fail = |what: &str| transient("DeleteFailed", format!("VM {name:?}: removing its {what}"));
        let lock = self.vm_lock(name);
        let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.supervisor.is_running(name) {
            self.mark_stopping(name);
            self.supervisor.kill(name).map_err(|e| fail("VMM process")(&e))?;
        }
        crate::failpoint::hit("delete:after-process");
        self.supervisor.cleanup(name).map_err(|e| fail("run directory")(&e))?;
        // With the process gone (a running kubelet would register its Node again), before the
        // prepared record that says the VM joined. An unreadable record cannot say so; that must
        // not block the delete.
        let joined = match self.load(name) {
            Ok(prepared) => prepared.is_some_and(|p| p.kubernetes_node),
            Err(e) => {
                warn!(vm = name, error = %e, "cannot tell whether the VM joined Kubernetes: its Node, if any, is left");
                false
            }
        };
        if joined {
            kubernetes::forget(self.kube.as_ref(), name)?;
        }
        if self.config.net.is_some() {
            self.net.remove_port_forwards(name).map_err(|e| fail("port forwards")(&e))?;
            self.net.delete_tap(&net::tap_name(name)).map_err(|e| fail("tap")(&e))?;
        }
        self.snapshotter.remove(name).map_err(|e| fail("disk")(&e))?;
        crate::failpoint::hit("delete:after-disk");
        // Snapshots hold a machine of this spec: they go with the VM, and with a recreate.
        self.remove_all_snapshots(name).map_err(|e| fail("snapshots")(&e))?;
        prepared::remove(&self.runtime_dir(), name).map_err(|e| fail("runtime directory")(&e))?;
        if !keep_lease {
            self.store.release_lease(name).map_err(|e| fail("IP lease")(&e))?;
        }
        info!(vm = name, keep_lease, "destroyed");
        Ok(())
    }

    fn list(&self) -> Result<Vec<String>, RuntimeError> {
        let mut names = prepared::list(&self.runtime_dir())
            .map_err(|e| transient("StateFailed", "listing runtime directories".into())(&e))?;
        if let Ok(orphans) = self.supervisor.list_orphans(&[]) {
            names.extend(orphans.dirs);
        }
        if let Ok(disks) = self.snapshotter.list() {
            names.extend(disks.into_iter().map(|d| d.vm_id));
        }
        if let Ok(leases) = self.store.list_leases() {
            names.extend(leases.into_iter().map(|l| l.vm));
        }
        names.extend(self.snapshot_owners());
        names.sort();
        names.dedup();
        Ok(names)
    }
}
