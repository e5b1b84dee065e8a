//! The image file under a qcow2 node, which must grow as clusters are
//! allocated at its end.
//!
//! `BlockNode` has no resize operation and a `file` node's size is fixed
//! when it is opened, so the bytes past the child's size go through a second
//! handle on the same host file (for children that are `file` nodes). Within
//! the child's size all I/O goes through the child node.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::node::NodeRef;
use crate::{BlockError, Result};

/// The qcow2 image file: the `file` child plus room to grow.
pub struct Storage {
    child: NodeRef,
    /// Size of the child node (fixed).
    child_size: u64,
    /// Handle for bytes at or past `child_size`; `None` if the child cannot grow.
    tail: Option<File>,
    /// Logical end of the file (at least `child_size`).
    len: AtomicU64,
    /// `tail` was written since the last flush.
    tail_dirty: AtomicBool,
    name: String,
}

impl Storage {
    /// Wraps `child`; `host_path` is the host file behind it, when known, so
    /// that the image can grow (None for read-only use or non-file children).
    pub fn new(child: NodeRef, host_path: Option<PathBuf>, writable: bool) -> Result<Self> {
        let child_size = child.size();
        let name = child.filename().unwrap_or("qcow2 file").to_string();
        let (tail, len) = match (&host_path, writable) {
            (Some(p), true) => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(p)
                    .map_err(|e| BlockError::io(format!("Could not open '{}'", p.display()), e))?;
                let real = f
                    .metadata()
                    .map_err(|e| BlockError::io(format!("stat '{}'", p.display()), e))?
                    .len();
                (Some(f), real.max(child_size))
            }
            _ => (None, child_size),
        };
        Ok(Self {
            child,
            child_size,
            tail,
            len: AtomicU64::new(len),
            tail_dirty: AtomicBool::new(false),
            name,
        })
    }

    /// The child node.
    pub fn child(&self) -> &NodeRef {
        &self.child
    }

    /// Current logical length of the file.
    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// Reads `buf` at `offset`; bytes past the end of the file read as zeros.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| BlockError::io(&self.name, std::io::ErrorKind::InvalidInput.into()))?;
        let split = end.min(self.child_size).max(offset);
        let (head, rest) = buf.split_at_mut((split - offset) as usize);
        if !head.is_empty() {
            self.child.read_at(offset, head)?;
        }
        if rest.is_empty() {
            return Ok(());
        }
        match &self.tail {
            Some(f) => {
                let mut done = 0;
                while done < rest.len() {
                    match f.read_at(&mut rest[done..], split + done as u64) {
                        Ok(0) => break,
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(BlockError::io(
                                format!("reading '{}' at offset {}", self.name, split),
                                e,
                            ))
                        }
                    }
                }
                rest[done..].fill(0);
            }
            None => rest.fill(0),
        }
        Ok(())
    }

    /// Writes `buf` at `offset`, growing the file if needed.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| BlockError::io(&self.name, std::io::ErrorKind::InvalidInput.into()))?;
        let split = end.min(self.child_size).max(offset);
        let (head, rest) = buf.split_at((split - offset) as usize);
        if !head.is_empty() {
            self.child.write_at(offset, head)?;
        }
        if !rest.is_empty() {
            let f = self.tail.as_ref().ok_or_else(|| {
                BlockError::io(
                    format!(
                        "growing '{}' to {end} bytes (its node cannot grow: {} bytes)",
                        self.name, self.child_size
                    ),
                    std::io::ErrorKind::Unsupported.into(),
                )
            })?;
            f.write_all_at(rest, split).map_err(|e| {
                BlockError::io(format!("writing '{}' at offset {split}", self.name), e)
            })?;
            self.tail_dirty.store(true, Ordering::Release);
        }
        self.len.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }

    /// Makes the file at least `size` bytes long (new bytes read as zeros).
    pub fn extend_to(&self, size: u64) -> Result<()> {
        if size <= self.len() {
            return Ok(());
        }
        let f = self.tail.as_ref().ok_or_else(|| {
            BlockError::io(
                format!("growing '{}'", self.name),
                std::io::ErrorKind::Unsupported.into(),
            )
        })?;
        f.set_len(size)
            .map_err(|e| BlockError::io(format!("growing '{}'", self.name), e))?;
        self.tail_dirty.store(true, Ordering::Release);
        self.len.fetch_max(size, Ordering::AcqRel);
        Ok(())
    }

    /// Flushes the child and the growth handle.
    pub fn flush(&self) -> Result<()> {
        self.child.flush()?;
        if let Some(f) = &self.tail {
            if self.tail_dirty.swap(false, Ordering::AcqRel) {
                f.sync_all()
                    .map_err(|e| BlockError::io(format!("flushing '{}'", self.name), e))?;
            }
        }
        Ok(())
    }

    /// Passes a discard of freed clusters down (within the child's range).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.saturating_add(len).min(self.child_size);
        if end > offset && !self.child.read_only() {
            self.child.discard(offset, end - offset)?;
        }
        Ok(())
    }
}
