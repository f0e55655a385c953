//! Warm start: templates, and VMs restored from them (the guest side is `guest_api::warm`).
//!
//! A **template** is a snapshot of a guest that booted the kernel and `ignite-init` from an
//! initramfs built here, and waits on vsock for its identity before touching any disk. One template
//! serves every VM of one [`TemplateShape`] on one kernel and `ignite-init` build: its key hashes the
//! kernel's and `ignite-init`'s contents, the shape and the snapshot format, so a new kernel or
//! init build gets a new template and the old one is never used again (`ignite template rm`, or
//! [`Templates::sweep`] at daemon start, removes what no key names). A template taken on another CPU
//! model is refused when it is loaded, and rebuilt.
//!
//! Building one ([`Templates::build`]) boots a VMM jailed like a VM's, from its own supervisor over
//! `templates/.run/` and its own uids (so the VMs' orphan sweep never sees it), waits for
//! `guest_api::warm::TEMPLATE_READY` on the console, saves it and kills it. The files move to
//! `templates/<key>/`, `template.json` last.
//!
//! A **warm VM** is a restore of the template into a VMM with the VM's own disks, tap and sockets
//! (the devices are laid out as in a cold VM, so the template's saved devices fit). The host then
//! sends its [`Identity`] over vsock ([`send_identity`]); the guest answers once its root disk is
//! mounted. Guest memory is the template's `memory` file mapped privately: every VM of a template
//! shares the pages it has not written.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use guest_api::warm::{self, DiskSize, Identity};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};
use vmm_core::{DiskConfig, NetConfig as VmNetConfig, VirtModeConfig, VmConfig};

use crate::layout::TemplatesDir;
use crate::net::HostNet;
use crate::supervisor::{Supervisor, SupervisorError};

/// How long a template's guest may take from its VMM's start to [`warm::TEMPLATE_READY`]: a cold
/// kernel boot, on a software KVM several minutes.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a warm guest may take from the identity to its answer (root disk mounted).
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(60);
/// The placeholder disks a template boots with (the VM's own replace them on restore).
const PLACEHOLDER_BYTES: u64 = 1 << 20;
/// The MAC of a template's network device (the warm guest sets its own).
const TEMPLATE_MAC: &str = "02:1e:00:00:00:00";
/// The name of the snapshot a template build saves.
const SNAPSHOT_NAME: &str = "template";
/// How many uids of the jail range template builds get (builds of different keys run side by side).
pub const TEMPLATE_UIDS: u32 = 8;
/// How long after a failed build of a template VMs of its shape boot cold without trying again
/// (a kernel that never runs ignite-init would otherwise be booted for every VM).
const RETRY_AFTER: Duration = Duration::from_secs(600);

/// What a template fixes of the VMs it serves, besides the kernel and `ignite-init`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateShape {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Whether the VM has a network interface.
    pub network: bool,
    /// The virtualization mode the VMM runs in.
    pub virt_mode: VirtModeConfig,
}

/// A built template (`templates/<key>/template.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateInfo {
    /// Its key (the directory's name).
    pub key: String,
    /// The kernel it booted.
    pub kernel: PathBuf,
    /// SHA-256 of that kernel.
    pub kernel_digest: String,
    /// SHA-256 of the `ignite-init` in its initramfs.
    pub init_digest: String,
    /// The VMs it serves.
    pub shape: TemplateShape,
    /// When it was built (RFC 3339).
    pub created: String,
    /// How long the build took, VMM start to saved, in milliseconds.
    pub build_ms: u64,
    /// The size of its memory file.
    pub memory_bytes: u64,
}

/// A template that could not be built, found or removed.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A file or directory operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was attempted.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The daemon has no `ignite-init` binary to put into the template's initramfs.
    #[error("warm start needs the ignite-init binary (daemon --init)")]
    NoInit,
    /// The template's VMM could not be run.
    #[error("template {key}: {source}")]
    Vmm {
        /// The template.
        key: String,
        /// Why.
        #[source]
        source: SupervisorError,
    },
    /// The template's guest never said it was ready.
    #[error("template {key}: the guest {detail}; its console ends with: {console_tail}")]
    Boot {
        /// The template.
        key: String,
        /// What happened (`exited`, `was not ready within 600s`).
        detail: String,
        /// The last lines of its console.
        console_tail: String,
    },
    /// No template has this key.
    #[error("no template {0}")]
    NotFound(String),
    /// Warm start is off on this daemon (`--no-warm-start`, or no `ignite-init` binary).
    #[error("warm start is off on this daemon (--no-warm-start, or no ignite-init binary): it builds no templates")]
    Off,
    /// The kernel to build for is not there.
    #[error("{0}")]
    Kernel(String),
    /// The network for the template's tap could not be set up.
    #[error("template {key}: its tap: {detail}")]
    Network {
        /// The template.
        key: String,
        /// Why.
        detail: String,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TemplateError + 'a {
    move |source| TemplateError::Io { action, path: path.to_path_buf(), source }
}

/// The templates of one root (see the module docs).
pub struct Templates {
    dir: TemplatesDir,
    init_bin: Option<PathBuf>,
    supervisor: Supervisor,
    net: Arc<dyn HostNet>,
    /// The bridge template taps join (`None`: VMs have no network, templates neither).
    bridge: Option<String>,
    /// Keys being built or waiting for [`Templates::build_slot`] (one build per key).
    building: Mutex<HashSet<String>>,
    /// Held by the build that runs: one kernel boots for templates at a time, however many shapes
    /// a fleet has (VMs of the shapes that wait boot cold meanwhile).
    build_slot: Mutex<()>,
    /// Keys whose last build failed: when, and why.
    failed: Mutex<HashMap<String, (Instant, String)>>,
    /// Content digests by (path, length, modification time): a kernel is hashed once.
    digests: Mutex<HashMap<(PathBuf, u64, SystemTime), String>>,
}

impl Templates {
    /// The templates under `dir`, built with `init_bin` by `supervisor` (its own run directory,
    /// [`TemplatesDir::run_dir`]); template taps join `bridge`.
    pub fn new(
        dir: TemplatesDir,
        init_bin: Option<PathBuf>,
        supervisor: Supervisor,
        net: Arc<dyn HostNet>,
        bridge: Option<String>,
    ) -> Templates {
        Templates {
            dir,
            init_bin,
            supervisor,
            net,
            bridge,
            building: Mutex::new(HashSet::new()),
            build_slot: Mutex::new(()),
            failed: Mutex::new(HashMap::new()),
            digests: Mutex::new(HashMap::new()),
        }
    }

    /// The directory they live in.
    pub fn dir(&self) -> &TemplatesDir {
        &self.dir
    }

    fn digest(&self, path: &Path) -> Result<String, TemplateError> {
        let meta = std::fs::metadata(path).map_err(io_err("read", path))?;
        let id = (path.to_path_buf(), meta.len(), meta.modified().map_err(io_err("read", path))?);
        if let Some(d) = self.digests.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
            return Ok(d.clone());
        }
        let mut file = std::fs::File::open(path).map_err(io_err("open", path))?;
        let mut hasher = Sha256::new();
        std::io::copy(&mut file, &mut hasher).map_err(io_err("read", path))?;
        let digest = hex::encode(hasher.finalize());
        self.digests.lock().unwrap_or_else(|p| p.into_inner()).insert(id, digest.clone());
        Ok(digest)
    }

    /// The key of the template for VMs of `shape` on `kernel`, with the digests it is made of.
    pub fn key(&self, kernel: &Path, shape: &TemplateShape) -> Result<(String, String, String), TemplateError> {
        let init = self.init_bin.as_deref().ok_or(TemplateError::NoInit)?;
        let (kernel_digest, init_digest) = (self.digest(kernel)?, self.digest(init)?);
        let mut h = Sha256::new();
        for part in [
            kernel_digest.as_str(),
            init_digest.as_str(),
            &serde_json::to_string(shape).unwrap_or_default(),
            &vmm_core::snapshot::FORMAT_VERSION.to_string(),
        ] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        Ok((hex::encode(h.finalize())[..16].to_string(), kernel_digest, init_digest))
    }

    /// Template `key`'s directory, if it is built.
    pub fn ready(&self, key: &str) -> Option<PathBuf> {
        self.dir.record(key).is_file().then(|| self.dir.template(key))
    }

    /// Why the last build of template `key` failed, if it failed less than [`RETRY_AFTER`] ago (no
    /// new build starts in the background until then).
    pub fn recent_failure(&self, key: &str) -> Option<String> {
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.get(key).filter(|(at, _)| at.elapsed() < RETRY_AFTER).map(|(_, why)| why.clone())
    }

    /// Whether template `key` is being built now.
    pub fn is_building(&self, key: &str) -> bool {
        self.building.lock().unwrap_or_else(|p| p.into_inner()).contains(key)
    }

    /// The keys being built now.
    pub fn building(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.building.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        keys.sort();
        keys
    }

    /// Template `key`'s record, if it is built.
    pub fn info(&self, key: &str) -> Option<TemplateInfo> {
        serde_json::from_slice(&std::fs::read(self.dir.record(key)).ok()?).ok()
    }

    /// The template for `shape` on `kernel`: the built one, else built now, waiting for a build of
    /// it that runs already.
    pub fn build_and_wait(&self, kernel: &Path, shape: &TemplateShape) -> Result<TemplateInfo, TemplateError> {
        let (key, ..) = self.key(kernel, shape)?;
        loop {
            if let Some(info) = self.info(&key) {
                return Ok(info);
            }
            match self.build(kernel, shape)? {
                Some(info) => return Ok(info),
                None => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    /// Every built template, by key.
    pub fn list(&self) -> Vec<TemplateInfo> {
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else { return Vec::new() };
        let mut out: Vec<TemplateInfo> = entries
            .flatten()
            .filter_map(|e| {
                let key = e.file_name().to_string_lossy().into_owned();
                let text = std::fs::read(self.dir.record(&key)).ok()?;
                serde_json::from_slice(&text).ok()
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// Removes template `key` (VMs restored from it keep running: their memory is mapped).
    pub fn remove(&self, key: &str) -> Result<(), TemplateError> {
        let valid = key.len() == 16 && key.bytes().all(|b| b.is_ascii_hexdigit());
        let dir = self.dir.template(key);
        if !valid || !dir.is_dir() {
            return Err(TemplateError::NotFound(key.to_string()));
        }
        // The record first: a half-removed template is no template.
        let record = self.dir.record(key);
        match std::fs::remove_file(&record) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err("remove", &record)(e)),
            _ => {}
        }
        std::fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))
    }

    /// Removes what a crashed build left: build directories, their VMMs' run directories and taps.
    /// Returns what went.
    pub fn sweep(&self) -> Vec<String> {
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else { return removed };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_prefix(".build-") else {
                if !name.starts_with('.') && !self.dir.record(&name).exists() {
                    // A template whose record never got written (a crash while moving it in).
                    if std::fs::remove_dir_all(entry.path()).is_ok() {
                        removed.push(entry.path().display().to_string());
                    }
                }
                continue;
            };
            let vm = vm_name(key);
            let _ = self.supervisor.kill(&vm);
            let _ = self.supervisor.cleanup(&vm);
            let _ = self.net.delete_tap(&tap_name(key));
            if std::fs::remove_dir_all(entry.path()).is_ok() {
                removed.push(entry.path().display().to_string());
            }
        }
        removed
    }

    /// Builds the template for `shape` on `kernel` in the background unless it is built or being
    /// built; the build's outcome is logged.
    pub fn build_in_background(self: &Arc<Self>, kernel: PathBuf, shape: TemplateShape) {
        let templates = self.clone();
        let spawned = std::thread::Builder::new().name("template-build".into()).spawn(move || {
            match templates.build(&kernel, &shape) {
                Ok(Some(t)) => info!(key = t.key, build_ms = t.build_ms, "warm-start template built"),
                Ok(None) => {}
                Err(e) => {
                    let why = guest_api::error_chain(&e);
                    warn!(error = %why, "warm-start template build failed");
                    if let Ok((key, ..)) = templates.key(&kernel, &shape) {
                        templates.failed.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (Instant::now(), why));
                    }
                }
            }
        });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start a template build");
        }
    }

    /// Builds the template for `shape` on `kernel` (blocking: a cold boot of the kernel). `None` if
    /// it is built already or another build of it runs.
    pub fn build(&self, kernel: &Path, shape: &TemplateShape) -> Result<Option<TemplateInfo>, TemplateError> {
        let (key, kernel_digest, init_digest) = self.key(kernel, shape)?;
        if self.ready(&key).is_some() || !self.building.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone()) {
            return Ok(None);
        }
        let built = {
            let _slot = self.build_slot.lock().unwrap_or_else(|p| p.into_inner());
            self.build_locked(&key, kernel, shape)
        };
        let vm = vm_name(&key);
        let _ = self.supervisor.kill(&vm);
        let _ = self.supervisor.cleanup(&vm);
        if shape.network {
            let _ = self.net.delete_tap(&tap_name(&key));
        }
        let work = self.dir.build(&key);
        let _ = std::fs::remove_dir_all(&work);
        self.building.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
        let (build_ms, memory_bytes) = built?;
        let info = TemplateInfo {
            key: key.clone(),
            kernel: kernel.to_path_buf(),
            kernel_digest,
            init_digest,
            shape: shape.clone(),
            created: crate::api::conditions::now_rfc3339(),
            build_ms,
            memory_bytes,
        };
        let record = self.dir.record(&key);
        crate::private::write_json_atomic(&record, &info).map_err(io_err("write", &record))?;
        Ok(Some(info))
    }

    /// Boots the template guest, saves it once ready and moves the snapshot to its place. Returns
    /// the build time and the memory file's size.
    fn build_locked(&self, key: &str, kernel: &Path, shape: &TemplateShape) -> Result<(u64, u64), TemplateError> {
        let init = self.init_bin.as_deref().ok_or(TemplateError::NoInit)?;
        let work = self.dir.build(key);
        let _ = std::fs::remove_dir_all(&work);
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&work).map_err(io_err("create", &work))?;
        let initramfs = work.join("initramfs.cpio");
        let init_bytes = std::fs::read(init).map_err(io_err("read", init))?;
        image_store::initramfs::Initramfs::new()
            .dir("dev")
            .char_dev("dev/console", 5, 1)
            .dir("proc")
            .dir("sys")
            .dir("newroot")
            .file(warm::INITRAMFS_INIT, 0o755, &init_bytes)
            .write(&initramfs)
            .map_err(io_err("write", &initramfs))?;
        let mut disks = Vec::new();
        for (name, read_only) in [("vda.img", false), ("vdb.img", true)] {
            let path = work.join(name);
            let file = std::fs::File::create(&path).map_err(io_err("create", &path))?;
            file.set_len(PLACEHOLDER_BYTES).map_err(io_err("size", &path))?;
            disks.push(DiskConfig { path, read_only });
        }
        let mut config = VmConfig::new(kernel);
        config.vcpus = shape.vcpus;
        config.memory_mib = shape.memory_mib;
        config.initrd = Some(initramfs);
        config.cmdline = warm::template_kernel_args();
        config.disks = disks;
        if shape.network {
            let tap = tap_name(key);
            let bridge = self.bridge.as_deref().ok_or_else(|| TemplateError::Network {
                key: key.to_string(),
                detail: "the daemon has no network".into(),
            })?;
            self.net
                .create_tap(&tap, bridge)
                .map_err(|e| TemplateError::Network { key: key.to_string(), detail: guest_api::error_chain(&e) })?;
            config.nets.push(VmNetConfig { tap, mac: TEMPLATE_MAC.into(), ipv4: None });
        }
        config.vsock = Some(vmm_core::VsockConfig { guest_cid: super::guest::GUEST_CID, uds_path: PathBuf::new() });
        config.virt_mode = shape.virt_mode;
        let snapshots = work.join("snapshots");
        config.snapshot_dir = Some(snapshots.clone());

        let vm = vm_name(key);
        let vmm_err = |source| TemplateError::Vmm { key: key.to_string(), source };
        let started = Instant::now();
        self.supervisor.spawn(&vm, &config).map_err(vmm_err)?;
        let console = self.supervisor.vm_dir(&vm).console_log();
        let ready = format!("{}{}", guest_api::boot::CONSOLE_PREFIX, warm::TEMPLATE_READY);
        loop {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            if text.contains(&ready) {
                break;
            }
            let detail = if !self.supervisor.is_running(&vm) {
                "exited before it was ready".to_string()
            } else if started.elapsed() > BUILD_TIMEOUT {
                format!("was not ready within {}s", BUILD_TIMEOUT.as_secs())
            } else {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            };
            return Err(TemplateError::Boot { key: key.to_string(), detail, console_tail: tail(&text, 8) });
        }
        self.supervisor.pause(&vm).map_err(vmm_err)?;
        let memory_bytes = self.supervisor.snapshot(&vm, SNAPSHOT_NAME).map_err(vmm_err)?;
        let build_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.supervisor.kill(&vm).map_err(vmm_err)?;
        // Out of the jailed VMM's reach: root's, read-only to everyone else but root.
        let saved = snapshots.join(SNAPSHOT_NAME);
        for file in [vmm_core::snapshot::STATE_FILE, vmm_core::snapshot::MEMORY_FILE] {
            let path = saved.join(file);
            std::os::unix::fs::chown(&path, Some(0), Some(0)).map_err(io_err("chown", &path))?;
        }
        std::os::unix::fs::chown(&saved, Some(0), Some(0)).map_err(io_err("chown", &saved))?;
        let target = self.dir.template(key);
        let _ = std::fs::remove_dir_all(&target);
        std::fs::rename(&saved, &target).map_err(io_err("move the snapshot to", &target))?;
        Ok((build_ms, memory_bytes))
    }
}

/// The name of template `key`'s build VM (in the templates' own supervisor).
fn vm_name(key: &str) -> String {
    format!("template-{key}")
}

/// The tap of template `key`'s build VM: ignite's tap prefix, so a crash's leftover is swept.
fn tap_name(key: &str) -> String {
    format!("{}t{}", crate::net::TAP_PREFIX, &key[..10])
}

/// The last `n` lines of `console`, joined with ` | ` (for one-line errors and events).
pub(crate) fn tail(console: &str, n: usize) -> String {
    let lines: Vec<&str> = console.lines().rev().take(n).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// What `ignite template build` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildRequest {
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// A stored kernel's name; `None`: the daemon's default kernel.
    pub kernel: Option<String>,
    /// For VMs without a network interface.
    pub no_network: bool,
}

/// The templates as the API serves them (implemented by the host runtime).
pub trait TemplateOps: Send + Sync {
    /// Every built template, and the keys being built.
    fn list_templates(&self) -> Result<(Vec<TemplateInfo>, Vec<String>), TemplateError>;
    /// The template of this shape, built now if need be (blocking: a cold kernel boot).
    fn build_template(&self, request: &BuildRequest) -> Result<TemplateInfo, TemplateError>;
    /// Removes template `key`.
    fn remove_template(&self, key: &str) -> Result<(), TemplateError>;
}

/// The identity of a warm VM: the host's time and fresh entropy now, its disks' sizes, its network.
pub fn identity(config: &VmConfig, network: Option<warm::Network>) -> Result<Identity, TemplateError> {
    let mut disks = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        // Seeking to the end also sizes block devices (a devicemapper disk), whose metadata length is 0.
        let len = std::fs::File::open(&disk.path)
            .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
            .map_err(io_err("size", &disk.path))?;
        let letter = char::from(b'a' + u8::try_from(i).unwrap_or(25).min(25));
        disks.push(DiskSize { device: format!("vd{letter}"), sectors: len / 512 });
    }
    let mut random = [0u8; warm::ENTROPY_LEN + 16];
    getrandom(&mut random).map_err(io_err("read", Path::new("/dev/urandom")))?;
    let time_unix_ns = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    Ok(Identity {
        time_unix_ns: u64::try_from(time_unix_ns).unwrap_or(u64::MAX),
        entropy: hex::encode(&random[..warm::ENTROPY_LEN]),
        disks,
        network,
        machine_id: hex::encode(&random[warm::ENTROPY_LEN..]),
    })
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// Hands `identity` to the warm guest behind the VM's vsock socket and waits for its answer (the
/// root disk mounted). The time in the identity is taken again just before each send. A connection
/// the guest drops unanswered is tried again (the restored vsock device resets the guest's
/// connections, and a connection made before the guest has handled that reset goes with it; taking
/// an identity twice is harmless, the guest undoes a half-taken one). Gives up as soon as `alive`
/// says the VMM has ended, or after [`IDENTITY_TIMEOUT`].
pub fn send_identity(vsock_socket: &Path, identity: &Identity, alive: &dyn Fn() -> bool) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let error = match exchange(vsock_socket, identity) {
            Ok(Answer::Ok) => return Ok(()),
            Ok(Answer::Refused(reason)) => return Err(format!("the guest refused its identity: {reason}")),
            Ok(Answer::Dropped) => "the guest closed the connection without an answer".to_string(),
            Err(e) => e,
        };
        if !alive() {
            return Err(format!("its VMM ended ({error})"));
        }
        if started.elapsed() > IDENTITY_TIMEOUT {
            return Err(format!("{error} (tried for {}s)", IDENTITY_TIMEOUT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How the guest answered one identity.
enum Answer {
    Ok,
    Refused(String),
    Dropped,
}

/// One connection: sends the identity with the time now, reads the answer.
fn exchange(vsock_socket: &Path, identity: &Identity) -> Result<Answer, String> {
    let mut stream = connect_port(vsock_socket, warm::IDENTITY_PORT)?;
    let mut identity = identity.clone();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    identity.time_unix_ns = u64::try_from(now).unwrap_or(u64::MAX);
    stream.set_read_timeout(Some(IDENTITY_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.write_all(identity.to_line().as_bytes()).map_err(|e| format!("sending the identity: {e}"))?;
    let mut answer = String::new();
    BufReader::new(std::io::Read::take(stream, 4096))
        .read_line(&mut answer)
        .map_err(|e| format!("no answer to the identity: {e}"))?;
    let answer = answer.trim_end();
    Ok(match answer.strip_prefix(warm::REPLY_ERROR) {
        _ if answer == warm::REPLY_OK => Answer::Ok,
        Some(reason) => Answer::Refused(reason.to_string()),
        None if answer.is_empty() => Answer::Dropped,
        None => Answer::Refused(format!("an answer that is not one: {answer:?}")),
    })
}

/// Connects to the guest's vsock `port` through the VM's vsock socket (`CONNECT <port>\n`,
/// answered `OK <n>\n`).
fn connect_port(socket: &Path, port: u32) -> Result<UnixStream, String> {
    use std::io::Read;
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(|e| e.to_string())?;
    let mut line = Vec::new();
    let mut byte = [0u8];
    while line.len() < 64 {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            _ => return Err(format!("nothing listens on vsock port {port} in the guest")),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(format!("vsock port {port}: {}", String::from_utf8_lossy(&line)));
    }
    Ok(stream)
}

impl TemplateOps for super::HostRuntime {
    fn list_templates(&self) -> Result<(Vec<TemplateInfo>, Vec<String>), TemplateError> {
        let templates = self.templates.as_ref().ok_or(TemplateError::Off)?;
        Ok((templates.list(), templates.building()))
    }

    fn build_template(&self, request: &BuildRequest) -> Result<TemplateInfo, TemplateError> {
        let templates = self.templates.as_ref().ok_or(TemplateError::Off)?;
        let stored = |name: &str| {
            image_store::kernel::get(&self.paths, name).map(|k| k.path).map_err(|e| {
                TemplateError::Kernel(format!("kernel {name:?}: {e} (ignite kernel ls lists the stored kernels)"))
            })
        };
        let kernel = match (&request.kernel, &self.config.default_kernel) {
            (Some(name), _) => stored(name)?,
            (None, super::DefaultKernel::Path(path)) => path.clone(),
            (None, super::DefaultKernel::Stored(name)) => stored(name)?,
            (None, super::DefaultKernel::None) => {
                return Err(TemplateError::Kernel("the daemon has no default kernel (--kernel): name one".into()))
            }
        };
        let shape = TemplateShape {
            vcpus: request.vcpus,
            memory_mib: request.memory_mib,
            network: self.config.net.is_some() && !request.no_network,
            virt_mode: self.config.virt_mode,
        };
        templates.build_and_wait(&kernel, &shape)
    }

    fn remove_template(&self, key: &str) -> Result<(), TemplateError> {
        self.templates.as_ref().ok_or(TemplateError::Off)?.remove(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn templates(dir: &Path, init: &Path) -> Templates {
        let supervisor = Supervisor::new(crate::supervisor::SupervisorConfig {
            jail: None,
            ..crate::supervisor::SupervisorConfig::new(dir.join("run"), PathBuf::from("/bin/false"))
        })
        .unwrap();
        let net: Arc<dyn HostNet> = Arc::new(crate::net::RecordingHostNet::new());
        Templates::new(crate::layout::RootLayout::new(dir).templates(), Some(init.into()), supervisor, net, None)
    }

    fn shape() -> TemplateShape {
        TemplateShape { vcpus: 1, memory_mib: 128, network: true, virt_mode: VirtModeConfig::Auto }
    }

    #[test]
    fn the_key_changes_with_the_kernel_the_init_build_and_the_shape() {
        let dir = tempfile::tempdir().unwrap();
        let (kernel, init) = (dir.path().join("vmlinux"), dir.path().join("ignite-init"));
        std::fs::write(&kernel, b"kernel one").unwrap();
        std::fs::write(&init, b"init one").unwrap();
        let t = templates(dir.path(), &init);
        let (key, kernel_digest, _) = t.key(&kernel, &shape()).unwrap();
        assert_eq!(key.len(), 16);
        assert_eq!(t.key(&kernel, &shape()).unwrap().0, key, "the same inputs, the same key");
        let other_shapes = [
            TemplateShape { vcpus: 2, ..shape() },
            TemplateShape { memory_mib: 256, ..shape() },
            TemplateShape { network: false, ..shape() },
            TemplateShape { virt_mode: VirtModeConfig::Emulated, ..shape() },
        ];
        for other in other_shapes {
            assert_ne!(t.key(&kernel, &other).unwrap().0, key, "{other:?}");
        }
        // A new kernel build (another length, so the digest cache does not hold it).
        std::fs::write(&kernel, b"kernel two!").unwrap();
        let (new_key, new_digest, _) = t.key(&kernel, &shape()).unwrap();
        assert_ne!((new_key.as_str(), new_digest.as_str()), (key.as_str(), kernel_digest.as_str()));
        std::fs::write(&init, b"init two!").unwrap();
        assert_ne!(t.key(&kernel, &shape()).unwrap().0, new_key, "a new ignite-init build");
    }

    #[test]
    fn a_template_without_its_record_is_none_and_swept_and_removal_checks_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let init = dir.path().join("ignite-init");
        std::fs::write(&init, b"init").unwrap();
        let t = templates(dir.path(), &init);
        let key = "0123456789abcdef";
        std::fs::create_dir_all(t.dir().template(key)).unwrap();
        std::fs::create_dir_all(t.dir().build("fedcba9876543210")).unwrap();
        assert!(t.ready(key).is_none(), "no template.json: not a template");
        assert!(t.list().is_empty());
        let swept = t.sweep();
        assert_eq!(swept.len(), 2, "{swept:?}");
        assert!(!t.dir().template(key).exists() && !t.dir().build("fedcba9876543210").exists());
        assert!(matches!(t.remove("../../etc"), Err(TemplateError::NotFound(_))));
        assert!(matches!(t.remove(key), Err(TemplateError::NotFound(_))));
    }

    #[test]
    fn identities_carry_the_disk_sizes_and_fresh_randomness() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = VmConfig::new(dir.path().join("vmlinux"));
        for (name, len) in [("root", 4 << 20), ("drive", 4096)] {
            let path = dir.path().join(name);
            std::fs::File::create(&path).unwrap().set_len(len).unwrap();
            config.disks.push(DiskConfig { path, read_only: false });
        }
        let (a, b) = (identity(&config, None).unwrap(), identity(&config, None).unwrap());
        let sizes: Vec<(String, u64)> = a.disks.iter().map(|d| (d.device.clone(), d.sectors)).collect();
        assert_eq!(sizes, [("vda".to_string(), 8192), ("vdb".to_string(), 8)]);
        assert_ne!(a.entropy, b.entropy);
        assert_ne!(a.machine_id, b.machine_id);
        let line = a.to_line();
        Identity::from_line(line.trim_end().as_bytes()).expect("what the host sends, the guest takes");
    }
}
