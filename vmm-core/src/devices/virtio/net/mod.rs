//! virtio-net backed by a host tap device.
//!
//! The controller creates the tap; [`Tap::open`] only attaches to it. Frames cross the tap with the
//! 12-byte `virtio_net_hdr_v1` in front (`IFF_VNET_HDR`), which is exactly the header the guest puts
//! in front of every frame, so TX is one copy of the guest chain into one `write` and RX is one `read`
//! copied into the guest chain. No offloads are offered, so every header is all zero (`num_buffers`
//! aside) and the host kernel never sees a GSO or partial-checksum request from the guest.

mod device;
mod mac;
mod spoof;
mod tap;

#[cfg(any(test, feature = "fuzzing"))]
pub mod guest_driver;
#[cfg(test)]
mod tap_tests;
#[cfg(test)]
mod tests;

pub use device::{Net, NetCounters, NetError};
pub use mac::{MacAddr, MacError};
pub use spoof::{SourceFilter, Spoof};
pub use tap::{Tap, TapError};

/// Size of `virtio_net_hdr_v1` (with `num_buffers`), the header in front of every frame.
pub const VNET_HDR_LEN: usize = 12;
/// The largest header plus frame the device moves (a 64 KiB IP packet in an Ethernet frame, plus
/// the header); anything bigger is dropped.
pub const MAX_BUFFER_LEN: usize = 65562;
/// Feature bit: the device has a MAC address in its configuration space.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Queue index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Queue index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// The maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;
