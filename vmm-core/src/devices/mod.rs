//! Device models: legacy PC devices on port I/O, and virtio devices on MMIO.

pub mod legacy;
pub mod virtio;

use std::sync::{Arc, Mutex};

use crate::config::VmConfig;
use crate::devices::virtio::VirtioDevice;
use crate::vm::VmError;

/// Creates the virtio devices `config` asks for, in slot order: disks, nets, vsock, rng.
pub(crate) fn build_virtio_devices(config: &VmConfig) -> Result<Vec<Arc<Mutex<dyn VirtioDevice>>>, VmError> {
    fn device_err(device: String) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> VmError {
        move |source| VmError::Device { device, source }
    }
    let mut devices: Vec<Arc<Mutex<dyn VirtioDevice>>> = Vec::new();
    for disk in &config.disks {
        let block = virtio::block::Block::new(disk)
            .map_err(|e| device_err(format!("disk {}", disk.path.display()))(e.into()))?;
        devices.push(Arc::new(Mutex::new(block)));
    }
    for net in &config.nets {
        let dev = virtio::net::Net::new(net)
            .map_err(|e| device_err(format!("network interface on tap {}", net.tap))(e.into()))?;
        devices.push(Arc::new(Mutex::new(dev)));
    }
    if let Some(vsock) = &config.vsock {
        let dev = virtio::vsock::Vsock::new(vsock)
            .map_err(|e| device_err(format!("vsock on {}", vsock.uds_path.display()))(e.into()))?;
        devices.push(Arc::new(Mutex::new(dev)));
    }
    if config.rng {
        devices.push(Arc::new(Mutex::new(virtio::rng::Rng::new())));
    }
    Ok(devices)
}
