//! qemu-img's cache modes (`-t` for the image written, `-T` for the source),
//! as the block options they stand for:
//!
//! | mode | `cache.direct` | `cache.no-flush` | each write flushed |
//! | --- | --- | --- | --- |
//! | `writeback` | off | off | no |
//! | `none` | on | off | no |
//! | `writethrough` | off | off | yes |
//! | `directsync` | on | off | yes |
//! | `unsafe` | off | on | no |
//!
//! Options the image's own options give (`--image-opts`, `json:`) win.

use std::sync::Arc;

use block::{BlockNode, NodeRef, Result, WriteTurn};
use serde_json::{Map, Value};

/// A cache mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// Host page cache, flushes honoured.
    Writeback,
    /// O_DIRECT.
    None,
    /// Host page cache, every write flushed.
    Writethrough,
    /// O_DIRECT, every write flushed.
    Directsync,
    /// Host page cache, flushes ignored.
    Unsafe,
}

impl CacheMode {
    /// Parses a mode name, with qemu-img's error.
    pub fn parse(name: &str) -> std::result::Result<CacheMode, String> {
        Ok(match name {
            "writeback" => CacheMode::Writeback,
            "none" | "off" => CacheMode::None,
            "writethrough" => CacheMode::Writethrough,
            "directsync" => CacheMode::Directsync,
            "unsafe" => CacheMode::Unsafe,
            _ => return Err(format!("Invalid cache option: {name}")),
        })
    }

    fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }

    fn write_through(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }

    /// Adds the mode's `cache` options to an image's top-level options
    /// (inline children inherit them), keeping those already given.
    pub fn apply(self, opts: &mut Map<String, Value>) {
        let cache = opts
            .entry("cache")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(cache) = cache {
            cache.entry("direct").or_insert(Value::Bool(self.direct()));
            cache
                .entry("no-flush")
                .or_insert(Value::Bool(self == CacheMode::Unsafe));
        }
    }

    /// The image's top node as this mode wants it used.
    pub fn wrap(self, node: NodeRef) -> NodeRef {
        if self.write_through() {
            Arc::new(WriteThrough(node))
        } else {
            node
        }
    }
}

/// A node whose every write is flushed before it completes.
struct WriteThrough(NodeRef);

impl WriteThrough {
    fn then_flush(&self, r: Result<()>) -> Result<()> {
        r.and_then(|()| self.0.flush())
    }
}

impl BlockNode for WriteThrough {
    fn driver(&self) -> &'static str {
        self.0.driver()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        self.0.read_only()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.then_flush(self.0.write_at(offset, buf))
    }
    fn read_vectored(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        self.0.read_vectored(offset, bufs)
    }
    fn write_vectored(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        self.then_flush(self.0.write_vectored(offset, bufs))
    }
    fn write_in_turn(&self, offset: u64, bufs: &[&[u8]], turn: &dyn WriteTurn) -> Result<()> {
        self.then_flush(self.0.write_in_turn(offset, bufs, turn))
    }
    fn compressed_write_unit(&self) -> Option<u64> {
        self.0.compressed_write_unit()
    }
    fn write_compressed(
        &self,
        offset: u64,
        buf: &[u8],
        turn: Option<&dyn WriteTurn>,
    ) -> Result<()> {
        self.then_flush(self.0.write_compressed(offset, buf, turn))
    }
    fn flush(&self) -> Result<()> {
        self.0.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.then_flush(self.0.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.then_flush(self.0.write_zeroes(offset, len))
    }
    fn resize(&self, size: u64) -> Result<()> {
        self.0.resize(size)
    }
    fn snapshot_list(&self) -> Result<Vec<block::snapshot::SnapshotInfo>> {
        self.0.snapshot_list()
    }
    fn snapshot_load_tmp(&self, which: block::snapshot::SnapshotRef<'_>) -> Result<()> {
        self.0.snapshot_load_tmp(which)
    }
    fn info(&self) -> Value {
        self.0.info()
    }
    fn image_info(&self) -> Map<String, Value> {
        self.0.image_info()
    }
    fn children(&self) -> Vec<(&'static str, NodeRef)> {
        self.0.children()
    }
    fn filename(&self) -> Option<&str> {
        self.0.filename()
    }
    fn allocated_size(&self) -> Option<u64> {
        self.0.allocated_size()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<block::BlockStatus> {
        self.0.block_status(offset, len)
    }
    fn change_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        self.0.change_backing_file(name, format)
    }
    fn make_empty(&self) -> Result<()> {
        self.0.make_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn modes_as_options() {
        let opts = |mode: &str| {
            let mut m = json!({"driver": "raw"}).as_object().unwrap().clone();
            CacheMode::parse(mode).unwrap().apply(&mut m);
            m["cache"].clone()
        };
        assert_eq!(opts("none"), json!({"direct": true, "no-flush": false}));
        assert_eq!(opts("unsafe"), json!({"direct": false, "no-flush": true}));
        assert_eq!(
            opts("directsync"),
            json!({"direct": true, "no-flush": false})
        );
        assert_eq!(
            CacheMode::parse("fast").unwrap_err(),
            "Invalid cache option: fast"
        );
        // The image's own options win.
        let mut m = json!({"cache": {"direct": false}})
            .as_object()
            .unwrap()
            .clone();
        CacheMode::None.apply(&mut m);
        assert_eq!(m["cache"], json!({"direct": false, "no-flush": false}));
    }
}
