//! Fixture images built in Rust (tar + gzip layers, OCI config and manifest), pushed to a registry with
//! oci-client or written as an OCI layout / docker-save tarball.

use std::io::Write;
use std::path::Path;

use crate::Digest;
use flate2::write::GzEncoder;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::json;

/// One tar entry of a fixture layer.
pub enum Entry<'a> {
    /// A directory.
    Dir(&'a str),
    /// A regular file with content.
    File(&'a str, &'a [u8]),
    /// An executable regular file (mode 0755).
    Exec(&'a str, &'a [u8]),
    /// A symlink `path -> target`.
    Symlink(&'a str, &'a str),
    /// A hardlink `path` to the earlier entry `target`.
    Hardlink(&'a str, &'a str),
}

/// An uncompressed tar with `entries`.
pub fn tar(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            Entry::File(p, data) | Entry::Exec(p, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(if matches!(e, Entry::Exec(..)) { 0o755 } else { 0o644 });
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            Entry::Symlink(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, t).unwrap();
            }
            Entry::Hardlink(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                b.append_link(&mut h, p, t).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// gzip of `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Incompressible bytes (xorshift), for layers whose size must survive gzip.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A fixture image: manifest, config and layer blobs (layers as pushed, `tars` uncompressed).
#[derive(Clone)]
pub struct Image {
    /// The manifest JSON bytes.
    pub manifest: Vec<u8>,
    /// The config JSON bytes.
    pub config: Vec<u8>,
    /// The layer blobs as pushed (possibly compressed).
    pub layers: Vec<Vec<u8>>,
    /// The uncompressed layer tars.
    pub tars: Vec<Vec<u8>>,
    /// The layers' media type.
    pub layer_media_type: String,
}

impl Image {
    /// Digest of the manifest.
    pub fn digest(&self) -> Digest {
        Digest::of_bytes(&self.manifest)
    }

    /// Digests of the layer blobs.
    pub fn layer_digests(&self) -> Vec<Digest> {
        self.layers.iter().map(|l| Digest::of_bytes(l)).collect()
    }
}

/// An image of gzip layers made from `tars`, for `arch`.
pub fn image(tars: Vec<Vec<u8>>, arch: &str) -> Image {
    let layers: Vec<Vec<u8>> = tars.iter().map(|t| gzip(t)).collect();
    image_with(tars, layers, arch, "application/vnd.oci.image.layer.v1.tar+gzip")
}

/// An image with explicit layer blobs and media type.
pub fn image_with(tars: Vec<Vec<u8>>, layers: Vec<Vec<u8>>, arch: &str, media_type: &str) -> Image {
    let config = json!({"Entrypoint": ["/bin/hello"], "Env": ["PATH=/bin"], "WorkingDir": "/"});
    image_with_config(tars, layers, arch, media_type, config)
}

/// An image with explicit layers and image configuration (`Entrypoint`, `Cmd`, `Env`...).
pub fn image_with_config(
    tars: Vec<Vec<u8>>,
    layers: Vec<Vec<u8>>,
    arch: &str,
    media_type: &str,
    image_config: serde_json::Value,
) -> Image {
    let diff_ids: Vec<String> = tars.iter().map(|t| Digest::of_bytes(t).to_string()).collect();
    let config = serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": Digest::of_bytes(&config), "size": config.len()},
        "layers": layers.iter().map(|l| json!({"mediaType": media_type, "digest": Digest::of_bytes(l), "size": l.len()})).collect::<Vec<_>>(),
    }))
    .unwrap();
    Image { manifest, config, layers, tars, layer_media_type: media_type.to_string() }
}

/// An OCI index of `images` (each with the architecture its config names).
pub fn index(images: &[(&Image, &str)]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": images.iter().map(|(i, arch)| json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": i.digest(), "size": i.manifest.len(),
            "platform": {"architecture": arch, "os": "linux"},
        })).collect::<Vec<_>>(),
    }))
    .unwrap()
}

/// The multi-layer image: a base, then a layer with a whiteout file and an opaque directory.
pub fn whiteout_image() -> Image {
    let base = tar(&[
        Entry::Dir("etc"),
        Entry::File("etc/hosts", b"127.0.0.1 localhost\n"),
        Entry::Dir("bin"),
        Entry::File("bin/hello", b"#!/bin/sh\necho hello\n"),
        Entry::Dir("opt/dir"),
        Entry::File("opt/dir/a", b"a"),
        Entry::File("opt/dir/b", b"b"),
    ]);
    let top = tar(&[
        Entry::File("etc/.wh.hosts", b""),
        Entry::Dir("opt/dir"),
        Entry::File("opt/dir/.wh..wh..opq", b""),
        Entry::File("opt/dir/c", b"c"),
    ]);
    image(vec![base, top], "amd64")
}

/// The image with hardlinks and symlinks, sharing its base layer with [`whiteout_image`].
pub fn links_image() -> Image {
    let base = whiteout_image().tars[0].clone();
    let links = tar(&[
        Entry::Dir("data"),
        Entry::File("data/file", b"content"),
        Entry::Hardlink("data/hard", "data/file"),
        Entry::Symlink("data/soft", "file"),
        Entry::Symlink("bin/sh", "/bin/hello"),
    ]);
    image(vec![base, links], "amd64")
}

/// A single-layer image whose layer is `size` bytes of noise (stays big when gzipped).
pub fn big_image(size: usize, seed: u64) -> Image {
    image(vec![tar(&[Entry::File("big", &noise(size, seed))])], "amd64")
}

fn client() -> Client {
    Client::new(ClientConfig { protocol: ClientProtocol::Http, ..Default::default() })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Pushes `image` as `host/name:tag` (blobs, then manifest), optionally with basic auth.
pub fn push_image(host: &str, name: &str, tag: &str, image: &Image, auth: Option<(&str, &str)>) {
    runtime().block_on(async {
        let c = client();
        let r = Reference::with_tag(host.to_string(), name.to_string(), tag.to_string());
        if let Some((u, p)) = auth {
            c.store_auth_if_needed(host, &RegistryAuth::Basic(u.into(), p.into())).await;
        }
        push_blobs_and_manifest(&c, &r, image).await;
    })
}

async fn push_blobs_and_manifest(c: &Client, r: &Reference, image: &Image) {
    for blob in std::iter::once(&image.config).chain(&image.layers) {
        c.push_blob(r, blob.clone(), Digest::of_bytes(blob).as_str()).await.unwrap();
    }
    let ct = "application/vnd.oci.image.manifest.v1+json".parse().unwrap();
    c.push_manifest_raw(r, image.manifest.clone(), ct).await.unwrap();
}

/// Pushes a multi-arch index `host/name:tag` with the given (image, architecture) pairs.
pub fn push_index(host: &str, name: &str, tag: &str, images: &[(&Image, &str)]) {
    runtime().block_on(async {
        let c = client();
        for (img, _) in images {
            let r = Reference::with_digest(host.to_string(), name.to_string(), img.digest().to_string());
            push_blobs_and_manifest(&c, &r, img).await;
        }
        let r = Reference::with_tag(host.to_string(), name.to_string(), tag.to_string());
        let ct = "application/vnd.oci.image.index.v1+json".parse().unwrap();
        c.push_manifest_raw(&r, index(images), ct).await.unwrap();
    })
}

/// Writes `image` as an OCI image layout in `dir`, with ref annotation `ref_name`.
pub fn write_oci_layout(dir: &Path, image: &Image, ref_name: &str) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    for blob in [&image.manifest, &image.config].into_iter().chain(&image.layers) {
        std::fs::write(blobs.join(Digest::of_bytes(blob).hex()), blob).unwrap();
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": image.digest(), "size": image.manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": ref_name},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Writes a classic `docker save` tarball of `image` (uncompressed `<id>/layer.tar` layers).
pub fn write_docker_save(path: &Path, image: &Image, repo_tag: &str) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data).unwrap();
    };
    let config_name = format!("{}.json", Digest::of_bytes(&image.config).hex());
    let layer_names: Vec<String> = (0..image.tars.len()).map(|i| format!("layer{i}/layer.tar")).collect();
    let manifest = json!([{"Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names}]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    add(&config_name, &image.config);
    for (name, t) in layer_names.iter().zip(&image.tars) {
        add(name, t);
    }
    b.finish().unwrap();
}

/// Where Debian's `busybox-static` installs its static binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// The applets linked in [`busybox_image`].
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "echo", "cat", "ls", "sleep", "mount", "umount", "ip", "ifconfig", "hostname", "nc", "httpd", "ps", "kill",
    "mkdir", "rm", "touch", "true", "false", "env", "id", "poweroff", "reboot", "wget", "stat", "uname", "dmesg",
];

/// A bootable busybox image without an init of its own: `/bin/busybox` (read from the host's
/// `busybox-static`), applet symlinks in `/bin`, `/etc/passwd`, and the given `Cmd`. `None` when
/// busybox-static is not installed.
pub fn busybox_image(cmd: &[&str]) -> Option<Image> {
    let busybox = std::fs::read(BUSYBOX).ok()?;
    let links: Vec<String> = BUSYBOX_APPLETS.iter().map(|a| format!("bin/{a}")).collect();
    let mut entries = vec![
        Entry::Dir("bin"),
        Entry::Exec("bin/busybox", &busybox),
        Entry::Dir("etc"),
        Entry::File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
        Entry::File("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
        Entry::Dir("root"),
        Entry::Dir("www"),
        Entry::File("www/index.html", b"hello from an ignite microVM\n"),
    ];
    entries.extend(links.iter().map(|l| Entry::Symlink(l, "/bin/busybox")));
    let tars = vec![tar(&entries)];
    let layers = tars.iter().map(|t| gzip(t)).collect();
    let config = json!({"Cmd": cmd, "Env": ["PATH=/bin:/sbin:/usr/bin:/usr/sbin"], "WorkingDir": "/"});
    Some(image_with_config(tars, layers, "amd64", "application/vnd.oci.image.layer.v1.tar+gzip", config))
}
