//! The command table: which commands exist, QEMU's argument checks for them, and the
//! [`Action`] each becomes for [`QmpBackend::execute`].

use std::panic::{catch_unwind, AssertUnwindSafe};

use block::options::{check_keys, KeyError};
use serde_json::{json, Map, Value};

use super::writer::qdict_order;
use super::{QmpBackend, QmpError};
use crate::control::jobs::JobVerb;
use crate::control::{Action, BlockdevSpec, DeviceSpec, ObjectSpec, Query};
use crate::device_manager::debug_exit;
use crate::device_manager::virtio_blk::BlkProps;

/// The QEMU version cryptvm reports in the greeting and `query-version`: the release
/// whose QMP dialect (error classes and texts, reply shapes) it follows. Clients such
/// as libvirt pick features by version; `package` says what is really answering.
pub(crate) const QEMU_VERSION: (u32, u32, u32) = (10, 0, 0);

/// Every command, in the order `query-commands` lists them.
pub(crate) const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-status",
    "query-kvm",
    "object-add",
    "object-del",
    "blockdev-add",
    "blockdev-del",
    "device_add",
    "device_del",
    "query-block",
    "query-named-block-nodes",
    "query-pci",
    "blockdev-create",
    "query-jobs",
    "job-cancel",
    "job-complete",
    "job-finalize",
    "job-dismiss",
    "system_powerdown",
    "quit",
];

/// `query-version`'s return value (also the greeting's `version`).
pub(crate) fn version() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": format!("cryptvm {}", env!("CARGO_PKG_VERSION")),
    })
}

/// A command's arguments, checked the way QEMU's QAPI input visitor checks them: each
/// member in turn (missing, wrong type), then any member left over.
pub(crate) struct Args<'a> {
    map: &'a Map<String, Value>,
    known: Vec<&'static str>,
}

impl<'a> Args<'a> {
    /// Wraps `arguments`.
    pub(crate) fn new(map: &'a Map<String, Value>) -> Self {
        Args {
            map,
            known: Vec::new(),
        }
    }

    /// A required string member.
    pub(crate) fn required_str(&mut self, name: &'static str) -> Result<&'a str, QmpError> {
        self.known.push(name);
        match self.map.get(name) {
            None => Err(QmpError::generic(format!("Parameter '{name}' is missing"))),
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(wrong_type(name, "string")),
        }
    }

    /// An optional boolean member.
    pub(crate) fn optional_bool(&mut self, name: &'static str) -> Result<Option<bool>, QmpError> {
        self.known.push(name);
        match self.map.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(wrong_type(name, "boolean")),
        }
    }

    /// An optional member, unchecked.
    pub(crate) fn optional(&mut self, name: &'static str) -> Option<&'a Value> {
        self.known.push(name);
        self.map.get(name)
    }

    /// Fails on the first member (in QEMU's order) that was not asked for, with the
    /// block layer's key checker ([`check_keys`]); the members asked for were checked
    /// one by one before, as QEMU's visitor does.
    pub(crate) fn finish(self) -> Result<(), QmpError> {
        let order = qdict_order(self.map);
        check_keys(order.iter().map(|(k, _)| *k), &[&self.known], &[]).map_err(|e| match e {
            KeyError::Unexpected(k) => QmpError::generic(format!("Parameter '{k}' is unexpected")),
            KeyError::Missing(k) => QmpError::generic(format!("Parameter '{k}' is missing")),
        })
    }
}

fn wrong_type(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

/// `qmp_capabilities`: checks `enable` (a list of capabilities, of which cryptvm offers
/// none) and whether negotiation already happened.
pub(crate) fn qmp_capabilities(
    args: &Map<String, Value>,
    negotiated: bool,
) -> Result<Value, QmpError> {
    let mut a = Args::new(args);
    let mut wanted = Vec::new();
    if let Some(enable) = a.optional("enable") {
        let Value::Array(items) = enable else {
            return Err(wrong_type("enable", "array"));
        };
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::String(s) if s == "oob" => wanted.push(s.as_str()),
                // QEMU 10.0 says 'null' for the name here (a QEMU bug); cryptvm names
                // the element.
                Value::String(s) => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'enable[{i}]' does not accept value '{s}'"
                    )))
                }
                _ => return Err(wrong_type(&format!("enable[{i}]"), "string")),
            }
        }
    }
    a.finish()?;
    if negotiated {
        return Err(QmpError::command_not_found(
            "Capabilities negotiation is already complete, command ignored",
        ));
    }
    if !wanted.is_empty() {
        return Err(QmpError::generic(format!(
            "Capability {} not available",
            wanted.join(", ")
        )));
    }
    Ok(json!({}))
}

/// A command whose arguments have been checked.
enum Checked {
    /// Answered without the backend.
    Answer(Value),
    /// To be run by the backend.
    Do(Action),
}

/// Checks the arguments of command `name` (after negotiation) and types them for a VM
/// with `vcpus`; `None` when there is no such command.
fn check(name: &str, args: &Map<String, Value>, vcpus: u8) -> Option<Result<Checked, QmpError>> {
    use Checked::{Answer, Do};
    let mut a = Args::new(args);
    let no_args = |a: Args<'_>, r: Checked| a.finish().map(|()| r);
    let owned = || args.clone();
    Some(match name {
        "qmp_capabilities" => qmp_capabilities(args, true).map(Answer),
        "query-version" => no_args(a, Answer(version())),
        "query-commands" => {
            let list = COMMANDS.iter().map(|n| json!({ "name": n })).collect();
            no_args(a, Answer(Value::Array(list)))
        }
        "query-kvm" => no_args(a, Answer(json!({"enabled": true, "present": true}))),
        "query-status" => no_args(a, Do(Action::Query(Query::Status))),
        "query-block" => no_args(a, Do(Action::Query(Query::Block))),
        "query-pci" => no_args(a, Do(Action::Query(Query::Pci))),
        "system_powerdown" => no_args(a, Do(Action::SystemPowerdown)),
        "quit" => no_args(a, Do(Action::Quit)),
        "object-add" => Ok(Do(Action::ObjectAdd(ObjectSpec {
            path: String::new(),
            args: owned(),
            base_dir: None,
        }))),
        "blockdev-add" => Ok(Do(Action::BlockdevAdd(BlockdevSpec {
            path: String::new(),
            args: owned(),
            base_dir: None,
        }))),
        // Not hot-pluggable: QEMU refuses it before reading its properties.
        "device_add" if debug_exit::is_driver(args) => {
            Err(QmpError::generic(debug_exit::NO_HOTPLUG))
        }
        "device_add" => BlkProps::parse(args, vcpus)
            .map(|props| {
                Do(Action::DeviceAdd(DeviceSpec {
                    path: String::new(),
                    props,
                }))
            })
            .map_err(|e| QmpError::generic(e.to_string())),
        "object-del" => a
            .required_str("id")
            .and_then(|id| no_args(a, Do(Action::ObjectDel(id.to_owned())))),
        "device_del" => a
            .required_str("id")
            .and_then(|id| no_args(a, Do(Action::DeviceDel(id.to_owned())))),
        "blockdev-del" => a
            .required_str("node-name")
            .and_then(|n| no_args(a, Do(Action::BlockdevDel(n.to_owned())))),
        "query-jobs" => no_args(a, Do(Action::Query(Query::Jobs))),
        "blockdev-create" => blockdev_create(a).map(Do),
        "job-cancel" | "job-complete" | "job-finalize" | "job-dismiss" => {
            let verb = match name {
                "job-cancel" => JobVerb::Cancel,
                "job-complete" => JobVerb::Complete,
                "job-finalize" => JobVerb::Finalize,
                _ => JobVerb::Dismiss,
            };
            a.required_str("id").and_then(|id| {
                let id = id.to_owned();
                no_args(a, Do(Action::Job { verb, id }))
            })
        }
        "query-named-block-nodes" => a.optional_bool("flat").and_then(|flat| {
            let flat = flat.unwrap_or(false);
            no_args(a, Do(Action::Query(Query::NamedBlockNodes { flat })))
        }),
        _ => return None,
    })
}

/// `blockdev-create`'s arguments: `job-id`, then `options` (QEMU's
/// `BlockdevCreateOptions`, [`block::create::CreateOptions::parse`]).
fn blockdev_create(mut a: Args<'_>) -> Result<Action, QmpError> {
    let job_id = a.required_str("job-id")?.to_owned();
    let options = match a.optional("options") {
        None => return Err(QmpError::generic("Parameter 'options' is missing")),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(wrong_type("options", "object")),
    };
    let order = qdict_order(options);
    let options =
        block::create::CreateOptions::parse(options, order.iter().map(|(k, _)| k.as_str()))
            .map_err(|e| QmpError::generic(e.to_string()))?;
    a.finish()?;
    Ok(Action::BlockdevCreate {
        job_id,
        options: Box::new(options),
    })
}

/// Runs command `name` after negotiation; `None` when there is no such command.
/// `quit` only answers here: the server runs it once the reply is written ([`run`]).
pub(crate) fn execute(
    name: &str,
    args: &Map<String, Value>,
    backend: &dyn QmpBackend,
) -> Option<Result<Value, QmpError>> {
    let action = match check(name, args, backend.vcpus())? {
        Err(e) => return Some(Err(e)),
        Ok(Checked::Answer(value)) => return Some(Ok(value)),
        Ok(Checked::Do(Action::Quit)) => return Some(Ok(json!({}))),
        Ok(Checked::Do(action)) => action,
    };
    Some(run(backend, action))
}

/// Runs `action` on `backend`, a panic reported as QEMU reports an internal error.
pub(crate) fn run(backend: &dyn QmpBackend, action: Action) -> Result<Value, QmpError> {
    let name = action.command();
    catch_unwind(AssertUnwindSafe(|| backend.execute(action))).unwrap_or_else(|_| {
        Err(QmpError::generic(format!(
            "internal error while executing '{name}'"
        )))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn argument_errors_in_qemu_order() {
        let m1 = map(json!({"y": 1}));
        let mut a = Args::new(&m1);
        assert_eq!(
            a.required_str("id").unwrap_err().desc,
            "Parameter 'id' is missing"
        );
        let m2 = map(json!({"id": 1}));
        assert_eq!(
            Args::new(&m2).required_str("id").unwrap_err().desc,
            "Invalid parameter type for 'id', expected: string"
        );
        let m3 = map(json!({"id": "x", "y": 2}));
        let mut a = Args::new(&m3);
        assert_eq!(a.required_str("id").unwrap(), "x");
        assert_eq!(a.finish().unwrap_err().desc, "Parameter 'y' is unexpected");
    }

    #[test]
    fn capabilities() {
        let ok = qmp_capabilities(&map(json!({"enable": []})), false);
        assert_eq!(ok, Ok(json!({})));
        let cases = [
            (
                json!({"enable": "x"}),
                false,
                "Invalid parameter type for 'enable', expected: array",
            ),
            (
                json!({"enable": null}),
                false,
                "Invalid parameter type for 'enable', expected: array",
            ),
            (
                json!({"enable": [1]}),
                false,
                "Invalid parameter type for 'enable[0]', expected: string",
            ),
            (
                json!({"enable": ["foo"]}),
                false,
                "Parameter 'enable[0]' does not accept value 'foo'",
            ),
            (json!({"foo": 1}), false, "Parameter 'foo' is unexpected"),
            (json!({"foo": 1}), true, "Parameter 'foo' is unexpected"),
            (
                json!({"enable": ["oob", "oob"]}),
                false,
                "Capability oob, oob not available",
            ),
            (
                json!({}),
                true,
                "Capabilities negotiation is already complete, command ignored",
            ),
        ];
        for (args, negotiated, want) in cases {
            let err = qmp_capabilities(&map(args.clone()), negotiated).unwrap_err();
            assert_eq!(err.desc, want, "{args}");
        }
    }
}
