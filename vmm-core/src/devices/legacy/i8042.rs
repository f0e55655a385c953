//! A small i8042 PS/2 controller: enough for Linux's i8042 and atkbd drivers to probe a keyboard, for
//! the guest to reset the machine (command 0xFE), and for the host to press Ctrl-Alt-Del, which is how
//! a graceful stop reaches the guest (its init gets SIGINT, or the kernel reboots).
//!
//! The controller does no scancode translation (CTR bit 6 starts clear), so the keyboard speaks
//! scancode set 2 and the guest's atkbd interprets it as such.

use std::collections::VecDeque;
use std::sync::Arc;

use vm_superio::Trigger;

use super::IrqEventFd;
use crate::bus::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

// Status register bits.
const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_SYSTEM_FLAG: u8 = 0x04;
const SB_LAST_WAS_COMMAND: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

// Controller configuration byte (CTR) bits.
const CB_KBD_INT: u8 = 0x01;
const CB_POST_OK: u8 = 0x04;
const CB_KBD_DISABLED: u8 = 0x10;
const CB_AUX_DISABLED: u8 = 0x20;

// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xA7;
const CMD_AUX_ENABLE: u8 = 0xA8;
const CMD_AUX_TEST: u8 = 0xA9;
const CMD_SELF_TEST: u8 = 0xAA;
const CMD_KBD_TEST: u8 = 0xAB;
const CMD_KBD_DISABLE: u8 = 0xAD;
const CMD_KBD_ENABLE: u8 = 0xAE;
const CMD_READ_OUTP: u8 = 0xD0;
const CMD_WRITE_OUTP: u8 = 0xD1;
const CMD_RESET_CPU: u8 = 0xFE;

// Keyboard commands and replies.
const KBD_RESET: u8 = 0xFF;
const KBD_GET_ID: u8 = 0xF2;
const KBD_ACK: u8 = 0xFA;
const KBD_SELF_TEST_OK: u8 = 0xAA;
const AUX_TEST_FAILED: u8 = 0xFF;
const SELF_TEST_OK: u8 = 0x55;

/// Ctrl, Alt and Del pressed then released, in scancode set 2.
const CTRL_ALT_DEL: [u8; 10] = [0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0];
const CTRL_RELEASE_TAIL: u8 = 0x14;

/// Output buffer bound: the guest reads one byte per interrupt; a stuck guest must not grow memory.
const MAX_PENDING: usize = 64;

/// What an [`I8042`] holds between two guest accesses: its registers and the bytes the guest has not
/// read yet.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    /// The status register.
    pub status: u8,
    /// The controller configuration byte.
    pub ctr: u8,
    /// The output port.
    pub outp: u8,
    /// A command still waiting for its argument.
    pub pending_command: Option<u8>,
    /// Output bytes not yet read by the guest.
    pub out: Vec<u8>,
}

/// The i8042 device on the port-I/O bus at 0x60..=0x64.
pub struct I8042 {
    status: u8,
    ctr: u8,
    outp: u8,
    /// A command that expects its argument on the data port.
    pending_command: Option<u8>,
    out: VecDeque<u8>,
    irq: IrqEventFd,
    exit: Arc<ExitSignal>,
}

impl I8042 {
    /// A controller raising `irq` (IRQ 1) and ending the VM through `exit` on a reset command.
    pub fn new(irq: IrqEventFd, exit: Arc<ExitSignal>) -> Self {
        I8042 {
            status: SB_SYSTEM_FLAG | SB_KBD_ENABLED,
            ctr: CB_KBD_INT | CB_POST_OK | CB_AUX_DISABLED,
            outp: 0x01,
            pending_command: None,
            out: VecDeque::new(),
            irq,
            exit,
        }
    }

    /// The controller's registers and unread output, for a snapshot.
    pub fn state(&self) -> I8042State {
        I8042State {
            status: self.status,
            ctr: self.ctr,
            outp: self.outp,
            pending_command: self.pending_command,
            out: self.out.iter().copied().collect(),
        }
    }

    /// Puts the controller back in a snapshot's `state` (no interrupt is raised: the interrupt
    /// controller's own state, restored with it, already holds any that was pending).
    pub fn restore(&mut self, state: &I8042State) {
        self.status = state.status;
        self.ctr = state.ctr;
        self.outp = state.outp;
        self.pending_command = state.pending_command;
        self.out = state.out.iter().copied().take(MAX_PENDING).collect();
    }

    /// Presses and releases Ctrl-Alt-Del on the keyboard. Fails when the guest has left too many bytes
    /// unread (it is not servicing the keyboard).
    pub fn press_ctrl_alt_del(&mut self) -> std::io::Result<()> {
        if self.out.len() + CTRL_ALT_DEL.len() + 1 > MAX_PENDING {
            return Err(std::io::Error::other("the guest is not reading its keyboard"));
        }
        for byte in CTRL_ALT_DEL.iter().chain(std::iter::once(&CTRL_RELEASE_TAIL)) {
            self.out.push_back(*byte);
        }
        self.refresh_output();
        Ok(())
    }

    fn push(&mut self, byte: u8) {
        if self.out.len() < MAX_PENDING {
            self.out.push_back(byte);
        }
        self.refresh_output();
    }

    /// Keeps OBF in step with the buffer and raises IRQ 1 for the byte now at its head.
    fn refresh_output(&mut self) {
        if self.out.is_empty() {
            self.status &= !SB_OUT_DATA_AVAIL;
            return;
        }
        let newly_available = self.status & SB_OUT_DATA_AVAIL == 0;
        self.status |= SB_OUT_DATA_AVAIL;
        if newly_available && self.ctr & CB_KBD_INT != 0 && self.ctr & CB_KBD_DISABLED == 0 {
            if let Err(err) = self.irq.trigger() {
                tracing::warn!(%err, "i8042 interrupt could not be raised");
            }
        }
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.out.pop_front().unwrap_or(0);
        self.status &= !SB_OUT_DATA_AVAIL;
        self.refresh_output();
        byte
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending_command = Some(cmd),
            CMD_READ_OUTP => self.push(self.outp),
            CMD_SELF_TEST => self.push(SELF_TEST_OK),
            CMD_KBD_TEST => self.push(0x00),
            CMD_AUX_TEST => self.push(AUX_TEST_FAILED),
            CMD_KBD_DISABLE => self.ctr |= CB_KBD_DISABLED,
            CMD_KBD_ENABLE => {
                self.ctr &= !CB_KBD_DISABLED;
                self.refresh_output();
            }
            CMD_AUX_DISABLE => self.ctr |= CB_AUX_DISABLED,
            CMD_AUX_ENABLE => self.ctr &= !CB_AUX_DISABLED,
            CMD_RESET_CPU => self.exit.exit(ExitReason::Reset),
            _ => tracing::debug!(cmd, "unhandled i8042 command"),
        }
    }

    fn write_data(&mut self, byte: u8) {
        self.status &= !SB_LAST_WAS_COMMAND;
        match self.pending_command.take() {
            Some(CMD_WRITE_CTR) => {
                self.ctr = byte;
                self.refresh_output();
            }
            Some(_) => self.outp = byte,
            // A byte for the keyboard itself.
            None => match byte {
                KBD_RESET => {
                    self.out.clear();
                    self.push(KBD_ACK);
                    self.push(KBD_SELF_TEST_OK);
                }
                KBD_GET_ID => {
                    self.push(KBD_ACK);
                    self.push(0xAB);
                    self.push(0x83);
                }
                _ => self.push(KBD_ACK),
            },
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let [byte] = data else { return };
        *byte = match offset {
            DATA_OFFSET => self.read_data(),
            COMMAND_OFFSET => self.status,
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [byte] = data else { return };
        match offset {
            DATA_OFFSET => self.write_data(*byte),
            COMMAND_OFFSET => self.command(*byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn device() -> (I8042, EventFd, Arc<ExitSignal>) {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let exit = Arc::new(ExitSignal::new().unwrap());
        (I8042::new(IrqEventFd(irq.try_clone().unwrap()), exit.clone()), irq, exit)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn answers_the_linux_probe_sequence() {
        let (mut dev, _irq, _exit) = device();
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut dev, COMMAND_OFFSET) & SB_OUT_DATA_AVAIL, 0);
        assert_eq!(read(&mut dev, DATA_OFFSET), SELF_TEST_OK);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & SB_OUT_DATA_AVAIL, 0);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[0x47]);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x47);
        dev.write(DATA_OFFSET, &[KBD_RESET]);
        assert_eq!((read(&mut dev, DATA_OFFSET), read(&mut dev, DATA_OFFSET)), (KBD_ACK, KBD_SELF_TEST_OK));
    }

    #[test]
    fn reset_command_ends_the_vm_as_a_reset() {
        let (mut dev, _irq, exit) = device();
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn ctrl_alt_del_is_delivered_one_interrupt_per_byte() {
        let (mut dev, irq, _exit) = device();
        dev.press_ctrl_alt_del().unwrap();
        let mut got = Vec::new();
        while read(&mut dev, COMMAND_OFFSET) & SB_OUT_DATA_AVAIL != 0 {
            assert_eq!(irq.read().unwrap(), 1, "one edge per available byte");
            got.push(read(&mut dev, DATA_OFFSET));
        }
        assert_eq!(got, [0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14]);
    }

    #[test]
    fn a_guest_that_never_reads_cannot_grow_the_buffer() {
        let (mut dev, _irq, _exit) = device();
        let presses = (0..20).filter(|_| dev.press_ctrl_alt_del().is_ok()).count();
        assert!(presses < 20);
        assert!(dev.out.len() <= MAX_PENDING);
    }
}
