//! Guest writes, with allocations that run in parallel (as QEMU's
//! `qcow2_alloc_host_offset` / `qcow2_alloc_cluster_link_l2` do).
//!
//! A write request runs in three steps:
//! 1. Under the metadata lock: wait until no allocation is in flight in the
//!    guest clusters it touches, map them, check the overlap rules (a refused
//!    request changes nothing), allocate host clusters where a cluster is not
//!    allocated with refcount one (refcount 1, no L2 entry points there yet)
//!    and register those guest clusters as in flight.
//! 2. Without it: write the data. In place where a cluster is allocated
//!    with refcount one; into the new clusters with the copy-on-write head
//!    and tail (from the old cluster, a compressed cluster or the backing
//!    file) as one vectored write of `[head, caller's buffers, tail]`. Only
//!    the partial first and last guest clusters of a request need a bounce
//!    (and unaligned pieces are gathered into aligned chunks of 1 MiB).
//! 3. Under the lock again: mark data written (so that no L2 table is
//!    written before a flush makes the data and refcounts durable), point
//!    the L2 entries at the new clusters (COPIED), queue the release of the
//!    old ones, end the registration and wake the requests that wait for it.
//!    After an I/O error the new clusters are freed instead: no L2 entry
//!    ever pointed at them.
//!
//! Lock order (never the other way round, never one taken twice):
//! `io_lock` (shared for the whole request; exclusive for discard,
//! write-zeroes, flush, check and close) -> metadata mutex -> the nodes
//! below (image file, backing). The `alloc_done` condvar is waited on with
//! the metadata mutex by a request that holds `io_lock` shared but no
//! registration; a registration's owner needs nothing but the mutex to end
//! it, so every wait ends, even when a writer-preferring exclusive
//! `io_lock` request is queued (nobody here takes `io_lock` again while
//! holding it). An exclusive `io_lock` holder sees no allocation in flight.
//! Step 2 calls the image file and the backing node holding a
//! registration: those must not run other requests on the calling thread.

use std::sync::MutexGuard;

use super::meta::{ClusterKind, Meta, OFLAG_COPIED};
use super::node::Qcow2Node;
use crate::aligned::{AlignedBuf, ALIGN};
use crate::sg::SgSlices;
use crate::{BlockError, Result, WriteTurn};

/// Largest bounce used to gather an unaligned run of new clusters.
const GATHER_CHUNK: usize = 1 << 20;

/// One part of a write request, in request order.
#[derive(Debug)]
enum Piece {
    /// `len` bytes of the request written in place at host offset `host`.
    InPlace { host: u64, len: usize },
    /// New clusters.
    Alloc(Run),
}

/// A run of new host clusters for consecutive guest clusters.
#[derive(Debug)]
struct Run {
    /// First guest cluster.
    gc: u64,
    /// Host offset of the first new cluster.
    host: u64,
    /// What each guest cluster mapped to before.
    olds: Vec<ClusterKind>,
    /// Guest offset and length of the request's bytes in the run.
    guest: u64,
    len: usize,
}

impl Run {
    fn clusters(&self) -> u64 {
        self.olds.len() as u64
    }
}

/// The guest clusters a request registered as in flight. Ended by
/// [`Registration::finish`] under the metadata lock, or (panic, lock
/// poisoned) when dropped; the clusters then stay allocated (leaked).
pub(super) struct Registration<'a> {
    pub(super) node: &'a Qcow2Node,
    pub(super) firsts: Vec<u64>,
}

impl Registration<'_> {
    pub(super) fn finish(mut self, m: &mut Meta) {
        for first in self.firsts.drain(..) {
            m.inflight.remove(first);
        }
        self.node.alloc_done.notify_all();
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        if self.firsts.is_empty() {
            return;
        }
        let mut m = self
            .node
            .meta
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for first in self.firsts.drain(..) {
            m.inflight.remove(first);
        }
        self.node.alloc_done.notify_all();
    }
}

impl Qcow2Node {
    /// Writes a scatter-gather list at `offset`: one mapping pass, one
    /// vectored write per host extent.
    ///
    /// With a `turn` ([`crate::write_turn`]) the turn is waited for before
    /// `io_lock` is taken (a request that waits must not hold it: the one whose
    /// turn it is may need it exclusively between its writes) and passed once
    /// step 1 has allocated, or after step 3 when the request frees clusters
    /// (later allocations may reuse them, as after an in-order write).
    pub(super) fn do_write_vectored(
        &self,
        offset: u64,
        bufs: &[&[u8]],
        turn: Option<&dyn WriteTurn>,
    ) -> Result<()> {
        if let Some(turn) = turn {
            turn.wait()?;
        }
        let _io = self.io_read_guard()?;
        self.write_under_io_lock(offset, bufs, turn)
    }

    /// The write itself; the caller holds `io_lock` (shared or exclusive)
    /// and has waited for `turn`, which this passes.
    pub(super) fn write_under_io_lock(
        &self,
        offset: u64,
        bufs: &[&[u8]],
        turn: Option<&dyn WriteTurn>,
    ) -> Result<()> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        let pass = || turn.inspect(|t| t.pass());
        if len == 0 {
            pass();
            return Ok(());
        }
        let planned = {
            let mut m = self.lock_meta()?;
            m = self.wait_for_allocations(m, offset, len)?;
            self.plan(&mut m, offset, len).map(|pieces| {
                let mut firsts = Vec::new();
                for p in &pieces {
                    if let Piece::Alloc(run) = p {
                        m.inflight.insert(run.gc, run.gc + run.clusters());
                        firsts.push(run.gc);
                    }
                }
                (pieces, Registration { node: self, firsts })
            })
        };
        let (pieces, reg) = match planned {
            Ok(planned) => planned,
            Err(e) => {
                pass();
                return Err(e);
            }
        };
        let frees = pieces.iter().any(|p| match p {
            Piece::Alloc(run) => run
                .olds
                .iter()
                .any(|k| !matches!(k, ClusterKind::Unallocated | ClusterKind::ZeroPlain)),
            Piece::InPlace { .. } => false,
        });
        if !frees {
            pass();
        }
        let written = self.write_pieces(bufs, &pieces);
        if reg.firsts.is_empty() {
            pass();
            return written;
        }
        // Declared after `reg`: on unwinding it is released first.
        let mut m = self.lock_meta()?;
        let result = match written {
            Ok(()) => self.link(&mut m, &pieces),
            Err(e) => {
                self.abort(&mut m, &pieces);
                Err(e)
            }
        };
        reg.finish(&mut m);
        drop(m);
        pass();
        result
    }

    /// Waits until no allocation is in flight in the guest clusters of
    /// `[offset, offset+len)`.
    pub(super) fn wait_for_allocations<'a>(
        &'a self,
        mut m: MutexGuard<'a, Meta>,
        offset: u64,
        len: usize,
    ) -> Result<MutexGuard<'a, Meta>> {
        let cs = self.cluster_size();
        let (first, end) = (offset / cs, (offset + len as u64).div_ceil(cs));
        while m.inflight.overlaps(first, end) {
            self.alloc_waits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            m = self
                .alloc_done
                .wait(m)
                .map_err(|_| BlockError::Poisoned("qcow2: metadata lock"))?;
        }
        Ok(m)
    }

    /// Maps a request and allocates what it needs (step 1). On an error
    /// after allocating, the new clusters are freed again.
    fn plan(&self, m: &mut Meta, offset: u64, len: usize) -> Result<Vec<Piece>> {
        self.check_write_overlap(m, offset, len as u64)?;
        self.prepare(m)?;
        let mut pieces = Vec::new();
        let result = self.map_and_allocate(m, offset, len, &mut pieces);
        // A hostile image may have a refcount of 0 under a cluster written in
        // place, so that new metadata was just put there: check again.
        let result = result.and_then(|()| {
            pieces.iter().try_for_each(|p| match p {
                Piece::InPlace { host, len } => m.check_data_write(*host, *len as u64),
                Piece::Alloc(_) => Ok(()),
            })
        });
        match result {
            Ok(()) => Ok(pieces),
            Err(e) => {
                self.abort(m, &pieces);
                Err(e)
            }
        }
    }

    fn map_and_allocate(
        &self,
        m: &mut Meta,
        offset: u64,
        len: usize,
        pieces: &mut Vec<Piece>,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let end = offset + len as u64;
        let last_gc = (end - 1) / cs;
        let mut g = offset;
        while g < end {
            let gc = g / cs;
            let in_c = g % cs;
            let (entry, _) = m.l2_entry(gc)?;
            let kind = m.classify(entry)?;
            if let ClusterKind::Normal(h) = kind {
                if entry & OFLAG_COPIED != 0 {
                    let n = (cs - in_c).min(end - g) as usize;
                    match pieces.last_mut() {
                        Some(Piece::InPlace { host, len }) if *host + *len as u64 == h + in_c => {
                            *len += n
                        }
                        _ => pieces.push(Piece::InPlace {
                            host: h + in_c,
                            len: n,
                        }),
                    }
                    g += n as u64;
                    continue;
                }
            }
            // A run of clusters that all need new host clusters, in one L2 table.
            let table_end = (gc / m.l2_entries + 1) * m.l2_entries;
            let mut olds = vec![kind];
            while gc + (olds.len() as u64) <= last_gc && gc + (olds.len() as u64) < table_end {
                let (e, _) = m.l2_entry(gc + olds.len() as u64)?;
                let k = m.classify(e)?;
                if matches!(k, ClusterKind::Normal(_)) && e & OFLAG_COPIED != 0 {
                    break;
                }
                olds.push(k);
            }
            let k = olds.len() as u64;
            m.writable_l2((gc / m.l2_entries) as usize)?;
            let host = m.alloc_clusters(k)?;
            let wend = end.min((gc + k) * cs);
            pieces.push(Piece::Alloc(Run {
                gc,
                host,
                olds,
                guest: g,
                len: (wend - g) as usize,
            }));
            g = wend;
        }
        Ok(())
    }

    /// Writes the data of every piece (step 2); stops at the first error.
    fn write_pieces(&self, bufs: &[&[u8]], pieces: &[Piece]) -> Result<()> {
        let mut cursor = SgSlices::new(bufs);
        for p in pieces {
            match p {
                Piece::InPlace { host, len } => {
                    self.data_write_vectored(*host, &cursor.take(*len))?
                }
                Piece::Alloc(run) => self.write_run(run, cursor.take(run.len))?,
            }
        }
        Ok(())
    }

    /// Writes a run of new clusters: the old content before and after the
    /// request's bytes, and the request's bytes from the caller's buffers.
    fn write_run(&self, run: &Run, data: Vec<&[u8]>) -> Result<()> {
        let cs = self.cluster_size();
        let start = run.gc * cs;
        let end = start + run.clusters() * cs;
        let wend = run.guest + run.len as u64;
        let head = if run.guest > start {
            Some(self.old_bytes(run.gc, run.olds[0], 0, run.guest - start)?)
        } else {
            None
        };
        let tail = if wend < end {
            let lc = run.gc + run.clusters() - 1;
            let kind = run.olds[(run.clusters() - 1) as usize];
            Some(self.old_bytes(lc, kind, wend - lc * cs, cs)?)
        } else {
            None
        };
        let mut iov: Vec<&[u8]> = Vec::with_capacity(data.len() + 2);
        iov.extend(head.as_ref().map(|b| &b[..]));
        iov.extend(data);
        iov.extend(tail.as_ref().map(|b| &b[..]));
        let aligned = iov
            .iter()
            .all(|b| (b.as_ptr() as usize).is_multiple_of(ALIGN) && b.len().is_multiple_of(ALIGN));
        if aligned || self.crypto.is_some() {
            return self.data_write_vectored(run.host, &iov);
        }
        // An O_DIRECT image file would write unaligned pieces one by one,
        // reading and writing back whole blocks for each: gather them into
        // aligned chunks instead (as the caller's bytes would be copied anyway).
        let total: usize = iov.iter().map(|b| b.len()).sum();
        let mut chunk = AlignedBuf::zeroed(total.min(GATHER_CHUNK));
        let mut cursor = SgSlices::new(&iov);
        let mut done = 0;
        while done < total {
            let n = (total - done).min(GATHER_CHUNK);
            let mut at = 0;
            for part in cursor.take(n) {
                chunk[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            self.storage.write_at(run.host + done as u64, &chunk[..n])?;
            done += n;
        }
        Ok(())
    }

    /// Bytes `[from, to)` of guest cluster `gc` as it is now (`kind`), for
    /// copy-on-write.
    fn old_bytes(&self, gc: u64, kind: ClusterKind, from: u64, to: u64) -> Result<AlignedBuf> {
        let mut b = AlignedBuf::zeroed((to - from) as usize);
        match kind {
            ClusterKind::Unallocated => {
                self.read_backing(gc * self.cluster_size() + from, &mut b)?
            }
            ClusterKind::ZeroPlain | ClusterKind::ZeroAlloc(_) => {}
            ClusterKind::Normal(h) => {
                self.data_read(h + from, gc * self.cluster_size() + from, &mut b)?
            }
            ClusterKind::Compressed { offset, size } => {
                let c = self.read_compressed(offset, size)?;
                b.copy_from_slice(&c[from as usize..to as usize]);
            }
        }
        Ok(b)
    }

    /// Points the L2 entries at the new clusters, whose data is written
    /// (step 3). On an error, the clusters not yet linked stay allocated.
    fn link(&self, m: &mut Meta, pieces: &[Piece]) -> Result<()> {
        let cs = self.cluster_size();
        // Before any L2 change: the next L2 write flushes the data first.
        m.data_written();
        for p in pieces {
            if let Piece::Alloc(run) = p {
                for (i, &old) in run.olds.iter().enumerate() {
                    let i = i as u64;
                    m.set_l2_entry(run.gc + i, (run.host + i * cs) | OFLAG_COPIED)?;
                    self.release(m, old);
                }
            }
        }
        Ok(())
    }

    /// Frees the new clusters of a request that failed before linking them:
    /// no L2 entry points there and only this request wrote them, so they can
    /// be reused at once (QEMU's `qcow2_alloc_cluster_abort`). A refcount
    /// that cannot be updated leaves the cluster leaked, never referenced.
    fn abort(&self, m: &mut Meta, pieces: &[Piece]) {
        let cs = self.cluster_size();
        for p in pieces {
            if let Piece::Alloc(run) = p {
                let first = run.host / cs;
                for c in first..first + run.clusters() {
                    if m.add_refcount(c, -1).is_err() {
                        break;
                    }
                }
            }
        }
    }
}
