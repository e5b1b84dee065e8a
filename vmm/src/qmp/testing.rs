//! A fake [`QmpBackend`] for the QMP and `ctl` tests.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::{ErrorClass, EventBus, QmpBackend, QmpError};

/// Keeps a set of device ids. `device_add` with driver `slow` takes half a second, with
/// driver `panic` panics; `device_del` emits `DEVICE_DELETED` on `events` if set;
/// `object-add` with `qom-type` `fail` fails with the `class` and `desc` it is given.
#[derive(Default)]
pub(crate) struct FakeBackend {
    devices: Mutex<BTreeSet<String>>,
    quits: AtomicUsize,
    /// Calls made, by command name.
    pub calls: Mutex<Vec<String>>,
    /// Where `device_del` reports `DEVICE_DELETED`.
    pub events: Option<Arc<EventBus>>,
}

impl FakeBackend {
    /// A backend that emits on `events`.
    pub(crate) fn with_events(events: Arc<EventBus>) -> Self {
        FakeBackend {
            events: Some(events),
            ..Default::default()
        }
    }

    /// How many times `quit` was called.
    pub(crate) fn quits(&self) -> usize {
        self.quits.load(Ordering::SeqCst)
    }

    fn record(&self, call: &str) {
        self.calls.lock().unwrap().push(call.to_string());
    }
}

impl QmpBackend for FakeBackend {
    fn object_add(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        self.record("object-add");
        if args.get("qom-type").and_then(Value::as_str) != Some("fail") {
            return Ok(());
        }
        let class = match args.get("class").and_then(Value::as_str) {
            Some("CommandNotFound") => ErrorClass::CommandNotFound,
            Some("DeviceNotFound") => ErrorClass::DeviceNotFound,
            Some("DeviceNotActive") => ErrorClass::DeviceNotActive,
            Some("KVMMissingCap") => ErrorClass::KVMMissingCap,
            _ => ErrorClass::GenericError,
        };
        let desc = args.get("desc").and_then(Value::as_str).unwrap_or("failed");
        Err(QmpError::new(class, desc))
    }

    fn object_del(&self, id: &str) -> Result<(), QmpError> {
        self.record("object-del");
        Err(QmpError::generic(format!("object '{id}' not found")))
    }

    fn blockdev_add(&self, _args: &Map<String, Value>) -> Result<(), QmpError> {
        self.record("blockdev-add");
        Ok(())
    }

    fn blockdev_del(&self, node_name: &str) -> Result<(), QmpError> {
        self.record("blockdev-del");
        Err(QmpError::generic(format!(
            "Failed to find node with node-name='{node_name}'"
        )))
    }

    fn device_add(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        self.record("device_add");
        match args.get("driver").and_then(Value::as_str) {
            None => return Err(QmpError::generic("Parameter 'driver' is missing")),
            Some("slow") => std::thread::sleep(Duration::from_millis(500)),
            Some("panic") => panic!("fake backend panics on request"),
            Some(_) => {}
        }
        if let Some(id) = args.get("id").and_then(Value::as_str) {
            self.devices.lock().unwrap().insert(id.to_string());
        }
        Ok(())
    }

    fn device_del(&self, id: &str) -> Result<(), QmpError> {
        self.record("device_del");
        if !self.devices.lock().unwrap().remove(id) {
            return Err(QmpError::device_not_found(format!(
                "Device '{id}' not found"
            )));
        }
        if let Some(events) = &self.events {
            events.emit(
                "DEVICE_DELETED",
                json!({"device": id, "path": format!("/machine/peripheral/{id}")}),
            );
        }
        Ok(())
    }

    fn query_block(&self) -> Value {
        json!([])
    }

    fn query_named_block_nodes(&self, flat: bool) -> Value {
        json!([{ "flat": flat }])
    }

    fn query_pci(&self) -> Value {
        json!([{"bus": 0, "devices": []}])
    }

    fn status(&self) -> &'static str {
        "running"
    }

    fn system_powerdown(&self) -> Result<(), QmpError> {
        self.record("system_powerdown");
        Ok(())
    }

    fn quit(&self) {
        self.quits.fetch_add(1, Ordering::SeqCst);
    }
}
