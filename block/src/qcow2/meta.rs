//! The metadata of an open image: L1 table, cached L2 tables and refcount
//! blocks, the refcount table, and the write-back order that keeps the
//! image consistent after a crash:
//!
//! 1. data and refcount increases reach the disk (flush) before any L2
//!    table or L1 entry that points to them is written;
//! 2. a new L2 table is written (and flushed) before the L1 entry that
//!    points to it;
//! 3. refcount decreases are applied only after the L2/L1 writes that
//!    dropped the references are durable (until then the clusters stay
//!    allocated, so they cannot be reused).

use std::collections::BTreeSet;
use std::sync::Arc;

use super::cache::{get_refcount, get_u64, set_refcount, set_u64, TableCache};
use super::error::corrupt;
use super::error::Qcow2Error;
use super::header::{field, Header, INCOMPAT_DIRTY, INCOMPAT_EXTL2};
use super::inflight::InFlight;
use super::overlap::{MetaKind, Overlap};
use super::storage::Storage;
use crate::{BlockError, Result};

/// L1/L2 entry: the cluster's refcount is exactly one.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry: compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 entry: reads as zeros.
pub const OFLAG_ZERO: u64 = 1;
/// Host offset bits of L1/L2/refcount table entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Largest host offset an L2 entry can hold.
pub const MAX_HOST_OFFSET: u64 = 1 << 56;
/// QEMU's limit on the active L1 table (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Pending refcount decreases above which they are applied at once.
const MAX_PENDING_FREES: usize = 4096;

/// What a (standard or extended) L2 entry maps a guest cluster to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterKind {
    /// Not allocated: backing file or zeros.
    Unallocated,
    /// Reads as zeros, no host cluster.
    ZeroPlain,
    /// Reads as zeros, host cluster kept (preallocated).
    ZeroAlloc(u64),
    /// Data at this host offset.
    Normal(u64),
    /// Compressed data at `offset`, `size` bytes.
    Compressed {
        /// Host byte offset (unaligned).
        offset: u64,
        /// Bytes to read.
        size: u64,
    },
}

/// Metadata of an open image, behind the node's lock.
pub struct Meta {
    /// The image file.
    pub storage: Arc<Storage>,
    /// The header as on disk.
    pub header: Header,
    /// Cluster size.
    pub cs: u64,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub l2_entry_bytes: u64,
    /// Refcount entries per refcount block.
    pub rb_entries: u64,
    /// The active L1 table.
    pub l1: Vec<u64>,
    l1_dirty: BTreeSet<usize>,
    /// Cached L2 tables.
    pub l2_cache: TableCache,
    /// Cached refcount blocks.
    pub rb_cache: TableCache,
    /// The refcount table.
    pub reftable: Vec<u64>,
    /// Lowest cluster index that may be free.
    pub free_hint: u64,
    /// Where the next compressed cluster may go: the first free byte of the
    /// host cluster the last one ended in (0: none; QEMU's `free_byte_offset`).
    pub free_byte_offset: u64,
    /// Refcount decreases waiting until the L2 changes that need them are durable.
    pending_frees: Vec<(u64, u64)>,
    /// Data or refcount changes were made since the last flush.
    need_barrier: bool,
    /// Lazy refcounts in use (refcount writes deferred under the dirty bit).
    pub lazy: bool,
    /// Writes are allowed.
    pub writable: bool,
    /// Autoclear bits were cleared (or there were none).
    pub prepared: bool,
    /// The host clusters holding metadata (writable images), kept up to
    /// date as metadata is allocated, moved and freed.
    pub overlap: Overlap,
    /// Guest clusters whose new host clusters are being written.
    pub inflight: InFlight,
}

impl Meta {
    /// Builds the metadata state from a validated header; loads L1 and the
    /// refcount table (their sizes were checked by the caller).
    pub fn load(
        storage: Arc<Storage>,
        header: Header,
        l2_cache_entries: usize,
        rb_cache_entries: usize,
        writable: bool,
        lazy: bool,
    ) -> Result<Self> {
        let cs = header.cluster_size();
        let l2_entry_bytes = if header.incompatible & INCOMPAT_EXTL2 != 0 {
            16
        } else {
            8
        };
        let mut l1_raw = vec![0u8; header.l1_size as usize * 8];
        storage.read_at(header.l1_table_offset, &mut l1_raw)?;
        let l1: Vec<u64> = (0..header.l1_size as usize)
            .map(|i| get_u64(&l1_raw, i))
            .collect();
        let rt_len = u64::from(header.refcount_table_clusters) * cs;
        let mut rt_raw = vec![0u8; rt_len as usize];
        storage.read_at(header.refcount_table_offset, &mut rt_raw)?;
        let reftable: Vec<u64> = (0..rt_len as usize / 8)
            .map(|i| get_u64(&rt_raw, i))
            .collect();
        let prepared = header.autoclear == 0;
        let lazy = lazy && header.version >= 3;
        let overlap = if writable {
            Overlap::build(&storage, &header, &l1, &reftable)
        } else {
            Overlap::disabled()
        };
        Ok(Self {
            storage,
            cs,
            l2_entries: cs / l2_entry_bytes,
            l2_entry_bytes,
            rb_entries: (cs * 8) >> header.refcount_order,
            l1,
            l1_dirty: BTreeSet::new(),
            l2_cache: TableCache::new(l2_cache_entries),
            rb_cache: TableCache::new(rb_cache_entries),
            reftable,
            free_hint: 0,
            free_byte_offset: 0,
            pending_frees: Vec::new(),
            need_barrier: false,
            lazy,
            writable,
            prepared,
            overlap,
            inflight: InFlight::default(),
            header,
        })
    }

    /// The overlap check: refuses guest data (`len` bytes at host `off`,
    /// within one cluster or a run of clusters) that would land on metadata.
    #[inline]
    pub fn check_data_write(&self, off: u64, len: u64) -> Result<()> {
        let bits = self.header.cluster_bits;
        let first = off >> bits;
        let end = (off + len.max(1) - 1) >> bits;
        if let Some((c, kind)) = self.overlap.find_range(first, end + 1) {
            return Err(Qcow2Error::Overlap {
                offset: (c << bits).max(off),
                what: kind.name(),
            }
            .into());
        }
        Ok(())
    }

    /// Refuses to drop the reference of an L2 entry to host clusters that
    /// hold metadata (freeing them would destroy the metadata).
    pub fn check_data_free(&self, kind: ClusterKind) -> Result<()> {
        let (off, len) = match kind {
            ClusterKind::Normal(h) | ClusterKind::ZeroAlloc(h) => (h, self.cs),
            ClusterKind::Compressed { offset, size } => (offset, size),
            ClusterKind::Unallocated | ClusterKind::ZeroPlain => return Ok(()),
        };
        let bits = self.header.cluster_bits;
        let end = off.saturating_add(len.max(1) - 1) >> bits;
        if let Some((c, kind)) = self.overlap.find_range(off >> bits, end + 1) {
            return Err(Qcow2Error::OverlapFree {
                offset: (c << bits).max(off),
                what: kind.name(),
            }
            .into());
        }
        Ok(())
    }

    /// Cluster index of a host offset.
    pub fn cluster_of(&self, offset: u64) -> u64 {
        offset >> self.header.cluster_bits
    }

    /// Whether the image uses extended L2 entries.
    pub fn extl2(&self) -> bool {
        self.l2_entry_bytes == 16
    }

    /// Decodes an L2 entry.
    pub fn classify(&self, entry: u64) -> Result<ClusterKind> {
        if entry & OFLAG_COMPRESSED != 0 {
            let bits = self.header.cluster_bits;
            let shift = 62 - (bits - 8);
            let mask = (1u64 << (bits - 8)) - 1;
            let offset = entry & ((1u64 << shift) - 1);
            let sectors = ((entry >> shift) & mask) + 1;
            return Ok(ClusterKind::Compressed {
                offset,
                size: sectors * 512 - (offset & 511),
            });
        }
        let host = entry & OFFSET_MASK;
        if host & (self.cs - 1) != 0 {
            return Err(corrupt(format!(
                "cluster offset {host:#x} in an L2 table is not cluster aligned"
            )));
        }
        if entry & OFLAG_ZERO != 0 && !self.extl2() {
            return Ok(if host == 0 {
                ClusterKind::ZeroPlain
            } else {
                ClusterKind::ZeroAlloc(host)
            });
        }
        Ok(if host == 0 {
            ClusterKind::Unallocated
        } else {
            ClusterKind::Normal(host)
        })
    }

    // ----- L2 tables -----

    fn check_table_offset(&self, what: &str, off: u64) -> Result<()> {
        if off & (self.cs - 1) != 0 || off < self.cs {
            return Err(corrupt(format!(
                "{what} offset {off:#x} is unaligned or inside the header"
            )));
        }
        if off >= self.storage.len() {
            return Err(corrupt(format!(
                "{what} offset {off:#x} is beyond the end of the file ({} bytes)",
                self.storage.len()
            )));
        }
        Ok(())
    }

    /// Makes room in the L2 cache for one more table.
    fn l2_make_room(&mut self) -> Result<()> {
        while let Some((off, dirty)) = self.l2_cache.victim() {
            if dirty {
                self.barrier()?;
                self.write_l2(off)?;
            }
            self.l2_cache.remove(off);
        }
        Ok(())
    }

    /// Loads the L2 table at `off` into the cache.
    pub fn load_l2(&mut self, off: u64) -> Result<()> {
        if self.l2_cache.contains(off) {
            return Ok(());
        }
        self.check_table_offset("L2 table", off)?;
        let mut t = vec![0u8; self.cs as usize];
        self.storage.read_at(off, &mut t)?;
        self.l2_make_room()?;
        self.l2_cache.insert(off, t, false);
        Ok(())
    }

    /// Inserts a new L2 table (dirty) into the cache.
    fn insert_l2(&mut self, off: u64, data: Vec<u8>) -> Result<()> {
        self.l2_make_room()?;
        self.l2_cache.insert(off, data, true);
        Ok(())
    }

    fn write_l2(&mut self, off: u64) -> Result<()> {
        if let Some(t) = self.l2_cache.peek(off) {
            self.storage.write_at(off, t)?;
        }
        self.l2_cache.mark_clean(off);
        Ok(())
    }

    /// The L2 entry (and extended bitmap) of guest cluster `gc`.
    pub fn l2_entry(&mut self, gc: u64) -> Result<(u64, u64)> {
        let l1_idx = (gc / self.l2_entries) as usize;
        let Some(&l1e) = self.l1.get(l1_idx) else {
            return Ok((0, 0));
        };
        let off = l1e & OFFSET_MASK;
        if off == 0 {
            return Ok((0, 0));
        }
        self.load_l2(off)?;
        let i = (gc % self.l2_entries) as usize;
        let ext = self.extl2();
        let t = self.l2_cache.get(off).expect("loaded above");
        Ok(if ext {
            (get_u64(t, 2 * i), get_u64(t, 2 * i + 1))
        } else {
            (get_u64(t, i), 0)
        })
    }

    /// The offset of a writable (refcount one) L2 table for L1 index
    /// `l1_idx`, allocating or copying it as needed.
    pub fn writable_l2(&mut self, l1_idx: usize) -> Result<u64> {
        let l1e = *self.l1.get(l1_idx).ok_or_else(|| {
            corrupt(format!(
                "guest offset needs L1 index {l1_idx}, beyond the L1 table"
            ))
        })?;
        let old = l1e & OFFSET_MASK;
        if old != 0 && l1e & OFLAG_COPIED != 0 {
            self.load_l2(old)?;
            return Ok(old);
        }
        let data = if old != 0 {
            self.load_l2(old)?;
            self.l2_cache.get(old).expect("loaded").to_vec()
        } else {
            vec![0u8; self.cs as usize]
        };
        let new = self.alloc_clusters(1)?;
        self.overlap.insert(self.cluster_of(new), MetaKind::L2);
        self.insert_l2(new, data)?;
        self.l1[l1_idx] = new | OFLAG_COPIED;
        self.l1_dirty.insert(l1_idx);
        if old != 0 {
            self.queue_free(old, 1);
        }
        Ok(new)
    }

    /// Sets the entry of guest cluster `gc`, whose L2 table must be writable.
    pub fn set_l2_entry(&mut self, gc: u64, entry: u64) -> Result<()> {
        let l1_idx = (gc / self.l2_entries) as usize;
        let off = self.writable_l2(l1_idx)?;
        let i = (gc % self.l2_entries) as usize;
        let step = (self.l2_entry_bytes / 8) as usize;
        let t = self.l2_cache.get_mut(off).expect("writable_l2 loads it");
        set_u64(t, i * step, entry);
        Ok(())
    }

    // ----- refcounts -----

    /// Refuses a refcount table in which two entries name the same refcount
    /// block: one block of all-ones refcounts repeated over the whole table
    /// would make every cluster look used, and the free-cluster search walk
    /// ~10^13 clusters. (QEMU's `check` reports it; opening to write refuses.)
    pub fn check_reftable_unique(&self) -> Result<()> {
        let mut seen = std::collections::HashMap::new();
        for (i, e) in self.reftable.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if let Some(first) = seen.insert(off, i) {
                return Err(corrupt(format!(
                    "refcount table entries {first} and {i} both point at the refcount \
                     block at offset {off:#x}"
                )));
            }
        }
        Ok(())
    }

    /// Offset of the refcount block for refcount table index `i` (0: none).
    pub fn refblock_offset(&self, i: u64) -> Result<u64> {
        let Some(&e) = self.reftable.get(i as usize) else {
            return Ok(0);
        };
        let off = e & OFFSET_MASK;
        if off != 0 && off & (self.cs - 1) != 0 {
            return Err(corrupt(format!(
                "refcount block offset {off:#x} is not cluster aligned"
            )));
        }
        Ok(off)
    }

    fn rb_make_room(&mut self) -> Result<()> {
        while let Some((off, dirty)) = self.rb_cache.victim() {
            if dirty {
                self.write_refblock(off)?;
            }
            self.rb_cache.remove(off);
        }
        Ok(())
    }

    /// Loads the refcount block at `off`.
    pub fn load_refblock(&mut self, off: u64) -> Result<()> {
        if self.rb_cache.contains(off) {
            return Ok(());
        }
        self.check_table_offset("refcount block", off)?;
        let mut b = vec![0u8; self.cs as usize];
        self.storage.read_at(off, &mut b)?;
        self.rb_make_room()?;
        self.rb_cache.insert(off, b, false);
        Ok(())
    }

    /// Puts a new refcount block into the cache (dirty).
    pub fn insert_refblock(&mut self, off: u64, data: Vec<u8>) -> Result<()> {
        self.rb_make_room()?;
        self.rb_cache.insert(off, data, true);
        Ok(())
    }

    fn write_refblock(&mut self, off: u64) -> Result<()> {
        if let Some(b) = self.rb_cache.peek(off) {
            self.storage.write_at(off, b)?;
        }
        self.rb_cache.mark_clean(off);
        Ok(())
    }

    /// Writes every dirty refcount block.
    pub fn write_refblocks(&mut self) -> Result<()> {
        for off in self.rb_cache.dirty() {
            self.write_refblock(off)?;
        }
        Ok(())
    }

    /// The refcount of cluster `c` (0 where no refcount block exists).
    pub fn refcount(&mut self, c: u64) -> Result<u64> {
        let off = self.refblock_offset(c / self.rb_entries)?;
        if off == 0 {
            return Ok(0);
        }
        self.load_refblock(off)?;
        let b = self.rb_cache.get(off).expect("loaded");
        Ok(get_refcount(
            b,
            self.header.refcount_order,
            (c % self.rb_entries) as usize,
        ))
    }

    /// Largest refcount the image can store.
    pub fn max_refcount(&self) -> u64 {
        match self.header.refcount_order {
            6 => u64::MAX,
            o => (1u64 << (1u32 << o)) - 1,
        }
    }

    /// Sets the refcount of cluster `c`, whose refcount block must exist.
    pub fn set_refcount(&mut self, c: u64, v: u64) -> Result<()> {
        let off = self.refblock_offset(c / self.rb_entries)?;
        if off == 0 {
            return Err(corrupt(format!(
                "no refcount block for cluster {c} (internal error)"
            )));
        }
        if v > self.max_refcount() {
            return Err(corrupt(format!(
                "refcount of cluster {c} would overflow ({} bits)",
                self.header.refcount_bits()
            )));
        }
        self.prepare_meta_change()?;
        self.load_refblock(off)?;
        let order = self.header.refcount_order;
        let b = self.rb_cache.get_mut(off).expect("loaded");
        set_refcount(b, order, (c % self.rb_entries) as usize, v);
        if v == 0 {
            // Freed: whatever metadata it held is gone.
            self.overlap.remove(c);
            if c < self.free_hint {
                self.free_hint = c;
            }
            // Its free bytes are not to be shared any more.
            if self.free_byte_offset >> self.header.cluster_bits == c {
                self.free_byte_offset = 0;
            }
        }
        self.need_barrier = true;
        Ok(())
    }

    /// Adds `delta` to the refcount of cluster `c`; returns the new value.
    pub fn add_refcount(&mut self, c: u64, delta: i64) -> Result<u64> {
        let old = self.refcount(c)?;
        let new = if delta >= 0 {
            old.checked_add(delta as u64)
        } else {
            old.checked_sub(delta.unsigned_abs())
        }
        .ok_or_else(|| {
            corrupt(format!(
                "refcount of cluster {c} is {old}, cannot add {delta}"
            ))
        })?;
        self.set_refcount(c, new)?;
        Ok(new)
    }

    // ----- ordering -----

    /// Marks data written to newly allocated clusters: L2 writes must wait for a flush.
    pub fn data_written(&mut self) {
        self.need_barrier = true;
    }

    /// Makes refcount increases and data durable before L2/L1 writes.
    fn barrier(&mut self) -> Result<()> {
        if self.need_barrier {
            if !self.lazy {
                self.write_refblocks()?;
            }
            self.storage.flush()?;
            self.need_barrier = false;
        }
        Ok(())
    }

    /// Writes dirty L2 tables, then (after a flush) dirty L1 entries.
    pub fn write_back_mappings(&mut self) -> Result<()> {
        if !self.l2_cache.any_dirty() && self.l1_dirty.is_empty() {
            return Ok(());
        }
        self.barrier()?;
        for off in self.l2_cache.dirty() {
            self.write_l2(off)?;
        }
        if !self.l1_dirty.is_empty() {
            self.storage.flush()?;
            let dirty = std::mem::take(&mut self.l1_dirty);
            for i in dirty {
                let at = self.header.l1_table_offset + i as u64 * 8;
                self.storage.write_at(at, &self.l1[i].to_be_bytes())?;
            }
        }
        Ok(())
    }

    /// Queues a refcount decrease of `n` clusters from host offset `off`.
    pub fn queue_free(&mut self, off: u64, n: u64) {
        self.pending_frees.push((off, n));
    }

    /// Whether enough decreases are pending that they should be applied.
    pub fn frees_due(&self) -> bool {
        self.pending_frees.len() > MAX_PENDING_FREES
    }

    /// Applies pending refcount decreases once the mappings that dropped
    /// them are durable. The caller must exclude concurrent data I/O.
    pub fn apply_frees(&mut self) -> Result<()> {
        if self.pending_frees.is_empty() {
            return Ok(());
        }
        self.write_back_mappings()?;
        self.storage.flush()?;
        let frees = std::mem::take(&mut self.pending_frees);
        for (off, n) in frees {
            let first = self.cluster_of(off);
            for c in first..first + n {
                if self.add_refcount(c, -1)? == 0 {
                    self.storage.discard(c * self.cs, self.cs)?;
                }
            }
        }
        Ok(())
    }

    /// Writes everything back in order and flushes the file.
    pub fn flush_all(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.apply_frees()?;
        self.write_back_mappings()?;
        self.write_refblocks()?;
        self.storage.flush()?;
        self.need_barrier = false;
        Ok(())
    }

    // ----- header -----

    /// Writes bytes of the header in place and flushes.
    pub fn write_header_field(&mut self, at: u64, bytes: &[u8]) -> Result<()> {
        self.storage.write_at(at, bytes)?;
        self.storage.flush()
    }

    /// Before the first change: clear autoclear bits (this driver does not
    /// keep bitmaps up to date) and, with lazy refcounts, set the dirty bit.
    pub fn prepare_meta_change(&mut self) -> Result<()> {
        if !self.writable {
            return Err(BlockError::ReadOnly("qcow2".into()));
        }
        if !self.prepared {
            self.prepared = true;
            if self.header.autoclear != 0 {
                self.header.autoclear = 0;
                self.write_header_field(field::AUTOCLEAR, &0u64.to_be_bytes())?;
            }
        }
        if self.lazy && self.header.incompatible & INCOMPAT_DIRTY == 0 {
            self.set_incompatible(self.header.incompatible | INCOMPAT_DIRTY)?;
        }
        Ok(())
    }

    /// Rewrites the incompatible feature bits (version 3 only).
    pub fn set_incompatible(&mut self, bits: u64) -> Result<()> {
        if self.header.version < 3 {
            return Ok(());
        }
        self.header.incompatible = bits;
        self.write_header_field(field::INCOMPATIBLE, &bits.to_be_bytes())
    }

    /// Flushes and clears the dirty bit (closing a lazy-refcounts image).
    pub fn mark_clean(&mut self) -> Result<()> {
        if !self.writable || self.header.incompatible & INCOMPAT_DIRTY == 0 {
            return Ok(());
        }
        self.flush_all()?;
        self.set_incompatible(self.header.incompatible & !INCOMPAT_DIRTY)
    }

    /// Replaces the L1 table in memory and on disk (already written at
    /// `offset`): updates the header.
    pub fn switch_l1(&mut self, offset: u64, l1: Vec<u64>) -> Result<()> {
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&(l1.len() as u32).to_be_bytes());
        b[4..].copy_from_slice(&offset.to_be_bytes());
        self.write_header_field(field::L1_SIZE, &b)?;
        self.header.l1_size = l1.len() as u32;
        self.header.l1_table_offset = offset;
        let bits = self.header.cluster_bits;
        self.overlap
            .set_range(MetaKind::L1, offset, l1.len() as u64 * 8, bits);
        self.l1 = l1;
        self.l1_dirty.clear();
        Ok(())
    }
}
