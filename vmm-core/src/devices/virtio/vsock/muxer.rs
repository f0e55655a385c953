//! The host side of the vsock device: the listening unix socket, the `CONNECT <port>` handshake of
//! host clients, guest connections forwarded to `<uds_path>_<port>`, and the table of connections.
//!
//! Writes to host sockets rely on `SIGPIPE` being ignored, as it is in every Rust binary; a closed
//! peer then shows up as an `EPIPE` error, which resets the connection.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::EventSet;

use super::connection::Connection;
use super::packet::{Header, Op, HOST_CID, TYPE_STREAM};
use super::VsockError;

/// Connections at once; more guest REQUESTs are refused and the listener is no longer polled.
pub(crate) const MAX_CONNECTIONS: usize = 1024;
/// Host clients that connected but have not finished their `CONNECT` line.
const MAX_HANDSHAKES: usize = 64;
/// `CONNECT 4294967295` plus slack; a longer line is not a handshake.
const MAX_HANDSHAKE_LINE: usize = 32;
/// RSTs for unknown connections waiting for an RX buffer; beyond this they are dropped (the guest
/// times out) so that a guest that never reads cannot make the device allocate without bound.
const MAX_ORPHAN_RSTS: usize = 256;
/// Host-initiated connections get local ports from here up, away from the low ports guests use.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Identifies a connection: (host-side port, guest-side port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

/// A host client that has not finished its `CONNECT <port>\n` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Multiplexes vsock connections onto host unix sockets.
pub(crate) struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    /// `(dev, ino)` of the socket file bound here, so `Drop` never removes someone else's.
    socket_id: (u64, u64),
    listener: UnixListener,
    handshakes: HashMap<RawFd, Handshake>,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    /// Connections that may have a packet for the guest, served round robin.
    rx_queue: VecDeque<ConnKey>,
    queued: HashSet<ConnKey>,
    orphan_rsts: VecDeque<Header>,
    next_local_port: u32,
    /// Sockets given up since the last [`Muxer::end_call`], already shut down so that the host
    /// client sees the end at once. Their fds stay open until the event loop has re-read the fd
    /// set: it tracks fds by number, so a number closed and reused by a new socket before then
    /// would keep the old, dead registration and the new socket would never be polled.
    closing: Vec<UnixStream>,
    /// Sockets the event loop no longer polls; closed at the next [`Muxer::begin_call`].
    closable: Vec<UnixStream>,
}

impl Muxer {
    /// Listens on `uds_path`, replacing a stale socket file nobody listens on.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Muxer, VsockError> {
        let path = || uds_path.to_path_buf();
        if let Ok(meta) = std::fs::symlink_metadata(uds_path) {
            if !meta.file_type().is_socket() {
                return Err(VsockError::NotASocket { path: path() });
            }
            if UnixStream::connect(uds_path).is_ok() {
                return Err(VsockError::InUse { path: path() });
            }
            std::fs::remove_file(uds_path).map_err(|source| VsockError::RemoveStale { path: path(), source })?;
        }
        let listener = UnixListener::bind(uds_path).map_err(|source| VsockError::Listen { path: path(), source })?;
        listener.set_nonblocking(true).map_err(|source| VsockError::Listen { path: path(), source })?;
        let meta = std::fs::symlink_metadata(uds_path).map_err(|source| VsockError::Listen { path: path(), source })?;
        Ok(Muxer {
            guest_cid,
            uds_path: path(),
            socket_id: (meta.dev(), meta.ino()),
            listener,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            rx_queue: VecDeque::new(),
            queued: HashSet::new(),
            orphan_rsts: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            closing: Vec::new(),
            closable: Vec::new(),
        })
    }

    /// The fds to poll. Without `rx_possible` (no guest RX buffer) connection sockets are not polled
    /// for reading, since what they would yield could not be delivered.
    pub fn fds(&self, rx_possible: bool) -> Vec<(RawFd, EventSet)> {
        let mut fds = Vec::with_capacity(1 + self.handshakes.len() + self.conns.len());
        if self.handshakes.len() < MAX_HANDSHAKES && self.conns.len() < MAX_CONNECTIONS {
            fds.push((self.listener.as_raw_fd(), EventSet::IN));
        }
        fds.extend(self.handshakes.keys().map(|fd| (*fd, EventSet::IN)));
        for conn in self.conns.values() {
            let mut events = conn.interest();
            if !rx_possible {
                events.remove(EventSet::IN);
            }
            if !events.is_empty() {
                fds.push((conn.fd(), events));
            }
        }
        fds
    }

    /// Starts a `process_*` call: closes the sockets the event loop stopped polling after the last one.
    pub fn begin_call(&mut self) {
        self.closable.clear();
    }

    /// Ends a `process_*` call; the event loop re-reads the fd set right after it.
    pub fn end_call(&mut self) {
        self.closable.append(&mut self.closing);
    }

    fn retire(&mut self, stream: UnixStream) {
        let _ = stream.shutdown(std::net::Shutdown::Both);
        self.closing.push(stream);
    }

    /// An fd from [`Muxer::fds`] is ready.
    pub fn handle_event(&mut self, fd: RawFd, events: EventSet) {
        if fd == self.listener.as_raw_fd() {
            self.accept_clients();
        } else if self.handshakes.contains_key(&fd) {
            self.continue_handshake(fd);
        } else if let Some(key) = self.by_fd.get(&fd).copied() {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.on_host_event(events);
            }
            self.after_change(key);
        }
    }

    fn accept_clients(&mut self) {
        while self.handshakes.len() < MAX_HANDSHAKES {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(err) = stream.set_nonblocking(true) {
                        tracing::warn!(%err, "vsock host client dropped");
                        continue;
                    }
                    self.handshakes.insert(stream.as_raw_fd(), Handshake { stream, line: Vec::new() });
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) => {
                    tracing::warn!(path = %self.uds_path.display(), %err, "vsock accept failed");
                    break;
                }
            }
        }
    }

    /// Reads the `CONNECT` line one byte at a time: whatever follows it is stream data for the
    /// guest and must stay in the socket.
    fn continue_handshake(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else { return };
        let mut byte = [0u8; 1];
        let port = loop {
            match (&hs.stream).read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&hs.line),
                Ok(1) if hs.line.len() < MAX_HANDSHAKE_LINE => hs.line.push(byte[0]),
                Ok(_) => break None,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                Err(err) if err.kind() == ErrorKind::WouldBlock => return,
                Err(_) => break None,
            }
        };
        let Some(hs) = self.handshakes.remove(&fd) else { return };
        let Some(peer_port) = port else {
            tracing::debug!(line = %String::from_utf8_lossy(&hs.line), "vsock host client sent no valid CONNECT line");
            return self.retire(hs.stream);
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!(peer_port, "vsock connection limit reached; host client dropped");
            return self.retire(hs.stream);
        }
        let local_port = self.allocate_local_port(peer_port);
        let key = ConnKey { local_port, peer_port };
        tracing::debug!(local_port, peer_port, "vsock host client connecting to the guest");
        self.insert(key, Connection::host_initiated(hs.stream, self.guest_cid, local_port, peer_port));
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&ConnKey { local_port: port, peer_port }) {
                return port;
            }
        }
    }

    fn insert(&mut self, key: ConnKey, conn: Connection) {
        self.by_fd.insert(conn.fd(), key);
        self.conns.insert(key, conn);
        self.after_change(key);
    }

    /// Queues the connection for RX if it has something for the guest, drops it when finished.
    fn after_change(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else { return };
        if conn.is_finished() {
            tracing::debug!(local_port = key.local_port, peer_port = key.peer_port, "vsock connection closed");
            self.by_fd.remove(&conn.fd());
            if let Some(conn) = self.conns.remove(&key) {
                self.retire(conn.into_stream());
            }
        } else if conn.wants_rx() && self.queued.insert(key) {
            self.rx_queue.push_back(key);
        }
    }

    fn push_orphan_rst(&mut self, pkt: &Header) {
        if pkt.op() == Some(Op::Rst) {
            return;
        }
        if self.orphan_rsts.len() >= MAX_ORPHAN_RSTS {
            tracing::debug!(port = pkt.dst_port, "vsock rst queue full; rst dropped");
            return;
        }
        self.orphan_rsts.push_back(Header::rst_for(pkt));
    }

    /// A packet the guest sent.
    pub fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid {
            tracing::debug!(src_cid = hdr.src_cid, "vsock packet with a foreign source cid dropped");
            return;
        }
        if hdr.dst_cid != HOST_CID || hdr.kind != TYPE_STREAM {
            tracing::debug!(dst_cid = hdr.dst_cid, kind = hdr.kind, "vsock packet for no reachable stream; rst");
            return self.push_orphan_rst(hdr);
        }
        let key = ConnKey { local_port: hdr.dst_port, peer_port: hdr.src_port };
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.on_guest_packet(hdr, payload);
            return self.after_change(key);
        }
        if hdr.op() != Some(Op::Request) {
            return self.push_orphan_rst(hdr);
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!(port = hdr.dst_port, "vsock connection limit reached; guest connection refused");
            return self.push_orphan_rst(hdr);
        }
        let path = self.port_path(hdr.dst_port);
        // A unix connect does not wait for the peer to accept; it blocks only on a full backlog.
        match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
            Ok(stream) => {
                tracing::debug!(path = %path.display(), peer_port = hdr.src_port, "vsock guest connection forwarded");
                self.insert(key, Connection::guest_initiated(stream, self.guest_cid, hdr));
            }
            Err(err) => {
                tracing::debug!(path = %path.display(), %err, "vsock guest connection refused");
                self.push_orphan_rst(hdr);
            }
        }
    }

    /// `<uds_path>_<port>`.
    fn port_path(&self, port: u32) -> PathBuf {
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{port}"));
        PathBuf::from(path)
    }

    /// Whether a packet may be waiting for the guest.
    pub fn has_rx(&self) -> bool {
        !self.orphan_rsts.is_empty() || !self.rx_queue.is_empty()
    }

    /// The next packet for the guest, with at most `max_payload` data bytes put in `payload`.
    pub fn next_rx(&mut self, max_payload: usize, payload: &mut Vec<u8>) -> Option<Header> {
        if let Some(rst) = self.orphan_rsts.pop_front() {
            payload.clear();
            return Some(rst);
        }
        // Connections with nothing to send now (no data after all, or no room for it in this
        // chain) are requeued only after the walk, so that it visits each of them once.
        let mut idle = Vec::new();
        let mut pkt = None;
        while let Some(key) = self.rx_queue.pop_front() {
            self.queued.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else { continue };
            pkt = conn.next_rx(max_payload, payload);
            if pkt.is_some() {
                self.after_change(key);
                break;
            }
            idle.push(key);
        }
        for key in idle {
            self.after_change(key);
        }
        pkt
    }

    /// Drops every connection and handshake (driver reset); host clients see end of file.
    pub fn reset(&mut self) {
        let handshakes = self.handshakes.drain().map(|(_, hs)| hs.stream);
        let conns = self.conns.drain().map(|(_, conn)| conn.into_stream());
        for stream in handshakes.chain(conns).collect::<Vec<_>>() {
            self.retire(stream);
        }
        self.by_fd.clear();
        self.rx_queue.clear();
        self.queued.clear();
        self.orphan_rsts.clear();
    }

    /// Number of open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Only remove the file if it is still the socket bound here: a newer VMM may have replaced it.
        if let Ok(meta) = std::fs::symlink_metadata(&self.uds_path) {
            if (meta.dev(), meta.ino()) == self.socket_id {
                if let Err(err) = std::fs::remove_file(&self.uds_path) {
                    tracing::warn!(path = %self.uds_path.display(), %err, "vsock socket file not removed");
                }
            }
        }
    }
}

/// `CONNECT <port>` (a trailing `\r` tolerated) to the port.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.strip_suffix('\r').unwrap_or(line).strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
        for bad in
            [&b"CONNECT 4294967296"[..], b"CONNECT", b"CONNECT ", b"CONNECT +5", b"connect 5", b"CONNECT 5 6", b"\xff"]
        {
            assert_eq!(parse_connect(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
