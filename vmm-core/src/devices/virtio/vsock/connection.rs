//! One vsock stream between a guest port and a host unix socket: its state machine and its
//! credit-based flow control.
//!
//! Credit, both ways (virtio 1.2, 5.10.6.3): each side advertises `buf_alloc` (its receive buffer
//! for the connection) and `fwd_cnt` (bytes it has consumed from it) in every header. A sender may
//! have at most `peer_buf_alloc - (sent - peer_fwd_cnt)` bytes in flight. Here, guest data waits in
//! `to_host` until the host socket takes it, so `to_host.len()` is exactly the guest's in-flight
//! count and the buffer can never grow past [`CONN_BUF_ALLOC`] unless the guest cheats (then: RST).

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::packet::{Header, Op, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// The receive buffer the device advertises for each connection.
pub(crate) const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Send a credit update once the guest believes less than this much of our buffer is free.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConnState {
    /// Host-initiated: the REQUEST is owed or sent, the guest's RESPONSE has not arrived.
    LocalInit,
    /// Data flows (possibly in one direction only, after a partial SHUTDOWN from the guest).
    Established,
    /// The host socket reached end of file; the guest was told (SHUTDOWN) and should answer RST.
    LocalClosed,
    /// The guest closed both directions; buffered data is flushed to the host, then RST.
    PeerClosed,
    /// Finished; removed once any owed RST has been sent.
    Closed,
}

/// Control packets owed to the guest; sent before data, in field order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Owed {
    rst: bool,
    request: bool,
    response: bool,
    credit_update: bool,
    credit_request: bool,
}

impl Owed {
    fn any(&self) -> bool {
        *self != Owed::default()
    }
}

/// A stream between guest port `peer_port` and host port `local_port`.
#[derive(Debug)]
pub(crate) struct Connection {
    stream: UnixStream,
    state: ConnState,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    owed: Owed,
    /// Guest data the host socket has not taken yet.
    to_host: VecDeque<u8>,
    /// The host socket reported readable and has not returned `WouldBlock` since.
    host_readable: bool,
    /// `SHUTDOWN_*` flags the guest sent.
    peer_shutdown: u32,
    host_write_shut: bool,
    /// Bytes written to the host socket (our `fwd_cnt`).
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as of the last header sent: what the guest knows.
    fwd_cnt_told: Wrapping<u32>,
    /// Payload bytes received from the guest.
    recv_cnt: Wrapping<u32>,
    /// Payload bytes sent to the guest.
    sent_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
}

impl Connection {
    fn new(stream: UnixStream, state: ConnState, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        Connection {
            stream,
            state,
            guest_cid,
            local_port,
            peer_port,
            owed: Owed::default(),
            to_host: VecDeque::new(),
            host_readable: false,
            peer_shutdown: 0,
            host_write_shut: false,
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            recv_cnt: Wrapping(0),
            sent_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
        }
    }

    /// A host client asked (`CONNECT <peer_port>`) for the guest's `peer_port`: a REQUEST is owed.
    pub fn host_initiated(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut conn = Connection::new(stream, ConnState::LocalInit, guest_cid, local_port, peer_port);
        conn.owed.request = true;
        conn
    }

    /// The guest's REQUEST `req` was connected to a host socket: a RESPONSE is owed.
    pub fn guest_initiated(stream: UnixStream, guest_cid: u64, req: &Header) -> Self {
        let mut conn = Connection::new(stream, ConnState::Established, guest_cid, req.dst_port, req.src_port);
        conn.peer_buf_alloc = req.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(req.fwd_cnt);
        conn.owed.response = true;
        conn
    }

    /// The host socket's fd.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Gives up the connection, keeping its host socket open (see the muxer's deferred close).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// The current state.
    #[cfg(test)]
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// Whether the connection is over and owes the guest nothing: the muxer drops it.
    pub fn is_finished(&self) -> bool {
        self.state == ConnState::Closed && !self.owed.rst
    }

    /// How many payload bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.sent_cnt - self.peer_fwd_cnt).0;
        // A bogus `fwd_cnt` ahead of what was sent shows up as a huge in-flight count: no credit.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether host data may be read and sent to the guest now.
    fn can_send_data(&self) -> bool {
        self.state == ConnState::Established && self.peer_shutdown & SHUTDOWN_RCV == 0 && self.peer_credit() > 0
    }

    /// Whether [`Connection::next_rx`] may produce a packet.
    pub fn wants_rx(&self) -> bool {
        self.owed.any() || (self.host_readable && self.can_send_data())
    }

    /// What to poll the host socket for. Readability only matters while data can be sent and is
    /// not already known to be waiting; polling for it otherwise would spin on a level-triggered fd.
    pub fn interest(&self) -> EventSet {
        let mut events = EventSet::empty();
        if !self.host_readable && self.can_send_data() {
            events |= EventSet::IN;
        }
        if !self.to_host.is_empty() && matches!(self.state, ConnState::Established | ConnState::PeerClosed) {
            events |= EventSet::OUT;
        }
        events
    }

    /// The host socket is ready.
    pub fn on_host_event(&mut self, events: EventSet) {
        // Hang-ups and errors surface as a read of 0 bytes or an error, handled in `next_rx`.
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR) {
            self.host_readable = true;
        }
        if events.contains(EventSet::OUT) {
            self.flush_to_host();
        }
    }

    /// Sends RST and ends the connection.
    fn kill(&mut self) {
        self.owed = Owed { rst: true, ..Owed::default() };
        self.state = ConnState::Closed;
    }

    /// A packet from the guest addressed to this connection.
    pub fn on_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        use ConnState::*;
        match (self.state, hdr.op()) {
            (_, Some(Op::Rst)) => {
                // The guest is gone: nothing more to send, not even an RST.
                self.owed = Owed::default();
                self.state = Closed;
            }
            (Closed, _) => {}
            (_, Some(Op::CreditRequest)) => self.owed.credit_update = true,
            (_, Some(Op::CreditUpdate)) => {}
            (LocalInit, Some(Op::Response)) => self.accepted_by_guest(),
            (Established, Some(Op::Rw)) => self.accept_data(payload),
            (Established, Some(Op::Shutdown)) => {
                self.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    self.state = PeerClosed;
                }
                self.flush_to_host();
            }
            // Both sides are done: confirm with RST, as Linux does.
            (LocalClosed, Some(Op::Shutdown)) => self.kill(),
            // Data for a host socket that has closed or for a guest that said it was done sending.
            (LocalClosed | PeerClosed, Some(Op::Rw)) => {
                tracing::debug!(local = self.local_port, peer = self.peer_port, "vsock data after close dropped")
            }
            (state, op) => {
                tracing::debug!(?state, ?op, raw = hdr.op, local = self.local_port, "unexpected vsock packet; reset");
                self.kill();
            }
        }
    }

    /// The guest accepted a host-initiated connection: tell the host client its port.
    fn accepted_by_guest(&mut self) {
        self.state = ConnState::Established;
        // The socket is fresh and this line is tiny, so it fits the socket buffer in one write.
        let line = format!("OK {}\n", self.local_port);
        match (&self.stream).write(line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            result => {
                tracing::debug!(local = self.local_port, ?result, "vsock host client could not be told OK");
                self.kill();
            }
        }
    }

    /// Guest data (RW) for the host socket.
    fn accept_data(&mut self, payload: &[u8]) {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            tracing::debug!(local = self.local_port, "vsock data after the guest's send shutdown; reset");
            return self.kill();
        }
        if self.to_host.len() + payload.len() > CONN_BUF_ALLOC as usize {
            tracing::warn!(local = self.local_port, peer = self.peer_port, "guest overran its vsock credit; reset");
            return self.kill();
        }
        self.to_host.extend(payload);
        self.recv_cnt += payload.len() as u32;
        self.flush_to_host();
    }

    /// Writes buffered guest data to the host socket as far as it takes it.
    fn flush_to_host(&mut self) {
        while !self.to_host.is_empty() {
            let (chunk, _) = self.to_host.as_slices();
            match (&self.stream).write(chunk) {
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += n as u32;
                }
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) => {
                    tracing::debug!(local = self.local_port, %err, "vsock host socket write failed; reset");
                    return self.kill();
                }
            }
        }
        if self.to_host.is_empty() {
            if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
                self.host_write_shut = true;
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
            }
            if self.state == ConnState::PeerClosed {
                return self.kill();
            }
        }
        // What the guest believes is still free in our buffer, going by the last fwd_cnt it saw.
        let told_free = CONN_BUF_ALLOC.saturating_sub((self.recv_cnt - self.fwd_cnt_told).0);
        if self.fwd_cnt != self.fwd_cnt_told && told_free < CREDIT_UPDATE_THRESHOLD {
            self.owed.credit_update = true;
        }
    }

    /// A header from the host side of this connection; it carries our current credit.
    fn header(&mut self, op: Op) -> Header {
        self.fwd_cnt_told = self.fwd_cnt;
        self.owed.credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            kind: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, with at most `max_payload` bytes of data read into `payload`.
    pub fn next_rx(&mut self, max_payload: usize, payload: &mut Vec<u8>) -> Option<Header> {
        payload.clear();
        let owed = self.owed;
        if owed.rst {
            self.owed.rst = false;
            return Some(self.header(Op::Rst));
        }
        if owed.request {
            self.owed.request = false;
            return Some(self.header(Op::Request));
        }
        if owed.response {
            self.owed.response = false;
            return Some(self.header(Op::Response));
        }
        if owed.credit_update {
            return Some(self.header(Op::CreditUpdate));
        }
        if owed.credit_request {
            self.owed.credit_request = false;
            return Some(self.header(Op::CreditRequest));
        }
        if self.host_readable && self.can_send_data() {
            return self.read_host_data(max_payload, payload);
        }
        None
    }

    /// Reads host data for one RW packet; end of file becomes a SHUTDOWN, an error an RST.
    fn read_host_data(&mut self, max_payload: usize, payload: &mut Vec<u8>) -> Option<Header> {
        let want = max_payload.min(MAX_PAYLOAD).min(self.peer_credit() as usize);
        if want == 0 {
            return None;
        }
        payload.resize(want, 0);
        loop {
            match (&self.stream).read(payload) {
                Ok(0) => {
                    payload.clear();
                    self.host_readable = false;
                    self.state = ConnState::LocalClosed;
                    let mut hdr = self.header(Op::Shutdown);
                    hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
                    return Some(hdr);
                }
                Ok(n) => {
                    payload.truncate(n);
                    self.sent_cnt += n as u32;
                    if self.peer_credit() == 0 {
                        // Linux refreshes credit on its own once its reader drains, but asking
                        // costs one packet and covers peers that wait to be asked.
                        self.owed.credit_request = true;
                    }
                    let mut hdr = self.header(Op::Rw);
                    hdr.len = n as u32;
                    return Some(hdr);
                }
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => {
                    payload.clear();
                    self.host_readable = false;
                    if err.kind() == ErrorKind::WouldBlock {
                        return None;
                    }
                    tracing::debug!(local = self.local_port, %err, "vsock host socket read failed; reset");
                    self.kill();
                    self.owed.rst = false;
                    return Some(self.header(Op::Rst));
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
