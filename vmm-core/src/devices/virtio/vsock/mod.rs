//! virtio-vsock with a Firecracker-style host side on unix sockets.
//!
//! - Host to guest: a client connects to `uds_path` and writes `CONNECT <port>\n`; the device sends
//!   the guest a REQUEST for `port` and, once the guest answers RESPONSE, writes `OK <host_port>\n`
//!   back (an RST closes the client instead). After that the socket carries the stream.
//! - Guest to host: a guest connection to host port P is connected to the unix socket
//!   `<uds_path>_P`; if nothing listens there the guest gets an RST.
//!
//! `packet` is the wire format, `connection` one stream's state machine and credit accounting,
//! `muxer` the sockets and the connection table, `device` the virtio queues.

mod connection;
mod device;
mod muxer;
mod packet;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use device::Vsock;
pub use packet::{Header, Op, HDR_LEN, HOST_CID};

/// Queue index of the receive queue (device to guest).
pub const RX_QUEUE: usize = 0;
/// Queue index of the transmit queue (guest to device).
pub const TX_QUEUE: usize = 1;
/// Queue index of the event queue (transport events; none are sent).
pub const EVENT_QUEUE: usize = 2;
/// The maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// Why a vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved (0 to 2) or does not fit the 32 bits guests use.
    #[error("vsock guest cid {0} is not between 3 and 2^32-1")]
    Cid(u64),
    /// Something other than a socket is in the way.
    #[error("{path} exists and is not a unix socket")]
    NotASocket {
        /// The configured socket path.
        path: PathBuf,
    },
    /// Another process listens on the path.
    #[error("{path} is in use by a listening process")]
    InUse {
        /// The configured socket path.
        path: PathBuf,
    },
    /// A stale socket file could not be removed.
    #[error("cannot remove stale socket {path}")]
    RemoveStale {
        /// The configured socket path.
        path: PathBuf,
        /// The removal error.
        #[source]
        source: std::io::Error,
    },
    /// Binding or configuring the listening socket failed.
    #[error("cannot listen on {path}")]
    Listen {
        /// The configured socket path.
        path: PathBuf,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
}
