//! `blockdev-add` arguments: the options every node takes, and dispatch to
//! the driver that opens a node of the requested kind.

use std::path::Path;

use crate::file::FileNode;
use crate::luks::node::LuksNode;
use crate::node::NodeRef;
use crate::options::Opts;
use crate::qcow2::{Backing, Qcow2Node};
use crate::raw::RawNode;
use crate::secret::SecretStore;
use crate::{BlockError, Result};

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
            .ok_or_else(|| o.error(key, "missing mandatory option"))
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
            std::sync::Arc::new(LuksNode::open(o, file, header, common.read_only, ctx)?)
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
        other => {
            return Err(o.error(
                "driver",
                format!(
                    "Invalid parameter '{other}' (supported drivers: {})",
                    DRIVERS.join(", ")
                ),
            ))
        }
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
