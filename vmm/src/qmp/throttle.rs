//! QEMU's event rate limiting (`monitor_qapi_event_queue`): an event that a guest can
//! cause at will reaches clients at most once per [`PERIOD`] per source. The first is
//! sent at once; during the period only the newest of the rest is kept, and it is sent
//! when the period ends (which starts another); a period without events ends the
//! source's throttling.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

/// QEMU's period for its throttled events.
pub(crate) const PERIOD: Duration = Duration::from_secs(1);

/// The throttled events, each with the data member that names its source.
/// `BLOCK_IO_ERROR`: one per failed guest request, so a guest can flood clients with
/// them (QEMU does not throttle it; cryptvm does, per node).
const THROTTLED: &[(&str, &str)] = &[("BLOCK_IO_ERROR", "node-name")];

/// The throttling key of `event` with `data`, or `None` when it is not throttled.
pub(crate) fn key(event: &str, data: &Value) -> Option<String> {
    let (_, member) = THROTTLED.iter().find(|(name, _)| *name == event)?;
    let source = data.get(*member).and_then(Value::as_str).unwrap_or("");
    Some(format!("{event}/{source}"))
}

struct Slot {
    /// When the current period ends.
    until: Instant,
    /// The newest event held back in it.
    pending: Option<(String, Value)>,
}

/// The state of every throttled source.
#[derive(Default)]
pub(crate) struct Throttle {
    slots: HashMap<String, Slot>,
}

impl Throttle {
    /// Offers `event` (throttled under `key`) at `now`: `Some` to send it now, `None`
    /// when it is held back (replacing an older one held).
    pub(crate) fn offer(
        &mut self,
        key: String,
        event: &str,
        data: Value,
        now: Instant,
    ) -> Option<Value> {
        match self.slots.get_mut(&key) {
            Some(slot) => {
                slot.pending = Some((event.to_string(), data));
                None
            }
            None => {
                let slot = Slot {
                    until: now + PERIOD,
                    pending: None,
                };
                self.slots.insert(key, slot);
                Some(data)
            }
        }
    }

    /// The held events whose period ended by `now`, to send now; their sources start
    /// a new period, and sources with nothing held stop being throttled.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        self.slots.retain(|_, slot| {
            if slot.until > now {
                return true;
            }
            match slot.pending.take() {
                Some(event) => {
                    out.push(event);
                    slot.until = now + PERIOD;
                    true
                }
                None => false,
            }
        });
        out
    }

    /// When [`Throttle::due`] next has something to do.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.slots.values().map(|s| s.until).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn one_per_period_per_source_and_the_newest_is_kept() {
        let error = |node: &str, n: u32| json!({"node-name": node, "reason": n});
        assert_eq!(key("DEVICE_DELETED", &json!({})), None);
        let k = |node: &str| key("BLOCK_IO_ERROR", &error(node, 0)).unwrap();
        assert_ne!(k("a"), k("b"));

        let mut t = Throttle::default();
        let t0 = Instant::now();
        assert!(t
            .offer(k("a"), "BLOCK_IO_ERROR", error("a", 1), t0)
            .is_some());
        assert!(t
            .offer(k("b"), "BLOCK_IO_ERROR", error("b", 1), t0)
            .is_some());
        for n in 2..100 {
            assert!(t
                .offer(k("a"), "BLOCK_IO_ERROR", error("a", n), t0)
                .is_none());
        }
        assert!(t.due(t0 + PERIOD / 2).is_empty());
        assert_eq!(t.next_deadline(), Some(t0 + PERIOD));
        // The period ends: the newest held one goes out; "b" had none and is done.
        let due = t.due(t0 + PERIOD);
        assert_eq!(due, vec![("BLOCK_IO_ERROR".to_string(), error("a", 99))]);
        assert_eq!(t.next_deadline(), Some(t0 + 2 * PERIOD));
        assert!(t
            .offer(k("b"), "BLOCK_IO_ERROR", error("b", 2), t0 + PERIOD)
            .is_some());
        // A quiet period ends "a"'s throttling.
        assert!(t.due(t0 + 2 * PERIOD).is_empty());
        assert!(t
            .offer(k("a"), "BLOCK_IO_ERROR", error("a", 100), t0 + 3 * PERIOD)
            .is_some());
    }
}
