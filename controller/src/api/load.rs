//! Parsing manifests: multi-document YAML into [`Vm`]s, every problem reported with file, line
//! and field, and nothing returned unless the whole file is valid.

use std::collections::HashMap;

use super::bounds::{check_nodes, MAX_MANIFEST_BYTES};
use super::errors::{ManifestError, ManifestErrors};
use super::host_policy::HostPolicy;
use super::lines::field_line;
use super::types::Vm;
use super::validate::validate;

/// One YAML document of a file: its text and the line it starts on (0-based).
fn documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 0;
    for (i, line) in text.lines().enumerate() {
        let marker = line.trim_end();
        if marker == "---" || marker.starts_with("--- ") || marker == "..." {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 1;
            continue;
        }
        current.push_str(line);
        current.push('\n');
    }
    docs.push((start, current));
    docs
}

fn is_empty_document(doc: &str) -> bool {
    doc.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#')
    })
}

/// The line of `field`, or of its nearest ancestor that can be found (flow-style YAML), or of
/// the document's first content line.
fn best_line(doc: &str, field: &str) -> Option<usize> {
    let path = split_path(field);
    (1..=path.len())
        .rev()
        .find_map(|n| field_line(doc, &path[..n]))
        .or_else(|| doc.lines().position(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')).map(|l| l + 1))
}

/// Splits `a.b[1].c` into `["a", "b[1]", "c"]`.
fn split_path(field: &str) -> Vec<String> {
    field.split('.').filter(|s| !s.is_empty()).map(String::from).collect()
}

/// serde_yaml messages start with the field path (`spec.memory: invalid...`); split it off.
fn path_and_message(msg: &str) -> (String, String) {
    let msg = match msg.rsplit_once(" at line ") {
        Some((m, _)) => m,
        None => msg,
    };
    match msg.split_once(": ") {
        Some((path, rest))
            if !path.contains(' ') && path.chars().all(|c| c.is_ascii_alphanumeric() || "._[]".contains(c)) =>
        {
            (path.to_string(), rest.to_string())
        }
        _ => (String::new(), msg.to_string()),
    }
}

/// The `metadata.name` of a document, read from its text (never by parsing it again, which a hostile
/// document could make expensive): the value on the `name:` line under `metadata`, unquoted.
fn name_of(doc: &str) -> Option<String> {
    // Flow style (`metadata: {name: web}`) has the name on the line of `metadata`.
    let line = field_line(doc, &split_path("metadata.name")).or_else(|| field_line(doc, &split_path("metadata")))?;
    let value = doc.lines().nth(line.checked_sub(1)?)?.split_once("name:")?.1;
    let value = value.split([',', '}', '#']).next()?.trim().trim_matches(|c| c == '"' || c == '\'');
    (!value.is_empty() && value.len() <= 253 && !value.starts_with(['{', '[', '&', '*'])).then(|| value.to_string())
}

/// Parses every VM in `text` (the file named `file`). All documents are checked, and every
/// problem is returned if any is found.
pub fn parse_manifests(file: &str, text: &str) -> Result<Vec<Vm>, ManifestErrors> {
    parse_manifests_for_host(file, text, &HostPolicy::default())
}

/// [`parse_manifests`] for this host: also every host path and port a VM names must be one
/// `policy` allows, reported with its line like any other problem.
pub fn parse_manifests_for_host(file: &str, text: &str, policy: &HostPolicy) -> Result<Vec<Vm>, ManifestErrors> {
    let mut vms = Vec::new();
    let mut errors = ManifestErrors::default();
    if text.len() > MAX_MANIFEST_BYTES {
        errors.push(ManifestError {
            file: file.to_string(),
            line: None,
            column: None,
            field: String::new(),
            object: None,
            message: format!(
                "the file is {} bytes, more than the {MAX_MANIFEST_BYTES} a manifest file may have: split the fleet over several files",
                text.len()
            ),
        });
        return Err(errors);
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    for (offset, doc) in documents(text) {
        if is_empty_document(&doc) {
            continue;
        }
        // Bounded before anything else reads it (see bounds.rs).
        if let Err(e) = check_nodes(&doc) {
            errors.push(ManifestError {
                file: file.to_string(),
                line: e.location().map(|l| l.line() + offset),
                column: e.location().map(|l| l.column()),
                field: String::new(),
                object: name_of(&doc),
                message: e.to_string(),
            });
            continue;
        }
        let parsed: Result<Vm, _> = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(&doc));
        match parsed {
            Ok(vm) => {
                let mut problems = validate(&vm);
                problems.extend(policy.check(&vm));
                let name_line = field_line(&doc, &split_path("metadata.name")).unwrap_or(1) + offset;
                if let Some(first) = names.insert(vm.metadata.name.clone(), name_line) {
                    problems
                        .push(("metadata.name".into(), format!("duplicate VM name: also declared at line {first}")));
                }
                for (field, message) in problems {
                    let line = best_line(&doc, &field);
                    errors.push(ManifestError {
                        file: file.to_string(),
                        line: line.map(|l| l + offset),
                        column: None,
                        field,
                        object: Some(vm.metadata.name.clone()),
                        message,
                    });
                }
                vms.push(vm);
            }
            Err(e) => {
                let path = e.path().to_string();
                let e = e.into_inner();
                let (prefix, message) = path_and_message(&e.to_string());
                // The path of the innermost field; for unknown fields that is the map holding it.
                let field = if path == "." || path.is_empty() { prefix } else { path };
                let field = if message.starts_with("unknown field") {
                    field.rsplit_once('.').map(|(parent, _)| parent.to_string()).unwrap_or_default()
                } else {
                    field
                };
                let location = if message.starts_with("unknown field") || message.contains("at line") {
                    e.location()
                } else {
                    None
                };
                let location = location.or_else(|| if field.is_empty() { e.location() } else { None });
                let name = name_of(&doc);
                let line = location.as_ref().map(|l| l.line()).or_else(|| best_line(&doc, &field));
                errors.push(ManifestError {
                    file: file.to_string(),
                    line: line.map(|l| l + offset),
                    column: location.map(|l| l.column()),
                    field,
                    object: name,
                    message,
                });
            }
        }
    }
    if errors.is_empty() {
        Ok(vms)
    } else {
        Err(errors)
    }
}

/// Checks that no two documents (in any of the files) declare the same VM name; reports both
/// places.
pub fn check_unique_names(docs: &[(String, Vm)]) -> Result<(), ManifestErrors> {
    let mut first: HashMap<&str, &str> = HashMap::new();
    let mut errors = ManifestErrors::default();
    for (file, vm) in docs {
        let name = vm.metadata.name.as_str();
        if let Some(other) = first.insert(name, file) {
            errors.push(ManifestError {
                file: file.clone(),
                line: None,
                column: None,
                field: "metadata.name".into(),
                object: Some(name.to_string()),
                message: format!("duplicate VM name: also declared in {other}"),
            });
            first.insert(name, other);
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
#[path = "load_tests.rs"]
mod tests;
