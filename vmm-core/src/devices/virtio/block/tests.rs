//! virtio-blk against in-process guest memory, a mock driver queue and real temporary files.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::bus::BusDevice;
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_REG_OFFSET};
use crate::devices::virtio::{VirtioInterrupt, INT_USED_RING};

const HDR: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const DATA2: u64 = 0x3_0000;
const STATUS: u64 = 0x4_0000;
const OUTSIDE: u64 = 0x7fff_0000_0000;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// A disk image of `sectors` zeroed sectors named `disk-a.img` in a fresh temporary directory.
fn image(sectors: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk-a.img");
    std::fs::write(&path, vec![0u8; (sectors * SECTOR_SIZE) as usize]).unwrap();
    (dir, path)
}

fn activate(block: &mut Block, mem: &GuestMemoryMmap, queue: Queue) -> Arc<VirtioInterrupt> {
    let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
    let ctx = ActivateContext { mem: mem.clone(), queues: vec![queue], interrupt: interrupt.clone() };
    block.activate(ctx).unwrap();
    interrupt
}

fn header(mem: &GuestMemoryMmap, addr: u64, kind: u32, sector: u64) {
    mem.write_obj(kind, GuestAddress(addr)).unwrap();
    mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(addr + 8)).unwrap();
}

/// Offers one chain made of `descs` (addr, len, WRITE or 0) at descriptor index `first`.
fn offer(vq: &MockSplitQueue<GuestMemoryMmap>, first: u16, descs: &[(u64, u32, u16)]) {
    let last = descs.len() - 1;
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let next = if i < last { VRING_DESC_F_NEXT as u16 } else { 0 };
            RawDescriptor::from(Descriptor::new(addr, len, flags | next, first + i as u16 + 1))
        })
        .collect();
    vq.add_desc_chains(&raw, first).unwrap();
}

/// Offers a request (header, data descriptors, 1-byte status), serves the queue and returns the
/// status byte and the used length.
fn run(
    block: &mut Block,
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    kind: u32,
    sector: u64,
    data: &[(u64, u32, u16)],
) -> (u8, u32) {
    header(mem, HDR, kind, sector);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mut descs = vec![(HDR, 16, R)];
    descs.extend_from_slice(data);
    descs.push((STATUS, 1, W));
    let n = vq.used().idx().load();
    offer(vq, 0, &descs);
    block.process_queue(0);
    assert_eq!(vq.used().idx().load(), n + 1, "every chain is returned");
    let elem = vq.used().ring().ref_at(usize::from(n)).unwrap().load();
    assert_eq!(elem.id(), 0);
    (mem.read_obj(GuestAddress(STATUS)).unwrap(), elem.len())
}

fn new_block(sectors: u64, read_only: bool) -> (tempfile::TempDir, PathBuf, Block) {
    let (dir, path) = image(sectors);
    let block = Block::new(&DiskConfig { path: path.clone(), read_only }).unwrap();
    (dir, path, block)
}

#[test]
fn write_then_read_back_round_trips_through_the_file() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let (_dir, path, mut block) = new_block(8, false);
    let irq = activate(&mut block, &mem, vq.create_queue().unwrap());

    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 1) as u8).collect();
    mem.write_slice(&pattern[..512], GuestAddress(DATA)).unwrap();
    mem.write_slice(&pattern[512..], GuestAddress(DATA2)).unwrap();
    let out = run(&mut block, &mem, &vq, VIRTIO_BLK_T_OUT, 2, &[(DATA, 512, R), (DATA2, 512, R)]);
    assert_eq!(out, (VIRTIO_BLK_S_OK as u8, 1));
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[1024..2048], pattern.as_slice());
    assert!(file[..1024].iter().chain(&file[2048..]).all(|&b| b == 0));
    assert_eq!(irq.irqfd().read().unwrap(), 1);
    assert_eq!(irq.status() & INT_USED_RING, INT_USED_RING);

    let back = 0x5_0000;
    let read = run(&mut block, &mem, &vq, VIRTIO_BLK_T_IN, 2, &[(back, 1024, W)]);
    assert_eq!(read, (VIRTIO_BLK_S_OK as u8, 1025));
    let mut got = vec![0u8; 1024];
    mem.read_slice(&mut got, GuestAddress(back)).unwrap();
    assert_eq!(got, pattern);
    assert_eq!(irq.irqfd().read().unwrap(), 1, "interrupt raised after each completion");
}

#[test]
fn header_and_status_may_share_descriptors_with_data() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let (_dir, path, mut block) = new_block(8, false);
    activate(&mut block, &mem, vq.create_queue().unwrap());
    // Header and data in one readable buffer; status appended to a writable scratch buffer.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 1);
    mem.write_slice(&[0xab; 512], GuestAddress(HDR + 16)).unwrap();
    offer(&vq, 0, &[(HDR, 16 + 512, R), (STATUS, 4, W)]);
    block.process_queue(0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS + 3)).unwrap(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(&std::fs::read(&path).unwrap()[512..1024], &[0xab; 512]);
}

#[test]
fn flush_and_get_id_succeed() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let (_dir, _path, mut block) = new_block(8, false);
    activate(&mut block, &mem, vq.create_queue().unwrap());
    assert_eq!(run(&mut block, &mem, &vq, VIRTIO_BLK_T_FLUSH, 0, &[]), (VIRTIO_BLK_S_OK as u8, 1));

    let (status, len) = run(&mut block, &mem, &vq, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, W)]);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK as u8, 21));
    let mut id = [0u8; ID_BYTES];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"disk-a.img\0\0\0\0\0\0\0\0\0\0");
    assert_eq!(block.serial(), &id);
}

#[test]
fn unknown_request_types_are_unsupported() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let (_dir, _path, mut block) = new_block(8, false);
    activate(&mut block, &mem, vq.create_queue().unwrap());
    assert_eq!(run(&mut block, &mem, &vq, 11, 0, &[(DATA, 512, R)]), (VIRTIO_BLK_S_UNSUPP as u8, 1));
}

#[test]
fn read_only_disk_rejects_writes_and_serves_reads() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let (_dir, path, mut block) = new_block(8, true);
    assert_ne!(block.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    activate(&mut block, &mem, vq.create_queue().unwrap());
    mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(run(&mut block, &mem, &vq, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]), (VIRTIO_BLK_S_IOERR as u8, 1));
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
    assert_eq!(run(&mut block, &mem, &vq, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]), (VIRTIO_BLK_S_OK as u8, 513));
    assert_eq!(run(&mut block, &mem, &vq, VIRTIO_BLK_T_FLUSH, 0, &[]).0, VIRTIO_BLK_S_OK as u8);
}

#[test]
fn bad_sectors_and_lengths_are_io_errors() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let (_dir, _path, mut block) = new_block(8, false);
    activate(&mut block, &mem, vq.create_queue().unwrap());
    let ioerr = (VIRTIO_BLK_S_IOERR as u8, 1);
    // The last sector is fine, one past it is not.
    assert_eq!(run(&mut block, &mem, &vq, VIRTIO_BLK_T_IN, 7, &[(DATA, 512, W)]).0, VIRTIO_BLK_S_OK as u8);
    assert_eq!(run(&mut block, &mem, &vq, VIRTIO_BLK_T_IN, 7, &[(DATA, 1024, W)]), ioerr);
    assert_eq!(run(&mut block, &mem, &vq, VIRTIO_BLK_T_OUT, 8, &[(DATA, 512, R)]), ioerr);
    // sector * 512 overflows; sector * 512 + len overflows.
    assert_eq!(run(&mut block, &mem, &vq, VIRTIO_BLK_T_IN, u64::MAX / 256, &[(DATA, 512, W)]), ioerr);
    assert_eq!(run(&mut block, &mem, &vq, VIRTIO_BLK_T_IN, u64::MAX >> 9, &[(DATA, 1024, W)]), ioerr);
    // Partial sectors.
    assert_eq!(run(&mut block, &mem, &vq, VIRTIO_BLK_T_OUT, 0, &[(DATA, 100, R)]), ioerr);
    // Larger than the request limit, and a 2 GiB buffer that is not in guest memory either.
    assert_eq!(run(&mut block, &mem, &vq, VIRTIO_BLK_T_IN, 0, &[(DATA, 0x8000_0000, W)]), ioerr);
    // A header cut short.
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    offer(&vq, 0, &[(HDR, 8, R), (STATUS, 1, W)]);
    block.process_queue(0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn buffers_outside_guest_memory_are_io_errors_or_dropped() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let (_dir, path, mut block) = new_block(8, false);
    activate(&mut block, &mem, vq.create_queue().unwrap());
    let ioerr = (VIRTIO_BLK_S_IOERR as u8, 1);
    assert_eq!(run(&mut block, &mem, &vq, VIRTIO_BLK_T_OUT, 0, &[(OUTSIDE, 512, R)]), ioerr);
    assert_eq!(run(&mut block, &mem, &vq, VIRTIO_BLK_T_IN, 0, &[(OUTSIDE, 512, W)]), ioerr);
    // Straddling the end of guest memory.
    assert_eq!(run(&mut block, &mem, &vq, VIRTIO_BLK_T_IN, 0, &[(0x10_0000 - 256, 512, W)]), ioerr);
    assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));

    // Without a writable status byte nothing can be reported: the chain is returned with length 0.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    offer(&vq, 0, &[(HDR, 16, R), (DATA, 512, W), (OUTSIDE, 1, W)]);
    block.process_queue(0);
    assert_eq!(vq.used().ring().ref_at(3).unwrap().load().len(), 0);
}

#[test]
fn chains_without_status_are_dropped() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let (_dir, _path, mut block) = new_block(8, false);
    let irq = activate(&mut block, &mem, vq.create_queue().unwrap());
    header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    offer(&vq, 0, &[(HDR, 16, R)]);
    // A readable buffer after the status is malformed; its status byte still reports it.
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    offer(&vq, 4, &[(HDR, 16, R), (STATUS, 1, W), (DATA, 512, R)]);
    block.process_queue(0);
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
    assert_eq!(vq.used().ring().ref_at(1).unwrap().load().len(), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(irq.irqfd().read().unwrap(), 1, "returned chains are still signalled");
}

#[test]
fn descriptor_loops_and_huge_lengths_neither_hang_nor_panic() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let (_dir, _path, mut block) = new_block(8, false);
    activate(&mut block, &mem, vq.create_queue().unwrap());
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let next = VRING_DESC_F_NEXT as u16;
    let looped = [
        RawDescriptor::from(Descriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(Descriptor::new(DATA, 512, next | W, 0)),
    ];
    vq.add_desc_chains(&looped, 0).unwrap();
    block.process_queue(0);
    assert_eq!(vq.used().idx().load(), 1);

    // A u32::MAX length ends the chain (it cannot be longer than 4 GiB), leaving it without status.
    let (status, len) = run(&mut block, &mem, &vq, VIRTIO_BLK_T_IN, 0, &[(DATA, u32::MAX, W)]);
    assert_eq!((status, len), (0xff, 0));
    let (status, _) = run(&mut block, &mem, &vq, VIRTIO_BLK_T_OUT, 0, &[(DATA, u32::MAX - 17, R)]);
    assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn event_idx_suppresses_interrupts_the_driver_did_not_ask_for() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let (_dir, _path, mut block) = new_block(8, false);
    let mut queue: Queue = vq.create_queue().unwrap();
    queue.set_event_idx(true);
    let irq = activate(&mut block, &mem, queue);
    // used_event lives after the 16 avail ring entries: ask for an interrupt after the 5th completion.
    let used_event = GuestAddress(vq.avail_addr().0 + 4 + 2 * 16);
    mem.write_obj(4u16, used_event).unwrap();
    run(&mut block, &mem, &vq, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert!(irq.irqfd().read().is_err(), "no interrupt before used_event");
    mem.write_obj(1u16, used_event).unwrap();
    run(&mut block, &mem, &vq, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(irq.irqfd().read().unwrap(), 1);
    // The device asks to be notified for the next chain it has not seen.
    assert_eq!(mem.read_obj::<u16>(GuestAddress(vq.used_addr().0 + 4 + 8 * 16)).unwrap(), 2);
}

#[test]
fn a_restored_disk_tells_the_driver_to_read_its_capacity_again() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let (_dir, _path, mut block) = new_block(8, false);
    block.restored();
    let irq = activate(&mut block, &mem, vq.create_queue().unwrap());
    assert!(irq.irqfd().read().is_err(), "activation alone changes nothing");
    block.restored();
    assert_eq!(irq.irqfd().read().unwrap(), 1);
    assert_eq!(irq.status() & crate::devices::virtio::INT_CONFIG, crate::devices::virtio::INT_CONFIG);
}

#[test]
fn config_space_holds_capacity_and_seg_max() {
    let (_dir, path) = image(0);
    std::fs::write(&path, vec![0u8; 4096 + 100]).unwrap();
    let block = Block::new(&DiskConfig { path, read_only: false }).unwrap();
    assert_eq!(block.capacity_sectors(), 8, "a trailing partial sector is not exposed");
    let mut config = [0u8; 16];
    block.read_config(0, &mut config);
    assert_eq!(u64::from_le_bytes(config[..8].try_into().unwrap()), 8);
    assert_eq!(u32::from_le_bytes(config[12..].try_into().unwrap()), u32::from(QUEUE_SIZE) - 2);
    let features = block.avail_features();
    assert_ne!(features & features::VERSION_1, 0);
    assert_ne!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn missing_image_error_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.img");
    let err = Block::new(&DiskConfig { path: path.clone(), read_only: true }).err().unwrap();
    assert!(matches!(err, BlockError::Open { .. }));
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

#[test]
fn serial_is_sanitized_and_truncated() {
    let id = serial_from_path(std::path::Path::new("/x/a very long disk name é.img"));
    assert_eq!(&id, b"a_very_long_disk_nam");
}

#[test]
fn request_through_the_mmio_transport_like_a_guest_driver() {
    let mem = memory();
    let (_dir, path, block) = new_block(8, false);
    let block = Arc::new(Mutex::new(block));
    let mut t = MmioTransport::new(mem.clone(), block.clone()).unwrap();
    let wr = |t: &mut MmioTransport, offset: u64, value: u32| t.write(offset, &value.to_le_bytes());
    for status in [1, 3] {
        wr(&mut t, 0x70, status);
    }
    wr(&mut t, 0x24, 1);
    wr(&mut t, 0x20, 1);
    wr(&mut t, 0x70, 0xb);
    let vq = MockSplitQueue::new(&mem, 8);
    wr(&mut t, 0x38, 8);
    for (reg, addr) in [(0x80, vq.desc_table_addr()), (0x90, vq.avail_addr()), (0xa0, vq.used_addr())] {
        wr(&mut t, reg, addr.0 as u32);
    }
    wr(&mut t, 0x44, 1);
    wr(&mut t, 0x70, 0xf);
    let mut status = [0u8; 4];
    t.read(0x70, &mut status);
    assert_eq!(u32::from_le_bytes(status), 0xf);

    header(&mem, HDR, VIRTIO_BLK_T_OUT, 3);
    mem.write_slice(&[0x42; 512], GuestAddress(DATA)).unwrap();
    offer(&vq, 0, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    wr(&mut t, NOTIFY_REG_OFFSET, 0);
    // What the event loop does when the queue eventfd fires.
    assert_eq!(t.queue_evts()[0].read().unwrap(), 1);
    block.lock().unwrap().process_queue(0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(&std::fs::read(&path).unwrap()[1536..2048], &[0x42; 512]);
    let mut isr = [0u8; 4];
    t.read(0x60, &mut isr);
    assert_eq!(u32::from_le_bytes(isr), INT_USED_RING);
}
