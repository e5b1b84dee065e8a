//! Striped locks over encryption sectors. A write that covers only part of a
//! sector reads, decrypts, patches, encrypts and writes back the whole
//! sector; two such writes into different bytes of one sector (a guest's
//! 512-byte writes on a LUKS2 volume of 4096-byte sectors) would each write
//! back the other's old bytes. Each read-modify-write holds its sectors'
//! locks; writes of whole sectors take none (they overlap any write into the
//! same sector, whose order is then the writers' business).

use std::sync::{Mutex, MutexGuard};

/// Locks per node: sectors are spread over them by number.
const STRIPES: usize = 64;

/// The locks of one node.
pub struct SectorLocks {
    stripes: [Mutex<()>; STRIPES],
}

/// The locks of the sectors a read-modify-write covers, held until dropped.
pub struct SectorGuard<'a> {
    _held: Vec<MutexGuard<'a, ()>>,
}

impl Default for SectorLocks {
    fn default() -> Self {
        SectorLocks {
            stripes: std::array::from_fn(|_| Mutex::new(())),
        }
    }
}

impl SectorLocks {
    /// Locks the sectors numbered `sectors` (taken in stripe order, each
    /// stripe once, so that two writers never wait for each other in a cycle).
    pub fn lock(&self, sectors: &[u64]) -> SectorGuard<'_> {
        let mut stripes: Vec<usize> = sectors
            .iter()
            .map(|&s| (s.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize % STRIPES)
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        let held = stripes
            .into_iter()
            // A writer that panicked mid-update left the sector as the file
            // has it: nothing to repair, so the lock is taken anyway.
            .map(|i| self.stripes[i].lock().unwrap_or_else(|e| e.into_inner()))
            .collect();
        SectorGuard { _held: held }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn the_same_sector_excludes_and_repeated_stripes_do_not_deadlock() {
        let locks = Arc::new(SectorLocks::default());
        let inside = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (locks, inside) = (locks.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _g = locks.lock(&[7, 7 + STRIPES as u64 * 1000, 7]);
                        assert!(!inside.swap(true, Ordering::SeqCst), "two holders");
                        inside.store(false, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
