//! Checks of every header field that locates or sizes a structure, made
//! before anything is allocated or read from those places.

use super::error::Qcow2Error;
use super::header::{Header, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, INCOMPAT_KNOWN};
use super::meta::{MAX_L1_BYTES, MAX_REFTABLE_BYTES};

/// QEMU's limit on internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Refuses features this driver cannot handle.
pub fn check_features(h: &Header) -> Result<(), Qcow2Error> {
    let unknown = h.incompatible & !INCOMPAT_KNOWN;
    if unknown != 0 {
        return Err(Qcow2Error::Unsupported(format!(
            "Unsupported qcow2 feature(s): {}",
            h.feature_names(0, unknown).join(", ")
        )));
    }
    if h.incompatible & INCOMPAT_DATA_FILE != 0 {
        return Err(Qcow2Error::Unsupported(
            "qcow2 images with an external data file are not supported".into(),
        ));
    }
    if h.crypt_method > super::crypt::CRYPT_LUKS {
        return Err(Qcow2Error::Unsupported(format!(
            "encrypted qcow2 images (crypt_method {}) are not supported; put a luks node over a plain qcow2 node instead",
            h.crypt_method
        )));
    }
    h.compression_type()?;
    if h.incompatible & INCOMPAT_EXTL2 != 0 && h.cluster_bits < 14 {
        return Err(Qcow2Error::corrupt(
            "extended L2 entries need clusters of at least 16 KiB",
        ));
    }
    Ok(())
}

/// Whether the corrupt bit is set.
pub fn is_marked_corrupt(h: &Header) -> bool {
    h.incompatible & INCOMPAT_CORRUPT != 0
}

fn range_in_file(
    what: &str,
    off: u64,
    len: u64,
    cs: u64,
    file_len: u64,
) -> Result<(u64, u64), Qcow2Error> {
    if !off.is_multiple_of(cs) {
        return Err(Qcow2Error::corrupt(format!(
            "{what} offset {off:#x} is not aligned to the cluster size"
        )));
    }
    if off < cs {
        return Err(Qcow2Error::corrupt(format!(
            "{what} offset {off:#x} points into the header"
        )));
    }
    let end = off
        .checked_add(len)
        .filter(|&e| e <= file_len.next_multiple_of(cs))
        .ok_or_else(|| {
            Qcow2Error::corrupt(format!(
                "{what} at offset {off:#x} ({len} bytes) is beyond the end of the file ({file_len} bytes)"
            ))
        })?;
    Ok((off, end))
}

/// Validates sizes and offsets of the L1 table, refcount table and snapshot
/// table against `file_len` and QEMU's limits.
pub fn check_layout(h: &Header, file_len: u64) -> Result<(), Qcow2Error> {
    let cs = h.cluster_size();
    if h.size > i64::MAX as u64 {
        return Err(Qcow2Error::corrupt(format!(
            "virtual size {} is too large",
            h.size
        )));
    }
    let l2_entries = if h.incompatible & INCOMPAT_EXTL2 != 0 {
        cs / 16
    } else {
        cs / 8
    };
    let l1_bytes = u64::from(h.l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(Qcow2Error::corrupt(format!(
            "active L1 table too large: {} entries (at most {})",
            h.l1_size,
            MAX_L1_BYTES / 8
        )));
    }
    let needed = h.size.div_ceil(cs * l2_entries);
    if u64::from(h.l1_size) < needed {
        return Err(Qcow2Error::corrupt(format!(
            "L1 table is too small: {} entries for a virtual size of {} (needs {needed})",
            h.l1_size, h.size
        )));
    }
    let l1 = if h.l1_size > 0 {
        Some(range_in_file(
            "L1 table",
            h.l1_table_offset,
            l1_bytes,
            cs,
            file_len,
        )?)
    } else {
        None
    };
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    if h.refcount_table_clusters == 0 {
        return Err(Qcow2Error::corrupt("the refcount table is empty"));
    }
    if rt_bytes > MAX_REFTABLE_BYTES {
        return Err(Qcow2Error::corrupt(format!(
            "refcount table too large: {} clusters ({rt_bytes} bytes, at most {MAX_REFTABLE_BYTES})",
            h.refcount_table_clusters
        )));
    }
    let rt = range_in_file(
        "refcount table",
        h.refcount_table_offset,
        rt_bytes,
        cs,
        file_len,
    )?;
    if let Some(l1) = l1 {
        if l1.0 < rt.1 && rt.0 < l1.1 {
            return Err(Qcow2Error::corrupt(format!(
                "the refcount table (offset {:#x}) overlaps the L1 table (offset {:#x})",
                rt.0, l1.0
            )));
        }
    }
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(Qcow2Error::corrupt(format!(
            "too many snapshots: {} (at most {MAX_SNAPSHOTS})",
            h.nb_snapshots
        )));
    }
    if h.nb_snapshots > 0 {
        range_in_file("snapshot table", h.snapshots_offset, 40, cs, file_len)?;
    }
    if h.backing_file.is_some() && h.incompatible & INCOMPAT_DATA_FILE != 0 {
        return Err(Qcow2Error::corrupt(
            "a backing file and an external data file together",
        ));
    }
    Ok(())
}
