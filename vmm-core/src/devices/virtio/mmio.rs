//! virtio-mmio transport: PLACEHOLDER, being written (compile-only stub; never committed as is).
