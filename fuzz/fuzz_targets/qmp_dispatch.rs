//! A QMP session (`vmm/src/qmp/protocol.rs`, `commands.rs`) fed the messages of an
//! arbitrary byte stream, over a fake backend: `object-add` really adds the secret
//! (unless it names a file), `blockdev-add` checks its options as a config's are
//! checked (nothing is opened), `device_add` checks that the typed properties are
//! valid. Every reply must be a `return` or an `error` and print.
//!
//! Input: one byte of flags (bit 0: negotiate first), then the stream.
#![no_main]

use std::sync::Mutex;

use block::SecretStore;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use vmm::control::{Action, Query};
use vmm::qmp::fuzzing::{greeting, stream, to_json, Session};
use vmm::qmp::{QmpBackend, QmpError};

#[derive(Default)]
struct Backend {
    secrets: Mutex<SecretStore>,
}

impl QmpBackend for Backend {
    fn vcpus(&self) -> u8 {
        4
    }

    fn execute(&self, action: Action) -> Result<Value, QmpError> {
        let generic = |e: block::BlockError| QmpError::generic(e.to_string());
        match action {
            Action::ObjectAdd(o) => {
                if o.args.contains_key("file") {
                    block::secret::check_object(&o.path, &Value::Object(o.args))
                        .map_err(generic)?;
                } else {
                    let mut secrets = self.secrets.lock().unwrap();
                    secrets
                        .add(&o.path, Value::Object(o.args), None)
                        .map_err(generic)?;
                }
                Ok(json!({}))
            }
            Action::ObjectDel(id) => {
                let mut secrets = self.secrets.lock().unwrap();
                secrets
                    .remove(&id)
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                Ok(json!({}))
            }
            Action::BlockdevAdd(b) => {
                block::blockdev::check_options(&b.path, &b.args).map_err(generic)?;
                Ok(json!({}))
            }
            Action::DeviceAdd(d) => {
                assert!(
                    d.props.config.validate().is_ok(),
                    "device_add accepted properties the device refuses: {:?}",
                    d.props
                );
                Ok(json!({}))
            }
            Action::Query(Query::Status) => Ok(json!({"status": "running", "running": true})),
            Action::Query(_) => Ok(json!([])),
            Action::BlockdevDel(_) | Action::DeviceDel(_) => Ok(json!({})),
            Action::SystemPowerdown | Action::Quit => Ok(json!({})),
            Action::BlockdevCreate { .. } | Action::Job { .. } => Ok(json!({})),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let backend = Backend::default();
    let mut session = Session::new();
    to_json(&greeting());
    if flags & 1 != 0 {
        let (reply, _) = session.handle(Ok(json!({"execute": "qmp_capabilities"})), &backend);
        assert_eq!(reply, json!({"return": {}}));
    }
    for message in stream(&[bytes]) {
        let (reply, _quit) = session.handle(message, &backend);
        let obj = reply.as_object().expect("a reply is an object");
        assert!(
            obj.contains_key("return") ^ obj.contains_key("error"),
            "reply {reply}"
        );
        to_json(&reply);
    }
});
