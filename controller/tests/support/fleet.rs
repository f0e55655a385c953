//! What the fleet-level tests share: the skip check, a registry serving a tiny image, VM
//! manifests, and the configuration of an in-process daemon running tiny guests.

use std::path::Path;
use std::time::Duration;

use controller::daemon::DaemonConfig;
use controller::host::{DefaultKernel, HostConfig};
use controller::net::NetConfig;
use controller::reconcile::ReconcilerConfig;
use controller::source::{DirSpec, SourceKind, SourceSpec};
use image_store::testing::{fixtures, registry::Registry};

use super::tiny_guest;

/// Why fleet tests cannot run here (no /dev/kvm, no registry binary), or `None`.
pub fn unavailable() -> Option<String> {
    tiny_guest::kvm_unavailable().or_else(|| {
        (!Path::new("/usr/bin/docker-registry").exists()).then(|| "docker-registry is not installed".to_string())
    })
}

/// A registry on 127.0.0.1 serving a small image; returns it (keep it alive) and the reference.
pub fn registry_with_image() -> (Registry, String) {
    let registry = Registry::start(None).unwrap();
    fixtures::push_image(&registry.host(), "demo/tiny", "1", &fixtures::whiteout_image(), None);
    let image = format!("{}/demo/tiny:1", registry.host());
    (registry, image)
}

/// A VM manifest with a 64 MiB disk and `extra` appended to its spec (indented two spaces).
pub fn manifest(name: &str, image: &str, memory: &str, extra: &str) -> String {
    format!(
        "apiVersion: ignite.dev/v1alpha1\nkind: VM\nmetadata:\n  name: {name}\nspec:\n  image: {image}\n  memory: {memory}\n  diskSize: 64Mi\n{extra}"
    )
}

/// One directory source named `local` reading `dir` every 200 ms.
pub fn local_dir(dir: &Path) -> Vec<SourceSpec> {
    vec![SourceSpec {
        name: "local".into(),
        kind: SourceKind::Directory(DirSpec { path: dir.into(), interval: Duration::from_millis(200) }),
    }]
}

/// An in-process daemon on `root` following `sources`, running tiny idle guests.
pub fn daemon_config(root: &Path, sources: Vec<SourceSpec>, net: Option<NetConfig>) -> DaemonConfig {
    DaemonConfig {
        root: root.into(),
        sources,
        host: HostConfig {
            init_bin: None,
            default_kernel: DefaultKernel::Path(tiny_guest::idle_guest().kernel),
            net,
            insecure_registries: false,
            virt_mode: vmm_core::VirtModeConfig::Auto,
            policy: Default::default(),
            pull_timeouts: Default::default(),
            warm_start: false,
            dm_pool: Default::default(),
        },
        reconciler: ReconcilerConfig { stop_grace: Duration::from_millis(200), ..Default::default() },
        ignite_bin: tiny_guest::ignite_bin(),
        vmm: Default::default(),
        socket: Some(root.join("ignite.sock")),
        tcp: None,
        kube: None,
    }
}
