//! Guest I/O: mapping guest ranges to host clusters, reads (data, zeros,
//! backing, compressed, subclusters), and discard / write-zeroes by L2
//! entry changes (writes: `write.rs`).

use std::sync::atomic::Ordering;

use super::compress::decompress;
use super::error::{corrupt, Qcow2Error};
use super::meta::{ClusterKind, Meta, OFLAG_COPIED, OFLAG_ZERO};
use super::node::Qcow2Node;
use crate::sg::SgCursor;
use crate::{BlockError, Result};

/// Where a piece of a read comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    Data(u64),
    Zero,
    Backing,
    Compressed { offset: u64, size: u64, skip: u64 },
}

/// A piece of a request: `len` bytes at `pos` of the buffer.
#[derive(Clone, Copy, Debug)]
struct Extent {
    pos: usize,
    len: usize,
    src: Src,
}

impl Qcow2Node {
    pub(super) fn io_read_guard(&self) -> Result<std::sync::RwLockReadGuard<'_, ()>> {
        self.io_lock
            .read()
            .map_err(|_| BlockError::Poisoned("qcow2: I/O lock"))
    }

    pub(super) fn io_write_guard(&self) -> Result<std::sync::RwLockWriteGuard<'_, ()>> {
        self.io_lock
            .write()
            .map_err(|_| BlockError::Poisoned("qcow2: I/O lock"))
    }

    /// Before the first change of the image: clears the autoclear bits and,
    /// with lazy refcounts, sets the dirty bit. Called only once a request
    /// has passed its checks, so that a refused request changes nothing.
    pub(super) fn prepare(&self, m: &mut Meta) -> Result<()> {
        if !self.prepared.load(Ordering::Acquire) {
            m.prepare_meta_change()?;
            self.prepared.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// The overlap check of a whole write request, before any of it is
    /// done: guest data written in place must not land on metadata, and the
    /// clusters a copy-on-write releases must not be metadata either.
    pub(super) fn check_write_overlap(&self, m: &mut Meta, offset: u64, len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let end = offset + len;
        let mut g = offset;
        while g < end {
            let in_c = g % cs;
            let n = (cs - in_c).min(end - g);
            let (entry, _) = m.l2_entry(g / cs)?;
            match m.classify(entry)? {
                ClusterKind::Normal(h) if entry & OFLAG_COPIED != 0 => {
                    m.check_data_write(h + in_c, n)?
                }
                kind => m.check_data_free(kind)?,
            }
            g += n;
        }
        Ok(())
    }

    /// The overlap check of a discard of guest clusters `[first, end)`
    /// before any of it is done: none of the host clusters it would free
    /// may be metadata.
    fn check_free_overlap(&self, m: &mut Meta, first: u64, end: u64) -> Result<()> {
        let mut gc = first;
        while gc < end {
            let l1_idx = (gc / m.l2_entries) as usize;
            let l1_empty =
                m.l1.get(l1_idx)
                    .is_none_or(|e| e & super::meta::OFFSET_MASK == 0);
            if l1_empty {
                gc = (l1_idx as u64 + 1) * m.l2_entries;
                continue;
            }
            let (entry, _) = m.l2_entry(gc)?;
            let kind = m.classify(entry)?;
            m.check_data_free(kind)?;
            gc += 1;
        }
        Ok(())
    }

    /// Maps `[offset, offset+len)` to extents.
    fn map_read(&self, m: &mut Meta, offset: u64, len: usize) -> Result<Vec<Extent>> {
        let cs = self.cluster_size();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = 0usize;
        while pos < len {
            let g = offset + pos as u64;
            let gc = g / cs;
            let in_c = g % cs;
            let (entry, bitmap) = m.l2_entry(gc)?;
            let kind = m.classify(entry)?;
            let (n, src) = if self.extl2 && !matches!(kind, ClusterKind::Compressed { .. }) {
                let sc = cs / 32;
                let i = in_c / sc;
                let n = (sc - in_c % sc).min((len - pos) as u64);
                let src = if bitmap & (1 << i) != 0 {
                    match kind {
                        ClusterKind::Normal(h) => Src::Data(h + in_c),
                        _ => {
                            return Err(corrupt(format!(
                                "subcluster {i} of guest cluster {gc} is allocated but the cluster has no host offset"
                            )))
                        }
                    }
                } else if bitmap & (1 << (32 + i)) != 0 {
                    Src::Zero
                } else {
                    Src::Backing
                };
                (n, src)
            } else {
                let n = (cs - in_c).min((len - pos) as u64);
                let src = match kind {
                    ClusterKind::Unallocated => Src::Backing,
                    ClusterKind::ZeroPlain | ClusterKind::ZeroAlloc(_) => Src::Zero,
                    ClusterKind::Normal(h) => Src::Data(h + in_c),
                    ClusterKind::Compressed { offset, size } => Src::Compressed {
                        offset,
                        size,
                        skip: in_c,
                    },
                };
                (n, src)
            };
            let n = n as usize;
            if let Some(last) = out.last_mut() {
                let merge = match (last.src, src) {
                    (Src::Data(a), Src::Data(b)) => a + last.len as u64 == b,
                    (Src::Zero, Src::Zero) | (Src::Backing, Src::Backing) => true,
                    _ => false,
                };
                if merge {
                    last.len += n;
                    pos += n;
                    continue;
                }
            }
            out.push(Extent { pos, len: n, src });
            pos += n;
        }
        Ok(out)
    }

    /// Reads guest data from the backing node (zeros past its end).
    pub(super) fn read_backing(&self, guest: u64, buf: &mut [u8]) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let avail = bsize.saturating_sub(guest).min(buf.len() as u64) as usize;
        if avail > 0 {
            b.read_at(guest, &mut buf[..avail])?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    /// Decompresses the compressed cluster at host `offset`.
    pub(super) fn read_compressed(&self, offset: u64, size: u64) -> Result<Vec<u8>> {
        let mut input = vec![0u8; size as usize];
        self.storage.read_at(offset, &mut input)?;
        let mut out = vec![0u8; self.cluster_size() as usize];
        decompress(self.compression, &input, &mut out)
            .map_err(|msg| BlockError::from(Qcow2Error::Decompress { offset, msg }))?;
        Ok(out)
    }

    fn run_extents(&self, offset: u64, buf: &mut [u8], extents: &[Extent]) -> Result<()> {
        for e in extents {
            let part = &mut buf[e.pos..e.pos + e.len];
            match e.src {
                Src::Data(h) => self.data_read(h, offset + e.pos as u64, part)?,
                Src::Zero => part.fill(0),
                Src::Backing => self.read_backing(offset + e.pos as u64, part)?,
                Src::Compressed { offset, size, skip } => {
                    let c = self.read_compressed(offset, size)?;
                    part.copy_from_slice(&c[skip as usize..skip as usize + e.len]);
                }
            }
        }
        Ok(())
    }

    /// Reads guest data.
    pub(super) fn do_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let _io = self.io_read_guard()?;
        let extents = {
            let mut m = self.lock_meta()?;
            self.map_read(&mut m, offset, buf.len())?
        };
        self.run_extents(offset, buf, &extents)
    }

    /// Reads guest data into a scatter-gather list: one mapping pass, then
    /// one vectored read per contiguous host extent.
    pub(super) fn do_read_vectored(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if len == 0 {
            return Ok(());
        }
        let _io = self.io_read_guard()?;
        let extents = {
            let mut m = self.lock_meta()?;
            self.map_read(&mut m, offset, len)?
        };
        let mut cursor = SgCursor::new(bufs);
        for e in &extents {
            let mut parts = cursor.take(e.len);
            match e.src {
                Src::Data(h) => self.data_read_vectored(h, offset + e.pos as u64, &mut parts)?,
                Src::Zero => parts.iter_mut().for_each(|p| p.fill(0)),
                Src::Backing => {
                    let mut guest = offset + e.pos as u64;
                    for p in parts.iter_mut() {
                        self.read_backing(guest, p)?;
                        guest += p.len() as u64;
                    }
                }
                Src::Compressed { offset, size, skip } => {
                    let c = self.read_compressed(offset, size)?;
                    let mut at = skip as usize;
                    for p in parts.iter_mut() {
                        p.copy_from_slice(&c[at..at + p.len()]);
                        at += p.len();
                    }
                }
            }
        }
        Ok(())
    }

    /// Queues the refcount decrease of the host clusters an old L2 entry held.
    pub(super) fn release(&self, m: &mut Meta, kind: ClusterKind) {
        match kind {
            ClusterKind::Normal(h) | ClusterKind::ZeroAlloc(h) => m.queue_free(h, 1),
            ClusterKind::Compressed { offset, size } => {
                let cs = self.cluster_size();
                let first = offset / cs;
                let last = (offset + size - 1) / cs;
                m.queue_free(first * cs, last - first + 1);
            }
            ClusterKind::Unallocated | ClusterKind::ZeroPlain => {}
        }
    }

    /// Discard (`zeroes` false) or write-zeroes (`zeroes` true).
    pub(super) fn do_discard(&self, offset: u64, len: u64, zeroes: bool) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // Exclusive: no other request runs and no allocation is in flight.
        // The metadata lock is let go around the zero writes, which take it.
        let _io = self.io_write_guard()?;
        let cs = self.cluster_size();
        let end = offset + len;
        // Whole clusters; the image's last cluster counts as whole when the
        // range reaches the end of the image.
        let first_full = offset.div_ceil(cs);
        let end_full = if end == self.size.load(std::sync::atomic::Ordering::Acquire) {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        if first_full >= end_full {
            if zeroes {
                self.write_zero_bytes(offset, len)?;
            }
            return Ok(());
        }
        let head_end = (first_full * cs).min(end);
        let tail_start = (end_full * cs).max(offset);
        {
            let mut m = self.lock_meta()?;
            debug_assert!(m.inflight.is_empty());
            // Nothing is changed if any part of the request fails the overlap check.
            if zeroes {
                self.check_write_overlap(&mut m, offset, head_end.saturating_sub(offset))?;
                self.check_write_overlap(&mut m, tail_start, end.saturating_sub(tail_start))?;
            }
            self.check_free_overlap(&mut m, first_full, end_full)?;
        }
        if zeroes {
            if head_end > offset {
                self.write_zero_bytes(offset, head_end - offset)?;
            }
            if end > tail_start {
                self.write_zero_bytes(tail_start, end - tail_start)?;
            }
        }
        let mut m = self.lock_meta()?;
        let v3 = self.version >= 3;
        for gc in first_full..end_full {
            let l1_idx = (gc / m.l2_entries) as usize;
            let l1_empty =
                m.l1.get(l1_idx)
                    .is_none_or(|e| e & super::meta::OFFSET_MASK == 0);
            if l1_empty && self.backing.is_none() {
                continue;
            }
            let (entry, _) = m.l2_entry(gc)?;
            let kind = m.classify(entry)?;
            let allocated = !matches!(kind, ClusterKind::Unallocated | ClusterKind::ZeroPlain);
            let new = if v3 {
                if kind == ClusterKind::ZeroPlain
                    || (kind == ClusterKind::Unallocated && self.backing.is_none())
                {
                    continue;
                }
                OFLAG_ZERO
            } else if zeroes && self.backing.is_some() {
                let n = cs.min(self.size.load(std::sync::atomic::Ordering::Acquire) - gc * cs);
                drop(m);
                self.write_zero_bytes(gc * cs, n)?;
                m = self.lock_meta()?;
                continue;
            } else {
                // Version 2 has no zero flag: unallocating would let the
                // backing file show through, so discard keeps the data then.
                if kind == ClusterKind::Unallocated || self.backing.is_some() {
                    continue;
                }
                0
            };
            self.prepare(&mut m)?;
            m.set_l2_entry(gc, new)?;
            if allocated {
                self.release(&mut m, kind);
            }
        }
        if m.frees_due() {
            m.apply_frees()?;
        }
        Ok(())
    }

    /// Writes zeros; the caller holds `io_lock` exclusively.
    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write_under_io_lock(offset + done, &[&zeros[..n as usize]], None)?;
            done += n;
        }
        Ok(())
    }
}
