//! Pull, import and gc against a real `docker-registry` with fixture images built by the tests.
//! The import tests at the end need no registry.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use image_store::testing::mount::Mounted;
use image_store::{
    import, pull_blocking, ContentError, ContentStore, Digest, ImageIndex, ImportError, PullError, PullOptions,
    PullProgress, StorePaths,
};
use support::fixtures::{self, Image};
use support::registry::{free_port, Registry};
use support::{chain, count_files};

macro_rules! registry_or_skip {
    ($htpasswd:expr) => {
        match Registry::start($htpasswd) {
            Ok(r) => r,
            Err(reason) => {
                println!("skipping: {reason}");
                return;
            }
        }
    };
}

fn insecure() -> PullOptions {
    // An empty credentials file keeps the tests independent of the machine's ~/.docker.
    PullOptions { insecure: true, ..Default::default() }
}

fn store() -> (tempfile::TempDir, StorePaths) {
    let dir = tempfile::tempdir().unwrap();
    let paths = StorePaths::new(dir.path().join("store"));
    (dir, paths)
}

/// Options that record every progress report.
fn with_progress() -> (PullOptions, Arc<Mutex<Vec<PullProgress>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let opts = PullOptions { progress: Some(Arc::new(move |p| s.lock().unwrap().push(p))), ..insecure() };
    (opts, seen)
}

/// Asserts the store holds no record, no blob of `layer` and no temp file.
fn assert_nothing_left(paths: &StorePaths, layer: &Digest) {
    assert!(!paths.blob(layer).exists(), "partial blob {layer} left");
    assert_eq!(count_files(&paths.tmp_dir()), 0, "temp files left");
    assert_eq!(count_files(&paths.images_dir()), 0, "record left");
}

#[test]
fn pull_tag_digest_again_and_shared_layers() {
    let reg = registry_or_skip!(None);
    let host = reg.host();
    let wh = fixtures::whiteout_image();
    let links = fixtures::links_image();
    fixtures::push_image(&host, "layers", "v1", &wh, None);
    fixtures::push_image(&host, "links", "v1", &links, None);
    let (_d, paths) = store();

    let (opts, seen) = with_progress();
    let rec = pull_blocking(&paths, &format!("{host}/layers:v1"), &opts).unwrap();
    assert_eq!(rec.manifest_digest, wh.digest());
    assert_eq!(rec.references, vec![format!("{host}/layers:v1")]);
    assert_eq!(rec.layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>(), wh.layer_digests());
    assert_eq!(rec.config.entrypoint, vec!["/bin/hello"]);
    let last = *seen.lock().unwrap().last().unwrap();
    assert_eq!((last.layers_done, last.layers_total), (2, 2));
    assert_eq!(last.bytes_done, last.bytes_total);
    assert!(last.bytes_downloaded >= last.bytes_total, "{last:?}");
    let content = ContentStore::open(&paths).unwrap();
    for d in wh.layer_digests() {
        assert_eq!(Digest::of_file(&paths.blob(&d)).unwrap(), d);
    }
    assert!(content.has(&wh.digest()), "manifest blob stored");

    // Again: nothing new is downloaded.
    let (opts, seen) = with_progress();
    pull_blocking(&paths, &format!("{host}/layers:v1"), &opts).unwrap();
    let last = *seen.lock().unwrap().last().unwrap();
    assert_eq!(last.bytes_downloaded, 0, "{last:?}");
    assert_eq!(last.layers_done, 2);

    // By digest: same image, a second reference.
    let by_digest = format!("{host}/layers@{}", wh.digest());
    let rec = pull_blocking(&paths, &by_digest, &insecure()).unwrap();
    assert_eq!(rec.manifest_digest, wh.digest());
    assert!(rec.references.contains(&by_digest) && rec.references.contains(&format!("{host}/layers:v1")));

    // Shared base layer: downloaded and stored once.
    let blobs_before = content.list().unwrap().len();
    let (opts, seen) = with_progress();
    let rec = pull_blocking(&paths, &format!("{host}/links:v1"), &opts).unwrap();
    assert_eq!(rec.layers[0].digest, wh.layer_digests()[0]);
    let last = *seen.lock().unwrap().last().unwrap();
    let new_layer = links.layers[1].len() as u64;
    assert_eq!(last.bytes_downloaded, new_layer + links.config.len() as u64, "{last:?}");
    // New: config, top layer, manifest.
    assert_eq!(content.list().unwrap().len(), blobs_before + 3);

    let index = ImageIndex::open(&paths).unwrap();
    assert_eq!(index.list().unwrap().len(), 2);
    assert_eq!(index.find(&format!("{host}/links:v1")).unwrap().manifest_digest, links.digest());
}

#[test]
fn multi_arch_unknown_tag_and_registry_down() {
    let reg = registry_or_skip!(None);
    let host = reg.host();
    let amd = fixtures::image(vec![fixtures::tar(&[fixtures::Entry::File("arch", b"amd64")])], "amd64");
    let arm = fixtures::image(vec![fixtures::tar(&[fixtures::Entry::File("arch", b"arm64")])], "arm64");
    fixtures::push_index(&host, "multi", "v1", &[(&arm, "arm64"), (&amd, "amd64")]);
    let (_d, paths) = store();

    let rec = pull_blocking(&paths, &format!("{host}/multi:v1"), &insecure()).unwrap();
    assert_eq!(rec.manifest_digest, amd.digest());
    assert_eq!(rec.layers[0].digest, amd.layer_digests()[0]);
    assert!(!paths.blob(&arm.layer_digests()[0]).exists(), "arm64 layer not fetched");

    let e = pull_blocking(&paths, &format!("{host}/multi:nope"), &insecure()).unwrap_err();
    assert!(matches!(e, PullError::ManifestUnknown { .. }), "{}", chain(&e));
    assert_eq!(e.to_string(), format!("manifest unknown: tag nope of {host}/multi"));

    let down = format!("127.0.0.1:{}", free_port());
    let e = pull_blocking(&paths, &format!("{down}/x:v1"), &insecure()).unwrap_err();
    assert!(matches!(e, PullError::Unreachable { .. }), "{}", chain(&e));
    assert_eq!(e.to_string(), format!("registry {down} is not reachable"));

    let e = pull_blocking(&paths, "Bad Ref", &insecure()).unwrap_err();
    assert!(e.to_string().contains("`Bad Ref`"), "{e}");
}

#[test]
fn a_registry_that_accepts_and_never_answers_times_out() {
    // Accepts connections and reads requests, never writes a byte.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    let (_dir, paths) = store();
    let timeouts = image_store::pull::PullTimeouts {
        connect: Duration::from_secs(1),
        read: Duration::from_secs(1),
        ..Default::default()
    };
    let opts = PullOptions { timeouts, ..insecure() };
    let e = pull_blocking(&paths, &format!("{silent}/x:v1"), &opts).unwrap_err();
    assert!(matches!(e, PullError::Unreachable { .. }), "{}", chain(&e));
    assert_eq!(image_store::pull::PullTimeouts::default().read, image_store::pull::DEFAULT_READ_TIMEOUT);
}

#[test]
fn a_registry_that_trickles_bytes_hits_the_whole_pull_bound() {
    let (trickle, _) = support::registry::trickling_registry();
    let (_dir, paths) = store();
    let timeouts = image_store::pull::PullTimeouts { total: Duration::from_secs(2), ..Default::default() };
    let opts = PullOptions { timeouts, ..insecure() };
    let started = std::time::Instant::now();
    let e = pull_blocking(&paths, &format!("{trickle}/slow:v1"), &opts).unwrap_err();
    assert!(matches!(e, PullError::TimedOut { .. }), "{}", chain(&e));
    let text = e.to_string();
    assert!(text.contains(&format!("{trickle}/slow:v1")) && text.contains("within 2s"), "{text}");
    // Not the 60 s read timeout: the trickle never lets that one fire.
    assert!(started.elapsed() < image_store::pull::DEFAULT_READ_TIMEOUT, "{:?}", started.elapsed());
    assert_eq!(count_files(&paths.tmp_dir()), 0, "temp files left");
    assert_eq!(image_store::pull::PullTimeouts::default().total, image_store::pull::DEFAULT_TOTAL_TIMEOUT);
}

#[test]
fn an_endless_manifest_is_cut_off_at_the_manifest_bound() {
    let endless = support::registry::endless_manifest_registry();
    let (_dir, paths) = store();
    let e = pull_blocking(&paths, &format!("{endless}/endless:v1"), &insecure()).unwrap_err();
    let PullError::ManifestTooLong { limit, received, .. } = &e else { panic!("{}", chain(&e)) };
    assert_eq!(*limit, image_store::pull::MAX_MANIFEST_BYTES);
    // Cut off at the first chunk past the bound: never read (let alone kept) in full.
    assert!(*received > *limit && *received < *limit + (1 << 20), "{}", chain(&e));
    assert!(e.to_string().contains(&format!("{endless}/endless:v1")), "{e}");
    assert_eq!(count_files(&paths.images_dir()), 0, "record left");
}

#[test]
fn zstd_layers_are_rejected() {
    let reg = registry_or_skip!(None);
    let host = reg.host();
    let t = fixtures::tar(&[fixtures::Entry::File("z", b"z")]);
    let img = fixtures::image_with(vec![t.clone()], vec![t], "amd64", "application/vnd.oci.image.layer.v1.tar+zstd");
    fixtures::push_image(&host, "zstd", "v1", &img, None);
    let (_d, paths) = store();
    let e = pull_blocking(&paths, &format!("{host}/zstd:v1"), &insecure()).unwrap_err();
    assert!(e.to_string().contains("tar+zstd"), "{}", chain(&e));
    assert_nothing_left(&paths, &img.layer_digests()[0]);
}

/// Tampers with the registry's copy of the image's layer, checks the pull fails cleanly, restores it
/// and checks the next pull succeeds.
fn bad_blob_case(name: &str, tamper: impl Fn(&mut Vec<u8>), expect: impl Fn(&PullError) -> bool) {
    let reg = registry_or_skip!(None);
    let host = reg.host();
    let img = fixtures::big_image(256 * 1024, name.len() as u64);
    fixtures::push_image(&host, name, "v1", &img, None);
    let layer = img.layer_digests()[0].clone();
    let file = reg.blob_file(&layer);
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    tamper(&mut bad);
    std::fs::write(&file, &bad).unwrap();
    let (_d, paths) = store();

    let e = pull_blocking(&paths, &format!("{host}/{name}:v1"), &insecure()).unwrap_err();
    println!("{name}: {}", chain(&e));
    assert!(expect(&e), "unexpected error: {}", chain(&e));
    assert!(e.to_string().contains(layer.as_str()), "error names the blob: {e}");
    assert_nothing_left(&paths, &layer);

    std::fs::write(&file, &good).unwrap();
    let rec = pull_blocking(&paths, &format!("{host}/{name}:v1"), &insecure()).unwrap();
    assert_eq!(Digest::of_file(&paths.blob(&layer)).unwrap(), layer);
    assert_eq!(rec.manifest_digest, img.digest());
}

#[test]
fn corrupted_blob_is_rejected_and_next_pull_succeeds() {
    bad_blob_case(
        "corrupt",
        |b| {
            let mid = b.len() / 2;
            b[mid] ^= 0xff;
        },
        |e| {
            matches!(e, PullError::Content(ContentError::DigestMismatch { .. }))
                && e.to_string().starts_with("blob sha256:")
        },
    );
}

#[test]
fn truncated_layer_is_rejected_and_next_pull_succeeds() {
    bad_blob_case(
        "truncated",
        |b| b.truncate(b.len() / 3),
        |e| matches!(e, PullError::Content(ContentError::SizeMismatch { .. }) | PullError::Transfer { .. }),
    );
}

#[test]
fn an_overlong_layer_is_cut_off_at_its_declared_size() {
    // 16 MiB more than the manifest declares: the writer refuses the first byte past the size,
    // so the pull fails on TooLong (not on a digest or size check once everything was written).
    bad_blob_case(
        "overlong",
        |b| b.resize(b.len() + (16 << 20), 0),
        |e| {
            matches!(e, PullError::Content(ContentError::TooLong { .. }))
                && e.to_string().contains("longer than the")
                && e.to_string().contains("cut off")
        },
    );
}

#[test]
fn basic_auth_from_docker_config() {
    let Ok(out) = Command::new("htpasswd").args(["-Bbn", "alice", "secret"]).output() else {
        println!("skipping: htpasswd (apache2-utils) is not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, &out.stdout).unwrap();
    let reg = registry_or_skip!(Some(&htpasswd));
    let host = reg.host();
    let img = fixtures::whiteout_image();
    fixtures::push_image(&host, "private", "v1", &img, Some(("alice", "secret")));
    let (_d, paths) = store();

    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, "{}").unwrap();
    let opts = PullOptions { auth_config: Some(empty), ..insecure() };
    let e = pull_blocking(&paths, &format!("{host}/private:v1"), &opts).unwrap_err();
    println!("no credentials: {}", chain(&e));
    assert!(matches!(e, PullError::Unauthorized { .. }), "{}", chain(&e));

    let config = dir.path().join("config.json");
    std::fs::write(&config, format!(r#"{{"auths":{{"{host}":{{"auth":"YWxpY2U6c2VjcmV0"}}}}}}"#)).unwrap();
    let opts = PullOptions { auth_config: Some(config), ..insecure() };
    let rec = pull_blocking(&paths, &format!("{host}/private:v1"), &opts).unwrap();
    assert_eq!(rec.manifest_digest, img.digest());
}

#[test]
fn gc_removes_only_unreferenced_blobs() {
    let reg = registry_or_skip!(None);
    let host = reg.host();
    let wh = fixtures::whiteout_image();
    let links = fixtures::links_image();
    fixtures::push_image(&host, "layers", "v1", &wh, None);
    fixtures::push_image(&host, "links", "v1", &links, None);
    let (_d, paths) = store();
    pull_blocking(&paths, &format!("{host}/layers:v1"), &insecure()).unwrap();
    pull_blocking(&paths, &format!("{host}/links:v1"), &insecure()).unwrap();
    let index = ImageIndex::open(&paths).unwrap();
    let content = ContentStore::open(&paths).unwrap();

    assert_eq!(content.gc(&index.referenced_blobs().unwrap()).unwrap(), 0);
    index.remove(&format!("{host}/layers:v1")).unwrap();
    let freed = content.gc(&index.referenced_blobs().unwrap()).unwrap();
    let expect = (wh.layers[1].len() + wh.config.len() + wh.manifest.len()) as u64;
    assert_eq!(freed, expect);
    assert!(content.has(&wh.layer_digests()[0]), "shared base layer kept");
    assert!(!content.has(&wh.layer_digests()[1]));
    for d in links.layer_digests() {
        assert!(content.has(&d));
    }
    assert_eq!(
        pull_blocking(&paths, &format!("{host}/links:v1"), &insecure()).unwrap().manifest_digest,
        links.digest()
    );
}

fn mounted_small_fs(dir: &Path) -> Result<Mounted, String> {
    if !nix_is_root() {
        return Err("needs root to loop-mount a small filesystem".into());
    }
    let img = dir.join("small.img");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::File::create(&img).unwrap().set_len(8 << 20).unwrap();
    let ok = |c: &mut Command| c.output().map(|o| o.status.success()).unwrap_or(false);
    if !ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img)) {
        return Err("mkfs.ext4 failed or is missing".into());
    }
    Mounted::loop_mount(&img, &mnt, "")
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

#[test]
fn full_disk_leaves_nothing_behind() {
    let reg = registry_or_skip!(None);
    let host = reg.host();
    let dir = tempfile::tempdir().unwrap();
    let mount = match mounted_small_fs(dir.path()) {
        Ok(m) => m,
        Err(reason) => {
            println!("skipping: {reason}");
            return;
        }
    };
    let img: Image = fixtures::big_image(12 << 20, 42);
    fixtures::push_image(&host, "big", "v1", &img, None);
    let paths = StorePaths::new(mount.mountpoint.join("store"));
    let e = pull_blocking(&paths, &format!("{host}/big:v1"), &insecure()).unwrap_err();
    println!("full disk: {}", chain(&e));
    assert!(matches!(e, PullError::Content(ContentError::NoSpace { .. })), "{}", chain(&e));
    assert!(e.to_string().contains("no space left on device"), "{e}");
    assert_nothing_left(&paths, &img.layer_digests()[0]);
}

#[test]
fn concurrent_pulls_of_one_image_both_succeed() {
    let reg = registry_or_skip!(None);
    let host = reg.host();
    let img = fixtures::big_image(2 << 20, 7);
    fixtures::push_image(&host, "same", "a", &img, None);
    fixtures::push_image(&host, "same", "b", &img, None);
    let (_d, paths) = store();
    std::thread::scope(|s| {
        let pulls: Vec<_> = ["a", "b", "a"]
            .iter()
            .map(|tag| {
                let (paths, host) = (&paths, &host);
                s.spawn(move || pull_blocking(paths, &format!("{host}/same:{tag}"), &insecure()))
            })
            .collect();
        for p in pulls {
            assert_eq!(p.join().unwrap().unwrap().manifest_digest, img.digest());
        }
    });
    let content = ContentStore::open(&paths).unwrap();
    // Layer, config and manifest, each once; no temp files; one record with both tags.
    assert_eq!(content.list().unwrap().len(), 3);
    assert_eq!(count_files(&paths.tmp_dir()), 0);
    let records = ImageIndex::open(&paths).unwrap().list().unwrap();
    assert_eq!(records.len(), 1);
    let mut refs = records[0].references.clone();
    refs.sort();
    assert_eq!(refs, vec![format!("{host}/same:a"), format!("{host}/same:b")]);
}

// Import without a registry.

#[test]
fn imports_oci_layout() {
    let dir = tempfile::tempdir().unwrap();
    let paths = StorePaths::new(dir.path().join("store"));
    let img = fixtures::whiteout_image();
    let layout = dir.path().join("layout");
    fixtures::write_oci_layout(&layout, &img, "example.com/team/app:1.0");
    let rec = import(&paths, &layout, None).unwrap();
    assert_eq!(rec.manifest_digest, img.digest());
    assert_eq!(rec.references, vec!["example.com/team/app:1.0"]);
    assert_eq!(rec.layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>(), img.layer_digests());
    let store = ContentStore::open(&paths).unwrap();
    for d in img.layer_digests() {
        assert_eq!(Digest::of_file(&store.path(&d)).unwrap(), d);
    }
    // An explicit name wins; a tampered blob is refused.
    let rec = import(&paths, &layout, Some("mine")).unwrap();
    assert!(rec.references.contains(&"docker.io/library/mine:latest".to_string()));

    let bad = dir.path().join("bad");
    fixtures::write_oci_layout(&bad, &img, "x");
    let layer = img.layer_digests()[1].clone();
    std::fs::write(bad.join("blobs/sha256").join(layer.hex()), b"tampered").unwrap();
    let paths2 = StorePaths::new(dir.path().join("store2"));
    let e = import(&paths2, &bad, None).unwrap_err();
    assert!(matches!(e, ImportError::Content(_)), "{e}");
    assert!(e.to_string().contains(layer.as_str()), "{e}");
    assert!(!paths2.blob(&layer).exists());
    assert!(ImageIndex::open(&paths2).unwrap().list().unwrap().is_empty());
}

#[test]
fn imports_docker_save_tarball() {
    let dir = tempfile::tempdir().unwrap();
    let paths = StorePaths::new(dir.path().join("store"));
    let img = fixtures::links_image();
    let tarball = dir.path().join("save.tar");
    fixtures::write_docker_save(&tarball, &img, "links:v2");
    let rec = import(&paths, &tarball, None).unwrap();
    assert_eq!(rec.references, vec!["docker.io/library/links:v2"]);
    let tars: Vec<Digest> = img.tars.iter().map(|t| Digest::of_bytes(t)).collect();
    assert_eq!(rec.layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>(), tars);
    assert!(rec.layers.iter().all(|l| l.media_type == "application/vnd.docker.image.rootfs.diff.tar"));
    assert_eq!(rec.config_digest, Digest::of_bytes(&img.config));
    assert_eq!(rec.config.entrypoint, vec!["/bin/hello"]);
    let store = ContentStore::open(&paths).unwrap();
    assert!(store.has(&rec.manifest_digest));
    assert_eq!(ImageIndex::open(&paths).unwrap().find("links:v2").unwrap(), rec);

    // A layer that does not match the config's diff_ids is refused, with no record.
    let mut wrong = img.clone();
    wrong.tars[1] = fixtures::tar(&[fixtures::Entry::File("other", b"x")]);
    let bad = dir.path().join("bad.tar");
    fixtures::write_docker_save(&bad, &wrong, "bad:v1");
    let paths2 = StorePaths::new(dir.path().join("store2"));
    let e = import(&paths2, &bad, None).unwrap_err();
    assert!(matches!(e, ImportError::LayerMismatch { .. }), "{e}");
    assert!(e.to_string().contains("layer1/layer.tar"), "{e}");
    assert!(ImageIndex::open(&paths2).unwrap().list().unwrap().is_empty());

    let e = import(&paths2, &dir.path().join("missing.tar"), None).unwrap_err();
    assert!(e.to_string().contains("missing.tar"), "{e}");
}
