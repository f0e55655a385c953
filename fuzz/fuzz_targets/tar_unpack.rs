//! The layer unpacker: any bytes as a (plain or gzip) tar layer applied onto a fresh root, within
//! small limits. Besides not panicking, nothing may appear or change outside the root: a sibling
//! directory is checked after every input.
#![no_main]

use std::path::Path;

use image_store::unpack::{apply_layer, UnpackBudget, UnpackLimits};
use image_store::Digest;
use libfuzzer_sys::fuzz_target;

/// Everything below `dir` but `skip`, with file contents, in a stable order.
fn snapshot(dir: &Path, skip: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries.into_iter().filter(|p| p != skip) {
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let content = if meta.is_file() { std::fs::read(&path).unwrap() } else { Vec::new() };
            out.push((path.display().to_string(), content));
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let base = tempfile::Builder::new().prefix("ignite-fuzz-tar").tempdir().unwrap();
    let root = base.path().join("root");
    let outside = base.path().join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"host file").unwrap();
    let before = snapshot(base.path(), &root);

    let digest = Digest::of_bytes(data);
    let mut budget = UnpackBudget::new(UnpackLimits { max_bytes: 1 << 20, max_entries: 256 });
    let _ = apply_layer(data, &digest, &root, &mut budget);

    assert_eq!(before, snapshot(base.path(), &root), "the layer changed something outside the root");
});
