//! A log file with a size cap, fed through a pipe (the kubelet's output): a long-running service
//! must not fill the guest's disk with its log.
//!
//! A thread appends what comes through the pipe to the file. Before the file would grow past
//! `max_bytes`, it is renamed to `<file>.1` (replacing the one before) and a new file is started,
//! as logrotate's `size` with `rotate 1` would; lines stay whole unless one is longer than the cap. A write that fails (a full disk) drops that output
//! rather than stopping the copy, so the writer is never blocked on a full pipe.

use std::fs::{File, OpenOptions};
use std::io::{self, PipeWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

/// The older part of a rotated log: `<path>.1`.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Starts the copy into `path` (created with its directory; a file already over the cap is
/// rotated first). Returns the pipe's writing end, for the process's standard output and error,
/// and the copying thread, which ends when every copy of the writer is closed.
pub fn capped(path: &Path, max_bytes: u64) -> io::Result<(PipeWriter, JoinHandle<()>)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut log = Capped { path: path.to_path_buf(), max_bytes, file: None, size: 0 };
    log.open()?;
    let (mut reader, writer) = io::pipe()?;
    let thread = std::thread::Builder::new().name("log-copy".into()).spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => log.write(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })?;
    Ok((writer, thread))
}

struct Capped {
    path: PathBuf,
    max_bytes: u64,
    /// `None` after a failed open: tried again with the next output.
    file: Option<File>,
    size: u64,
}

impl Capped {
    /// Opens the file for appending, rotating it first when it is already at the cap.
    fn open(&mut self) -> io::Result<()> {
        let size = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if size >= self.max_bytes {
            return self.rotate();
        }
        self.file = Some(OpenOptions::new().create(true).append(true).open(&self.path)?);
        self.size = size;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        std::fs::rename(&self.path, rotated_path(&self.path))?;
        self.file = Some(OpenOptions::new().create(true).append(true).open(&self.path)?);
        self.size = 0;
        Ok(())
    }

    /// Appends `data`, rotating whenever the next part does not fit: lines stay whole, except one
    /// longer than the cap (cut at the cap) or one that came in pieces.
    fn write(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.file.is_none() && self.open().is_err() {
                return;
            }
            let room = usize::try_from(self.max_bytes.saturating_sub(self.size)).unwrap_or(usize::MAX).max(1);
            let take = if data.len() <= room {
                data.len()
            } else {
                match data[..room].iter().rposition(|&b| b == b'\n') {
                    Some(i) => i + 1,
                    // Rotate first: the line may fit whole in a new file.
                    None if self.size > 0 => 0,
                    None => room,
                }
            };
            if let Some(file) = &mut self.file {
                if file.write_all(&data[..take]).is_ok() {
                    self.size += take as u64;
                }
            }
            data = &data[take..];
            if (!data.is_empty() || self.size >= self.max_bytes) && self.rotate().is_err() {
                // Keep appending to the file rather than lose what comes next; try again a cap later.
                self.file = OpenOptions::new().append(true).open(&self.path).ok();
                self.size = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn output_past_the_cap_moves_to_dot_one_and_a_new_file_starts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("var/log/service.log");
        let (writer, thread) = capped(&path, 1000).unwrap();
        let stderr = writer.try_clone().unwrap();
        // 26 lines of 100 bytes on stdout, then one marker on stderr, as a service writes them.
        let script = "for i in $(seq 1 26); do printf '%099d\\n' $i; done; echo last-line >&2";
        let status = Command::new("sh").args(["-c", script]).stdout(writer).stderr(stderr).status().unwrap();
        assert!(status.success());
        thread.join().unwrap();
        let current = std::fs::read_to_string(&path).unwrap();
        let older = std::fs::read_to_string(rotated_path(&path)).unwrap();
        assert_eq!(
            current,
            format!("{:099}\n{:099}\n{:099}\n{:099}\n{:099}\n{:099}\nlast-line\n", 21, 22, 23, 24, 25, 26)
        );
        assert_eq!(older.len(), 1000, "the part before, one cap's worth");
        assert!(older.starts_with(&format!("{:099}\n", 11)), "only one older file is kept");
    }

    #[test]
    fn a_line_that_does_not_fit_starts_the_next_file_and_one_longer_than_the_cap_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("service.log");
        let (mut writer, thread) = capped(&path, 10).unwrap();
        writer.write_all(b"1234567\n").unwrap();
        writer.write_all(b"abcdef\n").unwrap();
        writer.write_all(b"0123456789abc\n").unwrap();
        drop(writer);
        thread.join().unwrap();
        assert_eq!(std::fs::read_to_string(rotated_path(&path)).unwrap(), "0123456789");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "abc\n");
    }

    #[test]
    fn a_file_already_at_the_cap_is_rotated_before_anything_is_added() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("service.log");
        std::fs::write(&path, vec![b'x'; 50]).unwrap();
        let (mut writer, thread) = capped(&path, 50).unwrap();
        writer.write_all(b"new start\n").unwrap();
        drop(writer);
        thread.join().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new start\n");
        assert_eq!(std::fs::read(rotated_path(&path)).unwrap(), vec![b'x'; 50]);
    }
}
