//! The virtio-net device model: queue 0 receives from the tap, queue 1 transmits to it.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use virtio_queue::{DescriptorChain, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::{
    MacAddr, MacError, SourceFilter, Tap, TapError, MAX_BUFFER_LEN, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_MAC,
    VNET_HDR_LEN,
};
use crate::config::NetConfig;
use crate::devices::virtio::{
    features, ids, read_config_bytes, ActivateContext, ActivateError, GuestMemory, VirtioDevice,
};

/// Why a network device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The configured MAC address is unusable.
    #[error(transparent)]
    Mac(#[from] MacError),
    /// The tap device could not be attached.
    #[error(transparent)]
    Tap(#[from] TapError),
}

/// Frame counters, for tests and metrics. Drops are counted so that none is silent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames written to the tap.
    pub tx_frames: u64,
    /// Guest frames dropped (bad chain, wrong size, tap write error, forged source).
    pub tx_dropped: u64,
    /// Of `tx_dropped`: frames from a source MAC or IPv4 address that is not the guest's.
    pub tx_spoofed: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Tap frames dropped (too big, or the guest's buffer was too small).
    pub rx_dropped: u64,
}

/// The receive side's state that outlives one `process_*` call.
struct RxState {
    /// Bounce buffer for one tap frame; one byte longer than the largest accepted frame so that a
    /// longer one shows up as too long rather than as silently truncated.
    buf: Box<[u8]>,
    /// Length of a frame read from the tap and not yet given to the guest.
    pending: Option<usize>,
    /// The guest has no receive buffer: the tap is not polled until it posts some, so that
    /// frames wait in the tap's queue instead of being read and dropped.
    waiting_for_buffers: bool,
    /// A read failed for good (the tap was deleted under us): a dead tap polls as always ready,
    /// so it is no longer polled at all.
    tap_failed: bool,
}

/// Outcome of offering the pending frame to one receive chain.
enum RxOutcome {
    /// The frame was written into a chain.
    Delivered,
    /// The guest has no receive buffer.
    NoBuffer,
    /// The chain could not take the frame; it was returned empty.
    ChainRejected {
        /// Whether the frame was dropped with it (too small a chain) or stays pending (bad chain).
        frame_dropped: bool,
    },
}

/// A virtio-net device on a host tap.
pub struct Net {
    tap: Tap,
    mac: MacAddr,
    filter: SourceFilter,
    acked_features: u64,
    active: Option<ActivateContext>,
    rx: RxState,
    tx_buf: Vec<u8>,
    counters: NetCounters,
}

impl Net {
    /// Parses the MAC and attaches to the existing tap `config.tap`.
    pub fn new(config: &NetConfig) -> Result<Net, NetError> {
        let mac: MacAddr = config.mac.parse()?;
        let tap = Tap::open(&config.tap)?;
        Ok(Net::with_tap(tap, SourceFilter { mac, ipv4: config.ipv4 }))
    }

    /// A device on an already attached tap, sending only what `filter` allows.
    pub fn with_tap(tap: Tap, filter: SourceFilter) -> Net {
        Net {
            tap,
            mac: filter.mac,
            filter,
            acked_features: 0,
            active: None,
            rx: RxState {
                buf: vec![0; MAX_BUFFER_LEN + 1].into_boxed_slice(),
                pending: None,
                waiting_for_buffers: false,
                tap_failed: false,
            },
            tx_buf: Vec::with_capacity(MAX_BUFFER_LEN),
            counters: NetCounters::default(),
        }
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The tap the device is attached to.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// Frame counters since creation.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Sends every available TX chain to the tap.
    fn process_tx(&mut self) {
        let Net { active, tap, tx_buf, counters, filter, .. } = self;
        let Some(active) = active.as_mut() else { return };
        active.serve(TX_QUEUE, |mem, chain| {
            let head = chain.head_index();
            let frame = read_tx_frame(chain, mem, tx_buf).and_then(|()| {
                filter.check(&tx_buf[VNET_HDR_LEN..]).map_err(|_| {
                    counters.tx_spoofed += 1;
                    "forged source (not the guest's MAC or IPv4 address)"
                })
            });
            match frame {
                Ok(()) => match tap.write_frame(tx_buf) {
                    Ok(n) if n == tx_buf.len() => counters.tx_frames += 1,
                    Ok(n) => {
                        tracing::debug!(tap = tap.name(), n, len = tx_buf.len(), "tap took part of a frame");
                        counters.tx_dropped += 1;
                    }
                    Err(err) => {
                        // A full tap queue (WouldBlock) or a tap that is down: like a NIC, drop.
                        tracing::debug!(tap = tap.name(), %err, "tx frame dropped: tap write failed");
                        counters.tx_dropped += 1;
                    }
                },
                Err(reason) => {
                    tracing::debug!(tap = tap.name(), head, reason, "tx frame dropped");
                    counters.tx_dropped += 1;
                }
            }
            0
        });
    }

    /// Moves frames from the tap into RX chains until the tap is empty or the guest has no buffer.
    fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else { return };
        let mut used = false;
        loop {
            let len = match self.rx.pending {
                Some(len) => len,
                None if self.rx.tap_failed => break,
                None => match self.tap.read_frame(&mut self.rx.buf) {
                    Ok(n) if !(VNET_HDR_LEN..=MAX_BUFFER_LEN).contains(&n) => {
                        tracing::debug!(tap = self.tap.name(), len = n, "rx frame dropped: bad size");
                        self.counters.rx_dropped += 1;
                        continue;
                    }
                    Ok(n) => {
                        self.rx.pending = Some(n);
                        n
                    }
                    Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                    Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                    Err(err) => {
                        tracing::error!(tap = self.tap.name(), %err, "tap read failed; receiving stopped");
                        self.rx.tap_failed = true;
                        break;
                    }
                },
            };
            match offer_rx_frame(active, &mut self.rx.buf[..len]) {
                RxOutcome::Delivered => {
                    self.rx.pending = None;
                    self.counters.rx_frames += 1;
                    used = true;
                }
                RxOutcome::NoBuffer => {
                    self.rx.waiting_for_buffers = true;
                    break;
                }
                RxOutcome::ChainRejected { frame_dropped } => {
                    if frame_dropped {
                        self.rx.pending = None;
                        self.counters.rx_dropped += 1;
                    }
                    used = true;
                }
            }
        }
        if used {
            active.notify(RX_QUEUE);
        }
    }
}

/// Copies a TX chain (header + frame) into `buf`, with the header cleared.
fn read_tx_frame(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    buf: &mut Vec<u8>,
) -> Result<(), &'static str> {
    let mut reader = chain.reader(mem).map_err(|_| "descriptor chain outside guest memory")?;
    let len = reader.available_bytes();
    if len < VNET_HDR_LEN {
        return Err("chain shorter than the virtio-net header");
    }
    if len > MAX_BUFFER_LEN {
        return Err("frame too long");
    }
    buf.resize(len, 0);
    reader.read_exact(buf).map_err(|_| "chain could not be read")?;
    // No offload was negotiated, so a valid header is all zero; clearing it keeps a buggy or
    // hostile guest from asking the host kernel for checksum or segmentation work.
    buf[..VNET_HDR_LEN].fill(0);
    Ok(())
}

/// Writes `frame` (header + Ethernet frame) into the next RX chain.
fn offer_rx_frame(active: &mut ActivateContext, frame: &mut [u8]) -> RxOutcome {
    let Some(chain) = active.queues[RX_QUEUE].pop_descriptor_chain(&active.mem) else {
        return RxOutcome::NoBuffer;
    };
    let head = chain.head_index();
    // Without VIRTIO_NET_F_MRG_RXBUF the device must report one buffer; the tap leaves these two
    // bytes of the 12-byte header untouched.
    frame[10..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
    let outcome = match chain.writer(&active.mem) {
        Err(_) => {
            tracing::debug!(head, "rx chain outside guest memory; returned empty");
            RxOutcome::ChainRejected { frame_dropped: false }
        }
        Ok(writer) if writer.available_bytes() < frame.len() => {
            tracing::debug!(
                head,
                len = frame.len(),
                room = writer.available_bytes(),
                "rx frame dropped: chain too small"
            );
            RxOutcome::ChainRejected { frame_dropped: true }
        }
        Ok(mut writer) => match writer.write_all(frame) {
            Ok(()) => RxOutcome::Delivered,
            Err(err) => {
                tracing::debug!(head, %err, "rx chain could not be written; returned empty");
                RxOutcome::ChainRejected { frame_dropped: false }
            }
        },
    };
    let len = if matches!(outcome, RxOutcome::Delivered) { frame.len() as u32 } else { 0 };
    active.add_used(RX_QUEUE, head, len);
    outcome
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        ids::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        features::VERSION_1 | VIRTIO_NET_F_MAC
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // `struct virtio_net_config` up to `mac`: the other fields exist only with their features.
        read_config_bytes(&self.mac.bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(tap = self.tap.name(), offset, "write to read-only net config ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 2 {
            return Err(ActivateError::InvalidQueue(ctx.queues.len().min(2)));
        }
        if let Some(index) = ctx.queues.iter().position(|q| !q.is_valid(&ctx.mem)) {
            return Err(ActivateError::InvalidQueue(index));
        }
        self.active = Some(ctx);
        self.rx.waiting_for_buffers = false;
        // The driver may have queued frames and kicked before DRIVER_OK, when kicks were ignored.
        self.process_tx();
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.rx.pending = None;
        self.rx.waiting_for_buffers = false;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn active_queues(&self) -> Option<&[virtio_queue::Queue]> {
        self.active.as_ref().map(|active| active.queues.as_slice())
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX_QUEUE => {
                self.rx.waiting_for_buffers = false;
                self.process_rx();
            }
            TX_QUEUE => self.process_tx(),
            _ => tracing::debug!(tap = self.tap.name(), index, "notification for a queue net does not have"),
        }
    }

    fn backend_fds(&self) -> Vec<(RawFd, EventSet)> {
        if self.active.is_some() && !self.rx.waiting_for_buffers && !self.rx.tap_failed {
            vec![(self.tap.as_raw_fd(), EventSet::IN)]
        } else {
            Vec::new()
        }
    }

    fn process_backend(&mut self, fd: RawFd, _events: EventSet) {
        if fd == self.tap.as_raw_fd() {
            self.process_rx();
        }
    }
}
