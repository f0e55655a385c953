//! The net device on a real tap. The test re-executes itself under `unshare --net`, so the whole
//! child process lives in a fresh network namespace: the tap, its 10.200.0.0/24 address and every
//! packet exist only there, and nothing outside the namespace can be addressed.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::guest_driver::GuestDriver;
use super::*;
use crate::config::NetConfig;
use crate::devices::virtio::VirtioDevice;

const CHILD_ENV: &str = "IGNITE_TEST_IN_PRIVATE_NETNS";
const TEST_NAME: &str = "devices::virtio::net::tap_tests::real_tap_in_a_private_network_namespace";
const TAP: &str = "igntap0";
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const HOST_PORT: u16 = 40000;
const GUEST_PORT: u16 = 50000;

#[test]
fn real_tap_in_a_private_network_namespace() {
    if std::env::var_os(CHILD_ENV).is_some() {
        in_private_namespace();
        return;
    }
    if let Some(reason) = skip_reason() {
        eprintln!("skipping: {reason}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(exe)
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "namespaced test failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "namespaced test did not run:\n{stdout}\n{stderr}");
}

fn skip_reason() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|l| l.split_whitespace().nth(1));
    if euid != Some("0") {
        return Some("tap test needs root".into());
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    match Command::new("unshare").args(["--net", "--", "ip", "-o", "link"]).output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!("cannot create a network namespace: {}", String::from_utf8_lossy(&out.stderr).trim())),
        Err(err) => Some(format!("unshare or ip not runnable: {err}")),
    }
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn in_private_namespace() {
    // Refuse to touch anything unless this really is a fresh namespace.
    let links = ip(&["-o", "link"]);
    assert_eq!(links.lines().count(), 1, "not a private network namespace:\n{links}");
    assert!(links.contains(": lo:"), "{links}");

    ip(&["tuntap", "add", "dev", "igntun0", "mode", "tun"]);
    let err =
        Net::new(&NetConfig { tap: "igntun0".into(), mac: "52:54:00:12:34:56".into(), ipv4: None }).err().unwrap();
    assert!(matches!(err, NetError::Tap(TapError::Attach { .. })), "{err}");
    assert!(err.to_string().contains("igntun0"), "{err}");

    ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]);
    ip(&["addr", "add", "10.200.0.1/24", "dev", TAP]);
    ip(&["link", "set", TAP, "up"]);
    ip(&["neigh", "add", "10.200.0.2", "lladdr", "52:54:00:12:34:56", "dev", TAP]);
    let link = ip(&["-o", "link", "show", TAP]);
    let tap_mac: MacAddr =
        link.split("link/ether ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();

    let config = NetConfig { tap: TAP.into(), mac: "52:54:00:12:34:56".into(), ipv4: Some(GUEST_IP) };
    let mut net = Net::new(&config).unwrap();
    let mut guest = GuestDriver::new(2, QUEUE_SIZE);
    net.activate(guest.activate_context()).unwrap();
    let host = UdpSocket::bind(SocketAddrV4::new(HOST_IP, HOST_PORT)).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    // TX: a UDP datagram from the guest reaches a host socket on the tap's address.
    let mut frame = vec![0u8; VNET_HDR_LEN];
    frame.extend(udp_frame(tap_mac.bytes(), GUEST_MAC, GUEST_IP, HOST_IP, GUEST_PORT, HOST_PORT, b"from the guest"));
    guest.add_readable(TX_QUEUE, &frame);
    net.process_queue(TX_QUEUE);
    assert_eq!(net.counters().tx_frames, 1);
    let mut buf = [0u8; 128];
    let (n, from) = host.recv_from(&mut buf).expect("the guest's datagram reaches the host");
    assert_eq!(&buf[..n], b"from the guest");
    assert_eq!(from, SocketAddrV4::new(GUEST_IP, GUEST_PORT).into());

    // A datagram that claims another source address (here the neighbour 10.200.0.9) never leaves.
    let mut forged = vec![0u8; VNET_HDR_LEN];
    let neighbour = Ipv4Addr::new(10, 200, 0, 9);
    forged.extend(udp_frame(tap_mac.bytes(), GUEST_MAC, neighbour, HOST_IP, GUEST_PORT, HOST_PORT, b"forged"));
    guest.add_readable(TX_QUEUE, &forged);
    net.process_queue(TX_QUEUE);
    assert_eq!((net.counters().tx_frames, net.counters().tx_spoofed), (1, 1));
    host.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(host.recv_from(&mut buf).is_err(), "a forged datagram reached the host");
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    // RX: a datagram to the guest's address arrives in a guest buffer with a plain header.
    for _ in 0..8 {
        guest.add_writable(RX_QUEUE, 2048);
    }
    net.process_queue(RX_QUEUE);
    // The kernel activates the tap's qdisc asynchronously once the carrier comes up (link watch,
    // up to a second later) and drops what is sent before, so resend until one arrives.
    let deadline = Instant::now() + Duration::from_secs(10);
    let received = 'wait: loop {
        host.send_to(b"from the host", SocketAddrV4::new(GUEST_IP, GUEST_PORT)).unwrap();
        for _ in 0..10 {
            net.process_backend(net.tap().as_raw_fd(), EventSet::IN);
            // The kernel also sends IPv6 housekeeping frames; look for ours and repost buffers.
            let frames = guest.take_used_data(RX_QUEUE);
            if let Some(f) = frames.iter().find(|f| is_udp_to(f, GUEST_PORT)) {
                break 'wait f.clone();
            }
            for _ in &frames {
                guest.add_writable(RX_QUEUE, 2048);
            }
            net.process_queue(RX_QUEUE);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(Instant::now() < deadline, "no frame reached the guest: {:?}", net.counters());
    };
    let (hdr, eth) = received.split_at(VNET_HDR_LEN);
    assert_eq!(hdr[0] & 1, 0, "no partial checksum without offloads");
    assert_eq!(hdr[1], 0, "no gso without offloads");
    assert_eq!(hdr[10..12], [1, 0], "num_buffers");
    assert_eq!(eth[..6], GUEST_MAC);
    assert_eq!(eth[6..12], tap_mac.bytes());
    assert_eq!(&eth[14 + 20 + 8..], b"from the host");
    assert_eq!(net.counters().rx_dropped, 0);
}

fn is_udp_to(frame: &[u8], port: u16) -> bool {
    let eth = &frame[VNET_HDR_LEN..];
    eth.len() >= 14 + 28
        && eth[12..14] == [0x08, 0x00]
        && eth[14 + 9] == 17
        && eth[14 + 22..14 + 24] == port.to_be_bytes()
}

/// An Ethernet + IPv4 + UDP frame (UDP checksum 0, which IPv4 allows).
fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = ip.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend(ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}
