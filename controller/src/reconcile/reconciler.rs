//! The reconciler: workers take VM names from the [`WorkQueue`], compare the store with the host
//! ([`decide`]) and take steps through the [`Runtime`] until the VM settles, writing status and
//! events as they go. Errors requeue the object with per-object exponential backoff.
//!
//! Guarantees: a name is handled by one worker at a time; every step is idempotent, so a crash of
//! the daemon between two steps is repaired by the next pass; resources of objects that are gone
//! from the store are found through [`Runtime::list`] and removed.

use guest_api::error_chain;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, info_span, warn};

use crate::api::{ConditionType, LastExit, Phase};
use crate::store::{Event, EventKind, Store, StoreError, VmRecord};

use super::decide::{decide, DesiredView, Settled, Step};
use super::queue::{Backoff, WorkQueue};
use super::runtime::{Actual, Exit, Runtime, RuntimeError};
use crate::api::conditions::{self, now_rfc3339, Summary};

/// Annotation that suspends reconciliation of one VM while set to `"true"`.
pub const SUSPEND_ANNOTATION: &str = "ignite.dev/suspend";

/// Tunables of the reconciler.
#[derive(Clone, Debug)]
pub struct ReconcilerConfig {
    /// Worker threads: how many VMs are worked on at once.
    pub workers: usize,
    /// Grace period of a graceful stop before the VM is killed.
    pub stop_grace: Duration,
    /// First retry delay after a failure; doubles per consecutive failure.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// How often a settled VM is checked again (drift detection).
    pub resync: Duration,
    /// A VM that stays up this long is no longer crash-looping: its restart backoff resets.
    pub stable_after: Duration,
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        ReconcilerConfig {
            workers: 4,
            stop_grace: Duration::from_secs(10),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            resync: Duration::from_secs(60),
            stable_after: Duration::from_secs(60),
        }
    }
}

/// Why one reconcile pass failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The store could not be read or written.
    #[error("store")]
    Store(#[from] StoreError),
    /// A host step failed.
    #[error("{step} VM {name:?}: {source}")]
    Runtime {
        /// The VM.
        name: String,
        /// Which step (`create`, `start`, ...).
        step: &'static str,
        /// What failed.
        #[source]
        source: RuntimeError,
    },
}

/// What a pass ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The VM is where it should be (or gone).
    Settled,
    /// Look again after this delay (restart backoff, suspended objects are not requeued).
    RequeueAfter(Duration),
    /// Reconciliation of this VM is suspended.
    Suspended,
}

struct Context {
    store: Store,
    runtime: Arc<dyn Runtime>,
    queue: Arc<WorkQueue>,
    backoff: Backoff,
    restart_backoff: Backoff,
    restart_not_before: Mutex<HashMap<String, Instant>>,
    suspended: Mutex<HashSet<String>>,
    paused: AtomicBool,
    config: ReconcilerConfig,
}

/// The reconciler; cheap to clone (shared context).
#[derive(Clone)]
pub struct Reconciler {
    ctx: Arc<Context>,
}

impl Reconciler {
    /// A reconciler over `store` driving `runtime`.
    pub fn new(store: Store, runtime: Arc<dyn Runtime>, config: ReconcilerConfig) -> Self {
        let ctx = Context {
            store,
            runtime,
            queue: Arc::new(WorkQueue::new()),
            backoff: Backoff::new(config.backoff_base, config.backoff_max),
            restart_backoff: Backoff::new(config.backoff_base, config.backoff_max),
            restart_not_before: Mutex::new(HashMap::new()),
            suspended: Mutex::new(HashSet::new()),
            paused: AtomicBool::new(false),
            config,
        };
        Reconciler { ctx: Arc::new(ctx) }
    }

    /// The work queue: add a name to have it reconciled.
    pub fn queue(&self) -> &Arc<WorkQueue> {
        &self.ctx.queue
    }

    /// Queues every VM in the store and every VM with resources on the host (orphans included).
    pub fn enqueue_all(&self) -> Result<usize, ReconcileError> {
        let mut names: HashSet<String> = self.ctx.store.list_vms()?.into_iter().map(|r| r.vm.metadata.name).collect();
        match self.ctx.runtime.list() {
            Ok(on_host) => names.extend(on_host),
            Err(err) => warn!(error = %err, "cannot list VMs on the host; orphans are not collected this time"),
        }
        for name in &names {
            self.ctx.queue.add(name);
        }
        Ok(names.len())
    }

    /// Stops taking steps for `name` until [`Reconciler::resume`].
    pub fn suspend(&self, name: &str) {
        self.ctx.suspended.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
    }

    /// Resumes reconciliation of `name` and queues it.
    pub fn resume(&self, name: &str) {
        self.ctx.suspended.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        self.ctx.queue.add(name);
    }

    /// Suspends (true) or resumes (false) every VM: workers keep draining the queue without acting.
    pub fn set_paused(&self, paused: bool) {
        self.ctx.paused.store(paused, Ordering::SeqCst);
        if !paused {
            let _ = self.enqueue_all();
        }
    }

    /// Starts the worker threads. They stop when the queue is shut down.
    pub fn spawn_workers(&self) -> Vec<JoinHandle<()>> {
        (0..self.ctx.config.workers.max(1))
            .map(|i| {
                let this = self.clone();
                std::thread::Builder::new()
                    .name(format!("reconcile-{i}"))
                    .spawn(move || this.worker())
                    .expect("spawning a reconcile worker thread")
            })
            .collect()
    }

    fn worker(&self) {
        while let Some(name) = self.ctx.queue.get() {
            let result = self.reconcile(&name);
            self.handle_result(&name, result);
            self.ctx.queue.done(&name);
        }
    }

    /// The error policy: failures back off per object, settled objects resync periodically.
    fn handle_result(&self, name: &str, result: Result<Outcome, ReconcileError>) {
        match result {
            Ok(Outcome::Settled) => {
                self.ctx.backoff.reset(name);
                if self.ctx.store.get_vm(name).ok().flatten().is_some() {
                    self.ctx.queue.add_after(name, self.ctx.config.resync);
                }
            }
            Ok(Outcome::RequeueAfter(delay)) => self.ctx.queue.add_after(name, delay),
            Ok(Outcome::Suspended) => {}
            Err(err) => {
                let delay = self.ctx.backoff.next(name);
                warn!(vm = name, error = %error_chain(&err), retry_in = ?delay, "reconcile failed");
                self.ctx.queue.add_after(name, delay);
            }
        }
    }

    /// One pass for `name`: steps until the VM settles, a step fails, or a delay is needed.
    pub fn reconcile(&self, name: &str) -> Result<Outcome, ReconcileError> {
        let span = info_span!("reconcile", vm = name);
        let _enter = span.enter();
        for _ in 0..6 {
            let record = self.ctx.store.get_vm(name)?;
            if self.is_suspended(name, record.as_ref()) {
                debug!("suspended");
                return Ok(Outcome::Suspended);
            }
            let actual = self.ctx.runtime.inspect(name).map_err(|e| runtime_err(name, "inspect", e))?;
            let desired = record.as_ref().filter(|r| !r.deletion_requested).map(desired_view);
            let step = decide(desired.as_ref(), &actual);
            debug!(?step, "decided");
            match self.take(name, record.as_ref(), &actual, step)? {
                None => continue,
                Some(outcome) => return Ok(outcome),
            }
        }
        Ok(Outcome::RequeueAfter(Duration::ZERO))
    }

    fn is_suspended(&self, name: &str, record: Option<&VmRecord>) -> bool {
        self.ctx.paused.load(Ordering::SeqCst)
            || self.ctx.suspended.lock().unwrap_or_else(|p| p.into_inner()).contains(name)
            || record.and_then(|r| r.vm.metadata.annotations.get(SUSPEND_ANNOTATION)).is_some_and(|v| v == "true")
    }

    /// Takes one step. `Ok(None)` means "look again now".
    fn take(
        &self,
        name: &str,
        record: Option<&VmRecord>,
        actual: &Actual,
        step: Step,
    ) -> Result<Option<Outcome>, ReconcileError> {
        let rt = &self.ctx.runtime;
        match step {
            Step::Settled(settled) => return self.settle(name, record, settled).map(Some),
            Step::Delete => {
                if record.is_some() {
                    self.summarize(name, Summary::new(Phase::Deleting, ConditionType::Reconciling, "Deleting", ""))?;
                }
                rt.destroy(name, false).map_err(|e| runtime_err(name, "delete", e))?;
                if record.is_some() {
                    self.ctx.store.remove_vm(name)?;
                }
                self.forget(name);
                self.event(name, EventKind::Normal, "Deleted", "the VM and everything it owned were removed");
                info!("deleted");
            }
            Step::Create | Step::Recreate => {
                let record = record.expect("decide creates only declared VMs");
                if step == Step::Recreate {
                    let msg = format!("spec changed (generation {}): recreating", record.generation);
                    self.event(name, EventKind::Normal, "Recreating", &msg);
                    if actual.running {
                        rt.stop(name, self.ctx.config.stop_grace).map_err(|e| runtime_err(name, "stop", e))?;
                    }
                    rt.destroy(name, true).map_err(|e| runtime_err(name, "recreate", e))?;
                }
                let what = format!("preparing image {}, disk and network", record.vm.spec.image);
                self.summarize(name, Summary::new(Phase::Creating, ConditionType::Reconciling, "Creating", what))?;
                let fingerprint = record.vm.spec.fingerprint();
                let prepared =
                    rt.create(&record.vm, &fingerprint).map_err(|e| self.failed(name, "create", Phase::Failed, e))?;
                self.ctx.store.update_status(name, |s| {
                    s.ip = prepared.ip.clone();
                    s.mac = prepared.mac.clone();
                })?;
                let ip = prepared.ip.as_deref().unwrap_or("no address");
                self.event(name, EventKind::Normal, "Created", &format!("disk and network ready ({ip})"));
            }
            Step::Start { restart } => {
                let record = record.expect("decide starts only declared VMs");
                if restart {
                    if let Some(wait) = self.restart_wait(name) {
                        let msg = format!("restarting in {}s (backoff)", wait.as_secs().max(1));
                        self.summarize(name, Summary::new(Phase::Failed, ConditionType::Reconciling, "BackOff", msg))?;
                        return Ok(Some(Outcome::RequeueAfter(wait)));
                    }
                    let detail = actual.last_exit.as_ref().map(|e| e.detail.clone()).unwrap_or_default();
                    self.event(name, EventKind::Warning, "Restarting", &format!("main process ended ({detail})"));
                }
                let started = rt.start(&record.vm).map_err(|e| self.failed(name, "start", Phase::Failed, e))?;
                let generation = record.generation;
                self.ctx.store.update_status(name, |s| {
                    s.boot_time = Some(now_rfc3339());
                    s.observed_generation = generation;
                    s.observed_revision = s.source_revision.clone();
                    s.last_error = None;
                    s.last_exit = None;
                    // Counted from the last deliberate start: what `maxRestarts` limits.
                    s.restarts = if restart { s.restarts + 1 } else { 0 };
                    s.unjailed = !started.jailed;
                    s.boot = Some(started.boot.clone());
                })?;
                let reason = if restart { "Restarted" } else { "Started" };
                let template = &started.boot.template;
                let how = if template.is_empty() { String::new() } else { format!(", warm from template {template}") };
                self.event(name, EventKind::Normal, reason, &format!("VMM process {}{how}", started.pid));
                if !started.boot.reason.is_empty() {
                    self.event(name, EventKind::Warning, "ColdBoot", &started.boot.reason);
                }
                if !started.jailed {
                    self.event(name, EventKind::Warning, "Unjailed", "the VMM runs without a jail (daemon --no-jail)");
                }
                info!(pid = started.pid, restart, "started");
            }
            Step::Stop => {
                self.summarize(name, Summary::new(Phase::Running, ConditionType::Reconciling, "Stopping", ""))?;
                rt.stop(name, self.ctx.config.stop_grace).map_err(|e| runtime_err(name, "stop", e))?;
                self.event(name, EventKind::Normal, "Stopped", "stopped as declared (state: Stopped)");
            }
            Step::ForgetExit => {
                rt.forget_exit(name).map_err(|e| runtime_err(name, "stop", e))?;
            }
        }
        Ok(None)
    }

    fn settle(&self, name: &str, record: Option<&VmRecord>, settled: Settled) -> Result<Outcome, ReconcileError> {
        let summary = match &settled {
            Settled::Gone => {
                // Marked for deletion with nothing on the host (its create never got far, or a
                // crash came after the destroy): only the record is left to remove.
                if record.is_some() {
                    self.ctx.store.remove_vm(name)?;
                    self.forget(name);
                    self.event(name, EventKind::Normal, "Deleted", "nothing was left on the host");
                    info!("deleted");
                }
                return Ok(Outcome::Settled);
            }
            Settled::Running => Summary::new(Phase::Running, ConditionType::Ready, "Running", ""),
            Settled::Stopped => Summary::new(Phase::Stopped, ConditionType::Ready, "Stopped", "stopped as declared"),
            Settled::Completed(exit) if exit.succeeded() => {
                Summary::new(Phase::Stopped, ConditionType::Ready, "Completed", exit.detail.clone())
            }
            Settled::Completed(exit) => {
                Summary::new(Phase::Failed, ConditionType::Stalled, "Exited", exit.detail.clone())
            }
        };
        if let (Settled::Completed(exit), Some(record)) = (&settled, record) {
            self.record_last_exit(name, record, exit)?;
        }
        if settled == Settled::Running && record.is_some_and(|r| self.up_for(r) >= self.ctx.config.stable_after) {
            self.ctx.restart_backoff.reset(name);
        }
        if let Some(record) = record {
            // Settled: the host reflects this generation, also for a VM kept stopped or one that
            // completed (a state change needs no new process). A crash between starting the
            // process and recording it leaves these unset for a running one.
            let running = settled == Settled::Running;
            if record.status.observed_generation != record.generation || (running && record.status.boot_time.is_none())
            {
                let generation = record.generation;
                self.ctx.store.update_status(name, |s| {
                    s.observed_generation = generation;
                    s.observed_revision = s.source_revision.clone();
                    if running {
                        s.boot_time.get_or_insert_with(now_rfc3339);
                    }
                })?;
            }
        }
        let changed = self.summarize(name, summary.clone())?;
        if changed {
            info!(reason = %summary.reason, "settled");
        }
        if changed && record.is_some() {
            let kind = if summary.condition == ConditionType::Stalled { EventKind::Warning } else { EventKind::Normal };
            self.event(name, kind, &summary.reason, &summary.message);
        }
        Ok(Outcome::Settled)
    }

    /// Writes how the VM ended for good into its status (once: a resync keeps the first time).
    fn record_last_exit(&self, name: &str, record: &VmRecord, exit: &Exit) -> Result<(), ReconcileError> {
        let same =
            |l: &LastExit| (l.code, l.crashed, l.message.as_str()) == (exit.code, exit.crashed, exit.detail.as_str());
        if record.status.last_exit.as_ref().is_some_and(same) {
            return Ok(());
        }
        let last = LastExit {
            code: exit.code,
            crashed: exit.crashed,
            message: exit.detail.clone(),
            finished_at: now_rfc3339(),
        };
        match self.ctx.store.update_status(name, |s| s.last_exit = Some(last.clone())) {
            Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// `Some(wait)` while a crash-looping VM must wait before its next restart: the first
    /// restart is immediate, later ones back off exponentially until the VM stays up for
    /// [`ReconcilerConfig::stable_after`].
    fn restart_wait(&self, name: &str) -> Option<Duration> {
        let mut not_before = self.ctx.restart_not_before.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(at) = not_before.remove(name) {
            return (at > now).then(|| {
                not_before.insert(name.to_string(), at);
                at - now
            });
        }
        if self.ctx.restart_backoff.failures(name) == 0 {
            self.ctx.restart_backoff.next(name);
            return None;
        }
        let delay = self.ctx.restart_backoff.next(name);
        not_before.insert(name.to_string(), now + delay);
        Some(delay)
    }

    /// How long the VM's current process has been running, from its status.
    fn up_for(&self, record: &VmRecord) -> Duration {
        record
            .status
            .boot_time
            .as_deref()
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default()
    }

    fn forget(&self, name: &str) {
        self.ctx.backoff.reset(name);
        self.ctx.restart_backoff.reset(name);
        self.ctx.restart_not_before.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }

    /// Records a failed step in the status (Stalled if permanent, else Reconciling) and an event.
    fn failed(&self, name: &str, step: &'static str, phase: Phase, err: RuntimeError) -> ReconcileError {
        let condition = if err.permanent { ConditionType::Stalled } else { ConditionType::Reconciling };
        let summary = Summary::new(phase, condition, err.reason, err.message.clone());
        let message = err.message.clone();
        if let Err(store_err) = self.ctx.store.update_status(name, |s| {
            conditions::apply(s, &summary, &now_rfc3339());
            s.last_error = Some(message.clone());
        }) {
            warn!(error = %store_err, "cannot record the failure in the status");
        }
        self.event(name, EventKind::Warning, err.reason, &err.message);
        runtime_err(name, step, err)
    }

    /// Writes the summary into the status; true if the visible condition changed to it (the store
    /// keeps a Ready for a spec replaced meanwhile as Progressing: no change then).
    fn summarize(&self, name: &str, summary: Summary) -> Result<bool, ReconcileError> {
        let mut changed = false;
        match self.ctx.store.update_status(name, |s| {
            changed = conditions::apply(s, &summary, &now_rfc3339());
            if summary.condition == ConditionType::Ready {
                s.last_error = None;
            }
        }) {
            Ok(record) => {
                Ok(changed && conditions::current(&record.status).is_some_and(|(c, _)| c == summary.condition))
            }
            Err(StoreError::NotFound { .. }) => Ok(false),
            Err(err) => Err(err.into()),
        }
    }

    fn event(&self, name: &str, kind: EventKind, reason: &str, message: &str) {
        let event = Event {
            object: name.to_string(),
            kind,
            reason: reason.to_string(),
            message: message.to_string(),
            time: now_rfc3339(),
        };
        if let Err(err) = self.ctx.store.append_event(&event) {
            warn!(error = %err, reason, "cannot record an event");
        }
    }
}

fn desired_view(record: &VmRecord) -> DesiredView {
    DesiredView {
        fingerprint: record.vm.spec.fingerprint(),
        state: record.vm.spec.state,
        restart_policy: record.vm.spec.restart_policy,
        max_restarts: record.vm.spec.max_restarts,
        restarts: record.status.restarts,
    }
}

fn runtime_err(name: &str, step: &'static str, source: RuntimeError) -> ReconcileError {
    ReconcileError::Runtime { name: name.to_string(), step, source }
}
