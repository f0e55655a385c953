//! Building a running VM from a [`VmConfig`], and the [`VmHandle`] that controls it.

use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::layout;
use crate::boot::{self, BootSpec};
use crate::bus::{lock, Bus, BusOverlap};
use crate::config::{ConfigError, VmConfig};
use crate::devices::legacy::console::{ConsoleClients, ConsoleSocket, ConsoleTee};
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::power::PowerDevice;
use crate::devices::legacy::serial::{open_console, ConsoleError, SerialDevice, SerialState};
use crate::devices::legacy::IrqEventFd;
use crate::devices::virtio::mmio::{self, MmioTransport};
use crate::devices::virtio::GuestMemory;
use crate::event_loop::{self, VirtioSubscriber};
use crate::exit::{ExitReason, ExitSignal};
use crate::host::{emulated_clock_args, VirtMode, EMULATED_GUEST_ARGS};
use crate::snapshot::{self, SnapshotError};
use crate::vcpu::{self, Counters, Kicker, RunControl, VcpuContext};

/// Where the KVM TSS goes (three pages just below the BIOS area, out of the guest's RAM and MMIO).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// A VM that could not be built or controlled.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error("invalid vm configuration")]
    Config(#[from] ConfigError),
    /// `/dev/kvm` cannot be used.
    #[error("cannot use /dev/kvm (is the kvm module loaded and are you allowed to open it?)")]
    Kvm(#[source] kvm_ioctls::Error),
    /// KVM lacks a capability the engine needs.
    #[error("this host's KVM lacks the {0} capability")]
    MissingCapability(&'static str),
    /// A KVM call during set-up failed.
    #[error("kvm set-up failed: {what}")]
    Setup {
        /// Which step.
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate {mib} MiB of guest memory: {detail}")]
    Memory {
        /// The size asked for.
        mib: u32,
        /// Why.
        detail: String,
    },
    /// The kernel, initrd or command line could not be loaded.
    #[error("cannot boot")]
    Boot(#[from] boot::BootError),
    /// A vCPU could not be configured.
    #[error("cannot configure the vcpus")]
    Vcpu(#[from] crate::arch::x86_64::VcpuSetupError),
    /// The console could not be opened.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// A device could not be created.
    #[error("cannot create {device}")]
    Device {
        /// Which device (e.g. `disk /var/lib/x.img`).
        device: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Two devices were given overlapping addresses (a bug in the layout).
    #[error("device layout")]
    Bus(#[from] BusOverlap),
    /// A thread or eventfd could not be created.
    #[error("cannot start vm threads")]
    Io(#[from] std::io::Error),
    /// The process could not be jailed.
    #[error("cannot jail the vmm process")]
    Jail(#[from] crate::jail::JailError),
    /// The VM is already exiting, so it cannot be paused or resumed.
    #[error("the vm has exited ({0})")]
    Exited(ExitReason),
    /// The snapshot to restore cannot be used.
    #[error("cannot restore the snapshot")]
    Snapshot(#[from] SnapshotError),
}

/// A snapshot of a VM's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VmCounters {
    /// All vCPU exits.
    pub exits: u64,
    /// Port-I/O exits.
    pub io_exits: u64,
    /// MMIO exits.
    pub mmio_exits: u64,
    /// Instructions stepped over for a software-emulated KVM.
    pub emulation_fixups: u64,
    /// From `Vm::start` to the boot vCPU's first `KVM_RUN`.
    pub time_to_first_run: Option<Duration>,
    /// Since `Vm::start`.
    pub uptime: Duration,
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmExit {
    /// Why it ended.
    pub reason: ExitReason,
    /// Its counters at the end.
    pub counters: VmCounters,
}

/// Builds running VMs.
pub struct Vm;

impl Vm {
    /// Builds and starts the VM `config` describes: the vCPUs are running when this returns. With
    /// `config.restore_from`, the VM starts from that snapshot ([`Self::restore`]).
    pub fn start(config: &VmConfig) -> Result<VmHandle, VmError> {
        match &config.restore_from {
            Some(dir) => Self::restore(config, dir),
            None => Self::build(config, None),
        }
    }

    /// Builds a VM shaped by `config` (its devices, console and jail) in the state saved in the
    /// snapshot directory `dir` (see [`crate::snapshot`]) and lets it run on from there; the kernel is
    /// not loaded again. `config` must have the snapshot's vCPU count and memory size.
    pub fn restore(config: &VmConfig, dir: &Path) -> Result<VmHandle, VmError> {
        let loaded = snapshot::load(dir)?;
        loaded.check_fits(config)?;
        Self::build(config, Some(loaded))
    }

    fn build(config: &VmConfig, restore: Option<snapshot::Loaded>) -> Result<VmHandle, VmError> {
        let started = Instant::now();
        config.validate()?;
        let mode = VirtMode::resolve(config.virt_mode);
        let span = tracing::info_span!("vm", kernel = %config.kernel.display(), ?mode);
        let _enter = span.enter();
        vcpu::install_kick_handler()?;
        if let Some(jail) = &config.jail {
            // Before guest memory exists, so every page of it is charged to the VM's cgroup.
            crate::jail::join_cgroups(jail)?;
        }

        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        check_capabilities(&kvm)?;
        let vm_fd = kvm.create_vm().map_err(|source| VmError::Setup { what: "create vm", source })?;
        vm_fd.set_tss_address(KVM_TSS_ADDRESS).map_err(|source| VmError::Setup { what: "set tss address", source })?;
        vm_fd.create_irq_chip().map_err(|source| VmError::Setup { what: "create irqchip", source })?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm_fd.create_pit2(pit).map_err(|source| VmError::Setup { what: "create pit", source })?;

        let mem = match &restore {
            None => create_memory(&vm_fd, config.memory_mib)?,
            Some(loaded) => {
                let mem = snapshot::map_memory(&loaded.memory, &loaded.memory_path, &ram_ranges(config.memory_mib))?;
                register_memory(&vm_fd, &mem, config.memory_mib)?;
                mem
            }
        };
        let exit = Arc::new(ExitSignal::new()?);
        let devices = Devices::create(config, &vm_fd, &mem, &exit, restore.as_ref().map(|l| &l.state.serial))?;

        // The vCPUs exist before the command line: on an emulated host it carries their TSC frequency.
        let mut vcpu_fds = Vec::with_capacity(usize::from(config.vcpus));
        for index in 0..config.vcpus {
            let fd =
                vm_fd.create_vcpu(u64::from(index)).map_err(|source| VmError::Setup { what: "create vcpu", source })?;
            vcpu_fds.push(fd);
        }
        let tsc_khz = match (mode, vcpu_fds.first()) {
            (VirtMode::Emulated, Some(fd)) => fd
                .get_tsc_khz()
                .map_err(|err| tracing::warn!(%err, "no TSC frequency from KVM: the guest keeps its 100 Hz tick"))
                .ok(),
            _ => None,
        };
        if let Some(loaded) = &restore {
            let state = &loaded.state;
            state.vm.restore(&vm_fd)?;
            for (index, (fd, vcpu)) in vcpu_fds.iter().zip(&state.vcpus).enumerate() {
                snapshot::restore_vcpu(&kvm, fd, index, vcpu)?;
            }
            lock(&devices.i8042).restore(&state.i8042);
            for (index, (transport, saved)) in devices.transports.iter().zip(&state.virtio).enumerate() {
                lock(transport).restore(saved).map_err(|detail| SnapshotError::Device { index, detail })?;
            }
            tracing::debug!("machine state restored");
        } else {
            let cmdline = kernel_cmdline(config, mode, tsc_khz, &devices.cmdline_args);
            let spec = BootSpec {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &cmdline,
                vcpus: config.vcpus,
            };
            let entry = boot::load(&mem, &spec)?;
            tracing::debug!(?entry, %cmdline, "kernel loaded");
            for (index, fd) in (0..config.vcpus).zip(&vcpu_fds) {
                crate::arch::x86_64::configure_vcpu(&kvm, fd, index, config.vcpus, &mem, &entry, mode)?;
            }
        }
        let msr_list = Arc::new(kvm.get_msr_index_list().map(|l| l.as_slice().to_vec()).unwrap_or_default());
        let snapshot_blocker = snapshot::xsave_fits(&kvm).err().map(|e| e.to_string());

        // Everything the VM uses is open: from here on the process needs no path and no privilege.
        if let Some(jail) = &config.jail {
            crate::jail::enter(jail, config.snapshot_dir.as_deref())?;
            tracing::debug!(uid = jail.uid, gid = jail.gid, "vmm jailed");
        }

        let control = Arc::new(RunControl::default());
        let counters = Arc::new(Counters::default());
        let event_thread = event_loop::spawn(devices.subscribers, exit.clone())?;
        let start = Arc::new(Barrier::new(vcpu_fds.len() + 1));
        let mut vcpu_threads = Vec::with_capacity(vcpu_fds.len());
        for (index, fd) in vcpu_fds.into_iter().enumerate() {
            let ctx = VcpuContext {
                exit: exit.clone(),
                control: control.clone(),
                mmio: devices.mmio.clone(),
                pio: devices.pio.clone(),
                counters: counters.clone(),
                mode,
                started,
                msr_list: msr_list.clone(),
            };
            let thread_start = start.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ignite-vcpu{index}"))
                .spawn(move || vcpu::run(fd, index as u8, ctx, thread_start));
            match thread {
                Ok(thread) => vcpu_threads.push(thread),
                Err(err) => {
                    // The threads already spawned wait on the barrier: let them go and end at once.
                    exit.exit(ExitReason::Error { detail: format!("cannot spawn vcpu thread: {err}") });
                    start.wait();
                    return Err(err.into());
                }
            }
        }
        exit.set_kicker(Kicker::new(vcpu_threads.iter().map(|t| t.as_pthread_t()).collect()));
        start.wait();
        tracing::info!(
            vcpus = config.vcpus,
            memory_mib = config.memory_mib,
            restored = restore.is_some(),
            "vm started"
        );

        Ok(VmHandle {
            exit,
            control,
            counters,
            i8042: devices.i8042,
            serial: devices.serial,
            transports: devices.transports,
            memory_mib: config.memory_mib,
            host_cpu: snapshot::HostCpu::current(),
            snapshot_blocker,
            snapshot_dir: match (&config.snapshot_dir, &config.jail) {
                (Some(_), Some(_)) => Some(PathBuf::from(crate::jail::JAIL_SNAPSHOTS)),
                (dir, _) => dir.clone(),
            },
            vcpu_threads,
            event_thread: Some(event_thread),
            vcpus: usize::from(config.vcpus),
            started,
            vm_fd: Some(vm_fd),
            mem,
        })
    }
}

fn check_capabilities(kvm: &Kvm) -> Result<(), VmError> {
    for (cap, name) in [
        (Cap::Irqchip, "irqchip"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::ImmediateExit, "immediate_exit"),
        (Cap::UserMemory, "user memory"),
        (Cap::Pit2, "pit2"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCapability(name));
        }
    }
    Ok(())
}

/// The guest RAM regions for `memory_mib`.
pub(crate) fn ram_ranges(memory_mib: u32) -> Vec<(GuestAddress, usize)> {
    layout::ram_regions(u64::from(memory_mib) << 20)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect()
}

fn create_memory(vm_fd: &VmFd, memory_mib: u32) -> Result<GuestMemory, VmError> {
    let mem = GuestMemory::from_ranges(&ram_ranges(memory_mib))
        .map_err(|e| VmError::Memory { mib: memory_mib, detail: e.to_string() })?;
    register_memory(vm_fd, &mem, memory_mib)?;
    Ok(mem)
}

/// Gives KVM the guest RAM `mem`, one slot per region.
fn register_memory(vm_fd: &VmFd, mem: &GuestMemory, memory_mib: u32) -> Result<(), VmError> {
    let memory_err = |detail: String| VmError::Memory { mib: memory_mib, detail };
    for (slot, region) in mem.iter().enumerate() {
        let host = mem.get_host_address(region.start_addr()).map_err(|e| memory_err(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping stays valid as long as the VM: `VmHandle` keeps `mem` and drops it only
        // after the VM fd (and every vCPU fd) is closed.
        unsafe { vm_fd.set_user_memory_region(region) }
            .map_err(|source| VmError::Setup { what: "set user memory region", source })?;
    }
    Ok(())
}

/// The full command line: the user's, then the emulated-host arguments (with the clock arguments when
/// KVM told the TSC frequency), then the device announcements.
fn kernel_cmdline(config: &VmConfig, mode: VirtMode, tsc_khz: Option<u32>, device_args: &[String]) -> String {
    let mut parts = vec![config.cmdline.trim().to_string()];
    if mode == VirtMode::Emulated {
        parts.push(EMULATED_GUEST_ARGS.to_string());
        parts.extend(tsc_khz.map(emulated_clock_args));
    }
    parts.extend(device_args.iter().cloned());
    parts.retain(|p| !p.is_empty());
    parts.join(" ")
}

/// The devices of one VM, wired to KVM.
struct Devices {
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    subscribers: Vec<Arc<Mutex<dyn event_manager::MutEventSubscriber + Send>>>,
    cmdline_args: Vec<String>,
}

impl Devices {
    /// Creates and wires the devices; COM1 starts in `serial` when restoring a snapshot.
    fn create(
        config: &VmConfig,
        vm_fd: &VmFd,
        mem: &GuestMemory,
        exit: &Arc<ExitSignal>,
        serial: Option<&SerialState>,
    ) -> Result<Self, VmError> {
        let mut pio = Bus::new();
        let serial_irq = irq_line(vm_fd, layout::SERIAL_IRQ)?;
        let clients = ConsoleClients::default();
        let sink = ConsoleTee::new(open_console(&config.console, config.console_max_bytes)?, clients.clone());
        let serial = Arc::new(Mutex::new(match serial {
            Some(state) => SerialDevice::restore(serial_irq, Box::new(sink), state),
            None => SerialDevice::new(serial_irq, Box::new(sink)),
        }));
        pio.insert(serial.clone(), u64::from(layout::SERIAL_PORT_BASE), 8)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(irq_line(vm_fd, layout::I8042_IRQ)?, exit.clone())));
        pio.insert(i8042.clone(), u64::from(layout::I8042_PORT_BASE), 5)?;
        pio.insert(Arc::new(Mutex::new(PowerDevice::new(exit.clone()))), u64::from(layout::POWER_PORT), 1)?;

        let mut devices = Devices {
            mmio: Arc::new(Bus::new()),
            pio: Arc::new(pio),
            serial: serial.clone(),
            i8042,
            transports: Vec::new(),
            subscribers: Vec::new(),
            cmdline_args: Vec::new(),
        };
        if let Some(path) = &config.console_socket {
            let socket = ConsoleSocket::new(path, serial, clients).map_err(|e| VmError::Device {
                device: format!("console socket {}", path.display()),
                source: e.into(),
            })?;
            devices.subscribers.push(Arc::new(Mutex::new(socket)));
        }
        let mut mmio = Bus::new();
        for (index, device) in crate::devices::build_virtio_devices(config)?.into_iter().enumerate() {
            let (base, irq) = layout::virtio_slot(index);
            let transport = MmioTransport::new(mem.clone(), device.clone())?;
            for (queue, evt) in transport.queue_evts().iter().enumerate() {
                vm_fd
                    .register_ioevent(evt, &IoEventAddress::Mmio(base + mmio::NOTIFY_REG_OFFSET), queue as u32)
                    .map_err(|source| VmError::Setup { what: "register queue ioeventfd", source })?;
            }
            vm_fd
                .register_irqfd(transport.interrupt().irqfd(), irq)
                .map_err(|source| VmError::Setup { what: "register virtio irqfd", source })?;
            let evts = transport.queue_evts().iter().map(EventFd::try_clone).collect::<Result<Vec<_>, _>>()?;
            devices.subscribers.push(Arc::new(Mutex::new(VirtioSubscriber::new(device, evts))));
            let transport = Arc::new(Mutex::new(transport));
            mmio.insert(transport.clone(), base, layout::VIRTIO_MMIO_SIZE)?;
            devices.transports.push(transport);
            devices.cmdline_args.push(mmio::cmdline_arg(base, irq));
        }
        devices.mmio = Arc::new(mmio);
        Ok(devices)
    }
}

fn irq_line(vm_fd: &VmFd, irq: u32) -> Result<IrqEventFd, VmError> {
    let evt = EventFd::new(EFD_NONBLOCK)?;
    vm_fd.register_irqfd(&evt, irq).map_err(|source| VmError::Setup { what: "register irqfd", source })?;
    Ok(IrqEventFd(evt))
}

/// Controls a running VM. Dropping it stops the VM by force and waits for its threads.
pub struct VmHandle {
    exit: Arc<ExitSignal>,
    control: Arc<RunControl>,
    counters: Arc<Counters>,
    i8042: Arc<Mutex<I8042>>,
    serial: Arc<Mutex<SerialDevice>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    memory_mib: u32,
    host_cpu: snapshot::HostCpu,
    /// Why this VM cannot be snapshotted, if it cannot.
    snapshot_blocker: Option<String>,
    /// Where named snapshots go, as this process sees it.
    snapshot_dir: Option<PathBuf>,
    vcpu_threads: Vec<JoinHandle<()>>,
    event_thread: Option<JoinHandle<()>>,
    vcpus: usize,
    started: Instant,
    // Declared before `_mem`: the VM fd must close before guest memory is unmapped.
    vm_fd: Option<VmFd>,
    mem: GuestMemory,
}

impl VmHandle {
    /// Stops every vCPU at its next exit and waits until all are parked. Devices keep running.
    pub fn pause(&self) -> Result<(), VmError> {
        self.control.set_paused(true);
        if let Some(kicker) = self.kicker() {
            kicker.kick_all();
        }
        if self.control.wait_parked(self.vcpus, &self.exit) {
            Ok(())
        } else {
            Err(VmError::Exited(self.exit.reason().unwrap_or(ExitReason::Stopped)))
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) -> Result<(), VmError> {
        if let Some(reason) = self.exit.reason() {
            return Err(VmError::Exited(reason));
        }
        self.control.set_paused(false);
        Ok(())
    }

    /// Whether the VM is paused: [`Self::pause`] succeeded and neither [`Self::resume`] nor
    /// [`Self::request_shutdown`] followed.
    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    /// Saves the VM to the snapshot directory `dir` (see [`crate::snapshot`]): pauses it unless it is
    /// paused, has each vCPU save its state, saves the VM-wide state, the legacy devices and guest
    /// memory, and resumes it if it was running. Returns the bytes of guest memory written.
    pub fn snapshot(&self, dir: &Path) -> Result<u64, SnapshotError> {
        if let Some(device) = &self.snapshot_blocker {
            return Err(SnapshotError::Unsupported { device: device.clone() });
        }
        let was_paused = self.is_paused();
        let exited = |exit: &ExitSignal| SnapshotError::Exited(exit.reason().unwrap_or(ExitReason::Stopped));
        if !was_paused {
            self.pause().map_err(|_| exited(&self.exit))?;
        }
        let saved = self.save_paused(dir);
        if !was_paused {
            self.control.set_paused(false);
        }
        saved
    }

    /// Saves the VM as `name` in its configured snapshot directory (see [`VmConfig::snapshot_dir`]):
    /// the name is one path component of letters, digits, `.`, `_` and `-` (not starting with `.`),
    /// and an existing snapshot is never replaced.
    pub fn snapshot_named(&self, name: &str) -> Result<u64, SnapshotError> {
        let Some(dir) = &self.snapshot_dir else { return Err(SnapshotError::NoDirectory) };
        snapshot::check_name(name)?;
        let target = dir.join(name);
        if target.exists() {
            return Err(SnapshotError::Exists { name: name.to_string() });
        }
        self.snapshot(&target)
    }

    fn save_paused(&self, dir: &Path) -> Result<u64, SnapshotError> {
        let vcpus = self
            .control
            .save_vcpus(self.vcpus, &self.exit)
            .ok_or_else(|| SnapshotError::Exited(self.exit.reason().unwrap_or(ExitReason::Stopped)))?;
        let vcpus = vcpus.into_iter().collect::<Result<Vec<_>, _>>()?;
        let vm_fd = self.vm_fd.as_ref().ok_or(SnapshotError::Exited(ExitReason::Stopped))?;
        // Every device is held still until guest memory is saved: none may serve a queue (and write
        // guest memory) between the save of its queues and the save of memory.
        let device_arcs: Vec<_> = self.transports.iter().map(|t| lock(t).device().clone()).collect();
        let held: Vec<_> = device_arcs.iter().map(|d| lock(d)).collect();
        let virtio = self.transports.iter().zip(&held).map(|(t, d)| lock(t).state(&**d)).collect();
        let state = snapshot::MachineState {
            host_cpu: self.host_cpu.clone(),
            memory_mib: self.memory_mib,
            vcpus,
            vm: snapshot::VmState::save(vm_fd)?,
            serial: lock(&self.serial).state(),
            i8042: lock(&self.i8042).state(),
            virtio,
        };
        let started = Instant::now();
        let written = snapshot::save(dir, &state, &self.mem)?;
        drop(held);
        tracing::info!(dir = %dir.display(), memory_bytes = written, elapsed = ?started.elapsed(), "snapshot saved");
        Ok(written)
    }

    fn kicker(&self) -> Option<Kicker> {
        Some(Kicker::new(self.vcpu_threads.iter().map(|t| t.as_pthread_t()).collect()))
    }

    /// Asks the guest to shut down (Ctrl-Alt-Del on its keyboard) and returns at once; a paused VM
    /// is resumed so it can. The VM keeps running until the guest powers off or [`Self::force_stop`].
    pub fn request_shutdown(&self) {
        self.control.set_paused(false);
        if let Err(err) = lock(&self.i8042).press_ctrl_alt_del() {
            tracing::warn!(%err, "graceful stop request not delivered");
        }
    }

    /// Ends the VM at once (its exit reason becomes `Stopped` unless it already ended) and returns
    /// without waiting; [`Self::wait`] collects it.
    pub fn force_stop(&self) {
        self.exit.exit(ExitReason::Stopped);
    }

    /// Asks the guest to shut down (Ctrl-Alt-Del on its keyboard), waits up to `grace`, then stops the
    /// VM by force. Returns how it ended.
    pub fn stop(self, grace: Duration) -> VmExit {
        self.request_shutdown();
        if self.exit.wait_timeout(Some(grace)).is_none() {
            tracing::info!(?grace, "guest did not shut down in time; stopping it");
            self.force_stop();
        }
        self.wait()
    }

    /// Stops the VM at once.
    pub fn kill(self) -> VmExit {
        self.force_stop();
        self.wait()
    }

    /// Waits for the VM to end on its own (or through another handle method) and releases it.
    pub fn wait(mut self) -> VmExit {
        let reason = self.exit.wait_timeout(None).unwrap_or(ExitReason::Stopped);
        self.join();
        VmExit { reason, counters: self.counters() }
    }

    /// Waits up to `timeout` for the VM to end; `None` while it is still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        self.exit.wait_timeout(Some(timeout))
    }

    /// The exit reason, once the VM is exiting.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.reason()
    }

    /// The VM's counters now.
    pub fn counters(&self) -> VmCounters {
        let first = self.counters.first_run_ns.load(Ordering::Relaxed);
        VmCounters {
            exits: self.counters.exits.load(Ordering::Relaxed),
            io_exits: self.counters.io_exits.load(Ordering::Relaxed),
            mmio_exits: self.counters.mmio_exits.load(Ordering::Relaxed),
            emulation_fixups: self.counters.emulation_fixups.load(Ordering::Relaxed),
            time_to_first_run: (first != 0).then(|| Duration::from_nanos(first)),
            uptime: self.started.elapsed(),
        }
    }

    fn join(&mut self) {
        for thread in self.vcpu_threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("a vcpu thread panicked");
            }
        }
        if let Some(thread) = self.event_thread.take() {
            if thread.join().is_err() {
                tracing::error!("the device thread panicked");
            }
        }
        self.vm_fd.take();
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        if !self.vcpu_threads.is_empty() || self.event_thread.is_some() {
            self.exit.exit(ExitReason::Stopped);
            self.join();
        }
    }
}
