//! Broadcasting QMP events to every negotiated client.

use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use super::server::Outgoing;
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
/// up (it does not read its socket) is disconnected rather than stalling the VM.
#[derive(Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<Subscriber>>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("subscribers", &self.lock().len())
            .finish()
    }
}

impl EventBus {
    /// A bus with no subscribers.
    pub fn new() -> Arc<Self> {
        Arc::new(EventBus::default())
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Subscriber>> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `{"timestamp": {...}, "event": event, "data": data}` to every negotiated
    /// client; `data` null means an event without data (like QEMU's `STOP`).
    pub fn emit(&self, event: &str, data: Value) {
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
