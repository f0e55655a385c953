//! virtio-rng against in-process guest memory and a mock driver queue.

use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::VirtioInterrupt;

const W: u16 = VRING_DESC_F_WRITE as u16;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

/// Offers one chain of `descs` (addr, len, flags) starting at descriptor `first`, serves it and
/// returns the used length.
fn serve(rng: &mut Rng, vq: &MockSplitQueue<GuestMemoryMmap>, first: u16, descs: &[(u64, u32, u16)]) -> u32 {
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let next = if i + 1 < descs.len() { VRING_DESC_F_NEXT as u16 } else { 0 };
            RawDescriptor::from(Descriptor::new(addr, len, flags | next, first + i as u16 + 1))
        })
        .collect();
    let n = vq.used().idx().load();
    vq.add_desc_chains(&raw, first).unwrap();
    rng.process_queue(0);
    assert_eq!(vq.used().idx().load(), n + 1);
    vq.used().ring().ref_at(usize::from(n)).unwrap().load().len()
}

fn active_rng(mem: &GuestMemoryMmap, vq: &MockSplitQueue<GuestMemoryMmap>) -> (Rng, Arc<VirtioInterrupt>) {
    let mut rng = Rng::new();
    let interrupt = Arc::new(VirtioInterrupt::new().unwrap());
    let queues = vec![vq.create_queue().unwrap()];
    rng.activate(ActivateContext { mem: mem.clone(), queues, interrupt: interrupt.clone() }).unwrap();
    (rng, interrupt)
}

#[test]
fn writable_buffers_are_filled_and_used_length_matches() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let (mut rng, irq) = active_rng(&mem, &vq);
    assert_eq!(serve(&mut rng, &vq, 0, &[(0x1_0000, 4096, W), (0x2_0000, 100, W)]), 4196);
    let mut first = vec![0u8; 4096];
    mem.read_slice(&mut first, GuestAddress(0x1_0000)).unwrap();
    assert!(first.iter().filter(|&&b| b == 0).count() < 100, "looks random");
    let mut second = [0u8; 100];
    mem.read_slice(&mut second, GuestAddress(0x2_0000)).unwrap();
    assert_ne!(second, [0u8; 100]);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2_0000 + 100)).unwrap(), 0, "nothing past the buffer");
    assert_eq!(irq.irqfd().read().unwrap(), 1);
}

#[test]
fn bytes_per_chain_are_bounded() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let (mut rng, _) = active_rng(&mem, &vq);
    let len = serve(&mut rng, &vq, 0, &[(0x1_0000, 0x8_0000, W), (0x9_0000, 16, W)]);
    assert_eq!(len as usize, MAX_BYTES_PER_CHAIN);
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x9_0000)).unwrap(), 0, "budget spent before the second buffer");
}

#[test]
fn hostile_chains_get_no_bytes() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let (mut rng, _) = active_rng(&mem, &vq);
    assert_eq!(serve(&mut rng, &vq, 0, &[(0x1_0000, 64, 0)]), 0, "device-readable buffer");
    assert_eq!(serve(&mut rng, &vq, 0, &[(0x7fff_0000_0000, 64, W)]), 0, "outside guest memory");
    assert_eq!(serve(&mut rng, &vq, 0, &[(0x10_0000 - 8, 64, W)]), 0, "straddles the end of memory");
    assert_eq!(serve(&mut rng, &vq, 0, &[(0x1_0000, u32::MAX, W), (0x2_0000, 8, W)]), MAX_BYTES_PER_CHAIN as u32);
    // A descriptor pointing back at itself ends after queue-size descriptors, within the byte budget.
    vq.add_desc_chains(&[RawDescriptor::from(Descriptor::new(0x1_0000, 16, VRING_DESC_F_NEXT as u16 | W, 0))], 0)
        .unwrap();
    rng.process_queue(0);
    assert_eq!(vq.used().ring().ref_at(4).unwrap().load().len(), 16 * 16);
}

#[test]
fn nothing_happens_before_activation_or_after_reset() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut idle = Rng::new();
    idle.process_queue(0);
    let (mut rng, _) = active_rng(&mem, &vq);
    assert!(rng.is_activated());
    rng.reset();
    assert!(!rng.is_activated());
    vq.add_desc_chains(&[RawDescriptor::from(Descriptor::new(0x1_0000, 16, W, 0))], 0).unwrap();
    rng.process_queue(0);
    assert_eq!(vq.used().idx().load(), 0);
    assert_eq!(rng.device_type(), crate::devices::virtio::ids::RNG);
}
