//! Where this process's tracing output goes: standard error, or (for a VMM given `--log-file`) a
//! capped, rate-limited file.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use vmm_core::log_file::BoundedLog;

static FILE: OnceLock<Mutex<BoundedLog>> = OnceLock::new();

/// Sends all later log records to `log`.
pub fn set(log: BoundedLog) {
    // A second call keeps the first file.
    let _ = FILE.set(Mutex::new(log));
}

/// The tracing writer: one record per write call (tracing's fmt layer writes each event at once).
pub struct Sink;

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match FILE.get() {
            Some(file) => {
                let mut file = file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                file.write_record(buf)?;
                Ok(buf.len())
            }
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Makes a [`Sink`] for each record.
pub fn make() -> Sink {
    Sink
}
