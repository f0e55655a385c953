//! The virtio-mmio transport, version 2 ("modern") register layout (virtio 1.2, section 4.2.2).
//!
//! One [`MmioTransport`] sits on the MMIO bus in front of each device model. It owns what the spec
//! puts in the transport: feature negotiation, the device status state machine, the queue
//! configuration registers and the interrupt status. When the driver sets `DRIVER_OK` it hands the
//! configured queues to the device ([`VirtioDevice::activate`]); from then on the device serves them
//! from the event-loop thread and the transport only answers status, interrupt and config accesses.
//!
//! Queue notifications normally never reach [`BusDevice::write`]: the VM registers each
//! [`MmioTransport::queue_evts`] entry with KVM as an ioeventfd on `base + NOTIFY_REG_OFFSET`, so KVM
//! signals the eventfd without a vCPU exit. A notification that does arrive here (no ioeventfd, e.g.
//! in tests) signals the same eventfd, so both paths lead to the same `process_queue` call.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{features, ActivateContext, GuestMemory, VirtioDevice, VirtioInterrupt};
use crate::bus::{lock, BusDevice};

/// Offset of the `QueueNotify` register, where the VM attaches one ioeventfd per queue (datamatch =
/// queue index).
pub const NOTIFY_REG_OFFSET: u64 = 0x50;

/// `MagicValue`: "virt" in little-endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (non-legacy) virtio-mmio layout.
const MMIO_VERSION: u32 = 2;
/// `VendorID`: the bytes "IGNT" as the guest reads them in memory order. Drivers do not interpret it;
/// it only lets a curious guest tell our devices apart from QEMU's ("QEMU") or Firecracker's (0).
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"IGNT");

// Register offsets (virtio 1.2, table 4.1).
const REG_MAGIC: u64 = 0x00;
const REG_VERSION: u64 = 0x04;
const REG_DEVICE_ID: u64 = 0x08;
const REG_VENDOR_ID: u64 = 0x0c;
const REG_DEVICE_FEATURES: u64 = 0x10;
const REG_DEVICE_FEATURES_SEL: u64 = 0x14;
const REG_DRIVER_FEATURES: u64 = 0x20;
const REG_DRIVER_FEATURES_SEL: u64 = 0x24;
const REG_QUEUE_SEL: u64 = 0x30;
const REG_QUEUE_NUM_MAX: u64 = 0x34;
const REG_QUEUE_NUM: u64 = 0x38;
const REG_QUEUE_READY: u64 = 0x44;
const REG_INTERRUPT_STATUS: u64 = 0x60;
const REG_INTERRUPT_ACK: u64 = 0x64;
const REG_STATUS: u64 = 0x70;
const REG_QUEUE_DESC_LOW: u64 = 0x80;
const REG_QUEUE_DESC_HIGH: u64 = 0x84;
const REG_QUEUE_DRIVER_LOW: u64 = 0x90;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x94;
const REG_QUEUE_DEVICE_LOW: u64 = 0xa0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0xa4;
const REG_SHM_LEN_LOW: u64 = 0xb0;
const REG_SHM_BASE_HIGH: u64 = 0xbc;
const REG_CONFIG_GENERATION: u64 = 0xfc;
/// Start of the device-specific configuration space.
const CONFIG_SPACE_OFFSET: u64 = 0x100;

const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

/// The kernel command-line argument that announces a virtio-mmio device to Linux
/// (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`): its 4 KiB window at `base` and its interrupt line.
pub fn cmdline_arg(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

/// One virtqueue as a snapshot stores it (virtio-queue's `QueueState`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    /// The largest size the device offers.
    pub max_size: u16,
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` is in use.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// The driver marked the queue ready.
    pub ready: bool,
    /// Guest addresses of the descriptor table, the available ring and the used ring.
    pub rings: [u64; 3],
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            rings: [q.desc_table, q.avail_ring, q.used_ring],
        }
    }
}

impl QueueSnapshot {
    fn to_state(&self) -> QueueState {
        QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.rings[0],
            avail_ring: self.rings[1],
            used_ring: self.rings[2],
        }
    }
}

/// A virtio-mmio transport and its device as a snapshot stores them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
    /// The device's virtio ID (a restore into another kind of device is refused).
    pub device_type: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// The driver acked a feature word beyond the 64 bits offered.
    pub acked_unknown_word: bool,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// The device status.
    pub status: u32,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// The driver's queue configuration.
    pub queues: Vec<QueueSnapshot>,
    /// Per queue: the driver wrote a size the queue cannot take.
    pub bad_size: Vec<bool>,
    /// The queues the device serves, when the driver had started it.
    pub active_queues: Option<Vec<QueueSnapshot>>,
}

/// The virtio-mmio register file of one device; a [`BusDevice`] on the MMIO bus.
pub struct MmioTransport {
    mem: GuestMemory,
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<VirtioInterrupt>,
    queue_evts: Vec<EventFd>,
    /// The driver's queue configuration; copies are handed to the device at `DRIVER_OK`.
    queues: Vec<Queue>,
    /// Per queue: the driver wrote a size the queue cannot take. `Queue` keeps its old size then, so
    /// driver and device would disagree on the ring layout; activation fails instead.
    bad_size: Vec<bool>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    /// The driver acked a bit beyond the 64 we can offer, which makes `FEATURES_OK` impossible.
    acked_unknown_word: bool,
    queue_sel: u32,
    status: u32,
}

impl MmioTransport {
    /// A transport for `device`, with one non-blocking notification eventfd per queue and a fresh
    /// interrupt line. Fails if an eventfd cannot be created or the device reports a queue size that
    /// is not a power of two between 1 and 32768 (a device model bug).
    pub fn new(mem: GuestMemory, device: Arc<Mutex<dyn VirtioDevice>>) -> std::io::Result<Self> {
        let max_sizes = lock(&device).queue_max_sizes().to_vec();
        let queues = max_sizes
            .iter()
            .map(|&max| {
                Queue::new(max).map_err(|err| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("virtio queue size {max}: {err}"))
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let queue_evts = max_sizes.iter().map(|_| EventFd::new(EFD_NONBLOCK)).collect::<std::io::Result<Vec<_>>>()?;
        Ok(MmioTransport {
            mem,
            device,
            interrupt: Arc::new(VirtioInterrupt::new()?),
            queue_evts,
            bad_size: vec![false; queues.len()],
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            acked_unknown_word: false,
            queue_sel: 0,
            status: 0,
        })
    }

    /// One notification eventfd per queue, in queue order.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt line (register its irqfd with KVM).
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The device model behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The transport's registers, its queue configuration and the live queues of its `device` (locked
    /// by the caller, which keeps it from serving while guest memory is saved), for a snapshot.
    pub fn state(&self, device: &dyn VirtioDevice) -> TransportState {
        TransportState {
            device_type: device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            acked_unknown_word: self.acked_unknown_word,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.iter().map(|q| QueueSnapshot::from(q.state())).collect(),
            bad_size: self.bad_size.clone(),
            active_queues: device.active_queues().map(|qs| qs.iter().map(|q| QueueSnapshot::from(q.state())).collect()),
        }
    }

    /// Puts a freshly built transport and its device in a snapshot's `state`: registers, queue
    /// configuration, and, for a device the driver had started, the device started again on the saved
    /// live queues, each of which is then served once (a notification the snapshot caught unserved
    /// is not lost; one already served is not served again, its used entry being in guest memory).
    pub fn restore(&mut self, state: &TransportState) -> Result<(), String> {
        let mut device = lock(&self.device);
        if device.device_type() != state.device_type {
            return Err(format!("device type {} where the snapshot has {}", device.device_type(), state.device_type));
        }
        let count = self.queues.len();
        let queues = |saved: &[QueueSnapshot]| -> Result<Vec<Queue>, String> {
            if saved.len() != count {
                return Err(format!("{count} queues where the snapshot has {}", saved.len()));
            }
            saved.iter().map(|q| Queue::try_from(q.to_state()).map_err(|e| format!("saved queue: {e}"))).collect()
        };
        self.queues = queues(&state.queues)?;
        self.bad_size =
            state.bad_size.iter().copied().chain(std::iter::repeat(false)).take(self.queues.len()).collect();
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.acked_unknown_word = state.acked_unknown_word;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.interrupt.ack(u32::MAX);
        if state.interrupt_status != 0 {
            // Only the status bits: the interrupt controller's restored state holds the line itself.
            self.interrupt.set_status(state.interrupt_status);
        }
        if let Some(active) = &state.active_queues {
            device.set_acked_features(self.acked_features);
            let ctx =
                ActivateContext { mem: self.mem.clone(), queues: queues(active)?, interrupt: self.interrupt.clone() };
            device.activate(ctx).map_err(|e| format!("the device does not start again: {e}"))?;
            device.restored();
            for index in 0..count {
                device.process_queue(index);
            }
        }
        Ok(())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::try_from(self.queue_sel).ok()?)
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => lock(&self.device).device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let avail = lock(&self.device).avail_features();
                match self.device_features_sel {
                    0 => avail as u32,
                    1 => (avail >> 32) as u32,
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            // No shared memory regions: the spec has a non-existent region read as all ones.
            REG_SHM_LEN_LOW..=REG_SHM_BASE_HIGH => u32::MAX,
            // No device changes its configuration space on its own, so the generation never moves.
            REG_CONFIG_GENERATION => 0,
            _ => {
                tracing::debug!(offset, "read of a write-only or unknown virtio-mmio register");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, value),
            NOTIFY_REG_OFFSET => self.notify(value),
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            _ => tracing::debug!(offset, value, "write to a read-only or unknown virtio-mmio register"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & (DRIVER | FEATURES_OK) != DRIVER {
            tracing::debug!(status = self.status, "driver features written outside feature negotiation; ignored");
            return;
        }
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32),
            // Nothing is offered up there, so any bit set is an unknown feature.
            _ => self.acked_unknown_word |= value != 0,
        }
    }

    fn write_queue_reg(&mut self, offset: u64, value: u32) {
        // Queues are configured between FEATURES_OK and DRIVER_OK (virtio 1.2, 3.1.1); a live queue
        // must not move under the device.
        if self.status & (FEATURES_OK | DRIVER_OK) != FEATURES_OK {
            tracing::debug!(offset, status = self.status, "queue register written outside queue set-up; ignored");
            return;
        }
        let index = usize::try_from(self.queue_sel).unwrap_or(usize::MAX);
        let (Some(queue), Some(bad_size)) = (self.queues.get_mut(index), self.bad_size.get_mut(index)) else {
            tracing::debug!(offset, "queue register written with no valid queue selected; ignored");
            return;
        };
        if queue.ready() && offset != REG_QUEUE_READY {
            tracing::debug!(offset, "register of a ready queue written; ignored");
            return;
        }
        match offset {
            REG_QUEUE_NUM => {
                let size = u16::try_from(value).ok();
                *bad_size = size.is_none_or(|size| queue.try_set_size(size).is_err());
                if *bad_size {
                    tracing::debug!(
                        value,
                        max = queue.max_size(),
                        "queue size is not a power of two up to the maximum"
                    );
                }
            }
            REG_QUEUE_READY => queue.set_ready(value == 1),
            REG_QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
            REG_QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
            REG_QUEUE_DRIVER_LOW => queue.set_avail_ring_address(Some(value), None),
            REG_QUEUE_DRIVER_HIGH => queue.set_avail_ring_address(None, Some(value)),
            REG_QUEUE_DEVICE_LOW => queue.set_used_ring_address(Some(value), None),
            REG_QUEUE_DEVICE_HIGH => queue.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    fn notify(&self, value: u32) {
        match usize::try_from(value).ok().and_then(|index| self.queue_evts.get(index)) {
            Some(evt) => {
                if let Err(err) = evt.write(1) {
                    tracing::warn!(queue = value, %err, "queue notification could not be forwarded");
                }
            }
            None => tracing::debug!(queue = value, "notification for a queue that does not exist"),
        }
    }

    /// The device status state machine (virtio 1.2, 3.1.1): each write adds the next bit of the
    /// initialization sequence, `FAILED` may be added at any time, 0 resets. Anything else is a
    /// driver bug and is ignored, so the status always describes a reachable state.
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET belongs to the device: the driver may echo it back but not set or clear it.
        let current = self.status & !NEEDS_RESET;
        let wanted = value & !NEEDS_RESET;
        let added = wanted & !current;
        if wanted & current != current {
            tracing::debug!(current, value, "driver cleared device status bits without a reset; ignored");
            return;
        }
        let step = added & !FAILED;
        let next = match (current & !FAILED, step) {
            (_, 0) => current | added,
            (0, ACKNOWLEDGE) | (ACKNOWLEDGE, DRIVER) => current | added,
            (s, FEATURES_OK) if s == ACKNOWLEDGE | DRIVER => {
                if self.features_acceptable() {
                    lock(&self.device).set_acked_features(self.acked_features);
                    current | added
                } else {
                    // Leaving FEATURES_OK clear is how the spec tells the driver "no" (3.1.1 step 6).
                    tracing::warn!(
                        acked = self.acked_features,
                        "driver's feature selection rejected: features not offered, or VERSION_1 missing"
                    );
                    current | (added & FAILED)
                }
            }
            (s, DRIVER_OK) if s == ACKNOWLEDGE | DRIVER | FEATURES_OK => {
                self.status = current | added | (self.status & NEEDS_RESET);
                self.activate();
                return;
            }
            _ => {
                tracing::debug!(current, value, "device status transition out of order; ignored");
                return;
            }
        };
        self.status = next | (self.status & NEEDS_RESET);
    }

    fn features_acceptable(&self) -> bool {
        let avail = lock(&self.device).avail_features();
        !self.acked_unknown_word && self.acked_features & !avail == 0 && self.acked_features & features::VERSION_1 != 0
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, queue) in self.queues.iter().enumerate() {
            if self.bad_size[index] || !queue.is_valid(&self.mem) {
                return self.activation_failed(&super::ActivateError::InvalidQueue(index));
            }
            // The transport keeps its copy for QueueReady/QueueNumMax reads; the device gets its own.
            match Queue::try_from(queue.state()) {
                Ok(mut copy) => {
                    copy.set_event_idx(event_idx);
                    queues.push(copy);
                }
                Err(_) => return self.activation_failed(&super::ActivateError::InvalidQueue(index)),
            }
        }
        let ctx = ActivateContext { mem: self.mem.clone(), queues, interrupt: self.interrupt.clone() };
        let result = lock(&self.device).activate(ctx);
        if let Err(err) = result {
            self.activation_failed(&err);
        }
    }

    /// A driver can recover from a failed start by resetting the device, so report it the way the
    /// spec provides (DEVICE_NEEDS_RESET plus a configuration interrupt) instead of failing the VM.
    fn activation_failed(&mut self, err: &super::ActivateError) {
        let device_type = lock(&self.device).device_type();
        tracing::error!(device_type, error = %err, "virtio device could not be activated");
        self.status |= NEEDS_RESET;
        self.interrupt.signal_config_changed();
    }

    /// Driver-initiated reset: the device forgets its queues and the transport returns to power-on
    /// state, including the interrupt status.
    fn reset(&mut self) {
        lock(&self.device).reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.bad_size.fill(false);
        for evt in &self.queue_evts {
            // Drop notifications for queues that no longer exist; an empty counter reads as EAGAIN.
            let _ = evt.read();
        }
        self.interrupt.ack(u32::MAX);
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.acked_unknown_word = false;
        self.queue_sel = 0;
        self.status = 0;
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) => *word = self.read_reg(offset).to_le_bytes(),
            Err(_) => {
                tracing::debug!(offset, len = data.len(), "non 32-bit virtio-mmio register read; reads as zero");
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) => self.write_reg(offset, u32::from_le_bytes(word)),
            Err(_) => tracing::debug!(offset, len = data.len(), "non 32-bit virtio-mmio register write; ignored"),
        }
    }
}

#[cfg(test)]
mod tests;
