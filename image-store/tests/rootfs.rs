//! Layers in a real store to a base ext4, proven by reading the filesystem back (debugfs always,
//! a read-only loop mount when running as root), and kernel import.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use image_store::kernel::{self, KernelError};
use image_store::testing::mount::Mounted;
use image_store::{build_base_rootfs, remove_base_rootfs, Digest, ImageRecord, Layer, RootfsError};
use image_store::{StorePaths, UnpackError};
use tar::{EntryType, Header};

/// Builds one layer tar.
struct LayerTar(tar::Builder<Vec<u8>>);

impl LayerTar {
    fn new() -> Self {
        LayerTar(tar::Builder::new(Vec::new()))
    }

    fn entry(mut self, kind: EntryType, path: &str, mode: u32, data: &[u8], link: Option<&str>) -> Self {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        if kind == EntryType::Char {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        match link {
            Some(target) => self.0.append_link(&mut h, path, target).unwrap(),
            None => self.0.append_data(&mut h, path, data).unwrap(),
        }
        self
    }

    fn dir(self, path: &str) -> Self {
        self.entry(EntryType::Directory, path, 0o755, b"", None)
    }

    fn file(self, path: &str, mode: u32, data: &[u8]) -> Self {
        self.entry(EntryType::Regular, path, mode, data, None)
    }

    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// Stores `bytes` as a blob and describes it as a layer.
fn put_layer(paths: &StorePaths, bytes: Vec<u8>, gzip: bool) -> Layer {
    let (bytes, media_type) = if gzip {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&bytes).unwrap();
        (gz.finish().unwrap(), "application/vnd.oci.image.layer.v1.tar+gzip")
    } else {
        (bytes, "application/vnd.oci.image.layer.v1.tar")
    };
    let digest = Digest::of_bytes(&bytes);
    let path = paths.blob(&digest);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    Layer { digest, media_type: media_type.into(), size: bytes.len() as u64 }
}

fn image(name: &str, layers: Vec<Layer>) -> ImageRecord {
    ImageRecord {
        references: vec![format!("test/{name}:1")],
        manifest_digest: Digest::of_bytes(name.as_bytes()),
        config_digest: Digest::of_bytes(b"config"),
        size: layers.iter().map(|l| l.size).sum(),
        layers,
        config: guest_api::image::ImageConfig {
            entrypoint: vec!["/usr/bin/tool".into()],
            cmd: vec!["--serve".into()],
            env: vec!["PATH=/usr/bin:/bin".into()],
            working_dir: Some("/".into()),
            user: Some("0:0".into()),
        },
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// One node of a file tree, as far as both debugfs and a mount can tell.
#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir(u32),
    File(u32, Vec<u8>),
    Link(PathBuf),
    Char(u32),
}

/// The whole tree the base image must hold.
fn expected_tree(config_json: &[u8]) -> BTreeMap<String, Node> {
    let mut t = BTreeMap::new();
    for dir in ["bin", "etc", "etc/ignite", "usr", "usr/bin", "opaque", "dev", "proc", "sys", "run", "sbin"] {
        t.insert(dir.to_string(), Node::Dir(0o755));
    }
    t.insert("tmp".into(), Node::Dir(0o1777));
    t.insert("lost+found".into(), Node::Dir(0o700));
    t.insert("bin/sh".into(), Node::Link("/usr/bin/tool".into()));
    t.insert("etc/passwd".into(), Node::File(0o644, b"root:x:0:0:new".to_vec()));
    t.insert("etc/shadow".into(), Node::File(0o600, b"secret".to_vec()));
    t.insert("etc/ignite/image.json".into(), Node::File(0o644, config_json.to_vec()));
    t.insert("sbin/ignite-init".into(), Node::File(0o755, b"#!init".to_vec()));
    t.insert("usr/bin/tool".into(), Node::File(0o755, b"#!tool".to_vec()));
    t.insert("usr/bin/tool2".into(), Node::File(0o755, b"#!tool".to_vec()));
    t.insert("opaque/new".into(), Node::File(0o644, b"new".to_vec()));
    if is_root() {
        t.insert("dev/null".into(), Node::Char(0o666));
    }
    t
}

/// The fixture image: two layers with a whiteout, an opaque dir, a symlink, a hardlink, a device.
fn fixture(paths: &StorePaths) -> ImageRecord {
    let l1 = LayerTar::new()
        .dir("bin")
        .dir("etc")
        .dir("usr")
        .dir("usr/bin")
        .dir("dev")
        .dir("opaque")
        .file("etc/passwd", 0o644, b"root:x:0:0")
        .file("etc/remove-me", 0o644, b"gone")
        .file("usr/bin/tool", 0o755, b"#!tool")
        .entry(EntryType::Symlink, "bin/sh", 0o777, b"", Some("/usr/bin/tool"))
        .entry(EntryType::Link, "usr/bin/tool2", 0o755, b"", Some("usr/bin/tool"))
        .entry(EntryType::Char, "dev/null", 0o666, b"", None)
        .file("opaque/a/b", 0o644, b"lower")
        .bytes();
    let l2 = LayerTar::new()
        .file("etc/.wh.remove-me", 0o644, b"")
        .file("opaque/.wh..wh..opq", 0o644, b"")
        .file("opaque/new", 0o644, b"new")
        .file("etc/passwd", 0o644, b"root:x:0:0:new")
        .file("etc/shadow", 0o600, b"secret")
        .bytes();
    let layers = vec![put_layer(paths, l1, true), put_layer(paths, l2, false)];
    image("base", layers)
}

/// Reads the tree of the ext4 `img` with debugfs (no root needed). Also returns inode numbers.
fn debugfs_tree(img: &Path) -> (BTreeMap<String, Node>, BTreeMap<String, u64>) {
    let run = |req: &str| {
        let out = Command::new("debugfs").arg("-R").arg(req).arg(img).output().expect("debugfs runs");
        assert!(out.status.success(), "debugfs {req}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let (mut tree, mut inodes) = (BTreeMap::new(), BTreeMap::new());
    let mut dirs = vec![String::new()];
    while let Some(dir) = dirs.pop() {
        let listing = String::from_utf8(run(&format!("ls -p /{dir}"))).unwrap();
        for line in listing.lines().filter(|l| l.starts_with('/')) {
            // `/inode/mode/uid/gid/name/size/`
            let f: Vec<&str> = line.split('/').collect();
            let (ino, mode, name) = (f[1].parse::<u64>().unwrap(), u32::from_str_radix(f[2], 8).unwrap(), f[5]);
            // Inode 0 marks an unused directory slot (lost+found is pre-allocated).
            if name == "." || name == ".." || ino == 0 {
                continue;
            }
            let path = if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") };
            let perm = mode & 0o7777;
            let node = match mode & 0o170000 {
                0o040000 => {
                    dirs.push(path.clone());
                    Node::Dir(perm)
                }
                0o100000 => Node::File(perm, run(&format!("cat /{path}"))),
                0o120000 => {
                    let stat = String::from_utf8(run(&format!("stat /{path}"))).unwrap();
                    let dest = stat.split("Fast link dest: \"").nth(1).and_then(|s| s.split('"').next()).unwrap();
                    Node::Link(dest.into())
                }
                0o020000 => Node::Char(perm),
                other => panic!("unexpected file type {other:o} at {path}"),
            };
            inodes.insert(path.clone(), ino);
            tree.insert(path, node);
        }
    }
    (tree, inodes)
}

/// Reads a mounted tree; checks ownership (root:root everywhere) and device numbers on the way.
fn mounted_tree(root: &Path) -> (BTreeMap<String, Node>, BTreeMap<String, u64>) {
    let (mut tree, mut inodes) = (BTreeMap::new(), BTreeMap::new());
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_str().unwrap().to_string();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (0, 0), "{rel} owned by root");
            let perm = meta.permissions().mode() & 0o7777;
            let ft = meta.file_type();
            let node = if ft.is_dir() {
                dirs.push(path.clone());
                Node::Dir(perm)
            } else if ft.is_symlink() {
                Node::Link(std::fs::read_link(&path).unwrap())
            } else if ft.is_char_device() {
                assert_eq!(meta.rdev(), (1 << 8) | 3, "{rel} is 1:3");
                Node::Char(perm)
            } else {
                assert!(ft.is_file(), "{rel} has an unexpected type");
                Node::File(perm, std::fs::read(&path).unwrap())
            };
            inodes.insert(rel.clone(), meta.ino());
            tree.insert(rel, node);
        }
    }
    (tree, inodes)
}

fn check_mounted(img: &Path, mnt: &Path, expected: &BTreeMap<String, Node>) {
    if !is_root() {
        eprintln!("skipping mount check: not root (debugfs check ran instead)");
        return;
    }
    std::fs::create_dir_all(mnt).unwrap();
    let guard = match Mounted::loop_mount(img, mnt, "ro") {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("skipping mount check: {e}");
            return;
        }
    };
    let (tree, inodes) = mounted_tree(mnt);
    assert_eq!(&tree, expected, "mounted tree");
    assert_eq!(inodes["usr/bin/tool"], inodes["usr/bin/tool2"], "hardlink kept in the mounted image");
    drop(guard);
    eprintln!("mount check ran: {} entries match", tree.len());
}

#[test]
fn base_rootfs_holds_exactly_the_image_tree() {
    let dir = tempfile::tempdir().unwrap();
    let paths = StorePaths::new(dir.path().join("store"));
    let image = fixture(&paths);
    let init = dir.path().join("ignite-init");
    std::fs::write(&init, "#!init").unwrap();

    let img = build_base_rootfs(&paths, &image, Some(&init)).unwrap();
    assert_eq!(img, paths.base_rootfs(&image.manifest_digest));
    assert_eq!(std::fs::read_dir(paths.tmp_dir()).unwrap().count(), 0, "no leftovers in tmp/");

    let config_json = serde_json::to_vec_pretty(&image.config).unwrap();
    let expected = expected_tree(&config_json);
    let (tree, inodes) = debugfs_tree(&img);
    assert_eq!(tree, expected, "tree read back by debugfs");
    assert_eq!(inodes["usr/bin/tool"], inodes["usr/bin/tool2"], "hardlink kept");
    let config: guest_api::image::ImageConfig = serde_json::from_slice(&config_json).unwrap();
    assert_eq!(config, image.config);
    let ls = Command::new("debugfs").args(["-R", "ls -l /"]).arg(&img).output().unwrap();
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.contains("sbin") && ls.contains("etc") && !ls.contains("remove-me"), "{ls}");

    check_mounted(&img, &dir.path().join("mnt"), &expected);

    // The second build reuses the cached file: it succeeds even with the layer blobs gone.
    for layer in &image.layers {
        std::fs::remove_file(paths.blob(&layer.digest)).unwrap();
    }
    assert_eq!(build_base_rootfs(&paths, &image, Some(&init)).unwrap(), img);
    assert!(remove_base_rootfs(&paths, &image.manifest_digest).unwrap());
    assert!(!remove_base_rootfs(&paths, &image.manifest_digest).unwrap());

    // Now the blobs are missing: a clear error, no base and nothing left in tmp/.
    let err = build_base_rootfs(&paths, &image, None).unwrap_err();
    assert!(
        matches!(&err, RootfsError::Unpack { source, .. } if matches!(**source, UnpackError::OpenBlob { .. })),
        "{err}"
    );
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(source.contains(image.layers[0].digest.as_str()), "{source}");
    assert!(!img.exists());
    assert_eq!(std::fs::read_dir(paths.tmp_dir()).unwrap().count(), 0);
}

#[test]
fn malicious_layer_fails_the_build_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let paths = StorePaths::new(dir.path().join("store"));
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Link);
    h.set_size(0);
    h.set_path("evil").unwrap();
    h.as_old_mut().linkname[..13].copy_from_slice(b"../../../etc/");
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    b.append(&h, &[][..]).unwrap();
    let image = image("evil", vec![put_layer(&paths, b.into_inner().unwrap(), true)]);
    let err = build_base_rootfs(&paths, &image, None).unwrap_err();
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(source.contains("evil") && source.contains(image.layers[0].digest.as_str()), "{source}");
    assert!(!paths.base_rootfs(&image.manifest_digest).exists());
}

fn elf(tag: &[u8]) -> Vec<u8> {
    let mut v = b"\x7fELF\x02\x01\x01\x00".to_vec();
    v.extend_from_slice(tag);
    v
}

#[test]
fn kernels_import_list_remove() {
    let dir = tempfile::tempdir().unwrap();
    let paths = StorePaths::new(dir.path().join("store"));

    let local = dir.path().join("vmlinux");
    std::fs::write(&local, elf(b"local")).unwrap();
    let rec = kernel::import_file(&paths, &local, "local").unwrap();
    assert_eq!(rec.digest, Digest::of_bytes(&elf(b"local")));
    assert_eq!(std::fs::read(&rec.path).unwrap(), elf(b"local"));
    assert!(matches!(kernel::import_file(&paths, &local, "local"), Err(KernelError::AlreadyExists(_))));
    assert!(matches!(kernel::import_file(&paths, &local, "../x"), Err(KernelError::InvalidName(_))));

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a kernel").unwrap();
    let err = kernel::import_file(&paths, &text, "bad").unwrap_err();
    assert!(matches!(err, KernelError::NotAKernel { .. }) && err.to_string().contains("notes.txt"), "{err}");
    assert!(!paths.kernels_dir().join("bad").exists());

    // From an image: the top layer's kernel wins, modules come along.
    let l1 = LayerTar::new()
        .file("boot/vmlinux", 0o644, &elf(b"old"))
        .file("lib/modules/6.1/kernel/m.ko", 0o644, b"ko")
        .bytes();
    let l2 = LayerTar::new().file("boot/vmlinux", 0o644, &elf(b"new")).bytes();
    let img = image("kernel", vec![put_layer(&paths, l1, true), put_layer(&paths, l2, false)]);
    let rec = kernel::import_from_image(&paths, &img, "img").unwrap();
    assert_eq!(std::fs::read(&rec.path).unwrap(), elf(b"new"));
    assert!(rec.has_modules);
    assert_eq!(rec.source, "test/kernel:1");
    let ko = paths.kernels_dir().join("img/modules/6.1/kernel/m.ko");
    assert_eq!(std::fs::read(ko).unwrap(), b"ko");

    // A whiteout of the kernel in a later layer leaves the image without one.
    let l3 = LayerTar::new().file("boot/.wh.vmlinux", 0o644, b"").bytes();
    let mut gone = img.clone();
    gone.manifest_digest = Digest::of_bytes(b"gone");
    gone.layers.push(put_layer(&paths, l3, false));
    let err = kernel::import_from_image(&paths, &gone, "gone").unwrap_err();
    assert!(matches!(err, KernelError::NoKernelInImage { .. }), "{err}");

    let names: Vec<_> = kernel::list(&paths).unwrap().into_iter().map(|k| k.name).collect();
    assert_eq!(names, ["img", "local"]);
    assert_eq!(kernel::get(&paths, "img").unwrap(), rec);
    kernel::remove(&paths, "img").unwrap();
    assert!(matches!(kernel::get(&paths, "img"), Err(KernelError::NotFound(_))));
    assert!(matches!(kernel::remove(&paths, "img"), Err(KernelError::NotFound(_))));
    assert_eq!(kernel::list(&paths).unwrap().len(), 1);
    assert_eq!(std::fs::read_dir(paths.tmp_dir()).unwrap().count(), 0, "no leftovers in tmp/");
}

/// Runs `umoci` in `dir`; false (after printing why) if it is missing or fails.
fn umoci(dir: &Path, args: &[&str]) -> bool {
    match Command::new("umoci").args(args).current_dir(dir).output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!("skipping: umoci {args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            false
        }
        Err(e) => {
            eprintln!("skipping: umoci not available: {e}");
            false
        }
    }
}

/// An image made by a real tool (umoci, with busybox-static) in two layers, the second deleting a
/// file (a whiteout written by umoci), goes through the same path.
#[test]
fn umoci_image_with_whiteout() {
    let Some(busybox) = ["/bin/busybox", "/usr/bin/busybox"].into_iter().map(Path::new).find(|p| p.exists()) else {
        eprintln!("skipping: busybox-static not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path();
    if !umoci(work, &["init", "--layout", "L"]) || !umoci(work, &["new", "--image", "L:t"]) {
        return;
    }
    let rootless = if is_root() { vec![] } else { vec!["--rootless"] };
    let unpack: Vec<&str> =
        ["unpack"].into_iter().chain(rootless.iter().copied()).chain(["--image", "L:t", "b"]).collect();
    if !umoci(work, &unpack) {
        return;
    }
    let rootfs = work.join("b/rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/ls")).unwrap();
    // --refresh-bundle: the next repack diffs against this layer, not the empty base.
    assert!(umoci(work, &["repack", "--refresh-bundle", "--image", "L:t", "b"]));
    std::fs::remove_file(rootfs.join("bin/ls")).unwrap();
    assert!(umoci(work, &["repack", "--image", "L:t", "b"]));

    // Read the layout: index -> manifest -> layers; copy the layer blobs into the store.
    let blob = |d: &str| work.join("L/blobs/sha256").join(d.trim_start_matches("sha256:"));
    let json = |p: PathBuf| serde_json::from_slice::<serde_json::Value>(&std::fs::read(p).unwrap()).unwrap();
    let index = json(work.join("L/index.json"));
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap().to_string();
    let manifest = json(blob(&manifest_digest));
    let paths = StorePaths::new(work.join("store"));
    let layers: Vec<Layer> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let digest: Digest = l["digest"].as_str().unwrap().parse().unwrap();
            std::fs::create_dir_all(paths.blob(&digest).parent().unwrap()).unwrap();
            std::fs::copy(blob(digest.as_str()), paths.blob(&digest)).unwrap();
            Layer { digest, media_type: l["mediaType"].as_str().unwrap().into(), size: l["size"].as_u64().unwrap() }
        })
        .collect();
    assert!(layers.len() >= 2, "{manifest}");
    let mut record = image("umoci", layers);
    record.manifest_digest = manifest_digest.parse().unwrap();

    let img = build_base_rootfs(&paths, &record, None).unwrap();
    let (tree, _) = debugfs_tree(&img);
    assert_eq!(tree["bin/busybox"], Node::File(0o755, std::fs::read(busybox).unwrap()));
    assert_eq!(tree["bin/sh"], Node::Link("busybox".into()));
    assert!(!tree.contains_key("bin/ls"), "whiteout applied");
    assert!(!tree.keys().any(|k| k.contains(".wh.")), "no whiteout markers in the image");
}
