//! Consistency check and repair, as `qemu-img check` does it: walk every
//! metadata structure, count the references each host cluster should have,
//! compare with the stored refcounts (leaks: stored too high; corruptions:
//! too low or broken entries), check the COPIED flags, and optionally fix.

use super::cache::{get_u64, set_u64};
use super::header::{AUTOCLEAR_BITMAPS, EXT_BITMAPS};
use super::meta::{ClusterKind, Meta, MAX_L1_BYTES, OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use super::node::read_header;
use super::storage::Storage;
use super::Qcow2Error;
use crate::node::NodeRef;
use crate::Result;
use std::sync::Arc;

/// What to repair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Only report.
    None,
    /// Fix leaked clusters (`-r leaks`).
    Leaks,
    /// Fix leaks and corruptions (`-r all`).
    All,
}

/// Counts and messages of a check, as `qemu-img check` reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Errors found (refcount too low, broken entries, wrong COPIED flags).
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references.
    pub leaks: u64,
    /// Errors while checking (I/O).
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Corruptions no repair mode fixes (broken or overlapping table entries, as
    /// opposed to wrong refcounts and COPIED flags): found by any check, so a dry run
    /// ([`Repair::None`]) tells whether `-r all` could make the image whole.
    pub unrepairable: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// End of the last used cluster.
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Guest clusters allocated in the active L1/L2 tables.
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// One line per problem, in QEMU's wording.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// No corruptions, leaks or check errors remain (after repairs).
    pub fn is_clean(&self) -> bool {
        self.corruptions == self.corruptions_fixed
            && self.leaks == self.leaks_fixed
            && self.check_errors == 0
    }
}

/// Most host clusters a check will count (bounds its memory: 1 GiB).
const MAX_CHECK_CLUSTERS: u64 = 1 << 28;
/// Most bytes of the snapshot table or bitmap directory read.
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;

/// Most messages a check keeps; the rest are counted in a last line (a hostile
/// image can have billions of leaked clusters).
pub const MAX_CHECK_MESSAGES: usize = 10_000;

struct Counter<'a> {
    m: &'a mut Meta,
    expected: Vec<u32>,
    r: CheckReport,
    /// Messages not kept (past [`MAX_CHECK_MESSAGES`]).
    suppressed: u64,
}

impl Counter<'_> {
    /// Keeps a message, or counts it once [`MAX_CHECK_MESSAGES`] are kept
    /// (then it is not even formatted).
    fn note(&mut self, message: impl FnOnce() -> String) {
        if self.r.messages.len() < MAX_CHECK_MESSAGES {
            self.r.messages.push(message());
        } else {
            self.suppressed += 1;
        }
    }

    fn inc(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let cs = self.m.cs;
        let first = off / cs;
        let last = (off.saturating_add(len) - 1) / cs;
        if last >= self.expected.len() as u64 {
            self.r.corruptions += 1;
            self.note(|| format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x}"
            ));
            return;
        }
        for c in first..=last {
            let e = &mut self.expected[c as usize];
            *e = e.saturating_add(1);
        }
    }

    fn read(&mut self, off: u64, len: u64) -> Option<Vec<u8>> {
        let mut b = vec![0u8; len as usize];
        match self.m.storage.read_at(off, &mut b) {
            Ok(()) => Some(b),
            Err(e) => {
                self.r.check_errors += 1;
                self.note(|| format!("ERROR reading metadata at {off:#x}: {e}"));
                None
            }
        }
    }

    fn in_file(&self, off: u64) -> bool {
        off / self.m.cs < self.expected.len() as u64
    }

    /// Counts an L1 table and everything under it.
    fn walk_l1(&mut self, l1_off: u64, l1_size: u64, active: bool) {
        let cs = self.m.cs;
        if l1_size * 8 > MAX_L1_BYTES || !l1_off.is_multiple_of(cs) {
            self.r.corruptions += 1;
            self.note(|| {
                format!("ERROR: L1 table at {l1_off:#x} with {l1_size} entries is invalid")
            });
            return;
        }
        self.inc(l1_off, l1_size * 8);
        if l1_size == 0 || !self.in_file(l1_off + l1_size * 8 - 1) {
            return;
        }
        let Some(l1) = self.read(l1_off, l1_size * 8) else {
            return;
        };
        for i in 0..l1_size as usize {
            let l2_off = get_u64(&l1, i) & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            if !l2_off.is_multiple_of(cs) {
                self.r.corruptions += 1;
                self.note(|| {
                    format!(
                    "ERROR l2_offset={l2_off:#x}: Table is not cluster aligned; L1 entry corrupted"
                )
                });
                continue;
            }
            self.inc(l2_off, cs);
            if !self.in_file(l2_off) {
                continue;
            }
            let Some(l2) = self.read(l2_off, cs) else {
                continue;
            };
            self.walk_l2(&l2, active);
        }
    }

    /// Counts the clusters of one L2 table. As in QEMU's
    /// `check_refcounts_l2`, fragmentation is counted within each table: the
    /// first allocated cluster of a table is never fragmented, each later one
    /// is when it does not follow the previous one; compressed clusters are
    /// always fragmented (and do not move the expected next offset).
    fn walk_l2(&mut self, l2: &[u8], active: bool) {
        let cs = self.m.cs;
        let mut next_contiguous = 0u64;
        let step = (self.m.l2_entry_bytes / 8) as usize;
        for i in 0..self.m.l2_entries as usize {
            let e = get_u64(l2, i * step);
            if e & OFLAG_COMPRESSED != 0 && e & OFLAG_COPIED != 0 {
                {
                    self.r.corruptions += 1;
                    self.note(|| {
                        format!(
                            "ERROR: coffset={:#x}: Compressed cluster has the copied flag set",
                            e & !OFLAG_COPIED
                        )
                    });
                }
            }
            match self.m.classify(e) {
                Ok(ClusterKind::Compressed { offset, size }) => {
                    if active {
                        self.r.allocated_clusters += 1;
                        self.r.compressed_clusters += 1;
                        self.r.fragmented_clusters += 1;
                    }
                    self.inc(offset, size);
                }
                Ok(ClusterKind::Normal(h)) | Ok(ClusterKind::ZeroAlloc(h)) => {
                    if active {
                        self.r.allocated_clusters += 1;
                        if next_contiguous != 0 && h != next_contiguous {
                            self.r.fragmented_clusters += 1;
                        }
                        next_contiguous = h + cs;
                    }
                    self.inc(h, cs);
                }
                Ok(_) => {}
                Err(_) => {
                    self.r.corruptions += 1;
                    self.note(|| {
                        format!(
                        "ERROR offset={:#x}: Cluster is not properly aligned; L2 entry corrupted",
                        e & OFFSET_MASK
                    )
                    });
                }
            }
        }
    }

    fn walk_snapshots(&mut self) {
        let h = &self.m.header;
        let (n, off) = (h.nb_snapshots, h.snapshots_offset);
        if n == 0 {
            return;
        }
        let mut at = off;
        for _ in 0..n {
            if at - off > MAX_DIRECTORY_BYTES || !self.in_file(at + 39) {
                self.r.corruptions += 1;
                self.note(|| "ERROR: snapshot table is truncated or too large".into());
                return;
            }
            let Some(e) = self.read(at, 40) else {
                return;
            };
            let l1_off = get_u64(&e, 0);
            let l1_size = u64::from(u32::from_be_bytes([e[8], e[9], e[10], e[11]]));
            let id_len = u64::from(u16::from_be_bytes([e[12], e[13]]));
            let name_len = u64::from(u16::from_be_bytes([e[14], e[15]]));
            let extra = u64::from(u32::from_be_bytes([e[36], e[37], e[38], e[39]]));
            self.walk_l1(l1_off, l1_size, false);
            at += (40 + extra + id_len + name_len).next_multiple_of(8);
        }
        self.inc(off, at - off);
    }

    fn walk_bitmaps(&mut self) {
        if self.m.header.autoclear & AUTOCLEAR_BITMAPS == 0 {
            return;
        }
        let Some(ext) = self.m.header.extension(EXT_BITMAPS).map(<[u8]>::to_vec) else {
            return;
        };
        if ext.len() < 24 {
            return;
        }
        let dir_size = get_u64(&ext, 1);
        let dir_off = get_u64(&ext, 2);
        if dir_size > MAX_DIRECTORY_BYTES || dir_size == 0 || !self.in_file(dir_off + dir_size - 1)
        {
            self.r.corruptions += 1;
            self.note(|| "ERROR: bitmap directory is invalid".into());
            return;
        }
        self.inc(dir_off, dir_size);
        let Some(dir) = self.read(dir_off, dir_size) else {
            return;
        };
        let mut at = 0usize;
        while at + 24 <= dir.len() {
            let t_off = get_u64(&dir[at..], 0);
            let t_size = u64::from(u32::from_be_bytes([
                dir[at + 8],
                dir[at + 9],
                dir[at + 10],
                dir[at + 11],
            ]));
            let name = u64::from(u16::from_be_bytes([dir[at + 18], dir[at + 19]]));
            let extra = u64::from(u32::from_be_bytes([
                dir[at + 20],
                dir[at + 21],
                dir[at + 22],
                dir[at + 23],
            ]));
            self.inc(t_off, t_size * 8);
            if t_size > 0
                && t_size * 8 <= MAX_DIRECTORY_BYTES
                && self.in_file(t_off + t_size * 8 - 1)
            {
                if let Some(t) = self.read(t_off, t_size * 8) {
                    for i in 0..t_size as usize {
                        let o = get_u64(&t, i) & OFFSET_MASK;
                        if o != 0 {
                            self.inc(o, self.m.cs);
                        }
                    }
                }
            }
            at += (24 + extra + name).next_multiple_of(8) as usize;
        }
    }

    fn walk_refcount_structures(&mut self) {
        let cs = self.m.cs;
        let rt_off = self.m.header.refcount_table_offset;
        self.inc(
            rt_off,
            u64::from(self.m.header.refcount_table_clusters) * cs,
        );
        for i in 0..self.m.reftable.len() {
            let off = self.m.reftable[i] & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) {
                self.r.corruptions += 1;
                self.note(|| format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                continue;
            }
            if !self.in_file(off) {
                self.r.corruptions += 1;
                self.note(|| format!("ERROR refcount block {i} is outside image"));
                continue;
            }
            self.inc(off, cs);
        }
    }

    /// Compares and (optionally) fixes refcounts.
    fn compare(&mut self, repair: Repair) -> Result<()> {
        let mut highest = None;
        let nb = self.expected.len() as u64;
        // Clusters past the end of the file can only be covered by refblocks.
        let covered = (self.m.reftable.len() as u64).saturating_mul(self.m.rb_entries);
        let mut i = 0u64;
        // Past the file end, each refcount block is compared once: a table
        // repeating one block would otherwise make the walk as long as the
        // table can address, whatever the image's real size.
        let mut seen_blocks = std::collections::HashSet::new();
        while i < nb.max(covered) {
            if i >= nb && i.is_multiple_of(self.m.rb_entries) {
                // Skip refblocks that do not exist (all zero) past the file end.
                match self.m.refblock_offset(i / self.m.rb_entries) {
                    Ok(0) | Err(_) => {
                        i += self.m.rb_entries;
                        continue;
                    }
                    Ok(off) if !seen_blocks.insert(off) => {
                        i += self.m.rb_entries;
                        continue;
                    }
                    Ok(_) => {}
                }
            }
            let exp = self.expected.get(i as usize).copied().unwrap_or(0) as u64;
            let stored = match self.m.refcount(i) {
                Ok(v) => v,
                Err(e) => {
                    self.r.check_errors += 1;
                    self.note(|| format!("ERROR: cannot get refcount of cluster {i}: {e}"));
                    i += 1;
                    continue;
                }
            };
            if stored > 0 || exp > 0 {
                highest = Some(i);
            }
            if stored != exp {
                let leak = stored > exp;
                if leak {
                    self.r.leaks += 1;
                    self.note(|| format!("Leaked cluster {i} refcount={stored} reference={exp}"));
                } else {
                    self.r.corruptions += 1;
                    self.note(|| format!("ERROR cluster {i} refcount={stored} reference={exp}"));
                }
                let fix = match repair {
                    Repair::All => true,
                    Repair::Leaks => leak,
                    Repair::None => false,
                };
                if fix {
                    self.m.ensure_covered(i)?;
                    self.m.set_refcount(i, exp)?;
                    if leak {
                        self.r.leaks_fixed += 1;
                    } else {
                        self.r.corruptions_fixed += 1;
                    }
                }
            }
            i += 1;
        }
        self.r.image_end_offset = highest.map_or(0, |h| (h + 1) * self.m.cs);
        Ok(())
    }

    /// Checks (and with `All`, fixes) the COPIED flags of the active tables.
    fn check_copied(&mut self, repair: Repair) -> Result<()> {
        let cs = self.m.cs;
        let fix = repair == Repair::All;
        let step = (self.m.l2_entry_bytes / 8) as usize;
        for i in 0..self.m.l1.len() {
            let l1e = self.m.l1[i];
            let l2_off = l1e & OFFSET_MASK;
            if l2_off == 0 || !l2_off.is_multiple_of(cs) || !self.in_file(l2_off) {
                continue;
            }
            let rc = self.m.refcount(l2_off / cs)?;
            if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
                self.r.corruptions += 1;
                self.note(|| {
                    format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"
                )
                });
                if fix {
                    let new = if rc == 1 {
                        l1e | OFLAG_COPIED
                    } else {
                        l1e & !OFLAG_COPIED
                    };
                    let at = self.m.header.l1_table_offset + i as u64 * 8;
                    self.m.storage.write_at(at, &new.to_be_bytes())?;
                    self.m.l1[i] = new;
                    self.r.corruptions_fixed += 1;
                }
            }
            let Some(mut l2) = self.read(l2_off, cs) else {
                continue;
            };
            let mut changed = false;
            for j in 0..self.m.l2_entries as usize {
                let e = get_u64(&l2, j * step);
                let host = match self.m.classify(e) {
                    Ok(ClusterKind::Normal(h)) | Ok(ClusterKind::ZeroAlloc(h)) => h,
                    _ => continue,
                };
                if !self.in_file(host) {
                    continue;
                }
                let rc = self.m.refcount(host / cs)?;
                if (rc == 1) != (e & OFLAG_COPIED != 0) {
                    self.r.corruptions += 1;
                    self.note(|| {
                        format!("ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}")
                    });
                    if fix {
                        let new = if rc == 1 {
                            e | OFLAG_COPIED
                        } else {
                            e & !OFLAG_COPIED
                        };
                        set_u64(&mut l2, j * step, new);
                        changed = true;
                        self.r.corruptions_fixed += 1;
                    }
                }
            }
            if changed {
                self.m.l2_cache.remove(l2_off);
                self.m.storage.write_at(l2_off, &l2)?;
            }
        }
        Ok(())
    }
}

/// Checks the image behind `m` (whose caches must hold no dirty tables).
pub(super) fn check_meta(m: &mut Meta, repair: Repair) -> Result<CheckReport> {
    let cs = m.cs;
    let nb = m.storage.len().div_ceil(cs);
    if nb > MAX_CHECK_CLUSTERS {
        return Err(Qcow2Error::Unsupported(format!(
            "the image file has {nb} clusters, too many to check"
        ))
        .into());
    }
    m.l2_cache.clear_clean();
    let saved_floor = m.alloc_floor;
    m.alloc_floor = nb;
    let size = m.header.size;
    let (l1_off, l1_size) = (m.header.l1_table_offset, m.l1.len() as u64);
    let mut c = Counter {
        m,
        expected: vec![0u32; nb as usize],
        r: CheckReport {
            total_clusters: size.div_ceil(cs),
            ..CheckReport::default()
        },
        suppressed: 0,
    };
    c.inc(0, cs);
    c.walk_l1(l1_off, l1_size, true);
    c.walk_snapshots();
    c.walk_refcount_structures();
    c.walk_bitmaps();
    // Up to here nothing is repaired: what the walks found stays whatever the mode.
    c.r.unrepairable = c.r.corruptions;
    let result = c.compare(repair).and_then(|_| c.check_copied(repair));
    c.m.alloc_floor = saved_floor;
    c.m.l2_cache.clear_clean();
    result?;
    if repair != Repair::None {
        c.m.flush_all()?;
    }
    if c.suppressed > 0 {
        let n = c.suppressed;
        c.r.messages.push(format!(
            "... and {n} more messages like these (only the first {MAX_CHECK_MESSAGES} are shown)"
        ));
    }
    Ok(c.r)
}

/// Checks the qcow2 image in `file` (a protocol node; opened writable when
/// repairing). Dirty images are checked as they are, not repaired first.
pub fn check(file: NodeRef, repair: Repair) -> Result<CheckReport> {
    let writable = repair != Repair::None;
    let storage = Arc::new(Storage::new(file)?);
    let header = read_header(&storage)?;
    super::layout::check_features(&header)?;
    super::layout::check_layout(&header, storage.len())?;
    let mut m = Meta::load(storage, header, 16, 16, writable, false)?;
    check_meta(&mut m, repair)
}
