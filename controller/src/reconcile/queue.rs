//! A work queue of object names, shaped like client-go's: an object is queued at most once, never
//! handed to two workers at the same time, and re-queued after its worker finishes if it changed
//! meanwhile. Delayed adds implement requeue-after and backoff.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The reconciler's queue. Cheap to share behind an `Arc`.
#[derive(Default)]
pub struct WorkQueue {
    inner: Mutex<Inner>,
    wake: Condvar,
}

#[derive(Default)]
struct Inner {
    ready: VecDeque<String>,
    queued: HashSet<String>,
    delayed: BTreeMap<(Instant, u64), String>,
    delayed_at: HashMap<String, (Instant, u64)>,
    in_flight: HashSet<String>,
    dirty: HashSet<String>,
    seq: u64,
    shut_down: bool,
}

impl Inner {
    fn add(&mut self, name: &str) {
        if let Some(key) = self.delayed_at.remove(name) {
            self.delayed.remove(&key);
        }
        if self.in_flight.contains(name) {
            self.dirty.insert(name.to_string());
        } else if self.queued.insert(name.to_string()) {
            self.ready.push_back(name.to_string());
        }
    }

    fn promote_due(&mut self, now: Instant) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let name = entry.remove();
            self.delayed_at.remove(&name);
            self.add(&name);
        }
    }
}

impl WorkQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `name` now (no-op if already queued; after the current pass if in flight).
    pub fn add(&self, name: &str) {
        self.lock().add(name);
        self.wake.notify_one();
    }

    /// Queues `name` after `delay`. An earlier pending time for the same name wins.
    pub fn add_after(&self, name: &str, delay: Duration) {
        if delay.is_zero() {
            return self.add(name);
        }
        let mut inner = self.lock();
        if inner.queued.contains(name) {
            return;
        }
        let at = Instant::now() + delay;
        if let Some(&(existing, _)) = inner.delayed_at.get(name) {
            if existing <= at {
                return;
            }
            let key = inner.delayed_at.remove(name).expect("checked above");
            inner.delayed.remove(&key);
        }
        inner.seq += 1;
        let key = (at, inner.seq);
        inner.delayed.insert(key, name.to_string());
        inner.delayed_at.insert(name.to_string(), key);
        drop(inner);
        self.wake.notify_one();
    }

    /// Takes the next name, blocking until one is due. `None` once the queue is shut down.
    pub fn get(&self) -> Option<String> {
        let mut inner = self.lock();
        loop {
            if inner.shut_down {
                return None;
            }
            inner.promote_due(Instant::now());
            if let Some(name) = inner.ready.pop_front() {
                inner.queued.remove(&name);
                inner.in_flight.insert(name.clone());
                return Some(name);
            }
            let wait = inner.delayed.keys().next().map(|(at, _)| at.saturating_duration_since(Instant::now()));
            inner = match wait {
                Some(wait) => self.wake.wait_timeout(inner, wait).unwrap_or_else(|p| p.into_inner()).0,
                None => self.wake.wait(inner).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }

    /// Marks `name` finished; if it was added meanwhile it is queued again.
    pub fn done(&self, name: &str) {
        let mut inner = self.lock();
        inner.in_flight.remove(name);
        if inner.dirty.remove(name) {
            inner.add(name);
            drop(inner);
            self.wake.notify_one();
        }
    }

    /// Wakes every waiting worker with `None`.
    pub fn shut_down(&self) {
        self.lock().shut_down = true;
        self.wake.notify_all();
    }

    /// Names queued now, delayed, and in flight.
    pub fn len(&self) -> (usize, usize, usize) {
        let inner = self.lock();
        (inner.ready.len(), inner.delayed.len(), inner.in_flight.len())
    }

    /// Nothing queued, delayed or in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0, 0)
    }
}

/// Per-object exponential backoff: `base * 2^(failures-1)`, capped at `max`.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// A backoff starting at `base` and never longer than `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max, failures: Mutex::new(HashMap::new()) }
    }

    /// Records one more failure of `name` and returns how long to wait before the next attempt.
    pub fn next(&self, name: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(name.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        let factor = 2u32.saturating_pow(n.saturating_sub(1).min(20));
        self.base.saturating_mul(factor).min(self.max)
    }

    /// How many failures in a row `name` has.
    pub fn failures(&self, name: &str) -> u32 {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).get(name).copied().unwrap_or(0)
    }

    /// Forgets `name`'s failures after a success.
    pub fn reset(&self, name: &str) {
        self.failures.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn an_object_is_queued_once_and_never_handed_out_twice() {
        let q = WorkQueue::new();
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.get().as_deref(), Some("a"));
        q.add("a"); // changed while in flight: comes back after done
        assert_eq!(q.get().as_deref(), Some("b"));
        assert_eq!(q.len(), (0, 0, 2));
        q.done("a");
        assert_eq!(q.get().as_deref(), Some("a"));
        q.done("a");
        q.done("b");
        assert!(q.is_empty());
    }

    #[test]
    fn delayed_adds_come_due_and_an_immediate_add_overrides_them() {
        let q = Arc::new(WorkQueue::new());
        q.add_after("late", Duration::from_millis(30));
        q.add_after("later", Duration::from_secs(3600));
        assert_eq!(q.len(), (0, 2, 0));
        assert_eq!(q.get().as_deref(), Some("late"));
        q.add("later");
        assert_eq!(q.get().as_deref(), Some("later"));
        assert!(q.len().1 == 0, "the delayed entry is replaced by the immediate add");
    }

    #[test]
    fn shut_down_releases_waiting_workers() {
        let q = Arc::new(WorkQueue::new());
        let worker = {
            let q = q.clone();
            std::thread::spawn(move || q.get())
        };
        std::thread::sleep(Duration::from_millis(20));
        q.shut_down();
        assert_eq!(worker.join().unwrap(), None);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let waits: Vec<_> = (0..6).map(|_| b.next("x").as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
        assert_eq!(b.next("y").as_secs(), 1, "per object");
        b.reset("x");
        assert_eq!(b.failures("x"), 0);
        assert_eq!(b.next("x").as_secs(), 1);
    }
}
