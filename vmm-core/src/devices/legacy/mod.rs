//! Legacy PC devices on port I/O: COM1 serial (with its console socket), the i8042 controller and the
//! power-control port.

pub mod console;
pub mod i8042;
pub mod power;
pub mod serial;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line backed by an eventfd that KVM injects as an edge on an IOAPIC pin (irqfd).
#[derive(Debug)]
pub struct IrqEventFd(pub EventFd);

impl vm_superio::Trigger for IrqEventFd {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
