//! virtio-blk: a hostile driver's requests (header, data and status buffers anywhere, any flags, any
//! chain shape) against the request parser and executor, on a real 64-sector image file.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use ignite_fuzz::{run_program, Input};
use libfuzzer_sys::fuzz_target;
use vmm_core::devices::virtio::block::{Block, QUEUE_SIZE, SECTOR_SIZE};
use vmm_core::devices::virtio::net::guest_driver::GuestDriver;
use vmm_core::devices::virtio::VirtioDevice;
use vmm_core::DiskConfig;

const SECTORS: u64 = 64;

/// The image lives in a directory kept for the whole run, on tmpfs when there is one (FLUSH is an
/// fsync).
fn image() -> &'static PathBuf {
    static IMAGE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &IMAGE
        .get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("ignite-fuzz-blk")
                .tempdir_in("/dev/shm")
                .or_else(|_| tempfile::tempdir())
                .unwrap();
            let path = dir.path().join("disk.img");
            (dir, path)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let read_only = input.u8() & 1 == 1;
    let path = image();
    // A fresh zeroed image for every input, so that a crash reproduces from its input alone.
    std::fs::write(path, vec![0u8; (SECTORS * SECTOR_SIZE) as usize]).unwrap();
    let mut block = Block::new(&DiskConfig { path: path.clone(), read_only }).unwrap();
    let mut guest = GuestDriver::new(1, QUEUE_SIZE);
    block.activate(guest.activate_context()).unwrap();
    run_program(&mut guest, 1, QUEUE_SIZE, &mut block, &mut input, |dev, _| dev.process_queue(0));
});
