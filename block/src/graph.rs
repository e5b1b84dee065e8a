//! The block graph: nodes by node-name, their parent/child links and users.
//!
//! Knows nothing about formats: [`crate::blockdev`] opens nodes, the graph
//! names them, resolves child references and refuses removals that would
//! leave a dangling user.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde_json::Value;

use crate::blockdev::{check_node_keys, open_driver, ChildResolver, Common, OpenContext};
use crate::keyval;
use crate::luks::shared::{HeaderSlot, SharedHeaders};
use crate::node::NodeRef;
use crate::options::Opts;
use crate::{BlockError, GraphError, Result};

#[derive(Clone)]
struct Entry {
    node: NodeRef,
    /// Node names of this node's children, by role.
    children: Vec<(String, String)>,
    /// Created inline inside another node's options (not owned by the user).
    implicit: bool,
    /// Devices (or other users outside the graph) attached to the node.
    users: Vec<String>,
}

/// All block nodes of a VM (or of an `img` invocation), by node-name.
#[derive(Default, Clone)]
pub struct BlockGraph {
    nodes: BTreeMap<String, Entry>,
    next_implicit: u64,
    /// Detached LUKS headers unlocked once for all the luks nodes naming
    /// them; shared with the graph's staging copies.
    luks_headers: Arc<SharedHeaders>,
}

/// New nodes being opened in a copy of a graph, away from whatever guards the
/// graph itself: [`BlockGraph::stage`], then [`Staging::add`], then
/// [`BlockGraph::merge`].
pub struct Staging {
    /// The node-names the graph had when it was copied.
    before: BTreeSet<String>,
    graph: BlockGraph,
}

impl Staging {
    /// [`BlockGraph::add`] on the copy.
    pub fn add(
        &mut self,
        path: &str,
        args: Value,
        ctx: &OpenContext<'_>,
        anonymous_ok: bool,
    ) -> Result<String> {
        self.graph.add(path, args, ctx, anonymous_ok)
    }
}

impl BlockGraph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node from `blockdev-add` arguments; `path` names them in errors
    /// (`blockdevs[2]`). A top-level node must have a `node-name` unless
    /// `anonymous_ok` (as for qemu-img filenames). Returns the node-name.
    pub fn add(
        &mut self,
        path: &str,
        args: Value,
        ctx: &OpenContext<'_>,
        anonymous_ok: bool,
    ) -> Result<String> {
        let map = match args {
            Value::Object(map) => {
                keyval::unflatten(map).map_err(|e| BlockError::option(path, e.to_string()))?
            }
            other => {
                return Err(BlockError::option(
                    path,
                    format!("expected an object, got {}", crate::options::kind(&other)),
                ))
            }
        };
        let mut added = Vec::new();
        let result = self
            .add_opts(Opts::new(path, map), ctx, None, anonymous_ok, &mut added)
            .map_err(|e| e.at(path));
        if result.is_err() {
            // Undo the inline children opened before the failure.
            for name in added.iter().rev() {
                self.nodes.remove(name);
            }
        }
        result
    }

    fn add_opts(
        &mut self,
        mut o: Opts,
        ctx: &OpenContext<'_>,
        parent: Option<&Common>,
        anonymous_ok: bool,
        added: &mut Vec<String>,
    ) -> Result<String> {
        // The keys first: a misspelt one is named, not reported missing.
        check_node_keys(&o, parent.is_none() && !anonymous_ok)?;
        let name = match o.str("node-name")? {
            Some(name) => {
                check_node_name(&name).map_err(|msg| o.error("node-name", msg))?;
                if self.nodes.contains_key(&name) || added.contains(&name) {
                    return Err(o.error(
                        "node-name",
                        format!("Duplicate nodes with node-name='{name}'"),
                    ));
                }
                name
            }
            None if parent.is_some() || anonymous_ok => self.implicit_name(),
            None => return Err(o.error("node-name", crate::options::MISSING_OPTION)),
        };
        let driver = o.req_str("driver")?;
        let common = Common::parse(&mut o, parent, ctx.read_only)?;
        // Reserve the name so that an inline child cannot take it too; on
        // failure the caller's rollback skips it, as it was never inserted.
        added.push(name.clone());
        let mut resolver = Resolver {
            graph: self,
            ctx,
            parent_name: &name,
            added,
            children: Vec::new(),
        };
        let node = open_driver(&driver, &mut o, &common, &mut resolver, ctx)?;
        let children = std::mem::take(&mut resolver.children);
        o.finish()?;
        self.nodes.insert(
            name.clone(),
            Entry {
                node,
                children,
                implicit: parent.is_some(),
                users: Vec::new(),
            },
        );
        Ok(name)
    }

    fn implicit_name(&mut self) -> String {
        loop {
            self.next_implicit += 1;
            let name = format!("#block{:03}", self.next_implicit);
            if !self.nodes.contains_key(&name) {
                return name;
            }
        }
    }

    /// A copy of the graph in which to open new nodes ([`BlockGraph::add`]) without
    /// holding whatever guards this one: a LUKS unlock may take seconds, and the
    /// VM's other users of the graph must not wait for it. [`BlockGraph::merge`]
    /// brings the new nodes back. The copy shares the nodes (they are references).
    pub fn stage(&self) -> Staging {
        Staging {
            before: self.nodes.keys().cloned().collect(),
            graph: self.clone(),
        }
    }

    /// Adds the nodes `staging` opened since [`BlockGraph::stage`]. Refused, with
    /// this graph unchanged (the new nodes are closed), when meanwhile a node-name
    /// they take was taken or a node they use as a child was removed or replaced.
    pub fn merge(&mut self, staging: Staging) -> Result<()> {
        let Staging { before, mut graph } = staging;
        let new: Vec<String> = graph
            .nodes
            .keys()
            .filter(|name| !before.contains(*name))
            .cloned()
            .collect();
        for name in &new {
            if self.nodes.contains_key(name) {
                return Err(GraphError::Duplicate(name.clone()).into());
            }
            for (_, child) in &graph.nodes[name].children {
                let still_there = new.contains(child)
                    || match (self.nodes.get(child), graph.nodes.get(child)) {
                        (Some(now), Some(then)) => Arc::ptr_eq(&now.node, &then.node),
                        _ => false,
                    };
                if !still_there {
                    return Err(GraphError::NoDeviceNorNode(child.clone()).into());
                }
            }
        }
        for name in new {
            if let Some(entry) = graph.nodes.remove(&name) {
                self.nodes.insert(name, entry);
            }
        }
        self.next_implicit = self.next_implicit.max(graph.next_implicit);
        Ok(())
    }

    /// The detached LUKS headers unlocked in this graph: which luks nodes
    /// share header node `name` ([`SharedHeaders::users`]), and whether it
    /// may be written ([`SharedHeaders::check_writable`]).
    pub fn luks_headers(&self) -> &SharedHeaders {
        &self.luks_headers
    }

    /// The node called `name`.
    pub fn get(&self, name: &str) -> Option<NodeRef> {
        self.nodes.get(name).map(|e| e.node.clone())
    }

    /// Adds `node`, opened outside the graph's drivers (an embedder's own
    /// driver, a test's fault injector), under `name`, with no children.
    pub fn insert_node(&mut self, name: &str, node: NodeRef) -> Result<()> {
        check_node_name(name).map_err(|msg| BlockError::option("node-name", msg))?;
        if self.nodes.contains_key(name) {
            return Err(BlockError::option(
                "node-name",
                format!("Duplicate nodes with node-name='{name}'"),
            ));
        }
        self.nodes.insert(
            name.to_string(),
            Entry {
                node,
                children: Vec::new(),
                implicit: false,
                users: Vec::new(),
            },
        );
        Ok(())
    }

    /// Node names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    /// Children of `name` as (role, node-name).
    pub fn children_of(&self, name: &str) -> &[(String, String)] {
        self.nodes
            .get(name)
            .map(|e| e.children.as_slice())
            .unwrap_or_default()
    }

    /// Names of the nodes that have `name` as a child.
    pub fn parents_of(&self, name: &str) -> Vec<&str> {
        self.nodes
            .iter()
            .filter(|(_, e)| e.children.iter().any(|(_, c)| c == name))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Records that `user` (a device id) uses node `name`.
    pub fn attach(&mut self, name: &str, user: &str) -> Result<NodeRef> {
        let entry = self
            .nodes
            .get_mut(name)
            .ok_or_else(|| GraphError::NoDeviceNorNode(name.to_string()))?;
        if let Some(other) = entry.users.first() {
            return Err(GraphError::PermissionConflict {
                node: name.to_string(),
                holder: other.clone(),
                user: user.to_string(),
            }
            .into());
        }
        entry.users.push(user.to_string());
        Ok(entry.node.clone())
    }

    /// Undoes [`BlockGraph::attach`].
    pub fn detach(&mut self, name: &str, user: &str) {
        if let Some(e) = self.nodes.get_mut(name) {
            e.users.retain(|u| u != user);
        }
    }

    /// Removes node `name` (`blockdev-del`) and the inline children that only
    /// it used. Refused while a device or another node uses it.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        let entry = self
            .nodes
            .get(name)
            .ok_or_else(|| GraphError::NotFound(name.to_string()))?;
        if entry.implicit {
            return Err(GraphError::NotOwned(name.to_string()).into());
        }
        if !entry.users.is_empty() {
            return Err(GraphError::InUse(name.to_string()).into());
        }
        if let Some(parent) = self.parents_of(name).first() {
            return Err(GraphError::InUseBy {
                node: name.to_string(),
                parent: parent.to_string(),
            }
            .into());
        }
        self.remove_tree(name);
        Ok(())
    }

    fn remove_tree(&mut self, name: &str) {
        let Some(entry) = self.nodes.remove(name) else {
            return;
        };
        for (_, child) in entry.children {
            let orphan_inline = self.nodes.get(&child).is_some_and(|c| c.implicit)
                && self.parents_of(&child).is_empty();
            if orphan_inline {
                self.remove_tree(&child);
            }
        }
    }
}

struct Resolver<'g, 'c> {
    graph: &'g mut BlockGraph,
    ctx: &'c OpenContext<'c>,
    parent_name: &'g str,
    added: &'g mut Vec<String>,
    children: Vec<(String, String)>,
}

impl ChildResolver for Resolver<'_, '_> {
    fn child(&mut self, o: &mut Opts, key: &str, parent: &Common) -> Result<Option<NodeRef>> {
        let name = match o.take(key) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(name)) => {
                if name == self.parent_name {
                    return Err(o.error(
                        key,
                        format!("node '{name}' cannot be its own child (cycle)"),
                    ));
                }
                if !self.graph.nodes.contains_key(&name) {
                    return Err(
                        o.error(key, format!("Cannot find device='' nor node-name='{name}'"))
                    );
                }
                name
            }
            Some(Value::Object(map)) => {
                let child_opts = Opts::new(o.key_path(key), map);
                self.graph
                    .add_opts(child_opts, self.ctx, Some(parent), true, self.added)?
            }
            Some(other) => {
                return Err(o.error(
                    key,
                    format!(
                        "expected a node-name or an object, got {}",
                        crate::options::kind(&other)
                    ),
                ))
            }
        };
        self.children.push((key.to_string(), name.clone()));
        Ok(self.graph.get(&name))
    }

    fn shared_luks_header(&self, key: &str) -> Option<HeaderSlot> {
        let (_, header) = self.children.iter().rev().find(|(k, _)| k == key)?;
        Some(HeaderSlot {
            registry: self.graph.luks_headers.clone(),
            header: header.clone(),
            user: self.parent_name.to_string(),
        })
    }
}

/// QEMU's node-name rule: a letter, then letters, digits, `-`, `.` or `_`; at most 31 bytes.
pub(crate) fn check_node_name(name: &str) -> std::result::Result<(), String> {
    let valid = name.len() <= 31
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if valid {
        Ok(())
    } else {
        Err(format!("Invalid node-name: '{name}'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretStore;
    use serde_json::json;

    struct Fixture {
        dir: tempfile::TempDir,
        secrets: SecretStore,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            for f in ["a.img", "b.img"] {
                crate::file::create_file(&dir.path().join(f), 1 << 20).unwrap();
            }
            Self {
                dir,
                secrets: SecretStore::new(),
            }
        }
        fn ctx(&self) -> OpenContext<'_> {
            OpenContext {
                secrets: &self.secrets,
                base_dir: Some(self.dir.path()),
                no_io: false,
                read_only: false,
                backing_files: crate::blockdev::BackingFiles::Contained,
                legacy_aes: false,
            }
        }
    }

    /// Every driver declares its keys: a misspelt one is named before the
    /// mandatory key it stands for is missed, and before any file is opened;
    /// errors without a key say which options they are about.
    #[test]
    fn misspelt_keys_are_named_first() {
        let mut f = Fixture::new();
        // The luks case's secret exists: its error is then about the header (a.img
        // is no LUKS volume), which has no key.
        f.secrets
            .add(
                "objects[0]",
                json!({"qom-type": "secret", "id": "s", "data": "x"}),
                None,
            )
            .unwrap();
        let mut g = BlockGraph::new();
        let err = |g: &mut BlockGraph, v: Value| {
            g.add("blockdevs[0]", v, &f.ctx(), false)
                .unwrap_err()
                .to_string()
        };
        let cases = [
            (
                json!({"node-name": "a", "driver": "file", "filenmae": "a.img"}),
                "blockdevs[0].filenmae: unknown option",
            ),
            (
                json!({"node-name": "a", "driver": "raw", "fiel": "x",
                       "file": {"driver": "file", "filename": "a.img"}}),
                "blockdevs[0].fiel: unknown option",
            ),
            (
                json!({"node-name": "a", "driver": "luks", "key-secert": "s",
                       "file": {"driver": "file", "filename": "a.img"}}),
                "blockdevs[0].key-secert: unknown option",
            ),
            (
                json!({"node-name": "a", "driver": "qcow2", "lazy-refcount": true,
                       "file": {"driver": "file", "filename": "missing.img"}}),
                "blockdevs[0].lazy-refcount: unknown option",
            ),
            (
                json!({"node-name": "a", "driver": "file", "filename": "a.img",
                       "cache": {"drect": true}}),
                "blockdevs[0].cache.drect: unknown option",
            ),
            (
                json!({"driver": "file", "filenmae": "a.img"}),
                "blockdevs[0].filenmae: unknown option",
            ),
            (
                json!({"node-name": "a", "driver": "file"}),
                "blockdevs[0].filename: missing mandatory option",
            ),
            (
                json!({"node-name": "a", "driver": "luks", "key-secret": "s",
                       "file": {"driver": "file", "filename": "a.img"}}),
                "blockdevs[0]: ",
            ),
        ];
        for (v, want) in cases {
            let got = err(&mut g, v.clone());
            assert!(got.starts_with(want), "{v}: {got}");
        }
        assert_eq!(g.names().count(), 0);
        let checked = crate::blockdev::check_options(
            "blockdevs[1]",
            json!({"node-name": "q", "driver": "qcow2", "backing": "base",
                   "file": {"node-name": "qf", "driver": "file", "filename": "a.img"}})
            .as_object()
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            checked.referenced,
            [("blockdevs[1].backing".to_string(), "base".to_string())]
        );
        assert_eq!(checked.defined.len(), 2);
    }

    #[test]
    fn references_and_inline_children() {
        let f = Fixture::new();
        let mut g = BlockGraph::new();
        g.add(
            "b[0]",
            json!({"node-name":"fa","driver":"file","filename":"a.img"}),
            &f.ctx(),
            false,
        )
        .unwrap();
        g.add(
            "b[1]",
            json!({"node-name":"ra","driver":"raw","file":"fa","offset":4096}),
            &f.ctx(),
            false,
        )
        .unwrap();
        g.add(
            "b[2]",
            json!({"node-name":"rb","driver":"raw","file":{"driver":"file","filename":"b.img"}}),
            &f.ctx(),
            false,
        )
        .unwrap();
        assert_eq!(g.get("ra").unwrap().size(), (1 << 20) - 4096);
        assert_eq!(g.parents_of("fa"), vec!["ra"]);
        let inline = g.children_of("rb")[0].1.clone();
        assert!(inline.starts_with('#'));
        // The inline child belongs to its parent.
        assert!(g
            .remove(&inline)
            .unwrap_err()
            .to_string()
            .contains("not owned"));
        g.remove("rb").unwrap();
        assert!(g.get(&inline).is_none());
    }

    #[test]
    fn refusals_name_the_key_path() {
        let f = Fixture::new();
        let mut g = BlockGraph::new();
        g.add(
            "blockdevs[0]",
            json!({"node-name":"fa","driver":"file","filename":"a.img"}),
            &f.ctx(),
            false,
        )
        .unwrap();
        let dup = g.add(
            "blockdevs[1]",
            json!({"node-name":"fa","driver":"file","filename":"b.img"}),
            &f.ctx(),
            false,
        );
        assert_eq!(
            dup.unwrap_err().to_string(),
            "blockdevs[1].node-name: Duplicate nodes with node-name='fa'"
        );
        let unknown = g.add(
            "blockdevs[2]",
            json!({"node-name":"r","driver":"raw","file":"nope"}),
            &f.ctx(),
            false,
        );
        assert_eq!(
            unknown.unwrap_err().to_string(),
            "blockdevs[2].file: Cannot find device='' nor node-name='nope'"
        );
        let cycle = g.add(
            "blockdevs[3]",
            json!({"node-name":"r","driver":"raw","file":"r"}),
            &f.ctx(),
            false,
        );
        assert!(cycle.unwrap_err().to_string().contains("cycle"));
        let inner_dup = json!({"node-name":"x","driver":"raw","file":{"node-name":"x","driver":"file","filename":"b.img"}});
        assert!(g
            .add("blockdevs[4]", inner_dup, &f.ctx(), false)
            .unwrap_err()
            .to_string()
            .contains("blockdevs[4].file.node-name"));
        let bad_key = json!({"node-name":"y","driver":"raw","file":{"driver":"file","filename":"b.img","bogus":1}});
        assert_eq!(
            g.add("blockdevs[5]", bad_key, &f.ctx(), false)
                .unwrap_err()
                .to_string(),
            "blockdevs[5].file.bogus: unknown option"
        );
        // Failed adds leave nothing behind.
        assert_eq!(g.names().collect::<Vec<_>>(), vec!["fa"]);
        assert!(g
            .add(
                "b",
                json!({"driver":"file","filename":"a.img"}),
                &f.ctx(),
                false
            )
            .is_err());
        assert!(g
            .add(
                "b",
                json!({"node-name":"1x","driver":"file","filename":"a.img"}),
                &f.ctx(),
                false
            )
            .is_err());
        assert!(g
            .add(
                "b",
                json!({"node-name":"z","driver":"qcow9","filename":"a.img"}),
                &f.ctx(),
                false
            )
            .is_err());
    }

    #[test]
    fn nodes_in_use_cannot_be_removed() {
        let f = Fixture::new();
        let mut g = BlockGraph::new();
        g.add(
            "b",
            json!({"node-name":"fa","driver":"file","filename":"a.img"}),
            &f.ctx(),
            false,
        )
        .unwrap();
        g.add(
            "b",
            json!({"node-name":"ra","driver":"raw","file":"fa"}),
            &f.ctx(),
            false,
        )
        .unwrap();
        assert!(g
            .remove("fa")
            .unwrap_err()
            .to_string()
            .contains("in use by node 'ra'"));
        g.attach("ra", "virtio-disk0").unwrap();
        assert!(g.attach("ra", "virtio-disk1").is_err());
        assert_eq!(g.remove("ra").unwrap_err().to_string(), "Node ra is in use");
        g.detach("ra", "virtio-disk0");
        g.remove("ra").unwrap();
        g.remove("fa").unwrap();
        assert!(g.remove("fa").is_err());
    }

    #[test]
    fn read_only_children_need_read_only_parents() {
        let f = Fixture::new();
        let mut g = BlockGraph::new();
        g.add(
            "b",
            json!({"node-name":"fa","driver":"file","filename":"a.img","read-only":true}),
            &f.ctx(),
            false,
        )
        .unwrap();
        assert!(g
            .add(
                "b",
                json!({"node-name":"ra","driver":"raw","file":"fa"}),
                &f.ctx(),
                false
            )
            .is_err());
        g.add(
            "b",
            json!({"node-name":"ra","driver":"raw","file":"fa","read-only":true}),
            &f.ctx(),
            false,
        )
        .unwrap();
        assert!(g.get("ra").unwrap().write_at(0, b"x").is_err());
    }

    #[test]
    fn staged_nodes_merge_unless_the_graph_changed_under_them() {
        let f = Fixture::new();
        let file = |name: &str, filename: &str| json!({"node-name": name, "driver": "file", "filename": filename});
        let raw_over_fb = || json!({"node-name": "rc", "driver": "raw", "file": "fb"});
        let mut g = BlockGraph::new();
        g.add("b[0]", file("fa", "a.img"), &f.ctx(), false).unwrap();

        // Opened in the copy: not in the graph until merged; inline children too.
        let mut s = g.stage();
        s.add(
            "b[1]",
            json!({"node-name": "ra", "driver": "raw", "file": "fa"}),
            &f.ctx(),
            false,
        )
        .unwrap();
        s.add(
            "b[2]",
            json!({"node-name": "rb", "driver": "raw",
                   "file": {"driver": "file", "filename": "b.img"}}),
            &f.ctx(),
            false,
        )
        .unwrap();
        assert!(g.get("ra").is_none() && g.get("rb").is_none());
        g.merge(s).unwrap();
        assert_eq!(g.parents_of("fa"), vec!["ra"]);
        let inline = g.children_of("rb")[0].1.clone();
        assert!(g.get(&inline).is_some(), "{inline}");

        // The child was removed meanwhile: refused, nothing added.
        let mut s = g.stage();
        s.add("b[3]", raw_over_fb(), &f.ctx(), false).unwrap_err(); // (no such node in the copy either)
        g.add("b[4]", file("fb", "b.img"), &f.ctx(), false).unwrap();
        let mut s = g.stage();
        s.add("b[5]", raw_over_fb(), &f.ctx(), false).unwrap();
        g.remove("fb").unwrap();
        let e = g.merge(s).unwrap_err();
        assert_eq!(e.to_string(), "Cannot find device='' nor node-name='fb'");
        assert!(g.get("rc").is_none());

        // ... or removed and added again (another node of that name): refused too.
        g.add("b[6]", file("fb", "b.img"), &f.ctx(), false).unwrap();
        let mut s = g.stage();
        s.add("b[7]", raw_over_fb(), &f.ctx(), false).unwrap();
        g.remove("fb").unwrap();
        g.add("b[8]", file("fb", "a.img"), &f.ctx(), false).unwrap();
        assert!(g.merge(s).is_err());
        assert!(g.get("rc").is_none());

        // The node-name was taken meanwhile.
        let mut s = g.stage();
        s.add("b[9]", file("fx", "a.img"), &f.ctx(), false).unwrap();
        g.add("b[10]", file("fx", "b.img"), &f.ctx(), false)
            .unwrap();
        let e = g.merge(s).unwrap_err();
        assert_eq!(e.to_string(), "Duplicate nodes with node-name='fx'");
        assert_eq!(e.kind(), crate::ErrorKind::InUse);
    }
}
