//! COM1: a 16550 UART from vm-superio, whose output goes to the configured console sink.
//!
//! A faithful UART model matters on emulated hosts: the kernel's 8250 probe took ~50 s against a naive
//! one (PLATFORM.md).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::IrqEventFd;
use crate::bus::BusDevice;
use crate::config::ConsoleConfig;
use crate::log_file::CappedLog;

/// The console could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open console {path}")]
pub struct ConsoleError {
    /// The console file or `stdout`.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// Opens the sink for the guest's console output. Output is written unbuffered so a crash loses nothing.
/// A file is capped at `max_bytes` (rotated, see [`CappedLog`]) when given.
pub fn open_console(config: &ConsoleConfig, max_bytes: Option<u64>) -> Result<Box<dyn Write + Send>, ConsoleError> {
    let opened: io::Result<Box<dyn Write + Send>> = match (config, max_bytes) {
        (ConsoleConfig::Stdout, _) => io::stdout().as_fd().try_clone_to_owned().map(|fd| Box::new(File::from(fd)) as _),
        (ConsoleConfig::File(path), Some(max)) => CappedLog::open(path, max).map(|log| Box::new(log) as _),
        (ConsoleConfig::File(path), None) => {
            OpenOptions::new().create(true).append(true).open(path).map(|file| Box::new(file) as _)
        }
        (ConsoleConfig::Null, _) => return Ok(Box::new(io::sink())),
    };
    let path = match config {
        ConsoleConfig::File(path) => path.clone(),
        _ => PathBuf::from("stdout"),
    };
    opened.map_err(|source| ConsoleError { path, source })
}

/// A 16550's registers and the input the guest has not read yet: vm-superio's `SerialState`, in a
/// form a snapshot can store.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    /// Divisor latch, low and high byte.
    pub baud_divisor: [u8; 2],
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes not yet read by the guest (at most the 64-byte FIFO).
    pub in_buffer: Vec<u8>,
}

/// The 16550's receive FIFO size.
const FIFO_SIZE: usize = 64;

impl SerialState {
    fn from_superio(s: &vm_superio::serial::SerialState) -> Self {
        SerialState {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }

    fn to_superio(&self) -> vm_superio::serial::SerialState {
        vm_superio::serial::SerialState {
            baud_divisor_low: self.baud_divisor[0],
            baud_divisor_high: self.baud_divisor[1],
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer: self.in_buffer.iter().copied().take(FIFO_SIZE).collect(),
        }
    }
}

/// The COM1 device on the port-I/O bus.
pub struct SerialDevice {
    uart: Serial<IrqEventFd, NoEvents, Box<dyn Write + Send>>,
    write_failed: bool,
    /// Signalled when the guest made room in the receive FIFO after input did not fit.
    input_space: Option<EventFd>,
    input_waiting: bool,
}

/// Free FIFO bytes at which waiting input is signalled (half the 64-byte FIFO).
const INPUT_SPACE_MARK: usize = 32;

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: IrqEventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice { uart: Serial::new(irq, out), write_failed: false, input_space: None, input_waiting: false }
    }

    /// A UART in a snapshot's `state`, raising `irq` and writing to `out`.
    pub fn restore(irq: IrqEventFd, out: Box<dyn Write + Send>, state: &SerialState) -> Self {
        let uart = Serial::from_state(&state.to_superio(), irq, NoEvents, out)
            .unwrap_or_else(|_| unreachable!("to_superio keeps at most a FIFO of input"));
        SerialDevice { uart, write_failed: false, input_space: None, input_waiting: false }
    }

    /// The UART's registers and unread input, for a snapshot.
    pub fn state(&self) -> SerialState {
        SerialState::from_superio(&self.uart.state())
    }

    /// Queues bytes for the guest to read (console input), raising the receive interrupt. Returns how
    /// many fit in the FIFO; when not all did, the input-space event fires once the guest has read
    /// enough of them.
    pub fn enqueue_input(&mut self, input: &[u8]) -> io::Result<usize> {
        let result = self.uart.enqueue_raw_bytes(input).map_err(|err| io::Error::other(format!("{err:?}")));
        if !matches!(result, Ok(n) if n == input.len()) {
            self.input_waiting = true;
        }
        result
    }

    /// The eventfd signalled when input that did not fit can be queued again ([`Self::enqueue_input`]).
    pub fn set_input_space_event(&mut self, evt: EventFd) {
        self.input_space = Some(evt);
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.uart.read(offset);
            if offset == 0 && self.input_waiting && self.uart.fifo_capacity() >= INPUT_SPACE_MARK {
                self.input_waiting = false;
                if let Some(evt) = &self.input_space {
                    let _ = evt.write(1);
                }
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), [byte]) = (u8::try_from(offset), data) else { return };
        if let Err(err) = self.uart.write(offset, *byte) {
            // A full disk or a closed pipe must not stop the guest; say it once.
            if !self.write_failed {
                tracing::warn!(?err, "console output failed; further console errors are not logged");
                self.write_failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn transmitted_bytes_reach_the_console_file_and_raise_the_irq() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let out = open_console(&ConsoleConfig::File(path.clone()), None).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut serial = SerialDevice::new(IrqEventFd(irq.try_clone().unwrap()), out);
        serial.write(1, &[0x02]); // IER: transmitter holding register empty interrupt
        for byte in b"hi\n" {
            serial.write(0, &[*byte]);
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "hi\n");
        assert!(irq.read().unwrap() >= 1);
        // Input is readable through the receive buffer.
        serial.enqueue_input(b"x").unwrap();
        let mut byte = [0u8];
        serial.read(0, &mut byte);
        assert_eq!(&byte, b"x");
    }

    #[test]
    fn a_console_that_cannot_be_opened_names_its_path() {
        let err = open_console(&ConsoleConfig::File("/nonexistent/dir/console.log".into()), None).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/dir/console.log"), "{err}");
    }
}
