//! FICLONE clones for the `reflink` snapshotter, through `cp --reflink=always` (the crate forbids
//! `unsafe`, so no direct ioctl). A clone shares every extent with the base: creation costs
//! metadata only, and the filesystem copies blocks on write.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{HostOpsError, SnapshotError};

/// Clones `base` to `dst` with FICLONE; never falls back to copying, so a disk from this snapshotter
/// always shares the base's extents.
pub fn reflink_file(vm_id: &str, base: &Path, dst: &Path) -> Result<(), SnapshotError> {
    let command = format!("cp --reflink=always {} {}", base.display(), dst.display());
    let out = Command::new("cp").arg("--reflink=always").arg(base).arg(dst).output().map_err(|source| {
        SnapshotError::Host {
            vm_id: vm_id.into(),
            action: "reflink",
            device: dst.display().to_string(),
            source: Box::new(HostOpsError::Spawn { command: command.clone(), source }),
        }
    })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    // GNU cp says "failed to clone" when the FICLONE ioctl itself is refused (EOPNOTSUPP on
    // ext4/tmpfs, EXDEV across filesystems); anything else (missing base, full disk) is reported as is.
    if stderr.contains("failed to clone") {
        return Err(SnapshotError::ReflinkUnsupported {
            vm_id: vm_id.into(),
            base: base.into(),
            path: dst.into(),
            detail: stderr,
        });
    }
    Err(SnapshotError::Host {
        vm_id: vm_id.into(),
        action: "reflink",
        device: dst.display().to_string(),
        source: Box::new(HostOpsError::Failed { command, status: out.status.to_string(), stderr }),
    })
}

/// Whether files in `dir` can be cloned: creates `dir` if needed, clones a small probe file inside
/// it, and removes both files again (also when the probe fails).
pub fn reflink_supported(dir: &Path) -> bool {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    if std::fs::create_dir_all(dir).is_err() {
        return false;
    }
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let src = dir.join(format!(".reflink-probe-{}-{n}", std::process::id()));
    let dst = dir.join(format!(".reflink-probe-{}-{n}.clone", std::process::id()));
    let ok = std::fs::write(&src, [0x5a; 4096]).is_ok() && reflink_file("*", &src, &dst).is_ok();
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);
    tracing::debug!(dir = %dir.display(), supported = ok, "reflink probe");
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_filesystem_gives_a_clear_error_or_works() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"data").unwrap();
        match reflink_file("vm1", &a, &b) {
            Ok(()) => assert!(reflink_supported(dir.path())),
            Err(e) => {
                assert!(!reflink_supported(dir.path()));
                let text = e.to_string();
                assert!(matches!(e, SnapshotError::ReflinkUnsupported { .. }), "{text}");
                assert!(text.contains("vm1") && text.contains("FICLONE"), "{text}");
            }
        }
        // The probe leaves nothing behind.
        let expected = 1 + usize::from(b.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), expected);
    }

    #[test]
    fn missing_base_is_not_reported_as_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let e = reflink_file("vm1", &dir.path().join("none"), &dir.path().join("b")).unwrap_err();
        assert!(matches!(e, SnapshotError::Host { .. }), "{e}");
    }
}
