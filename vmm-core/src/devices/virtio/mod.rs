//! Virtio devices on our own virtio-mmio (version 2) transport.
//!
//! Ownership: the [`mmio::MmioTransport`] owns the common registers and the queue configuration and
//! is driven by vCPU threads; the device model behind [`VirtioDevice`] is shared with the event-loop
//! thread, which calls [`VirtioDevice::process_queue`] when the guest notifies a queue (KVM ioeventfd)
//! and [`VirtioDevice::process_backend`] when a backend fd (tap, unix socket) is ready.
//!
//! Hostile guests: every guest address goes through `vm-memory`, which returns an error instead of
//! touching memory outside guest RAM; descriptor chains come from `virtio-queue`, which bounds chain
//! length (no loops) and checks indirect tables. Devices turn any such error into an error status for
//! that request, or drop the request, and never panic.

pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory as every device sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// Device IDs (virtio 1.2, section 5).
pub mod ids {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// Feature bits shared by all devices.
pub mod features {
    /// The device conforms to virtio 1.0 or later (required by the version-2 MMIO transport).
    pub const VERSION_1: u64 = 1 << 32;
    /// The driver may use indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// The driver and device use the used/avail event index fields.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
}

/// Interrupt status bit: a used buffer was added to a queue.
pub const INT_USED_RING: u32 = 0x1;
/// Interrupt status bit: the device configuration changed.
pub const INT_CONFIG: u32 = 0x2;

/// The device side of one virtio-mmio interrupt line: the `InterruptStatus` register and the irqfd
/// that KVM turns into an IOAPIC edge on the device's IRQ.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl VirtioInterrupt {
    /// A new line with a fresh non-blocking eventfd (register it with KVM as an irqfd).
    pub fn new() -> std::io::Result<Self> {
        Ok(VirtioInterrupt { status: AtomicU32::new(0), irqfd: EventFd::new(EFD_NONBLOCK)? })
    }

    /// The eventfd to register with `KVM_IRQFD`.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Tells the driver a used buffer is ready.
    pub fn signal_used_queue(&self) {
        self.signal(INT_USED_RING)
    }

    /// Tells the driver the configuration space changed.
    pub fn signal_config_changed(&self) {
        self.signal(INT_CONFIG)
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(err) = self.irqfd.write(1) {
            tracing::warn!(%err, "virtio interrupt could not be raised");
        }
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets status bits without raising the interrupt (a snapshot's restore: the interrupt controller
    /// already holds the line's state).
    pub fn set_status(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
    }

    /// The driver acknowledged `bits` (`InterruptACK`).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// What a device receives when the driver sets `DRIVER_OK`, and keeps until it is reset.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The queues as the driver configured them, one per entry of [`VirtioDevice::queue_max_sizes`].
    pub queues: Vec<Queue>,
    /// The device's interrupt line.
    pub interrupt: Arc<VirtioInterrupt>,
}

impl ActivateContext {
    /// Returns chain `head` to the driver on queue `queue` with `len` bytes written. A ring the guest
    /// corrupted is logged, not fatal.
    pub fn add_used(&mut self, queue: usize, head: u16, len: u32) {
        if let Err(err) = self.queues[queue].add_used(&self.mem, head, len) {
            tracing::debug!(queue, head, %err, "used ring update failed");
        }
    }

    /// Raises the interrupt for `queue` unless the driver suppressed it (a failing check errs on
    /// signalling).
    pub fn notify(&mut self, queue: usize) {
        if self.queues[queue].needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal_used_queue();
        }
    }

    /// Serves every available chain of `queue` with `handle`, which also gets guest memory (see
    /// [`serve_queue`]).
    pub fn serve<F>(&mut self, queue: usize, mut handle: F)
    where
        F: FnMut(&GuestMemory, DescriptorChain<&GuestMemory>) -> u32,
    {
        let mem = &self.mem;
        serve_queue(&mut self.queues[queue], mem, &self.interrupt, |chain| handle(mem, chain))
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured a queue that does not fit in guest memory.
    #[error("queue {0} is not valid (size, alignment or addresses outside guest memory)")]
    InvalidQueue(usize),
    /// The backend could not be set up (tap offload flags, socket, ...).
    #[error("device backend could not be started")]
    Backend(#[source] std::io::Error),
}

/// A virtio device model. The transport calls the configuration methods from vCPU threads; the event
/// loop calls `process_*` from its own thread. Both go through one mutex.
pub trait VirtioDevice: Send {
    /// The virtio device ID ([`ids`]).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers, including [`features::VERSION_1`].
    fn avail_features(&self) -> u64;
    /// The features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, acked: u64);
    /// Reads the device-specific configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops serving the queues and forgets them (driver reset). Idempotent.
    fn reset(&mut self);
    /// Whether the device is activated.
    fn is_activated(&self) -> bool;
    /// The queues an activated device serves, as they stand (for a snapshot); `None` before activation.
    fn active_queues(&self) -> Option<&[Queue]>;
    /// Called once the device was started again from a snapshot, in a new VMM: the host side of the
    /// device (sockets, connections) is new, and the device tells the driver what it lost.
    fn restored(&mut self) {}
    /// The guest notified queue `index`; process what is available. A no-op before activation.
    fn process_queue(&mut self, index: usize);
    /// Host file descriptors the event loop should poll for this device (tap, listening socket, ...).
    /// The set may change after `activate`, `process_queue` or `process_backend`; the event loop asks
    /// again after each of those calls.
    ///
    /// A device must keep an fd open until a call of this method no longer lists it (close it on the
    /// next call at the earliest): the loop unregisters fds it is no longer given, and an fd closed
    /// while still registered could be reused by a new socket the loop would then never poll.
    fn backend_fds(&self) -> Vec<(RawFd, EventSet)> {
        Vec::new()
    }
    /// A backend fd returned by `backend_fds` is ready.
    fn process_backend(&mut self, _fd: RawFd, _events: EventSet) {}
}

/// Reads a little-endian configuration structure `config` at `offset` into `data`, zero-filling what
/// lies past its end (shared by every device's `read_config`).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else { return };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// Serves every chain the driver has made available on `queue`: `handle` processes one chain and
/// returns the used length (bytes it wrote into the chain's buffers), the chain goes back on the used
/// ring, and the driver is interrupted once at the end if it asked for it (honouring
/// [`features::RING_EVENT_IDX`] when the queue has it enabled). Shared by the request/response
/// devices (block, rng).
pub fn serve_queue<F>(queue: &mut Queue, mem: &GuestMemory, interrupt: &VirtioInterrupt, mut handle: F)
where
    F: FnMut(DescriptorChain<&GuestMemory>) -> u32,
{
    let mut used = false;
    loop {
        // Suppressing notifications while draining saves the guest exits we would ignore anyway.
        if let Err(err) = queue.disable_notification(mem) {
            tracing::warn!(%err, "virtio queue notifications could not be disabled");
        }
        let mut popped = 0usize;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            popped += 1;
            let head = chain.head_index();
            let len = handle(chain);
            match queue.add_used(mem, head, len) {
                Ok(()) => used = true,
                Err(err) => tracing::warn!(head, %err, "descriptor chain could not be returned to the driver"),
            }
        }
        // Re-enabling reports chains added while notifications were off; look again for those. A ring
        // that claims more chains but yields none is corrupt: stop rather than spin on it.
        match queue.enable_notification(mem) {
            Ok(true) if popped > 0 => continue,
            Ok(true) => {
                tracing::warn!("virtio available ring index is invalid; queue ignored until the next notification")
            }
            Ok(false) => {}
            Err(err) => tracing::warn!(%err, "virtio queue notifications could not be enabled"),
        }
        break;
    }
    // A guest whose used_event cannot be read still gets its interrupt: a spurious one is harmless,
    // a missing one hangs the driver.
    if used && queue.needs_notification(mem).unwrap_or(true) {
        interrupt.signal_used_queue();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_status_is_set_signalled_and_acked() {
        let irq = VirtioInterrupt::new().unwrap();
        irq.signal_used_queue();
        irq.signal_config_changed();
        assert_eq!(irq.status(), INT_USED_RING | INT_CONFIG);
        assert_eq!(irq.irqfd().read().unwrap(), 2);
        irq.ack(INT_USED_RING);
        assert_eq!(irq.status(), INT_CONFIG);
    }

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let mut buf = [0xffu8; 4];
        read_config_bytes(&[1, 2, 3], 1, &mut buf);
        assert_eq!(buf, [2, 3, 0, 0]);
        read_config_bytes(&[1, 2, 3], 9, &mut buf);
        assert_eq!(buf, [0; 4]);
        read_config_bytes(&[1, 2, 3], u64::MAX, &mut buf);
        assert_eq!(buf, [0; 4]);
    }
}
