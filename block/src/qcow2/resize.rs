//! Resizing a qcow2 image as QEMU's `qcow2_co_truncate` does: growing the
//! L1 table (relocated to new clusters when it outgrows its own), shrinking
//! (the clusters past the new end are discarded, the L1 entries past it
//! cleared and their L2 tables freed, the file's unused tail cut off), and
//! preallocating the new area (`metadata`, `falloc`, `full`).
//!
//! Crash-safe order: new tables and data first, flushed, then the header's
//! size last (a crash before it leaves the old size, with at worst leaked
//! clusters).

use std::sync::atomic::Ordering;

use super::header::field;
use super::meta::{ClusterKind, Meta, MAX_L1_BYTES, OFFSET_MASK, OFLAG_COPIED};
use super::node::Qcow2Node;
use crate::resize::{Prealloc, ResizeError};
use crate::Result;

impl Qcow2Node {
    /// Resizes the image to `new` bytes, preallocating the new area as `prealloc` says.
    pub(super) fn do_truncate(&self, new: u64, prealloc: Prealloc) -> Result<()> {
        self.check_writable()?;
        if !new.is_multiple_of(crate::SECTOR_SIZE) {
            return Err(ResizeError::Unaligned.into());
        }
        let old = self.size.load(Ordering::Acquire);
        if new < old && prealloc != Prealloc::Off {
            return Err(ResizeError::ShrinkPreallocated.into());
        }
        let _io = self.io_write_guard()?;
        let mut m = self.lock_meta()?;
        if m.header.nb_snapshots > 0 && m.header.version < 3 {
            return Err(ResizeError::V2Snapshots.into());
        }
        let new_l1 = new.div_ceil(m.cs * m.l2_entries);
        if new_l1 * 8 > MAX_L1_BYTES {
            return Err(ResizeError::L1TooLarge.into());
        }
        self.prepare(&mut m)?;
        if new < old {
            self.discard_beyond(&mut m, new, old)?;
            shrink_l1(&mut m, new_l1)?;
            cut_file_tail(&mut m)?;
        } else {
            m.grow_l1(new_l1)?;
            if prealloc != Prealloc::Off {
                self.preallocate(&mut m, old, new, prealloc)?;
            }
        }
        // Everything the new size needs is durable before the header says it.
        m.flush_all()?;
        m.write_header_field(field::SIZE, &new.to_be_bytes())?;
        m.header.size = new;
        self.size.store(new, Ordering::Release);
        Ok(())
    }

    /// Unmaps every guest cluster from the one after the new end's to the
    /// old end (QEMU's full discard: the entries become unallocated even
    /// over a backing file) and queues their host clusters to be freed.
    fn discard_beyond(&self, m: &mut Meta, new: u64, old: u64) -> Result<()> {
        let cs = m.cs;
        let first = new.div_ceil(cs);
        let end = old.div_ceil(cs);
        let mut gc = first;
        while gc < end {
            let l1_idx = gc / m.l2_entries;
            let table_end = ((l1_idx + 1) * m.l2_entries).min(end);
            let has_table =
                m.l1.get(l1_idx as usize)
                    .is_some_and(|e| e & OFFSET_MASK != 0);
            if has_table {
                for c in gc..table_end {
                    let (entry, _) = m.l2_entry(c)?;
                    if entry == 0 {
                        continue;
                    }
                    let kind = m.classify(entry)?;
                    m.check_data_free(kind)?;
                    m.set_l2_entry(c, 0)?;
                    if !matches!(kind, ClusterKind::Unallocated | ClusterKind::ZeroPlain) {
                        self.release(m, kind);
                    }
                }
            }
            gc = table_end;
        }
        m.apply_frees()
    }

    /// Allocates data clusters (and their L2 tables) for the guest area
    /// from `old` to `new`, in QEMU's order; with `falloc` their host
    /// blocks are reserved, with `full` zeros are written over them.
    fn preallocate(&self, m: &mut Meta, old: u64, new: u64, mode: Prealloc) -> Result<()> {
        let cs = m.cs;
        // A partly old cluster over a backing file keeps what shows through.
        let mut gc = if self.backing.is_some() {
            old.div_ceil(cs)
        } else {
            old / cs
        };
        let total = new.div_ceil(cs);
        let mut runs = Vec::new();
        while gc < total {
            let (entry, _) = m.l2_entry(gc)?;
            if entry & OFFSET_MASK != 0 {
                gc += 1;
                continue;
            }
            let l1_idx = gc / m.l2_entries;
            m.writable_l2(l1_idx as usize)?;
            let table_end = ((l1_idx + 1) * m.l2_entries).min(total);
            let n = table_end - gc;
            let host = m.alloc_clusters(n)?;
            for i in 0..n {
                m.set_l2_entry(gc + i, (host + i * cs) | OFLAG_COPIED)?;
            }
            runs.push((host, n * cs));
            gc = table_end;
        }
        let end = runs.iter().map(|&(h, len)| h + len).max().unwrap_or(0);
        m.storage.extend_to(end)?;
        for &(host, len) in &runs {
            match mode {
                Prealloc::Full => {
                    crate::node::write_zeroes_by_writing(m.storage.child().as_ref(), host, len)?
                }
                Prealloc::Falloc => m.storage.child().write_zeroes(host, len)?,
                Prealloc::Off | Prealloc::Metadata => {}
            }
        }
        m.data_written();
        Ok(())
    }
}

/// Clears the L1 entries from `new_l1` on (on disk first, flushed) and
/// frees the L2 tables they named, as QEMU's `qcow2_shrink_l1_table`; the
/// table keeps its size.
fn shrink_l1(m: &mut Meta, new_l1: u64) -> Result<()> {
    let len = m.l1.len() as u64;
    if new_l1 >= len {
        return Ok(());
    }
    m.write_back_mappings()?;
    let zeros = vec![0u8; ((len - new_l1) * 8) as usize];
    m.storage
        .write_at(m.header.l1_table_offset + new_l1 * 8, &zeros)?;
    m.storage.flush()?;
    for i in new_l1 as usize..len as usize {
        let off = m.l1[i] & OFFSET_MASK;
        m.l1[i] = 0;
        if off == 0 {
            continue;
        }
        m.l2_cache.remove(off);
        let c = m.cluster_of(off);
        if m.add_refcount(c, -1)? == 0 {
            m.storage.discard(off, m.cs)?;
        }
    }
    Ok(())
}

/// Cuts the file after its last used cluster (QEMU only warns when it cannot).
pub(super) fn cut_file_tail(m: &mut Meta) -> Result<()> {
    m.flush_all()?;
    let cs = m.cs;
    let mut c = m.storage.len().div_ceil(cs);
    while c > 0 && m.refcount(c - 1)? == 0 {
        c -= 1;
    }
    if c * cs < m.storage.len() {
        if let Err(e) = m.storage.child().resize(c * cs) {
            eprintln!("warning: Failed to truncate the tail of the image: {e}");
        }
    }
    Ok(())
}
