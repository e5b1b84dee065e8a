//! Compressed writes (QEMU's `qcow2_co_pwritev_compressed`): whole guest
//! clusters, each compressed on its own and written into a guest cluster
//! that is not allocated yet. Compressed data are packed byte-wise into host
//! clusters ([`Meta::alloc_bytes`](super::meta::Meta::alloc_bytes)); a
//! cluster whose compressed form would not be smaller than a cluster is
//! written uncompressed, as QEMU does.
//!
//! Each cluster goes through the same three steps as a normal allocating
//! write (see `write.rs`): allocate and register under the metadata lock,
//! write the data without it, then point the L2 entry at the data.

use rayon::prelude::*;

use super::compress::compress;
use super::error::{corrupt, Qcow2Error};
use super::meta::{ClusterKind, OFLAG_COMPRESSED};
use super::node::Qcow2Node;
use super::write::Registration;
use crate::write_turn::{WaitOnly, WriteTurn};
use crate::Result;

impl Qcow2Node {
    /// Writes `buf` at `offset` compressed. `offset` is cluster aligned and
    /// `buf` whole clusters, but for a last cluster that ends at the end of
    /// the image (compressed as if padded with zeros). An empty `buf` marks
    /// the end of a series of compressed writes, as in QEMU: the image file
    /// then ends on a sector boundary.
    ///
    /// With a `turn`, the clusters are compressed first, then allocated and
    /// written once the turn has come (waited for before `io_lock` is taken,
    /// as in `do_write_vectored`); the caller passes it.
    pub(super) fn do_write_compressed(
        &self,
        offset: u64,
        buf: &[u8],
        turn: Option<&dyn WriteTurn>,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let len = buf.len() as u64;
        let size = self.size.load(std::sync::atomic::Ordering::Acquire);
        if !offset.is_multiple_of(cs) || (!len.is_multiple_of(cs) && offset + len != size) {
            return Err(Qcow2Error::CompressedUnaligned { offset, len }.into());
        }
        if buf.is_empty() {
            if let Some(t) = turn {
                t.wait()?;
            }
            let _io = self.io_read_guard()?;
            let _m = self.lock_meta()?;
            return self
                .storage
                .extend_to(self.storage.len().next_multiple_of(512));
        }
        // The CPU work first, in parallel and outside every lock.
        let kind = self.compression;
        let compressed: Vec<Option<Vec<u8>>> = buf
            .par_chunks(cs as usize)
            .map(|chunk| {
                if chunk.len() == cs as usize {
                    compress(kind, chunk, cs as usize - 1)
                } else {
                    let mut padded = chunk.to_vec();
                    padded.resize(cs as usize, 0);
                    compress(kind, &padded, cs as usize - 1)
                }
            })
            .collect();
        if let Some(t) = turn {
            t.wait()?;
        }
        let wait_only = turn.map(WaitOnly);
        let _io = self.io_read_guard()?;
        for (i, (chunk, c)) in buf.chunks(cs as usize).zip(&compressed).enumerate() {
            let at = offset + i as u64 * cs;
            match c {
                Some(data) => self.write_one_compressed(at, data)?,
                // Waited for already; passed by the caller after the last.
                None => self.write_under_io_lock(
                    at,
                    &[chunk],
                    wait_only.as_ref().map(|w| w as &dyn WriteTurn),
                )?,
            }
        }
        Ok(())
    }

    /// Writes the compressed data of the guest cluster at `at`; the caller
    /// holds `io_lock` shared.
    fn write_one_compressed(&self, at: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let gc = at / cs;
        let len = data.len() as u64;
        let bits = self.cluster_bits;
        let shift = 62 - (bits - 8);
        let (host, reg) = {
            let mut m = self.lock_meta()?;
            m = self.wait_for_allocations(m, at, cs as usize)?;
            let (entry, _) = m.l2_entry(gc)?;
            // QEMU refuses any cluster with a host offset (it would leak).
            if !matches!(
                m.classify(entry)?,
                ClusterKind::Unallocated | ClusterKind::ZeroPlain
            ) {
                return Err(Qcow2Error::CompressedOverwrite { offset: at }.into());
            }
            self.prepare(&mut m)?;
            // The L2 table first, then the bytes (QEMU's order).
            let l1_idx = (gc / m.l2_entries) as usize;
            m.writable_l2(l1_idx)?;
            let host = m.alloc_bytes(len)?;
            let fits = if host + len > 1u64 << shift {
                Err(corrupt(
                    "a compressed cluster would lie beyond the largest offset its L2 entry can hold",
                ))
            } else {
                m.check_data_write(host, len)
            };
            if let Err(e) = fits {
                m.free_bytes(host, len);
                return Err(e);
            }
            m.inflight.insert(gc, gc + 1);
            (
                host,
                Registration {
                    node: self,
                    firsts: vec![gc],
                },
            )
        };
        let written = self.storage.write_at(host, data);
        let mut m = self.lock_meta()?;
        let result = match written {
            Ok(()) => {
                // The L2 entry waits for a flush of the data and refcounts.
                m.data_written();
                let sectors = (host + len - 1) / 512 - host / 512;
                // Compressed clusters never have the COPIED flag.
                m.set_l2_entry(gc, host | OFLAG_COMPRESSED | (sectors << shift))
            }
            Err(e) => {
                m.free_bytes(host, len);
                Err(e)
            }
        };
        reg.finish(&mut m);
        result
    }
}
