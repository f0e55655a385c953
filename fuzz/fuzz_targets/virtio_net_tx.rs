//! virtio-net: a hostile driver's TX chains (and RX buffers) against the device, with a datagram
//! socket pair standing in for the tap. The `backend` operation delivers its bytes to the device as
//! a frame from the tap, so RX runs against the same hostile queues.
#![no_main]

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;

use ignite_fuzz::{run_program, Input};
use libfuzzer_sys::fuzz_target;
use vmm_core::devices::virtio::net::guest_driver::GuestDriver;
use vmm_core::devices::virtio::net::{MacAddr, Net, SourceFilter, Tap, QUEUE_SIZE};
use vmm_core::devices::virtio::VirtioDevice;
use vmm_sys_util::epoll::EventSet;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    // With and without an IPv4 lease: the source filter parses IPv4 and ARP only with one.
    let ipv4 = (input.u8() & 1 == 1).then_some(std::net::Ipv4Addr::new(10, 0, 0, 2));
    let (dev, host) = UnixDatagram::pair().unwrap();
    dev.set_nonblocking(true).unwrap();
    host.set_nonblocking(true).unwrap();
    let tap = Tap::from_owned_fd(dev.into(), "fuzz0");
    let mut net = Net::with_tap(tap, SourceFilter { mac: MacAddr::from_bytes(MAC), ipv4 });
    let mut guest = GuestDriver::new(2, QUEUE_SIZE);
    net.activate(guest.activate_context()).unwrap();
    let tap_fd = net.tap().as_raw_fd();
    run_program(&mut guest, 2, QUEUE_SIZE, &mut net, &mut input, |dev, frame| {
        let _ = host.send(frame);
        dev.process_backend(tap_fd, EventSet::IN);
    });
    // Whatever reached the "tap" passed the source filter: it must carry the device's MAC.
    let mut buf = vec![0u8; 70_000];
    while let Ok(n) = host.recv(&mut buf) {
        assert!(n >= 12 + 14, "frame of {n} bytes reached the tap");
        assert_eq!(&buf[12 + 6..12 + 12], &MAC, "forged source MAC reached the tap");
        assert!(buf[..12].iter().all(|&b| b == 0), "offload header reached the tap");
    }
});
