//! A minimal virtio driver for unit tests (net and vsock) and the fuzz targets (feature `fuzzing`): split queues laid out in in-process guest
//! memory, buffers from a bump allocator, and direct access to the rings so tests can also write
//! hostile descriptors. `virtio_queue::mock::MockSplitQueue` is not used: creating one zeroes the
//! rings (losing buffers posted before activation), and its used ring overlaps the second half of
//! its available ring.

use std::collections::HashMap;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::{ActivateContext, GuestMemory, VirtioInterrupt};

/// `VRING_DESC_F_NEXT`.
pub const DESC_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
pub const DESC_WRITE: u16 = 2;

const MEM_SIZE: u64 = 0x80_0000;
const QUEUE_SPACING: u64 = 0x4000;
const BUF_BASE: u64 = 0x10_0000;

/// One descriptor of a chain to build.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Its length.
    pub len: u32,
    /// Whether the device writes it (`VRING_DESC_F_WRITE`).
    pub writable: bool,
}

struct Ring {
    size: u16,
    base: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// The guest side of a device's queues.
pub struct GuestDriver {
    /// The guest's RAM.
    pub mem: GuestMemory,
    /// The device's interrupt line, to check signalling.
    pub interrupt: Arc<VirtioInterrupt>,
    rings: Vec<Ring>,
    next_buf: u64,
    /// Address of the first descriptor of each chain, to read back single-buffer chains.
    heads: HashMap<(usize, u16), u64>,
}

impl GuestDriver {
    /// Guest memory with `queues` queues of `size` entries.
    pub fn new(queues: usize, size: u16) -> Self {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let rings = (0..queues)
            .map(|i| {
                let base = i as u64 * QUEUE_SPACING;
                let avail = base + 16 * u64::from(size);
                let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
                assert!(used + 6 + 8 * u64::from(size) <= base + QUEUE_SPACING);
                Ring { size, base, avail, used, next_desc: 0, avail_idx: 0, used_seen: 0 }
            })
            .collect();
        GuestDriver {
            mem,
            interrupt: Arc::new(VirtioInterrupt::new().unwrap()),
            rings,
            next_buf: BUF_BASE,
            heads: HashMap::new(),
        }
    }

    /// What the transport would hand the device at `DRIVER_OK`.
    pub fn activate_context(&self) -> ActivateContext {
        let queues = self
            .rings
            .iter()
            .map(|r| {
                let mut q = Queue::new(r.size).unwrap();
                q.try_set_desc_table_address(GuestAddress(r.base)).unwrap();
                q.try_set_avail_ring_address(GuestAddress(r.avail)).unwrap();
                q.try_set_used_ring_address(GuestAddress(r.used)).unwrap();
                q.set_ready(true);
                q
            })
            .collect();
        ActivateContext { mem: self.mem.clone(), queues, interrupt: self.interrupt.clone() }
    }

    /// Guest memory for a buffer of `len` bytes.
    pub fn alloc(&mut self, len: u64) -> u64 {
        if self.next_buf + len > MEM_SIZE {
            self.next_buf = BUF_BASE;
        }
        let addr = self.next_buf;
        self.next_buf = (addr + len + 15) & !15;
        addr
    }

    /// Copies `data` into guest memory.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// Copies `len` bytes out of guest memory.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    /// Writes descriptor `index` of queue `q` as is (hostile tests choose flags and next freely).
    pub fn write_desc(&self, q: usize, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = self.rings[q].base + 16 * u64::from(index);
        self.mem.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        self.mem.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
        self.mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
        self.mem.write_obj(next.to_le(), GuestAddress(at + 14)).unwrap();
    }

    /// Makes `head` available on queue `q`.
    pub fn push_avail(&mut self, q: usize, head: u16) {
        let ring = &mut self.rings[q];
        let slot = ring.avail + 4 + 2 * u64::from(ring.avail_idx % ring.size);
        self.mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        self.mem.write_obj(ring.avail_idx.to_le(), GuestAddress(ring.avail + 2)).unwrap();
    }

    /// Builds a chain from `descs` in free descriptor slots and makes it available.
    pub fn add_chain(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let size = self.rings[q].size;
        let head = self.rings[q].next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (head + i as u16) % size;
            let last = i + 1 == descs.len();
            let flags = if d.writable { DESC_WRITE } else { 0 } | if last { 0 } else { DESC_NEXT };
            self.write_desc(q, index, d.addr, d.len, flags, (index + 1) % size);
        }
        self.rings[q].next_desc = (head + descs.len() as u16) % size;
        self.heads.insert((q, head), descs[0].addr);
        self.push_avail(q, head);
        head
    }

    /// A one-descriptor chain the device reads `data` from.
    pub fn add_readable(&mut self, q: usize, data: &[u8]) -> u16 {
        let addr = self.alloc(data.len() as u64);
        self.write(addr, data);
        self.add_chain(q, &[Desc { addr, len: data.len() as u32, writable: false }])
    }

    /// A one-descriptor chain of `len` bytes the device writes.
    pub fn add_writable(&mut self, q: usize, len: u32) -> u16 {
        let addr = self.alloc(u64::from(len));
        self.add_chain(q, &[Desc { addr, len, writable: true }])
    }

    /// Used entries `(head, len)` added since the last call.
    pub fn take_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let ring = &mut self.rings[q];
        let idx: u16 = self.mem.read_obj(GuestAddress(ring.used + 2)).unwrap();
        let mut out = Vec::new();
        while ring.used_seen != idx {
            let slot = ring.used + 4 + 8 * u64::from(ring.used_seen % ring.size);
            let id: u32 = self.mem.read_obj(GuestAddress(slot)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(slot + 4)).unwrap();
            out.push((id as u16, len));
            ring.used_seen = ring.used_seen.wrapping_add(1);
        }
        out
    }

    /// The contents of used one-buffer chains added since the last call.
    pub fn take_used_data(&mut self, q: usize) -> Vec<Vec<u8>> {
        self.take_used(q)
            .into_iter()
            .map(|(head, len)| {
                let addr = self.heads[&(q, head)];
                self.read(addr, len as usize)
            })
            .collect()
    }
}
