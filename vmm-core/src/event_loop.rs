//! The device event loop: one thread polling queue notifications (KVM ioeventfds), device backends
//! (tap, unix sockets) and the VM's exit event.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::lock;
use crate::devices::virtio::VirtioDevice;
use crate::exit::ExitSignal;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Feeds one virtio device: queue notifications and backend readiness.
pub(crate) struct VirtioSubscriber {
    device: Arc<Mutex<dyn VirtioDevice>>,
    queue_evts: Vec<EventFd>,
    /// Backend fds currently registered, with the events asked for.
    backends: HashMap<RawFd, EventSet>,
}

impl VirtioSubscriber {
    pub(crate) fn new(device: Arc<Mutex<dyn VirtioDevice>>, queue_evts: Vec<EventFd>) -> Self {
        VirtioSubscriber { device, queue_evts, backends: HashMap::new() }
    }

    /// Makes the registered backend fds match what the device wants now.
    fn sync_backends(&mut self, ops: &mut EventOps) {
        let wanted: HashMap<RawFd, EventSet> = lock(&self.device).backend_fds().into_iter().collect();
        self.backends.retain(|fd, events| {
            let keep = wanted.get(fd) == Some(events);
            if !keep {
                let _ = ops.remove(Events::empty_raw(*fd));
            }
            keep
        });
        for (fd, events) in wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = self.backends.entry(fd) {
                match ops.add(Events::new_raw(fd, events)) {
                    Ok(()) => {
                        slot.insert(events);
                    }
                    Err(err) => tracing::warn!(fd, ?err, "device backend fd could not be polled"),
                }
            }
        }
    }
}

impl MutEventSubscriber for VirtioSubscriber {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if let Some(index) = self.queue_evts.iter().position(|evt| evt.as_raw_fd() == fd) {
            // Draining the counter coalesces notifications; the device processes the whole queue.
            let _ = self.queue_evts[index].read();
            lock(&self.device).process_queue(index);
        } else if self.backends.contains_key(&fd) {
            lock(&self.device).process_backend(fd, events.event_set());
        }
        self.sync_backends(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (index, evt) in self.queue_evts.iter().enumerate() {
            if let Err(err) = ops.add(Events::with_data(evt, index as u32, EventSet::IN)) {
                tracing::error!(index, ?err, "queue notification could not be polled");
            }
        }
        self.sync_backends(ops);
    }
}

/// Stops the loop when the VM exits.
struct ExitSubscriber {
    exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for ExitSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.exit.eventfd().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(self.exit.eventfd(), EventSet::IN)) {
            tracing::error!(?err, "exit event could not be polled");
        }
    }
}

/// Starts the event-loop thread with `subscribers`; it ends once `exit` is signalled.
pub(crate) fn spawn(subscribers: Vec<Subscriber>, exit: Arc<ExitSignal>) -> std::io::Result<JoinHandle<()>> {
    let mut manager: EventManager<Subscriber> =
        EventManager::new().map_err(|e| std::io::Error::other(format!("event manager: {e:?}")))?;
    for subscriber in subscribers {
        manager.add_subscriber(subscriber);
    }
    manager.add_subscriber(Arc::new(Mutex::new(ExitSubscriber { exit: exit.clone() })));
    std::thread::Builder::new().name("ignite-devices".into()).spawn(move || {
        if let Err(err) = crate::jail::seccomp::apply(crate::jail::seccomp::ThreadKind::Devices) {
            let detail = format!("device thread: {err}: {:?}", std::error::Error::source(&err));
            exit.exit(crate::exit::ExitReason::Error { detail });
            return;
        }
        crate::jail::escape_test::attempt();
        while !exit.is_exiting() {
            if let Err(err) = manager.run() {
                exit.exit(crate::exit::ExitReason::Error { detail: format!("device event loop failed: {err:?}") });
            }
        }
    })
}
