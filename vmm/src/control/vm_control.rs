//! The running VM as QMP sees it: [`QmpBackend`] over the [`Machine`], the
//! ACPI power button and the VM's exit state.

use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};

use devices::acpi::Ged;

use crate::device_manager::{ControlError, Machine};
use crate::qmp::{EventBus, QmpBackend, QmpError};
use crate::vstate::exit::{ExitReason, ExitState};

/// QMP's handle on a running VM.
pub struct VmControl {
    machine: Arc<Machine>,
    ged: Arc<Mutex<Ged>>,
    exit: Arc<ExitState>,
    events: Arc<EventBus>,
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
        Self {
            machine,
            ged,
            exit,
            events,
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
    fn object_add(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        self.machine.object_add("", args, None).map_err(qmp_error)
    }

    fn object_del(&self, id: &str) -> Result<(), QmpError> {
        self.machine.object_del(id).map_err(qmp_error)
    }

    fn blockdev_add(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        self.machine.blockdev_add("", args, None).map_err(qmp_error)
    }

    fn blockdev_del(&self, node_name: &str) -> Result<(), QmpError> {
        self.machine.blockdev_del(node_name).map_err(qmp_error)
    }

    fn device_add(&self, args: &Map<String, Value>) -> Result<(), QmpError> {
        self.machine.device_add(args).map_err(qmp_error)
    }

    fn device_del(&self, id: &str) -> Result<(), QmpError> {
        self.machine.device_del(id).map_err(qmp_error)
    }

    fn query_block(&self) -> Value {
        self.machine.query_block()
    }

    fn query_named_block_nodes(&self, flat: bool) -> Value {
        self.machine.query_named_block_nodes(flat)
    }

    fn query_pci(&self) -> Value {
        self.machine.query_pci()
    }

    fn status(&self) -> &'static str {
        if self.exit.stopping() {
            "shutdown"
        } else {
            "running"
        }
    }

    fn system_powerdown(&self) -> Result<(), QmpError> {
        self.ged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .notify_power_button()
            .map_err(|e| QmpError::generic(format!("pressing the power button: {e}")))?;
        self.events.emit("POWERDOWN", Value::Null);
        Ok(())
    }

    fn quit(&self) {
        self.events.emit(
            "SHUTDOWN",
            json!({"guest": false, "reason": "host-qmp-quit"}),
        );
        self.exit.request(ExitReason::Quit);
    }
}
