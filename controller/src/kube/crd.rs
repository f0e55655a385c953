//! The `MicroVM` custom resource (`ignite.dev/v1alpha1`): the git manifest's [`VmSpec`] plus the
//! host it is scheduled to. `manifests/crd/microvm.yaml` is [`crd_yaml`]'s output, checked in and
//! compared in CI (`cargo test -p controller --test manifests`).

use ::kube::CustomResource;
use ::kube::CustomResourceExt as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::status::MicroVmStatus;
use crate::api::VmSpec;

/// The finalizer a host puts on a MicroVM it runs: removed only once the VM and everything it
/// owns (disk, tap, lease, port forwards) are gone from the host.
pub const FINALIZER: &str = "ignite.dev/vm-cleanup";

/// The plural resource name, as RBAC rules and error messages name it.
pub const RESOURCE: &str = "microvms.ignite.dev";

/// A microVM declared in Kubernetes. `spec` is the git manifest's `spec` plus `host`.
#[derive(CustomResource, Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ignite.dev",
    version = "v1alpha1",
    kind = "MicroVM",
    plural = "microvms",
    shortname = "mvm",
    namespaced,
    doc = "A microVM run by an ignite host: the git manifest's spec plus the host it is scheduled to.",
    status = "MicroVmStatus",
    printcolumn = r#"{"name":"Host", "type":"string", "jsonPath":".status.host"}"#,
    printcolumn = r#"{"name":"Phase", "type":"string", "jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"IP", "type":"string", "jsonPath":".status.ip"}"#,
    printcolumn = r#"{"name":"Ready", "type":"string", "jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age", "type":"date", "jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MicroVmSpec {
    /// The VM itself: exactly the `spec` of a git manifest (`kind: VM`).
    #[serde(flatten)]
    pub vm: VmSpec,
    /// The ignite host (its `--kube-host-name`, by default its hostname) that runs this VM. Without
    /// it, every host whose `--kube-selector` matches the MicroVM's labels takes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// The CustomResourceDefinition, with its schema made structural where schemars' output is not:
/// quantities (`512Mi` or a number of bytes) become `x-kubernetes-int-or-string`, as in
/// Kubernetes' own resource quantities.
pub fn crd() -> CustomResourceDefinition {
    let mut value = serde_json::to_value(MicroVM::crd()).expect("a CRD serializes");
    int_or_string(&mut value);
    serde_json::from_value(value).expect("the rewritten CRD deserializes")
}

/// Rewrites every typeless `anyOf` (what the quantity schema becomes) into Kubernetes'
/// int-or-string form, keeping the string branch's pattern.
fn int_or_string(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if map.contains_key("anyOf") && !map.contains_key("type") {
                let branches = map.remove("anyOf").unwrap_or_default();
                let pattern = branches.as_array().into_iter().flatten().find_map(|b| b.get("pattern").cloned());
                map.insert("x-kubernetes-int-or-string".into(), Value::Bool(true));
                map.insert("anyOf".into(), serde_json::json!([{"type": "integer"}, {"type": "string"}]));
                if let Some(pattern) = pattern {
                    map.insert("pattern".into(), pattern);
                }
            }
            map.values_mut().for_each(int_or_string);
        }
        Value::Array(items) => items.iter_mut().for_each(int_or_string),
        _ => {}
    }
}

/// The CustomResourceDefinition as YAML, with a trailing newline.
pub fn crd_yaml() -> String {
    let crd = crd();
    let mut out = String::from("# Generated from controller/src/kube/crd.rs: do not edit. Regenerate with\n");
    out.push_str("# IGNITE_UPDATE_MANIFESTS=1 cargo test -p controller --test manifests\n");
    out.push_str(&serde_yaml::to_string(&crd).expect("a CRD serializes to YAML"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rules the API server checks before accepting a CRD schema ("structural schema"): every
    /// node has a type (or is int-or-string / preserves unknown fields), `properties` and
    /// `additionalProperties` never meet, no `$ref`, and `anyOf` branches carry no type except in
    /// the int-or-string form.
    fn check_structural(path: &str, node: &Value, problems: &mut Vec<String>) {
        let Some(map) = node.as_object() else { return };
        let int_or_string = map.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
        let preserve = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        if !map.contains_key("type") && !int_or_string && !preserve {
            problems.push(format!("{path}: no type"));
        }
        if map.contains_key("properties") && map.contains_key("additionalProperties") {
            problems.push(format!("{path}: properties and additionalProperties"));
        }
        if map.contains_key("$ref") {
            problems.push(format!("{path}: $ref"));
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            for branch in map.get(key).and_then(Value::as_array).into_iter().flatten() {
                if branch.get("type").is_some() && !(int_or_string && key == "anyOf") {
                    problems.push(format!("{path}.{key}: a branch sets type"));
                }
            }
        }
        if let Some(props) = map.get("properties").and_then(Value::as_object) {
            for (name, child) in props {
                check_structural(&format!("{path}.{name}"), child, problems);
            }
        }
        if let Some(items) = map.get("items") {
            check_structural(&format!("{path}[]"), items, problems);
        }
    }

    #[test]
    fn the_crd_schema_is_structural() {
        let crd = serde_json::to_value(crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut problems = Vec::new();
        check_structural("", schema, &mut problems);
        assert!(problems.is_empty(), "{problems:#?}");
        let memory = &schema["properties"]["spec"]["properties"]["memory"];
        assert_eq!(memory["x-kubernetes-int-or-string"], true);
        assert_eq!(memory["default"], "512Mi");
        assert!(schema["properties"]["spec"]["properties"]["host"].is_object());
        assert!(crd["spec"]["versions"][0]["subresources"]["status"].is_object());
    }

    #[test]
    fn a_microvm_spec_is_the_vm_spec_plus_host() {
        let spec: MicroVmSpec =
            serde_json::from_value(serde_json::json!({"image": "busybox", "memory": "64Mi", "host": "h1"})).unwrap();
        assert_eq!(spec.host.as_deref(), Some("h1"));
        assert_eq!(spec.vm.memory.bytes(), 64 << 20);
        let back = serde_json::to_value(&spec).unwrap();
        assert_eq!(back["host"], "h1");
        assert_eq!(back["image"], "busybox");
        // The git manifest itself still refuses `host`.
        let git = "apiVersion: ignite.dev/v1alpha1\nkind: VM\nmetadata: {name: a}\nspec: {image: busybox, host: h1}\n";
        let err = crate::api::parse_manifests("a.yaml", git).unwrap_err().to_string();
        assert!(err.contains("unknown field `host`"), "{err}");
    }
}
