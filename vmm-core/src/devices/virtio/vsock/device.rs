//! The virtio-vsock device model: queues in, muxer out.

use std::os::fd::RawFd;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;

use super::muxer::Muxer;
use super::packet::{read_packet, write_packet, HDR_LEN, MAX_PAYLOAD};
use super::{VsockError, EVENT_QUEUE, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::config::VsockConfig;
use crate::devices::virtio::{features, ids, read_config_bytes, ActivateContext, ActivateError, VirtioDevice};

/// `virtio_vsock_event.id` of a transport reset.
const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

/// A virtio-vsock device whose host side is a unix socket.
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    acked_features: u64,
    active: Option<ActivateContext>,
    /// The guest posted no RX buffer: connection sockets are not read until it does.
    rx_waiting: bool,
    payload: Vec<u8>,
}

impl Vsock {
    /// Listens on `config.uds_path` (replacing a stale socket file) for a guest with
    /// `config.guest_cid`.
    pub fn new(config: &VsockConfig) -> Result<Vsock, VsockError> {
        if config.guest_cid < 3 || config.guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::Cid(config.guest_cid));
        }
        Ok(Vsock {
            guest_cid: config.guest_cid,
            muxer: Muxer::new(config.guest_cid, &config.uds_path)?,
            acked_features: 0,
            active: None,
            rx_waiting: false,
            payload: Vec::with_capacity(MAX_PAYLOAD),
        })
    }

    /// The guest's context ID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Open connections (for tests and metrics).
    pub fn connection_count(&self) -> usize {
        self.muxer.connection_count()
    }

    /// Hands every available TX packet to the muxer.
    fn process_tx(&mut self) {
        let Vsock { active, muxer, payload, .. } = self;
        let Some(active) = active.as_mut() else { return };
        active.serve(TX_QUEUE, |mem, chain| {
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut reader) => match read_packet(&mut reader, payload) {
                    Ok(hdr) => muxer.handle_guest_packet(&hdr, payload),
                    Err(err) => tracing::debug!(head, %err, "vsock tx packet dropped"),
                },
                Err(err) => tracing::debug!(head, %err, "vsock tx chain outside guest memory"),
            }
            0
        });
    }

    /// Fills RX chains with what the muxer has for the guest.
    fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else { return };
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(chain) = active.queues[RX_QUEUE].pop_descriptor_chain(&active.mem) else {
                self.rx_waiting = true;
                break;
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(&active.mem) {
                Ok(writer) if writer.available_bytes() >= HDR_LEN => writer,
                result => {
                    // Unusable for any packet: give it back empty rather than hold it forever.
                    tracing::debug!(head, ok = result.is_ok(), "vsock rx chain too small or outside guest memory");
                    active.add_used(RX_QUEUE, head, 0);
                    used = true;
                    continue;
                }
            };
            let Some(hdr) = self.muxer.next_rx(writer.available_bytes() - HDR_LEN, &mut self.payload) else {
                // Nothing after all (e.g. the socket had no data): keep the chain for later.
                active.queues[RX_QUEUE].go_to_previous_position();
                break;
            };
            let len = match write_packet(&mut writer, &hdr, &self.payload) {
                Ok(len) => len as u32,
                Err(err) => {
                    tracing::debug!(head, %err, "vsock rx packet lost: chain could not be written");
                    0
                }
            };
            active.add_used(RX_QUEUE, head, len);
            used = true;
        }
        if used {
            active.notify(RX_QUEUE);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        ids::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        features::VERSION_1
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(offset, "write to read-only vsock config ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 3 {
            return Err(ActivateError::InvalidQueue(ctx.queues.len().min(3)));
        }
        if let Some(index) = ctx.queues.iter().position(|q| !q.is_valid(&ctx.mem)) {
            return Err(ActivateError::InvalidQueue(index));
        }
        self.active = Some(ctx);
        self.rx_waiting = false;
        // Kicks before DRIVER_OK were ignored.
        self.process_tx();
        self.process_rx();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.rx_waiting = false;
        self.muxer.reset();
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn active_queues(&self) -> Option<&[virtio_queue::Queue]> {
        self.active.as_ref().map(|active| active.queues.as_slice())
    }

    /// The host's connections did not survive the snapshot: the driver gets a transport reset event
    /// (virtio 1.2, 5.10.6.6), so the guest resets its connections (its listeners stay) and host
    /// clients connect again.
    fn restored(&mut self) {
        let Some(active) = self.active.as_mut() else { return };
        let mem = active.mem.clone();
        let Some(chain) = active.queues[EVENT_QUEUE].pop_descriptor_chain(&mem) else {
            tracing::warn!("the guest posted no event buffer: it is not told of the vsock transport reset");
            return;
        };
        let head = chain.head_index();
        let buffer = chain.clone().find(|d| d.is_write_only() && d.len() >= 4);
        let sent = buffer.is_some_and(|d| mem.write_obj(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, d.addr()).is_ok());
        active.add_used(EVENT_QUEUE, head, if sent { 4 } else { 0 });
        active.notify(EVENT_QUEUE);
    }

    fn process_queue(&mut self, index: usize) {
        self.muxer.begin_call();
        match index {
            RX_QUEUE => {
                self.rx_waiting = false;
                self.process_rx();
            }
            TX_QUEUE => {
                self.process_tx();
                self.process_rx();
            }
            // The guest's event buffers are kept for transport events, which are never sent.
            EVENT_QUEUE => {}
            _ => tracing::debug!(index, "notification for a queue vsock does not have"),
        }
        self.muxer.end_call();
    }

    fn backend_fds(&self) -> Vec<(RawFd, EventSet)> {
        if self.active.is_none() {
            // Host clients wait in the listen backlog until the driver is up.
            return Vec::new();
        }
        self.muxer.fds(!self.rx_waiting)
    }

    fn process_backend(&mut self, fd: RawFd, events: EventSet) {
        self.muxer.begin_call();
        self.muxer.handle_event(fd, events);
        self.process_rx();
        self.muxer.end_call();
    }
}
