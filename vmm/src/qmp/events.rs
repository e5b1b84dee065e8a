//! Broadcasting QMP events to every negotiated client.

use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::server::Outgoing;
use super::throttle::{self, Throttle};
use super::transport::Stream;
use super::writer;

/// A client that receives events.
struct Subscriber {
    id: u64,
    queue: SyncSender<Outgoing>,
    /// To disconnect a client whose queue is full (it stopped reading).
    stream: Stream,
}

/// Broadcasts events to every negotiated client (cheap to clone/share).
///
/// `emit` never blocks: each client has a bounded queue, and a client that lets it fill
/// up (it does not read its socket) is disconnected rather than stalling the VM. Events
/// a guest can cause at will are rate-limited as QEMU limits its noisy events
/// ([`super::throttle`]); a thread (`qmp-events`) sends those held back when their
/// period ends, and stops when the bus is dropped.
pub struct EventBus {
    shared: Arc<Shared>,
}

/// What the bus and its thread share.
#[derive(Default)]
struct Shared {
    subscribers: Mutex<Vec<Subscriber>>,
    throttle: Mutex<Held>,
    /// Signalled when a source starts being throttled, or the bus goes.
    changed: Condvar,
}

#[derive(Default)]
struct Held {
    throttle: Throttle,
    closed: bool,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("subscribers", &self.shared.lock().len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<Subscriber>> {
        lock(&self.subscribers)
    }

    /// Sends `event` to every negotiated client now.
    fn broadcast(&self, event: &str, data: Value) {
        let line: Arc<str> = format!("{}\r\n", writer::to_json(&event_message(event, data))).into();
        self.lock().retain(
            |s| match s.queue.try_send(Outgoing::Line(Arc::clone(&line))) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    s.stream.shutdown();
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            },
        );
    }

    /// The `qmp-events` thread: sends held events when their period ends.
    fn send_held(&self) {
        let mut held = lock(&self.throttle);
        loop {
            if held.closed {
                return;
            }
            let now = Instant::now();
            let due = held.throttle.due(now);
            if !due.is_empty() {
                drop(held);
                for (event, data) in due {
                    self.broadcast(&event, data);
                }
                held = lock(&self.throttle);
                continue;
            }
            held = match held.throttle.next_deadline() {
                Some(at) => {
                    let wait = at.saturating_duration_since(now);
                    self.changed
                        .wait_timeout(held, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.changed.wait(held).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

impl Drop for EventBus {
    fn drop(&mut self) {
        lock(&self.shared.throttle).closed = true;
        self.shared.changed.notify_all();
    }
}

impl EventBus {
    /// A bus with no subscribers (and its `qmp-events` thread; without one, held
    /// events go out with the next event of their source instead).
    pub fn new() -> Arc<Self> {
        let shared = Arc::new(Shared::default());
        let worker = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name("qmp-events".into())
            .spawn(move || {
                crate::seccomp::thread_start(crate::seccomp::ThreadKind::QmpEvents);
                worker.send_held()
            });
        if let Err(e) = spawned {
            eprintln!("cryptvm: starting the QMP event thread: {e}");
        }
        Arc::new(EventBus { shared })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Subscriber>> {
        self.shared.lock()
    }

    /// Sends `{"timestamp": {...}, "event": event, "data": data}` to every negotiated
    /// client; `data` null means an event without data (like QEMU's `STOP`). A
    /// throttled event may go out later, or be replaced by a newer one of its source.
    pub fn emit(&self, event: &str, data: Value) {
        if let Some(key) = throttle::key(event, &data) {
            let mut held = lock(&self.shared.throttle);
            let now = Instant::now();
            // Held events of ended periods first, in case the thread could not start.
            let due = held.throttle.due(now);
            let send = held.throttle.offer(key, event, data, now);
            drop(held);
            if send.is_some() {
                // A period started: the thread has a new deadline to wait for.
                self.shared.changed.notify_all();
            }
            for (event, data) in due {
                self.shared.broadcast(&event, data);
            }
            if let Some(data) = send {
                self.shared.broadcast(event, data);
            }
            return;
        }
        self.shared.broadcast(event, data);
    }

    /// Number of clients receiving events.
    pub fn subscribers(&self) -> usize {
        self.lock().len()
    }

    /// Queues `reply` (the negotiation reply) for client `id` and starts sending it
    /// events, atomically: every event emitted after the client has read the reply
    /// reaches it, and none comes before the reply (qemu.qmp requires the latter).
    /// Fails if the client is gone.
    pub(crate) fn subscribe(
        &self,
        id: u64,
        queue: SyncSender<Outgoing>,
        stream: Stream,
        reply: Outgoing,
    ) -> Result<(), ()> {
        let mut subscribers = self.lock();
        match queue.try_send(reply) {
            Ok(()) => {}
            Err(TrySendError::Disconnected(_)) => return Err(()),
            Err(TrySendError::Full(reply)) => {
                // The client is not reading: wait for room without blocking emit().
                drop(subscribers);
                queue.send(reply).map_err(drop)?;
                subscribers = self.lock();
            }
        }
        subscribers.push(Subscriber { id, queue, stream });
        Ok(())
    }

    /// Stops sending events to client `id`.
    pub(crate) fn unsubscribe(&self, id: u64) {
        self.lock().retain(|s| s.id != id);
    }
}

/// An event message as QEMU builds it, timestamped now.
fn event_message(event: &str, data: Value) -> Value {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut timestamp = Map::new();
    timestamp.insert("seconds".into(), now.as_secs().into());
    timestamp.insert("microseconds".into(), now.subsec_micros().into());
    let mut m = Map::new();
    m.insert("event".into(), event.into());
    m.insert("timestamp".into(), Value::Object(timestamp));
    if !data.is_null() {
        m.insert("data".into(), data);
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_shape() {
        let text = writer::to_json(&event_message(
            "DEVICE_DELETED",
            serde_json::json!({"device": "d0", "path": "/machine/peripheral/d0"}),
        ));
        assert!(text.starts_with(r#"{"timestamp": {"seconds": "#), "{text}");
        assert!(
            text.contains(r#"}, "event": "DEVICE_DELETED", "data": {"#),
            "{text}"
        );
        let stop = writer::to_json(&event_message("STOP", Value::Null));
        assert!(stop.ends_with(r#"}, "event": "STOP"}"#), "{stop}");
    }
}
