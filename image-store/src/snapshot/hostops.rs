//! The privileged seam: every loop and ext4-resize operation a snapshotter performs goes through
//! [`HostOps`], so the snapshotters' logic can be tested with a recording fake (`RecordingHostOps`,
//! feature `test-utils`) on hosts without root. Device-mapper itself is driven by the
//! `devicemapper` crate (see [`super::DmSnapshotter`]); only its availability is asked here.
//!
//! [`LinuxHostOps`] runs the util-linux and e2fsprogs commands (no ioctls: the crate forbids
//! `unsafe`); a failing command becomes a [`HostOpsError`] carrying the command line and its stderr.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

/// A failed host operation.
#[derive(Debug, thiserror::Error)]
pub enum HostOpsError {
    /// The program could not be started (missing binary, permissions).
    #[error("could not run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// Why spawning failed.
        #[source]
        source: std::io::Error,
    },
    /// The program ran and reported failure.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Exit status as text (`exit status: 1`, `signal: 9`, or `injected` in the fake).
        status: String,
        /// The program's trimmed standard error.
        stderr: String,
    },
    /// The program succeeded but printed something we cannot interpret.
    #[error("unexpected output from `{command}`: {output}")]
    Output {
        /// The command line.
        command: String,
        /// What it printed (trimmed).
        output: String,
    },
}

impl HostOpsError {
    /// True when `resize2fs` refused because the filesystem must be checked first.
    pub fn asks_for_fsck(&self) -> bool {
        matches!(self, HostOpsError::Failed { stderr, .. } if stderr.contains("e2fsck -f"))
    }
}

/// A loop device and the file behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub device: PathBuf,
    /// The backing file as the kernel reports it (a ` (deleted)` suffix is stripped).
    pub backing_file: PathBuf,
}

/// Privileged host operations used by the snapshotters.
///
/// Implementations must be safe to call from several threads; none of these calls is atomic with
/// respect to another process, which is why the snapshotters re-discover state by listing rather than
/// trusting what they remember.
pub trait HostOps: Send + Sync {
    /// Whether device-mapper can be used on this host (`/dev/mapper/control` opens and answers).
    fn dm_available(&self) -> bool;
    /// Attaches `file` to a free loop device and returns its path (`/dev/loopN`).
    fn loop_attach(&self, file: &Path, read_only: bool) -> Result<PathBuf, HostOpsError>;
    /// Detaches a loop device.
    fn loop_detach(&self, device: &Path) -> Result<(), HostOpsError>;
    /// Lists every attached loop device with its backing file.
    fn loop_list(&self) -> Result<Vec<LoopDevice>, HostOpsError>;
    /// Grows the ext4 filesystem in `target` (file or block device) to fill it (`resize2fs`).
    fn resize2fs(&self, target: &Path) -> Result<(), HostOpsError>;
    /// Checks and repairs the ext4 filesystem in `target` (`e2fsck -fy`).
    fn e2fsck(&self, target: &Path) -> Result<(), HostOpsError>;
}

/// Grows the ext4 in `target` to its full size, running `e2fsck -fy` first only when `resize2fs`
/// asks for it (a base made by `mkfs.ext4 -d` and never mounted does not need it).
pub fn grow_ext4(ops: &dyn HostOps, target: &Path) -> Result<(), HostOpsError> {
    match ops.resize2fs(target) {
        Err(e) if e.asks_for_fsck() => {
            tracing::debug!(target = %target.display(), "resize2fs wants a check first; running e2fsck -fy");
            ops.e2fsck(target)?;
            ops.resize2fs(target)
        }
        other => other,
    }
}

/// [`HostOps`] on Linux through `losetup`, `resize2fs` and `e2fsck`.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinuxHostOps;

/// Runs a command; `ok_codes` lists the exit codes that count as success.
fn run(program: &str, args: &[&str], ok_codes: &[i32]) -> Result<String, HostOpsError> {
    let command = std::iter::once(program).chain(args.iter().copied()).collect::<Vec<_>>().join(" ");
    tracing::debug!(%command, "host op");
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| HostOpsError::Spawn { command: command.clone(), source })?;
    match out.status.code() {
        Some(code) if ok_codes.contains(&code) => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        _ => Err(HostOpsError::Failed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
    }
}

fn path_arg(p: &Path) -> &str {
    // Store paths are built from UTF-8 components; a non-UTF-8 path would be a bug upstream, and the
    // lossy fallback still yields a command that fails with a clear message rather than a panic.
    p.to_str().unwrap_or("<non-utf8 path>")
}

#[derive(Deserialize)]
struct LosetupJson {
    loopdevices: Vec<LosetupEntry>,
}

#[derive(Deserialize)]
struct LosetupEntry {
    name: String,
    #[serde(rename = "back-file")]
    back_file: Option<String>,
}

/// Parses `losetup -J --list --output NAME,BACK-FILE` (empty output means no devices).
pub(crate) fn parse_losetup_json(text: &str) -> Result<Vec<LoopDevice>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let parsed: LosetupJson = serde_json::from_str(text).map_err(|e| e.to_string())?;
    Ok(parsed
        .loopdevices
        .into_iter()
        .map(|e| {
            let back = e.back_file.unwrap_or_default();
            // The kernel appends " (deleted)" when the file was unlinked while attached; recovery must
            // still recognise such a device as ours.
            let back = back.strip_suffix(" (deleted)").unwrap_or(&back).to_string();
            LoopDevice { device: PathBuf::from(e.name), backing_file: PathBuf::from(back) }
        })
        .collect())
}

impl HostOps for LinuxHostOps {
    fn dm_available(&self) -> bool {
        // The node can exist without the driver (udev or `dmsetup mknodes` made it on a kernel
        // without device-mapper); opening it fails with ENODEV then, so opening it and asking for
        // the driver's version is the real test.
        devicemapper::DM::new().is_ok()
    }

    fn loop_attach(&self, file: &Path, read_only: bool) -> Result<PathBuf, HostOpsError> {
        let mut args = vec!["--find", "--show"];
        if read_only {
            args.push("--read-only");
        }
        args.push(path_arg(file));
        let out = run("losetup", &args, &[0])?;
        let dev = out.trim();
        if !dev.starts_with("/dev/") {
            return Err(HostOpsError::Output { command: format!("losetup {}", args.join(" ")), output: dev.into() });
        }
        Ok(PathBuf::from(dev))
    }

    fn loop_detach(&self, device: &Path) -> Result<(), HostOpsError> {
        run("losetup", &["--detach", path_arg(device)], &[0]).map(drop)
    }

    fn loop_list(&self) -> Result<Vec<LoopDevice>, HostOpsError> {
        let args = ["-J", "--list", "--output", "NAME,BACK-FILE"];
        let out = run("losetup", &args, &[0])?;
        parse_losetup_json(&out)
            .map_err(|e| HostOpsError::Output { command: format!("losetup {}", args.join(" ")), output: e })
    }

    fn resize2fs(&self, target: &Path) -> Result<(), HostOpsError> {
        run("resize2fs", &[path_arg(target)], &[0]).map(drop)
    }

    fn e2fsck(&self, target: &Path) -> Result<(), HostOpsError> {
        // 0 = clean, 1 = errors corrected, 2 = corrected (reboot advised, irrelevant for an unmounted
        // image); 4 and above mean errors were left, which must fail the disk creation.
        run("e2fsck", &["-fy", path_arg(target)], &[0, 1, 2]).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_losetup_json_with_deleted_files() {
        let text = r#"{"loopdevices": [{"name": "/dev/loop0", "back-file": "/s/a (deleted)"},
            {"name": "/dev/loop1", "back-file": "/s/b"}, {"name": "/dev/loop2", "back-file": null}]}"#;
        let devs = parse_losetup_json(text).unwrap();
        assert_eq!(devs[0].backing_file, Path::new("/s/a"));
        assert_eq!(devs[1].device, Path::new("/dev/loop1"));
        assert_eq!(devs[2].backing_file, Path::new(""));
        assert!(parse_losetup_json("").unwrap().is_empty());
        assert!(parse_losetup_json("garbage").is_err());
    }

    #[test]
    fn fsck_request_is_recognised() {
        let e = HostOpsError::Failed {
            command: "resize2fs x".into(),
            status: "exit status: 1".into(),
            stderr: "Please run 'e2fsck -f x' first.".into(),
        };
        assert!(e.asks_for_fsck());
    }
}
