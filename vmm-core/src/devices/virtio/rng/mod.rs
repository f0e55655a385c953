//! virtio-rng (virtio 1.2, section 5.4): one queue of device-writable buffers that the device fills
//! with bytes from the host kernel's CSPRNG (`getrandom(2)`, which needs no file descriptor, so it
//! also works in a jail without `/dev`).

#[cfg(test)]
mod tests;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes};

use super::{features, ids, ActivateContext, ActivateError, GuestMemory, VirtioDevice};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per chain: Linux asks for at most a page or so at a time, and the bound keeps
/// a chain of huge buffers from stalling the event loop.
pub const MAX_BYTES_PER_CHAIN: usize = 64 << 10;
/// Bytes fetched from the kernel per `getrandom` call.
const CHUNK: usize = 4096;

/// A virtio-rng device model.
#[derive(Default)]
pub struct Rng {
    acked_features: u64,
    active: Option<ActivateContext>,
}

impl Rng {
    /// A device that is not yet activated.
    pub fn new() -> Self {
        Rng::default()
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        ids::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features();
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, len = data.len(), "write to the empty virtio-rng configuration ignored");
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

    fn process_queue(&mut self, index: usize) {
        let Some(active) = &mut self.active else { return };
        if index != 0 {
            tracing::debug!(index, "notification for a virtio-rng queue that does not exist");
            return;
        }
        active.serve(0, fill_chain);
    }
}

/// Fills the chain's writable buffers, in order, with up to [`MAX_BYTES_PER_CHAIN`] random bytes and
/// returns how many were written. A chain with a device-readable buffer or an address outside guest
/// memory is not a valid request: it is returned with used length 0, so the driver gets no bytes.
fn fill_chain(mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
    let head = chain.head_index();
    let mut buf = [0u8; CHUNK];
    let mut written = 0usize;
    for desc in chain {
        if !desc.is_write_only() {
            tracing::warn!(head, "virtio-rng chain with a device-readable buffer ignored");
            return 0;
        }
        let want = usize::try_from(desc.len()).unwrap_or(usize::MAX).min(MAX_BYTES_PER_CHAIN - written);
        let mut done = 0;
        while done < want {
            let n = (want - done).min(CHUNK);
            if let Err(err) = getrandom(&mut buf[..n]) {
                tracing::error!(%err, "host getrandom failed; virtio-rng request answered with no bytes");
                return 0;
            }
            let addr = desc.addr().checked_add(done as u64);
            if addr.and_then(|addr| mem.write_slice(&buf[..n], addr).ok()).is_none() {
                tracing::warn!(head, "virtio-rng buffer outside guest memory; chain ignored");
                return 0;
            }
            done += n;
        }
        written += want;
        if written == MAX_BYTES_PER_CHAIN {
            break;
        }
    }
    // written <= MAX_BYTES_PER_CHAIN, far below u32::MAX.
    written as u32
}

/// Fills `buf` from the kernel's CSPRNG, retrying short reads and signal interruptions.
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes at `rest.as_mut_ptr()`, a live, mutably
        // borrowed buffer of that length; flags 0 selects the blocking urandom source.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}
