//! Manifest parsing: good documents, and every kind of bad input with its file, line and field.

use super::*;
use crate::api::{DesiredState, Quantity, RestartPolicy};

const GOOD: &str = "# fleet
apiVersion: ignite.dev/v1alpha1
kind: VM
metadata:
  name: web
  labels: {app: web}
spec:
  image: 127.0.0.1:5000/busybox:1.36
  cpus: 2
  memory: 256Mi
  diskSize: 1Gi
  command: [/bin/httpd, -f]
  env:
    - name: GREETING
      value: hi
  network:
    ports: [\"8080:80\", \"5353:53/udp\"]
  restartPolicy: OnFailure
---
---
apiVersion: ignite.dev/v1alpha1
kind: VM
metadata:
  name: db
spec:
  image: busybox
";

fn errors(text: &str) -> Vec<ManifestError> {
    parse_manifests("fleet/web.yaml", text).expect_err("invalid").0
}

fn one_error(text: &str) -> ManifestError {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    errs.into_iter().next().unwrap()
}

fn with_spec(extra: &str) -> String {
    format!("apiVersion: ignite.dev/v1alpha1\nkind: VM\nmetadata:\n  name: web\nspec:\n  image: busybox\n{extra}")
}

#[test]
fn parses_multi_document_files_with_defaults() {
    let vms = parse_manifests("fleet.yaml", GOOD).unwrap();
    assert_eq!(vms.len(), 2);
    let web = &vms[0].spec;
    assert_eq!((web.cpus, web.memory.mib(), web.disk_size.bytes()), (2, 256, 1 << 30));
    assert_eq!(web.network.ports[1].to_string(), "5353:53/udp");
    assert_eq!(web.restart_policy, RestartPolicy::OnFailure);
    let db = &vms[1].spec;
    assert_eq!((db.cpus, db.memory.mib(), db.disk_size.bytes()), (1, 512, 4 << 30));
    assert_eq!((db.state, db.restart_policy), (DesiredState::Running, RestartPolicy::Always));
    let yaml = serde_yaml::to_string(&vms[0]).unwrap();
    assert_eq!(parse_manifests("again.yaml", &yaml).unwrap()[0], vms[0], "round trip:\n{yaml}");
    assert!(parse_manifests("empty.yaml", "# nothing\n---\n").unwrap().is_empty());
}

#[test]
fn malformed_yaml_names_file_and_line() {
    let e = one_error("apiVersion: ignite.dev/v1alpha1\nkind: VM\nmetadata:\n  name: [web\n");
    assert_eq!(e.file, "fleet/web.yaml");
    assert!(e.line.is_some(), "{e}");
    assert!(e.to_string().starts_with("fleet/web.yaml:"), "{e}");
}

#[test]
fn unknown_fields_are_rejected_with_their_line_even_deep_down() {
    let e = one_error(&with_spec("  network:\n    ports: []\n    bandwidth: 10M\n"));
    assert_eq!(e.line, Some(9), "{e}");
    assert!(e.message.contains("unknown field `bandwidth`"), "{e}");
    assert_eq!(e.field, "spec.network", "{e}");
    let top = one_error(&with_spec("  memroy: 1Gi\n"));
    assert!(top.message.contains("memroy") && top.line == Some(7), "{top}");
}

#[test]
fn bad_quantities_and_ports_name_the_field() {
    let e = one_error(&with_spec("  memory: lots\n"));
    assert_eq!((e.field.as_str(), e.line), ("spec.memory", Some(7)), "{e}");
    assert!(e.message.contains("invalid quantity"), "{e}");
    let e = one_error(&with_spec("  network:\n    ports:\n      - \"8080:80\"\n      - \"80\"\n"));
    assert!(e.message.contains("invalid port mapping \"80\""), "{e}");
    assert_eq!(e.line, Some(10), "{e}");
}

#[test]
fn impossible_sizes_and_counts_are_reported_together() {
    let errs = errors(&with_spec("  cpus: 64\n  memory: 1Ki\n  diskSize: 1Mi\n"));
    let fields: Vec<(&str, Option<usize>)> = errs.iter().map(|e| (e.field.as_str(), e.line)).collect();
    assert_eq!(fields, [("spec.cpus", Some(7)), ("spec.memory", Some(8)), ("spec.diskSize", Some(9))]);
    assert!(errs.iter().all(|e| e.object.as_deref() == Some("web")));
}

#[test]
fn invalid_references_names_and_kinds() {
    let e = one_error(
        "apiVersion: ignite.dev/v1alpha1\nkind: VM\nmetadata:\n  name: web\nspec:\n  image: \"UPPER/Case::bad\"\n",
    );
    assert_eq!((e.field.as_str(), e.line), ("spec.image", Some(6)), "{e}");
    let e = one_error("apiVersion: ignite.dev/v1alpha1\nkind: VM\nmetadata:\n  name: Web_1\nspec:\n  image: busybox\n");
    assert_eq!((e.field.as_str(), e.line), ("metadata.name", Some(4)), "{e}");
    let errs = errors("apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  image: busybox\n");
    assert_eq!((errs[0].field.as_str(), errs[0].line), ("apiVersion", Some(1)), "{errs:#?}");
    let errs = errors("apiVersion: ignite.dev/v1alpha1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  image: busybox\n");
    assert_eq!(errs[0].field, "kind");
    assert_eq!(errs[0].line, Some(2));
}

#[test]
fn kernel_env_files_keys_and_bootstrap_are_checked() {
    let errs = errors(&with_spec(
        "  kernel:\n    image: k1\n    path: vmlinux\n  env:\n    - name: A\n    - name: A\n    - name: 1B\n  copyFiles:\n    - source: rel\n      destination: /etc/x\n  ssh:\n    authorizedKeys: [\"not a key\"]\n  bootstrap:\n    kubernetes:\n      apiServerEndpoint: nope\n      caCertHash: md5:00\n",
    ));
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.kernel",
            "spec.kernel.path",
            "spec.env[1].name",
            "spec.env[2].name",
            "spec.copyFiles[0].source",
            "spec.ssh.authorizedKeys[0]",
            "spec.bootstrap.kubernetes.apiServerEndpoint",
            "spec.bootstrap.kubernetes.caCertHash",
            "spec.bootstrap.kubernetes",
        ],
        "{errs:#?}"
    );
    let lines: Vec<Option<usize>> = errs.iter().map(|e| e.line).collect();
    assert_eq!(lines[..5], [Some(7), Some(9), Some(12), Some(13), Some(15)], "{errs:#?}");
}

#[test]
fn host_files_are_read_only_from_allowed_directories_and_inline_content_is_checked() {
    use crate::api::load::parse_manifests_for_host;
    use crate::api::{HostPaths, HostPolicy};
    let allowed = tempfile::tempdir().unwrap();
    let doc = |source: &str| {
        with_spec(&format!(
            "  copyFiles:\n    - source: {source}\n      destination: /etc/x\n  kernel:\n    path: {}/vmlinux\n",
            allowed.path().display()
        ))
    };
    let host = HostPolicy { paths: HostPaths::allow([allowed.path().to_path_buf()]).unwrap(), ..Default::default() };
    let inside = format!("{}/conf/app.conf", allowed.path().display());
    parse_manifests_for_host("fleet.yaml", &doc(&inside), &host).unwrap();
    // The same manifest on a host that allows nothing (the default), and one reaching out.
    let errs = parse_manifests_for_host("fleet.yaml", &doc(&inside), &HostPolicy::default()).unwrap_err().0;
    let found: Vec<(&str, Option<usize>)> = errs.iter().map(|e| (e.field.as_str(), e.line)).collect();
    assert_eq!(found, [("spec.copyFiles[0].source", Some(8)), ("spec.kernel.path", Some(11))], "{errs:#?}");
    assert!(errs[0].to_string().starts_with("fleet.yaml:8: VM \"web\": spec.copyFiles[0].source"), "{}", errs[0]);
    for outside in ["/etc/shadow", &format!("{}/../etc/shadow", allowed.path().display())] {
        let errs = parse_manifests_for_host("fleet.yaml", &doc(outside), &host).unwrap_err().0;
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(errs[0].message.contains("is not under a directory this host lets manifests read"), "{}", errs[0]);
    }
    let errs = errors(&with_spec(
        "  copyFiles:\n    - contentBase64: \"not base64!\"\n      destination: /a\n    - destination: /b\n    - contentBase64: aGk=\n      source: /x\n      mode: \"0999\"\n      destination: /c\n",
    ));
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.copyFiles[0].contentBase64",
            "spec.copyFiles[1]",
            "spec.copyFiles[2]",
            "spec.copyFiles[2].mode",
            "spec.copyFiles[2].source"
        ],
        "{errs:#?}"
    );
    let big = "A".repeat((crate::api::host_paths::MAX_COPY_FILE_BYTES as usize / 3 + 1) * 4);
    let e = one_error(&with_spec(&format!("  copyFiles:\n    - contentBase64: {big}\n      destination: /a\n")));
    assert!(e.message.contains("more than the 4194304 one copied file may have"), "{e}");
}

#[test]
fn host_ports_of_the_host_itself_are_refused_with_their_line() {
    use crate::api::load::parse_manifests_for_host;
    use crate::api::{HostPolicy, PortPolicy};
    let doc = with_spec("  network:\n    ports:\n      - \"8080:80\"\n      - \"22:22\"\n      - \"443:443\"\n");
    let errs = errors(&doc);
    let found: Vec<(&str, Option<usize>)> = errs.iter().map(|e| (e.field.as_str(), e.line)).collect();
    assert_eq!(found, [("spec.network.ports[1]", Some(10)), ("spec.network.ports[2]", Some(11))], "{errs:#?}");
    assert!(errs[0].message.contains("reserved for the host's SSH"), "{}", errs[0]);
    assert!(errs[1].message.contains("--allow-privileged-ports"), "{}", errs[1]);
    let open = HostPolicy { ports: PortPolicy::default().allow_privileged(true), ..Default::default() };
    let errs = parse_manifests_for_host("fleet.yaml", &doc, &open).unwrap_err().0;
    assert_eq!(errs.len(), 1, "only port 22 is left: {errs:#?}");
}

#[test]
fn duplicate_names_are_caught_in_one_file_and_across_files() {
    let doc = with_spec("");
    let e = one_error(&format!("{doc}---\n{doc}"));
    assert!(e.message.contains("duplicate VM name: also declared at line 4"), "{e}");
    assert_eq!(e.line, Some(11), "{e}");
    let a = parse_manifests("a.yaml", &doc).unwrap().remove(0);
    let b = a.clone();
    let err = check_unique_names(&[("a.yaml".into(), a), ("b.yaml".into(), b)]).unwrap_err();
    assert_eq!(err.0[0].file, "b.yaml");
    assert!(err.to_string().contains("also declared in a.yaml"), "{err}");
}

#[test]
fn max_restarts_goes_with_on_failure_only() {
    let vm = parse_manifests("a.yaml", &with_spec("  restartPolicy: OnFailure\n  maxRestarts: 3\n")).unwrap();
    assert_eq!((vm[0].spec.restart_policy, vm[0].spec.max_restarts), (RestartPolicy::OnFailure, Some(3)));
    let unlimited = parse_manifests("a.yaml", &with_spec("  restartPolicy: OnFailure\n")).unwrap();
    assert_eq!(unlimited[0].spec.max_restarts, None, "older manifests keep working: no limit");
    for policy in ["Always", "Never"] {
        let e = one_error(&with_spec(&format!("  restartPolicy: {policy}\n  maxRestarts: 2\n")));
        assert_eq!(e.field, "spec.maxRestarts", "{e}");
        assert!(e.message.contains(&format!("only applies with restartPolicy OnFailure, not {policy}")), "{e}");
    }
    let e = one_error(&with_spec("  restartPolicy: OnFailure\n  maxRestarts: -1\n"));
    assert!(e.to_string().contains("maxRestarts"), "{e}");
}

#[test]
fn fingerprint_ignores_state_and_restart_policy_only() {
    let base = parse_manifests("a.yaml", &with_spec("")).unwrap().remove(0).spec;
    let mut stopped = base.clone();
    stopped.state = DesiredState::Stopped;
    stopped.restart_policy = RestartPolicy::OnFailure;
    stopped.max_restarts = Some(5);
    assert!(!base.needs_recreate(&stopped));
    let mut bigger = base.clone();
    bigger.memory = Quantity::from_bytes(1 << 30);
    assert!(base.needs_recreate(&bigger));
    assert_eq!(base.fingerprint().len(), 64);
}

/// A document of about `bytes` that makes a YAML parser expand one anchor of `width` scalars once per
/// alias: quadratic work from a linear text ("billion laughs" made wide instead of deep).
fn wide_alias_bomb(width: usize, bytes: usize) -> String {
    let mut doc = String::from("apiVersion: ignite.dev/v1alpha1\nkind: VM\nmetadata:\n  name: bomb\nspec:\n  image: x\n  memory: lots\n  extra: &a [");
    doc.push_str(&vec!["x"; width].join(","));
    doc.push_str("]\n  more: [");
    while doc.len() < bytes {
        doc.push_str("*a,");
    }
    doc.push_str("*a]\n");
    doc
}

#[test]
fn a_wide_alias_document_is_refused_quickly() {
    let doc = wide_alias_bomb(50_000, 1_000_000);
    let started = std::time::Instant::now();
    let err = one_error(&doc);
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "took {:?}", started.elapsed());
    assert!(err.message.contains("more than 100000 YAML nodes"), "{err}");
    assert_eq!((err.file.as_str(), err.object.as_deref()), ("fleet/web.yaml", Some("bomb")), "{err}");
}

#[test]
fn a_manifest_file_larger_than_the_cap_is_refused_whole() {
    let mut doc = GOOD.to_string();
    while doc.len() <= crate::api::bounds::MAX_MANIFEST_BYTES {
        doc.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    let err = one_error(&doc);
    let cap = format!("more than the {} a manifest file may have", crate::api::bounds::MAX_MANIFEST_BYTES);
    assert!(err.message.contains(&cap), "{err}");
}

#[test]
fn the_name_of_a_broken_document_is_read_from_its_text() {
    assert_eq!(name_of("metadata:\n  name: web # the web tier\n"), Some("web".into()));
    assert_eq!(name_of("metadata: {name: \"db\", labels: {}}\n"), Some("db".into()));
    assert_eq!(name_of("metadata:\n  name: *alias\n"), None);
    assert_eq!(name_of("spec: {}\n"), None);
}

#[test]
fn snapshot_schedules_are_checked_and_do_not_shape_the_vm() {
    let vm = parse_manifests("a.yaml", &with_spec("  snapshots: {every: 1h, keep: 5}\n")).unwrap();
    let schedule = vm[0].spec.snapshots.clone().unwrap();
    assert_eq!((schedule.interval().unwrap().as_secs(), schedule.keep), (3600, 5));
    let plain = parse_manifests("a.yaml", &with_spec("")).unwrap();
    assert!(!plain[0].spec.needs_recreate(&vm[0].spec), "a schedule change never recreates the VM");
    for (extra, field, says) in [
        ("  snapshots: {every: often, keep: 5}\n", "spec.snapshots.every", "not a duration"),
        ("  snapshots: {every: 2s, keep: 5}\n", "spec.snapshots.every", "shortest interval, 10s"),
        ("  snapshots: {every: 1h, keep: 0}\n", "spec.snapshots.keep", "between 1 and 100"),
        ("  snapshots: {every: 1h, keep: 101}\n", "spec.snapshots.keep", "between 1 and 100"),
    ] {
        let e = one_error(&with_spec(extra));
        assert_eq!(e.field, field, "{e}");
        assert!(e.to_string().contains(says), "{e}");
    }
    let e = one_error(&with_spec("  snapshots: {every: 1h, keep: 5, at: noon}\n"));
    assert!(e.to_string().contains("at"), "unknown fields are refused: {e}");
}
