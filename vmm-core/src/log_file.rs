//! Bounded VMM output: a log file with a size cap, rotated keeping one old file, and a rate limit on
//! log lines, so a chatty or hostile guest cannot fill the host's disk through the console or through
//! warnings it triggers.
//!
//! Both files are opened up front, so rotation needs no path: a jailed VMM can no longer open files.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The old file next to `path` that rotation keeps (`console.log` → `console.log.1`).
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// A log file that never grows past `max_bytes`: when a write would pass it, the current content moves
/// to `<path>.1` (replacing the older one) and the file starts again from empty.
pub struct CappedLog {
    current: File,
    old: File,
    len: u64,
    max_bytes: u64,
}

impl CappedLog {
    /// Opens (appends to) `path` and opens `<path>.1`, both 0600.
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<CappedLog> {
        use std::os::unix::fs::OpenOptionsExt;
        let current = OpenOptions::new().read(true).append(true).create(true).mode(0o600).open(path)?;
        let old = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(rotated_path(path))?;
        let len = current.metadata()?.len();
        let mut log = CappedLog { current, old, len, max_bytes: max_bytes.max(1) };
        if log.len > log.max_bytes {
            log.rotate()?;
        }
        Ok(log)
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.old.set_len(0)?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut offset = 0;
        loop {
            let n = self.current.read_at(&mut buf, offset)?;
            if n == 0 {
                break;
            }
            self.old.write_all_at(&buf[..n], offset)?;
            offset += n as u64;
        }
        self.current.set_len(0)?;
        self.len = 0;
        Ok(())
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.len + buf.len() as u64 > self.max_bytes && self.len > 0 {
            self.rotate()?;
        }
        // A single write larger than the cap keeps only what fits.
        let take = buf.len().min(usize::try_from(self.max_bytes.saturating_sub(self.len)).unwrap_or(usize::MAX));
        self.current.write_all(&buf[..take])?;
        self.len += take as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A token bucket for log lines: a burst of `burst` lines, then `per_second` lines a second; the
/// lines dropped meanwhile are counted and reported with the next line let through.
pub struct LineLimiter {
    burst: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
    dropped: u64,
}

impl LineLimiter {
    /// A limiter allowing `burst` lines at once and `per_second` after that.
    pub fn new(burst: u32, per_second: u32) -> LineLimiter {
        LineLimiter {
            burst: f64::from(burst),
            per_second: f64::from(per_second),
            tokens: f64::from(burst),
            last: Instant::now(),
            dropped: 0,
        }
    }

    /// Whether a line may be written now; `Some(n)` with the count of lines dropped before it.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens < 1.0 {
            self.dropped += 1;
            return None;
        }
        self.tokens -= 1.0;
        Some(std::mem::take(&mut self.dropped))
    }
}

/// A log sink: whole lines through a [`LineLimiter`] into a [`CappedLog`].
pub struct BoundedLog {
    file: CappedLog,
    limiter: LineLimiter,
}

/// The VMM log's defaults: 100 lines at once, then 20 a second.
pub const LOG_BURST: u32 = 100;
/// See [`LOG_BURST`].
pub const LOG_LINES_PER_SECOND: u32 = 20;

impl BoundedLog {
    /// Opens `path` capped at `max_bytes`, limited to [`LOG_BURST`] and [`LOG_LINES_PER_SECOND`].
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<BoundedLog> {
        Ok(BoundedLog {
            file: CappedLog::open(path, max_bytes)?,
            limiter: LineLimiter::new(LOG_BURST, LOG_LINES_PER_SECOND),
        })
    }

    /// Writes one formatted log record, or drops it when lines come too fast.
    pub fn write_record(&mut self, record: &[u8]) -> io::Result<()> {
        match self.limiter.admit(Instant::now()) {
            None => Ok(()),
            Some(0) => self.file.write_all(record),
            Some(dropped) => {
                self.file.write_all(format!("({dropped} log lines dropped: too many too fast)\n").as_bytes())?;
                self.file.write_all(record)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LIMITER_UNIT: Duration = Duration::from_secs(1);

    #[test]
    fn a_capped_log_rotates_keeping_one_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = CappedLog::open(&path, 10).unwrap();
        log.write_all(b"0123456").unwrap();
        log.write_all(b"abcdef").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abcdef");
        assert_eq!(std::fs::read(rotated_path(&path)).unwrap(), b"0123456");
        // One write larger than the cap keeps what fits.
        log.write_all(&[b'x'; 25]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"xxxxxxxxxx");
        assert_eq!(std::fs::read(rotated_path(&path)).unwrap(), b"abcdef");
        // 200 KiB through a 4 KiB cap: both files stay within it.
        for _ in 0..2000 {
            log.write_all(&[b'y'; 100]).unwrap();
        }
        drop(log);
        let mut log = CappedLog::open(&path, 4096).unwrap();
        log.write_all(&[b'z'; 4000]).unwrap();
        log.write_all(&[b'z'; 200]).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() <= 4096);
        assert!(std::fs::metadata(rotated_path(&path)).unwrap().len() <= 4096);
    }

    #[test]
    fn the_limiter_lets_a_burst_through_then_counts_what_it_drops() {
        let mut limiter = LineLimiter::new(3, 2);
        let t = Instant::now();
        assert_eq!((0..3).map(|_| limiter.admit(t)).collect::<Vec<_>>(), vec![Some(0); 3]);
        assert_eq!(limiter.admit(t), None);
        assert_eq!(limiter.admit(t), None);
        assert_eq!(limiter.admit(t + LIMITER_UNIT), Some(2), "two tokens a second, and two lines were dropped");
        assert_eq!(limiter.admit(t + LIMITER_UNIT), Some(0));
        assert_eq!(limiter.admit(t + LIMITER_UNIT), None);
    }
}
