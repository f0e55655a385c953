//! The console socket: a unix socket on which clients (`ignite attach`) get the guest's serial output
//! and type its input.
//!
//! - Output: [`ConsoleTee`] is the UART's sink. It writes to the console log and to every connected
//!   client without blocking the vCPU: a client that does not keep up loses what does not fit in its
//!   socket buffer, and a client that is gone is dropped.
//! - Input: [`ConsoleSocket`] is an event-loop subscriber. Bytes read from clients go into the UART's
//!   64-byte receive FIFO with its interrupt ([`SerialDevice::enqueue_input`]). What does not fit waits
//!   (at most [`MAX_PENDING`] bytes, then clients are not read) until the guest reads the receive
//!   register, which the UART signals on an eventfd.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::serial::SerialDevice;
use crate::bus::lock;

/// Clients at once; more are refused (closed at once).
pub const MAX_CLIENTS: usize = 16;
/// Input bytes held for the guest beyond its FIFO before clients stop being read.
pub const MAX_PENDING: usize = 4096;

/// The console socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleSocketError {
    /// Something other than a socket is in the way.
    #[error("{0} exists and is not a unix socket")]
    NotASocket(PathBuf),
    /// Another process listens on the path.
    #[error("{0} is in use by a listening process")]
    InUse(PathBuf),
    /// Binding, removing a stale socket or creating the eventfd failed.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The clients receiving console output (by connection number), shared by the UART sink and the socket.
pub type ConsoleClients = Arc<Mutex<Vec<(u64, UnixStream)>>>;

/// The UART's output sink: the console log and every connected client.
pub struct ConsoleTee {
    log: Box<dyn Write + Send>,
    clients: ConsoleClients,
}

impl ConsoleTee {
    /// Writes to `log` and to `clients`.
    pub fn new(log: Box<dyn Write + Send>, clients: ConsoleClients) -> Self {
        ConsoleTee { log, clients }
    }
}

impl Write for ConsoleTee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.clients).retain_mut(|(_, client)| match client.write(buf) {
            Ok(_) => true,
            Err(e) => e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted,
        });
        self.log.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.log.flush()
    }
}

/// The listening console socket and its clients' input, polled by the device event loop.
pub struct ConsoleSocket {
    path: PathBuf,
    /// `(dev, ino)` of the socket file bound here, so `Drop` never removes someone else's.
    socket_id: (u64, u64),
    listener: UnixListener,
    serial: Arc<Mutex<SerialDevice>>,
    clients: ConsoleClients,
    /// The clients' input sides, by connection number.
    inputs: Vec<(u64, UnixStream)>,
    next_id: u64,
    /// Whether the input sockets are registered with the event loop (not while `pending` is full).
    reading: bool,
    pending: VecDeque<u8>,
    space: EventFd,
}

impl ConsoleSocket {
    /// Listens on `path` (replacing a stale socket nobody listens on) and feeds `serial`; output goes
    /// to `clients`, which the UART's [`ConsoleTee`] writes to.
    pub fn new(
        path: &Path,
        serial: Arc<Mutex<SerialDevice>>,
        clients: ConsoleClients,
    ) -> Result<ConsoleSocket, ConsoleSocketError> {
        let listen_err = |source| ConsoleSocketError::Listen { path: path.to_path_buf(), source };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ConsoleSocketError::NotASocket(path.to_path_buf()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ConsoleSocketError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(listen_err)?;
        }
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let meta = std::fs::symlink_metadata(path).map_err(listen_err)?;
        let space = EventFd::new(EFD_NONBLOCK).map_err(listen_err)?;
        lock(&serial).set_input_space_event(space.try_clone().map_err(listen_err)?);
        Ok(ConsoleSocket {
            path: path.to_path_buf(),
            socket_id: (meta.dev(), meta.ino()),
            listener,
            serial,
            clients,
            inputs: Vec::new(),
            next_id: 0,
            reading: true,
            pending: VecDeque::new(),
            space,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if lock(&self.clients).len() >= MAX_CLIENTS {
                tracing::warn!(path = %self.path.display(), "console client refused: too many clients");
                continue;
            }
            let Ok(output) = stream.try_clone() else { continue };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.reading {
                if let Err(err) = ops.add(Events::new(&stream, EventSet::IN)) {
                    tracing::warn!(?err, "console client cannot be polled");
                    continue;
                }
            }
            self.next_id += 1;
            lock(&self.clients).push((self.next_id, output));
            self.inputs.push((self.next_id, stream));
        }
    }

    /// Reads what a client typed. At the end of its input it is no longer read; a client that hung
    /// up (closed both directions) or failed is dropped altogether.
    fn read_client(&mut self, fd: RawFd, events: EventSet, ops: &mut EventOps) {
        let Some(index) = self.inputs.iter().position(|(_, s)| s.as_raw_fd() == fd) else { return };
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            let (id, stream) = self.inputs.swap_remove(index);
            let _ = ops.remove(Events::new(&stream, EventSet::IN));
            lock(&self.clients).retain(|(client, _)| *client != id);
            return;
        }
        let mut buf = [0u8; 1024];
        let room = MAX_PENDING.saturating_sub(self.pending.len()).min(buf.len());
        let end = match self.inputs[index].1.read(&mut buf[..room]) {
            Ok(0) => true,
            Ok(n) => {
                self.pending.extend(&buf[..n]);
                false
            }
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted),
        };
        if end {
            // Its output side stays until a write to it fails: a client may half-close and keep reading.
            let (_, stream) = self.inputs.swap_remove(index);
            let _ = ops.remove(Events::new(&stream, EventSet::IN));
        }
    }

    /// Moves pending input into the UART's FIFO, and starts or stops reading clients accordingly.
    fn flush(&mut self, ops: &mut EventOps) {
        if !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            let taken = lock(&self.serial).enqueue_input(front).unwrap_or(0);
            self.pending.drain(..taken);
            if !self.pending.is_empty() {
                self.pending.make_contiguous();
                let taken = lock(&self.serial).enqueue_input(self.pending.as_slices().0).unwrap_or(0);
                self.pending.drain(..taken);
            }
        }
        let full = self.pending.len() >= MAX_PENDING;
        if full && self.reading {
            for (_, stream) in &self.inputs {
                let _ = ops.remove(Events::new(stream, EventSet::IN));
            }
            self.reading = false;
        } else if !full && !self.reading {
            for (_, stream) in &self.inputs {
                let _ = ops.add(Events::new(stream, EventSet::IN));
            }
            self.reading = true;
        }
    }
}

impl MutEventSubscriber for ConsoleSocket {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if fd == self.space.as_raw_fd() {
            let _ = self.space.read();
        } else {
            self.read_client(fd, events.event_set(), ops);
        }
        self.flush(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.listener.as_raw_fd(), self.space.as_raw_fd()] {
            if let Err(err) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!(?err, path = %self.path.display(), "console socket cannot be polled");
            }
        }
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        // Only remove the file if it is still the socket bound here: a newer VMM may have replaced it.
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.socket_id {
                if let Err(err) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), %err, "console socket file not removed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;
    use crate::devices::legacy::IrqEventFd;

    #[test]
    fn output_reaches_the_log_and_every_client_and_dead_clients_are_dropped() {
        let clients: ConsoleClients = Arc::default();
        let (a, a_peer) = UnixStream::pair().unwrap();
        let (b, b_peer) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        lock(&clients).extend([(1, a), (2, b)]);
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut tee = ConsoleTee::new(Box::new(log.reopen().unwrap()), clients.clone());
        drop(b_peer);
        tee.write_all(b"boot\n").unwrap();
        assert_eq!(std::fs::read_to_string(log.path()).unwrap(), "boot\n");
        let mut got = [0u8; 5];
        (&a_peer).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"boot\n");
        assert_eq!(lock(&clients).len(), 1, "the closed client is dropped");
    }

    #[test]
    fn the_uart_signals_space_when_the_guest_reads_input_that_filled_its_fifo() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut serial = SerialDevice::new(IrqEventFd(irq), Box::new(io::sink()));
        let space = EventFd::new(EFD_NONBLOCK).unwrap();
        serial.set_input_space_event(space.try_clone().unwrap());
        assert_eq!(serial.enqueue_input(&[b'a'; 100]).unwrap(), 64, "the FIFO holds 64 bytes");
        let mut byte = [0u8];
        for _ in 0..31 {
            serial.read(0, &mut byte);
        }
        assert!(space.read().is_err(), "no space signalled while the FIFO is more than half full");
        serial.read(0, &mut byte);
        assert_eq!(&byte, b"a");
        assert_eq!(space.read().unwrap(), 1, "signalled once half the FIFO is free");
    }

    #[test]
    fn clients_type_into_the_uart_and_only_a_full_hang_up_drops_their_output() {
        use event_manager::{EventManager, SubscriberOps};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let clients: ConsoleClients = Arc::default();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let sink = ConsoleTee::new(Box::new(io::sink()), clients.clone());
        let serial = Arc::new(Mutex::new(SerialDevice::new(IrqEventFd(irq), Box::new(sink))));
        let socket = ConsoleSocket::new(&path, serial.clone(), clients.clone()).unwrap();
        let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> = EventManager::new().unwrap();
        manager.add_subscriber(Arc::new(Mutex::new(socket)));
        let mut run_until = |what: &str, cond: &dyn Fn() -> bool| {
            for _ in 0..100 {
                if cond() {
                    return;
                }
                manager.run_with_timeout(100).unwrap();
            }
            panic!("{what} did not happen");
        };
        let mut typist = UnixStream::connect(&path).unwrap();
        let watcher = UnixStream::connect(&path).unwrap();
        run_until("two clients", &|| lock(&clients).len() == 2);
        typist.write_all(b"hi").unwrap();
        let data_ready = || {
            let mut lsr = [0u8];
            lock(&serial).read(5, &mut lsr);
            lsr[0] & 1 == 1
        };
        run_until("input queued", &data_ready);
        let mut byte = [0u8];
        lock(&serial).read(0, &mut byte);
        assert_eq!(&byte, b"h");
        watcher.shutdown(std::net::Shutdown::Write).unwrap();
        drop(typist);
        run_until("the typist dropped", &|| lock(&clients).len() == 1);
        // The half-closed watcher still gets output.
        lock(&serial).write(0, b"x");
        let mut got = [0u8];
        (&watcher).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x");
    }
}
