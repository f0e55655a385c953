//! Unit tests of layer unpacking, with layer tars built in memory.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use tar::{EntryType, Header};

use super::*;

/// Builds one layer tar in memory.
struct LayerTar(tar::Builder<Vec<u8>>);

impl LayerTar {
    fn new() -> Self {
        LayerTar(tar::Builder::new(Vec::new()))
    }

    fn header(kind: EntryType, mode: u32, size: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h
    }

    fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut h = Self::header(EntryType::Directory, mode, 0);
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Self {
        let mut h = Self::header(EntryType::Regular, mode, data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    fn link(mut self, kind: EntryType, path: &str, target: &str) -> Self {
        let mut h = Self::header(kind, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    fn device(mut self, kind: EntryType, path: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(kind, 0o666, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    /// A file whose name is written raw, bypassing the tar crate's own path checks.
    fn raw_file(mut self, name: &[u8]) -> Self {
        let mut h = Self::header(EntryType::Regular, 0o644, 1);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_cksum();
        self.0.append(&h, &b"x"[..]).unwrap();
        self
    }

    /// A hardlink whose target is written raw.
    fn raw_hardlink(mut self, path: &str, target: &[u8]) -> Self {
        let mut h = Self::header(EntryType::Link, 0o644, 0);
        h.set_path(path).unwrap();
        h.as_old_mut().linkname[..target.len()].copy_from_slice(target);
        h.set_cksum();
        self.0.append(&h, &[][..]).unwrap();
        self
    }

    /// A file carrying a pax `SCHILY.xattr.` record.
    fn file_with_xattr(mut self, path: &str, key: &str, value: &str) -> Self {
        let rec = format!(" SCHILY.xattr.{key}={value}\n");
        // The length prefix counts itself.
        let mut len = rec.len();
        while rec.len() + len.to_string().len() != len {
            len = rec.len() + len.to_string().len();
        }
        let pax = format!("{len}{rec}");
        let mut h = Self::header(EntryType::XHeader, 0o644, pax.len() as u64);
        self.0.append_data(&mut h, "PaxHeaders/x", pax.as_bytes()).unwrap();
        self.file(path, 0o644, b"x")
    }

    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }

    fn gzip(self) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&self.bytes()).unwrap();
        gz.finish().unwrap()
    }
}

fn apply(layers: Vec<Vec<u8>>, root: &Path) -> Result<(), UnpackError> {
    apply_limited(layers, root, UnpackLimits::default())
}

fn apply_limited(layers: Vec<Vec<u8>>, root: &Path, limits: UnpackLimits) -> Result<(), UnpackError> {
    let mut budget = UnpackBudget::new(limits);
    for bytes in layers {
        apply_layer(&bytes[..], &Digest::of_bytes(&bytes), root, &mut budget)?;
    }
    Ok(())
}

fn read(root: &Path, rel: &str) -> String {
    std::fs::read_to_string(root.join(rel)).unwrap()
}

#[test]
fn layers_apply_in_order_plain_and_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let l1 = LayerTar::new()
        .dir("etc", 0o755)
        .file("etc/a", 0o600, b"one")
        .file("etc/keep", 0o644, b"k")
        .dir("opt", 0o700)
        .file("opt/x", 0o644, b"x")
        .gzip();
    let l2 = LayerTar::new().file("./etc/a", 0o640, b"two").file("new/deep/file", 0o644, b"n").bytes();
    apply(vec![l1, l2], dir.path()).unwrap();
    assert_eq!(read(dir.path(), "etc/a"), "two");
    assert_eq!(read(dir.path(), "etc/keep"), "k");
    assert_eq!(read(dir.path(), "new/deep/file"), "n");
    let meta = std::fs::metadata(dir.path().join("etc/a")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!(meta.mtime(), 1_600_000_000);
    // Directory times are restored after their children were written (`etc` changed in layer 2).
    let opt = std::fs::metadata(dir.path().join("opt")).unwrap();
    assert_eq!((opt.mtime(), opt.permissions().mode() & 0o7777), (1_600_000_000, 0o700));
}

#[test]
fn whiteout_file_and_dir() {
    let dir = tempfile::tempdir().unwrap();
    let l1 = LayerTar::new().file("etc/x", 0o644, b"x").file("etc/y", 0o644, b"y").file("var/cache/z", 0o644, b"z");
    let l2 =
        LayerTar::new().file("etc/.wh.x", 0o644, b"").file(".wh.var", 0o644, b"").file("etc/.wh.never", 0o644, b"");
    apply(vec![l1.bytes(), l2.bytes()], dir.path()).unwrap();
    assert!(!dir.path().join("etc/x").exists());
    assert!(!dir.path().join("etc/.wh.x").exists(), "whiteout markers are not extracted");
    assert!(!dir.path().join("var").exists());
    assert_eq!(read(dir.path(), "etc/y"), "y");
}

#[test]
fn opaque_dir_hides_only_lower_layers() {
    let dir = tempfile::tempdir().unwrap();
    let l1 = LayerTar::new().file("d/a", 0o644, b"a").file("d/sub/b", 0o644, b"b").file("e/old", 0o644, b"o").file(
        "e/sub/old",
        0o644,
        b"o",
    );
    // `d`: marker first; `e`: a new file before the marker must survive it.
    let l2 = LayerTar::new()
        .dir("d", 0o755)
        .file("d/.wh..wh..opq", 0o644, b"")
        .file("d/new", 0o644, b"n")
        .file("e/new", 0o644, b"n")
        .file("e/sub/x", 0o644, b"x")
        .file("e/.wh..wh..opq", 0o644, b"");
    apply(vec![l1.bytes(), l2.bytes()], dir.path()).unwrap();
    let names = |d: &str| {
        let mut v: Vec<_> = std::fs::read_dir(dir.path().join(d))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("d"), ["new"]);
    assert_eq!(names("e"), ["new", "sub"]);
    assert_eq!(names("e/sub"), ["x"]);
}

#[test]
fn symlinks_and_hardlinks() {
    let dir = tempfile::tempdir().unwrap();
    let l1 = LayerTar::new()
        .file("usr/bin/tool", 0o755, b"#!tool")
        .link(EntryType::Symlink, "bin/sh", "/usr/bin/tool")
        .link(EntryType::Link, "usr/bin/tool2", "usr/bin/tool");
    // A later layer replaces a symlink by a file and a file by a symlink.
    let l2 = LayerTar::new().link(EntryType::Symlink, "usr/bin/tool3", "tool").file("bin/sh", 0o755, b"sh");
    apply(vec![l1.bytes(), l2.bytes()], dir.path()).unwrap();
    let root = dir.path();
    assert_eq!(std::fs::read_link(root.join("usr/bin/tool3")).unwrap(), Path::new("tool"));
    assert_eq!(read(root, "bin/sh"), "sh");
    assert_eq!(read(root, "usr/bin/tool"), "#!tool", "writing over the symlink did not follow it");
    let a = std::fs::metadata(root.join("usr/bin/tool")).unwrap();
    let b = std::fs::metadata(root.join("usr/bin/tool2")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
}

#[test]
fn device_nodes_and_fifos() {
    let dir = tempfile::tempdir().unwrap();
    let l = LayerTar::new().device(EntryType::Fifo, "run/fifo", 0, 0).device(EntryType::Char, "dev/null", 1, 3);
    apply(vec![l.bytes()], dir.path()).unwrap();
    assert!(std::fs::symlink_metadata(dir.path().join("run/fifo")).unwrap().file_type().is_fifo());
    if !running_as_root() {
        eprintln!("skipping: device node check needs root");
        assert!(!dir.path().join("dev/null").exists());
        return;
    }
    let meta = std::fs::symlink_metadata(dir.path().join("dev/null")).unwrap();
    assert!(meta.file_type().is_char_device());
    assert_eq!(meta.rdev(), (1 << 8) | 3);
    assert_eq!(meta.permissions().mode() & 0o7777, 0o666);
}

#[test]
fn xattrs_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let l = LayerTar::new().file_with_xattr("f", "user.ignite", "yes");
    match apply(vec![l.bytes()], dir.path()) {
        Ok(()) => {}
        Err(UnpackError::Extract { source, .. }) if format!("{source:?}").contains("not supported") => {
            eprintln!("skipping: user xattrs unsupported on {}: {source}", dir.path().display());
            return;
        }
        Err(e) => panic!("{e}: {:?}", std::error::Error::source(&e)),
    }
    let value = xattr::get(dir.path().join("f"), "user.ignite").unwrap();
    assert_eq!(value.as_deref(), Some(&b"yes"[..]));
}

/// Asserts nothing appeared in `outside`.
fn assert_empty(outside: &Path) {
    assert_eq!(std::fs::read_dir(outside).unwrap().count(), 0, "something was written outside the root");
}

#[test]
fn malicious_paths_are_rejected() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("root");
    std::fs::create_dir(&root).unwrap();
    for (name, expect) in [(&b"../x"[..], "`..`"), (b"a/../../x", "`..`"), (b"/abs", "absolute")] {
        let l = LayerTar::new().raw_file(name).bytes();
        let digest = Digest::of_bytes(&l);
        let err = apply(vec![l], &root).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, UnpackError::BadPath { .. }), "{msg}");
        assert!(msg.contains(digest.as_str()) && msg.contains(expect), "{msg}");
        assert!(msg.contains(std::str::from_utf8(name).unwrap()), "{msg}");
    }
    assert!(!base.path().join("x").exists());
    for target in [&b"../../etc/passwd"[..], b"/etc/passwd"] {
        let l = LayerTar::new().raw_hardlink("h", target).bytes();
        let err = apply(vec![l], &root).unwrap_err();
        assert!(matches!(err, UnpackError::BadHardlink { .. }), "{err}");
    }
    // A hardlink through a symlink pointing out resolves inside the root, where there is no target.
    let l = LayerTar::new().link(EntryType::Symlink, "up", "/").raw_hardlink("h2", b"up/etc/passwd").bytes();
    assert!(matches!(apply(vec![l], &root).unwrap_err(), UnpackError::BadHardlink { .. }));
    assert!(!root.join("h").exists() && !root.join("h2").exists());
}

#[test]
fn symlinks_never_lead_out_of_the_root() {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("root");
    let outside = base.path().join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("victim"), "safe").unwrap();
    let outside_str = outside.to_str().unwrap();
    let l1 = LayerTar::new()
        .link(EntryType::Symlink, "etc", outside_str)
        .link(EntryType::Symlink, "rel", "../../../outside")
        .link(EntryType::Symlink, "victim", &format!("{outside_str}/victim"));
    let l2 = LayerTar::new()
        .file("etc/passwd", 0o644, b"root")
        .file("rel/f", 0o644, b"f")
        .file("victim", 0o644, b"pwned")
        .file("etc/.wh.victim", 0o644, b"");
    apply(vec![l1.bytes(), l2.bytes()], &root).unwrap();
    assert_eq!(std::fs::read_to_string(outside.join("victim")).unwrap(), "safe");
    std::fs::remove_file(outside.join("victim")).unwrap();
    assert_empty(&outside);
    // The absolute link was followed as if the root were `/`.
    assert_eq!(read(&root, &format!("{}/passwd", outside_str.trim_start_matches('/'))), "root");
    assert_eq!(read(&root, "outside/f"), "f");
    assert_eq!(read(&root, "victim"), "pwned");
}

#[test]
fn truncated_and_zstd_layers_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let full = LayerTar::new().file("big", 0o644, &[1u8; 4096]).gzip();
    let cut = &full[..full.len() / 2];
    let err = apply_limited(vec![cut.to_vec()], dir.path(), UnpackLimits::default()).unwrap_err();
    assert!(err.to_string().contains(Digest::of_bytes(cut).as_str()), "{err}");
    let zstd = [0x28, 0xb5, 0x2f, 0xfd, 0, 0];
    let err = apply(vec![zstd.to_vec()], dir.path()).unwrap_err();
    assert!(matches!(err, UnpackError::UnsupportedCompression { .. }), "{err}");
}

#[test]
fn whiteouts_of_the_directory_or_its_parent_are_refused_and_delete_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // The root is one directory below a sibling the layer must never reach.
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(dir.path().join("sibling"), "keep").unwrap();
    apply(vec![LayerTar::new().file("etc/keep", 0o644, b"lower").bytes()], &root).unwrap();
    for (name, path) in [(".wh..", ".wh.."), (".wh...", ".wh..."), (".wh.", ".wh."), ("in etc", "etc/.wh...")] {
        let layer = LayerTar::new().file(path, 0o644, b"").bytes();
        let err = apply(vec![layer], &root).unwrap_err();
        assert!(matches!(err, UnpackError::BadPath { .. }), "{name}: {err}");
        assert!(err.to_string().contains("a whiteout must name one entry"), "{name}: {err}");
    }
    assert_eq!(read(&root, "etc/keep"), "lower");
    assert_eq!(std::fs::read_to_string(dir.path().join("sibling")).unwrap(), "keep");
}

#[test]
fn an_image_over_its_entry_or_byte_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let many = (0..20).fold(LayerTar::new(), |t, i| t.file(&format!("f{i}"), 0o644, b"x")).bytes();
    let limits = UnpackLimits { max_bytes: 1 << 20, max_entries: 10 };
    let err = apply_limited(vec![many], dir.path(), limits).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { what: "entries", limit: 10, .. }), "{err}");
    assert!(err.to_string().contains("--max-image-entries"), "{err}");

    // A small gzip that decompresses to 4 MiB, over a 1 MiB budget; counted across layers.
    let zeros = LayerTar::new().file("zeros", 0o644, &vec![0u8; 4 << 20]).gzip();
    assert!(zeros.len() < 64 << 10, "the bomb is small: {} bytes", zeros.len());
    let small = LayerTar::new().file("a", 0o644, &[1u8; 600 << 10]).bytes();
    let limits = UnpackLimits { max_bytes: 1 << 20, max_entries: 100 };
    let err = apply_limited(vec![small.clone(), small], dir.path(), limits).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { what: "bytes", .. }), "{err}");
    let err = apply_limited(vec![zeros], tempfile::tempdir().unwrap().path(), limits).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { what: "bytes", .. }), "{err}");
}
