//! The virtio-mmio register file: any sequence of guest register reads and writes (any offset, any
//! access size) in front of each device model, with the event loop's reaction to queue
//! notifications, so that queues configured by a hostile driver reach the devices too.
#![no_main]

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use ignite_fuzz::Input;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes as _, GuestAddress};
use vmm_core::bus::BusDevice;
use vmm_core::devices::virtio::block::Block;
use vmm_core::devices::virtio::mmio::MmioTransport;
use vmm_core::devices::virtio::net::guest_driver::GuestDriver;
use vmm_core::devices::virtio::net::{MacAddr, Net, SourceFilter, Tap};
use vmm_core::devices::virtio::rng::Rng;
use vmm_core::devices::virtio::vsock::Vsock;
use vmm_core::devices::virtio::VirtioDevice;
use vmm_core::{DiskConfig, VsockConfig};

/// Register accesses per input.
const MAX_OPS: usize = 512;
/// Guest memory the fuzzer pokes: the driver's 8 MiB.
const MEM: u64 = 0x80_0000;

struct Files {
    _dir: tempfile::TempDir,
    disk: PathBuf,
    uds: PathBuf,
}

fn files() -> &'static Files {
    static FILES: OnceLock<Files> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("ignite-fuzz-mmio")
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let disk = dir.path().join("disk.img");
        let uds = dir.path().join("v.sock");
        Files { _dir: dir, disk, uds }
    })
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    // The guest driver is used for its memory only: the queues are wherever the register writes put them.
    let guest = GuestDriver::new(1, 1);
    let mut _tap_peer = None;
    let device: Arc<Mutex<dyn VirtioDevice>> = match input.u8() % 4 {
        0 => Arc::new(Mutex::new(Rng::new())),
        1 => {
            std::fs::write(&files().disk, vec![0u8; 16 * 512]).unwrap();
            Arc::new(Mutex::new(Block::new(&DiskConfig { path: files().disk.clone(), read_only: false }).unwrap()))
        }
        2 => {
            let (dev, host) = UnixDatagram::pair().unwrap();
            dev.set_nonblocking(true).unwrap();
            _tap_peer = Some(host);
            let filter = SourceFilter { mac: MacAddr::from_bytes([0x52, 0x54, 0, 0, 0, 1]), ipv4: None };
            Arc::new(Mutex::new(Net::with_tap(Tap::from_owned_fd(dev.into(), "fuzz0"), filter)))
        }
        _ => Arc::new(Mutex::new(Vsock::new(&VsockConfig { guest_cid: 3, uds_path: files().uds.clone() }).unwrap())),
    };
    let mut transport = MmioTransport::new(guest.mem.clone(), device.clone()).unwrap();
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        // Offsets mostly inside the 4 KiB window, registers and config space alike.
        let offset = u64::from(input.u16() & 0x1fff);
        let len = usize::from(op >> 4) % 9;
        match op % 4 {
            0 => {
                let mut buf = vec![0u8; len];
                transport.read(offset, &mut buf);
            }
            1 => {
                let value = input.take(len);
                transport.write(offset, value);
            }
            2 => {
                // Ring contents, descriptors, buffers: anywhere in guest memory.
                let at = u64::from(input.u32()) % MEM;
                let n = usize::from(input.u8());
                let room = usize::try_from(MEM - at).unwrap();
                guest.mem.write_slice(input.take(n.min(room)), GuestAddress(at)).unwrap();
            }
            _ => {
                // What the event loop does: every notified queue is processed.
                for (index, evt) in transport.queue_evts().iter().enumerate() {
                    if evt.read().is_ok() {
                        vmm_core::bus::lock(&device).process_queue(index);
                    }
                }
            }
        }
    }
});
