//! The running VM as its config and QMP see it: [`VmControl::execute`] runs every
//! [`Action`] on the [`Machine`], the ACPI power button and the VM's exit state.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use devices::acpi::Ged;

use super::action::{Action, Query};
use super::jobs::Jobs;
use crate::device_manager::{ControlError, Machine};
use crate::qmp::{EventBus, QmpBackend, QmpError};
use crate::vstate::exit::{ExitReason, ExitState};

/// The handle on a VM through which its cold plug and QMP act.
pub struct VmControl {
    machine: Arc<Machine>,
    ged: Arc<Mutex<Ged>>,
    exit: Arc<ExitState>,
    events: Arc<EventBus>,
    jobs: Jobs,
}

impl VmControl {
    /// Control of `machine`, its power button (`ged`) and its `exit` state;
    /// events go to `events`.
    pub fn new(
        machine: Arc<Machine>,
        ged: Arc<Mutex<Ged>>,
        exit: Arc<ExitState>,
        events: Arc<EventBus>,
    ) -> Self {
        let bus = Arc::clone(&events);
        let jobs = Jobs::new(Arc::new(move |event: &str, data: Value| {
            bus.emit(event, data)
        }));
        Self {
            machine,
            ged,
            exit,
            events,
            jobs,
        }
    }

    /// Runs `action`; its QMP return value (`{}` for those that return nothing).
    pub fn execute(&self, action: Action) -> Result<Value, ControlError> {
        let m = &self.machine;
        let done = |r: Result<(), ControlError>| r.map(|()| json!({}));
        match action {
            Action::ObjectAdd(o) => done(m.object_add(&o.path, o.args, o.base_dir.as_deref())),
            Action::ObjectDel(id) => done(m.object_del(&id)),
            Action::BlockdevAdd(b) => done(m.blockdev_add(&b.path, &b.args, b.base_dir.as_deref())),
            Action::BlockdevDel(name) => done(m.blockdev_del(&name)),
            Action::DeviceAdd(d) => done(m.device_add(d.props)),
            Action::DeviceDel(id) => done(m.device_del(&id)),
            Action::Query(Query::Status) => {
                let status = if self.exit.stopping() {
                    "shutdown"
                } else {
                    "running"
                };
                Ok(json!({"status": status, "running": status == "running"}))
            }
            Action::Query(Query::Block) => Ok(m.query_block()),
            Action::Query(Query::NamedBlockNodes { flat }) => Ok(m.query_named_block_nodes(flat)),
            Action::Query(Query::Pci) => Ok(m.query_pci()),
            Action::Query(Query::Jobs) => Ok(self.jobs.query()),
            Action::BlockdevCreate { job_id, options } => {
                let machine = Arc::clone(m);
                let work =
                    Box::new(move || machine.blockdev_create(&options).map_err(|e| e.to_string()));
                self.jobs
                    .start(&job_id, work)
                    .map(|()| json!({}))
                    .map_err(|e| ControlError::Invalid(e.to_string()))
            }
            Action::Job { verb, id } => self
                .jobs
                .apply(verb, &id)
                .map(|()| json!({}))
                .map_err(|e| ControlError::Invalid(e.to_string())),
            Action::SystemPowerdown => {
                self.ged
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .notify_power_button()
                    .map_err(ControlError::PowerButton)?;
                self.events.emit("POWERDOWN", Value::Null);
                Ok(json!({}))
            }
            Action::Quit => {
                self.events.emit(
                    "SHUTDOWN",
                    json!({"guest": false, "reason": "host-qmp-quit"}),
                );
                self.exit.request(ExitReason::Quit);
                Ok(json!({}))
            }
        }
    }
}

fn qmp_error(e: ControlError) -> QmpError {
    match e {
        ControlError::DeviceNotFound(msg) => QmpError::device_not_found(msg),
        other => QmpError::generic(other.to_string()),
    }
}

impl QmpBackend for VmControl {
    fn vcpus(&self) -> u8 {
        self.machine.vcpus()
    }

    fn execute(&self, action: Action) -> Result<Value, QmpError> {
        VmControl::execute(self, action).map_err(qmp_error)
    }
}
