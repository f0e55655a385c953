//! The kubelet's command line, built as kubeadm's systemd drop-in (`10-kubeadm.conf`) builds it:
//!
//! ```text
//! EnvironmentFile=-/var/lib/kubelet/kubeadm-flags.env
//! EnvironmentFile=-/etc/default/kubelet
//! ExecStart=/usr/bin/kubelet --bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf \
//!   --kubeconfig=/etc/kubernetes/kubelet.conf --config=/var/lib/kubelet/config.yaml \
//!   $KUBELET_KUBEADM_ARGS $KUBELET_EXTRA_ARGS
//! ```
//!
//! Both files are optional; their variables are also the kubelet's environment, as under systemd.
//! Paths are guest paths resolved under a root directory (`/` in the guest), so tests run in a
//! temporary directory. When and how often the kubelet runs is [`crate::node`]'s business.

use std::io::{self, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;

use crate::envfile::{self, EnvFileError, QuoteError};
use crate::join::{under, JOINED_MARKER};
use crate::logfile;
use crate::spec::DEFAULT_PATH;

/// The kubelet configuration kubeadm's `kubelet-start` phase writes; the kubelet starts once it exists.
pub const KUBELET_CONFIG: &str = "/var/lib/kubelet/config.yaml";
/// The node's flags kubeadm writes (`KUBELET_KUBEADM_ARGS="..."`, with `nodeRegistration.kubeletExtraArgs`).
pub const KUBEADM_FLAGS: &str = "/var/lib/kubelet/kubeadm-flags.env";
/// The administrator's overrides (`KUBELET_EXTRA_ARGS=...`), as in the Debian/Ubuntu packages.
pub const KUBELET_DEFAULTS: &str = "/etc/default/kubelet";
/// The bootstrap kubeconfig kubeadm writes (it holds the bootstrap token).
pub const BOOTSTRAP_KUBECONFIG: &str = "/etc/kubernetes/bootstrap-kubelet.conf";
/// Where the kubelet's standard output and error go (appended; the console only gets start and exit lines).
pub const KUBELET_LOG: &str = "/var/log/kubelet.log";
/// The size at which [`KUBELET_LOG`] moves to `kubelet.log.1` and a new one starts.
pub const KUBELET_LOG_MAX: u64 = 10 << 20;

/// The kubelet could not be started.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// An environment file exists but cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file (guest path).
        path: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An environment file is not valid.
    #[error("{path}")]
    EnvFile {
        /// The file (guest path).
        path: &'static str,
        /// The line at fault.
        #[source]
        source: EnvFileError,
    },
    /// A variable used on the command line does not split into words.
    #[error("{path}: {name}")]
    Words {
        /// The file that set it (guest path).
        path: &'static str,
        /// The variable.
        name: &'static str,
        /// The quoting mistake.
        #[source]
        source: QuoteError,
    },
    /// The log file cannot be opened.
    #[error("cannot open the kubelet's log {KUBELET_LOG}")]
    Log(#[source] io::Error),
}

/// What the kubelet runs with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeletArgs {
    /// The arguments after the program.
    pub args: Vec<String>,
    /// The variables of the environment files, in order (a later one for the same name wins).
    pub env: Vec<(String, String)>,
}

/// Reads the environment files under `root` and builds the kubelet's arguments.
pub fn args(root: &Path) -> Result<KubeletArgs, KubeletError> {
    let mut env: Vec<(String, String, &'static str)> = Vec::new();
    for path in [KUBEADM_FLAGS, KUBELET_DEFAULTS] {
        let text = match std::fs::read_to_string(under(root, path)) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(KubeletError::Read { path, source }),
        };
        let vars = envfile::parse(&text).map_err(|source| KubeletError::EnvFile { path, source })?;
        env.extend(vars.into_iter().map(|(k, v)| (k, v, path)));
    }
    let mut args = vec![
        format!("--bootstrap-kubeconfig={BOOTSTRAP_KUBECONFIG}"),
        format!("--kubeconfig={JOINED_MARKER}"),
        format!("--config={KUBELET_CONFIG}"),
    ];
    for name in ["KUBELET_KUBEADM_ARGS", "KUBELET_EXTRA_ARGS"] {
        if let Some((_, value, path)) = env.iter().rev().find(|(k, _, _)| k == name) {
            args.extend(envfile::split_words(value).map_err(|source| KubeletError::Words { path, name, source })?);
        }
    }
    Ok(KubeletArgs { args, env: env.into_iter().map(|(k, v, _)| (k, v)).collect() })
}

/// The kubelet's command: `program` with `args`, in `root`, output appended to [`KUBELET_LOG`]
/// (created with its directory; at `log_max` bytes it moves to `kubelet.log.1`, see
/// [`crate::logfile`]) after a line saying which start this is; also the thread copying the
/// output into the log, which ends once the kubelet (and whatever inherited its output) is gone.
pub fn command(
    root: &Path,
    program: &Path,
    args: &KubeletArgs,
    start: u32,
    log_max: u64,
) -> Result<(Command, JoinHandle<()>), KubeletError> {
    let (mut log, copy) = logfile::capped(&under(root, KUBELET_LOG), log_max).map_err(KubeletError::Log)?;
    writeln!(log, "--- ignite-init: kubelet start {start}").map_err(KubeletError::Log)?;
    let stderr = log.try_clone().map_err(KubeletError::Log)?;
    let mut cmd = Command::new(program);
    cmd.args(&args.args).env_clear().env("PATH", DEFAULT_PATH).env("HOME", "/root");
    cmd.envs(args.env.iter().map(|(k, v)| (k, v))).current_dir(root);
    cmd.stdin(Stdio::null()).stdout(log).stderr(stderr);
    Ok((cmd, copy))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, path: &str, text: &str) {
        let path = under(root, path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    const BASE: [&str; 3] = [
        "--bootstrap-kubeconfig=/etc/kubernetes/bootstrap-kubelet.conf",
        "--kubeconfig=/etc/kubernetes/kubelet.conf",
        "--config=/var/lib/kubelet/config.yaml",
    ];

    #[test]
    fn the_drop_in_arguments_then_kubeadms_then_the_administrators() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(args(root.path()).unwrap().args, BASE, "both files are optional");
        write(root.path(), KUBEADM_FLAGS, "KUBELET_KUBEADM_ARGS=\"--provider-id=ignite://h/vm --node-ip=10.0.0.2\"\n");
        write(root.path(), KUBELET_DEFAULTS, "KUBELET_EXTRA_ARGS=--v=2 --node-labels='a=b,c=d'\n");
        let got = args(root.path()).unwrap();
        let mut expected: Vec<&str> = BASE.to_vec();
        expected.extend(["--provider-id=ignite://h/vm", "--node-ip=10.0.0.2", "--v=2", "--node-labels=a=b,c=d"]);
        assert_eq!(got.args, expected);
        assert_eq!(got.env[1], ("KUBELET_EXTRA_ARGS".into(), "--v=2 --node-labels=a=b,c=d".into()), "unquoted");
    }

    #[test]
    fn a_broken_file_is_an_error_naming_it_and_the_line() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), KUBEADM_FLAGS, "KUBELET_KUBEADM_ARGS=\"--provider-id=x\n");
        let err = args(root.path()).unwrap_err();
        assert!(matches!(err, KubeletError::EnvFile { path: KUBEADM_FLAGS, .. }), "{err:?}");
        let mut shown = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            shown.push_str(&format!(": {s}"));
            source = s.source();
        }
        assert_eq!(shown, "/var/lib/kubelet/kubeadm-flags.env: line 1: unterminated double quote");
        write(root.path(), KUBEADM_FLAGS, "KUBELET_KUBEADM_ARGS=ok\n");
        write(root.path(), KUBELET_DEFAULTS, "KUBELET_EXTRA_ARGS=\"--a='b\"\n");
        let err = args(root.path()).unwrap_err();
        assert!(
            matches!(err, KubeletError::Words { path: KUBELET_DEFAULTS, name: "KUBELET_EXTRA_ARGS", .. }),
            "{err:?}"
        );
    }
}
