//! What `qemu-img info` and QMP's `query-block` say of a node: QAPI's
//! `ImageInfo`, shaped as their JSON.

use serde_json::{json, Map, Value};

use crate::NodeRef;

/// `ImageInfo` of a node, shaped as qemu-img's JSON.
pub fn node_info(node: &NodeRef) -> Value {
    // As qemu-img info, which opens images without their backing chain.
    let children: Vec<Value> = node
        .children()
        .into_iter()
        .filter(|(role, _)| *role != "backing")
        .map(|(role, child)| json!({"name": role, "info": node_info(&child)}))
        .collect();
    let mut m = Map::new();
    m.insert("children".into(), Value::Array(children));
    m.insert("virtual-size".into(), json!(node.size()));
    m.insert("filename".into(), json!(display_name(node)));
    m.insert("format".into(), json!(node.driver()));
    if let Some(actual) = node.allocated_size() {
        m.insert("actual-size".into(), json!(actual));
    }
    let specific = match node.driver() {
        "file" => json!({"type": "file", "data": {}}),
        _ => node.info(),
    };
    let qcow2_encrypted = node.driver() == "qcow2"
        && specific
            .get("data")
            .and_then(|d| d.get("encrypt"))
            .is_some();
    if !specific.is_null() {
        m.insert("format-specific".into(), specific);
    }
    if node.driver() == "luks" || qcow2_encrypted {
        m.insert("encrypted".into(), json!(true));
    }
    m.insert("dirty-flag".into(), json!(false));
    // Driver fields (cluster-size, backing file, a set dirty flag) last, so they win.
    m.extend(node.image_info());
    Value::Object(m)
}

/// The host file name behind a node (through `file` children), as qemu-img shows it.
pub fn display_name(node: &NodeRef) -> String {
    if let Some(f) = node.filename() {
        return f.to_string();
    }
    node.children()
        .into_iter()
        .find(|(role, _)| *role == "file")
        .map(|(_, c)| display_name(&c))
        .unwrap_or_default()
}
