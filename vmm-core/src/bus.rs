//! The MMIO and port-I/O buses: vCPU exits are dispatched here to the device that owns the address.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable by the guest through MMIO or port I/O. `offset` is relative to the device's base.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`. Unimplemented registers read as zero.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`. Unimplemented registers ignore writes.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Two devices claim overlapping ranges.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bus range {base:#x}+{len:#x} overlaps a device already inserted")]
pub struct BusOverlap {
    /// Base of the rejected range.
    pub base: u64,
    /// Length of the rejected range.
    pub len: u64,
}

/// Address ranges mapped to devices. Built once before the vCPUs start, then only read.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Maps `[base, base + len)` to `device`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusOverlap> {
        let overlap = |(&b, &(l, _)): (&u64, &(u64, SharedDevice))| base < b + l && b < base + len;
        if len == 0 || self.ranges.iter().any(overlap) {
            return Err(BusOverlap { base, len });
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, device)) = self.ranges.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, device))
    }

    /// Dispatches a guest read; returns false (and leaves `data` zeroed) when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        data.fill(0);
        match self.find(addr) {
            Some((offset, device)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write; returns false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device mutex, recovering from a poisoned lock: a panic in one device access must not
/// wedge every vCPU that touches it afterwards.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Scratch(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlaps() {
        let dev = Arc::new(Mutex::new(Scratch::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert_eq!(bus.insert(dev.clone(), 0x10f, 1), Err(BusOverlap { base: 0x10f, len: 1 }));
        assert_eq!(bus.insert(dev.clone(), 0xf8, 0x10), Err(BusOverlap { base: 0xf8, len: 0x10 }));
        bus.insert(dev.clone(), 0x110, 1).unwrap();
        let mut buf = [0xffu8; 2];
        assert!(bus.read(0x104, &mut buf));
        assert_eq!(buf, [4, 4]);
        assert!(!bus.read(0x111, &mut buf));
        assert_eq!(buf, [0, 0]);
        assert!(bus.write(0x10f, &[7]));
        assert!(!bus.write(0xff, &[7]));
        assert_eq!(dev.lock().unwrap().0, vec![(0xf, vec![7])]);
    }
}
