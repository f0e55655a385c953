//! Parsing and executing one virtio-blk request.
//!
//! A request is a descriptor chain: device-readable buffers holding the 16-byte header
//! (`type: le32, reserved: le32, sector: le64`) and, for `OUT`, the data; then device-writable
//! buffers holding, for `IN` and `GET_ID`, the data, and finally the one-byte status. The framing is
//! not assumed (virtio 1.2, 2.7.4): the header and data may be split across descriptors or share
//! one, so the chain is treated as two byte streams.
//!
//! Rules for what the guest controls: a chain whose last byte (the status) is not writable guest
//! memory is returned with used length 0 and never answered; every other malformed request gets
//! `IOERR` - readable buffers after writable ones, a short header, data addresses outside guest
//! memory, a data length that is not whole sectors or exceeds [`MAX_REQUEST_BYTES`], a range past
//! the capacity (or whose byte offset overflows), and writes to a read-only disk.

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::{GuestMemory, ID_BYTES, MAX_REQUEST_BYTES, SECTOR_SIZE};

/// Length of `struct virtio_blk_outhdr`.
const HEADER_LEN: usize = 16;
/// The bounce buffer between guest memory and the file: large enough for efficient I/O, small
/// enough to keep per device.
const CHUNK: usize = 64 << 10;

/// A guest buffer, contiguous in guest-physical space.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u64,
}

/// A request that cannot be served; the guest gets `IOERR` (or `UNSUPP`).
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("device-readable buffer after a device-writable one")]
    Framing,
    #[error("header shorter than 16 bytes or not in guest memory")]
    Header,
    #[error("data buffer outside guest memory")]
    DataAddress,
    #[error("data length {0} is not a whole number of sectors or exceeds the request limit")]
    DataLength(u64),
    #[error("{len} bytes at sector {sector} lie beyond the disk capacity")]
    Range { sector: u64, len: u64 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("disk image i/o failed")]
    Io(#[source] std::io::Error),
    #[error("guest memory access failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// The backing image and what the guest knows about it.
pub(super) struct Disk {
    file: File,
    read_only: bool,
    sectors: u64,
    id: [u8; ID_BYTES],
    bounce: Vec<u8>,
}

impl Disk {
    pub(super) fn new(file: File, read_only: bool, sectors: u64, id: [u8; ID_BYTES]) -> Self {
        Disk { file, read_only, sectors, id, bounce: vec![0; CHUNK] }
    }

    pub(super) fn sectors(&self) -> u64 {
        self.sectors
    }

    pub(super) fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// Serves one chain and returns the used length: the bytes written into its writable buffers.
    pub(super) fn execute(&mut self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
        let head = chain.head_index();
        let (readable, mut writable, framing_ok) = split_chain(chain);
        let Some(status_addr) = take_status(mem, &mut writable) else {
            tracing::warn!(head, "virtio-blk request without a writable status byte dropped");
            return 0;
        };
        let result = if framing_ok { self.serve(mem, readable, &writable) } else { Err(RequestError::Framing) };
        let (status, data_len) = match result {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(RequestError::Unsupported(kind)) => {
                tracing::debug!(head, kind, "unsupported virtio-blk request");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
            Err(RequestError::Io(err)) => {
                tracing::error!(head, %err, "virtio-blk disk image i/o failed");
                (VIRTIO_BLK_S_IOERR, 0)
            }
            // The guest caused it and learns it from the status; debug keeps a hostile guest from
            // flooding the host's logs.
            Err(err) => {
                tracing::debug!(head, error = %err, "invalid virtio-blk request");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        };
        if let Err(err) = mem.write_obj(status as u8, status_addr) {
            tracing::warn!(head, %err, "virtio-blk status could not be written");
            return 0;
        }
        // data_len <= MAX_REQUEST_BYTES, so the sum fits.
        u32::try_from(data_len + 1).unwrap_or(u32::MAX)
    }

    /// Executes the request; returns how many data bytes went into the writable buffers.
    fn serve(
        &mut self,
        mem: &GuestMemory,
        mut readable: Vec<Segment>,
        writable: &[Segment],
    ) -> Result<u64, RequestError> {
        let header = split_front(&mut readable, HEADER_LEN as u64).ok_or(RequestError::Header)?;
        let mut raw = [0u8; HEADER_LEN];
        gather(mem, &header, &mut raw).map_err(|_| RequestError::Header)?;
        let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let sector = u64::from_le_bytes([raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15]]);
        match kind {
            VIRTIO_BLK_T_IN => {
                let offset = self.check_data(mem, sector, writable)?;
                self.read_into(mem, offset, writable)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let offset = self.check_data(mem, sector, &readable)?;
                self.write_from(mem, offset, &readable)?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only {
                    self.file.sync_data().map_err(RequestError::Io)?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut id = &self.id[..];
                let mut written = 0;
                for seg in writable {
                    let n = id.len().min(usize::try_from(seg.len).unwrap_or(usize::MAX));
                    mem.write_slice(&id[..n], seg.addr).map_err(RequestError::Memory)?;
                    id = &id[n..];
                    written += n as u64;
                }
                Ok(written)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// Validates a data transfer at `sector` over `data` and returns its byte offset in the image.
    fn check_data(&self, mem: &GuestMemory, sector: u64, data: &[Segment]) -> Result<u64, RequestError> {
        let len = data.iter().map(|s| s.len).sum::<u64>();
        if len % SECTOR_SIZE != 0 || len > MAX_REQUEST_BYTES {
            return Err(RequestError::DataLength(len));
        }
        let in_range = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|offset| Some((offset, offset.checked_add(len)?)))
            .filter(|&(_, end)| end <= self.sectors * SECTOR_SIZE);
        let Some((offset, _)) = in_range else { return Err(RequestError::Range { sector, len }) };
        // Checked up front so that a bad address fails the request before any file I/O.
        let fits = |s: &Segment| usize::try_from(s.len).is_ok_and(|len| mem.check_range(s.addr, len));
        if !data.iter().all(fits) {
            return Err(RequestError::DataAddress);
        }
        Ok(offset)
    }

    fn read_into(&mut self, mem: &GuestMemory, mut offset: u64, data: &[Segment]) -> Result<u64, RequestError> {
        let mut done = 0;
        for_each_chunk(data, |addr, len| {
            let buf = &mut self.bounce[..len];
            self.file.read_exact_at(buf, offset).map_err(RequestError::Io)?;
            mem.write_slice(buf, addr).map_err(RequestError::Memory)?;
            offset += len as u64;
            done += len as u64;
            Ok(())
        })?;
        Ok(done)
    }

    fn write_from(&mut self, mem: &GuestMemory, mut offset: u64, data: &[Segment]) -> Result<(), RequestError> {
        for_each_chunk(data, |addr, len| {
            let buf = &mut self.bounce[..len];
            mem.read_slice(buf, addr).map_err(RequestError::Memory)?;
            self.file.write_all_at(buf, offset).map_err(RequestError::Io)?;
            offset += len as u64;
            Ok(())
        })
    }
}

/// Splits a chain into its readable and writable buffers, in order. The chain iterator already stops
/// at `queue size` descriptors (no loops) and at a total length past 4 GiB. The flag is false when a
/// readable buffer follows a writable one.
fn split_chain(chain: DescriptorChain<&GuestMemory>) -> (Vec<Segment>, Vec<Segment>, bool) {
    let (mut readable, mut writable, mut framing_ok) = (Vec::new(), Vec::new(), true);
    for desc in chain {
        let seg = Segment { addr: desc.addr(), len: u64::from(desc.len()) };
        if desc.is_write_only() {
            writable.push(seg);
        } else {
            framing_ok &= writable.is_empty();
            readable.push(seg);
        }
    }
    (readable, writable, framing_ok)
}

/// Removes the status byte (the last writable byte) and returns its address if it is guest memory.
fn take_status(mem: &GuestMemory, writable: &mut Vec<Segment>) -> Option<GuestAddress> {
    let last = writable.last_mut()?;
    let addr = last.addr.checked_add(last.len.checked_sub(1)?)?;
    last.len -= 1;
    if last.len == 0 {
        writable.pop();
    }
    mem.check_range(addr, 1).then_some(addr)
}

/// Removes the first `n` bytes of `segs` and returns them; `None` if there are fewer.
fn split_front(segs: &mut Vec<Segment>, n: u64) -> Option<Vec<Segment>> {
    let mut front = Vec::new();
    let mut need = n;
    while need > 0 {
        let first = segs.first_mut()?;
        let take = first.len.min(need);
        front.push(Segment { addr: first.addr, len: take });
        need -= take;
        if take == first.len {
            segs.remove(0);
        } else {
            first.addr = first.addr.checked_add(take)?;
            first.len -= take;
        }
    }
    Some(front)
}

/// Copies the bytes of `segs` into `out` (exactly `out.len()` bytes, which `segs` must hold).
fn gather(mem: &GuestMemory, segs: &[Segment], out: &mut [u8]) -> Result<(), vm_memory::GuestMemoryError> {
    let mut at = 0;
    for seg in segs {
        let len = seg.len as usize;
        mem.read_slice(&mut out[at..at + len], seg.addr)?;
        at += len;
    }
    Ok(())
}

/// Calls `f(addr, len)` for consecutive pieces of `data` no longer than [`CHUNK`].
fn for_each_chunk<F>(data: &[Segment], mut f: F) -> Result<(), RequestError>
where
    F: FnMut(GuestAddress, usize) -> Result<(), RequestError>,
{
    for seg in data {
        let mut done = 0u64;
        while done < seg.len {
            let len = (seg.len - done).min(CHUNK as u64);
            let addr = seg.addr.checked_add(done).ok_or(RequestError::DataAddress)?;
            f(addr, len as usize)?;
            done += len;
        }
    }
    Ok(())
}
