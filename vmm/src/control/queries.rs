//! QMP query results shaped as QEMU's: `query-block`,
//! `query-named-block-nodes` (`BlockDeviceInfo`) and `query-pci`.

use serde_json::{json, Value};

use block::{BlockGraph, NodeRef};
use devices::pci::{BarKind, PciRoot, NUM_SLOTS};

use block::info::{display_name, node_info};

/// QEMU's `BlockDeviceInfo` of node `name`.
pub fn block_device_info(name: &str, node: &NodeRef, flat: bool) -> Value {
    let mut image = node_info(node);
    if flat {
        if let Some(m) = image.as_object_mut() {
            m.remove("backing-image");
        }
    }
    let backing = node
        .children()
        .into_iter()
        .find(|(role, _)| *role == "backing")
        .map(|(_, b)| b);
    let mut depth = 0;
    let mut cur = backing.clone();
    while let Some(b) = cur {
        depth += 1;
        cur = b
            .children()
            .into_iter()
            .find(|(role, _)| *role == "backing")
            .map(|(_, b)| b);
    }
    let mut info = json!({
        "file": display_name(node),
        "node-name": name,
        "ro": node.read_only(),
        "drv": node.driver(),
        "backing_file_depth": depth,
        "encrypted": node.driver() == "luks",
        "detect_zeroes": "off",
        "bps": 0, "bps_rd": 0, "bps_wr": 0,
        "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "cache": {"writeback": true, "direct": false, "no-flush": false},
        "active": true,
        "image": image,
    });
    if let Some(b) = backing {
        info["backing_file"] = json!(display_name(&b));
    }
    info
}

/// `query-named-block-nodes`: every node of `graph`.
pub fn named_block_nodes(graph: &BlockGraph, flat: bool) -> Value {
    Value::Array(
        graph
            .names()
            .filter_map(|name| graph.get(name).map(|n| block_device_info(name, &n, flat)))
            .collect(),
    )
}

/// `query-block`: one entry per disk (its qdev path, its `drive` node).
pub fn block(graph: &BlockGraph, disks: &[(String, String)]) -> Value {
    Value::Array(
        disks
            .iter()
            .map(|(qdev, drive)| {
                let mut entry = json!({
                    "device": "",
                    "qdev": qdev,
                    "locked": false,
                    "removable": false,
                    "type": "unknown",
                    "io-status": "ok",
                });
                if let Some(node) = graph.get(drive) {
                    entry["inserted"] = block_device_info(drive, &node, false);
                }
                entry
            })
            .collect(),
    )
}

fn config_u32(root: &PciRoot, slot: u8, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    root.config_read(0, slot, 0, offset, &mut b);
    u32::from_le_bytes(b)
}

/// `query-pci`: bus 0 and its functions. `qdev_id` names a slot's device.
pub fn pci(root: &PciRoot, qdev_id: impl Fn(u8) -> Option<String>) -> Value {
    let mut devices = Vec::new();
    for slot in 0..NUM_SLOTS as u8 {
        let Some(dev) = root.device(slot) else {
            continue;
        };
        let ids = config_u32(root, slot, 0);
        let class = config_u32(root, slot, 8);
        let subsys = config_u32(root, slot, 0x2c);
        let regions: Vec<Value> = dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_regions()
            .iter()
            .map(|r| match r.kind {
                BarKind::Io => json!({"bar": r.index, "type": "io",
                    "address": r.addr, "size": r.size}),
                kind => json!({"bar": r.index, "type": "memory", "address": r.addr,
                    "size": r.size, "prefetch": r.prefetchable,
                    "mem_type_64": kind == BarKind::Memory64}),
            })
            .collect();
        let class_code = class >> 16;
        let mut info = json!({
            "bus": 0,
            "slot": slot,
            "function": 0,
            "class_info": {"class": class_code},
            "id": {
                "vendor": ids & 0xffff,
                "device": ids >> 16,
                "subsystem-vendor": subsys & 0xffff,
                "subsystem": subsys >> 16,
            },
            "regions": regions,
            "qdev_id": qdev_id(slot).unwrap_or_default(),
        });
        if let Some(desc) = class_desc(class_code) {
            info["class_info"]["desc"] = json!(desc);
        }
        devices.push(info);
    }
    json!([{"bus": 0, "devices": devices}])
}

fn class_desc(class: u32) -> Option<&'static str> {
    Some(match class {
        0x0600 => "Host bridge",
        0x0100 => "SCSI controller",
        0x0180 => "Storage controller",
        _ => return None,
    })
}
