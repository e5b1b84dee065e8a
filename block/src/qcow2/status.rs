//! Allocation status of guest ranges (QEMU's `qcow2_co_block_status` and
//! the generic part of `bdrv_co_block_status` around it), for `img map`.

use super::error::corrupt;
use super::meta::{ClusterKind, Meta, OFFSET_MASK};
use super::node::Qcow2Node;
use crate::info::display_name;
use crate::node::{BlockStatus, HostMapping};
use crate::Result;

/// What a piece of guest range (a cluster, or a subcluster with extended L2
/// entries) maps to; host offsets are those of the piece's first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    /// Not defined here (backing node or zeros); with extended L2 entries the
    /// host cluster may exist all the same.
    Unallocated(Option<u64>),
    /// Reads as zeros, with or without a host cluster.
    Zero(Option<u64>),
    /// Data at this host offset.
    Data(u64),
    /// Compressed data.
    Compressed,
}

impl Piece {
    /// The host offset, when the piece has one.
    fn host(self) -> Option<u64> {
        match self {
            Piece::Unallocated(h) | Piece::Zero(h) => h,
            Piece::Data(h) => Some(h),
            Piece::Compressed => None,
        }
    }

    /// Whether `next`, starting `len` bytes after `self`, continues the same run.
    fn continued_by(self, len: u64, next: Piece) -> bool {
        let same_kind = std::mem::discriminant(&self) == std::mem::discriminant(&next);
        let contiguous = match (self.host(), next.host()) {
            (None, None) => true,
            (Some(a), Some(b)) => a + len == b,
            _ => false,
        };
        same_kind && contiguous
    }
}

impl Qcow2Node {
    /// The status of the run of guest bytes from `offset` (at most `len`).
    pub(super) fn do_block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let (piece, n) = {
            let _io = self.io_read_guard()?;
            let mut m = self.lock_meta()?;
            self.run_at(&mut m, offset, len)?
        };
        let file = self.storage.child();
        let host = piece.host().map(|h| HostMapping {
            file: display_name(file),
            offset: h,
        });
        let status = match piece {
            Piece::Data(h) if self.metadata_preallocated() => self.data_over_file(h, n)?,
            Piece::Data(_) => BlockStatus::data(n),
            Piece::Zero(_) => BlockStatus::zeros(n),
            Piece::Compressed => BlockStatus {
                compressed: true,
                ..BlockStatus::data(n)
            },
            Piece::Unallocated(_) => BlockStatus {
                // Without a backing node (or past its end) the bytes read as zeros.
                zero: self.backing.as_ref().is_none_or(|b| offset >= b.size()),
                ..BlockStatus::unallocated(n)
            },
        };
        Ok(BlockStatus { host, ..status })
    }

    /// The longest run of pieces from guest `offset` (at most `len` bytes)
    /// that share a kind and, when mapped, lie contiguously in the file.
    fn run_at(&self, m: &mut Meta, offset: u64, len: u64) -> Result<(Piece, u64)> {
        let (first, mut n) = self.piece_at(m, offset)?;
        while n < len {
            let (next, more) = self.piece_at(m, offset + n)?;
            if !first.continued_by(n, next) {
                break;
            }
            n += more;
        }
        Ok((first, n.min(len)))
    }

    /// The piece at guest `g` and how many bytes of it there are from `g`.
    fn piece_at(&self, m: &mut Meta, g: u64) -> Result<(Piece, u64)> {
        let cs = self.cluster_size();
        let gc = g / cs;
        let in_c = g % cs;
        let l1_idx = (gc / m.l2_entries) as usize;
        if m.l1.get(l1_idx).is_none_or(|e| e & OFFSET_MASK == 0) {
            // No L2 table: the whole range it would map is unallocated.
            let end = (l1_idx as u64 + 1) * m.l2_entries * cs;
            return Ok((Piece::Unallocated(None), end - g));
        }
        let (entry, bitmap) = m.l2_entry(gc)?;
        let kind = m.classify(entry)?;
        if self.extl2 && !matches!(kind, ClusterKind::Compressed { .. }) {
            return subcluster_piece(kind, bitmap, cs, gc, in_c);
        }
        let piece = match kind {
            ClusterKind::Unallocated => Piece::Unallocated(None),
            ClusterKind::ZeroPlain => Piece::Zero(None),
            ClusterKind::ZeroAlloc(h) => Piece::Zero(Some(h + in_c)),
            ClusterKind::Normal(h) => Piece::Data(h + in_c),
            ClusterKind::Compressed { .. } => Piece::Compressed,
        };
        Ok((piece, cs - in_c))
    }

    /// Data at host `h` (`n` bytes) of an image with preallocated metadata: as
    /// QEMU (`BDRV_BLOCK_RECURSE`), the file says whether it reads as zeros.
    fn data_over_file(&self, h: u64, n: u64) -> Result<BlockStatus> {
        let file = self.storage.child();
        let fsize = file.size();
        if h >= fsize {
            // Past the end of the file: zeros.
            return Ok(BlockStatus {
                zero: true,
                ..BlockStatus::data(n)
            });
        }
        let avail = n.min(fsize - h);
        let f = file.block_status(h, avail)?;
        let at_eof = h + f.len == fsize;
        let len = if at_eof && f.zero { n } else { f.len };
        Ok(BlockStatus {
            zero: f.zero,
            ..BlockStatus::data(len)
        })
    }

    /// QEMU's `qcow2_detect_metadata_preallocation`, once: more clusters are
    /// in use than the file has allocated on the host (by a margin).
    fn metadata_preallocated(&self) -> bool {
        *self.prealloc.get_or_init(|| {
            let file = self.storage.child();
            let Some(real) = file.allocated_size() else {
                return false;
            };
            let cs = self.cluster_size();
            let real_clusters = real / cs;
            let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
            let end = file.size().div_ceil(cs);
            let Ok(mut m) = self.lock_meta() else {
                return false;
            };
            let mut used = 0;
            for c in 0..end {
                if used >= threshold {
                    break;
                }
                match m.refcount(c) {
                    Ok(r) => used += u64::from(r != 0),
                    Err(_) => return false,
                }
            }
            used >= threshold
        })
    }
}

/// The piece of subcluster-granular cluster `gc` (extended L2 entries) at
/// `in_c` bytes into it, and its length from there.
fn subcluster_piece(
    kind: ClusterKind,
    bitmap: u64,
    cs: u64,
    gc: u64,
    in_c: u64,
) -> Result<(Piece, u64)> {
    let sc = cs / 32;
    let i = in_c / sc;
    let host = match kind {
        ClusterKind::Normal(h) => Some(h + in_c),
        _ => None,
    };
    let piece = if bitmap & (1 << i) != 0 {
        match host {
            Some(h) => Piece::Data(h),
            None => {
                return Err(corrupt(format!(
                    "subcluster {i} of guest cluster {gc} is allocated but the cluster has no host offset"
                )))
            }
        }
    } else if bitmap & (1 << (32 + i)) != 0 {
        Piece::Zero(host)
    } else {
        Piece::Unallocated(host)
    };
    Ok((piece, sc - in_c % sc))
}
