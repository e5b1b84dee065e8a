//! The `raw` format driver: a window (`offset`, `size`) onto its `file` child.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::json;

use crate::blockdev::DriverKeys;
use crate::node::{check_range, total_len, BlockNode, BlockStatus, NodeRef};
use crate::options::Opts;
use crate::resize::{Prealloc, ResizeError};
use crate::{BlockError, Result, WriteTurn};

/// A pass-through node, optionally restricted to part of its child.
pub struct RawNode {
    child: NodeRef,
    offset: u64,
    /// The window's size; changes on resize.
    size: AtomicU64,
    /// `size` was given: the window cannot be resized (as QEMU).
    fixed: bool,
    read_only: bool,
}

impl RawNode {
    /// The options of a `raw` node.
    pub const KEYS: DriverKeys = DriverKeys {
        keys: &["file", "offset", "size"],
        required: &["file"],
        children: &["file"],
    };

    /// Opens a `raw` node over `child` from its driver-specific options.
    pub fn open(o: &mut Opts, child: NodeRef, read_only: bool) -> Result<Self> {
        let offset = o.u64("offset")?.unwrap_or(0);
        let child_size = child.size();
        let size = o.u64("size")?;
        let fixed = size.is_some();
        let size = match size {
            Some(s) => s,
            None => child_size.checked_sub(offset).ok_or_else(|| {
                o.error(
                    "offset",
                    format!("offset {offset} is beyond the end of the file ({child_size} bytes)"),
                )
            })?,
        };
        if offset.checked_add(size).is_none_or(|end| end > child_size) {
            return Err(BlockError::option(
                o.path(),
                format!(
                    "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the actual size of the containing file ({child_size})"
                ),
            ));
        }
        Ok(Self {
            child,
            offset,
            size: AtomicU64::new(size),
            fixed,
            read_only,
        })
    }
}

impl BlockNode for RawNode {
    fn driver(&self) -> &'static str {
        "raw"
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn block_size(&self) -> u64 {
        self.child.block_size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range("raw", self.size(), offset, buf.len() as u64)?;
        self.child.read_at(self.offset + offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly("raw".into()));
        }
        check_range("raw", self.size(), offset, buf.len() as u64)?;
        self.child.write_at(self.offset + offset, buf)
    }

    fn read_vectored(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        check_range("raw", self.size(), offset, total_len(bufs))?;
        self.child.read_vectored(self.offset + offset, bufs)
    }

    fn write_vectored(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly("raw".into()));
        }
        check_range("raw", self.size(), offset, total_len(bufs))?;
        self.child.write_vectored(self.offset + offset, bufs)
    }

    fn write_in_turn(&self, offset: u64, bufs: &[&[u8]], turn: &dyn WriteTurn) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly("raw".into()));
        }
        check_range("raw", self.size(), offset, total_len(bufs))?;
        self.child.write_in_turn(self.offset + offset, bufs, turn)
    }

    fn flush(&self) -> Result<()> {
        self.child.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range("raw", self.size(), offset, len)?;
        self.child.discard(self.offset + offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly("raw".into()));
        }
        check_range("raw", self.size(), offset, len)?;
        self.child.write_zeroes(self.offset + offset, len)
    }

    /// The child's status at the shifted offset (QEMU's `BDRV_BLOCK_RAW`):
    /// what the file says, allocated at this layer.
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range("raw", self.size(), offset, len)?;
        let st = self.child.block_status(self.offset + offset, len)?;
        Ok(BlockStatus {
            allocated: st.allocated || st.data || st.zero,
            ..st
        })
    }

    fn info(&self) -> serde_json::Value {
        if self.offset == 0 && self.size() == self.child.size() {
            serde_json::Value::Null
        } else {
            json!({"offset": self.offset, "size": self.size()})
        }
    }

    fn resize(&self, size: u64) -> Result<()> {
        self.truncate(size, Prealloc::Off)
    }

    /// As QEMU's raw format: the child is resized to the window's new end.
    fn truncate(&self, size: u64, prealloc: Prealloc) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly("raw".into()));
        }
        if self.fixed {
            return Err(ResizeError::FixedSizeRaw.into());
        }
        let end = self
            .offset
            .checked_add(size)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or(ResizeError::TooLarge)?;
        self.child.truncate(end, prealloc)?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    fn children(&self) -> Vec<(&'static str, NodeRef)> {
        vec![("file", self.child.clone())]
    }
}
