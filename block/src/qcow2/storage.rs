//! The image file under a qcow2 node, which grows as clusters are allocated
//! at its end: writes past the end of the `file` child grow it, as QEMU's
//! file protocol does for format drivers.

use crate::node::NodeRef;
use crate::Result;

/// The qcow2 image file (the `file` child).
pub struct Storage {
    child: NodeRef,
}

impl Storage {
    /// Wraps `child`.
    pub fn new(child: NodeRef) -> Result<Self> {
        Ok(Self { child })
    }

    /// The child node.
    pub fn child(&self) -> &NodeRef {
        &self.child
    }

    /// Current length of the file.
    pub fn len(&self) -> u64 {
        self.child.size()
    }

    /// Reads `buf` at `offset`; bytes past the end of the file read as zeros.
    /// Reads a scatter-gather list at `offset` (zeros past the end).
    pub fn read_vectored(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if offset
            .checked_add(total)
            .is_some_and(|end| end <= self.len())
        {
            return self.child.read_vectored(offset, bufs);
        }
        let mut pos = offset;
        for buf in bufs.iter_mut() {
            self.read_at(pos, buf)?;
            pos += buf.len() as u64;
        }
        Ok(())
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = self.len();
        let inside = len.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, rest) = buf.split_at_mut(inside);
        if !head.is_empty() {
            self.child.read_at(offset, head)?;
        }
        rest.fill(0);
        Ok(())
    }

    /// Writes `buf` at `offset`, growing the file if needed.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.child.write_at(offset, buf)
    }

    /// Writes a scatter-gather list at `offset`, growing the file if needed.
    pub fn write_vectored(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        self.child.write_vectored(offset, bufs)
    }

    /// Makes the file at least `size` bytes long (new bytes read as zeros).
    pub fn extend_to(&self, size: u64) -> Result<()> {
        if size <= self.len() {
            return Ok(());
        }
        self.child.resize(size)
    }

    /// Flushes the file.
    pub fn flush(&self) -> Result<()> {
        self.child.flush()
    }

    /// Passes a discard of freed clusters down (within the file).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.saturating_add(len).min(self.len());
        if end > offset && !self.child.read_only() {
            self.child.discard(offset, end - offset)?;
        }
        Ok(())
    }
}
