//! The crypto threads: a rayon pool that encrypts and decrypts the pieces of
//! large requests in parallel.
//!
//! Its tasks only run the cipher over the buffers handed to them: no I/O, no
//! lock, nothing that could pick up another request. A caller outside any
//! rayon pool (a request worker, an image tool thread) blocks in
//! [`for_each_piece`] until its pieces are done without running anything
//! else meanwhile, so whatever it holds cannot be taken again on its thread.
//! A caller that is itself a rayon worker (of any pool) runs the pieces
//! inline instead: waiting there would let rayon run other work on it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::sg::Split;

/// Requests at least this large are split across the crypto threads.
pub const PARALLEL_MIN: usize = 128 << 10;
/// Least bytes a crypto task handles (a multiple of every sector size).
pub const PIECE: usize = 64 << 10;

static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
/// Callers inside [`for_each_piece`] right now.
static CALLERS: AtomicUsize = AtomicUsize::new(0);

/// Counts a caller for as long as it lives.
struct Caller;

impl Caller {
    /// Enters; returns the guard and how many callers there are with this one.
    fn enter() -> (Caller, usize) {
        (Caller, CALLERS.fetch_add(1, Ordering::AcqRel) + 1)
    }
}

impl Drop for Caller {
    fn drop(&mut self) {
        CALLERS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sets the number of crypto threads (1: every piece runs on its caller's
/// thread) before the first large request; later calls change nothing and
/// return false. The default is one per host CPU.
pub fn set_threads(threads: usize) -> bool {
    let mut set = false;
    POOL.get_or_init(|| {
        set = true;
        build(threads)
    });
    set
}

/// Starts the crypto threads now (one per host CPU unless [`set_threads`]
/// came first), rather than on the first request: the VMM wants them
/// started by a thread without a seccomp filter.
pub fn start() {
    let _ = pool();
}

fn pool() -> Option<&'static rayon::ThreadPool> {
    POOL.get_or_init(|| build(std::thread::available_parallelism().map_or(1, |n| n.get())))
        .as_ref()
}

fn build(threads: usize) -> Option<rayon::ThreadPool> {
    {
        if threads < 2 {
            return None;
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("crypto-{i}"))
            .start_handler(|_| crate::threads::started(crate::threads::BlockThread::Crypto))
            .build()
            .ok()
    }
}

/// Runs `f(sector, piece)` over every job `(first sector, piece)`, where
/// `sector_size` divides every piece's length. Inline for small totals, and
/// when as many callers as there are crypto threads are already at work (they
/// keep the cores busy; handing pieces around would only cost wake-ups);
/// else cut into one piece per crypto thread (at least [`PIECE`] bytes each)
/// on the crypto threads. Returns once all ran.
pub fn for_each_piece<P, F>(jobs: Vec<(u64, P)>, sector_size: usize, f: F)
where
    P: Split,
    F: Fn(u64, P) + Sync,
{
    let total: usize = jobs.iter().map(|(_, p)| p.len()).sum();
    let (_caller, callers) = Caller::enter();
    let pool = pool().filter(|p| {
        total >= PARALLEL_MIN
            && callers < p.current_num_threads()
            && rayon::current_thread_index().is_none()
    });
    let Some(pool) = pool else {
        for (sector, piece) in jobs {
            f(sector, piece);
        }
        return;
    };
    let share = total.div_ceil(pool.current_num_threads());
    let piece_len = share.next_multiple_of(PIECE).max(PIECE);
    let per_piece = (piece_len / sector_size) as u64;
    let mut pieces: Vec<(u64, P)> = Vec::with_capacity(total.div_ceil(piece_len) + jobs.len());
    for (mut sector, mut piece) in jobs {
        while piece.len() > piece_len {
            let (head, rest) = piece.split_at(piece_len);
            pieces.push((sector, head));
            sector += per_piece;
            piece = rest;
        }
        pieces.push((sector, piece));
    }
    pool.install(|| pieces.into_par_iter().for_each(|(s, p)| f(s, p)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_piece_once_with_its_sector() {
        let mut a = vec![0u8; 3 * PIECE + 512];
        let mut b = vec![0u8; 1024];
        let jobs = vec![(10u64, &mut a[..]), (5000, &mut b[..])];
        for_each_piece(jobs, 512, |sector, piece: &mut [u8]| {
            for (i, s) in piece.chunks_mut(512).enumerate() {
                s[..8].copy_from_slice(&(sector + i as u64).to_le_bytes());
                s[8] += 1;
            }
        });
        for (buf, first) in [(&a, 10u64), (&b, 5000)] {
            for (i, s) in buf.chunks(512).enumerate() {
                assert_eq!(s[..8], (first + i as u64).to_le_bytes(), "sector {i}");
                assert_eq!(s[8], 1, "sector {i} done once");
            }
        }
    }

    #[test]
    fn inside_a_rayon_pool_runs_inline() {
        let other = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool");
        let mut a = vec![0u8; 4 * PIECE];
        let here = other.install(|| {
            let me = std::thread::current().id();
            let same = std::sync::atomic::AtomicBool::new(true);
            for_each_piece(vec![(0, &mut a[..])], 512, |_, _: &mut [u8]| {
                if std::thread::current().id() != me {
                    same.store(false, std::sync::atomic::Ordering::SeqCst);
                }
            });
            same.into_inner()
        });
        assert!(here, "no piece may leave a rayon worker's thread");
    }
}
