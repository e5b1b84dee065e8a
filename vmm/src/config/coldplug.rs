//! The config's objects, block nodes and devices checked and typed before anything is
//! opened (`/dev/kvm` included): the [`Action`]s `cryptvm run` cold-plugs once the VM
//! exists.
//!
//! Every entry goes through the same checks as its QMP command (`object-add`,
//! `blockdev-add`, `device_add`): [`block::secret::check_object`],
//! [`block::blockdev::check_options`] (unknown keys by name before missing ones, without
//! opening a file) and [`BlkProps::parse`]. What only the whole config shows is checked
//! here: duplicate ids, node-names and PCI slots, and references (a device's `drive`, a
//! node's child, a `key-secret`) to something the config does not define.

use serde_json::Value;

use block::blockdev::NodeNames;
use block::BlockError;

use super::{Entry, VmConfig};
use crate::control::{Action, BlockdevSpec, DeviceSpec, ObjectSpec};
use crate::device_manager::debug_exit::{self, DebugExitProps};
use crate::device_manager::virtio_blk::{BlkProps, PropertyError};

/// Why the config's objects, block nodes or devices were refused; each names the entry
/// (`devices[1]`) and the key, in QEMU's words where QEMU has them.
#[derive(Debug, thiserror::Error)]
pub enum ColdPlugError {
    /// An `objects`/`blockdevs` entry's options are wrong (the error has the key path).
    #[error(transparent)]
    Options(#[from] BlockError),
    /// Two objects have the same id.
    #[error("{path}: attempt to add duplicate object '{id}'")]
    DuplicateObject {
        /// The entry (`objects[1]`).
        path: String,
        /// The id.
        id: String,
    },
    /// A node option names a node that no earlier node defines.
    #[error("{key}: Cannot find device='' nor node-name='{name}'")]
    NoNode {
        /// Key path of the option (`blockdevs[1].file`).
        key: String,
        /// The node-name.
        name: String,
    },
    /// Two nodes have the same node-name.
    #[error("{key}: Duplicate nodes with node-name='{name}'")]
    DuplicateNode {
        /// Key path of the second `node-name`.
        key: String,
        /// The node-name.
        name: String,
    },
    /// A `key-secret` names no object.
    #[error("{key}: No secret with id '{id}'")]
    NoSecret {
        /// Key path of the `key-secret`.
        key: String,
        /// The id.
        id: String,
    },
    /// A device property is wrong.
    #[error("{path}: {source}")]
    Property {
        /// The entry (`devices[0]`).
        path: String,
        /// What is wrong, in QEMU's words.
        #[source]
        source: PropertyError,
    },
    /// Two devices have the same id.
    #[error("{path}: Duplicate device ID '{id}'")]
    DuplicateDevice {
        /// The entry (`devices[1]`).
        path: String,
        /// The id.
        id: String,
    },
    /// A device's `drive` names no node of the config.
    #[error("{path}: Property 'virtio-blk-device.drive' can't find value '{drive}'")]
    NoDrive {
        /// The entry (`devices[0]`).
        path: String,
        /// The node-name.
        drive: String,
    },
    /// Two devices ask for the same PCI slot.
    #[error("{path}: PCI: slot {slot} function 0 not available for virtio-blk-pci, in use")]
    SlotInUse {
        /// The entry (`devices[1]`).
        path: String,
        /// The slot.
        slot: u8,
    },
}

/// One `objects` entry, checked.
#[derive(Debug, Clone)]
pub struct PlannedObject {
    /// Its id.
    pub id: String,
    /// What adds it.
    pub spec: ObjectSpec,
}

/// One `blockdevs` entry, checked.
#[derive(Debug, Clone)]
pub struct PlannedBlockdev {
    /// The node-names it defines and refers to.
    pub names: NodeNames,
    /// What adds it.
    pub spec: BlockdevSpec,
}

/// One `isa-debug-exit` entry of `devices`, checked.
#[derive(Debug, Clone)]
pub struct PlannedDebugExit {
    /// The entry (`devices[1]`).
    pub path: String,
    /// Its properties.
    pub props: DebugExitProps,
}

/// Everything the config cold-plugs, in order, checked.
#[derive(Debug, Clone, Default)]
pub struct ColdPlug {
    /// Secrets.
    pub objects: Vec<PlannedObject>,
    /// Block nodes.
    pub blockdevs: Vec<PlannedBlockdev>,
    /// Disks.
    pub devices: Vec<DeviceSpec>,
    /// `isa-debug-exit` devices: placed on the port bus when the VM is built, not
    /// through an [`Action`] (they cannot be hot-plugged).
    pub debug_exits: Vec<PlannedDebugExit>,
}

impl ColdPlug {
    /// The actions that make it, in order (secrets, block nodes, disks): what
    /// [`crate::control::VmControl::execute`] runs, as it runs QMP's.
    pub fn actions(&self) -> impl Iterator<Item = Action> + '_ {
        let objects = self
            .objects
            .iter()
            .map(|o| Action::ObjectAdd(o.spec.clone()));
        let nodes = self
            .blockdevs
            .iter()
            .map(|b| Action::BlockdevAdd(b.spec.clone()));
        let disks = self.devices.iter().cloned().map(Action::DeviceAdd);
        objects.chain(nodes).chain(disks)
    }
}

impl ColdPlug {
    /// Whether a device of the plan has `id`.
    fn has_device_id(&self, id: &str) -> bool {
        self.devices
            .iter()
            .any(|d| d.props.id.as_deref() == Some(id))
            || self
                .debug_exits
                .iter()
                .any(|d| d.props.id.as_deref() == Some(id))
    }

    fn add_debug_exit(
        &mut self,
        path: String,
        args: &serde_json::Map<String, Value>,
    ) -> Result<(), ColdPlugError> {
        let props = DebugExitProps::parse(args).map_err(|source| ColdPlugError::Property {
            path: path.clone(),
            source,
        })?;
        if let Some(id) = &props.id {
            if self.has_device_id(id) {
                let id = id.clone();
                return Err(ColdPlugError::DuplicateDevice { path, id });
            }
        }
        self.debug_exits.push(PlannedDebugExit { path, props });
        Ok(())
    }
}

fn spec_path(list: &str, i: usize) -> String {
    format!("{list}[{i}]")
}

impl VmConfig {
    /// Checks and types the config's objects, block nodes and devices (see the module
    /// documentation); reads no file.
    pub fn cold_plug(&self) -> Result<ColdPlug, ColdPlugError> {
        let mut plan = ColdPlug::default();
        for (i, Entry { args, base_dir }) in self.objects.iter().enumerate() {
            let path = spec_path("objects", i);
            let id = block::secret::check_object(&path, &Value::Object(args.clone()))?;
            if plan.objects.iter().any(|o| o.id == id) {
                return Err(ColdPlugError::DuplicateObject { path, id });
            }
            let spec = ObjectSpec {
                path,
                args: args.clone(),
                base_dir: base_dir.clone(),
            };
            plan.objects.push(PlannedObject { id, spec });
        }
        let mut nodes: Vec<String> = Vec::new();
        for (i, Entry { args, base_dir }) in self.blockdevs.iter().enumerate() {
            let path = spec_path("blockdevs", i);
            let names = block::blockdev::check_options(&path, args)?;
            for (key, name) in &names.defined {
                if nodes.contains(name) {
                    return Err(ColdPlugError::DuplicateNode {
                        key: key.clone(),
                        name: name.clone(),
                    });
                }
            }
            nodes.extend(names.defined.iter().map(|(_, n)| n.clone()));
            if let Some((key, name)) = names.referenced.iter().find(|(_, n)| !nodes.contains(n)) {
                return Err(ColdPlugError::NoNode {
                    key: key.clone(),
                    name: name.clone(),
                });
            }
            if let Some((key, id)) = names
                .secrets
                .iter()
                .find(|(_, id)| !plan.objects.iter().any(|o| o.id == *id))
            {
                return Err(ColdPlugError::NoSecret {
                    key: key.clone(),
                    id: id.clone(),
                });
            }
            let spec = BlockdevSpec {
                path,
                args: args.clone(),
                base_dir: base_dir.clone(),
            };
            plan.blockdevs.push(PlannedBlockdev { names, spec });
        }
        for (i, Entry { args, .. }) in self.devices.iter().enumerate() {
            let path = spec_path("devices", i);
            if debug_exit::is_driver(args) {
                plan.add_debug_exit(path, args)?;
                continue;
            }
            let props =
                BlkProps::parse(args, self.cpus).map_err(|source| ColdPlugError::Property {
                    path: path.clone(),
                    source,
                })?;
            // In the order the machine checks them when it adds the device.
            if let Some(id) = &props.id {
                if plan.has_device_id(id) {
                    let id = id.clone();
                    return Err(ColdPlugError::DuplicateDevice { path, id });
                }
            }
            if let Some(slot) = props.slot {
                if plan.devices.iter().any(|d| d.props.slot == Some(slot)) {
                    return Err(ColdPlugError::SlotInUse { path, slot });
                }
            }
            if !nodes.contains(&props.drive) {
                let drive = props.drive.clone();
                return Err(ColdPlugError::NoDrive { path, drive });
            }
            plan.devices.push(DeviceSpec { path, props });
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(v: Value) -> VmConfig {
        let mut c = VmConfig::default();
        c.apply_json(&v, None).expect("config");
        c
    }

    fn refused(v: Value) -> String {
        config(v)
            .cold_plug()
            .expect_err("must be refused")
            .to_string()
    }

    const RAW: &str = "disk.raw";

    fn raw(name: &str) -> Value {
        json!({"node-name": name, "driver": "file", "filename": RAW})
    }

    fn disk(drive: &str, extra: Value) -> Value {
        let mut d = json!({"driver": "virtio-blk-pci", "drive": drive});
        d.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        d
    }

    #[test]
    fn a_good_config_is_typed() {
        let plan = config(json!({
            "objects": [{"qom-type": "secret", "id": "s0", "data": "x"}],
            "blockdevs": [raw("r"), {"node-name": "l", "driver": "luks", "key-secret": "s0",
                                     "file": {"node-name": "lf", "driver": "file", "filename": "l"}}],
            "devices": [disk("r", json!({"id": "d0", "num-queues": 4, "addr": "0x5"})),
                        disk("l", json!({}))]
        }))
        .cold_plug()
        .expect("valid");
        assert_eq!(plan.objects[0].id, "s0");
        assert_eq!(
            plan.blockdevs[1].names.defined,
            [
                ("blockdevs[1].node-name".to_string(), "l".to_string()),
                ("blockdevs[1].file.node-name".to_string(), "lf".to_string())
            ]
        );
        assert_eq!(plan.devices[0].props.config.num_queues, 4);
        assert_eq!(plan.devices[0].props.slot, Some(5));
        assert_eq!(plan.devices[1].path, "devices[1]");
    }

    #[test]
    fn debug_exits_are_planned_apart_from_the_disks() {
        let plan = config(json!({
            "blockdevs": [raw("r")],
            "devices": [{"driver": "isa-debug-exit", "iobase": "0xf4", "iosize": "0x04", "id": "x"},
                        disk("r", json!({"id": "d0"})),
                        {"driver": "isa-debug-exit"}]
        }))
        .cold_plug()
        .expect("valid");
        assert_eq!(plan.devices.len(), 1);
        assert_eq!(plan.debug_exits.len(), 2);
        assert_eq!(plan.debug_exits[0].props.iobase, 0xf4);
        assert_eq!(plan.debug_exits[0].props.iosize, 4);
        assert_eq!(plan.debug_exits[1].path, "devices[2]");
        assert_eq!(plan.debug_exits[1].props.iobase, 0x501);
        assert_eq!(plan.actions().count(), 2);
    }

    #[test]
    fn every_error_names_its_entry_and_key() {
        let b = json!([raw("r")]);
        let cases = [
            (
                json!({"blockdevs": b, "devices": [disk("r", json!({"num-queues": 0}))]}),
                "devices[0]: Property virtio-blk-pci.num-queues doesn't take value 0 (minimum: 1, maximum: 511)",
            ),
            (
                json!({"blockdevs": b, "devices": [disk("r", json!({"num-queues": 512}))]}),
                "devices[0]: Property virtio-blk-pci.num-queues doesn't take value 512",
            ),
            (
                json!({"blockdevs": b, "devices": [disk("r", json!({"queue-size": 2048}))]}),
                "devices[0]: invalid queue-size property (2048), must be a power of 2 (max 1024)",
            ),
            (
                json!({"blockdevs": b, "devices": [disk("r", json!({"colour": "blue"}))]}),
                "devices[0]: Property 'virtio-blk-pci.colour' not found",
            ),
            (
                json!({"blockdevs": b, "devices": [disk("nope", json!({}))]}),
                "devices[0]: Property 'virtio-blk-device.drive' can't find value 'nope'",
            ),
            (
                json!({"blockdevs": b, "devices": [disk("r", json!({"id": "d"})), disk("r", json!({"id": "d"}))]}),
                "devices[1]: Duplicate device ID 'd'",
            ),
            (
                json!({"blockdevs": b, "devices": [disk("r", json!({"addr": 3})), disk("r", json!({"addr": "3.0"}))]}),
                "devices[1]: PCI: slot 3 function 0 not available",
            ),
            (
                json!({"devices": [{"driver": "isa-debug-exit", "iobase": "0xf4", "colour": 1}]}),
                "devices[0]: Property 'isa-debug-exit.colour' not found",
            ),
            (
                json!({"devices": [{"driver": "isa-debug-exit", "iobase": "f4"}]}),
                "devices[0]: Parameter 'iobase' expects integer",
            ),
            (
                json!({"blockdevs": b, "devices": [disk("r", json!({"id": "d"})),
                                                   {"driver": "isa-debug-exit", "id": "d"}]}),
                "devices[1]: Duplicate device ID 'd'",
            ),
            (
                json!({"blockdevs": [{"node-name": "r", "driver": "file", "filenmae": RAW}]}),
                "blockdevs[0].filenmae: unknown option",
            ),
            (
                json!({"blockdevs": [{"node-name": "l", "driver": "luks", "key-secert": "s0",
                                      "file": {"driver": "file", "filename": RAW}}]}),
                "blockdevs[0].key-secert: unknown option",
            ),
            (
                json!({"blockdevs": [{"node-name": "l", "driver": "raw",
                                      "file": {"driver": "file", "filenmae": RAW}}]}),
                "blockdevs[0].file.filenmae: unknown option",
            ),
            (
                json!({"blockdevs": [{"node-name": "l", "driver": "luks", "key-secret": "s0",
                                      "file": {"driver": "file", "filename": RAW}}]}),
                "blockdevs[0].key-secret: No secret with id 's0'",
            ),
            (
                json!({"blockdevs": [{"node-name": "l", "driver": "raw", "file": "r"}]}),
                "blockdevs[0].file: Cannot find device='' nor node-name='r'",
            ),
            (
                json!({"blockdevs": [raw("r"), raw("r")]}),
                "blockdevs[1].node-name: Duplicate nodes with node-name='r'",
            ),
            (
                json!({"blockdevs": [{"node-name": "r", "driver": "nbd"}]}),
                "blockdevs[0].driver: Invalid parameter 'nbd'",
            ),
            (
                json!({"objects": [{"qom-type": "secret", "id": "s", "data": "x", "fromat": "raw"}]}),
                "objects[0].fromat: unknown option",
            ),
            (
                json!({"objects": [{"qom-type": "secret", "id": "s", "data": "x"},
                                   {"qom-type": "secret", "id": "s", "data": "y"}]}),
                "objects[1]: attempt to add duplicate object 's'",
            ),
        ];
        for (v, want) in cases {
            let got = refused(v.clone());
            assert!(got.starts_with(want), "{v}:\n got {got}\nwant {want}");
        }
    }
}
