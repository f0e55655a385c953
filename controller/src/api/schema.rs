//! The JSON schema of the VM API, generated from the Rust types. `manifests/vm.schema.json` is
//! this output, checked in and compared in CI (`cargo test -p controller --test manifests`).

/// The schema of a VM document, pretty-printed with a trailing newline.
pub fn vm_schema_json() -> String {
    let schema = schemars::schema_for!(super::Vm);
    let mut out = serde_json::to_string_pretty(&schema).expect("a schema serializes");
    out.push('\n');
    out
}
