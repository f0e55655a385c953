//! The sparse copy behind the `copy` snapshotter.
//!
//! `std::fs::copy` writes every byte, so a 2 GiB disk would cost 2 GiB of host space at once; the
//! base images are mostly empty ext4, so copying block by block and seeking over all-zero blocks
//! keeps the copy as sparse as the content allows (VM disks are created often; their space is
//! only paid for when the guest writes).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Copy granularity: a multiple of every filesystem block size in use, small enough to find holes.
const BLOCK: usize = 64 * 1024;

/// Copies `src` to `dst` (created or truncated), leaving holes where `src` has all-zero blocks.
pub fn sparse_copy(src: &Path, dst: &Path) -> io::Result<()> {
    let mut input = File::open(src)?;
    let mut output = OpenOptions::new().write(true).create(true).truncate(true).open(dst)?;
    let total = write_nonzero(&mut input, &mut output)?;
    // The trailing zeros were skipped: the length makes them holes.
    output.set_len(total)
}

/// Copies `input` from its position to `output` from its position, seeking over all-zero blocks
/// instead of writing them, so `output` must read as zeros where they land (a new sparse file, a
/// fresh thin volume). Returns the bytes covered.
pub(crate) fn write_nonzero(input: &mut File, output: &mut File) -> io::Result<u64> {
    let mut buf = vec![0u8; BLOCK];
    let mut total: u64 = 0;
    loop {
        let n = read_full(input, &mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        let chunk = &buf[..n];
        if chunk.iter().all(|&b| b == 0) {
            output.seek(SeekFrom::Current(n as i64))?;
        } else {
            output.write_all(chunk)?;
        }
        total += n as u64;
    }
}

fn read_full(input: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn copy_is_identical_and_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        let mut f = File::create(&src).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(b"middle").unwrap();
        f.set_len(16 << 20).unwrap();
        drop(f);
        sparse_copy(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let meta = std::fs::metadata(&dst).unwrap();
        assert_eq!(meta.len(), 16 << 20);
        assert!(meta.blocks() * 512 <= 4 * BLOCK as u64, "allocated {} bytes", meta.blocks() * 512);
    }

    #[test]
    fn missing_source_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(sparse_copy(&dir.path().join("none"), &dir.path().join("dst")).is_err());
    }
}
