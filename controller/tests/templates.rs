//! Warm-start templates on the host side, with real `ignite vmm run` processes (jailed when root) on
//! /dev/kvm and tiny guests standing in for the template's Linux: one prints the ready line a
//! template's ignite-init prints, another powers off without it. A build saves the guest into
//! `templates/<key>/` (root's, its record last) and leaves no VMM, run directory or build directory
//! behind; a second build of the same key is the cached one; another kernel gets another key and
//! its own build; a guest that never gets ready fails its build with its console quoted; what a
//! crashed build left is swept. (The Linux side, a warm VM restored from a template, is
//! `cargo test -p ignite-e2e --test warm_start`.)

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use controller::host::templates::{TemplateError, TemplateShape, Templates};
use controller::layout::RootLayout;
use controller::net::{HostNet, RecordingHostNet};
use controller::supervisor::{Supervisor, SupervisorConfig};
use support::tiny_guest;
use vmm_core::VirtModeConfig;

fn shape() -> TemplateShape {
    TemplateShape { vcpus: 1, memory_mib: 32, network: false, virt_mode: VirtModeConfig::Auto }
}

/// The templates of `root`, built by a supervisor of their own (jailed when this test runs as root),
/// with `init` as the initramfs's ignite-init.
fn templates(root: &Path, init: &Path) -> Templates {
    let layout = RootLayout::new(root);
    let mut config = SupervisorConfig::new(layout.templates().run_dir(), tiny_guest::ignite_bin());
    if !rustix::process::geteuid().is_root() {
        config.jail = None;
    }
    let supervisor = Supervisor::new(config).unwrap();
    let net: Arc<dyn HostNet> = Arc::new(RecordingHostNet::new());
    Templates::new(layout.templates(), Some(init.to_path_buf()), supervisor, net, None)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_template_is_built_once_per_kernel_and_shape_and_leaves_nothing_behind() {
    if let Some(why) = tiny_guest::kvm_unavailable() {
        eprintln!("SKIP a_template_is_built_once_per_kernel_and_shape_and_leaves_nothing_behind: {why}");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let init = root.path().join("ignite-init");
    std::fs::write(&init, b"a stand-in for ignite-init: the tiny guest never runs it").unwrap();
    let t = templates(root.path(), &init);
    let kernel = tiny_guest::template_ready_guest().kernel;

    let built = t.build(&kernel, &shape()).unwrap().expect("a first build");
    eprintln!("built template {} in {} ms ({} bytes of memory)", built.key, built.build_ms, built.memory_bytes);
    let dir = t.ready(&built.key).expect("the template is ready");
    assert_eq!(entries(&dir), ["memory", "state", "template.json"]);
    assert_eq!(built.memory_bytes, 32 << 20);
    vmm_core::snapshot::load(&dir).expect("the saved template loads");
    if rustix::process::geteuid().is_root() {
        for file in ["state", "memory"] {
            assert_eq!(std::fs::metadata(dir.join(file)).unwrap().uid(), 0, "{file}: out of the jailed VMM's reach");
        }
    }
    // Nothing of the build is left: no VMM, run directory or build directory.
    let templates_dir = RootLayout::new(root.path()).templates();
    assert_eq!(entries(templates_dir.path()), [".run".to_string(), built.key.clone()]);
    assert!(entries(&templates_dir.run_dir()).is_empty(), "{:?}", entries(&templates_dir.run_dir()));
    assert!(t.building().is_empty());

    // Cached: the same kernel and shape build nothing.
    assert!(t.build(&kernel, &shape()).unwrap().is_none());
    assert_eq!(t.build_and_wait(&kernel, &shape()).unwrap(), built);

    // Another kernel (a new build of it) gets another template.
    let other = root.path().join("vmlinux-2");
    let mut bytes = std::fs::read(&kernel).unwrap();
    bytes.extend_from_slice(b"\0another build");
    std::fs::write(&other, bytes).unwrap();
    let rebuilt = t.build(&other, &shape()).unwrap().expect("a build for the new kernel");
    assert_ne!(rebuilt.key, built.key);
    assert_eq!(t.list().iter().map(|i| i.key.clone()).collect::<Vec<_>>().len(), 2);

    t.remove(&built.key).unwrap();
    assert!(t.ready(&built.key).is_none());
    assert!(matches!(t.remove(&built.key), Err(TemplateError::NotFound(_))));
}

#[test]
fn a_guest_that_never_gets_ready_fails_its_build_and_a_crashed_build_is_swept() {
    if let Some(why) = tiny_guest::kvm_unavailable() {
        eprintln!("SKIP a_guest_that_never_gets_ready_fails_its_build_and_a_crashed_build_is_swept: {why}");
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let init = root.path().join("ignite-init");
    std::fs::write(&init, b"init").unwrap();
    let t = templates(root.path(), &init);
    // Powers off at once, after its own marker: no template line.
    let kernel = tiny_guest::exit_code_guest().kernel;
    let err = t.build(&kernel, &shape()).unwrap_err().to_string();
    assert!(err.contains("exited before it was ready"), "{err}");
    assert!(err.contains(tiny_guest::EXIT_MARKER), "the console is quoted: {err}");
    let layout = RootLayout::new(root.path()).templates();
    assert_eq!(entries(layout.path()), [".run"], "a failed build leaves no template and no build directory");
    assert!(entries(&layout.run_dir()).is_empty());

    // What a daemon killed in the middle of a build leaves: its build directory and run directory.
    std::fs::create_dir_all(layout.build("0123456789abcdef").join("snapshots")).unwrap();
    std::fs::create_dir_all(layout.run_dir().join("template-0123456789abcdef")).unwrap();
    std::fs::create_dir_all(layout.template("fedcba9876543210")).unwrap(); // moved in, no record yet
    let swept = t.sweep();
    assert_eq!(swept.len(), 2, "{swept:?}");
    assert_eq!(entries(layout.path()), [".run"]);
    assert!(entries(&layout.run_dir()).is_empty(), "{:?}", entries(&layout.run_dir()));
}
