//! virtio-vsock: a hostile driver's TX packets (any header, any length, any op, for connections that
//! exist or not) and RX buffers against the device and its muxer, with real unix sockets on the host
//! side: a listener on `<uds>_1024` accepts guest connections to port 1024, and the `backend`
//! operation plays host clients and peers.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;

use ignite_fuzz::{run_program, Input};
use libfuzzer_sys::fuzz_target;
use vmm_core::devices::virtio::net::guest_driver::GuestDriver;
use vmm_core::devices::virtio::vsock::{Vsock, QUEUE_SIZE};
use vmm_core::devices::virtio::VirtioDevice;
use vmm_core::VsockConfig;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent};

/// Host port with a listener: guest REQUESTs to it connect.
const PORT: u32 = 1024;

struct Host {
    _dir: tempfile::TempDir,
    uds: PathBuf,
    port_listener: UnixListener,
}

fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("ignite-fuzz-vsock").tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let port_listener = UnixListener::bind(dir.path().join(format!("v.sock_{PORT}"))).unwrap();
        port_listener.set_nonblocking(true).unwrap();
        Host { _dir: dir, uds, port_listener }
    })
}

/// One round of the event loop: what is ready among the device's fds is dispatched.
fn pump(dev: &mut dyn VirtioDevice) {
    let epoll = Epoll::new().unwrap();
    for (fd, events) in dev.backend_fds() {
        epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, fd as u64)).unwrap();
    }
    let mut ready = [EpollEvent::default(); 32];
    let n = epoll.wait(0, &mut ready).unwrap();
    for event in &ready[..n] {
        dev.process_backend(event.fd(), event.event_set());
    }
}

fuzz_target!(|data: &[u8]| {
    let host = host();
    let mut input = Input::new(data);
    let mut dev = Vsock::new(&VsockConfig { guest_cid: 3, uds_path: host.uds.clone() }).unwrap();
    let mut guest = GuestDriver::new(3, QUEUE_SIZE);
    dev.activate(guest.activate_context()).unwrap();
    // Host clients (CONNECT handshakes) and the host ends of guest connections to PORT.
    let mut clients: Vec<UnixStream> = Vec::new();
    let mut peers: Vec<UnixStream> = Vec::new();
    run_program(&mut guest, 3, QUEUE_SIZE, &mut dev, &mut input, |dev, bytes| {
        let (&what, rest) = bytes.split_first().unwrap_or((&0, &[]));
        while let Ok((stream, _)) = host.port_listener.accept() {
            stream.set_nonblocking(true).unwrap();
            peers.push(stream);
        }
        match what % 4 {
            // A host client connects and sends `rest` (a CONNECT line, data after it).
            0 if clients.len() < 8 => {
                if let Ok(mut client) = UnixStream::connect(&host.uds) {
                    client.set_nonblocking(true).unwrap();
                    let _ = client.write(rest);
                    clients.push(client);
                }
            }
            // Every host end writes `rest` to the guest.
            1 => {
                for stream in clients.iter_mut().chain(peers.iter_mut()) {
                    let _ = stream.write(rest);
                }
            }
            // The host side hangs up.
            2 => {
                clients.clear();
                peers.clear();
            }
            _ => {}
        }
        pump(dev);
    });
    drop(dev);
    while host.port_listener.accept().is_ok() {}
});
