//! `RecordingHostOps`: an in-memory [`HostOps`] that records every call, simulates loop and
//! device-mapper state, injects failures, and enforces the kernel's ordering rules (a device in use
//! cannot be removed), so tests can prove that creation, rollback, removal and recovery are correct
//! without root or device-mapper.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::hostops::{DmDevice, HostOps, HostOpsError, LoopDevice};

/// Kinds of host operation (for failure injection).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostOp {
    /// [`HostOps::loop_attach`].
    LoopAttach,
    /// [`HostOps::loop_detach`].
    LoopDetach,
    /// [`HostOps::loop_list`].
    LoopList,
    /// [`HostOps::dm_create`].
    DmCreate,
    /// [`HostOps::dm_remove`].
    DmRemove,
    /// [`HostOps::dm_list`].
    DmList,
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
    /// Create a dm device with a table, read-only or not.
    DmCreate(String, String, bool),
    /// Remove a dm device.
    DmRemove(String),
    /// List dm devices.
    DmList,
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
    /// name -> (table, read-only)
    dms: BTreeMap<String, (String, bool)>,
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

    /// Names of the existing dm devices.
    pub fn dm_names(&self) -> Vec<String> {
        self.lock().dms.keys().cloned().collect()
    }

    /// Simulates a leftover dm device (e.g. from a crashed process).
    pub fn insert_dm(&self, name: &str, table: &str) {
        self.lock().dms.insert(name.into(), (table.into(), false));
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

/// Whether any dm table mentions `device` (the fake's tables reference devices by path).
fn in_use(dms: &BTreeMap<String, (String, bool)>, device: &str) -> bool {
    dms.values().any(|(t, _)| t.split_whitespace().any(|w| w == device))
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
        if in_use(&s.dms, &device.display().to_string()) {
            return Err(refused(cmd, "device is busy (held by a dm device)"));
        }
        s.loops.remove(device).map(drop).ok_or_else(|| refused(cmd, "No such device or address"))
    }

    fn loop_list(&self) -> Result<Vec<LoopDevice>, HostOpsError> {
        drop(self.enter(HostOp::LoopList, HostCall::LoopList)?);
        Ok(self.loops())
    }

    fn dm_create(&self, name: &str, table: &str, read_only: bool) -> Result<PathBuf, HostOpsError> {
        let mut s = self.enter(HostOp::DmCreate, HostCall::DmCreate(name.into(), table.into(), read_only))?;
        let cmd = format!("dmsetup create {name}");
        if s.dms.contains_key(name) {
            return Err(refused(cmd, "Device or resource busy (name exists)"));
        }
        // Every device a table refers to must exist, as in the kernel.
        // The snapshot target opens its origin (first argument) read-only; every other device is
        // opened in the table's mode.
        let devices = table.lines().flat_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let snapshot = words.get(2) == Some(&"snapshot");
            words.into_iter().enumerate().skip(3).map(move |(i, w)| (w, snapshot && i == 3))
        });
        for (word, opened_ro) in devices.filter(|(w, _)| w.starts_with("/dev/")) {
            let found = match word.strip_prefix("/dev/mapper/") {
                Some(dm) => s.dms.get(dm).map(|(_, ro)| *ro),
                None => s.loops.get(Path::new(word)).map(|(_, ro)| *ro),
            };
            match found {
                None => return Err(refused(cmd, &format!("table refers to missing device {word}"))),
                // The kernel refuses to open a read-only device for a read-write table.
                Some(true) if !read_only && !opened_ro => {
                    return Err(refused(cmd, &format!("reload ioctl failed: Permission denied ({word} is read-only)")))
                }
                Some(_) => {}
            }
        }
        s.dms.insert(name.into(), (table.into(), read_only));
        Ok(Path::new("/dev/mapper").join(name))
    }

    fn dm_remove(&self, name: &str) -> Result<(), HostOpsError> {
        let mut s = self.enter(HostOp::DmRemove, HostCall::DmRemove(name.into()))?;
        let cmd = format!("dmsetup remove {name}");
        if in_use(&s.dms, &format!("/dev/mapper/{name}")) {
            return Err(refused(cmd, "Device or resource busy"));
        }
        s.dms.remove(name).map(drop).ok_or_else(|| refused(cmd, "No such device or address"))
    }

    fn dm_list(&self) -> Result<Vec<DmDevice>, HostOpsError> {
        let s = self.enter(HostOp::DmList, HostCall::DmList)?;
        Ok(s.dms.iter().map(|(n, (t, _))| DmDevice { name: n.clone(), table: t.clone() }).collect())
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
