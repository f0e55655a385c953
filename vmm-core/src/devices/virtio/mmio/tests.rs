//! The transport driven the way a Linux driver drives it, through `BusDevice` accesses only.

use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::{ActivateError, INT_CONFIG, INT_USED_RING};

const FAKE_FEATURES: u64 = features::VERSION_1 | features::RING_EVENT_IDX | 1;
const QUEUE_SIZES: [u16; 2] = [16, 8];

/// A device that records what the transport asks of it.
#[derive(Default)]
struct Fake {
    config: [u8; 8],
    acked: u64,
    /// For each activation: the event-index flag of every queue handed over.
    activations: Vec<Vec<bool>>,
    resets: usize,
    fail_activation: bool,
    active: bool,
}

impl VirtioDevice for Fake {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn avail_features(&self) -> u64 {
        FAKE_FEATURES
    }
    fn set_acked_features(&mut self, acked: u64) {
        self.acked = acked;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::devices::virtio::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let start = offset as usize;
        self.config[start..start + data.len()].copy_from_slice(data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.activations.push(ctx.queues.iter().map(|q| q.event_idx_enabled()).collect());
        if self.fail_activation {
            return Err(ActivateError::Backend(std::io::Error::other("no backend")));
        }
        self.active = true;
        Ok(())
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.active = false;
    }
    fn is_activated(&self) -> bool {
        self.active
    }
    fn active_queues(&self) -> Option<&[Queue]> {
        None
    }
    fn process_queue(&mut self, _index: usize) {}
}

fn setup() -> (MmioTransport, Arc<Mutex<Fake>>) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let fake = Arc::new(Mutex::new(Fake::default()));
    let transport = MmioTransport::new(mem, fake.clone()).unwrap();
    (transport, fake)
}

fn rd(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0xffu8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn wr(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn write_features(t: &mut MmioTransport, acked: u64) {
    wr(t, REG_DRIVER_FEATURES_SEL, 0);
    wr(t, REG_DRIVER_FEATURES, acked as u32);
    wr(t, REG_DRIVER_FEATURES_SEL, 1);
    wr(t, REG_DRIVER_FEATURES, (acked >> 32) as u32);
}

/// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status read back.
fn negotiate(t: &mut MmioTransport, acked: u64) -> u32 {
    wr(t, REG_STATUS, ACKNOWLEDGE);
    wr(t, REG_STATUS, ACKNOWLEDGE | DRIVER);
    write_features(t, acked);
    wr(t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    rd(t, REG_STATUS)
}

fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
    wr(t, REG_QUEUE_SEL, index);
    assert_eq!(rd(t, REG_QUEUE_READY), 0);
    wr(t, REG_QUEUE_NUM, size);
    for (low, value) in
        [(REG_QUEUE_DESC_LOW, base), (REG_QUEUE_DRIVER_LOW, base + 0x1000), (REG_QUEUE_DEVICE_LOW, base + 0x2000)]
    {
        wr(t, low, value as u32);
        wr(t, low + 4, (value >> 32) as u32);
    }
    wr(t, REG_QUEUE_READY, 1);
}

const ALL_OK: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

#[test]
fn identifies_as_a_version_2_device() {
    let (mut t, _) = setup();
    assert_eq!(rd(&mut t, REG_MAGIC), 0x7472_6976);
    assert_eq!(rd(&mut t, REG_VERSION), 2);
    assert_eq!(rd(&mut t, REG_DEVICE_ID), 42);
    assert_eq!(rd(&mut t, REG_VENDOR_ID), VENDOR_ID);
    assert_eq!(rd(&mut t, REG_CONFIG_GENERATION), 0);
    assert_eq!(rd(&mut t, REG_SHM_LEN_LOW), u32::MAX);
    assert_eq!(cmdline_arg(0xd000_1000, 6), "virtio_mmio.device=4K@0xd0001000:6");
}

#[test]
fn full_handshake_activates_the_device_and_reset_undoes_it() {
    let (mut t, fake) = setup();
    wr(&mut t, REG_DEVICE_FEATURES_SEL, 0);
    assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), FAKE_FEATURES as u32);
    wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
    assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), (FAKE_FEATURES >> 32) as u32);
    wr(&mut t, REG_DEVICE_FEATURES_SEL, 2);
    assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 0);

    let acked = features::VERSION_1 | features::RING_EVENT_IDX;
    assert_eq!(negotiate(&mut t, acked), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(fake.lock().unwrap().acked, acked);
    // Features are frozen once accepted.
    write_features(&mut t, 0);
    assert_eq!(t.acked_features, acked);

    wr(&mut t, REG_QUEUE_SEL, 1);
    assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 8);
    wr(&mut t, REG_QUEUE_SEL, 2);
    assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0, "queues past the last read as absent");
    setup_queue(&mut t, 0, 16, 0x1_0000);
    setup_queue(&mut t, 1, 8, 0x2_0000);
    assert!(!fake.lock().unwrap().active);

    wr(&mut t, REG_STATUS, ALL_OK);
    assert_eq!(rd(&mut t, REG_STATUS), ALL_OK);
    assert!(fake.lock().unwrap().active);
    assert_eq!(fake.lock().unwrap().activations, vec![vec![true, true]]);

    // A live queue cannot be reconfigured or disabled.
    wr(&mut t, REG_QUEUE_SEL, 0);
    wr(&mut t, REG_QUEUE_READY, 0);
    wr(&mut t, REG_QUEUE_DESC_LOW, 0x5_0000);
    assert_eq!(rd(&mut t, REG_QUEUE_READY), 1);
    assert_eq!(t.queues[0].desc_table(), 0x1_0000);

    t.interrupt().signal_used_queue();
    wr(&mut t, REG_STATUS, 0);
    assert_eq!(rd(&mut t, REG_STATUS), 0);
    assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
    assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
    let fake = fake.lock().unwrap();
    assert_eq!(fake.resets, 1);
    assert!(!fake.active);
}

#[test]
fn features_ok_requires_version_1_and_offered_features_only() {
    let (mut t, fake) = setup();
    assert_eq!(negotiate(&mut t, 1), ACKNOWLEDGE | DRIVER, "VERSION_1 missing");
    assert_eq!(negotiate(&mut t, features::VERSION_1 | 1 << 5), ACKNOWLEDGE | DRIVER, "bit 5 not offered");
    wr(&mut t, REG_DRIVER_FEATURES_SEL, 2);
    wr(&mut t, REG_DRIVER_FEATURES, 1);
    assert_eq!(negotiate(&mut t, features::VERSION_1), ACKNOWLEDGE | DRIVER, "bit 64 not offered");
    assert_eq!(fake.lock().unwrap().acked, 0, "rejected features never reach the device");

    wr(&mut t, REG_STATUS, 0);
    assert_eq!(negotiate(&mut t, features::VERSION_1), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(fake.lock().unwrap().acked, features::VERSION_1);
}

#[test]
fn out_of_order_status_writes_are_ignored() {
    let (mut t, fake) = setup();
    wr(&mut t, REG_STATUS, ALL_OK);
    assert_eq!(rd(&mut t, REG_STATUS), 0);
    wr(&mut t, REG_STATUS, ACKNOWLEDGE);
    wr(&mut t, REG_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(rd(&mut t, REG_STATUS), ACKNOWLEDGE);
    wr(&mut t, REG_STATUS, DRIVER);
    assert_eq!(rd(&mut t, REG_STATUS), ACKNOWLEDGE, "bits cannot be cleared without a reset");
    wr(&mut t, REG_STATUS, ACKNOWLEDGE | FAILED);
    assert_eq!(rd(&mut t, REG_STATUS), ACKNOWLEDGE | FAILED);
    assert!(fake.lock().unwrap().activations.is_empty());
}

#[test]
fn queue_registers_are_ignored_before_features_ok() {
    let (mut t, _) = setup();
    wr(&mut t, REG_STATUS, ACKNOWLEDGE);
    wr(&mut t, REG_QUEUE_READY, 1);
    assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
}

#[test]
fn ready_queue_keeps_its_configuration() {
    let (mut t, _) = setup();
    negotiate(&mut t, features::VERSION_1);
    setup_queue(&mut t, 0, 16, 0x1_0000);
    wr(&mut t, REG_QUEUE_NUM, 4);
    wr(&mut t, REG_QUEUE_DEVICE_LOW, 0x9_0000);
    assert_eq!(t.queues[0].size(), 16);
    assert_eq!(t.queues[0].used_ring(), 0x1_2000);
}

#[test]
fn notify_register_signals_the_queue_eventfd() {
    let (mut t, _) = setup();
    wr(&mut t, NOTIFY_REG_OFFSET, 1);
    assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
    assert!(t.queue_evts()[0].read().is_err(), "other queues are not signalled");
    wr(&mut t, NOTIFY_REG_OFFSET, 7);
    wr(&mut t, NOTIFY_REG_OFFSET, u32::MAX);
}

#[test]
fn interrupt_status_is_acked_by_the_driver() {
    let (mut t, _) = setup();
    t.interrupt().signal_used_queue();
    t.interrupt().signal_config_changed();
    assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), INT_USED_RING | INT_CONFIG);
    wr(&mut t, REG_INTERRUPT_ACK, INT_USED_RING);
    assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG);
    assert_eq!(t.interrupt().irqfd().read().unwrap(), 2);
}

#[test]
fn config_space_is_delegated_at_any_width() {
    let (mut t, fake) = setup();
    t.write(0x100, &[1, 2]);
    t.write(0x104, &0x0807_0605u32.to_le_bytes());
    assert_eq!(fake.lock().unwrap().config, [1, 2, 0, 0, 5, 6, 7, 8]);
    let mut byte = [0u8; 1];
    t.read(0x101, &mut byte);
    assert_eq!(byte, [2]);
    let mut quad = [0u8; 8];
    t.read(0x100, &mut quad);
    assert_eq!(quad, [1, 2, 0, 0, 5, 6, 7, 8]);
    t.read(0x106, &mut quad);
    assert_eq!(quad, [7, 8, 0, 0, 0, 0, 0, 0], "bytes past the config space read as zero");
}

#[test]
fn non_32_bit_register_accesses_are_ignored() {
    let (mut t, _) = setup();
    let mut half = [0xffu8; 2];
    t.read(REG_MAGIC, &mut half);
    assert_eq!(half, [0, 0]);
    t.write(REG_STATUS, &[ACKNOWLEDGE as u8]);
    t.write(REG_STATUS, &u64::from(ACKNOWLEDGE).to_le_bytes());
    assert_eq!(rd(&mut t, REG_STATUS), 0);
    assert_eq!(rd(&mut t, 0x02), 0, "unaligned offsets are no register");
}

#[test]
fn queue_outside_guest_memory_fails_activation_with_needs_reset() {
    let (mut t, fake) = setup();
    negotiate(&mut t, features::VERSION_1);
    setup_queue(&mut t, 0, 16, 0x1_0000);
    setup_queue(&mut t, 1, 8, 0x1_0000_0000);
    wr(&mut t, REG_STATUS, ALL_OK);
    assert_eq!(rd(&mut t, REG_STATUS), ALL_OK | NEEDS_RESET);
    assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG);
    assert!(fake.lock().unwrap().activations.is_empty());

    // Echoing NEEDS_RESET back neither clears nor confuses the state machine; a reset clears it.
    wr(&mut t, REG_STATUS, ALL_OK | NEEDS_RESET | FAILED);
    assert_eq!(rd(&mut t, REG_STATUS), ALL_OK | NEEDS_RESET | FAILED);
    wr(&mut t, REG_STATUS, 0);
    assert_eq!(rd(&mut t, REG_STATUS), 0);
}

#[test]
fn queue_left_unready_fails_activation() {
    let (mut t, fake) = setup();
    negotiate(&mut t, features::VERSION_1);
    setup_queue(&mut t, 0, 16, 0x1_0000);
    wr(&mut t, REG_STATUS, ALL_OK);
    assert_eq!(rd(&mut t, REG_STATUS) & NEEDS_RESET, NEEDS_RESET);
    assert!(fake.lock().unwrap().activations.is_empty());
}

#[test]
fn device_activation_error_sets_needs_reset() {
    let (mut t, fake) = setup();
    fake.lock().unwrap().fail_activation = true;
    negotiate(&mut t, features::VERSION_1);
    setup_queue(&mut t, 0, 16, 0x1_0000);
    setup_queue(&mut t, 1, 8, 0x2_0000);
    wr(&mut t, REG_STATUS, ALL_OK);
    assert_eq!(rd(&mut t, REG_STATUS), ALL_OK | NEEDS_RESET);
    assert_eq!(fake.lock().unwrap().activations, vec![vec![false, false]], "event idx not acked");
}

#[test]
fn queue_size_the_queue_cannot_take_fails_activation() {
    let (mut t, fake) = setup();
    negotiate(&mut t, features::VERSION_1);
    setup_queue(&mut t, 0, 16, 0x1_0000);
    setup_queue(&mut t, 1, 3, 0x2_0000);
    wr(&mut t, REG_STATUS, ALL_OK);
    assert_eq!(rd(&mut t, REG_STATUS), ALL_OK | NEEDS_RESET);
    assert!(fake.lock().unwrap().activations.is_empty());

    // After a reset the same queue with a valid size works.
    wr(&mut t, REG_STATUS, 0);
    negotiate(&mut t, features::VERSION_1);
    setup_queue(&mut t, 0, 16, 0x1_0000);
    setup_queue(&mut t, 1, 4, 0x2_0000);
    wr(&mut t, REG_STATUS, ALL_OK);
    assert_eq!(rd(&mut t, REG_STATUS), ALL_OK);
    assert_eq!(t.queues[1].size(), 4);
}
