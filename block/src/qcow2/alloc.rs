//! Host cluster allocation: finding free clusters, creating refcount blocks
//! (which must be counted themselves) and growing the refcount table, in
//! the same order and places as QEMU, so that new images match its layout.

use super::cache::set_u64;
use super::error::corrupt;
use super::header::field;
use super::meta::{Meta, MAX_HOST_OFFSET, MAX_REFTABLE_BYTES, OFFSET_MASK};
use super::overlap::MetaKind;
use crate::Result;

impl Meta {
    /// First run of `n` free clusters at or after cluster `from`.
    fn find_free(&mut self, from: u64, n: u64) -> Result<u64> {
        let mut start = from;
        let mut c = start;
        while c < start + n {
            // Metadata is never free, even where a damaged refcount says so.
            if self.refcount(c)? != 0 || self.overlap.find(c).is_some() {
                start = c + 1;
            }
            c += 1;
        }
        if (start + n)
            .checked_mul(self.cs)
            .is_none_or(|end| end > MAX_HOST_OFFSET)
        {
            return Err(corrupt(
                "the image file would exceed the largest host offset",
            ));
        }
        Ok(start)
    }

    /// Allocates `n` contiguous clusters (refcount 1); returns the host offset.
    pub fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        self.prepare_meta_change()?;
        loop {
            let start = self.find_free(self.free_hint, n)?;
            if self.ensure_refblocks(start, n, start + n)? {
                continue;
            }
            for c in start..start + n {
                self.add_refcount(c, 1)?;
            }
            self.free_hint = start + n;
            return Ok(start * self.cs);
        }
    }

    /// Allocates `size` bytes (1 to a cluster) for a compressed cluster, as
    /// QEMU's `qcow2_alloc_bytes`: right after the previous compressed
    /// cluster if they fit in its host cluster, or spill into the next one
    /// when that is the next free cluster, else at the start of a new
    /// cluster. Each host cluster the bytes touch gains one reference.
    /// Returns the host byte offset.
    pub fn alloc_bytes(&mut self, size: u64) -> Result<u64> {
        debug_assert!(size > 0 && size <= self.cs);
        self.prepare_meta_change()?;
        let mut offset = self.free_byte_offset;
        if offset != 0 {
            let r = self.refcount(self.cluster_of(offset))?;
            // A cluster freed since (0) is not ours to share any more.
            if r == self.max_refcount() || r == 0 {
                offset = 0;
            }
        }
        let mut free_in_cluster = self.cs - (offset & (self.cs - 1));
        if offset == 0 || free_in_cluster < size {
            loop {
                let new = self.find_free(self.free_hint, 1)?;
                if self.ensure_refblocks(new, 1, new + 1)? {
                    continue;
                }
                self.free_hint = new + 1;
                let new_off = new * self.cs;
                if offset == 0 || offset.next_multiple_of(self.cs) != new_off {
                    offset = new_off;
                    free_in_cluster = self.cs;
                } else {
                    free_in_cluster += self.cs;
                }
                break;
            }
        }
        debug_assert!(free_in_cluster >= size);
        let first = self.cluster_of(offset);
        let last = self.cluster_of(offset + size - 1);
        for c in first..=last {
            if let Err(e) = self.add_refcount(c, 1) {
                for done in first..c {
                    let _ = self.add_refcount(done, -1);
                }
                self.free_byte_offset = 0;
                return Err(e);
            }
        }
        let end = offset + size;
        self.free_byte_offset = if end & (self.cs - 1) == 0 { 0 } else { end };
        Ok(offset)
    }

    /// Drops the references of `size` bytes from [`Meta::alloc_bytes`] that
    /// no L2 entry points at (a failed write). A refcount that cannot be
    /// updated leaves the cluster leaked, never referenced.
    pub fn free_bytes(&mut self, offset: u64, size: u64) {
        self.free_byte_offset = 0;
        let first = self.cluster_of(offset);
        for c in first..=self.cluster_of(offset + size - 1) {
            if self.add_refcount(c, -1).is_err() {
                break;
            }
        }
    }

    /// Makes sure refcount blocks cover clusters `start..start+n`. Returns
    /// true if it had to allocate one (the caller then searches again, as
    /// the new block may sit where it meant to allocate).
    fn ensure_refblocks(&mut self, start: u64, n: u64, search_from: u64) -> Result<bool> {
        let first = start / self.rb_entries;
        let last = (start + n - 1) / self.rb_entries;
        for i in first..=last {
            if self.refblock_offset(i)? == 0 {
                self.alloc_refblock(i, search_from)?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Creates the refcount block for refcount table index `idx`.
    fn alloc_refblock(&mut self, idx: u64, search_from: u64) -> Result<()> {
        let nb = self.find_free(search_from, 1)?;
        let nb_idx = nb / self.rb_entries;
        let mut block = vec![0u8; self.cs as usize];
        if nb_idx == idx {
            // The block describes itself.
            super::cache::set_refcount(
                &mut block,
                self.header.refcount_order,
                (nb % self.rb_entries) as usize,
                1,
            );
        } else {
            if self.refblock_offset(nb_idx)? == 0 {
                // Its own refcount needs a block first; the caller retries.
                return self.alloc_refblock(nb_idx, nb + 1);
            }
            self.add_refcount(nb, 1)?;
            self.write_refblocks()?;
        }
        let nb_off = nb * self.cs;
        self.overlap.insert(nb, MetaKind::RefcountBlock);
        self.insert_refblock(nb_off, block)?;
        self.write_refblocks()?;
        self.storage.flush()?;
        if (idx as usize) < self.reftable.len() {
            let at = self.header.refcount_table_offset + idx * 8;
            self.storage.write_at(at, &nb_off.to_be_bytes())?;
            self.storage.flush()?;
            self.reftable[idx as usize] = nb_off;
            return Ok(());
        }
        // The table is too small: build a bigger one with self-describing
        // refcount blocks past everything covered so far.
        let used = (idx * self.rb_entries + 1).max(nb + 1);
        let blocks_used = used.div_ceil(self.rb_entries);
        self.refcount_area(blocks_used * self.rb_entries, idx, nb_off)
    }

    /// Creates a new refcount table (50 % larger than needed) and refcount
    /// blocks at cluster `start` (past every used cluster) that cover
    /// themselves, enters `new_block` at `new_idx`, and switches to it.
    fn refcount_area(&mut self, start: u64, new_idx: u64, new_block: u64) -> Result<()> {
        let entries = self.rb_entries;
        let per_table_cluster = self.cs / 8;
        // Fixpoint: refcount blocks needed to cover everything up to the end
        // of the new structures.
        let mut total_blocks = start.div_ceil(entries).max(new_idx + 1);
        let (table_entries, new_blocks) = loop {
            let table_entries =
                (total_blocks + total_blocks.div_ceil(2)).next_multiple_of(per_table_cluster);
            let area_idx = start / entries;
            let new_blocks = total_blocks.saturating_sub(area_idx);
            let end = start + new_blocks + table_entries / per_table_cluster;
            let needed = end.div_ceil(entries);
            if needed <= total_blocks {
                break (table_entries, new_blocks);
            }
            total_blocks = needed;
        };
        if table_entries * 8 > MAX_REFTABLE_BYTES {
            return Err(corrupt(
                "the refcount table would exceed 8 MiB (image too large for its cluster size)",
            ));
        }
        let table_clusters = table_entries / per_table_cluster;
        let area_idx = start / entries;
        let mut table = self.reftable.clone();
        table.resize(table_entries as usize, 0);
        table[new_idx as usize] = new_block;
        let table_off = (start + new_blocks) * self.cs;
        let end_cluster = start + new_blocks + table_clusters;
        let order = self.header.refcount_order;
        let mut blocks = vec![0u8; (new_blocks * self.cs) as usize];
        for k in 0..new_blocks {
            let i = area_idx + k;
            table[i as usize] = (start + k) * self.cs;
            let first = i * entries;
            let block = &mut blocks[(k * self.cs) as usize..((k + 1) * self.cs) as usize];
            for c in first.max(start)..end_cluster.min(first + entries) {
                super::cache::set_refcount(block, order, (c - first) as usize, 1);
            }
        }
        self.storage.write_at(start * self.cs, &blocks)?;
        let mut raw = vec![0u8; (table_entries * 8) as usize];
        for (i, &e) in table.iter().enumerate() {
            set_u64(&mut raw, i, e);
        }
        self.storage.write_at(table_off, &raw)?;
        self.storage.flush()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        self.write_header_field(field::REFCOUNT_TABLE_OFFSET, &hdr)?;
        let old_off = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        self.header.refcount_table_offset = table_off;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.reftable = table;
        let bits = self.header.cluster_bits;
        self.overlap.set_range(
            MetaKind::RefcountTable,
            table_off,
            table_clusters * self.cs,
            bits,
        );
        for k in 0..new_blocks {
            self.overlap.insert(start + k, MetaKind::RefcountBlock);
        }
        self.overlap
            .insert(new_block >> bits, MetaKind::RefcountBlock);
        for k in 0..new_blocks {
            let off = (start + k) * self.cs;
            let b = blocks[(k * self.cs) as usize..((k + 1) * self.cs) as usize].to_vec();
            self.rb_cache.remove(off);
            if self.rb_cache.victim().is_none() {
                self.rb_cache.insert(off, b, false);
            }
        }
        // The old table is unreferenced now that the header is durable.
        let first_old = self.cluster_of(old_off);
        for c in first_old..first_old + old_clusters {
            self.add_refcount(c, -1)?;
        }
        Ok(())
    }

    /// Grows the active L1 table to `entries` (QEMU's exact-size growth, as
    /// done when creating an image).
    pub fn grow_l1(&mut self, entries: u64) -> Result<()> {
        if entries <= self.l1.len() as u64 {
            return Ok(());
        }
        if entries * 8 > super::meta::MAX_L1_BYTES {
            return Err(corrupt("the L1 table would exceed 32 MiB"));
        }
        self.write_back_mappings()?;
        let bytes = entries * 8;
        let off = self.alloc_clusters(bytes.div_ceil(self.cs))?;
        let mut l1 = self.l1.clone();
        l1.resize(entries as usize, 0);
        let mut raw = vec![0u8; bytes as usize];
        for (i, &e) in l1.iter().enumerate() {
            set_u64(&mut raw, i, e);
        }
        self.write_refblocks()?;
        self.storage.write_at(off, &raw)?;
        self.storage.flush()?;
        let old_off = self.header.l1_table_offset;
        let old_len = self.l1.len() as u64;
        self.switch_l1(off, l1)?;
        if old_off != 0 && old_len > 0 {
            let first = self.cluster_of(old_off & OFFSET_MASK);
            let n = (old_len * 8).div_ceil(self.cs);
            for c in first..first + n {
                self.add_refcount(c, -1)?;
            }
        }
        Ok(())
    }
}
