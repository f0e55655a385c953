//! Store records to protocol messages. Secrets never leave the daemon: SSH keys and environment
//! values are redacted from the manifest, copied files are named but their content is not sent.

use super::proto;
use crate::api::{ConditionStatus, Vm, VmStatus};
use crate::store::{Event, SourceState, VmRecord};

/// What replaces a secret in returned manifests.
pub const REDACTED: &str = "<redacted>";

/// The manifest without its secrets.
pub fn redacted(vm: &Vm) -> Vm {
    let mut vm = vm.clone();
    for var in &mut vm.spec.env {
        var.value = REDACTED.to_string();
    }
    if let Some(ssh) = &mut vm.spec.ssh {
        for key in &mut ssh.authorized_keys {
            *key = REDACTED.to_string();
        }
    }
    vm
}

fn status(s: &VmStatus) -> proto::VmStatus {
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    proto::VmStatus {
        phase: format!("{:?}", s.phase),
        conditions: s
            .conditions
            .iter()
            .map(|c| proto::Condition {
                r#type: format!("{:?}", c.type_),
                status: match c.status {
                    ConditionStatus::True => "True",
                    ConditionStatus::False => "False",
                    ConditionStatus::Unknown => "Unknown",
                }
                .to_string(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                last_transition_time: c.last_transition_time.clone(),
            })
            .collect(),
        ip: text(&s.ip),
        mac: text(&s.mac),
        source_revision: text(&s.source_revision),
        observed_revision: text(&s.observed_revision),
        observed_generation: s.observed_generation,
        boot_time: text(&s.boot_time),
        restarts: s.restarts,
        last_error: text(&s.last_error),
        node_ref: text(&s.node_ref),
        last_exit: s.last_exit.as_ref().map(|e| proto::LastExit {
            code: e.code,
            crashed: e.crashed,
            message: e.message.clone(),
            finished_at: e.finished_at.clone(),
        }),
        unjailed: s.unjailed,
        boot: s.boot.as_ref().map(|b| b.mode.clone()).unwrap_or_default(),
        boot_template: s.boot.as_ref().map(|b| b.template.clone()).unwrap_or_default(),
        boot_reason: s.boot.as_ref().map(|b| b.reason.clone()).unwrap_or_default(),
    }
}

/// A VM record as the API shows it.
pub fn vm(record: &VmRecord) -> proto::Vm {
    proto::Vm {
        name: record.vm.metadata.name.clone(),
        owner: record.owner.clone(),
        generation: record.generation,
        manifest_yaml: serde_yaml::to_string(&redacted(&record.vm)).unwrap_or_default(),
        status: Some(status(&record.status)),
        image: record.vm.spec.image.clone(),
        deletion_requested: record.deletion_requested,
        state: format!("{:?}", record.vm.spec.state),
    }
}

/// An event as the API shows it.
pub fn event(seq: u64, e: &Event) -> proto::Event {
    proto::Event {
        seq,
        object: e.object.clone(),
        kind: format!("{:?}", e.kind),
        reason: e.reason.clone(),
        message: e.message.clone(),
        time: e.time.clone(),
    }
}

/// A source state as the API shows it.
pub fn source(s: &SourceState) -> proto::SourceStatus {
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    proto::SourceStatus {
        name: s.name.clone(),
        url: s.url.clone(),
        revision: text(&s.revision),
        last_sync: text(&s.last_sync),
        last_error: text(&s.last_error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted() {
        let yaml = "apiVersion: ignite.dev/v1alpha1\nkind: VM\nmetadata: {name: web}\nspec:\n  image: busybox\n  env: [{name: TOKEN, value: s3cret}]\n  ssh: {authorizedKeys: [\"ssh-ed25519 AAAAkey me\"]}\n";
        let vm = crate::api::parse_manifests("web.yaml", yaml).unwrap().remove(0);
        let shown = serde_yaml::to_string(&redacted(&vm)).unwrap();
        assert!(!shown.contains("s3cret") && !shown.contains("AAAAkey"), "{shown}");
        assert!(shown.contains("TOKEN"), "names stay: {shown}");
    }
}
