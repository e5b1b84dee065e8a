//! Changing a qcow2 image's backing file reference (QEMU's
//! `qcow2_change_backing_file`: the header's name field and the backing
//! format extension, rewritten in one write of the header cluster) and
//! emptying an image (QEMU's `bdrv_make_empty`, used by `qemu-img commit`).

use super::header::{Extension, EXT_BACKING_FORMAT, MAX_BACKING_NAME};
use super::meta::ClusterKind;
use super::node::Qcow2Node;
use super::Qcow2Error;
use crate::{BlockNode, Result};

impl Qcow2Node {
    /// Rewrites the header so that it names `name` (with format `format`) as
    /// its backing file, or none. The open node keeps its current backing
    /// node: the change takes effect the next time the image is opened.
    ///
    /// The new header is built in memory and must fit in the first cluster
    /// ([`Qcow2Error::HeaderFull`] otherwise); it is then written over the
    /// old one in a single write and flushed, after everything cached.
    pub fn do_change_backing(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        self.check_writable()?;
        if let Some(n) = name {
            if n.len() > MAX_BACKING_NAME as usize {
                return Err(Qcow2Error::Invalid(format!(
                    "backing file name is too long ({} bytes, at most {MAX_BACKING_NAME})",
                    n.len()
                ))
                .into());
            }
        }
        let _io = self.io_write_guard()?;
        let mut m = self.lock_meta()?;
        // Data and metadata first: the header must never name a backing file
        // that the image's content does not account for yet.
        m.flush_all()?;
        let mut h = m.header.clone();
        h.backing_file = name.map(str::to_string);
        h.extensions.retain(|e| e.kind != EXT_BACKING_FORMAT);
        if let (Some(_), Some(f)) = (name, format) {
            // First, as QEMU orders its extensions.
            h.extensions.insert(
                0,
                Extension {
                    kind: EXT_BACKING_FORMAT,
                    data: f.as_bytes().to_vec(),
                },
            );
        }
        let mut bytes = match h.serialize() {
            Ok(b) => b,
            Err(Qcow2Error::Invalid(_)) => return Err(Qcow2Error::HeaderFull.into()),
            Err(e) => return Err(e.into()),
        };
        // The whole header cluster is written, zeros after the header, as
        // QEMU does: no stale name or extension stays behind.
        bytes.resize(self.cluster_size() as usize, 0);
        m.storage.write_at(0, &bytes)?;
        m.storage.flush()?;
        m.header = h;
        Ok(())
    }

    /// Makes every cluster of the image unallocated, so that it reads as its
    /// backing file (QEMU's `qcow2_make_empty`): L2 entries are cleared and
    /// the data clusters freed. Internal snapshots keep their clusters.
    pub fn do_make_empty(&self) -> Result<()> {
        self.check_writable()?;
        let _io = self.io_write_guard()?;
        let mut m = self.lock_meta()?;
        let cs = self.cluster_size();
        let clusters = self.size().div_ceil(cs);
        let mut gc = 0;
        while gc < clusters {
            let l1_idx = (gc / m.l2_entries) as usize;
            let l1_empty =
                m.l1.get(l1_idx)
                    .is_none_or(|e| e & super::meta::OFFSET_MASK == 0);
            if l1_empty {
                // A whole L2 table's worth of unallocated clusters.
                gc = (l1_idx as u64 + 1) * m.l2_entries;
                continue;
            }
            let (entry, _) = m.l2_entry(gc)?;
            if entry != 0 {
                let kind = m.classify(entry)?;
                self.prepare(&mut m)?;
                m.set_l2_entry(gc, 0)?;
                if !matches!(kind, ClusterKind::Unallocated | ClusterKind::ZeroPlain) {
                    self.release(&mut m, kind);
                }
            }
            gc += 1;
        }
        m.flush_all()?;
        // As QEMU's emptied image: the freed tail of the file is cut off.
        super::resize::cut_file_tail(&mut m)
    }
}
