//! Initramfs archives (`newc` cpio) built in memory: what the kernel unpacks into its first root
//! filesystem. The warm-start template boots from one holding `ignite-init`; tests build their own.

use std::path::Path;

/// A `newc` cpio archive built in memory: what the kernel unpacks as an initramfs.
#[derive(Default)]
pub struct Initramfs {
    data: Vec<u8>,
    inode: u32,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Initramfs::default()
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), content: &[u8]) -> &mut Self {
        self.inode += 1;
        let size = u32::try_from(content.len()).expect("a newc entry holds less than 4 GiB");
        let fields = [self.inode, mode, 0, 0, 1, 0, size, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        self.data.extend_from_slice(b"070701");
        for field in fields {
            self.data.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(content);
        self.pad();
        self
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    /// A directory (no leading slash: `dev`).
    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name, 0o040755, (0, 0), &[])
    }

    /// A regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, content: &[u8]) -> &mut Self {
        self.entry(name, 0o100000 | perm, (0, 0), content)
    }

    /// A symbolic link `name` to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(name, 0o120777, (0, 0), target.as_bytes())
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> &mut Self {
        self.entry(name, 0o020600, (major, minor), &[])
    }

    /// Closes the archive and writes it to `path`.
    pub fn write(&mut self, path: &Path) -> std::io::Result<()> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        std::fs::write(path, &self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_newc_headers_padded_to_four_bytes_and_the_archive_ends_with_the_trailer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.cpio");
        Initramfs::new().dir("dev").char_dev("dev/console", 5, 1).file("init", 0o755, b"abc").write(&path).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data.starts_with(b"070701"));
        assert_eq!(data.len() % 4, 0);
        let text = String::from_utf8_lossy(&data);
        assert!(text.contains("dev/console") && text.contains("TRAILER!!!"));
        // The file's mode and size fields (0o100755 = 0x81ed, 3 bytes).
        assert!(text.contains("000081ed") && text.contains("00000003"));
    }
}
