//! The ignite power-control port ([`crate::arch::layout::POWER_PORT`]).
//!
//! x86 guests without ACPI have no standard way to power off: Linux halts forever. `ignite-init` (and
//! any guest program with I/O privilege) writes one byte here instead; the VM ends as a power-off and
//! the byte is reported as the guest's exit code.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// The power-control device.
pub struct PowerDevice {
    exit: Arc<ExitSignal>,
}

impl PowerDevice {
    /// A device that ends the VM through `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        PowerDevice { exit }
    }
}

impl BusDevice for PowerDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let code = data.first().copied().unwrap_or(0);
        self.exit.exit(ExitReason::PowerOff { code });
    }
}
