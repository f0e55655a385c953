//! Checks that need more than the types: names, ranges, references, uniqueness inside a spec.
//! Each problem is reported with the path of the field it is about.

use std::collections::HashSet;

use super::host_paths::{MAX_COPY_FILES_TOTAL_BYTES, MAX_COPY_FILE_BYTES};
use super::types::{RestartPolicy, SnapshotSchedule, Vm, API_VERSION, KIND_VM};

/// Fewest vCPUs.
pub const MIN_CPUS: u8 = 1;
/// Most vCPUs (the engine's limit).
pub const MAX_CPUS: u8 = 32;
/// Smallest guest memory.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest memory.
pub const MAX_MEMORY: u64 = 256 << 30;
/// Smallest root disk.
pub const MIN_DISK: u64 = 64 << 20;
/// Largest root disk.
pub const MAX_DISK: u64 = 16 << 40;

/// One problem: the field path and the message.
pub type Problem = (String, String);

/// Whether `s` is a DNS-1123 label: lowercase letters, digits and `-`, starting and ending with
/// a letter or digit, at most 63 characters.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_env_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn is_label_key(s: &str) -> bool {
    let name = s.rsplit_once('/').map_or(s, |(_, n)| n);
    !name.is_empty()
        && s.len() <= 253
        && name.len() <= 63
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

/// The length `text` decodes to, if it is standard base64.
fn decoded_len(text: &str) -> Option<u64> {
    use base64::Engine as _;
    let text: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(text).ok().map(|b| b.len() as u64)
}

/// Every problem of one VM document.
pub fn validate(vm: &Vm) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut bad = |field: &str, message: String| problems.push((field.to_string(), message));
    if vm.api_version != API_VERSION {
        bad("apiVersion", format!("unsupported apiVersion {:?}, expected {API_VERSION:?}", vm.api_version));
    }
    if vm.kind != KIND_VM {
        bad("kind", format!("unsupported kind {:?}, expected {KIND_VM:?}", vm.kind));
    }
    let name = &vm.metadata.name;
    if !is_dns_label(name) {
        bad(
            "metadata.name",
            format!("{name:?} is not a valid name: use at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"),
        );
    }
    for key in vm.metadata.labels.keys() {
        if !is_label_key(key) {
            bad(&format!("metadata.labels.{key}"), format!("invalid label key {key:?}"));
        }
    }
    let spec = &vm.spec;
    if let Err(e) = image_store::ImageReference::parse(&spec.image) {
        bad("spec.image", format!("invalid image reference: {e}"));
    }
    if !(MIN_CPUS..=MAX_CPUS).contains(&spec.cpus) {
        bad("spec.cpus", format!("{} vCPUs requested, must be between {MIN_CPUS} and {MAX_CPUS}", spec.cpus));
    }
    let memory = spec.memory.bytes();
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&memory) || !memory.is_multiple_of(1 << 20) {
        bad("spec.memory", format!("{} is not possible: memory must be whole MiB between 16Mi and 256Gi", spec.memory));
    }
    let disk = spec.disk_size.bytes();
    if !(MIN_DISK..=MAX_DISK).contains(&disk) {
        bad(
            "spec.diskSize",
            format!("{} is not possible: the root disk must be between 64Mi and 16Ti", spec.disk_size),
        );
    }
    let kernel = &spec.kernel;
    if kernel.image.is_some() && kernel.path.is_some() {
        bad("spec.kernel", "set either kernel.image or kernel.path, not both".into());
    }
    if let Some(path) = &kernel.path {
        if !path.is_absolute() {
            bad("spec.kernel.path", format!("{} must be an absolute path", path.display()));
        }
    }
    if let Some(cmdline) = &kernel.cmdline {
        if cmdline.contains(['\n', '\0']) {
            bad("spec.kernel.cmdline", "must not contain newlines or NUL bytes".into());
        }
    }
    for (field, list) in [("spec.command", &spec.command), ("spec.args", &spec.args)] {
        if list.as_ref().is_some_and(|l| l.iter().any(|a| a.contains('\0'))) {
            bad(field, "arguments must not contain NUL bytes".into());
        }
    }
    if spec.command.as_ref().is_some_and(|c| c.is_empty()) {
        bad("spec.command", "an empty command cannot run: omit it to use the image's entrypoint".into());
    }
    let mut env_names = HashSet::new();
    for (i, var) in spec.env.iter().enumerate() {
        if !is_env_name(&var.name) {
            bad(&format!("spec.env[{i}].name"), format!("{:?} is not a valid variable name", var.name));
        } else if !env_names.insert(&var.name) {
            bad(&format!("spec.env[{i}].name"), format!("variable {:?} is set twice", var.name));
        }
    }
    let mut host_ports = HashSet::new();
    for (i, port) in spec.network.ports.iter().enumerate() {
        if !host_ports.insert((port.host_port, port.protocol)) {
            bad(&format!("spec.network.ports[{i}]"), format!("host port {} is forwarded twice", port.host_port));
        }
    }
    let mut destinations = HashSet::new();
    let mut inline_total: u64 = 0;
    for (i, copy) in spec.copy_files.iter().enumerate() {
        match (&copy.source, &copy.content_base64) {
            (Some(source), None) if !source.is_absolute() => bad(
                &format!("spec.copyFiles[{i}].source"),
                format!("{} must be an absolute host path", source.display()),
            ),
            (Some(_), None) => {}
            (None, Some(content)) => match decoded_len(content) {
                Some(len) if len > MAX_COPY_FILE_BYTES => bad(
                    &format!("spec.copyFiles[{i}].contentBase64"),
                    format!("{len} bytes, more than the {MAX_COPY_FILE_BYTES} one copied file may have"),
                ),
                Some(len) => inline_total += len,
                None => bad(&format!("spec.copyFiles[{i}].contentBase64"), "is not valid base64".into()),
            },
            _ => bad(&format!("spec.copyFiles[{i}]"), "give exactly one of source and contentBase64".into()),
        }
        if let Some(Err(message)) = copy.parsed_mode() {
            bad(&format!("spec.copyFiles[{i}].mode"), message);
        }
        if !copy.destination.starts_with('/') {
            bad(
                &format!("spec.copyFiles[{i}].destination"),
                format!("{:?} must be an absolute guest path", copy.destination),
            );
        } else if !destinations.insert(&copy.destination) {
            bad(&format!("spec.copyFiles[{i}].destination"), format!("{:?} is written twice", copy.destination));
        }
    }
    if inline_total > MAX_COPY_FILES_TOTAL_BYTES {
        bad(
            "spec.copyFiles",
            format!("{inline_total} bytes of content, more than the {MAX_COPY_FILES_TOTAL_BYTES} one VM may copy"),
        );
    }
    if spec.max_restarts.is_some() && spec.restart_policy != RestartPolicy::OnFailure {
        bad(
            "spec.maxRestarts",
            format!(
                "only applies with restartPolicy OnFailure, not {:?}: remove it or set restartPolicy: OnFailure",
                spec.restart_policy
            ),
        );
    }
    if let Some(schedule) = &spec.snapshots {
        if let Err(message) = schedule.interval() {
            bad("spec.snapshots.every", message);
        }
        if !(1..=SnapshotSchedule::MAX_KEEP).contains(&schedule.keep) {
            bad(
                "spec.snapshots.keep",
                format!("{} is not between 1 and {}", schedule.keep, SnapshotSchedule::MAX_KEEP),
            );
        }
    }
    if let Some(ssh) = &spec.ssh {
        for (i, key) in ssh.authorized_keys.iter().enumerate() {
            let mut parts = key.split_whitespace();
            let kind = parts.next().unwrap_or("");
            let known = ["ssh-ed25519", "ssh-rsa", "ssh-dss", "sk-ssh-ed25519@openssh.com"].contains(&kind)
                || kind.starts_with("ecdsa-sha2-")
                || kind.starts_with("sk-ecdsa-sha2-");
            if !known || !parts.next().is_some_and(|b| b.starts_with("AAAA")) {
                bad(
                    &format!("spec.ssh.authorizedKeys[{i}]"),
                    "not an OpenSSH public key (expected \"ssh-ed25519 AAAA... comment\")".into(),
                );
            }
        }
    }
    if let Some(k8s) = spec.bootstrap.as_ref().and_then(|b| b.kubernetes.as_ref()) {
        let f = "spec.bootstrap.kubernetes";
        let port_ok = k8s
            .api_server_endpoint
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok {
            bad(&format!("{f}.apiServerEndpoint"), format!("{:?} must be host:port", k8s.api_server_endpoint));
        }
        let hash_ok = k8s
            .ca_cert_hash
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !hash_ok {
            bad(
                &format!("{f}.caCertHash"),
                "must be sha256:<64 hex digits> (kubeadm's --discovery-token-ca-cert-hash)".into(),
            );
        }
        if k8s.token_secret_ref.is_some() == k8s.create_token {
            bad(f, "set exactly one of tokenSecretRef and createToken: true".into());
        }
    }
    problems
}
