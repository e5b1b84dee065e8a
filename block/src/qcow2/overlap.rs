//! The metadata overlap check (QEMU's `overlap-check=cached`): the host
//! clusters that hold metadata, so that guest data is never written over
//! them when a hostile or damaged image points a data cluster there.
//!
//! Single-cluster structures (L2 tables, refcount blocks) are kept in a hash
//! map of cluster indices; contiguous structures (header, L1 table, refcount
//! table, snapshot table and snapshot L1 tables) as cluster ranges. A lookup
//! is one hash probe plus a binary search over a few ranges.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::cache::get_u64;
use super::header::Header;
use super::meta::{MAX_L1_BYTES, OFFSET_MASK};
use super::storage::Storage;

/// What kind of metadata a host cluster holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaKind {
    /// The image header (cluster 0, with its extensions and backing name).
    Header,
    /// The active L1 table.
    L1,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// An L2 table.
    L2,
    /// The snapshot table.
    SnapshotTable,
    /// The L1 table of an internal snapshot.
    SnapshotL1,
    /// The LUKS header of an encrypted image.
    CryptoHeader,
}

impl MetaKind {
    /// The name used in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::L1 => "L1 table",
            Self::RefcountTable => "refcount table",
            Self::RefcountBlock => "refcount block",
            Self::L2 => "L2 table",
            Self::SnapshotTable => "snapshot table",
            Self::SnapshotL1 => "snapshot L1 table",
            Self::CryptoHeader => "encryption header",
        }
    }
}

/// A cheap hasher for cluster indices (multiplicative, with the high bits
/// folded into the low ones that pick the bucket).
#[derive(Default)]
pub struct ClusterHasher(u64);

impl Hasher for ClusterHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let x = (self.0.rotate_left(5) ^ n ^ (n >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 32);
    }
}

type ClusterMap = HashMap<u64, MetaKind, BuildHasherDefault<ClusterHasher>>;

/// Most bytes of the snapshot table walked at open (as QEMU's limit).
const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;

/// The host clusters holding metadata.
#[derive(Default)]
pub struct Overlap {
    /// Whether the check is in use (writable images only).
    enabled: bool,
    /// L2 tables and refcount blocks, by cluster index.
    clusters: ClusterMap,
    /// Contiguous structures: `[start, end)` cluster ranges.
    ranges: Vec<(u64, u64, MetaKind)>,
    /// `ranges` sorted by start, with the running maximum of their ends.
    sorted: Vec<(u64, u64, u64, MetaKind)>,
}

/// The cluster range `[start, end)` covering `len` bytes at `off`.
fn cluster_range(off: u64, len: u64, bits: u32) -> Option<(u64, u64)> {
    if len == 0 {
        return None;
    }
    let last = off.checked_add(len - 1)?;
    Some((off >> bits, (last >> bits) + 1))
}

impl Overlap {
    /// An overlap check that reports nothing (read-only images).
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Builds the set from the header, the in-memory L1 and refcount tables
    /// and the snapshot table (read from `storage`).
    pub fn build(storage: &Storage, h: &Header, l1: &[u64], reftable: &[u64]) -> Self {
        let bits = h.cluster_bits;
        let mut o = Self {
            enabled: true,
            ..Self::default()
        };
        o.ranges.push((0, 1, MetaKind::Header));
        if let Some((s, e)) = cluster_range(h.l1_table_offset, u64::from(h.l1_size) * 8, bits) {
            o.ranges.push((s, e, MetaKind::L1));
        }
        let rt_bytes = u64::from(h.refcount_table_clusters) << bits;
        if let Some((s, e)) = cluster_range(h.refcount_table_offset, rt_bytes, bits) {
            o.ranges.push((s, e, MetaKind::RefcountTable));
        }
        o.add_snapshots(storage, h);
        if let Some((off, len)) = super::crypt::crypto_header_range(h) {
            if let Some((s, e)) = cluster_range(off, len, bits) {
                o.ranges.push((s, e, MetaKind::CryptoHeader));
            }
        }
        for &e in reftable {
            let off = e & OFFSET_MASK;
            if off != 0 {
                o.clusters.insert(off >> bits, MetaKind::RefcountBlock);
            }
        }
        for &e in l1 {
            let off = e & OFFSET_MASK;
            if off != 0 {
                o.clusters.insert(off >> bits, MetaKind::L2);
            }
        }
        o.sort();
        o
    }

    /// Adds the snapshot table and the snapshot L1 tables it names.
    fn add_snapshots(&mut self, storage: &Storage, h: &Header) {
        if h.nb_snapshots == 0 {
            return;
        }
        let bits = h.cluster_bits;
        let start = h.snapshots_offset;
        let file_len = storage.len();
        let mut at = start;
        for _ in 0..h.nb_snapshots {
            if at - start > MAX_SNAPSHOT_TABLE_BYTES || at >= file_len {
                break;
            }
            let mut e = [0u8; 40];
            if storage.read_at(at, &mut e).is_err() {
                break;
            }
            let l1_off = get_u64(&e, 0);
            let l1_bytes = u64::from(u32::from_be_bytes([e[8], e[9], e[10], e[11]])) * 8;
            let id_len = u64::from(u16::from_be_bytes([e[12], e[13]]));
            let name_len = u64::from(u16::from_be_bytes([e[14], e[15]]));
            let extra = u64::from(u32::from_be_bytes([e[36], e[37], e[38], e[39]]));
            if l1_bytes <= MAX_L1_BYTES {
                if let Some((s, e)) = cluster_range(l1_off, l1_bytes, bits) {
                    self.ranges.push((s, e, MetaKind::SnapshotL1));
                }
            }
            let Some(next) = at.checked_add((40 + extra + id_len + name_len).next_multiple_of(8))
            else {
                break;
            };
            at = next;
        }
        if let Some((s, e)) = cluster_range(start, at.max(start + 40) - start, bits) {
            self.ranges.push((s, e, MetaKind::SnapshotTable));
        }
    }

    fn sort(&mut self) {
        let mut v: Vec<(u64, u64, MetaKind)> = self.ranges.clone();
        v.sort_unstable_by_key(|r| r.0);
        let mut max_end = 0;
        self.sorted = v
            .into_iter()
            .map(|(s, e, k)| {
                max_end = max_end.max(e);
                (s, e, max_end, k)
            })
            .collect();
    }

    /// The metadata held by host cluster `c`, if any.
    #[inline]
    pub fn find(&self, c: u64) -> Option<MetaKind> {
        if !self.enabled {
            return None;
        }
        if let Some(&k) = self.clusters.get(&c) {
            return Some(k);
        }
        // Ranges starting at or before `c`; any of them may cover it.
        let n = self.sorted.partition_point(|r| r.0 <= c);
        for r in self.sorted[..n].iter().rev() {
            if r.2 <= c {
                break;
            }
            if r.1 > c {
                return Some(r.3);
            }
        }
        None
    }

    /// The first metadata cluster among `[first, end)` clusters, if any.
    pub fn find_range(&self, first: u64, end: u64) -> Option<(u64, MetaKind)> {
        if !self.enabled {
            return None;
        }
        (first..end).find_map(|c| self.find(c).map(|k| (c, k)))
    }

    /// Records a new single-cluster structure (L2 table, refcount block).
    pub fn insert(&mut self, c: u64, kind: MetaKind) {
        if self.enabled {
            self.clusters.insert(c, kind);
        }
    }

    /// Forgets cluster `c` (its refcount dropped to zero).
    #[inline]
    pub fn remove(&mut self, c: u64) {
        if self.enabled && !self.clusters.is_empty() {
            self.clusters.remove(&c);
        }
    }

    /// Replaces the range of a contiguous structure (L1 or refcount table
    /// moved): `len` bytes at `off`.
    pub fn set_range(&mut self, kind: MetaKind, off: u64, len: u64, bits: u32) {
        if !self.enabled {
            return;
        }
        self.ranges.retain(|r| r.2 != kind);
        if let Some((s, e)) = cluster_range(off, len, bits) {
            self.ranges.push((s, e, kind));
        }
        self.sort();
    }
}
