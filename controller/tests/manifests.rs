//! The generated files in `manifests/` must match the Rust types. Regenerate them with
//! `IGNITE_UPDATE_MANIFESTS=1 cargo test -p controller --test manifests`.

use std::path::PathBuf;

use serde::Deserialize as _;

fn manifests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

fn check(file: &str, generated: &str) {
    let path = manifests_dir().join(file);
    if std::env::var_os("IGNITE_UPDATE_MANIFESTS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, generated).unwrap();
        eprintln!("rewrote {}", path.display());
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "{} is out of date with the Rust types: run `IGNITE_UPDATE_MANIFESTS=1 cargo test -p controller --test manifests` and commit the result",
        path.display()
    );
}

#[test]
fn vm_schema_matches_the_rust_types() {
    check("vm.schema.json", &controller::api::schema::vm_schema_json());
}

#[test]
fn microvm_crd_matches_the_rust_types() {
    check("crd/microvm.yaml", &controller::kube::crd::crd_yaml());
}

#[test]
fn the_rbac_manifest_grants_what_the_microvm_controller_does() {
    let text = std::fs::read_to_string(manifests_dir().join("kube/rbac.yaml")).unwrap();
    let role = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .find(|doc| doc["kind"] == "ClusterRole")
        .expect("a ClusterRole");
    let granted = |resource: &str, verb: &str| {
        role["rules"].as_sequence().unwrap().iter().any(|rule| {
            let has = |key: &str, want: &str| rule[key].as_sequence().unwrap().iter().any(|v| v == want);
            has("apiGroups", "ignite.dev") && has("resources", resource) && has("verbs", verb)
        })
    };
    // list + watch: the watch; patch: the finalizer; microvms/status patch: the status.
    for (resource, verb) in
        [("microvms", "list"), ("microvms", "watch"), ("microvms", "patch"), ("microvms/status", "patch")]
    {
        assert!(granted(resource, verb), "manifests/kube/rbac.yaml does not grant {verb} on {resource}");
    }
}

#[test]
fn the_documented_examples_parse() {
    for dir in [manifests_dir().join("examples"), manifests_dir().join("../examples/fleet")] {
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let vms = controller::api::parse_manifests(&path.display().to_string(), &text)
                    .unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
                seen += vms.len();
            }
        }
        assert!(seen > 0, "no example VM in {}", dir.display());
    }
}
