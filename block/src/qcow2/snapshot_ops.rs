//! Creating, applying and deleting internal snapshots, and reading one
//! instead of the active image, as QEMU's `block/qcow2-snapshot.c` does.
//!
//! Crash-safe order (QEMU's): a new L1 table or snapshot table is written
//! and flushed, with the refcount increases it needs, before the header
//! (or the active L1 table) points at it; refcounts are decreased only
//! after nothing on disk references the clusters any more. A crash leaves
//! at worst leaked clusters.

use std::sync::atomic::Ordering;

use super::cache::{get_u64, set_u64};
use super::header::Header;
use super::meta::{ClusterKind, Meta, MAX_L1_BYTES, OFFSET_MASK, OFLAG_COPIED};
use super::node::Qcow2Node;
use super::overlap::Overlap;
use super::storage::Storage;
use crate::snapshot::{SnapshotError, SnapshotRef};
use crate::Result;

/// QEMU's limit on the snapshot count.
const MAX_SNAPSHOTS: usize = 65536;
/// QEMU's limit on the snapshot table's size (`QCOW_MAX_SNAPSHOTS_SIZE`).
const MAX_TABLE_BYTES: u64 = 64 << 20;
/// The extra data QEMU writes: `vm_state_size_large`, `disk_size`, `icount`.
const EXTRA_LEN: usize = 24;
/// Header offset of `nb_snapshots` (followed by `snapshots_offset`).
const NB_SNAPSHOTS_FIELD: u64 = 60;

/// One snapshot table entry, as QEMU keeps it in memory.
#[derive(Clone, Debug)]
struct Entry {
    l1_offset: u64,
    l1_size: u32,
    id: Vec<u8>,
    name: Vec<u8>,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_nsec: u64,
    vm_state_size: u64,
    disk_size: u64,
    icount: u64,
    /// Extra data past the 24 bytes QEMU knows, kept as it is.
    unknown_extra: Vec<u8>,
}

impl Entry {
    /// Bytes of the entry on disk (without the padding to 8).
    fn len(&self) -> u64 {
        (40 + EXTRA_LEN + self.unknown_extra.len() + self.id.len() + self.name.len()) as u64
    }

    fn serialize(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.l1_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        let small = u32::try_from(self.vm_state_size).unwrap_or(0);
        out.extend_from_slice(&small.to_be_bytes());
        let extra = (EXTRA_LEN + self.unknown_extra.len()) as u32;
        out.extend_from_slice(&extra.to_be_bytes());
        out.extend_from_slice(&self.vm_state_size.to_be_bytes());
        out.extend_from_slice(&self.disk_size.to_be_bytes());
        out.extend_from_slice(&self.icount.to_be_bytes());
        out.extend_from_slice(&self.unknown_extra);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.name);
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Reads the whole snapshot table (QEMU's `qcow2_read_snapshots`); returns
/// the entries and the table's size in bytes.
fn read_table(storage: &Storage, h: &Header) -> Result<(Vec<Entry>, u64)> {
    let bad = |msg: &str| super::error::corrupt(format!("snapshot table: {msg}"));
    if h.nb_snapshots as usize > MAX_SNAPSHOTS {
        return Err(bad("too many snapshots"));
    }
    let end = storage.len();
    let start = h.snapshots_offset;
    let mut off = start;
    let mut out = Vec::with_capacity(h.nb_snapshots as usize);
    for _ in 0..h.nb_snapshots {
        off = off.next_multiple_of(8);
        let mut fixed = [0u8; 40];
        if off.checked_add(40).is_none_or(|e| e > end) {
            return Err(bad("entry past the end of the file"));
        }
        storage.read_at(off, &mut fixed)?;
        let id_len = usize::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name_len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let extra_len = be32(&fixed, 36) as usize;
        if extra_len > 1 << 20 {
            return Err(bad("entry too large"));
        }
        let var = extra_len + id_len + name_len;
        let next = off + 40 + var as u64;
        if next - start > MAX_TABLE_BYTES || next > end {
            return Err(bad("entry past the end of the file"));
        }
        let mut rest = vec![0u8; var];
        storage.read_at(off + 40, &mut rest)?;
        let extra = &rest[..extra_len];
        let vm_state_size = if extra.len() >= 8 {
            be64(extra, 0)
        } else {
            u64::from(be32(&fixed, 32))
        };
        let disk_size = if extra.len() >= 16 {
            be64(extra, 8)
        } else {
            h.size
        };
        let icount = if extra.len() >= 24 {
            be64(extra, 16)
        } else {
            u64::MAX
        };
        out.push(Entry {
            l1_offset: be64(&fixed, 0),
            l1_size: be32(&fixed, 8),
            id: rest[extra_len..extra_len + id_len].to_vec(),
            name: rest[extra_len + id_len..].to_vec(),
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size,
            disk_size,
            icount,
            unknown_extra: extra.get(EXTRA_LEN..).unwrap_or_default().to_vec(),
        });
        off = next;
    }
    Ok((out, off - start))
}

/// QEMU's `find_snapshot_by_id_and_name`.
fn find_by_id_and_name(list: &[Entry], id: Option<&str>, name: Option<&str>) -> Option<usize> {
    list.iter().position(|e| {
        id.is_none_or(|i| e.id == i.as_bytes()) && name.is_none_or(|n| e.name == n.as_bytes())
    })
}

fn find(list: &[Entry], which: SnapshotRef<'_>) -> Option<usize> {
    match which {
        SnapshotRef::IdOrName(s) => find_by_id_and_name(list, Some(s), None)
            .or_else(|| find_by_id_and_name(list, None, Some(s))),
        SnapshotRef::IdAndName {
            id: None,
            name: None,
        } => None,
        SnapshotRef::IdAndName { id, name } => find_by_id_and_name(list, id, name),
    }
}

/// QEMU's `qcow2_validate_table` on a snapshot's L1 table.
fn validate_l1(m: &Meta, e: &Entry) -> Result<()> {
    if u64::from(e.l1_size) * 8 > MAX_L1_BYTES {
        return Err(SnapshotError::BadL1("too large").into());
    }
    let bytes = u64::from(e.l1_size) * 8;
    if e.l1_offset & (m.cs - 1) != 0
        || e.l1_offset
            .checked_add(bytes)
            .is_none_or(|end| end > m.storage.len().max(e.l1_offset))
    {
        return Err(SnapshotError::BadL1("offset invalid").into());
    }
    Ok(())
}

fn read_l1(m: &Meta, offset: u64, entries: usize, padded: usize) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; entries * 8];
    if entries > 0 {
        m.storage.read_at(offset, &mut raw)?;
    }
    let mut l1: Vec<u64> = (0..entries).map(|i| get_u64(&raw, i)).collect();
    l1.resize(padded.max(entries), 0);
    Ok(l1)
}

fn write_l1(m: &Meta, offset: u64, l1: &[u64]) -> Result<()> {
    if l1.is_empty() {
        return Ok(());
    }
    let mut raw = vec![0u8; l1.len() * 8];
    for (i, &e) in l1.iter().enumerate() {
        set_u64(&mut raw, i, e);
    }
    m.storage.write_at(offset, &raw)?;
    m.storage.flush()
}

/// QEMU's `qcow2_update_snapshot_refcount`: adds `addend` to the refcount
/// of every L2 table and data cluster `l1` reaches, and sets or clears the
/// COPIED flags in `l1` and its L2 tables by the new refcounts. Returns
/// whether `l1` changed (the caller writes it back).
fn update_refcounts(m: &mut Meta, l1: &mut [u64], addend: i64) -> Result<bool> {
    let bits = m.header.cluster_bits;
    let step = (m.l2_entry_bytes / 8) as usize;
    let mut l1_modified = false;
    for l1e in l1.iter_mut() {
        let l2_off = *l1e & OFFSET_MASK;
        if l2_off == 0 {
            continue;
        }
        m.load_l2(l2_off)?;
        let mut t = m.l2_cache.get(l2_off).expect("loaded").to_vec();
        let mut changed = false;
        for j in 0..m.l2_entries as usize {
            let old = get_u64(&t, j * step);
            let mut entry = old & !OFLAG_COPIED;
            let refcount = match m.classify(entry)? {
                ClusterKind::Compressed { offset, size } => {
                    if addend != 0 {
                        let first = offset >> bits;
                        let last = (offset + size.max(1) - 1) >> bits;
                        for c in first..=last {
                            unref(m, c, addend)?;
                        }
                    }
                    // Compressed clusters are never written in place.
                    2
                }
                ClusterKind::Normal(h) | ClusterKind::ZeroAlloc(h) => {
                    let c = h >> bits;
                    if addend != 0 {
                        unref(m, c, addend)?;
                    }
                    m.refcount(c)?
                }
                ClusterKind::ZeroPlain | ClusterKind::Unallocated => 0,
            };
            if refcount == 1 {
                entry |= OFLAG_COPIED;
            }
            if entry != old {
                set_u64(&mut t, j * step, entry);
                changed = true;
            }
        }
        if changed {
            m.load_l2(l2_off)?;
            m.l2_cache
                .get_mut(l2_off)
                .expect("loaded")
                .copy_from_slice(&t);
        }
        let c = l2_off >> bits;
        if addend != 0 && unref(m, c, addend)? == 0 {
            // Freed: its cached copy must not be written back over whatever
            // reuses the cluster.
            m.l2_cache.remove(l2_off);
        }
        let new = if m.refcount(c)? == 1 {
            l2_off | OFLAG_COPIED
        } else {
            l2_off
        };
        if new != *l1e {
            *l1e = new;
            l1_modified = true;
        }
    }
    Ok(l1_modified)
}

/// Adds `addend` to the refcount of cluster `c` (refusing an overflow as
/// QEMU does, with `EINVAL`); a cluster freed is
/// discarded on the host (QEMU's `QCOW2_DISCARD_SNAPSHOT`). Returns the new count.
fn unref(m: &mut Meta, c: u64, addend: i64) -> Result<u64> {
    if addend > 0 && m.refcount(c)?.saturating_add(addend as u64) > m.max_refcount() {
        return Err(SnapshotError::RefcountOverflow.into());
    }
    let n = m.add_refcount(c, addend)?;
    if n == 0 {
        m.storage.discard(c * m.cs, m.cs)?;
    }
    Ok(n)
}

/// Frees `bytes` of clusters from host offset `off` (refcount minus one).
fn free_clusters(m: &mut Meta, off: u64, bytes: u64) -> Result<()> {
    if off == 0 || bytes == 0 {
        return Ok(());
    }
    let first = m.cluster_of(off);
    let last = m.cluster_of(off + bytes - 1);
    for c in first..=last {
        if m.add_refcount(c, -1)? == 0 {
            m.storage.discard(c * m.cs, m.cs)?;
        }
    }
    Ok(())
}

/// QEMU's `qcow2_write_snapshots`: writes `list` to new clusters, flushes,
/// points the header at it, then frees the old table.
fn write_table(m: &mut Meta, list: &[Entry], old_bytes: u64) -> Result<()> {
    let mut size = 0u64;
    for e in list {
        size = size.next_multiple_of(8) + e.len();
        if size > MAX_TABLE_BYTES {
            return Err(SnapshotError::TooLarge.into());
        }
    }
    let offset = if list.is_empty() {
        0
    } else {
        let off = m.alloc_clusters(size.div_ceil(m.cs))?;
        let mut raw = Vec::with_capacity(size as usize);
        for e in list {
            raw.resize(raw.len().next_multiple_of(8), 0);
            e.serialize(&mut raw);
        }
        m.storage.write_at(off, &raw)?;
        off
    };
    // The table and its refcounts are durable before the header names it.
    m.flush_all()?;
    let mut hdr = [0u8; 12];
    hdr[..4].copy_from_slice(&(list.len() as u32).to_be_bytes());
    hdr[4..].copy_from_slice(&offset.to_be_bytes());
    m.write_header_field(NB_SNAPSHOTS_FIELD, &hdr)?;
    let old_off = m.header.snapshots_offset;
    let had = m.header.nb_snapshots > 0;
    m.header.nb_snapshots = list.len() as u32;
    m.header.snapshots_offset = offset;
    if had {
        free_clusters(m, old_off, old_bytes)?;
    }
    Ok(())
}

/// QEMU's `find_new_snapshot_id`: one more than the largest numeric ID.
fn new_id(list: &[Entry]) -> String {
    let max = list.iter().map(|e| strtoul(&e.id)).max().unwrap_or(0);
    max.wrapping_add(1).to_string()
}

/// C's `strtoul(s, NULL, 10)`: leading digits, 0 without any.
fn strtoul(s: &[u8]) -> u64 {
    let t = String::from_utf8_lossy(s);
    let t = t.trim_start();
    let digits: String = t.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or(if digits.is_empty() { 0 } else { u64::MAX })
}

impl Qcow2Node {
    /// Writes back everything, then runs `f` on the metadata with data I/O
    /// excluded; afterwards writes everything back again and rebuilds the
    /// metadata map of the overlap check.
    fn snapshot_op<T>(&self, f: impl FnOnce(&Self, &mut Meta) -> Result<T>) -> Result<T> {
        self.check_writable()?;
        let _io = self.io_write_guard()?;
        let mut m = self.lock_meta()?;
        self.prepare(&mut m)?;
        m.flush_all()?;
        let r = f(self, &mut m);
        let flushed = m.flush_all();
        // Freed tables may still be cached; drop what is clean.
        m.l2_cache.clear_clean();
        m.overlap = Overlap::build(&m.storage, &m.header, &m.l1, &m.reftable);
        let v = r?;
        flushed?;
        Ok(v)
    }

    /// Creates a snapshot of the active image (QEMU's `qcow2_snapshot_create`).
    pub(super) fn do_snapshot_create(
        &self,
        name: &str,
        date_sec: u32,
        date_nsec: u32,
    ) -> Result<()> {
        let disk_size = self.size.load(Ordering::Acquire);
        self.snapshot_op(|_, m| {
            let (mut list, old_bytes) = read_table(&m.storage, &m.header)?;
            if list.len() >= MAX_SNAPSHOTS {
                return Err(SnapshotError::TooLarge.into());
            }
            let id = new_id(&list);
            if find_by_id_and_name(&list, Some(&id), None).is_some() {
                return Err(SnapshotError::Exists.into());
            }
            if name.len() > usize::from(u16::MAX) {
                return Err(SnapshotError::TooLarge.into());
            }
            // A copy of the active L1 table, in new clusters.
            let l1_bytes = m.l1.len() as u64 * 8;
            let l1_offset = if l1_bytes == 0 {
                0
            } else {
                m.alloc_clusters(l1_bytes.div_ceil(m.cs))?
            };
            let copy = m.l1.clone();
            m.write_refblocks()?;
            write_l1(m, l1_offset, &copy)?;
            // Everything the active table reaches is now shared.
            let mut active = m.l1.clone();
            let modified = update_refcounts(m, &mut active, 1)?;
            m.write_back_mappings()?;
            m.write_refblocks()?;
            m.storage.flush()?;
            if modified {
                let at = m.header.l1_table_offset;
                write_l1(m, at, &active)?;
            }
            m.l1 = active;
            list.push(Entry {
                l1_offset,
                l1_size: copy.len() as u32,
                id: id.into_bytes(),
                name: name.as_bytes().to_vec(),
                date_sec,
                date_nsec,
                vm_clock_nsec: 0,
                vm_state_size: 0,
                disk_size,
                icount: 0,
                unknown_extra: Vec::new(),
            });
            write_table(m, &list, old_bytes)
        })
    }

    /// Makes the active image the snapshot (QEMU's `qcow2_snapshot_goto`).
    pub(super) fn do_snapshot_goto(&self, which: &str) -> Result<()> {
        let sn = {
            let m = self.lock_meta()?;
            let (list, _) = read_table(&m.storage, &m.header)?;
            let i = find(&list, SnapshotRef::IdOrName(which)).ok_or(SnapshotError::NotFound)?;
            validate_l1(&m, &list[i])?;
            list[i].clone()
        };
        self.check_writable()?;
        if sn.disk_size != self.size.load(Ordering::Acquire) {
            self.do_truncate(sn.disk_size, crate::resize::Prealloc::Off)?;
        }
        self.snapshot_op(|_, m| {
            m.grow_l1(u64::from(sn.l1_size))?;
            m.flush_all()?;
            let cur_len = m.l1.len();
            let sn_l1 = read_l1(m, sn.l1_offset, sn.l1_size as usize, cur_len)?;
            // What the snapshot reaches gains the active image's reference.
            let mut sn_tab = sn_l1[..sn.l1_size as usize].to_vec();
            if update_refcounts(m, &mut sn_tab, 1)? {
                m.write_back_mappings()?;
                m.write_refblocks()?;
                m.storage.flush()?;
                write_l1(m, sn.l1_offset, &sn_tab)?;
            }
            m.write_back_mappings()?;
            m.write_refblocks()?;
            m.storage.flush()?;
            let at = m.header.l1_table_offset;
            write_l1(m, at, &sn_l1)?;
            // What the old active table reached loses its reference.
            let mut old = std::mem::replace(&mut m.l1, sn_l1);
            update_refcounts(m, &mut old, -1)?;
            m.write_back_mappings()?;
            m.write_refblocks()?;
            m.storage.flush()?;
            // COPIED flags of the new active table by its refcounts now.
            let mut active = m.l1.clone();
            if update_refcounts(m, &mut active, 0)? {
                m.write_back_mappings()?;
                m.write_refblocks()?;
                m.storage.flush()?;
                write_l1(m, at, &active)?;
            }
            m.l1 = active;
            Ok(())
        })
    }

    /// Deletes the snapshot of this ID and name (QEMU's `qcow2_snapshot_delete`).
    pub(super) fn do_snapshot_delete(&self, id: &str, name: &str) -> Result<()> {
        self.snapshot_op(|_, m| {
            let (mut list, old_bytes) = read_table(&m.storage, &m.header)?;
            let i =
                find_by_id_and_name(&list, Some(id), Some(name)).ok_or(SnapshotError::NotFound)?;
            validate_l1(m, &list[i])?;
            let sn = list.remove(i);
            write_table(m, &list, old_bytes)?;
            // The snapshot is unreferenced now: drop what it reached.
            let mut sn_l1 = read_l1(m, sn.l1_offset, sn.l1_size as usize, 0)?;
            update_refcounts(m, &mut sn_l1, -1)?;
            m.write_back_mappings()?;
            m.write_refblocks()?;
            m.storage.flush()?;
            let mut active = m.l1.clone();
            if update_refcounts(m, &mut active, 0)? {
                m.write_back_mappings()?;
                m.write_refblocks()?;
                m.storage.flush()?;
                let at = m.header.l1_table_offset;
                write_l1(m, at, &active)?;
            }
            m.l1 = active;
            free_clusters(m, sn.l1_offset, u64::from(sn.l1_size) * 8)
        })
    }

    /// Reads the snapshot instead of the active image from now on (QEMU's
    /// `qcow2_snapshot_load_tmp`); read-only nodes only.
    pub(super) fn do_snapshot_load_tmp(&self, which: SnapshotRef<'_>) -> Result<()> {
        if !self.read_only {
            return Err(crate::BlockError::NotSupported(
                "load_tmp is only supported on read-only images".into(),
            ));
        }
        let _io = self.io_write_guard()?;
        let mut m = self.lock_meta()?;
        let (list, _) = read_table(&m.storage, &m.header)?;
        let i = find(&list, which).ok_or(SnapshotError::NotFound)?;
        validate_l1(&m, &list[i])?;
        let sn = &list[i];
        let l1 = read_l1(&m, sn.l1_offset, sn.l1_size as usize, 0)?;
        m.header.l1_size = sn.l1_size;
        m.header.l1_table_offset = sn.l1_offset;
        m.l1 = l1;
        Ok(())
    }

    /// The snapshots, as `qemu-img info` lists them.
    pub(super) fn do_snapshot_list(&self) -> Result<Vec<super::SnapshotInfo>> {
        let m = self.lock_meta()?;
        super::snapshot::read_snapshots(&m.storage, &m.header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_as_qemu() {
        let e = |id: &str| Entry {
            l1_offset: 0,
            l1_size: 0,
            id: id.as_bytes().to_vec(),
            name: Vec::new(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: 0,
            icount: 0,
            unknown_extra: Vec::new(),
        };
        assert_eq!(new_id(&[]), "1");
        assert_eq!(new_id(&[e("1"), e("7"), e("x")]), "8");
        assert_eq!(strtoul(b"12abc"), 12);
        let list = [e("1"), e("2")];
        assert_eq!(find(&list, SnapshotRef::IdOrName("2")), Some(1));
        assert_eq!(find(&list, SnapshotRef::IdOrName("3")), None);
        let mut buf = Vec::new();
        list[0].serialize(&mut buf);
        assert_eq!(buf.len() as u64, list[0].len());
        assert_eq!(be32(&buf, 36), 24);
    }
}
