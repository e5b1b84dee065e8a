//! `blockdev-add` arguments: the options every node takes, and dispatch to
//! the driver that opens a node of the requested kind.

use std::path::Path;

use serde_json::{Map, Value};

use crate::file::FileNode;
use crate::luks::node::LuksNode;
use crate::luks::shared::HeaderSlot;
use crate::node::NodeRef;
use crate::options::{Opts, MISSING_OPTION};
use crate::qcow2::{Backing, Qcow2Node};
use crate::raw::RawNode;
use crate::secret::SecretStore;
use crate::{BlockError, Result};

/// The keys QEMU's `BlockdevOptions` base gives every node, whatever its driver.
pub const COMMON_KEYS: &[&str] = &[
    "node-name",
    "driver",
    "read-only",
    "auto-read-only",
    "cache",
    "discard",
    "detect-zeroes",
    "force-share",
];

/// The keys of the `cache` object.
pub const CACHE_KEYS: &[&str] = &["direct", "no-flush"];

/// What a driver declares about its options beyond [`COMMON_KEYS`], so that
/// an unknown key is reported by name before a mandatory one is missed
/// ([`Opts::check_keys`]), and so that options can be checked without
/// opening anything ([`check_options`]).
#[derive(Clone, Copy, Debug)]
pub struct DriverKeys {
    /// Every key the driver reads.
    pub keys: &'static [&'static str],
    /// The keys it cannot do without.
    pub required: &'static [&'static str],
    /// The keys naming a child node (a node-name, or an inline definition).
    pub children: &'static [&'static str],
}

/// The keys of `driver`'s nodes; `None` for a driver `blockdev-add` does not know.
pub fn driver_keys(driver: &str) -> Option<DriverKeys> {
    Some(match driver {
        "file" | "host_device" => FileNode::KEYS,
        "raw" => RawNode::KEYS,
        "luks" => LuksNode::KEYS,
        "qcow2" => Qcow2Node::KEYS,
        _ => return None,
    })
}

/// The error for a `driver` no node can have.
pub fn unknown_driver(o: &Opts, driver: &str) -> BlockError {
    o.error(
        "driver",
        format!(
            "Invalid parameter '{driver}' (supported drivers: {})",
            DRIVERS.join(", ")
        ),
    )
}

/// Checks the keys of the node whose options `o` holds, before anything is
/// read from them: its driver, then any key neither the node base nor the
/// driver knows, then the driver's mandatory keys (and `node-name` when
/// `need_name`). Returns the driver's keys.
pub fn check_node_keys(o: &Opts, need_name: bool) -> Result<DriverKeys> {
    let driver = match o.get("driver") {
        None => return Err(o.error("driver", MISSING_OPTION)),
        Some(Value::String(d)) => d.clone(),
        Some(other) => {
            return Err(o.error(
                "driver",
                format!("expected a string, got {}", crate::options::kind(other)),
            ))
        }
    };
    let keys = driver_keys(&driver).ok_or_else(|| unknown_driver(o, &driver))?;
    let mut required = keys.required.to_vec();
    if need_name {
        required.insert(0, "node-name");
    }
    o.check_keys(&[COMMON_KEYS, keys.keys], &required)?;
    Ok(keys)
}

/// The node-names one `blockdev-add` defines and refers to, found by
/// [`check_options`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NodeNames {
    /// (key path of the `node-name`, the name) of the node and its inline children.
    pub defined: Vec<(String, String)>,
    /// (key path of the child option, the node-name it refers to).
    pub referenced: Vec<(String, String)>,
    /// (key path of a `key-secret`, the secret id it refers to).
    pub secrets: Vec<(String, String)>,
}

/// Checks `blockdev-add` arguments without opening anything (a config is
/// checked so before the VM exists): every node's driver, unknown keys (by
/// name) before missing mandatory ones, node-names, and the shape of child
/// options, inline children included. `path` prefixes the key paths in
/// errors. The references found are for the caller to resolve.
pub fn check_options(path: &str, args: &Map<String, Value>) -> Result<NodeNames> {
    let map = crate::keyval::unflatten(args.clone())
        .map_err(|e| BlockError::option(path, e.to_string()))?;
    let mut names = NodeNames::default();
    check_node(Opts::new(path, map), true, &mut names)?;
    Ok(names)
}

fn check_node(mut o: Opts, top: bool, names: &mut NodeNames) -> Result<()> {
    let keys = check_node_keys(&o, top)?;
    if let Some(name) = o.str("node-name")? {
        crate::graph::check_node_name(&name).map_err(|msg| o.error("node-name", msg))?;
        if names.defined.iter().any(|(_, n)| *n == name) {
            return Err(o.error(
                "node-name",
                format!("Duplicate nodes with node-name='{name}'"),
            ));
        }
        names.defined.push((o.key_path("node-name"), name));
    }
    if keys.keys.contains(&"key-secret") {
        if let Some(id) = o.str("key-secret")? {
            names.secrets.push((o.key_path("key-secret"), id));
        }
    }
    for &child in keys.children {
        match o.take(child) {
            None | Some(Value::Null) => {}
            Some(Value::String(name)) => names.referenced.push((o.key_path(child), name)),
            Some(Value::Object(map)) => {
                check_node(Opts::new(o.key_path(child), map), false, names)?
            }
            Some(other) => {
                return Err(o.error(
                    child,
                    format!(
                        "expected a node-name or an object, got {}",
                        crate::options::kind(&other)
                    ),
                ))
            }
        }
    }
    if let Some(cache) = o.take("cache") {
        let c = Opts::from_value(o.key_path("cache"), cache)?;
        c.check_keys(&[CACHE_KEYS], &[])?;
    }
    Ok(())
}

/// Options QEMU's `BlockdevOptions` base gives every driver.
#[derive(Clone, Debug, Default)]
pub struct Common {
    /// `read-only`.
    pub read_only: bool,
    /// `auto-read-only`: fall back to read-only when the file is not writable.
    pub auto_read_only: bool,
    /// `cache.direct`: O_DIRECT.
    pub cache_direct: bool,
    /// `cache.no-flush`: ignore flushes.
    pub cache_no_flush: bool,
    /// `discard`: `unmap` passes discards down, `ignore` (default) drops them.
    pub discard_unmap: bool,
}

impl Common {
    /// Takes the common options out of `o`. An inline child inherits its
    /// parent's settings (`parent`); `force_read_only` opens everything
    /// read-only (as `qemu-img info` does).
    pub fn parse(o: &mut Opts, parent: Option<&Common>, force_read_only: bool) -> Result<Self> {
        let mut common = parent.cloned().unwrap_or_default();
        common.read_only = o.bool("read-only")?.unwrap_or(common.read_only) || force_read_only;
        common.auto_read_only = o.bool("auto-read-only")?.unwrap_or(false);
        if let Some(cache) = o.take("cache") {
            let mut c = Opts::from_value(o.key_path("cache"), cache)?;
            c.check_keys(&[CACHE_KEYS], &[])?;
            if let Some(d) = c.bool("direct")? {
                common.cache_direct = d;
            }
            if let Some(n) = c.bool("no-flush")? {
                common.cache_no_flush = n;
            }
            c.finish()?;
        }
        if let Some(d) = o.str("discard")? {
            common.discard_unmap = match d.as_str() {
                "unmap" | "on" => true,
                "ignore" | "off" => false,
                _ => {
                    return Err(o.error(
                        "discard",
                        format!("invalid value '{d}' (expected 'ignore' or 'unmap')"),
                    ))
                }
            };
        }
        if let Some(dz) = o.str("detect-zeroes")? {
            if dz != "off" {
                return Err(o.error(
                    "detect-zeroes",
                    format!("'{dz}' is not supported (only 'off')"),
                ));
            }
        }
        if o.bool("force-share")?.unwrap_or(false) && !common.read_only {
            return Err(o.error("force-share", "force-share=on requires read-only=on"));
        }
        Ok(common)
    }
}

/// Everything a driver may need from outside its own options.
pub struct OpenContext<'a> {
    /// Secrets for `key-secret`.
    pub secrets: &'a SecretStore,
    /// Folder that relative file names resolve against.
    pub base_dir: Option<&'a Path>,
    /// Open only to read metadata (like QEMU's BDRV_O_NO_IO): encrypted
    /// nodes then need no key.
    pub no_io: bool,
    /// Open every node read-only.
    pub read_only: bool,
    /// Which backing files named inside images may be opened.
    pub backing_files: BackingFiles,
    /// Open legacy AES-CBC encrypted qcow2 images, as qemu-img does (system
    /// emulators, the VMM among them, refuse them).
    pub legacy_aes: bool,
}

/// Which backing files a qcow2 header may name and have opened, when the
/// options do not name the backing node themselves (`"backing": "node"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackingFiles {
    /// Only regular files inside the image's own folder tree (symbolic
    /// links resolved): what a VMM opening untrusted images needs, since a
    /// guest reads its backing file through unallocated clusters.
    #[default]
    Contained,
    /// Any regular file or block device the header names, as qemu-img
    /// does; absolute names get a warning on stderr.
    Any,
}

/// Resolves a child option (a node-name reference or an inline definition).
pub trait ChildResolver {
    /// The child at `key` in `o`, if present.
    fn child(&mut self, o: &mut Opts, key: &str, parent: &Common) -> Result<Option<NodeRef>>;

    /// Where the node being opened finds the shared unlock of the detached
    /// LUKS header it resolved at `key` ([`crate::luks::shared`]); `None`
    /// outside a block graph, where nothing is shared.
    fn shared_luks_header(&self, _key: &str) -> Option<HeaderSlot> {
        None
    }
}

/// The drivers `blockdev-add` knows.
pub const DRIVERS: &[&str] = &["file", "raw", "luks", "qcow2"];

/// Opens a node of `driver` from its (remaining) options.
pub fn open_driver(
    driver: &str,
    o: &mut Opts,
    common: &Common,
    children: &mut dyn ChildResolver,
    ctx: &OpenContext<'_>,
) -> Result<NodeRef> {
    let mut required_child = |o: &mut Opts, key: &str| -> Result<NodeRef> {
        children
            .child(o, key, common)?
            .ok_or_else(|| o.error(key, MISSING_OPTION))
    };
    Ok(match driver {
        "file" | "host_device" => std::sync::Arc::new(FileNode::open(o, common, ctx.base_dir)?),
        "raw" => {
            let file = required_child(o, "file")?;
            check_writable(o, "file", &file, common)?;
            std::sync::Arc::new(RawNode::open(o, file, common.read_only)?)
        }
        "luks" => {
            let file = required_child(o, "file")?;
            check_writable(o, "file", &file, common)?;
            let header = children.child(o, "header", common)?;
            let slot = header
                .as_ref()
                .and_then(|_| children.shared_luks_header("header"));
            std::sync::Arc::new(LuksNode::open(
                o,
                file,
                header,
                common.read_only,
                ctx,
                slot,
            )?)
        }
        "qcow2" => {
            let file = required_child(o, "file")?;
            check_writable(o, "file", &file, common)?;
            // Absent: the backing file the image names; null: none; else that node.
            let backing = match o.take("backing") {
                None => Backing::Auto,
                Some(serde_json::Value::Null) => Backing::Disabled,
                Some(v) => {
                    let mut map = serde_json::Map::new();
                    map.insert("backing".into(), v);
                    let mut sub = Opts::new(o.path(), map);
                    let ro = Common {
                        read_only: true,
                        ..common.clone()
                    };
                    match children.child(&mut sub, "backing", &ro)? {
                        Some(node) => Backing::Node(node),
                        None => Backing::Disabled,
                    }
                }
            };
            std::sync::Arc::new(Qcow2Node::open(o, file, backing, common, ctx)?)
        }
        other => return Err(unknown_driver(o, other)),
    })
}

/// A writable node cannot sit on a read-only child.
fn check_writable(o: &Opts, key: &str, child: &NodeRef, common: &Common) -> Result<()> {
    if child.read_only() && !common.read_only {
        return Err(BlockError::option(
            o.key_path(key),
            "the child node is read-only, so this node must be opened with \"read-only\": true",
        ));
    }
    Ok(())
}
