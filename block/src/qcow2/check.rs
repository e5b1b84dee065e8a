//! Consistency check and repair, as QEMU's `qcow2_check_refcounts` does it:
//! count the references each host cluster should have from every metadata
//! structure (an in-memory refcount table), compare with the stored refcounts
//! (leaks: stored too high; corruptions: too low or broken entries), check the
//! COPIED flags, and optionally fix. Refcount blocks that are misplaced,
//! overlapping or missing are fixed by rebuilding the refcount structures
//! (`rebuild`); the counts reported are those left after the repairs, and a
//! repair that leaves the image clean also clears its dirty and corrupt bits.

use super::cache::{get_u64, set_u64};
use super::header::{AUTOCLEAR_BITMAPS, EXT_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::imrt::Imrt;
use super::meta::{Meta, MAX_L1_BYTES, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use super::node::read_header;
use super::rebuild::rebuild_refcounts;
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

impl Repair {
    fn leaks(self) -> bool {
        self != Repair::None
    }

    fn errors(self) -> bool {
        self == Repair::All
    }
}

/// Counts and messages of a check, as QEMU's `BdrvCheckResult`: corruptions
/// and leaks are those left after the repairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Errors left (refcount too low, broken entries, wrong COPIED flags).
    pub corruptions: u64,
    /// Clusters left whose refcount is higher than their references.
    pub leaks: u64,
    /// Errors while checking (I/O, unreadable refcounts, a repair that failed).
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Corruptions in the tables themselves (broken L1/L2/snapshot entries),
    /// which no repair mode fixes, as opposed to refcounts, refcount blocks and
    /// COPIED flags: found by any check, so a dry run ([`Repair::None`]) tells
    /// whether `-r all` could make the image whole.
    pub unrepairable: u64,
    /// The check stopped early with an I/O error (QEMU's `-EIO`: `qemu-img
    /// check` then prints "Check failed: Input/output error", no summary).
    pub failed: bool,
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
    /// One line per problem and repair, in QEMU's wording, in QEMU's order.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// No corruptions, leaks or check errors remain (after repairs).
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 && !self.failed
    }
}

/// Most host clusters a check will count (bounds its memory: 1 GiB).
const MAX_CHECK_CLUSTERS: u64 = 1 << 28;
/// Most bytes of the snapshot table or bitmap directory read.
const MAX_DIRECTORY_BYTES: u64 = 64 << 20;
/// Offset bits of a refcount table entry.
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Offset bits of an L1 entry and of a standard L2 entry.
const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry.
const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry.
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Subclusters allocated (low half of an extended L2 bitmap).
const L2_BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
/// Subclusters reading as zeros (high half).
const L2_BITMAP_ALL_ZEROES: u64 = 0xffff_ffff << 32;

/// Most messages a check keeps; the rest are counted in a last line (a hostile
/// image can have billions of leaked clusters).
pub const MAX_CHECK_MESSAGES: usize = 10_000;

/// The `-EIO` a check stops with (its messages say why).
struct Stop;

type Step<T = ()> = std::result::Result<T, Stop>;

/// A cluster's type from its L2 entry, as QEMU's `qcow2_get_cluster_type`.
enum Entry {
    Unallocated,
    ZeroPlain,
    ZeroAlloc(u64),
    Normal(u64),
    Compressed { offset: u64, size: u64 },
}

struct Counter<'a> {
    m: &'a mut Meta,
    repair: Repair,
    imrt: Imrt,
    r: CheckReport,
    /// The refcount structures need rebuilding.
    rebuild: bool,
    messages: Vec<String>,
    /// Messages not kept (past [`MAX_CHECK_MESSAGES`]).
    suppressed: u64,
}

impl Counter<'_> {
    /// Keeps a message, or counts it once [`MAX_CHECK_MESSAGES`] are kept
    /// (then it is not even formatted).
    fn note(&mut self, message: impl FnOnce() -> String) {
        if self.messages.len() < MAX_CHECK_MESSAGES {
            self.messages.push(message());
        } else {
            self.suppressed += 1;
        }
    }

    /// A corruption in the tables themselves (see [`CheckReport::unrepairable`]).
    fn broken(&mut self, message: impl FnOnce() -> String) {
        self.r.corruptions += 1;
        self.r.unrepairable += 1;
        self.note(message);
    }

    /// A read error: noted, and the check stops (QEMU returns `-EIO`).
    fn read(&mut self, off: u64, len: u64, what: &'static str) -> Step<Vec<u8>> {
        let mut b = vec![0u8; len as usize];
        match self.m.storage.read_at(off, &mut b) {
            Ok(()) => Ok(b),
            Err(_) => {
                self.r.check_errors += 1;
                self.note(|| what.to_string());
                Err(Stop)
            }
        }
    }

    /// Counts one reference to each cluster of `len` bytes at `off`
    /// (`qcow2_inc_refcounts_imrt`).
    fn inc(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let cs = self.m.cs;
        let end = off.saturating_add(len);
        // The last cluster may be partly past the end of the file, not more.
        if end.saturating_sub(self.m.storage.len()) >= cs {
            self.broken(|| format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {off:#x} size {len:#x}"
            ));
            return;
        }
        for c in off / cs..=(end - 1) / cs {
            if !self.imrt.inc(c) {
                self.r.corruptions += 1;
                self.note(|| format!("ERROR: overflow cluster offset={:#x}", c * cs));
                self.note(|| "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing".into());
            }
        }
    }

    fn entry_type(&self, e: u64) -> Entry {
        if e & OFLAG_COMPRESSED != 0 {
            let bits = self.m.header.cluster_bits;
            let shift = 62 - (bits - 8);
            let offset = e & ((1u64 << shift) - 1);
            let sectors = ((e >> shift) & ((1u64 << (bits - 8)) - 1)) + 1;
            return Entry::Compressed {
                offset,
                size: sectors * 512 - (offset & 511),
            };
        }
        let host = e & ENTRY_OFFSET_MASK;
        if e & OFLAG_ZERO != 0 && !self.m.extl2() {
            return if host == 0 {
                Entry::ZeroPlain
            } else {
                Entry::ZeroAlloc(host)
            };
        }
        if host == 0 {
            Entry::Unallocated
        } else {
            Entry::Normal(host)
        }
    }

    /// Counts an L1 table and everything under it (`check_refcounts_l1`).
    fn walk_l1(&mut self, l1_off: u64, l1_size: u64, active: bool) -> Step {
        if l1_size == 0 {
            return Ok(());
        }
        self.inc(l1_off, l1_size * 8);
        let l1 = self.read(
            l1_off,
            l1_size * 8,
            "ERROR: I/O error in check_refcounts_l1",
        )?;
        for i in 0..l1_size as usize {
            let e = get_u64(&l1, i);
            if e == 0 {
                continue;
            }
            if e & L1E_RESERVED_MASK != 0 {
                self.broken(|| format!("ERROR found L1 entry with reserved bits set: {e:x}"));
            }
            let l2_off = e & ENTRY_OFFSET_MASK;
            self.inc(l2_off, self.m.cs);
            if !l2_off.is_multiple_of(self.m.cs) {
                self.broken(|| {
                    format!(
                        "ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted"
                    )
                });
            }
            self.walk_l2(l2_off, active)?;
        }
        Ok(())
    }

    /// Counts the clusters of the L2 table at `l2_off` (`check_refcounts_l2`).
    /// Fragmentation is counted within each table: the first allocated cluster
    /// of a table is never fragmented, each later one is when it does not follow
    /// the previous one; compressed clusters always are.
    fn walk_l2(&mut self, l2_off: u64, active: bool) -> Step {
        let cs = self.m.cs;
        let step = (self.m.l2_entry_bytes / 8) as usize;
        let mut l2 = self.read(l2_off, cs, "ERROR: I/O error in check_refcounts_l2")?;
        let mut next_contiguous = 0u64;
        for i in 0..self.m.l2_entries as usize {
            let e = get_u64(&l2, i * step);
            let bitmap = if step == 2 {
                get_u64(&l2, i * step + 1)
            } else {
                0
            };
            let kind = self.entry_type(e);
            if !matches!(kind, Entry::Compressed { .. }) && e & L2E_STD_RESERVED_MASK != 0 {
                self.broken(|| format!("ERROR found l2 entry with reserved bits set: {e:x}"));
            }
            match kind {
                Entry::Compressed { offset, size } => {
                    if e & OFLAG_COPIED != 0 {
                        self.broken(|| format!(
                            "ERROR: coffset={offset:#x}: copied flag must never be set for compressed clusters"
                        ));
                    }
                    if bitmap != 0 {
                        self.broken(|| format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={e:#x}"
                        ));
                        continue;
                    }
                    self.inc(offset, size);
                    if active {
                        self.r.allocated_clusters += 1;
                        self.r.compressed_clusters += 1;
                        self.r.fragmented_clusters += 1;
                    }
                }
                Entry::ZeroAlloc(h) | Entry::Normal(h) => {
                    if (bitmap >> 32) & bitmap != 0 {
                        self.broken(|| format!(
                            "ERROR offset={h:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        ));
                    }
                    if !h.is_multiple_of(cs) {
                        let has_data = if step == 2 {
                            bitmap & L2_BITMAP_ALL_ALLOC != 0
                        } else {
                            e & OFLAG_ZERO == 0
                        };
                        if has_data {
                            self.broken(|| format!(
                                "ERROR offset={h:x}: Data cluster is not properly aligned; L2 entry corrupted."
                            ));
                        } else {
                            self.r.corruptions += 1;
                            let fixing = self.repair.errors();
                            self.note(|| format!(
                                "{} offset={h:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
                                if fixing { "Repairing" } else { "ERROR" }
                            ));
                            if fixing && self.zero_l2_entry(l2_off, &mut l2, i, bitmap) {
                                // Unused now: not counted.
                                continue;
                            }
                        }
                    }
                    if active {
                        self.r.allocated_clusters += 1;
                        if next_contiguous != 0 && h != next_contiguous {
                            self.r.fragmented_clusters += 1;
                        }
                        next_contiguous = h + cs;
                    }
                    self.inc(h, cs);
                }
                Entry::ZeroPlain => {}
                Entry::Unallocated => {
                    if bitmap & L2_BITMAP_ALL_ALLOC != 0 {
                        self.broken(|| {
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .into()
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Makes entry `i` of the L2 table at `l2_off` read as zeros, without a host
    /// cluster (`fix_l2_entry_by_zero`); false if the write failed.
    fn zero_l2_entry(&mut self, l2_off: u64, l2: &mut [u8], i: usize, bitmap: u64) -> bool {
        let step = (self.m.l2_entry_bytes / 8) as usize;
        if step == 2 {
            set_u64(l2, i * step, 0);
            set_u64(
                l2,
                i * step + 1,
                (bitmap | bitmap << 32) & L2_BITMAP_ALL_ZEROES,
            );
        } else {
            set_u64(l2, i * step, OFLAG_ZERO);
        }
        let at = i * step * 8;
        let bytes = &l2[at..at + step * 8];
        self.m.l2_cache.remove(l2_off);
        let written = self
            .m
            .prepare_meta_change()
            .and_then(|_| self.m.storage.write_at(l2_off + at as u64, bytes))
            .and_then(|_| self.m.storage.flush());
        match written {
            Ok(()) => {
                self.r.corruptions -= 1;
                self.r.corruptions_fixed += 1;
                true
            }
            Err(e) => {
                self.r.check_errors += 1;
                self.note(|| format!("ERROR: Failed to overwrite L2 table entry: {e}"));
                false
            }
        }
    }

    /// The snapshots' L1 tables and the snapshot table itself.
    fn walk_snapshots(&mut self) -> Step {
        let (n, off) = (self.m.header.nb_snapshots, self.m.header.snapshots_offset);
        let mut at = off;
        for _ in 0..n {
            if at - off > MAX_DIRECTORY_BYTES || at + 40 > self.m.storage.len() {
                self.broken(|| "ERROR: snapshot table is truncated or too large".into());
                return Ok(());
            }
            let e = self.read(at, 40, "ERROR failed to read the snapshot table")?;
            let l1_off = get_u64(&e, 0);
            let l1_size = u32::from_be_bytes([e[8], e[9], e[10], e[11]]);
            let id_len = u64::from(u16::from_be_bytes([e[12], e[13]]));
            let name_len = u64::from(u16::from_be_bytes([e[14], e[15]]));
            let extra = u64::from(u32::from_be_bytes([e[36], e[37], e[38], e[39]]));
            let names = self.read(
                at + 40 + extra,
                id_len + name_len,
                "ERROR failed to read the snapshot table",
            )?;
            let id = String::from_utf8_lossy(&names[..id_len as usize]).into_owned();
            let name = String::from_utf8_lossy(&names[id_len as usize..]).into_owned();
            at += (40 + extra + id_len + name_len).next_multiple_of(8);
            if !l1_off.is_multiple_of(self.m.cs) {
                self.broken(|| format!(
                    "ERROR snapshot {id} ({name}) l1_offset={l1_off:#x}: L1 table is not cluster aligned; snapshot table entry corrupted"
                ));
                continue;
            }
            if u64::from(l1_size) * 8 > MAX_L1_BYTES {
                self.broken(|| format!(
                    "ERROR snapshot {id} ({name}) l1_size={l1_size:#x}: L1 table is too large; snapshot table entry corrupted"
                ));
                continue;
            }
            self.walk_l1(l1_off, u64::from(l1_size), false)?;
        }
        self.inc(off, at - off);
        Ok(())
    }

    fn walk_bitmaps(&mut self) -> Step {
        if self.m.header.autoclear & AUTOCLEAR_BITMAPS == 0 {
            return Ok(());
        }
        let Some(ext) = self.m.header.extension(EXT_BITMAPS).map(<[u8]>::to_vec) else {
            return Ok(());
        };
        if ext.len() < 24 {
            return Ok(());
        }
        let dir_size = get_u64(&ext, 1);
        let dir_off = get_u64(&ext, 2);
        if dir_size > MAX_DIRECTORY_BYTES || dir_size == 0 {
            self.broken(|| "ERROR: bitmap directory is invalid".into());
            return Ok(());
        }
        self.inc(dir_off, dir_size);
        let dir = self.read(
            dir_off,
            dir_size,
            "ERROR: could not read the bitmap directory",
        )?;
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
                && t_off.saturating_add(t_size * 8) <= self.m.storage.len()
            {
                let t = self.read(t_off, t_size * 8, "ERROR: could not read a bitmap table")?;
                for i in 0..t_size as usize {
                    let o = get_u64(&t, i) & ENTRY_OFFSET_MASK;
                    if o != 0 {
                        self.inc(o, self.m.cs);
                    }
                }
            }
            at += (24 + extra + name).next_multiple_of(8) as usize;
        }
        Ok(())
    }

    /// Checks the refcount table's entries and counts the blocks they name
    /// (`check_refblocks`); misplaced blocks call for a rebuild.
    fn check_refblocks(&mut self) {
        let cs = self.m.cs;
        for i in 0..self.m.reftable.len() {
            let e = self.m.reftable[i];
            let off = e & REFT_OFFSET_MASK;
            if e & !REFT_OFFSET_MASK != 0 {
                self.refblock_broken(|| {
                    format!("ERROR refcount table entry {i} has reserved bits set")
                });
                continue;
            }
            if !off.is_multiple_of(cs) {
                self.refblock_broken(|| format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                continue;
            }
            let cluster = off / cs;
            if cluster >= self.imrt.len() {
                self.refblock_outside(i, off);
                continue;
            }
            if off != 0 {
                self.inc(off, cs);
                let n = self.imrt.get(cluster);
                if n != 1 {
                    self.refblock_broken(|| format!("ERROR refcount block {i} refcount={n}"));
                }
            }
        }
    }

    fn refblock_broken(&mut self, message: impl FnOnce() -> String) {
        self.r.corruptions += 1;
        self.rebuild = true;
        self.note(message);
    }

    /// A refcount block past the end of the file: `-r all` extends the file to
    /// hold it (it then reads as zeros), as QEMU does.
    fn refblock_outside(&mut self, i: usize, off: u64) {
        let fixing = self.repair.errors();
        self.r.corruptions += 1;
        self.note(|| {
            format!(
                "{} refcount block {i} is outside image",
                if fixing { "Repairing" } else { "ERROR" }
            )
        });
        if !fixing {
            return;
        }
        let cs = self.m.cs;
        let new_len = off + cs;
        if new_len / cs > MAX_CHECK_CLUSTERS {
            self.rebuild = true;
            self.note(|| "ERROR could not resize image: File too large".into());
            return;
        }
        if let Err(e) = self.m.storage.extend_to(new_len) {
            self.rebuild = true;
            self.note(|| format!("ERROR could not resize image: {e}"));
            return;
        }
        self.imrt.grow(new_len / cs);
        self.r.corruptions -= 1;
        self.r.corruptions_fixed += 1;
        self.inc(off, cs);
    }

    /// Counts every reference in the image (`calculate_refcounts`).
    fn calculate(&mut self) -> Step {
        let cs = self.m.cs;
        self.inc(0, cs);
        let (l1_off, l1_size) = (self.m.header.l1_table_offset, self.m.l1.len() as u64);
        self.walk_l1(l1_off, l1_size, true)?;
        self.walk_snapshots()?;
        let rt = self.m.header.refcount_table_offset;
        self.inc(rt, self.m.reftable.len() as u64 * 8);
        self.walk_bitmaps()?;
        if self.m.header.crypt_method != 0 {
            if let Some((off, len)) = super::crypt::crypto_header_range(&self.m.header) {
                self.inc(off, len);
            }
        }
        self.check_refblocks();
        Ok(())
    }

    /// Compares the counted references with the stored refcounts, fixing what
    /// `fix` allows (`compare_refcounts`); returns the highest cluster in use.
    fn compare(&mut self, fix: Repair) -> u64 {
        let mut highest = 0;
        for i in 0..self.imrt.len() {
            let stored = match self.m.refcount(i) {
                Ok(v) => v,
                Err(_) => {
                    self.r.check_errors += 1;
                    self.note(|| format!("Can't get refcount for cluster {i}: Input/output error"));
                    continue;
                }
            };
            let counted = self.imrt.get(i);
            if stored > 0 || counted > 0 {
                highest = i;
            }
            if stored == counted {
                continue;
            }
            // A referenced cluster with no refcount may need a refcount block
            // that does not exist: only a rebuild fixes it.
            let fixable = if stored == 0 {
                self.rebuild = true;
                false
            } else if stored > counted {
                fix.leaks()
            } else {
                fix.errors()
            };
            let word = if fixable {
                "Repairing"
            } else if stored < counted {
                "ERROR"
            } else {
                "Leaked"
            };
            self.note(|| format!("{word} cluster {i} refcount={stored} reference={counted}"));
            if fixable && self.set_refcount(i, counted).is_ok() {
                if stored > counted {
                    self.r.leaks_fixed += 1;
                } else {
                    self.r.corruptions_fixed += 1;
                }
                continue;
            }
            if stored < counted {
                self.r.corruptions += 1;
            } else {
                self.r.leaks += 1;
            }
        }
        highest
    }

    /// Repairs the refcount of cluster `c`; a cluster it frees is discarded,
    /// as QEMU's repairs do (`QCOW2_DISCARD_ALWAYS`).
    fn set_refcount(&mut self, c: u64, v: u64) -> Result<()> {
        self.m.set_refcount(c, v)?;
        if v == 0 {
            self.m.storage.discard(c * self.m.cs, self.m.cs)?;
        }
        Ok(())
    }

    /// Counts with the current tables, compares, and repairs as asked
    /// (`qcow2_check_refcounts`, before the COPIED flags); returns the highest
    /// cluster in use.
    fn refcounts(&mut self) -> Step<u64> {
        self.calculate()?;
        let before_compare = self.r.clone();
        let mut highest = self.compare(Repair::None);
        if self.rebuild && self.repair.errors() {
            let old = self.r.clone();
            self.note(|| "Rebuilding refcount structure".into());
            if let Err(e) = rebuild_refcounts(self.m, &mut self.imrt) {
                self.r.check_errors += 1;
                self.note(|| format!("ERROR writing the rebuilt refcount structure: {e}"));
                return Err(Stop);
            }
            self.r.corruptions = 0;
            self.r.leaks = 0;
            // The structures changed: count again.
            self.rebuild = false;
            self.imrt.clear();
            self.repair = Repair::None;
            let recount = self.calculate();
            self.repair = Repair::All;
            recount?;
            // The old structures are leaks now: free them. Only leaks this
            // cannot fix count (the rebuild made them).
            let saved = std::mem::take(&mut self.r);
            highest = self.compare(Repair::Leaks);
            if self.rebuild {
                self.note(|| "ERROR rebuilt refcount structure is still broken".into());
            }
            let fresh_leaks = self.r.leaks;
            self.r = saved;
            self.r.corruptions_fixed += old.corruptions.saturating_sub(self.r.corruptions);
            self.r.leaks_fixed += old.leaks.saturating_sub(self.r.leaks);
            self.r.leaks += fresh_leaks;
        } else if self.repair.leaks() {
            if self.rebuild {
                self.note(|| "ERROR need to rebuild refcount structures".into());
                self.r.check_errors += 1;
                return Err(Stop);
            }
            if self.r.leaks > 0 || self.r.corruptions > 0 {
                self.r = before_compare;
                highest = self.compare(self.repair);
            }
        }
        Ok(highest)
    }

    /// Checks (and repairs) the COPIED flags of the active tables against the
    /// stored refcounts (`check_oflag_copied`). `-r leaks` repairs them only
    /// when nothing else is left to repair.
    fn check_copied(&mut self) -> Step {
        let cs = self.m.cs;
        let fix = match self.repair {
            Repair::All => true,
            Repair::Leaks => {
                self.r.check_errors == 0 && self.r.corruptions == 0 && self.r.leaks == 0
            }
            Repair::None => false,
        };
        let word = if fix { "Repairing" } else { "ERROR" };
        let step = (self.m.l2_entry_bytes / 8) as usize;
        for i in 0..self.m.l1.len() {
            let l1e = self.m.l1[i];
            let l2_off = l1e & ENTRY_OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            if let Ok(rc) = self.m.refcount(l2_off / cs) {
                if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
                    self.r.corruptions += 1;
                    self.note(|| format!(
                        "{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"
                    ));
                    if fix {
                        self.fix_l1_copied(i, rc == 1)?;
                    }
                }
            }
            let mut l2 = vec![0u8; cs as usize];
            match self.m.storage.read_at(l2_off, &mut l2) {
                Ok(()) => {}
                Err(e) => {
                    self.r.check_errors += 1;
                    self.note(|| format!("ERROR: Could not read L2 table: {e}"));
                    return Err(Stop);
                }
            };
            let mut dirty = 0;
            for j in 0..self.m.l2_entries as usize {
                let e = get_u64(&l2, j * step);
                let (Entry::Normal(host) | Entry::ZeroAlloc(host)) = self.entry_type(e) else {
                    continue;
                };
                let Ok(rc) = self.m.refcount(host / cs) else {
                    continue;
                };
                if (rc == 1) != (e & OFLAG_COPIED != 0) {
                    self.r.corruptions += 1;
                    self.note(|| {
                        format!("{word} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}")
                    });
                    if fix {
                        let new = if rc == 1 {
                            e | OFLAG_COPIED
                        } else {
                            e & !OFLAG_COPIED
                        };
                        set_u64(&mut l2, j * step, new);
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                self.m.l2_cache.remove(l2_off);
                let written = self
                    .m
                    .prepare_meta_change()
                    .and_then(|_| self.m.storage.write_at(l2_off, &l2));
                if let Err(e) = written {
                    self.r.check_errors += 1;
                    self.note(|| format!("ERROR: Could not write L2 table: {e}"));
                    return Err(Stop);
                }
                self.r.corruptions -= dirty;
                self.r.corruptions_fixed += dirty;
            }
        }
        Ok(())
    }

    fn fix_l1_copied(&mut self, i: usize, copied: bool) -> Step {
        let old = self.m.l1[i];
        let new = if copied {
            old | OFLAG_COPIED
        } else {
            old & !OFLAG_COPIED
        };
        let at = self.m.header.l1_table_offset + i as u64 * 8;
        let written = self
            .m
            .prepare_meta_change()
            .and_then(|_| self.m.storage.write_at(at, &new.to_be_bytes()));
        if written.is_err() {
            self.r.check_errors += 1;
            return Err(Stop);
        }
        self.m.l1[i] = new;
        self.r.corruptions -= 1;
        self.r.corruptions_fixed += 1;
        Ok(())
    }

    /// A repair that left the image whole clears its dirty and corrupt bits
    /// (`qcow2_mark_clean`, `qcow2_mark_consistent`).
    fn mark_whole(&mut self) -> Result<()> {
        let bits = self.m.header.incompatible;
        let whole = bits & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
        if whole != bits {
            self.m.flush_all()?;
            self.m.set_incompatible(whole)?;
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
    let size = m.header.size;
    let max_refcount = m.max_refcount();
    let mut c = Counter {
        m,
        repair,
        imrt: Imrt::new(nb, max_refcount),
        r: CheckReport {
            total_clusters: size.div_ceil(cs),
            ..CheckReport::default()
        },
        rebuild: false,
        messages: Vec::new(),
        suppressed: 0,
    };
    let outcome = c.refcounts().and_then(|highest| {
        c.check_copied()?;
        Ok(highest)
    });
    c.m.l2_cache.clear_clean();
    match outcome {
        Ok(highest) => c.r.image_end_offset = (highest + 1) * cs,
        Err(Stop) => c.r.failed = true,
    }
    if repair != Repair::None {
        c.m.flush_all()?;
        if !c.r.failed && c.r.check_errors == 0 && c.r.corruptions == 0 {
            c.mark_whole()?;
        }
    }
    if c.suppressed > 0 {
        let n = c.suppressed;
        c.messages.push(format!(
            "... and {n} more messages like these (only the first {MAX_CHECK_MESSAGES} are shown)"
        ));
    }
    c.r.messages = c.messages;
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
