//! Net device tests against in-process guest memory, with a datagram socket pair standing in for
//! the tap (it keeps frame boundaries, as a tap does).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;

use vmm_sys_util::epoll::EventSet;

use super::guest_driver::{Desc, GuestDriver, DESC_NEXT};
use super::*;
use crate::config::NetConfig;
use crate::devices::virtio::{features, ids, VirtioDevice};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

struct Setup {
    net: Net,
    host: UnixDatagram,
    guest: GuestDriver,
}

/// The device's source filter: its MAC, any IPv4 source.
fn own() -> SourceFilter {
    SourceFilter { mac: MacAddr::from_bytes(MAC), ipv4: None }
}

fn setup() -> Setup {
    let (dev, host) = UnixDatagram::pair().unwrap();
    dev.set_nonblocking(true).unwrap();
    host.set_nonblocking(true).unwrap();
    let mut net = Net::with_tap(Tap::from_owned_fd(dev.into(), "fake0"), own());
    let guest = GuestDriver::new(2, QUEUE_SIZE);
    net.activate(guest.activate_context()).unwrap();
    Setup { net, host, guest }
}

/// A header (flags set, as a confused guest might) followed by a minimal Ethernet frame.
fn guest_frame(tag: u8) -> Vec<u8> {
    let mut frame = vec![0u8; VNET_HDR_LEN];
    frame[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM, never negotiated
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&MAC);
    frame.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    frame.extend(std::iter::repeat_n(tag, 46));
    frame
}

fn host_recv(host: &UnixDatagram) -> Option<Vec<u8>> {
    let mut buf = vec![0; MAX_BUFFER_LEN + 16];
    match host.recv(&mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(err) => panic!("{err}"),
    }
}

fn tap_fds(net: &Net) -> Vec<i32> {
    net.backend_fds().into_iter().map(|(fd, _)| fd).collect()
}

#[test]
fn identity_features_and_config_space() {
    let s = setup();
    assert_eq!(s.net.device_type(), ids::NET);
    assert_eq!(s.net.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    assert_eq!(s.net.avail_features(), features::VERSION_1 | VIRTIO_NET_F_MAC);
    let mut cfg = [0xaa; 8];
    s.net.read_config(0, &mut cfg);
    assert_eq!(cfg, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0]);
    let mut tail = [0xaa; 4];
    s.net.read_config(4, &mut tail);
    assert_eq!(tail, [0x34, 0x56, 0, 0]);
}

#[test]
fn new_reports_a_bad_mac_before_touching_the_tap() {
    let err =
        Net::new(&NetConfig { tap: "tap-does-not-0".into(), mac: "52:54:00:12:34".into(), ipv4: None }).err().unwrap();
    assert!(matches!(err, NetError::Mac(MacError::Syntax(_))), "{err}");
    assert!(err.to_string().contains("\"52:54:00:12:34\""), "{err}");
}

#[test]
fn new_names_a_missing_tap() {
    let err =
        Net::new(&NetConfig { tap: "ignnotap0".into(), mac: "52:54:00:12:34:56".into(), ipv4: None }).err().unwrap();
    assert!(matches!(err, NetError::Tap(TapError::NotFound(_))), "{err}");
    assert!(err.to_string().contains("ignnotap0"), "{err}");
}

#[test]
fn tx_gathers_a_split_chain_into_one_frame_with_a_clean_header() {
    let mut s = setup();
    let frame = guest_frame(7);
    let hdr = s.guest.alloc(VNET_HDR_LEN as u64);
    let body = s.guest.alloc(frame.len() as u64);
    s.guest.write(hdr, &frame[..VNET_HDR_LEN]);
    s.guest.write(body, &frame[VNET_HDR_LEN..]);
    let head = s.guest.add_chain(
        TX_QUEUE,
        &[
            Desc { addr: hdr, len: VNET_HDR_LEN as u32, writable: false },
            Desc { addr: body, len: (frame.len() - VNET_HDR_LEN) as u32, writable: false },
        ],
    );
    s.net.process_queue(TX_QUEUE);

    let sent = host_recv(&s.host).expect("one frame on the tap");
    assert_eq!(sent[..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
    assert_eq!(sent[VNET_HDR_LEN..], frame[VNET_HDR_LEN..]);
    assert!(host_recv(&s.host).is_none());
    assert_eq!(s.guest.take_used(TX_QUEUE), vec![(head, 0)]);
    assert_eq!(s.guest.interrupt.irqfd().read().unwrap(), 1);
    assert_eq!(s.net.counters().tx_frames, 1);
}

#[test]
fn tx_drops_frames_from_another_mac_or_address_and_counts_them() {
    let (dev, host) = UnixDatagram::pair().unwrap();
    dev.set_nonblocking(true).unwrap();
    host.set_nonblocking(true).unwrap();
    let lease = std::net::Ipv4Addr::new(10, 61, 0, 2);
    let mut net = Net::with_tap(Tap::from_owned_fd(dev.into(), "fake2"), SourceFilter { ipv4: Some(lease), ..own() });
    let mut guest = GuestDriver::new(2, QUEUE_SIZE);
    net.activate(guest.activate_context()).unwrap();
    let ipv4_frame = |src_mac: [u8; 6], src_ip: [u8; 4]| {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&src_ip);
        f.extend_from_slice(&[10, 61, 0, 1]);
        f
    };
    let mut other_mac = MAC;
    other_mac[5] ^= 1;
    for frame in
        [ipv4_frame(other_mac, lease.octets()), ipv4_frame(MAC, [10, 61, 0, 1]), ipv4_frame(MAC, lease.octets())]
    {
        let buf = guest.alloc(frame.len() as u64);
        guest.write(buf, &frame);
        guest.add_chain(TX_QUEUE, &[Desc { addr: buf, len: frame.len() as u32, writable: false }]);
    }
    net.process_queue(TX_QUEUE);
    let sent = host_recv(&host).expect("the guest's own frame reaches the tap");
    assert_eq!(sent[VNET_HDR_LEN + 6..VNET_HDR_LEN + 12], MAC);
    assert!(host_recv(&host).is_none(), "the forged frames never reach the tap");
    assert_eq!(guest.take_used(TX_QUEUE).len(), 3, "every chain is returned to the guest");
    let counters = net.counters();
    assert_eq!((counters.tx_frames, counters.tx_dropped, counters.tx_spoofed), (1, 2, 2));
}

#[test]
fn rx_waits_for_guest_buffers_instead_of_dropping() {
    let mut s = setup();
    let tap_fd = s.net.tap().as_raw_fd();
    assert_eq!(s.net.backend_fds(), vec![(tap_fd, EventSet::IN)]);
    let mut first = vec![0xee; VNET_HDR_LEN];
    first.extend_from_slice(&guest_frame(1)[VNET_HDR_LEN..]);
    s.host.send(&first).unwrap();
    s.host.send(&guest_frame(2)).unwrap();

    // No buffer yet: the frame is held and the tap is no longer polled (no busy loop).
    s.net.process_backend(tap_fd, EventSet::IN);
    assert!(tap_fds(&s.net).is_empty());
    assert!(s.guest.take_used(RX_QUEUE).is_empty());

    s.guest.add_writable(RX_QUEUE, MAX_BUFFER_LEN as u32);
    s.net.process_queue(RX_QUEUE);
    let got = s.guest.take_used_data(RX_QUEUE);
    assert_eq!(got.len(), 1);
    // The header comes through as the tap wrote it, except num_buffers, which must be 1.
    assert_eq!(got[0][..10], [0xee; 10]);
    assert_eq!(got[0][10..12], [1, 0]);
    assert_eq!(got[0][VNET_HDR_LEN..], first[VNET_HDR_LEN..]);
    assert!(tap_fds(&s.net).is_empty(), "the second frame is pending, still no buffer");

    // Split over two writable descriptors this time.
    let a = s.guest.alloc(20);
    let b = s.guest.alloc(100);
    s.guest
        .add_chain(RX_QUEUE, &[Desc { addr: a, len: 20, writable: true }, Desc { addr: b, len: 100, writable: true }]);
    s.net.process_queue(RX_QUEUE);
    let used = s.guest.take_used(RX_QUEUE);
    let second = guest_frame(2);
    assert_eq!(used[0].1 as usize, second.len());
    let mut joined = s.guest.read(a, 20);
    joined.extend(s.guest.read(b, second.len() - 20));
    assert_eq!(joined[VNET_HDR_LEN..], second[VNET_HDR_LEN..]);
    assert_eq!(s.net.counters().rx_frames, 2);
    assert_eq!(s.net.counters().rx_dropped, 0);
    assert_eq!(tap_fds(&s.net), vec![tap_fd], "buffers may be left: poll the tap again");
}

#[test]
fn rx_drops_frames_for_chains_too_small_and_skips_bad_chains() {
    let mut s = setup();
    let tap_fd = s.net.tap().as_raw_fd();
    s.host.send(&guest_frame(3)).unwrap();
    s.host.send(&guest_frame(4)).unwrap();
    s.host.send(&guest_frame(5)).unwrap();
    // Outside guest memory: returned empty, the frame stays for the next chain.
    s.guest.add_chain(RX_QUEUE, &[Desc { addr: 0xffff_0000_0000, len: 4096, writable: true }]);
    // Too small: frame 3 is dropped and counted.
    s.guest.add_writable(RX_QUEUE, 30);
    // Read-only buffer on the RX queue: no room at all, frame 4 is dropped.
    s.guest.add_readable(RX_QUEUE, &[0; 64]);
    let last = s.guest.alloc(4096);
    s.guest.add_chain(RX_QUEUE, &[Desc { addr: last, len: 4096, writable: true }]);
    s.net.process_backend(tap_fd, EventSet::IN);
    let used = s.guest.take_used(RX_QUEUE);
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), vec![0, 0, 0, guest_frame(5).len() as u32]);
    assert_eq!(s.guest.read(last, 64)[VNET_HDR_LEN..], guest_frame(5)[VNET_HDR_LEN..64]);
    assert_eq!(s.net.counters().rx_dropped, 2);
    assert_eq!(s.net.counters().rx_frames, 1);
}

#[test]
fn rx_drops_frames_above_the_maximum() {
    let mut s = setup();
    s.host.send(&vec![0; MAX_BUFFER_LEN + 1]).unwrap();
    s.host.send(&[0; VNET_HDR_LEN - 1]).unwrap();
    s.guest.add_writable(RX_QUEUE, MAX_BUFFER_LEN as u32 + 100);
    s.net.process_queue(RX_QUEUE);
    assert!(s.guest.take_used(RX_QUEUE).is_empty());
    assert_eq!(s.net.counters().rx_dropped, 2);
}

#[test]
fn hostile_tx_chains_are_consumed_without_panicking() {
    let mut s = setup();
    // Outside guest memory.
    s.guest.add_chain(TX_QUEUE, &[Desc { addr: u64::MAX - 8, len: 64, writable: false }]);
    // Shorter than the header, and a device-writable-only chain (nothing to read).
    s.guest.add_readable(TX_QUEUE, &[0; VNET_HDR_LEN - 1]);
    s.guest.add_writable(TX_QUEUE, 128);
    // Longer than any frame.
    s.guest.add_readable(TX_QUEUE, &vec![0; MAX_BUFFER_LEN + 1]);
    // Descriptor table entry out of range as head.
    s.guest.push_avail(TX_QUEUE, QUEUE_SIZE + 3);
    s.net.process_queue(TX_QUEUE);
    assert!(host_recv(&s.host).is_none());
    assert_eq!(s.net.counters().tx_dropped, 5);
    assert_eq!(s.guest.take_used(TX_QUEUE).len(), 4, "an out-of-range head cannot be returned");

    // A descriptor that chains to itself: the walk stops after queue-size descriptors.
    let buf = s.guest.alloc(100);
    s.guest.write_desc(TX_QUEUE, 200, buf, 100, DESC_NEXT, 200);
    s.guest.push_avail(TX_QUEUE, 200);
    s.net.process_queue(TX_QUEUE);
    assert_eq!(s.guest.take_used(TX_QUEUE), vec![(200, 0)]);

    // Nothing is processed before activation or after reset.
    s.net.reset();
    s.guest.add_readable(TX_QUEUE, &guest_frame(9));
    s.net.process_queue(TX_QUEUE);
    s.net.process_queue(7);
    assert!(!s.net.is_activated());
    assert!(s.net.backend_fds().is_empty());
}

#[test]
fn activation_checks_the_queues() {
    let (dev, _host) = UnixDatagram::pair().unwrap();
    let mut net = Net::with_tap(Tap::from_owned_fd(dev.into(), "fake1"), own());
    let guest = GuestDriver::new(1, QUEUE_SIZE);
    let err = net.activate(guest.activate_context()).unwrap_err();
    assert!(matches!(err, crate::devices::virtio::ActivateError::InvalidQueue(1)), "{err}");
    assert!(!net.is_activated());
}

#[test]
fn a_tap_that_fails_for_good_is_no_longer_polled() {
    // Reading a write-only fd fails with EBADF, as reading a deleted tap fails with EBADFD.
    let dead = std::fs::OpenOptions::new().write(true).open("/dev/null").unwrap();
    let mut net = Net::with_tap(Tap::from_owned_fd(dead.into(), "gone0"), own());
    let mut guest = GuestDriver::new(2, QUEUE_SIZE);
    net.activate(guest.activate_context()).unwrap();
    guest.add_writable(RX_QUEUE, 2048);
    assert_eq!(tap_fds(&net).len(), 1);
    net.process_backend(net.tap().as_raw_fd(), EventSet::IN);
    assert!(tap_fds(&net).is_empty());
    net.process_queue(RX_QUEUE);
    assert!(tap_fds(&net).is_empty());
    assert!(guest.take_used(RX_QUEUE).is_empty());
}
