//! What the fuzz targets share: an in-memory block node and a little reader of
//! the fuzzer's bytes.

use std::sync::Mutex;

use block::node::check_range;
use block::{BlockError, BlockNode, Result};

/// A block node held in memory: reads must lie within it; writes past the end
/// grow it (as a host file under a format driver grows), up to `cap` bytes, beyond
/// which they fail with `ENOSPC`, so that no image makes a run allocate without
/// bound.
pub struct MemNode {
    data: Mutex<Vec<u8>>,
    cap: usize,
    read_only: bool,
}

impl MemNode {
    /// A node holding `data`, growing to at most `cap` bytes.
    pub fn new(data: Vec<u8>, cap: usize, read_only: bool) -> Self {
        Self {
            data: Mutex::new(data),
            cap,
            read_only,
        }
    }

    /// A copy of the node's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn grow(&self, data: &mut Vec<u8>, end: u64) -> Result<()> {
        if end <= data.len() as u64 {
            return Ok(());
        }
        if end > self.cap as u64 {
            return Err(BlockError::io(
                "mem",
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        data.resize(end as usize, 0);
        Ok(())
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly("mem".into()));
        }
        Ok(())
    }
}

impl BlockNode for MemNode {
    fn driver(&self) -> &'static str {
        "file"
    }
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let data = self.lock();
        check_range("mem", data.len() as u64, offset, buf.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&data[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.writable()?;
        let mut data = self.lock();
        let end = offset.checked_add(buf.len() as u64).ok_or_else(|| {
            BlockError::io("mem", std::io::Error::from_raw_os_error(libc::EINVAL))
        })?;
        self.grow(&mut data, end)?;
        let o = offset as usize;
        data[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        let mut data = self.lock();
        check_range("mem", data.len() as u64, offset, len)?;
        let o = offset as usize;
        data[o..o + len as usize].fill(0);
        Ok(())
    }
    fn resize(&self, size: u64) -> Result<()> {
        self.writable()?;
        let mut data = self.lock();
        self.grow(&mut data, size)?;
        data.truncate(size as usize);
        Ok(())
    }
}

/// Reads numbers off the front of the fuzzer's input; zeros once it runs out.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    /// The next `n` bytes (fewer at the end).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    /// The next little-endian u16.
    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let t = self.take(2);
        b[..t.len()].copy_from_slice(t);
        u16::from_le_bytes(b)
    }

    /// The next little-endian u32.
    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let t = self.take(4);
        b[..t.len()].copy_from_slice(t);
        u32::from_le_bytes(b)
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.0.len())
    }
}
