//! Rebuilding the refcount structures from scratch, as QEMU's
//! `rebuild_refcount_structure` does when `check -r all` finds refcount
//! blocks that are misplaced, overlapping or missing: new refcount blocks and
//! a new refcount table go into clusters the check counted as free, hold the
//! check's counts, and one header write switches to them. The old structures
//! are left behind as leaks, which the recount that follows frees.

use super::cache::set_u64;
use super::error::corrupt;
use super::header::field;
use super::imrt::Imrt;
use super::meta::{Meta, MAX_REFTABLE_BYTES};
use super::overlap::Overlap;
use crate::Result;

/// Writes new refcount structures for the counts in `imrt` (which gains the
/// clusters they take) and switches the image to them.
pub(super) fn rebuild_refcounts(m: &mut Meta, imrt: &mut Imrt) -> Result<()> {
    // Nothing cached may outlive the switch (and nothing is dirty: the check
    // has not repaired anything yet).
    m.write_refblocks()?;
    m.rb_cache.clear_clean();
    let cs = m.cs;
    let mut reftable = Vec::new();
    write_refblocks(m, imrt, 0, imrt.len(), &mut reftable)?;
    // Room for the table itself may need refcount blocks that make it grow:
    // repeat until it stops growing (each cluster of table covers many more).
    let (table_offset, table_clusters) = loop {
        let clusters = (reftable.len() as u64 * 8).div_ceil(cs);
        let mut first_free = 0;
        let start = imrt.alloc(clusters, &mut first_free);
        if !write_refblocks(m, imrt, start, start + clusters, &mut reftable)? {
            break (start * cs, clusters);
        }
    };
    let mut raw = vec![0u8; (table_clusters * cs) as usize];
    for (i, &e) in reftable.iter().enumerate() {
        set_u64(&mut raw, i, e);
    }
    m.storage.write_at(table_offset, &raw)?;
    m.storage.flush()?;
    let mut hdr = [0u8; 12];
    hdr[..8].copy_from_slice(&table_offset.to_be_bytes());
    hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
    m.write_header_field(field::REFCOUNT_TABLE_OFFSET, &hdr)?;
    m.header.refcount_table_offset = table_offset;
    m.header.refcount_table_clusters = table_clusters as u32;
    reftable.resize((table_clusters * cs / 8) as usize, 0);
    m.reftable = reftable;
    m.free_hint = 0;
    if m.writable {
        m.overlap = Overlap::build(&m.storage, &m.header, &m.l1, &m.reftable);
    }
    Ok(())
}

/// Writes the refcount blocks for the clusters `[first, end)` that count
/// references, taking clusters for blocks `reftable` lacks (and growing
/// `reftable`, in whole clusters, to name them). Returns whether it grew.
fn write_refblocks(
    m: &mut Meta,
    imrt: &mut Imrt,
    first: u64,
    mut end: u64,
    reftable: &mut Vec<u64>,
) -> Result<bool> {
    let (cs, entries) = (m.cs, m.rb_entries);
    let mut first_free = 0;
    let mut grown = false;
    let mut c = first;
    while c < end {
        if imrt.get(c) == 0 {
            c += 1;
            continue;
        }
        let index = c / entries;
        let block_start = index * entries;
        let offset = match reftable.get(index as usize) {
            Some(&off) if off != 0 => off,
            _ => {
                // Never inside a block already written.
                first_free = first_free.max(block_start);
                let cluster = imrt.alloc(1, &mut first_free);
                // The block holding this block's own refcount must be written too.
                end = end.max(cluster + 1);
                if reftable.len() as u64 <= index {
                    let len = ((index + 1) * 8).next_multiple_of(cs);
                    if len > MAX_REFTABLE_BYTES {
                        return Err(corrupt(format!(
                            "the rebuilt refcount table would exceed {MAX_REFTABLE_BYTES} bytes"
                        )));
                    }
                    reftable.resize((len / 8) as usize, 0);
                    grown = true;
                }
                reftable[index as usize] = cluster * cs;
                cluster * cs
            }
        };
        let block = imrt.refblock(index, entries, m.header.refcount_order, cs);
        m.storage.write_at(offset, &block)?;
        c = block_start + entries;
    }
    Ok(grown)
}
