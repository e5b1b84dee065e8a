//! The internal snapshot table, read for `img info` and `img snapshot -l`
//! (creating, applying and deleting snapshots: `snapshot_ops.rs`).

use serde_json::{json, Value};

use super::header::Header;
use super::storage::Storage;
use crate::Result;

/// QEMU's limit on the snapshot count.
const MAX_SNAPSHOTS: u32 = 65536;
/// Most bytes of snapshot table read (bounds memory on hostile images).
const MAX_TABLE_BYTES: usize = 64 << 20;

/// One internal snapshot, as `qemu-img info` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// `id_str`.
    pub id: String,
    /// Tag.
    pub name: String,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at the snapshot, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count, when recorded.
    pub icount: Option<u64>,
}

impl SnapshotInfo {
    /// The `SnapshotInfo` object of QEMU's `ImageInfo`.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
            "name": self.name,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec / 1_000_000_000,
            "id": self.id,
            "vm-state-size": self.vm_state_size,
        });
        if let (Some(icount), Some(obj)) = (self.icount, v.as_object_mut()) {
            obj.insert("icount".into(), json!(icount));
        }
        v
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads the snapshot table; a table that does not parse yields an error,
/// never a panic or an unbounded allocation.
pub fn read_snapshots(storage: &Storage, h: &Header) -> Result<Vec<SnapshotInfo>> {
    if h.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    let bad = |msg: &str| super::error::corrupt(format!("snapshot table: {msg}"));
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(bad("too many snapshots"));
    }
    let end = storage.len();
    let mut off = h.snapshots_offset;
    let mut read_total = 0usize;
    let mut out = Vec::with_capacity(h.nb_snapshots as usize);
    for _ in 0..h.nb_snapshots {
        let mut fixed = [0u8; 40];
        if off.checked_add(40).is_none_or(|e| e > end) {
            return Err(bad("entry past the end of the file"));
        }
        storage.read_at(off, &mut fixed)?;
        let id_len = usize::from(u16::from_be_bytes([fixed[12], fixed[13]]));
        let name_len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let extra_len = be32(&fixed, 36) as usize;
        let var = extra_len
            .checked_add(id_len)
            .and_then(|n| n.checked_add(name_len))
            .filter(|&n| n <= 1 << 20)
            .ok_or_else(|| bad("entry too large"))?;
        read_total = read_total.saturating_add(40 + var);
        if read_total > MAX_TABLE_BYTES || off + 40 + var as u64 > end {
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
        let icount = (extra.len() >= 24)
            .then(|| be64(extra, 16))
            .filter(|&i| i != u64::MAX);
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        out.push(SnapshotInfo {
            id: text(&rest[extra_len..extra_len + id_len]),
            name: text(&rest[extra_len + id_len..]),
            vm_state_size,
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            icount,
        });
        off = (off + 40 + var as u64).next_multiple_of(8);
    }
    Ok(out)
}
