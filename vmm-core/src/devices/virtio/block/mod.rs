//! virtio-blk (virtio 1.2, section 5.2) over a raw disk image: a regular file or a host block device.
//!
//! One request queue, served synchronously on the event-loop thread with positional reads and writes
//! (`pread`/`pwrite`) through a small bounce buffer. Requests: `IN`, `OUT`, `FLUSH` and `GET_ID`;
//! anything else completes with `UNSUPP`. Every guest-controlled number (sector, lengths, addresses)
//! is checked before the file is touched; see [`request`] for the rules.

mod request;
#[cfg(test)]
mod tests;

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES};

use self::request::Disk;
use super::{features, ids, read_config_bytes, ActivateContext, ActivateError, GuestMemory, VirtioDevice};
use crate::config::DiskConfig;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The virtio-blk sector: capacity and request offsets are counted in 512-byte units whatever the
/// backing file's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Largest data payload of one request; a larger request fails with `IOERR`. Linux never sends more
/// than `max_sectors_kb` (1 MiB by default); the bound keeps one hostile request from holding the
/// device lock for long.
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;
/// Length of the `GET_ID` serial number.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Data segments a request may carry (`seg_max`): a chain holds at most `QUEUE_SIZE` descriptors,
/// two of which are the header and the status.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// `struct virtio_blk_config` up to `seg_max`: capacity (le64), size_max (le32, not offered),
/// seg_max (le32). Fields past it read as zero.
const CONFIG_LEN: usize = 16;

/// A disk image that cannot be used as a virtio-blk backend.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened (missing, permissions, or writable access to a read-only file).
    #[error("cannot open disk image {}", path.display())]
    Open {
        /// The image path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The image's size could not be determined.
    #[error("cannot determine the size of disk image {}", path.display())]
    Size {
        /// The image path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A virtio-blk device model.
pub struct Block {
    disk: Disk,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    active: Option<ActivateContext>,
}

impl Block {
    /// Opens `config.path` (read-write, or read-only when `config.read_only`) as a raw image.
    ///
    /// The capacity is the image length in whole sectors: a trailing partial sector is not exposed
    /// to the guest (it could not address it anyway) and is logged as a warning rather than
    /// rejected, so odd-sized files still boot.
    pub fn new(config: &DiskConfig) -> Result<Block, BlockError> {
        let path = &config.path;
        let mut file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(path)
            .map_err(|source| BlockError::Open { path: path.clone(), source })?;
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let len = file.seek(SeekFrom::End(0)).map_err(|source| BlockError::Size { path: path.clone(), source })?;
        if len % SECTOR_SIZE != 0 {
            tracing::warn!(
                path = %path.display(),
                len,
                "disk image length is not a multiple of 512 bytes; the trailing partial sector is not exposed"
            );
        }
        let sectors = len / SECTOR_SIZE;

        let mut avail_features =
            features::VERSION_1 | features::RING_EVENT_IDX | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        if config.read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        }
        let mut cfg = [0u8; CONFIG_LEN];
        cfg[0..8].copy_from_slice(&sectors.to_le_bytes());
        cfg[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());

        Ok(Block {
            disk: Disk::new(file, config.read_only, sectors, serial_from_path(path)),
            avail_features,
            acked_features: 0,
            config: cfg,
            active: None,
        })
    }

    /// The capacity the guest sees, in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.sectors()
    }

    /// The serial number returned by `GET_ID` (NUL-padded).
    pub fn serial(&self) -> &[u8; ID_BYTES] {
        self.disk.id()
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }
}

/// The serial number: the image's file name, so that the guest's `/dev/disk/by-id/virtio-<serial>`
/// tells disks apart. Truncated to 20 bytes (names sharing those 20 bytes get the same serial), with
/// bytes other than printable ASCII replaced by `_` because udev builds link names from it.
fn serial_from_path(path: &Path) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let name = path.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default();
    for (dst, &src) in id.iter_mut().zip(name) {
        *dst = if src.is_ascii_graphic() { src } else { b'_' };
    }
    id
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        ids::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only the writeback field (VIRTIO_BLK_F_CONFIG_WCE) is writable, and it is not offered.
        tracing::debug!(offset, len = data.len(), "write to read-only virtio-blk configuration ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.is_empty() {
            return Err(ActivateError::InvalidQueue(0));
        }
        self.active = Some(ctx);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn active_queues(&self) -> Option<&[virtio_queue::Queue]> {
        self.active.as_ref().map(|active| active.queues.as_slice())
    }

    /// The driver read the capacity of the disk the snapshot was taken with; this disk may be
    /// another (a warm start's own disk in place of its template's placeholder, a disk put back by a
    /// rollback): the driver is told its configuration changed, and reads the capacity again.
    fn restored(&mut self) {
        if let Some(active) = &self.active {
            active.interrupt.signal_config_changed();
        }
    }

    fn process_queue(&mut self, index: usize) {
        let Block { disk, active, .. } = self;
        let Some(active) = active else { return };
        if index != 0 {
            tracing::debug!(index, "notification for a virtio-blk queue that does not exist");
            return;
        }
        active.serve(0, |mem, chain| disk.execute(mem, chain));
    }
}
