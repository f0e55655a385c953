//! What the fuzz targets share: a cursor over the fuzz input, and a small "guest program" format that
//! plays a hostile virtio driver against a device model through vmm-core's in-process guest driver
//! (`vmm_core::devices::virtio::net::guest_driver`, feature `fuzzing`).
//!
//! A guest program is a sequence of operations, each one opcode byte (taken modulo the number of
//! operations) and its operands, little-endian; a missing operand reads as zero, so every byte string is
//! a program. `fuzz/seeds.py` writes programs in this format for the seed corpus.
//!
//! | op | name    | operands                                             | effect                                   |
//! |----|---------|------------------------------------------------------|------------------------------------------|
//! | 0  | desc    | q u8, index u16, addr, len u32, flags u16, next u16  | writes descriptor `index` of queue `q`   |
//! | 1  | avail   | q u8, head u16                                       | makes `head` available on queue `q`      |
//! | 2  | poke    | addr u32, n u16, n bytes                             | writes guest memory (rings included)     |
//! | 3  | kick    | q u8                                                 | the guest notifies queue `q`             |
//! | 4  | chain   | q u8, n u8, n × (addr, len u32, writable u8)         | a well-formed chain, made available      |
//! | 5  | backend | n u16, n bytes                                       | the host side acts (target specific)     |
//!
//! `addr` is a `u8` selector then a `u32` offset into guest memory, or, when the selector is `0xff`,
//! a raw `u64` (usually outside guest memory).

use vm_memory::{Bytes as _, GuestAddress, GuestMemoryBackend as _};
use vmm_core::devices::virtio::net::guest_driver::{Desc, GuestDriver};
use vmm_core::devices::virtio::VirtioDevice;

/// The most operations one input runs: bounds the time per input.
pub const MAX_OPS: usize = 256;

/// Reads operands off the fuzz input; past its end every read is zero (or empty).
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// A cursor at the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let got = self.take(N);
        out[..got.len()].copy_from_slice(got);
        out
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// The guest memory size of [`GuestDriver`] (one region from address 0).
fn mem_size(guest: &GuestDriver) -> u64 {
    guest.mem.last_addr().0 + 1
}

/// A guest address: inside guest memory unless the selector asks for a raw one.
fn addr(input: &mut Input<'_>, mem_size: u64) -> u64 {
    if input.u8() == 0xff {
        input.u64()
    } else {
        u64::from(input.u32()) % mem_size
    }
}

/// Runs the guest program in `input` against `device`, which must already be activated with
/// `guest.activate_context()`. `queues` and `queue_size` are what `guest` was created with.
/// `backend` is called for the `backend` operation with its bytes.
pub fn run_program(
    guest: &mut GuestDriver,
    queues: usize,
    queue_size: u16,
    device: &mut dyn VirtioDevice,
    input: &mut Input<'_>,
    mut backend: impl FnMut(&mut dyn VirtioDevice, &[u8]),
) {
    let size = mem_size(guest);
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 6 {
            0 => {
                let q = usize::from(input.u8()) % queues;
                let index = input.u16() % queue_size;
                let a = addr(input, size);
                let (len, flags, next) = (input.u32(), input.u16(), input.u16());
                guest.write_desc(q, index, a, len, flags, next);
            }
            1 => {
                let q = usize::from(input.u8()) % queues;
                let head = input.u16();
                guest.push_avail(q, head);
            }
            2 => {
                let at = u64::from(input.u32()) % size;
                let n = usize::from(input.u16());
                let room = usize::try_from(size - at).unwrap_or(usize::MAX);
                let bytes = input.take(n.min(room));
                if let Err(err) = guest.mem.write_slice(bytes, GuestAddress(at)) {
                    panic!("harness bug: poke at {at:#x} failed: {err}");
                }
            }
            3 => {
                // One past the last queue too: a notification for a queue that does not exist.
                let q = usize::from(input.u8()) % (queues + 1);
                device.process_queue(q);
            }
            4 => {
                let q = usize::from(input.u8()) % queues;
                let n = usize::from(input.u8() % 8) + 1;
                let descs: Vec<Desc> = (0..n)
                    .map(|_| Desc { addr: addr(input, size), len: input.u32(), writable: input.u8() & 1 == 1 })
                    .collect();
                guest.add_chain(q, &descs);
            }
            _ => {
                let n = usize::from(input.u16());
                backend(&mut *device, input.take(n));
            }
        }
    }
}
