//! The interface every block driver implements.

use std::sync::Arc;

use serde_json::Value;

use crate::resize::{Prealloc, ResizeError};
use crate::write_turn::WriteTurn;
use crate::{BlockError, Result};

/// A shared handle to a block node.
pub type NodeRef = Arc<dyn BlockNode>;

/// A node of the block graph: a disk-like byte array with a fixed size.
///
/// All methods take `&self` so that several I/O threads can use one node at
/// once; drivers keep whatever state they mutate behind their own locks.
pub trait BlockNode: Send + Sync {
    /// The QMP driver name (`file`, `raw`, `luks`, ...).
    fn driver(&self) -> &'static str;
    /// Size in bytes as seen by the node's users.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// The smallest write the node does without reading back: a guest disk
    /// shows it as its logical block size unless told otherwise (LUKS2 with
    /// 4096-byte sectors gives 4096). 512 by default.
    fn block_size(&self) -> u64 {
        crate::SECTOR_SIZE
    }
    /// Fill `buf` from `offset`; reading past the end is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Write `buf` at `offset`; writing past the end is an error.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()>;
    /// Fills `bufs` one after the other from `offset`, as one request (the
    /// guest's scatter-gather list). Drivers that can do this in one step
    /// (one `preadv`, one parallel decryption) override it.
    fn read_vectored(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        check_range(self.driver(), self.size(), offset, total_len(bufs))?;
        let mut pos = offset;
        for buf in bufs.iter_mut() {
            self.read_at(pos, buf)?;
            pos += buf.len() as u64;
        }
        Ok(())
    }
    /// Writes `bufs` one after the other at `offset`, as one request.
    fn write_vectored(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        // All or nothing: never a partial write of a request beyond the end.
        check_range(self.driver(), self.size(), offset, total_len(bufs))?;
        let mut pos = offset;
        for buf in bufs {
            self.write_at(pos, buf)?;
            pos += buf.len() as u64;
        }
        Ok(())
    }
    /// Writes as [`BlockNode::write_vectored`], as one of a sequence of writes
    /// that allocate in order ([`crate::write_turn`]): `turn.wait()` before
    /// anything is allocated for it, `turn.pass()` once it all is. Drivers
    /// that allocate, or whose children do, override it; by default the whole
    /// write happens in turn.
    fn write_in_turn(&self, offset: u64, bufs: &[&[u8]], turn: &dyn WriteTurn) -> Result<()> {
        turn.wait()?;
        let written = self.write_vectored(offset, bufs);
        turn.pass();
        written
    }
    /// The unit of compressed writes (the cluster size) when the driver can
    /// write compressed data ([`BlockNode::write_compressed`]), else None.
    fn compressed_write_unit(&self) -> Option<u64> {
        None
    }
    /// Writes `buf` at `offset` compressed, as QEMU's
    /// `BDRV_REQ_WRITE_COMPRESSED`: whole units of
    /// [`compressed_write_unit`](Self::compressed_write_unit) (the last one
    /// may end at the end of the node) into unallocated ones. An empty `buf`
    /// ends a series of compressed writes. With a `turn`, allocations wait
    /// for it and it is passed once they are made (see
    /// [`write_in_turn`](Self::write_in_turn)). Drivers that cannot
    /// compress refuse.
    fn write_compressed(
        &self,
        offset: u64,
        buf: &[u8],
        turn: Option<&dyn WriteTurn>,
    ) -> Result<()> {
        let _ = (offset, buf);
        if let Some(t) = turn {
            t.pass();
        }
        Err(BlockError::NotSupported(format!(
            "'{}' nodes cannot write compressed data",
            self.driver()
        )))
    }
    /// Make previous writes durable.
    fn flush(&self) -> Result<()>;
    /// Hint that a range is unused; it may read back as anything afterwards
    /// unless the driver says otherwise. Drivers may ignore it.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Make a range read back as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    /// Change the size (new bytes read as zeros). Only protocol nodes can;
    /// format drivers grow their image file this way or by writing past its end.
    fn resize(&self, size: u64) -> Result<()> {
        let _ = size;
        Err(BlockError::NotSupported(format!(
            "'{}' nodes cannot be resized",
            self.driver()
        )))
    }
    /// Change the size as QEMU's `truncate` does, allocating the new bytes
    /// as `prealloc` says. Drivers that preallocate override it; by default
    /// only `off` is done (by [`BlockNode::resize`]).
    fn truncate(&self, size: u64, prealloc: Prealloc) -> Result<()> {
        match prealloc {
            Prealloc::Off => self.resize(size),
            other => Err(ResizeError::UnsupportedPrealloc(other).into()),
        }
    }
    /// Rewrites the image's reference to its backing file (`None`: no
    /// backing file) and the backing format, as QEMU's
    /// `bdrv_change_backing_file`; the open node's backing node is unchanged.
    fn change_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        let _ = (name, format);
        Err(BlockError::NotSupported(format!(
            "'{}' images have no backing file reference",
            self.driver()
        )))
    }
    /// Makes the image read as its backing file everywhere (QEMU's
    /// `bdrv_make_empty`); drivers without one refuse.
    fn make_empty(&self) -> Result<()> {
        Err(BlockError::NotSupported(format!(
            "'{}' images cannot be emptied",
            self.driver()
        )))
    }
    /// Driver-specific information, shaped as QEMU's `format-specific` data
    /// (`null` when there is none).
    fn info(&self) -> Value {
        Value::Null
    }
    /// Extra top-level `ImageInfo` fields as qemu-img shows them
    /// (`cluster-size`, `backing-filename`, `backing-filename-format`, ...).
    fn image_info(&self) -> serde_json::Map<String, Value> {
        serde_json::Map::new()
    }
    /// Children by role (`file`, `header`, `backing`, ...).
    fn children(&self) -> Vec<(&'static str, NodeRef)> {
        Vec::new()
    }
    /// The host file behind this node, when it is a protocol node.
    fn filename(&self) -> Option<&str> {
        None
    }
    /// Allocation status of the bytes from `offset` (QEMU's
    /// `bdrv_block_status`): how many of the next `len` bytes share one status,
    /// and that status. `len` > 0 and the range lies within the node.
    ///
    /// By default the whole range is data allocated at this layer, mapped
    /// one to one onto the host file for protocol nodes (those with a
    /// [`filename`](Self::filename)) and at an unknown place otherwise.
    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_range(self.driver(), self.size(), offset, len)?;
        let host = self.filename().map(|f| HostMapping {
            file: f.to_string(),
            offset,
        });
        Ok(BlockStatus {
            host,
            ..BlockStatus::data(len)
        })
    }
    /// The internal snapshots (QEMU's `bdrv_snapshot_list`).
    fn snapshot_list(&self) -> Result<Vec<crate::snapshot::SnapshotInfo>> {
        Err(crate::snapshot::SnapshotError::NotSupported.into())
    }
    /// Creates an internal snapshot of the active image named `name`, with
    /// the next free numeric ID and the given creation time.
    fn snapshot_create(&self, name: &str, date_sec: u32, date_nsec: u32) -> Result<()> {
        let _ = (name, date_sec, date_nsec);
        Err(crate::snapshot::SnapshotError::NotSupported.into())
    }
    /// Makes the active image the snapshot's contents (QEMU's `bdrv_snapshot_goto`).
    fn snapshot_goto(&self, which: &str) -> Result<()> {
        let _ = which;
        Err(crate::snapshot::SnapshotError::NotSupported.into())
    }
    /// Deletes the snapshot of this ID and name.
    fn snapshot_delete(&self, id: &str, name: &str) -> Result<()> {
        let _ = (id, name);
        Err(crate::snapshot::SnapshotError::NotSupported.into())
    }
    /// Reads the snapshot instead of the active image from now on, on a
    /// read-only node (QEMU's `bdrv_snapshot_load_tmp`).
    fn snapshot_load_tmp(&self, which: crate::snapshot::SnapshotRef<'_>) -> Result<()> {
        let _ = which;
        Err(crate::snapshot::SnapshotError::NotSupported.into())
    }
    /// Bytes the node occupies on the host (as `disk size` in `qemu-img
    /// info`): by default the sum over its children.
    fn allocated_size(&self) -> Option<u64> {
        self.children()
            .iter()
            .map(|(_, c)| c.allocated_size())
            .sum()
    }
}

/// Where a run of a node's bytes lies in a host file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostMapping {
    /// The host file's name, as its `file` node shows it.
    pub file: String,
    /// Byte offset of the run's first byte in that file.
    pub offset: u64,
}

/// The allocation status of a run of bytes (QEMU's `BDRV_BLOCK_*` flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockStatus {
    /// Bytes from the queried offset that share this status (at least 1).
    pub len: u64,
    /// Reads return data stored at this layer or below it (`BDRV_BLOCK_DATA`).
    pub data: bool,
    /// Reads return zeros (`BDRV_BLOCK_ZERO`).
    pub zero: bool,
    /// This layer defines the content (`BDRV_BLOCK_ALLOCATED`); when false,
    /// the content comes from the backing node.
    pub allocated: bool,
    /// Stored compressed (`BDRV_BLOCK_COMPRESSED`).
    pub compressed: bool,
    /// The place in a host file, when known (`BDRV_BLOCK_OFFSET_VALID`).
    pub host: Option<HostMapping>,
}

impl BlockStatus {
    /// `len` bytes of data allocated at this layer, place unknown.
    pub fn data(len: u64) -> Self {
        Self {
            len,
            data: true,
            zero: false,
            allocated: true,
            compressed: false,
            host: None,
        }
    }

    /// `len` bytes that read as zeros, allocated at this layer.
    pub fn zeros(len: u64) -> Self {
        Self {
            zero: true,
            data: false,
            ..Self::data(len)
        }
    }

    /// `len` bytes this layer does not define: they come from the backing node.
    pub fn unallocated(len: u64) -> Self {
        Self {
            data: false,
            allocated: false,
            ..Self::data(len)
        }
    }
}

/// Total length of a scatter-gather list.
pub fn total_len<B: AsRef<[u8]>>(bufs: &[B]) -> u64 {
    bufs.iter().map(|b| b.as_ref().len() as u64).sum()
}

/// Checks that `[offset, offset+len)` lies within a node of `size` bytes.
pub fn check_range(node: &str, size: u64, offset: u64, len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange {
            node: node.to_string(),
            offset,
            len,
            size,
        }),
    }
}

/// Writes zeros over a range with ordinary writes, in bounded chunks.
pub fn write_zeroes_by_writing(node: &dyn BlockNode, offset: u64, len: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        node.write_at(offset + done, &zeros[..n as usize])?;
        done += n;
    }
    Ok(())
}
