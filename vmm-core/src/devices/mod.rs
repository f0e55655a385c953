//! Device models: legacy PC devices on port I/O, and virtio devices on MMIO.

pub mod legacy;
pub mod virtio;
