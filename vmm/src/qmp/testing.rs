//! A fake [`QmpBackend`] for the QMP and `ctl` tests.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::{ErrorClass, EventBus, QmpBackend, QmpError};
use crate::control::{Action, Query};

/// Keeps a set of device ids. `device_add` of a device whose id starts with `slow`
/// takes half a second, with id `panic` panics; `device_del` emits `DEVICE_DELETED` on
/// `events` if set; `object-add` with `qom-type` `fail` fails with the `class` and
/// `desc` it is given.
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

    /// How many times `quit` was run.
    pub(crate) fn quits(&self) -> usize {
        self.quits.load(Ordering::SeqCst)
    }
}

fn object_add(args: &serde_json::Map<String, Value>) -> Result<Value, QmpError> {
    if args.get("qom-type").and_then(Value::as_str) != Some("fail") {
        return Ok(json!({}));
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

impl QmpBackend for FakeBackend {
    fn vcpus(&self) -> u8 {
        2
    }

    fn execute(&self, action: Action) -> Result<Value, QmpError> {
        match &action {
            Action::Query(_) | Action::Quit => {}
            other => self.calls.lock().unwrap().push(other.command().to_string()),
        }
        match action {
            Action::ObjectAdd(o) => object_add(&o.args),
            Action::ObjectDel(id) => Err(QmpError::generic(format!("object '{id}' not found"))),
            Action::BlockdevAdd(_) => Ok(json!({})),
            Action::BlockdevDel(name) => Err(QmpError::generic(format!(
                "Failed to find node with node-name='{name}'"
            ))),
            Action::DeviceAdd(d) => {
                let id = d.props.id.unwrap_or_default();
                if id.starts_with("slow") {
                    std::thread::sleep(Duration::from_millis(500));
                }
                if id == "panic" {
                    panic!("fake backend panics on request");
                }
                self.devices.lock().unwrap().insert(id);
                Ok(json!({}))
            }
            Action::DeviceDel(id) => {
                if !self.devices.lock().unwrap().remove(&id) {
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
                Ok(json!({}))
            }
            Action::Query(Query::Status) => Ok(json!({"status": "running", "running": true})),
            Action::Query(Query::Block) => Ok(json!([])),
            Action::Query(Query::NamedBlockNodes { flat }) => Ok(json!([{ "flat": flat }])),
            Action::Query(Query::Pci) => Ok(json!([{"bus": 0, "devices": []}])),
            Action::Query(Query::Jobs) => Ok(json!([])),
            Action::BlockdevCreate { .. } | Action::Job { .. } => Ok(json!({})),
            Action::SystemPowerdown => Ok(json!({})),
            Action::Quit => {
                self.quits.fetch_add(1, Ordering::SeqCst);
                Ok(json!({}))
            }
        }
    }
}
