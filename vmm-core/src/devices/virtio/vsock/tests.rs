//! The vsock device end to end against in-process guest memory and real unix sockets: the test
//! plays the guest driver on the queues and the host clients on the sockets.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};

use super::packet::{MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::*;
use crate::config::VsockConfig;
use crate::devices::virtio::net::guest_driver::{Desc, GuestDriver, DESC_NEXT};
use crate::devices::virtio::{features, ids, VirtioDevice};

const CID: u64 = 3;

struct Setup {
    dev: Vsock,
    guest: GuestDriver,
    uds: PathBuf,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    setup_with(|guest| {
        for _ in 0..8 {
            guest.add_writable(RX_QUEUE, 4096 + HDR_LEN as u32);
        }
    })
}

/// A device on a fresh socket path, activated after `post_rx` posted the guest's RX buffers.
fn setup_with(post_rx: impl FnOnce(&mut GuestDriver)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let mut dev = Vsock::new(&VsockConfig { guest_cid: CID, uds_path: uds.clone() }).unwrap();
    let mut guest = GuestDriver::new(3, QUEUE_SIZE);
    post_rx(&mut guest);
    dev.activate(guest.activate_context()).unwrap();
    Setup { dev, guest, uds, _dir: dir }
}

impl Setup {
    /// One round of the event loop: wait briefly for the device's fds and dispatch what is ready.
    fn pump(&mut self) {
        let epoll = Epoll::new().unwrap();
        for (fd, events) in self.dev.backend_fds() {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, fd as u64)).unwrap();
        }
        let mut ready = [EpollEvent::default(); 16];
        let n = epoll.wait(10, &mut ready).unwrap();
        for event in &ready[..n] {
            self.dev.process_backend(event.fd(), event.event_set());
        }
    }

    /// The guest sends one packet.
    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let mut bytes = Header { len: payload.len() as u32, ..hdr }.encode().to_vec();
        bytes.extend_from_slice(payload);
        self.guest.add_readable(TX_QUEUE, &bytes);
        self.dev.process_queue(TX_QUEUE);
    }

    /// Packets the device delivered since the last call; their buffers are reposted.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.guest.take_used_data(RX_QUEUE);
        if !used.is_empty() {
            for _ in &used {
                self.guest.add_writable(RX_QUEUE, 4096 + HDR_LEN as u32);
            }
            self.dev.process_queue(RX_QUEUE);
        }
        used.into_iter().map(|b| (Header::decode(b[..HDR_LEN].try_into().unwrap()), b[HDR_LEN..].to_vec())).collect()
    }

    /// Runs the loop until the guest has received a packet, and returns it.
    fn next_packet(&mut self) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut pending = Vec::new();
        loop {
            pending.extend(self.received());
            if !pending.is_empty() {
                assert_eq!(pending.len(), 1, "one packet expected: {pending:?}");
                return pending.remove(0);
            }
            assert!(Instant::now() < deadline, "the guest received nothing");
            self.pump();
        }
    }

    fn assert_quiet(&mut self) {
        for _ in 0..3 {
            self.pump();
        }
        assert_eq!(self.received(), vec![]);
    }
}

/// A packet from guest port `src` to host port `dst`.
fn guest_pkt(op: Op, src: u32, dst: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port: src,
        dst_port: dst,
        kind: TYPE_STREAM,
        op: op as u16,
        buf_alloc: 64 * 1024,
        ..Header::default()
    }
}

fn host_client(uds: &std::path::Path) -> UnixStream {
    let stream = UnixStream::connect(uds).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream
}

fn read_exactly(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn identity_and_config_space() {
    let s = setup();
    assert_eq!(s.dev.device_type(), ids::VSOCK);
    assert_eq!(s.dev.queue_max_sizes().len(), 3);
    assert_eq!(s.dev.avail_features(), features::VERSION_1);
    let mut cfg = [0xff; 12];
    s.dev.read_config(0, &mut cfg);
    assert_eq!(cfg, [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn host_initiated_connection_carries_data_both_ways_until_rst() {
    let mut s = setup();
    let mut host = host_client(&s.uds);
    // Data right behind the CONNECT line must not be eaten by the handshake.
    host.write_all(b"CONNECT 1234\nearly").unwrap();
    let (req, _) = s.next_packet();
    assert_eq!((req.op(), req.src_cid, req.dst_cid, req.dst_port), (Some(Op::Request), HOST_CID, CID, 1234));
    let local = req.src_port;
    assert!(local >= 1 << 30);

    s.send(guest_pkt(Op::Response, 1234, local), &[]);
    assert_eq!(read_exactly(&mut host, format!("OK {local}\n").len()), format!("OK {local}\n").into_bytes());
    let (rw, data) = s.next_packet();
    assert_eq!((rw.op(), rw.dst_port, data.as_slice()), (Some(Op::Rw), 1234, &b"early"[..]));

    host.write_all(b"ping").unwrap();
    let (rw, data) = s.next_packet();
    assert_eq!((rw.op(), data.as_slice()), (Some(Op::Rw), &b"ping"[..]));

    s.send(guest_pkt(Op::Rw, 1234, local), b"pong");
    assert_eq!(read_exactly(&mut host, 4), b"pong");
    s.send(guest_pkt(Op::CreditRequest, 1234, local), &[]);
    let (upd, _) = s.next_packet();
    assert_eq!((upd.op(), upd.fwd_cnt), (Some(Op::CreditUpdate), 4));

    s.send(guest_pkt(Op::Rst, 1234, local), &[]);
    assert_eq!(host.read(&mut [0u8; 8]).unwrap(), 0, "the rst closes the host client");
    assert_eq!(s.dev.connection_count(), 0);
    s.assert_quiet();
}

#[test]
fn guest_refusal_closes_the_host_client_without_ok() {
    let mut s = setup();
    let mut host = host_client(&s.uds);
    host.write_all(b"CONNECT 77\n").unwrap();
    let (req, _) = s.next_packet();
    s.send(guest_pkt(Op::Rst, 77, req.src_port), &[]);
    assert_eq!(host.read(&mut [0u8; 8]).unwrap(), 0);
    assert_eq!(s.dev.connection_count(), 0);
}

#[test]
fn bad_handshakes_are_closed_without_bothering_the_guest() {
    let mut s = setup();
    let mut host = host_client(&s.uds);
    host.write_all(b"HELLO 1234\n").unwrap();
    let mut long = host_client(&s.uds);
    long.write_all(&[b'9'; 100]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut closed = 0;
    for client in [&mut host, &mut long] {
        client.set_nonblocking(true).unwrap();
        loop {
            s.pump();
            match client.read(&mut [0u8; 8]) {
                Ok(0) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => assert!(Instant::now() < deadline),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                other => panic!("{other:?}"),
            }
        }
        closed += 1;
    }
    assert_eq!(closed, 2);
    s.assert_quiet();
}

#[test]
fn guest_initiated_connection_is_forwarded_to_the_port_socket() {
    let mut s = setup();
    let listener = UnixListener::bind(format!("{}_5000", s.uds.display())).unwrap();
    s.send(guest_pkt(Op::Request, 40000, 5000), &[]);
    let (mut host, _) = listener.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (resp, _) = s.next_packet();
    assert_eq!((resp.op(), resp.src_port, resp.dst_port, resp.dst_cid), (Some(Op::Response), 5000, 40000, CID));

    s.send(guest_pkt(Op::Rw, 40000, 5000), b"hello");
    assert_eq!(read_exactly(&mut host, 5), b"hello");
    host.write_all(b"world").unwrap();
    let (rw, data) = s.next_packet();
    assert_eq!((rw.op(), data.as_slice()), (Some(Op::Rw), &b"world"[..]));

    // The host closes: the guest is told both directions are shut and answers RST.
    drop(host);
    let (shut, _) = s.next_packet();
    assert_eq!((shut.op(), shut.flags), (Some(Op::Shutdown), SHUTDOWN_RCV | SHUTDOWN_SEND));
    s.send(guest_pkt(Op::Rst, 40000, 5000), &[]);
    assert_eq!(s.dev.connection_count(), 0);
    s.assert_quiet();
}

#[test]
fn a_port_without_listener_and_unknown_streams_get_rst() {
    let mut s = setup();
    s.send(guest_pkt(Op::Request, 40001, 6000), &[]);
    let (rst, _) = s.next_packet();
    assert_eq!(
        (rst.op(), rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port),
        (Some(Op::Rst), HOST_CID, CID, 6000, 40001)
    );
    s.send(guest_pkt(Op::Rw, 40002, 6001), b"to nobody");
    assert_eq!(s.next_packet().0.op(), Some(Op::Rst));
    s.send(Header { dst_cid: 7, ..guest_pkt(Op::Request, 1, 2) }, &[]);
    assert_eq!(s.next_packet().0.op(), Some(Op::Rst));
    s.send(Header { kind: 2, ..guest_pkt(Op::Request, 1, 2) }, &[]);
    assert_eq!(s.next_packet().0.op(), Some(Op::Rst));
    // No answer to an RST, nor to a packet claiming another guest's CID.
    s.send(guest_pkt(Op::Rst, 40003, 6002), &[]);
    s.send(Header { src_cid: 9, ..guest_pkt(Op::Request, 1, 2) }, &[]);
    s.assert_quiet();
}

#[test]
fn without_rx_buffers_the_device_stops_reading_sockets() {
    let mut s = setup();
    let listener = UnixListener::bind(format!("{}_5001", s.uds.display())).unwrap();
    s.send(guest_pkt(Op::Request, 40000, 5001), &[]);
    let (mut host, _) = listener.accept().unwrap();
    s.next_packet();
    // Use up every RX buffer, then let the host send.
    let mut taken = 0;
    while s.dev.backend_fds().len() > 1 || taken == 0 {
        host.write_all(&[taken as u8; 1]).unwrap();
        s.pump();
        taken += s.guest.take_used(RX_QUEUE).len();
        assert!(taken <= 8, "more packets than buffers");
    }
    assert_eq!(taken, 8);
    host.write_all(b"waits").unwrap();
    s.pump();
    assert!(s.guest.take_used(RX_QUEUE).is_empty());
    let fds = s.dev.backend_fds();
    assert_eq!(fds.len(), 1, "only the listener is polled: {fds:?}");

    // One buffer: the waiting data goes into it at once, and the socket is polled again.
    s.guest.add_writable(RX_QUEUE, 4096 + HDR_LEN as u32);
    s.dev.process_queue(RX_QUEUE);
    let used = s.guest.take_used_data(RX_QUEUE);
    assert_eq!(used.len(), 1);
    assert!(used[0].ends_with(b"waits"), "{used:?}");
    s.guest.add_writable(RX_QUEUE, 4096 + HDR_LEN as u32);
    s.dev.process_queue(RX_QUEUE);
    assert_eq!(s.dev.backend_fds().len(), 2);
    assert!(s.guest.take_used(RX_QUEUE).is_empty());
}

#[test]
fn hostile_chains_never_panic() {
    let mut s = setup();
    let good = guest_pkt(Op::Request, 1, 6003).encode();
    // Too short, payload beyond the maximum, payload beyond the chain, outside guest memory.
    s.guest.add_readable(TX_QUEUE, &good[..HDR_LEN - 1]);
    s.guest.add_readable(TX_QUEUE, &Header { len: MAX_PAYLOAD as u32 + 1, ..guest_pkt(Op::Rw, 1, 2) }.encode());
    s.guest.add_readable(TX_QUEUE, &Header { len: 10, ..guest_pkt(Op::Rw, 1, 2) }.encode());
    s.guest.add_chain(TX_QUEUE, &[Desc { addr: 0xffff_ffff_0000, len: 64, writable: false }]);
    s.guest.push_avail(TX_QUEUE, QUEUE_SIZE + 1);
    s.dev.process_queue(TX_QUEUE);
    assert_eq!(s.guest.take_used(TX_QUEUE).len(), 4);
    s.assert_quiet();

    // A descriptor chained to itself: the walk ends after queue-size descriptors.
    let buf = s.guest.alloc(HDR_LEN as u64);
    s.guest.write(buf, &good);
    s.guest.write_desc(TX_QUEUE, 100, buf, HDR_LEN as u32, DESC_NEXT, 100);
    s.guest.push_avail(TX_QUEUE, 100);
    s.dev.process_queue(TX_QUEUE);
    assert_eq!(s.guest.take_used(TX_QUEUE), vec![(100, 0)]);
    // Its first bytes are a well-formed REQUEST to a port nobody listens on.
    assert_eq!(s.next_packet().0.op(), Some(Op::Rst));

    // RX chains too small for a header or outside memory are returned empty; the RST still arrives.
    let mut s = setup_with(|guest| {
        guest.add_writable(RX_QUEUE, HDR_LEN as u32 - 1);
        guest.add_chain(RX_QUEUE, &[Desc { addr: 0xffff_ffff_0000, len: 4096, writable: true }]);
        guest.add_writable(RX_QUEUE, HDR_LEN as u32);
    });
    s.send(guest_pkt(Op::Request, 40004, 6004), &[]);
    let used = s.guest.take_used(RX_QUEUE);
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), vec![0, 0, HDR_LEN as u32]);
}

#[test]
fn socket_file_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    // A stale socket file (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&uds).unwrap());
    assert!(uds.exists());
    let dev = Vsock::new(&VsockConfig { guest_cid: CID, uds_path: uds.clone() }).unwrap();
    // A live one is not.
    let err = Vsock::new(&VsockConfig { guest_cid: CID, uds_path: uds.clone() }).err().unwrap();
    assert!(matches!(err, VsockError::InUse { .. }), "{err}");
    assert!(err.to_string().contains(&*uds.to_string_lossy()), "{err}");
    drop(dev);
    assert!(!uds.exists(), "the socket file goes with the device");

    std::fs::write(&uds, b"not a socket").unwrap();
    let err = Vsock::new(&VsockConfig { guest_cid: CID, uds_path: uds.clone() }).err().unwrap();
    assert!(matches!(err, VsockError::NotASocket { .. }), "{err}");
    let missing = dir.path().join("no/such/dir/v.sock");
    let err = Vsock::new(&VsockConfig { guest_cid: CID, uds_path: missing.clone() }).err().unwrap();
    assert!(err.to_string().contains(&*missing.to_string_lossy()), "{err}");
    let err = Vsock::new(&VsockConfig { guest_cid: 2, uds_path: dir.path().join("w.sock") }).err().unwrap();
    assert!(matches!(err, VsockError::Cid(2)), "{err}");
}

#[test]
fn a_closed_socket_keeps_its_fd_number_until_the_event_loop_has_seen_it_go() {
    let mut s = setup();
    let listener_fds = s.dev.backend_fds();
    let port = UnixListener::bind(format!("{}_5002", s.uds.display())).unwrap();
    s.send(guest_pkt(Op::Request, 40010, 5002), &[]);
    let (mut first, _) = port.accept().unwrap();
    s.next_packet();
    let old: Vec<_> = s.dev.backend_fds().into_iter().filter(|fd| !listener_fds.contains(fd)).collect();
    assert_eq!(old.len(), 1);

    // One TX batch ends the first connection and opens a second one.
    s.guest.add_readable(TX_QUEUE, &guest_pkt(Op::Rst, 40010, 5002).encode());
    s.guest.add_readable(TX_QUEUE, &guest_pkt(Op::Request, 40011, 5002).encode());
    s.dev.process_queue(TX_QUEUE);
    let _second = port.accept().unwrap();
    assert_eq!(first.read(&mut [0u8; 4]).unwrap(), 0, "the host sees the end at once");
    let new: Vec<_> = s.dev.backend_fds().into_iter().filter(|fd| !listener_fds.contains(fd)).collect();
    assert_eq!(new.len(), 1);
    assert_ne!(new[0].0, old[0].0, "the old number must not be reused before the loop re-reads the set");
    assert_eq!(s.dev.connection_count(), 1);
}
