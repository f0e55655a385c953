//! `RecordingHostOps`: an in-memory [`HostOps`] that records every call, simulates loop devices and
//! injects failures, so tests can prove that creation, rollback, removal and recovery are correct
//! without root. Whether device-mapper is "available" is a setting (the devicemapper snapshotter
//! itself has no fake: its tests run on a real kernel, inside our own guests).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::hostops::{HostOps, HostOpsError, LoopDevice};

/// Kinds of host operation (for failure injection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostOp {
    /// [`HostOps::loop_attach`].
    LoopAttach,
    /// [`HostOps::loop_detach`].
    LoopDetach,
    /// [`HostOps::loop_list`].
    LoopList,
    /// [`HostOps::resize2fs`].
    Resize2fs,
    /// [`HostOps::e2fsck`].
    E2fsck,
}

/// One recorded call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostCall {
    /// Attach `file`, read-only or not.
    LoopAttach(PathBuf, bool),
    /// Detach a device.
    LoopDetach(PathBuf),
    /// List loop devices.
    LoopList,
    /// Grow an ext4.
    Resize2fs(PathBuf),
    /// Check an ext4.
    E2fsck(PathBuf),
}

#[derive(Default)]
struct State {
    calls: Vec<HostCall>,
    /// device -> (backing file, read-only)
    loops: BTreeMap<PathBuf, (PathBuf, bool)>,
    next_loop: u32,
    counts: HashMap<HostOp, usize>,
    fail: Vec<(HostOp, usize)>,
    needs_fsck: bool,
}

/// A recording, state-simulating fake of [`HostOps`].
#[derive(Default)]
pub struct RecordingHostOps {
    dm: bool,
    state: Mutex<State>,
}

fn injected(op: HostOp) -> HostOpsError {
    HostOpsError::Failed {
        command: format!("fake {op:?}"),
        status: "injected".into(),
        stderr: "injected failure".into(),
    }
}

fn refused(command: String, stderr: &str) -> HostOpsError {
    HostOpsError::Failed { command, status: "exit status: 1".into(), stderr: stderr.into() }
}

impl RecordingHostOps {
    /// A fake host where device-mapper is available.
    pub fn with_dm() -> Self {
        RecordingHostOps { dm: true, state: Mutex::default() }
    }

    /// A fake host without device-mapper.
    pub fn without_dm() -> Self {
        RecordingHostOps::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panicking test thread must not hide the recorded state from the assertions that follow.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the `nth` (1-based, counted from now) call of `op` fail once; can be called several
    /// times to inject several failures.
    pub fn fail_on(&self, op: HostOp, nth: usize) {
        let mut s = self.lock();
        let done = s.counts.get(&op).copied().unwrap_or(0);
        s.fail.push((op, done + nth));
    }

    /// Makes the next `resize2fs` refuse until `e2fsck` has run (as for a mounted-then-unchecked fs).
    pub fn require_fsck(&self) {
        self.lock().needs_fsck = true;
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<HostCall> {
        self.lock().calls.clone()
    }

    /// Forgets the recorded calls (state is kept).
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// Attached loop devices (device, backing file).
    pub fn loops(&self) -> Vec<LoopDevice> {
        self.lock().loops.iter().map(|(d, (b, _))| LoopDevice { device: d.clone(), backing_file: b.clone() }).collect()
    }

    /// Simulates a leftover loop device backed by `file`; returns its path.
    pub fn insert_loop(&self, file: &Path) -> PathBuf {
        let mut s = self.lock();
        let dev = PathBuf::from(format!("/dev/loop{}", s.next_loop));
        s.next_loop += 1;
        s.loops.insert(dev.clone(), (file.to_path_buf(), false));
        dev
    }

    /// Records the call and decides whether it is the injected failure.
    fn enter(&self, op: HostOp, call: HostCall) -> Result<std::sync::MutexGuard<'_, State>, HostOpsError> {
        let mut s = self.lock();
        s.calls.push(call);
        let n = s.counts.entry(op).or_default();
        *n += 1;
        let n = *n;
        if let Some(i) = s.fail.iter().position(|f| *f == (op, n)) {
            s.fail.remove(i);
            return Err(injected(op));
        }
        Ok(s)
    }
}

impl HostOps for RecordingHostOps {
    fn dm_available(&self) -> bool {
        self.dm
    }

    fn loop_attach(&self, file: &Path, read_only: bool) -> Result<PathBuf, HostOpsError> {
        let mut s = self.enter(HostOp::LoopAttach, HostCall::LoopAttach(file.into(), read_only))?;
        if !file.exists() {
            return Err(refused(format!("losetup {}", file.display()), "No such file or directory"));
        }
        let dev = PathBuf::from(format!("/dev/loop{}", s.next_loop));
        s.next_loop += 1;
        s.loops.insert(dev.clone(), (file.into(), read_only));
        Ok(dev)
    }

    fn loop_detach(&self, device: &Path) -> Result<(), HostOpsError> {
        let mut s = self.enter(HostOp::LoopDetach, HostCall::LoopDetach(device.into()))?;
        let cmd = format!("losetup --detach {}", device.display());
        s.loops.remove(device).map(drop).ok_or_else(|| refused(cmd, "No such device or address"))
    }

    fn loop_list(&self) -> Result<Vec<LoopDevice>, HostOpsError> {
        drop(self.enter(HostOp::LoopList, HostCall::LoopList)?);
        Ok(self.loops())
    }

    fn resize2fs(&self, target: &Path) -> Result<(), HostOpsError> {
        let s = self.enter(HostOp::Resize2fs, HostCall::Resize2fs(target.into()))?;
        if s.needs_fsck {
            let t = target.display();
            return Err(refused(format!("resize2fs {t}"), &format!("Please run 'e2fsck -f {t}' first.")));
        }
        Ok(())
    }

    fn e2fsck(&self, target: &Path) -> Result<(), HostOpsError> {
        let mut s = self.enter(HostOp::E2fsck, HostCall::E2fsck(target.into()))?;
        s.needs_fsck = false;
        Ok(())
    }
}
