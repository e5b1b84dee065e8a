//! The size arithmetic of `qemu-img measure -O qcow2`: QEMU's `qcow2_measure`,
//! `qcow2_calc_prealloc_size` and `qcow2_refcount_metadata_size`.

use crate::{BlockNode, Result};

/// Bytes of one L1 entry.
const L1E_SIZE: u64 = 8;
/// Bytes of one refcount table entry.
const REFTABLE_ENTRY_SIZE: u64 = 8;
/// QEMU's `QCOW_MAX_L1_SIZE` (32 MiB).
const MAX_L1_SIZE: u64 = 0x200_0000;

/// The options of the image to be created that change its size.
#[derive(Clone, Copy, Debug)]
pub struct MeasureOptions {
    /// Bytes per cluster (a power of two, validated by the caller).
    pub cluster_size: u64,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// 16-byte L2 entries (`extended_l2=on`).
    pub extended_l2: bool,
    /// `preallocation=full` or `falloc`: every data cluster counts as required.
    pub full_prealloc: bool,
    /// A backing file is named: every cluster of the source counts as required.
    pub has_backing_file: bool,
    /// Bytes of an embedded LUKS header (before rounding to clusters), if encrypted.
    pub luks_header_len: Option<u64>,
    /// The virtual size when no source image is given.
    pub size: u64,
}

/// What `qemu-img measure` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeasureInfo {
    /// `required size`.
    pub required: u64,
    /// `fully allocated size`.
    pub fully_allocated: u64,
}

/// Why a measure failed.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The L1 table would exceed QEMU's limit.
    #[error("The image size is too large (try using a larger cluster size)")]
    TooLarge,
    /// The source's block status could not be read.
    #[error("Unable to get block status: {0}")]
    Status(#[source] crate::BlockError),
}

/// Bytes of the refcount table and blocks that count `clusters` clusters plus
/// themselves (QEMU's `qcow2_refcount_metadata_size` without a generous increase).
pub fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_order: u32) -> u64 {
    let blocks_per_table_cluster = cluster_size / REFTABLE_ENTRY_SIZE;
    let refcounts_per_block = cluster_size * 8 / (1u64 << refcount_order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(refcounts_per_block);
        table = blocks.div_ceil(blocks_per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            break;
        }
    }
    (blocks + table) * cluster_size
}

/// The file size of a fully preallocated image of `total_size` bytes
/// (QEMU's `qcow2_calc_prealloc_size`).
pub fn calc_prealloc_size(
    total_size: u64,
    cluster_size: u64,
    refcount_order: u32,
    extended_l2: bool,
) -> u64 {
    let aligned = total_size.next_multiple_of(cluster_size);
    let l2e_size = if extended_l2 { 16 } else { 8 };
    // Header: one cluster.
    let mut meta = cluster_size;
    let nl2e = (aligned / cluster_size).next_multiple_of(cluster_size / l2e_size);
    meta += nl2e * l2e_size;
    let nl1e = (nl2e * l2e_size / cluster_size).next_multiple_of(cluster_size / L1E_SIZE);
    meta += nl1e * L1E_SIZE;
    meta += refcount_metadata_size(
        (meta + aligned) / cluster_size,
        cluster_size,
        refcount_order,
    );
    meta + aligned
}

/// Measures a new qcow2 image of `o`, holding the data of `source` when given
/// (its allocated ranges come from [`BlockNode::block_status`] down its backing chain).
pub fn measure(
    o: &MeasureOptions,
    source: Option<&dyn BlockNode>,
) -> std::result::Result<MeasureInfo, MeasureError> {
    let cs = o.cluster_size;
    let luks_payload = o.luks_header_len.map_or(0, |l| l.next_multiple_of(cs));
    let mut virtual_size = o.size.next_multiple_of(cs);
    let l2e_size = if o.extended_l2 { 16 } else { 8 };
    let l2_tables = (virtual_size / cs).div_ceil(cs / l2e_size);
    if l2_tables * L1E_SIZE > MAX_L1_SIZE {
        return Err(MeasureError::TooLarge);
    }
    let mut required = 0u64;
    if let Some(src) = source {
        let ssize = src.size();
        virtual_size = ssize.next_multiple_of(cs);
        if o.has_backing_file {
            required = virtual_size;
        } else {
            required = allocated_bytes(src, cs).map_err(MeasureError::Status)?;
        }
    }
    if o.full_prealloc {
        required = virtual_size;
    }
    let fully_allocated =
        luks_payload + calc_prealloc_size(virtual_size, cs, o.refcount_order, o.extended_l2);
    Ok(MeasureInfo {
        required: fully_allocated - virtual_size + required,
        fully_allocated,
    })
}

/// The loop of `qcow2_measure` over `bdrv_block_status_above`: data runs,
/// extended to cluster ends, summed (zero and unallocated runs skipped).
fn allocated_bytes(src: &dyn BlockNode, cs: u64) -> Result<u64> {
    let ssize = src.size();
    let mut required = 0u64;
    let mut offset = 0u64;
    while offset < ssize {
        let (mut pnum, data) = chain_status(src, offset, ssize - offset)?;
        if data {
            pnum = (offset + pnum).next_multiple_of(cs) - offset;
            required += offset % cs + pnum;
        }
        offset += pnum;
    }
    Ok(required)
}

/// Length and "data, not zero" of the run at `offset` through the backing chain.
fn chain_status(top: &dyn BlockNode, offset: u64, len: u64) -> Result<(u64, bool)> {
    let st = top.block_status(offset, len)?;
    let run = st.len.clamp(1, len);
    if st.zero {
        return Ok((run, false));
    }
    if st.data && st.allocated {
        return Ok((run, true));
    }
    let backing = top
        .children()
        .into_iter()
        .find(|(role, _)| *role == "backing")
        .map(|(_, n)| n);
    match backing {
        Some(b) if offset < b.size() => chain_status(&*b, offset, run.min(b.size() - offset)),
        _ => Ok((run, false)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sized(size: u64) -> MeasureOptions {
        MeasureOptions {
            cluster_size: 65536,
            refcount_order: 4,
            extended_l2: false,
            full_prealloc: false,
            has_backing_file: false,
            luks_header_len: None,
            size,
        }
    }

    #[test]
    fn as_qemu_img_measure() {
        // Values printed by qemu-img 10.0.2.
        let m = measure(&sized(1 << 30), None).unwrap();
        assert_eq!((m.required, m.fully_allocated), (393216, 1074135040));
        let o = MeasureOptions {
            cluster_size: 2 << 20,
            refcount_order: 6,
            ..sized(100 << 30)
        };
        let m = measure(&o, None).unwrap();
        assert_eq!((m.required, m.fully_allocated), (10485760, 107384668160));
        let o = MeasureOptions {
            cluster_size: 512,
            ..sized(1 << 50)
        };
        assert!(matches!(measure(&o, None), Err(MeasureError::TooLarge)));
    }
}
